"""rlmd.search: ranked passages, grep by lines, exact locations (text and directory
contexts), over a str, the REPL's mapped view and the store; and the REPL's search/grep."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from rlmd.repl.ctxview import ContextView
from rlmd.search import Hit, Locator, grep, ranked
from rlmd.store import ContextStore

WORDS = (
    "river stone market lantern copper window garden silver winter harbor meadow thunder "
    "candle orchard falcon velvet pepper marble cactus saddle ribbon tunnel walnut glacier "
    "número café straße über naïve"
).split()


def haystack(rng: random.Random, lines: int, needle: str, depth: float) -> tuple[str, int]:
    """Random lines of filler words, ``needle`` as the line at ``depth``; (text, its line)."""
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(lines)]
    at = int(depth * (lines - 1))
    rows[at] = needle
    return "\n".join(rows) + "\n", at + 1


def expected_location(text: str, start: int) -> tuple[int, str | None, int | None]:
    """(line, file, file_line) computed from the str alone, independently of rlmd.search."""
    before = text[:start]
    line = before.count("\n") + 1
    file = file_line = None
    rows = text.split("\n")
    for i in range(line - 1, -1, -1):
        m = re.fullmatch(r"===== (.+) =====|==> (.+) <==|# ==== FILE: (\S+) ====", rows[i])
        if m:
            file = next(g for g in m.groups() if g)
            file_line = (line - 1 - i) or None
            break
    return line, file, file_line


def check_hit(text: str, h: Hit) -> None:
    line, file, file_line = expected_location(text, h.start)
    assert (h.line, h.file, h.file_line) == (line, file, file_line), h
    assert text[h.start : h.end].startswith(h.text[:100]), h


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("lines", [50, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.37, 0.5, 1.0])
def test_needle_passage_ranks_first(seed: int, lines: int, depth: float) -> None:
    rng = random.Random(seed * 1000 + lines)
    code = rng.randint(100000, 999999)
    needle = f"The special magic number for the zephyr project is {code}."
    text, at = haystack(rng, lines, needle, depth)
    hits = ranked(text, "What is the special magic number for the zephyr project?", k=5)
    assert hits and hits[0].text == needle and hits[0].line == at
    assert hits[0].score > (hits[1].score if len(hits) > 1 else 0)
    assert text[hits[0].start : hits[0].end] == needle
    for h in hits:
        check_hit(text, h)


def test_needle_in_a_view_of_a_mapped_file_ranks_the_same(tmp_path: Path) -> None:
    rng = random.Random(7)
    text, at = haystack(rng, 3000, "Der Schlüssel für café zephyr heißt Ωmega-77.", 0.61)
    p = tmp_path / "t.txt"
    p.write_bytes(text.encode())
    view = ContextView.open(str(p))
    a = ranked(text, "schlüssel zephyr", k=8)
    b = ranked(view, "schlüssel zephyr", k=8)
    assert a == b and a[0].line == at
    for h in a:
        check_hit(text, h)


def test_long_lines_are_cut_into_passages() -> None:
    rng = random.Random(3)
    filler = " ".join(rng.choice(WORDS[:20]) for _ in range(20000))  # one ~150 kB line
    mid = len(filler) // 2
    mid = filler.index(" ", mid)
    text = filler[:mid] + " the vault code is quokka-9931 " + filler[mid:]
    hits = ranked(text, "vault code quokka", k=3)
    assert "quokka-9931" in hits[0].text and len(hits[0].text) <= 1000
    assert text[hits[0].start : hits[0].end] == hits[0].text and hits[0].line == 1


def test_no_match_and_stopwords_only() -> None:
    assert ranked("alpha beta\ngamma\n", "zzz", k=3) == []
    hits = ranked("it is what it is\nnothing\n", "what is it", k=3)
    assert hits[0].line == 1
    with pytest.raises(ValueError):
        ranked("x", "x", k=0)


def directory_text(rng: random.Random) -> tuple[str, int]:
    """A text laid out like a directory context; (text, the price line's file line)."""
    parts, at = [], 0
    for i in range(12):
        rows = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(rng.randint(1, 30))]
        if i == 7:
            at = min(3, len(rows)) + 1
            rows.insert(3, "price_per_kwh = 0.45  # café tariff")
        parts.append(f"===== src/m{i}/file_{i}.py =====\n" + "\n".join(rows) + "\n\n")
    return "".join(parts), at


@pytest.mark.parametrize("seed", [5, 6])
def test_offsets_lines_and_file_lines_are_exact_in_directory_contexts(seed: int) -> None:
    rng = random.Random(seed)
    text, at = directory_text(rng)
    hits = ranked(text, "price per kwh tariff", k=10)
    assert hits[0].file == "src/m7/file_7.py" and hits[0].file_line == at
    for h in hits + grep(text, r"\w+ \w+", max_matches=10_000):
        check_hit(text, h)
    loc = Locator(text)
    for _ in range(300):
        s = rng.randrange(len(text))
        h = loc.locate(s, s + 3)
        assert (h.start, h.end, h.text) == (s, min(s + 3, len(text)), text[s : s + 3])
        check_hit(text, h)


def test_grep_returns_whole_lines_once_each() -> None:
    text = "alpha key=1 key=2\nbeta\nnaïve key=3 café\nlast key"
    hits = grep(text, r"key=\d")
    assert [h.text for h in hits] == ["alpha key=1 key=2", "naïve key=3 café"]
    assert [h.line for h in hits] == [1, 3]
    assert [(h.start, h.end) for h in hits] == [(0, 17), (23, 39)]
    # A pattern that must run on the str (non-ASCII, '.'), and one spanning lines.
    assert [h.text for h in grep(text, "ï.e")] == ["naïve key=3 café"]
    assert [h.text for h in grep(text, r"beta\nna")] == ["beta\nnaïve key=3 café"]
    assert [h.line for h in grep(text, "(?m)^", max_matches=10)] == [1, 2, 3, 4]
    assert grep(text, "key$")[0].text == "last key"
    with pytest.raises(ValueError, match="bad regular expression"):
        grep(text, "(")


def test_grep_on_a_view_matches_grep_on_the_str(tmp_path: Path) -> None:
    rng = random.Random(11)
    text, _ = directory_text(rng)
    p = tmp_path / "d.txt"
    p.write_bytes(text.encode())
    view = ContextView.open(str(p))
    for pat in [r"café", r"\d+\.\d+", r"(?i)PRICE", r"^=====", r"ü."]:
        assert grep(view, pat, 500) == grep(text, pat, 500)


def test_store_ranked_grep_and_locate_for_a_directory(tmp_path: Path) -> None:
    rng = random.Random(9)
    tree = tmp_path / "tree"
    expect = {}
    for i in range(6):
        f = tree / f"pkg{i % 2}" / f"mod{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        rows = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(20)]
        if i == 4:
            rows[12] = "Ωmega deadline: the launch is on 2027-03-14"
            expect = {"file": f"pkg0/mod{i}.txt", "file_line": 13}
        f.write_text("\n".join(rows) + "\n")
    store = ContextStore(tmp_path / "ctx")
    store.put_path("d", tree)
    text = store.peek("d", 0, 10**9)
    hits = store.search_ranked("d", "when is the launch deadline?", k=4)
    assert {"file": hits[0].file, "file_line": hits[0].file_line} == expect
    assert hits == ranked(text, "when is the launch deadline?", k=4)
    g = store.grep("d", r"launch")
    assert g == grep(text, "launch") and g[0].file == expect["file"]
    for h in hits + g:
        check_hit(text, h)
    h = store.locate("d", hits[0].start + 2, hits[0].start + 7)
    assert h.text == text[hits[0].start + 2 : hits[0].start + 7] and h.file == expect["file"]


def test_headers_found_across_scan_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    import rlmd.search.locate as locate

    text, _ = directory_text(random.Random(12))
    want = Locator(text).headers()
    for w in (7, 64, 1000):
        monkeypatch.setattr(locate, "_HEAD_WINDOW", w)
        assert Locator(text).headers() == want and len(want) == 12


def test_header_kinds_and_near_misses() -> None:
    from rlmd.search.locate import header_path

    assert header_path(b"===== a/b c.txt =====") == "a/b c.txt"
    assert header_path(b"==> /var/log/syslog <==") == "/var/log/syslog"
    assert header_path(b"# ==== FILE: json/decoder.py ====") == "json/decoder.py"
    assert header_path(b"// ===== FILE: src/main.rs =====\r") == "src/main.rs"
    assert header_path(b"==== FILE:x.py ====") == "x.py"
    for line in [
        b"FILE: notes.txt",  # a field in a log, not a banner
        b"# ==== FILE: two words ====",
        b"a ==> b <== c",
        b"==>  <==",
        b"===== =====",
        b"x = 1  # ==== FILE: y ====",
        b"==> " + b"x" * 5000 + b" <==",
    ]:
        assert header_path(line) is None, line


@pytest.mark.parametrize(
    "head", ["# ==== FILE: {} ====", "==> {} <==", "===== {} ====="], ids=["banner", "tail", "rlmd"]
)
def test_a_text_of_joined_files_is_located_by_file(head: str, tmp_path: Path) -> None:
    """Issue 10's codeqa trace: sources joined with "# ==== FILE: x ====" banners gave hits
    with a line only, so "which file defines X" stayed open."""
    parts = []
    for name, body in [
        ("contextlib.py", "import abc\n\nclass ExitStack:\n    pass\n"),
        ("json/decoder.py", "import re\n\n\ndef _push_exit_callback(cb):\n    return cb\n"),
    ]:
        parts.append(head.format(name) + "\n" + body)
    text = "Joined sources, one after another.\n" + "".join(parts)
    store = ContextStore(tmp_path / "ctx")
    store.put_text("t", text)
    for hits in (
        ranked(text, "def _push_exit_callback", k=1),
        store.search_ranked("t", "def _push_exit_callback", k=1),
        store.grep("t", r"def _push_exit_callback"),
        grep(text, "def _push"),
    ):
        h = hits[0]
        assert (h.file, h.file_line, h.line) == ("json/decoder.py", 4, 11), h
        check_hit(text, h)
    first = ranked(text, "ExitStack", k=1)[0]
    assert (first.file, first.file_line) == ("contextlib.py", 3)
    before = store.locate("t", 0, 6)  # the text before the first header has no file
    assert before.file is None and before.line == 1
