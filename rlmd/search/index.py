"""The per-context search index of a large text: SQLite FTS5 (standard library).

What it stores, for one immutable version of a context: the text cut into blocks of whole
lines (``rlmd.search.ranked.block_ends``, about 64 KiB each), each block a row of a
contentless FTS5 table (``detail=none``: only which blocks hold which word; the ``ascii``
tokenizer, the same words as ``ranked.TOKEN``), a ``fts5vocab`` table (blocks per word),
and the block ends.  About 7 % of the text's size.

A query takes each word's block count (its weight, exactly as a scan computes it), then
reads the blocks holding the rarest words and scores their passages with the same BM25 as
the scan (``ranked.score``).  It stops when the k-th best score reaches the most that a
passage without any word read so far could score (MaxScore), so the answer is the scan's;
past ``MAX_CANDIDATE_BYTES`` (8 MiB) of blocks, once it has k passages, it stops anyway (then lower ranks may differ from
a full scan; the best passages with rare words are still found).

Why FTS5 over tantivy or bm25s (measured, docs/benchmarks.md): it ships with Python, builds
in C from a few thousand rows per 100 MB (no per-passage Python work), and a block lookup
answers in microseconds.  Passage-level BM25 stays ours, so index and scan agree.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from array import array
from pathlib import Path

from rlmd.search.hit import Hit
from rlmd.search.locate import Locator
from rlmd.search.ranked import (
    K1,
    Found,
    block_ends,
    check_k,
    hits,
    idf,
    query_terms,
    scan_passages,
    score,
)

FORMAT = 1
MAX_CANDIDATE_BYTES = 8 * 1024 * 1024


class IndexError_(Exception):
    """The index file is missing, unreadable or not for this text."""


def build(text_path: Path, out_path: Path, *, parent: int | None = None) -> int:
    """Write the index of ``text_path`` to ``out_path`` (a new file); its block count.

    ``parent``: stop (exit) when the process of that pid is gone, checked between rows,
    so that a builder never outlives the daemon that asked for it."""
    import mmap

    with open(text_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    db = sqlite3.connect(out_path)
    try:
        db.execute("pragma journal_mode=off")
        db.execute("pragma synchronous=off")
        db.execute(
            "create virtual table p using fts5(t, tokenize='ascii', content='', "
            "columnsize=0, detail=none)"
        )
        db.execute("create virtual table v using fts5vocab(p, row)")
        db.execute("create table meta(format int, nbytes int, ends blob)")
        ends = array("Q")

        def rows():
            s = 0
            for i, e in enumerate(block_ends(buf), 1):
                if parent is not None and i % 64 == 0 and os.getppid() != parent:
                    raise SystemExit(1)
                ends.append(e)
                yield i, buf[s:e].decode("utf-8", "replace")
                s = e

        db.executemany("insert into p(rowid, t) values (?, ?)", rows())
        if sys.byteorder == "big":  # pragma: no cover
            ends.byteswap()
        db.execute("insert into meta values (?, ?, ?)", (FORMAT, size, ends.tobytes()))
        db.commit()
        db.execute("insert into p(p) values ('optimize')")
        db.commit()
    finally:
        db.close()
    with open(out_path, "rb+") as f:
        os.fsync(f.fileno())
    return len(ends)


class SearchIndex:
    """An opened index file (read-only), for one text of ``nbytes`` bytes."""

    def __init__(self, path: Path, nbytes: int) -> None:
        try:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            fmt, size, ends = self.db.execute("select format, nbytes, ends from meta").fetchone()
            ok = fmt == FORMAT and size == nbytes and len(ends) % 8 == 0
        except (sqlite3.Error, TypeError, ValueError) as e:
            raise IndexError_(f"search index {path.name} is unreadable: {e}") from None
        if not ok:
            self.db.close()
            raise IndexError_(f"search index {path.name} is not for this text")
        self.ends = array("Q")
        self.ends.frombytes(ends)
        if sys.byteorder == "big":  # pragma: no cover
            self.ends.byteswap()
        if (self.ends[-1] if self.ends else 0) != nbytes:
            self.db.close()
            raise IndexError_(f"search index {path.name} does not cover the text")

    def close(self) -> None:
        self.db.close()

    def blocks_holding(self, term: bytes) -> int:
        row = self.db.execute("select doc from v where term = ?", (_term(term),)).fetchone()
        return int(row[0]) if row else 0

    def blocks_with(self, term: bytes) -> list[int]:
        """0-based numbers of the blocks holding ``term``."""
        q = '"' + _term(term).replace('"', '""') + '"'
        return [r[0] - 1 for r in self.db.execute("select rowid from p where p match ?", (q,))]

    def block_range(self, i: int) -> tuple[int, int]:
        return (self.ends[i - 1] if i else 0), self.ends[i]


def _term(t: bytes) -> str:
    return t.decode("utf-8", "replace")


def ranked_indexed(loc: Locator, index: SearchIndex, query: str, k: int = 10) -> list[Hit]:
    """The same answer as ``ranked.ranked_scan`` for a large text, read through ``index``."""
    k = check_k(k)
    terms = query_terms(query)
    n = max(1, len(index.ends))
    df = {t: index.blocks_holding(t) for t in terms}
    weights = {t: idf(n, d) for t, d in df.items() if d}
    order = sorted(weights, key=lambda t: (-weights[t], t))
    found: Found = {}
    read: set[int] = set()
    budget = MAX_CANDIDATE_BYTES
    scored: list[tuple[float, int, int]] = []
    for i, t in enumerate(order):
        new = [b for b in index.blocks_with(t) if b not in read]
        cost = sum(index.block_range(b)[1] - index.block_range(b)[0] for b in new)
        if len(found) >= k and cost > budget:
            break  # the best passages with rarer words are in; the rest would cost a scan
        for b in sorted(new):
            if budget <= 0 and len(found) >= k:
                break  # only common words left: the first k passages in text order do
            lo, hi = index.block_range(b)
            scan_passages(loc, terms, lo, hi, found)
            loc.src.release(lo, hi)
            budget -= hi - lo
            read.add(b)
        scored = score(loc, found, weights)
        rest = sum((K1 + 1) * weights[u] for u in order[i + 1 :])
        if len(scored) >= k and -scored[k - 1][0] >= rest:
            break
    return hits(loc, scored, k)


def main(argv: list[str]) -> int:
    """``python -m rlmd.search.index TEXT OUT PARENT_PID``: build one index (a child of
    the daemon, so that its CPU and memory stay out of the daemon process)."""
    text, out, parent = Path(argv[0]), Path(argv[1]), int(argv[2])
    t0 = time.monotonic()
    blocks = build(text, out, parent=parent)
    print(f"{blocks} blocks in {time.monotonic() - t0:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
