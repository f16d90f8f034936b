"""The index's words and blocks against an independent reading of the text: the numpy word
pass finds exactly ``ranked.TOKEN``'s words with the query's hash; a built index lists,
for every word, exactly the blocks that hold it (blocks cut into pieces too), and the file
headers that the locator finds; a truncated or foreign file is refused."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from rlmd.search.index import IndexError_, SearchIndex, _pieces, build
from rlmd.search.locate import Locator, Source
from rlmd.search.ranked import TOKEN, block_ends
from rlmd.search.words import SHORT, chunk_words, word_hash

ALPHABET = b"abcXYZ019 \n\t.,-_\xc3\xa9\xe2\x80\x94"


def test_chunk_words_finds_the_scan_words_with_the_query_hash() -> None:
    rng = random.Random(5)
    for trial in range(400):
        data = bytes(rng.choice(ALPHABET) for _ in range(rng.randint(0, 400)))
        if trial % 5 == 0:  # long words: the Python path past SHORT bytes
            data += b" " + b"Qx" * rng.randint(SHORT // 2 - 2, SHORT * 2) + b"."
        starts, hashes = chunk_words(data)
        words = list(TOKEN.finditer(data))
        assert starts.tolist() == [m.start() for m in words]
        assert hashes.tolist() == [word_hash(m.group().lower()) for m in words]


def test_word_hash_tells_words_apart() -> None:
    words = {bytes(w) for w in (b"a", b"a\x00", b"ab", b"ba", b"abcdefgh", b"abcdefghi")}
    words |= {b"x" * n for n in range(1, 3 * SHORT)}
    assert len({word_hash(w) for w in words}) == len(words)


def _text(rng: random.Random) -> bytes:
    vocab = [
        "".join(rng.choices("abcdeFGHIjk019é", k=rng.randint(1, 40))).encode() for _ in range(3000)
    ]
    lines = []
    for i in range(9000):
        n = rng.randint(0, 30) if i % 500 else 8000  # now and then a line over a block
        lines.append(b" ".join(rng.choices(vocab, k=n)))
    lines[4321] += b" " + b"W" * 250_000 + b" tail"  # a word longer than the pieces
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("workers", [1, 2])
def test_index_lists_exactly_the_blocks_holding_each_word(tmp_path: Path, workers: int) -> None:
    rng = random.Random(11)
    data = _text(rng)
    src = tmp_path / "t.txt"
    src.write_bytes(data)
    out = tmp_path / "t.sidx"
    # Small chunks: blocks read in many passes, long lines cut into pieces.
    nblocks = build(src, out, workers=workers, chunk_bytes=100_000, segment_blocks=8)
    ends = list(block_ends(data))
    assert nblocks == len(ends) > 3 * 8  # several segments
    truth: dict[bytes, list[int]] = {}
    lo = 0
    for b, hi in enumerate(ends):
        for w in set(TOKEN.findall(data[lo:hi].lower())):
            truth.setdefault(w, []).append(b)
        lo = hi
    index = SearchIndex(out, len(data))
    try:
        assert [index.block_range(b)[1] for b in range(nblocks)] == ends
        long = [w for w in truth if len(w) > 100_000]
        assert long == [b"w" * 250_000]  # cut into pieces (no query word is that long)
        for w in [*rng.sample(sorted(set(truth) - set(long)), 300), b"tail", b"nowhere"]:
            assert index.blocks_with(w) == truth.get(w, [])
            assert index.blocks_holding(w) == len(truth.get(w, []))
    finally:
        index.close()


def test_a_truncated_or_foreign_index_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_bytes(b"alpha beta\n" * 10_000)
    out = tmp_path / "t.sidx"
    build(src, out)
    good = out.read_bytes()
    with pytest.raises(IndexError_, match="not for this text"):
        SearchIndex(out, len(src.read_bytes()) + 1)
    out.write_bytes(good[:-5])
    with pytest.raises(IndexError_, match=re.escape("unreadable")):
        SearchIndex(out, 110_000)
    out.write_bytes(b"")
    with pytest.raises(IndexError_, match="unreadable"):
        SearchIndex(out, 110_000)


def test_index_finds_the_file_headers_the_locator_finds(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = ["===== first.txt ====="]
    for i in range(40_000):
        r = rng.random()
        if r < 0.05:
            # every kind of header (locate.header_path): rlmd's, head/tail's, a banner
            rows.append(
                rng.choice(
                    [
                        f"===== dir{i % 7}/f{i}.py =====",
                        f"==> f{i}.c <==",
                        f"# ==== FILE: f{i}.rs ====",
                    ]
                )
            )
        elif r < 0.06:
            near = ["===== not closed", "x ===== a =====", "===== =====", "", "a ==> b <== c"]
            near += ["FILE: x.py", "# ==== FILE: a b ====", "==> <=="]
            rows.append(rng.choice(near))
        else:
            rows.append(" ".join(rng.choices(["alpha", "beta", "gamma", "é", "42"], k=12)))
    data = ("\n".join(rows) + "\n").encode()
    src = tmp_path / "t.txt"
    src.write_bytes(data)
    expected = Locator(Source(data, ascii=False)).headers()
    assert len(expected) > 1500
    assert {rel.rsplit(".", 1)[1] for _, _, rel in expected} == {"txt", "py", "c", "rs"}
    at_piece_start = 0
    for chunk in (300, 777, 1000, 4096):
        out = tmp_path / f"t{chunk}.sidx"
        build(src, out, chunk_bytes=chunk, segment_blocks=4)
        index = SearchIndex(out, len(data))
        try:
            assert index.heads == expected
        finally:
            index.close()
        lo = 0
        for hi in block_ends(data):
            starts = {p for p, _ in _pieces(data, lo, hi, chunk)}
            at_piece_start += sum(1 for b, _, _ in expected if b in starts and b > 0)
            lo = hi
    assert at_piece_start  # the case where "\n" ends one piece and "=====" opens the next
