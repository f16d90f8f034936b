"""The context store: puts, reads, unicode offsets, directory ingestion, persistence."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
import threading
from pathlib import Path

import pytest

from rlmd.store import ContextStore, StoreError
from rlmd.store.charindex import CharIndex, CharIndexBuilder, split_incomplete
from rlmd.store.ingest import GitIgnore, Globs, file_header
from rlmd.store.search import plan
from rlmd.store.store import MAX_MATCH_TEXT, MAX_MATCHES
from rlmd.utf8_regex import runs_on_utf8_bytes

UNICODE = "Zoë's café ☕ — naïve 😀 façade 日本語 🇫🇷\nsecond line: ümlaut ß € 𝄞\n"


@pytest.fixture
def store(tmp_path: Path) -> ContextStore:
    return ContextStore(tmp_path / "contexts")


def expected_matches(text: str, pattern: str) -> list[tuple[int, int, int, str]]:
    out, line, pos = [], 1, 0
    for m in re.finditer(pattern, text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        out.append((m.start(), m.end(), line, m.group()))
    return out


def got_matches(store: ContextStore, name: str, pattern: str) -> list[tuple[int, int, int, str]]:
    return [(m.start, m.end, m.line, m.text) for m in store.search(name, pattern, MAX_MATCHES)]


def file_text(store: ContextStore, name: str) -> str:
    return store.text_path(name).read_bytes().decode("utf-8")


# -- basics ---------------------------------------------------------------------------------


def test_put_peek_search_list_drop(store: ContextStore) -> None:
    text = "alpha beta\ngamma delta\nepsilon"
    res = store.put_text("doc", text)
    assert (res.name, res.chars, res.bytes, res.lines) == ("doc", 30, 30, 3)
    assert res.tokens_est == 8
    assert store.peek("doc", 6, 16) == "beta\ngamma"
    assert store.peek("doc", 25, 10**9) == "silon"  # end is clamped
    assert store.peek("doc", 30, 30) == ""
    ms = store.search("doc", r"\b\w*ta\b")
    assert [(m.start, m.end, m.line, m.text) for m in ms] == [
        (6, 10, 1, "beta"),
        (17, 22, 2, "delta"),
    ]
    infos = store.list()
    assert [i.name for i in infos] == ["doc"]
    info = infos[0]
    assert (info.chars, info.bytes, info.lines, info.tokens_est) == (30, 30, 3, 8)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info.created)
    assert info.updated >= info.created
    assert info.version == hashlib.sha256(text.encode()).hexdigest()
    assert store.drop("doc") is True
    assert store.drop("doc") is False
    assert store.list() == []
    with pytest.raises(StoreError) as ei:
        store.peek("doc", 0, 1)
    assert ei.value.kind == "not_found"
    assert "context/list" in ei.value.message
    assert not any((store.root).glob("*/*.txt"))


def test_lines_count(store: ContextStore) -> None:
    assert store.put_text("e", "").lines == 0
    assert store.put_text("a", "x").lines == 1
    assert store.put_text("b", "x\n").lines == 1
    assert store.put_text("c", "x\ny").lines == 2
    assert store.put_text("d", "\n\n").lines == 2


def test_names_are_free_form(store: ContextStore) -> None:
    names = ["a/b/../c", "with space", "colon:name", "日本語 😀", ".hidden", "x" * 256, "..", "/"]
    for i, n in enumerate(names):
        store.put_text(n, f"text {i}")
    assert sorted(i.name for i in store.list()) == sorted(names)
    for i, n in enumerate(names):
        assert store.peek(n, 0, 100) == f"text {i}"
    # Nothing escaped the store's directory.
    assert all(p.parent == store.root for p in store.root.iterdir())


@pytest.mark.parametrize("name", ["", "x" * 257, "tab\there", "nl\n", "del\x7f", "c1\x85", 5])
def test_invalid_names(store: ContextStore, name: object) -> None:
    with pytest.raises(StoreError) as ei:
        store.put_text(name, "x")  # type: ignore[arg-type]
    assert ei.value.kind == "invalid_name"
    with pytest.raises(StoreError) as ei:
        store.info(name)  # type: ignore[arg-type]
    assert ei.value.kind == "invalid_name"


def test_invalid_ranges(store: ContextStore) -> None:
    store.put_text("t", "hello")
    for start, end in [(-1, 2), (3, 2), (6, 7)]:
        with pytest.raises(StoreError) as ei:
            store.peek("t", start, end)
        assert ei.value.kind == "invalid_range"
    small = ContextStore(store.root, max_peek_chars=3)
    with pytest.raises(StoreError) as ei:
        small.peek("t", 0, 5)
    assert ei.value.kind == "invalid_range" and "at most 3" in ei.value.message
    assert small.peek("t", 1, 4) == "ell"


def test_invalid_patterns(store: ContextStore) -> None:
    store.put_text("t", "hello")
    for pat in ["(", "[a-", "a{2,1}", "(?P<x>a)(?P<x>b)"]:
        with pytest.raises(StoreError) as ei:
            store.search("t", pat)
        assert ei.value.kind == "invalid_pattern"
        assert "Python `re`" in ei.value.message
    with pytest.raises(StoreError) as ei:
        store.search("t", "l", max_matches=0)
    assert ei.value.kind == "invalid_argument"
    with pytest.raises(StoreError) as ei:
        store.search("missing", "l")
    assert ei.value.kind == "not_found"


def test_search_caps(store: ContextStore) -> None:
    store.put_text("t", "ab" * 20_000 + "\n" + "z" * (MAX_MATCH_TEXT + 10))
    assert len(store.search("t", "a", max_matches=5)) == 5
    assert len(store.search("t", "a", max_matches=10**9)) == MAX_MATCHES
    (m,) = store.search("t", "z+")
    assert m.truncated and len(m.text) == MAX_MATCH_TEXT
    assert (m.start, m.end, m.line) == (40_001, 40_001 + MAX_MATCH_TEXT + 10, 2)
    (m,) = store.search("t", "b\n")
    assert not m.truncated


def test_search_empty_context(store: ContextStore) -> None:
    store.put_text("e", "")
    assert got_matches(store, "e", "x") == []
    assert got_matches(store, "e", "^") == [(0, 0, 1, "")]


# -- unicode --------------------------------------------------------------------------------


def test_unicode_offsets_peek_and_search(store: ContextStore) -> None:
    text = UNICODE * 3
    store.put_text("u", text)
    info = store.info("u")
    assert info.chars == len(text) and info.bytes == len(text.encode())
    for i in range(len(text) + 1):
        for j in (i, i + 1, i + 7, len(text)):
            assert store.peek("u", i, j) == text[i:j]
    for pat in ["é", "😀", r"\w+", "(?m)^s", "€ 𝄞", "🇫🇷\n", r"(?i)ZOË", r"\bcaf\w", "$", ""]:
        assert got_matches(store, "u", pat) == expected_matches(text, pat), pat


def test_unicode_offsets_beyond_checkpoints(store: ContextStore) -> None:
    # Long enough for several index checkpoints (one per 64 Ki characters).
    rng = random.Random(7)
    parts = [rng.choice(["abc ", "é", "😀", "日本", "\n", "xyz" * 5]) for _ in range(60_000)]
    text = "".join(parts)
    assert len(text) > 3 * 65_536
    store.put_text("big", text)
    for _ in range(200):
        i = rng.randrange(len(text))
        j = min(len(text), i + rng.randrange(300))
        assert store.peek("big", i, j) == text[i:j]
    assert store.peek("big", 0, len(text)) == text
    for pat in ["😀\n日", r"xyz(?=\n)", r"\n\n+"]:
        assert got_matches(store, "big", pat) == expected_matches(text, pat)


def test_search_small_windows_match_re(tmp_path: Path) -> None:
    # Tiny windows exercise the boundary logic: results must equal re.finditer's.
    root = tmp_path / "c"
    rng = random.Random(3)
    patterns = [
        r"a+", r"é", r"\n", r"^", r"$", r"(?m)^a\w*", r"a*", r"", r"😀\n", r"\w+",
        r"(?<=a)b", r"b(?=\n)", r"\Z", r"(?m)$", r"[^\n]+", r"\s+", r"x|", r"(?s).{3}",
    ]  # fmt: skip
    writer = ContextStore(root)
    for trial in range(60):
        alphabet = "ab\né😀 x" if trial % 3 else "ab\n x"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        writer.put_text("x", text)
        s = ContextStore(
            root, search_window_chars=rng.randint(1, 9), search_overlap_chars=rng.randint(8, 20)
        )
        for pat in patterns:
            assert got_matches(s, "x", pat) == expected_matches(text, pat), (text, pat)


def test_lone_surrogates_are_replaced(store: ContextStore) -> None:
    res = store.put_text("s", "a\ud800b")
    assert res.chars == 3
    assert store.peek("s", 0, 3) == "a\ufffdb"


# -- versions, files, pins ------------------------------------------------------------------


def test_version_tracks_content(store: ContextStore) -> None:
    v1 = store.put_text("v", "one").version
    info1 = store.info("v")
    assert store.version("v") == v1
    assert store.put_text("v", "one").version == v1
    assert store.info("v").updated == info1.updated
    v2 = store.put_text("v", "two").version
    assert v2 != v1
    assert store.put_text("v", "one").version == v1
    assert store.info("v").created == info1.created


def test_text_path_stays_valid_after_replace(store: ContextStore) -> None:
    store.put_text("c", "old text")
    path = store.text_path("c")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        ino = os.fstat(f.fileno()).st_ino
        store.put_text("c", "new text, longer")
        assert mm[:] == b"old text"
        assert os.fstat(f.fileno()).st_ino == ino
        store.drop("c")
        assert mm[:] == b"old text"
    assert not path.exists()


def test_pin_keeps_version_files(store: ContextStore) -> None:
    store.put_text("p", "pinned")
    with store.pin("p") as pinned:
        assert pinned.info.version == store.version("p")
        store.put_text("p", "replaced")
        assert pinned.path.read_text() == "pinned"
        store.drop("p")
        assert pinned.path.read_text() == "pinned"
    assert not pinned.path.exists()
    assert not (store.root / pinned.path.parent.name).exists()


def test_append_text(store: ContextStore) -> None:
    store.put_text("a", "first é\n")
    res = store.put_text("a", "second 😀", append=True)
    assert store.peek("a", 0, 100) == "first é\nsecond 😀"
    assert (res.chars, res.lines) == (len("first é\nsecond 😀"), 2)
    assert got_matches(store, "a", "😀") == [(15, 16, 2, "😀")]
    store.put_text("new", "created by append", append=True)
    assert store.peek("new", 0, 100) == "created by append"


def test_append_long_nonascii_keeps_index(store: ContextStore) -> None:
    a = ("é" * 70_000) + "x"
    b = "😀" * 70_000
    store.put_text("a", a)
    store.put_text("a", b, append=True)
    text = a + b
    for i in (0, 65_535, 65_536, 70_000, 70_001, 131_072, 139_999, len(text) - 1):
        assert store.peek("a", i, i + 3) == text[i : i + 3]
    assert store.version("a") == hashlib.sha256(text.encode()).hexdigest()


# -- persistence ----------------------------------------------------------------------------


def test_restart_persistence_and_cleanup(tmp_path: Path) -> None:
    root = tmp_path / "contexts"
    s1 = ContextStore(root)
    s1.put_text("keep", UNICODE)
    s1.put_text("second", "2")
    key_dir = s1.text_path("keep").parent
    # Leftovers of crashed writes: temp files, an unreferenced version, a meta-less dir.
    (key_dir / ".tmp-deadbeef.txt").write_text("torn")
    (key_dir / "0123456789abcdef0123456789abcdef.txt").write_text("orphan")
    orphan_dir = root / ("f" * 32)
    orphan_dir.mkdir()
    (orphan_dir / ".tmp-1.txt").write_text("half")
    s2 = ContextStore(root)
    assert [i.name for i in s2.list()] == ["keep", "second"]
    assert s2.peek("keep", 0, 1000) == UNICODE
    assert s2.version("keep") == s1.version("keep")
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(
        ["meta.json", f"{s2.version('keep')}.txt", f"{s2.version('keep')}.idx"]
    )
    assert not orphan_dir.exists()


def test_other_store_sees_replacement(tmp_path: Path) -> None:
    a = ContextStore(tmp_path / "c")
    b = ContextStore(tmp_path / "c")
    a.put_text("x", "one")
    assert b.peek("x", 0, 10) == "one"
    a.put_text("x", "two two")
    assert b.peek("x", 0, 10) == "two two"
    a.drop("x")
    with pytest.raises(StoreError):
        b.peek("x", 0, 10)


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_puts_and_reads(store: ContextStore) -> None:
    texts = [f"{i}:" + ("é" * (i * 5000)) + f"{i}\n" * (i * 1000) for i in range(1, 9)]
    store.put_text("c", texts[0])
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(t: str) -> None:
        try:
            for _ in range(3):
                store.put_text("c", t)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                info = store.info("c")
                whole = store.peek("c", 0, 10**9)
                assert whole in texts
                assert info.chars > 0
                assert store.search("c", r"^\d+:", 1)[0].start == 0
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(t,)) for t in texts]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    final = file_text(store, "c")
    assert final in texts
    assert store.version("c") == hashlib.sha256(final.encode()).hexdigest()
    assert len(list(store.text_path("c").parent.glob("*.txt"))) == 1


# -- files and directories ------------------------------------------------------------------


def test_put_single_file(store: ContextStore, tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes("héllo\r\nwörld".encode())
    res = store.put_path("n", f)
    assert (res.files, res.chars, res.replaced) == (1, 12, 0)
    assert store.peek("n", 0, 100) == "héllo\r\nwörld"


def test_put_file_invalid_utf8_is_replaced(store: ContextStore, tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    # Legit U+FFFD, an invalid byte, a truncated sequence, and one cut by the chunking.
    f.write_bytes(b"ok \xef\xbf\xbd \xff mid \xe2\x82 end" + b"a" * ((1 << 20) - 3) + "€".encode())
    res = store.put_path("b", f)
    assert res.replaced == 2 and res.replaced_in == [str(f)]
    text = file_text(store, "b")
    assert text.startswith("ok \ufffd \ufffd mid \ufffd end") and text.endswith("a€")


def test_put_binary_file_refused(store: ContextStore, tmp_path: Path) -> None:
    f = tmp_path / "img.bin"
    f.write_bytes(b"\x89PNG\x00\x01")
    with pytest.raises(StoreError) as ei:
        store.put_path("b", f)
    assert ei.value.kind == "binary"
    assert store.list() == []


def test_put_path_errors(store: ContextStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError) as ei:
        store.put_path("x", tmp_path / "missing")
    assert ei.value.kind == "path_not_found"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StoreError) as ei:
        store.put_path("x", fifo)
    assert ei.value.kind == "not_a_file"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError) as ei:
        store.put_path("x", empty)
    assert ei.value.kind == "no_files"


def make_tree(root: Path) -> None:
    files = {
        ".gitignore": "*.log\nbuild/\n/secret.txt\n!keep.log\ndocs/**/draft*\n# comment\n",
        "README.md": "# readme\n",
        "secret.txt": "root secret\n",
        "keep.log": "kept log\n",
        "debug.log": "ignored log\n",
        "src/main.py": "print('héllo')\n",
        "src/util.py": "def f(): pass",  # no trailing newline
        "src/latin1.txt": "caf\xe9",  # written as UTF-8 below, then overwritten
        "src/secret.txt": "not anchored here\n",
        "src/.gitignore": "generated.py\n!important.log\n",
        "src/generated.py": "# ignored by nested .gitignore\n",
        "src/important.log": "re-included by nested .gitignore\n",
        "build/out.txt": "ignored dir\n",
        "lib/build": "a file named build is not a directory\n",
        "docs/a/b/draft1.md": "ignored draft\n",
        "docs/final.md": "final doc\n",
        "node_modules/pkg/index.js": "excluded\n",
        ".git/config": "never read\n",
    }
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    (root / "src/latin1.txt").write_bytes(b"caf\xe9 cr\xe8me\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (root / "huge.txt").write_text("x" * 5000)


def test_put_directory(store: ContextStore, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    make_tree(proj)
    outside = tmp_path / "outside.txt"
    outside.write_text("outside\n")
    (proj / "link_out.txt").symlink_to(outside)
    (proj / "link_in.md").symlink_to(proj / "README.md")
    (proj / "src_link").symlink_to(proj / "src")
    res = store.put_path("proj", proj, exclude=["node_modules"], max_file_bytes=4096)
    text = file_text(store, "proj")
    headers = re.findall(r"^===== (.*) =====$", text, flags=re.M)
    assert headers == [
        ".gitignore",
        "README.md",
        "docs/final.md",
        "keep.log",
        "lib/build",
        "link_in.md",
        "src/.gitignore",
        "src/important.log",
        "src/latin1.txt",
        "src/main.py",
        "src/secret.txt",
        "src/util.py",
    ]
    assert "===== src/util.py =====\ndef f(): pass\n\n" in text
    assert text.startswith(file_header(".gitignore"))
    assert "print('héllo')" in text
    assert "caf\ufffd cr\ufffdme\n" in text
    assert (res.replaced, res.replaced_in) == (2, ["src/latin1.txt"])
    assert res.files == len(headers)
    skipped = {s.path: s.reason for s in res.skipped}
    assert set(skipped) == {"huge.txt", "link_out.txt", "logo.png", "src_link"}
    assert "too large" in skipped["huge.txt"]
    assert "binary" in skipped["logo.png"]
    assert "outside" in skipped["link_out.txt"]
    assert "directory" in skipped["src_link"]
    # .git, secret.txt, debug.log, build/, docs/a/b/draft1.md, src/generated.py
    assert res.ignored == 6
    assert res.excluded == 1
    assert res.chars == len(text) and res.lines == text.count("\n")


def test_put_directory_include_exclude(store: ContextStore, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    make_tree(proj)
    res = store.put_path("py", proj, include=["*.py"], exclude=["src/util.py"])
    text = file_text(store, "py")
    assert re.findall(r"^===== (.*) =====$", text, flags=re.M) == ["src/main.py"]
    assert res.files == 1
    res = store.put_path("md", proj, include=["docs/**/*.md", "README.md"])
    text = file_text(store, "md")
    assert re.findall(r"^===== (.*) =====$", text, flags=re.M) == ["README.md", "docs/final.md"]


def test_put_directory_append(store: ContextStore, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    (proj / "d").mkdir(parents=True)
    (proj / "d" / "f.txt").write_text("content")
    store.put_text("ctx", "preface without newline")
    store.put_path("ctx", proj, append=True)
    assert file_text(store, "ctx") == "preface without newline\n===== d/f.txt =====\ncontent\n\n"


def test_header_escapes_control_characters() -> None:
    assert file_header("a\nb.txt") == "===== 'a\\nb.txt' =====\n"


# -- ingest rules ---------------------------------------------------------------------------


def test_gitignore_semantics() -> None:
    gi = GitIgnore(
        [
            "*.o",
            "!keep.o",
            "/top.txt",
            "logs/",
            "a/**/z",
            "**/cache",
            "out/**",
            r"\#hash",
            r"\!bang",
            "trailing\\ ",
            "doc/*.md",
            "[abc]x",
            "[!d]y",
        ]
    )

    def ig(rel: str, is_dir: bool = False) -> bool:
        return gi.verdict(rel, is_dir) is True

    assert ig("x.o") and ig("deep/dir/x.o")
    assert not ig("keep.o") and gi.verdict("keep.o", False) is False
    assert ig("top.txt") and not ig("sub/top.txt")
    assert ig("logs", True) and ig("sub/logs", True) and not ig("logs")
    assert ig("a/z") and ig("a/b/c/z") and not ig("b/a/z")
    assert ig("cache", True) and ig("x/y/cache")
    assert ig("out/x") and ig("out/x/y") and not ig("out", True)
    assert ig("#hash") and ig("!bang") and ig("trailing ")
    assert ig("doc/x.md") and not ig("doc/sub/x.md") and not ig("sub/doc/x.md")
    assert ig("ax") and not ig("dx") and ig("ey") and not ig("dy")
    assert gi.verdict("unrelated.c", False) is None


def test_globs() -> None:
    g = Globs(["*.py", "./src/**/*.rs", "docs/"])
    assert g.match("a.py") and g.match("x/y/a.py")
    assert g.match("src/a.rs") and g.match("src/x/y/a.rs") and not g.match("lib/src/a.rs")
    assert g.match("docs") and g.match("x/docs")
    assert not Globs([]) and not Globs(None)


# -- char index -----------------------------------------------------------------------------


def test_charindex_roundtrip_random() -> None:
    rng = random.Random(11)
    for _ in range(100):
        stride = rng.choice([1, 2, 3, 7, 64])
        parts = [
            "".join(rng.choice("ab\nc€é😀ü" if rng.random() < 0.5 else "xyz\n") for _ in range(30))
            for _ in range(rng.randint(0, 5))
        ]
        builder = CharIndexBuilder(stride)
        out = bytearray()
        for p in parts:
            if rng.random() < 0.5:
                for piece in builder.add_str(p):
                    out += piece
            else:
                out += p.encode()
                builder.add_utf8(p.encode())
        idx = CharIndex.from_bytes(builder.finish().to_bytes())
        text, buf = "".join(parts), bytes(out)
        assert (idx.chars, idx.nbytes, idx.ascii) == (len(text), len(buf), text.isascii())
        assert idx.newlines == text.count("\n")
        for c in range(len(text) + 1):
            b = idx.byte_offset(buf, c)
            assert b == len(text[:c].encode())
            assert idx.char_offset(buf, b) == c
            assert idx.line_of(buf, c) == text.count("\n", 0, c) + 1
        for _ in range(5):
            i, j = sorted(rng.randint(0, len(text)) for _ in range(2))
            assert idx.slice(buf, i, j) == text[i:j]
        # Appending resumes the index where it stopped.
        more = CharIndexBuilder.resume(idx)
        extra = "é\n€x\n" * rng.randint(0, 9) + "abc\n"
        for piece in more.add_str(extra):
            buf += piece
        text += extra
        idx2 = more.finish()
        for c in range(0, len(text) + 1, 3):
            assert idx2.byte_offset(buf, c) == len(text[:c].encode())
            assert idx2.line_of(buf, c) == text.count("\n", 0, c) + 1


def test_charindex_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        CharIndex.from_bytes(b"nope")
    good = CharIndexBuilder(4)
    for _ in good.add_str("ééééé"):
        pass
    data = good.finish().to_bytes()
    with pytest.raises(ValueError):
        CharIndex.from_bytes(data[:-8])


def test_split_incomplete() -> None:
    data = "a€😀".encode()
    for cut in range(len(data) + 1):
        whole, rest = split_incomplete(data[:cut])
        whole.decode("utf-8")
        assert whole + rest == data[:cut] and len(rest) <= 3


def test_search_lines_across_windows_and_checkpoints(tmp_path: Path) -> None:
    rng = random.Random(5)
    for alphabet in ("ab \n", "aé 😀\n"):
        text = "".join(rng.choice(alphabet) for _ in range(150_000))
        s = ContextStore(tmp_path / "c", search_window_chars=5000, search_overlap_chars=300)
        s.put_text("x", text)
        for pat in [r"a\n", r"(?m)^b", r"😀", r"a{4,}"]:
            want = expected_matches(text, pat)[:MAX_MATCHES]
            assert got_matches(s, "x", pat) == want, pat


def test_ascii_only_patterns() -> None:
    only_ascii = [
        "abc", r"a+b*", r"[a-z0-9_]+", r"(?m)^x$", r"\Aab\Z", r"(a|bc)\1", r"(?<=a)b",
        r"(?<!x)y", r"(?=q)q", r"(?a)\bw\w+\b", r"(?ai)abc", r"(?a)\d{2,}", r"x*", "",
    ]  # fmt: skip
    not_only_ascii = [
        ".", r"[^a]", r"\w", r"\bx", r"(?i)k", r"\W", r"(?a)\W", r"é", r"\xe9", r"(?i:a)b",
        r"[\x00-\xff]", r"(?s).", r"\S+",
    ]  # fmt: skip
    for p in only_ascii:
        assert runs_on_utf8_bytes(p), p
        assert plan(p, re.compile(p), text_ascii=False)[1] == "bytes", p
    for p in not_only_ascii:
        assert not runs_on_utf8_bytes(p), p
        assert plan(p, re.compile(p), text_ascii=False)[1] == "str", p
    assert plan(r"\w+", re.compile(r"\w+"), text_ascii=True)[1] == "bytes"
    # Flags passed apart from the pattern count too; case folding only under ASCII.
    assert not runs_on_utf8_bytes("k", re.IGNORECASE)
    assert runs_on_utf8_bytes("k", re.IGNORECASE | re.ASCII)
    assert not runs_on_utf8_bytes(r"\w", 0) and runs_on_utf8_bytes(r"\w", re.ASCII)
    # A caller that cannot drop empty matches inside a character refuses them.
    assert runs_on_utf8_bytes("x*") and not runs_on_utf8_bytes("x*", allow_empty=False)
    assert runs_on_utf8_bytes("x+", allow_empty=False)
    assert not runs_on_utf8_bytes("(unclosed")


def test_bytes_search_on_utf8_text_matches_re(tmp_path: Path) -> None:
    rng = random.Random(9)
    patterns = [
        r"ab", r"a+", r"x*", r"", r"(?m)^b", r"(?m)a$", r"\n", r"(?<=é)a", r"(?<!😀)b",
        r"(a)\1", r"(?a)\b\w+\b", r"(?ai)AB", r"[ab]{2,}", r"$", r"\Z",
    ]  # fmt: skip
    writer = ContextStore(tmp_path / "c")
    for _ in range(40):
        text = "".join(rng.choice(["a", "b", "é", "😀", "\n", " ", "日"]) for _ in range(200))
        writer.put_text("x", text)
        s = ContextStore(
            tmp_path / "c",
            search_window_chars=rng.randint(3, 40),
            search_overlap_chars=rng.randint(12, 30),
        )
        for pat in patterns:
            assert got_matches(s, "x", pat) == expected_matches(text, pat), (text, pat)


def test_damaged_metadata_is_reported_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "c"
    s = ContextStore(root)
    s.put_text("good", "fine")
    s.put_text("bad", "will be damaged")
    meta = s.text_path("bad").parent / "meta.json"
    meta.write_text("{not json")
    s2 = ContextStore(root)  # starting up must not fail
    bad, good = s2.list()  # the damaged one is listed, its name lost with its metadata
    assert good.name == "good" and good.damaged is None
    assert bad.name.startswith("<unknown name") and "remove the directory" in bad.damaged
    with pytest.raises(StoreError) as ei:
        s2.info("bad")
    assert ei.value.kind == "damaged" and "drop" in ei.value.message
    assert s2.drop("bad") is True
    s2.put_text("bad", "again")
    assert s2.peek("bad", 0, 10) == "again"


def test_search_timeout(tmp_path: Path) -> None:
    s = ContextStore(tmp_path / "c", search_window_chars=1000, search_overlap_chars=100)
    s.put_text("t", "abc\n" * 50_000)
    with pytest.raises(StoreError) as ei:
        s.search("t", "zzz", timeout_s=0)
    assert ei.value.kind == "timeout" and "0% of the text" in ei.value.message
    assert len(s.search("t", "abc", 5, timeout_s=10)) == 5


def test_open_mappings_are_bounded(store: ContextStore) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(100):
        store.put_text(f"c{i}", f"text {i} é")
        assert store.peek(f"c{i}", 0, 20) == f"text {i} é"
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 70
    assert store.peek("c0", 0, 20) == "text 0 é"  # evicted, reopened


def test_name_locks_are_forgotten_after_use(store: ContextStore) -> None:
    """Issue 14: each inline query stores its text under a new name ("_query:<job>") and
    drops it; the store kept an in-process lock per name ever used, one more per query."""
    for i in range(300):
        store.put_text(f"_query:{i}", f"document {i}")
        assert store.info(f"_query:{i}").chars == len(f"document {i}")
        store.drop(f"_query:{i}")
    assert len(store._locks) == 0
    # Nor a lock file on disk per dropped name.
    assert list((store.root / ".locks").iterdir()) == []
    # Still one writer at a time per name: writers racing on one name all land, whole.
    store.put_text("shared", "0")
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for j in range(20):
                store.put_text("shared", f"{k}-{j} " * 50)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    text = store.peek("shared", 0, 10_000)
    assert len(set(text.split())) == 1 and len(text.split()) == 50
    assert len(store._locks) == 0


def test_writers_and_droppers_of_one_name_across_processes_stay_one_at_a_time(
    tmp_path: Path,
) -> None:
    """A drop deletes the name's lock file while holding it; a writer of another process
    that waited on the deleted file must take the new one, not write beside a second
    writer (the inode is checked after the flock)."""
    import subprocess
    import sys

    root = tmp_path / "st"
    ContextStore(root)
    script = (
        "import sys\n"
        "from rlmd.store.store import ContextStore\n"
        "s = ContextStore(sys.argv[1])\n"
        "for j in range(40):\n"
        "    s.put_text('n', (sys.argv[2] + ' ') * 300)\n"
        "    if j % 3 == 0: s.drop('n')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), f"w{k}"]) for k in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    store = ContextStore(root)
    try:
        text = store.peek("n", 0, 100_000)
    except StoreError:
        text = ""  # the last one to finish dropped it
    assert text == "" or (len(set(text.split())) == 1 and len(text.split()) == 300)
    assert len(list((root / ".locks").iterdir())) <= 1
