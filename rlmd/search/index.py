"""The per-context search index of a large text: which blocks hold which word (numpy).

What it stores, for one immutable version of a context: the text cut into blocks of whole
lines (``rlmd.search.ranked.block_ends``, about 64 KiB each); for every word (hashed,
``rlmd.search.words``), the blocks that hold it; the block ends; the file headers.  The
blocks are grouped in segments of up to ``SEGMENT_BLOCKS``: each segment has its sorted
word hashes, an offset per word, its block numbers (``uint16``, within the segment) and a
fence (every ``FENCE``-th hash, kept in memory by a reader).  About 12 % of the text's
size on English-like text.

The build reads the text ``CHUNK_BYTES`` at a time: words and their hashes by numpy
passes over the bytes, one key ``hash | block`` per word, sorted and deduplicated; no
Python object per word.  The file (``FILE_MAGIC``, the arrays, a JSON directory, a
trailer) is written once by a child process and moved into place by the store.

A query takes each word's block count (its weight, exactly as a scan computes it), then
reads the blocks holding the rarest words and scores their passages with the same BM25 as
the scan (``ranked.score``).  It stops when the k-th best score reaches the most that a
passage without any word read so far could score (MaxScore), so the answer is the scan's;
past ``MAX_CANDIDATE_BYTES`` (8 MiB) of blocks, once it has k passages, it stops anyway
(then lower ranks may differ from a full scan; the best passages with rare words are
still found).

Why our own index over SQLite FTS5, tantivy or bm25s (measured side by side,
``bench/bench_index_build.py``, docs/search.md): the daemon only needs "which blocks hold
this word" (the passage scoring stays ours, so index and scan agree); FTS5 and tantivy
post every word one by one (12-27 and ~21 MB/s here), bm25s tokenizes in Python (6 MB/s),
while numpy's vectorized passes build this table at about 70 MB/s on the same machine,
with numpy already a dependency.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlmd.search.hit import Hit
from rlmd.search.locate import HEAD_MAX, Locator, find_headers
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

if TYPE_CHECKING:
    import numpy as np

# numpy (and rlmd.search.words, which needs it) is imported where used, never when this
# module loads: the daemon must set its BLAS threading before numpy loads (rlmd/blas.py).

FORMAT = 4  # 4: the file headers of joined texts too (locate.header_path)
FILE_MAGIC = b"RLMDSIX3"
SEGMENT_BITS = 10
SEGMENT_BLOCKS = 1 << SEGMENT_BITS  # a segment's block numbers fit the hash's low bits
CHUNK_BYTES = 1024 * 1024  # the text read per numpy pass: its arrays stay in the CPU caches
MAX_CANDIDATE_BYTES = 8 * 1024 * 1024
BUILD_NICE = 5  # the builder's priority below the daemon's (see main)
FENCE = 64  # every FENCE-th word hash of a segment is kept in memory to find the rest
_TERM = ~(SEGMENT_BLOCKS - 1) & ((1 << 64) - 1)  # a key's word hash bits
_LOCAL = SEGMENT_BLOCKS - 1  # a key's block bits
_TRAILER = struct.Struct("<QQ8s")  # directory offset, directory length, FILE_MAGIC
Head = tuple[int, int, str]  # a file header: byte offset, line, relative path
_NON_WORD = re.compile(rb"[^A-Za-z0-9\x80-\xff]")


class IndexError_(Exception):
    """The index file is missing, unreadable or not for this text."""


def _pieces(buf: Any, lo: int, hi: int, chunk: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` (whole blocks) cut into pieces of ``chunk`` to ``2 * chunk`` bytes, each
    ending after a non-word byte, so that no word is cut (a block can be one huge line).
    Only a word longer than ``chunk`` is cut (its pieces are indexed as words, so a query
    for it whole finds nothing here): a bound on the builder's memory."""
    out: list[tuple[int, int]] = []
    while hi - lo > chunk:
        limit = min(hi, lo + 2 * chunk)
        m = _NON_WORD.search(buf, lo + chunk, limit)
        cut = limit if m is None else m.end()
        out.append((lo, cut))
        lo = cut
    if hi > lo:
        out.append((lo, hi))
    return out


def _piece_heads(buf: Any, lo: int, hi: int, data: bytes, lines_before: int) -> list[Head]:
    """The file headers starting in bytes ``[lo, hi)`` of the text (``data``), as
    ``Locator.headers`` finds them, with lines counted from ``lines_before`` newlines.
    A header may run past ``hi`` (a piece can end inside it)."""
    heads, line, done = [], lines_before + 1, 0
    for at, rel in find_headers(buf, lo, hi):
        # Newlines counted from the last header on, not from the piece's start each time:
        # a piece of joined sources holds hundreds of headers.
        line += data.count(b"\n", done, at - lo)
        done = at - lo
        heads.append((at, line, rel))
    return heads


def _segment_keys(
    buf: Any, ends: np.ndarray, b0: int, b1: int, check: Callable[[], None], chunk: int
) -> tuple[np.ndarray, list[Head], int]:
    """The sorted distinct keys ``word hash | block within the segment`` of blocks
    ``[b0, b1)``; the file headers in them (lines counted from the segment's start); its
    newlines.  (Headers are found here, in bytes already read, so that the text is read
    once: ``Locator.headers`` over 1 GiB took 20 % of the build, measured.)"""
    import numpy as np

    from rlmd.search.words import chunk_words

    keys: list[np.ndarray] = []
    heads: list[Head] = []
    newlines = 0
    start = int(ends[b0 - 1]) if b0 else 0
    b = b0
    while b < b1:
        # whole blocks up to ``chunk`` bytes (at least one)
        e = min(b1, max(b + 1, int(np.searchsorted(ends, start + chunk, "right"))))
        stop = int(ends[e - 1])
        for lo, hi in _pieces(buf, start, stop, chunk):
            check()
            data = buf[lo:hi]
            raw = np.frombuffer(data, dtype=np.uint8)
            # Every kind of file header holds a "=" (locate.header_path), perhaps just
            # past the piece's end: prose without one skips the header search.
            if buf.find(b"=", lo, hi + HEAD_MAX) >= 0:
                heads += _piece_heads(buf, lo, hi, data, newlines)
            # numpy's compare is ~5x faster than bytes.count here (measured).
            newlines += int(np.count_nonzero(raw == 0x0A))
            starts, h = chunk_words(data)
            buf.madvise(mmap.MADV_DONTNEED, lo - lo % mmap.PAGESIZE, hi - lo + lo % mmap.PAGESIZE)
            if not len(starts):
                continue
            # Words per block (the block ends into the sorted word starts), then each
            # word's block: one pass, not a binary search per word.
            per = np.diff(np.searchsorted(starts, ends[b:e] - lo), prepend=0)
            local = np.repeat(np.arange(e - b, dtype=np.uint64), per)
            k = (h & np.uint64(_TERM)) | (local + np.uint64(b - b0))
            k.sort()
            if len(k) > 1:
                k = k[np.concatenate(([True], k[1:] != k[:-1]))]
            keys.append(k)
        start, b = stop, e
    if not keys:
        return np.zeros(0, dtype=np.uint64), heads, newlines
    k = np.concatenate(keys)
    # Pieces of one block can repeat a key; pieces of different blocks cannot.
    k.sort(kind="stable")
    if len(k) > 1:
        k = k[np.concatenate(([True], k[1:] != k[:-1]))]
    return k, heads, newlines


def _released(buf: Any, ends: Iterator[int]) -> Iterator[int]:
    """``ends``, letting go of the pages passed every 16 MiB: finding a block's end maps
    the whole large folio around it, which would otherwise map the whole text."""
    done = 0
    for e in ends:
        yield e
        if e - done >= 16 * 1024 * 1024 and isinstance(buf, mmap.mmap):
            lo = done - done % mmap.PAGESIZE
            buf.madvise(mmap.MADV_DONTNEED, lo, e - lo)
            done = e


def _segment(
    text_path: str, ends: np.ndarray, b0: int, b1: int, parent: int | None, chunk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Head], int]:
    """(terms, offsets, blocks, headers, newlines) of the segment of blocks ``[b0, b1)``:
    run in a worker."""
    import numpy as np

    def check() -> None:
        if parent is not None and os.getppid() != parent:
            raise SystemExit(1)  # the builder is gone

    with open(text_path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        k, heads, newlines = _segment_keys(buf, ends, b0, b1, check, chunk)
    finally:
        buf.close()
    term = k & np.uint64(_TERM)
    first = np.flatnonzero(np.concatenate(([True], term[1:] != term[:-1])))
    blocks = (k & np.uint64(_LOCAL)).astype(np.uint16)
    return term[first], np.append(first, len(k)).astype(np.uint32), blocks, heads, newlines


def build(
    text_path: Path,
    out_path: Path,
    *,
    parent: int | None = None,
    workers: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
    segment_blocks: int = SEGMENT_BLOCKS,
) -> int:
    """Write the index of ``text_path`` to ``out_path`` (a new file); its block count.

    ``parent``: stop (exit) when the process of that pid is gone, checked between
    segments, so that a builder never outlives the daemon that asked for it.
    ``workers``: processes building segments side by side (forked; 1: this process).
    ``chunk_bytes``: the text read per numpy pass (its memory is ~20x this);
    ``segment_blocks``: blocks per segment (at most ``SEGMENT_BLOCKS``)."""
    if not 1 <= segment_blocks <= SEGMENT_BLOCKS:
        raise ValueError(f"segment_blocks must be between 1 and {SEGMENT_BLOCKS}")
    from concurrent.futures import Executor, ProcessPoolExecutor
    from multiprocessing import get_context

    import numpy as np

    with open(text_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    ends = np.fromiter(_released(buf, block_ends(buf)), dtype=np.int64)
    step = segment_blocks
    spans = [(b, min(len(ends), b + step)) for b in range(0, len(ends), step)]
    pool: Executor | None = None
    if workers > 1 and len(spans) > 1:
        pool = ProcessPoolExecutor(min(workers, len(spans)), mp_context=get_context("fork"))
    try:
        if pool is None:
            results: Any = (
                _segment(str(text_path), ends, b0, b1, None, chunk_bytes) for b0, b1 in spans
            )
        else:
            work = partial(_segment, str(text_path), ends, parent=os.getpid(), chunk=chunk_bytes)
            results = pool.map(work, *zip(*spans, strict=True))
        segments = []
        # The file headers too, so that the first query need not find them in the text.
        heads: list[Head] = []
        lines = 0  # newlines before the segment
        with open(out_path, "wb") as out:
            out.write(FILE_MAGIC)

            def put(a: np.ndarray) -> list[int]:
                out.write(b"\0" * (-out.tell() % 8))
                at = out.tell()
                out.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
                return [at, len(a)]

            ends_at = put(ends)
            for (b0, _), (terms, offs, blocks, sheads, nl) in zip(spans, results, strict=False):
                if parent is not None and os.getppid() != parent:
                    raise SystemExit(1)
                heads += [(at, lines + line, rel) for at, line, rel in sheads]
                lines += nl
                segments.append(
                    {"first_block": b0, "terms": put(terms), "offs": put(offs),
                     "blocks": put(blocks), "fence": put(terms[::FENCE])}
                )  # fmt: skip
            directory = {
                "format": FORMAT, "nbytes": size, "ends": ends_at, "segments": segments,
                "heads": heads,
            }  # fmt: skip
            raw = json.dumps(directory).encode()
            at = out.tell()
            out.write(raw)
            out.write(_TRAILER.pack(at, len(raw), FILE_MAGIC))
            out.flush()
            os.fsync(out.fileno())
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return len(ends)


class _Segment:
    """One segment of an open index: its fence in memory, the rest read on demand."""

    def __init__(self, fd: int, d: dict, size: int, fence: np.ndarray) -> None:
        self.fd, self.fence = fd, fence
        self.first_block = int(d["first_block"])
        (self.terms_at, self.nterms), (self.offs_at, noffs) = d["terms"], d["offs"]
        self.blocks_at, nblocks = d["blocks"]
        ok = noffs == self.nterms + 1 and len(fence) == -(-self.nterms // FENCE)
        for at, n, width in ((self.terms_at, self.nterms, 8), (self.offs_at, noffs, 4),
                             (self.blocks_at, nblocks, 2)):  # fmt: skip
            ok = ok and 0 <= at and at + n * width <= size
        if not ok:
            raise ValueError("a segment lies outside the file")

    def _read(self, at: int, n: int, dtype: str) -> np.ndarray:
        import numpy as np

        return np.frombuffer(os.pread(self.fd, n * np.dtype(dtype).itemsize, at), dtype=dtype)

    def find(self, key: np.uint64) -> tuple[int, int]:
        """(first, end) of the word's entries in the segment's block list; (0, 0): none."""
        j = int(self.fence.searchsorted(key, "right")) - 1
        if j < 0:
            return 0, 0
        lo = j * FENCE
        window = self._read(self.terms_at + 8 * lo, min(FENCE, self.nterms - lo), "<u8")
        i = int(window.searchsorted(key))
        if i == len(window) or window[i] != key:
            return 0, 0
        o = self._read(self.offs_at + 4 * (lo + i), 2, "<u4")
        return int(o[0]), int(o[1])

    def blocks(self, lo: int, hi: int) -> np.ndarray:
        return self._read(self.blocks_at + 2 * lo, hi - lo, "<u2")


class SearchIndex:
    """An opened index file, for one text of ``nbytes`` bytes.

    Read with ``pread``, not mapped: a query reads a 512-byte window of words per segment
    (found through the in-memory fence) and its block list, and nothing of the file
    stays in the daemon's resident size (a mapping would map whole large folios around
    every page that a binary search touches: ~25 MiB per query over 1 GiB, measured)."""

    def __init__(self, path: Path, nbytes: int) -> None:
        import numpy as np

        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise IndexError_(f"search index {path.name} is unreadable: {e}") from None
        try:
            size = os.fstat(self.fd).st_size
            tail = _TRAILER.size
            if size < len(FILE_MAGIC) + tail or os.pread(self.fd, 8, 0) != FILE_MAGIC:
                raise ValueError("not a search index (or an older format)")
            at, n, magic = _TRAILER.unpack(os.pread(self.fd, tail, size - tail))
            if magic != FILE_MAGIC or at + n + tail != size:
                raise ValueError("truncated")
            d = json.loads(os.pread(self.fd, n, at))
            if d["format"] != FORMAT or d["nbytes"] != nbytes:
                raise LookupError
            self.ends = self._load(d["ends"], "<i8", size)
            self.segments = [
                _Segment(self.fd, s, size, self._load(s["fence"], "<u8", size))
                for s in d["segments"]
            ]
            #: (byte offset, line, relative path) of the file headers (see Locator.headers)
            self.heads = [(int(b), int(ln), str(rel)) for b, ln, rel in d["heads"]]
        except LookupError:
            self.close()
            raise IndexError_(f"search index {path.name} is not for this text") from None
        except (OSError, TypeError, ValueError, KeyError, struct.error) as e:
            self.close()
            raise IndexError_(f"search index {path.name} is unreadable: {e}") from None
        if (int(self.ends[-1]) if len(self.ends) else 0) != nbytes or not np.all(
            np.diff(self.ends) > 0
        ):
            self.close()
            raise IndexError_(f"search index {path.name} does not cover the text")

    def _load(self, where: list[int], dtype: str, size: int) -> np.ndarray:
        """A whole array of the file, read into memory."""
        import numpy as np

        at, n = int(where[0]), int(where[1])
        nbytes = n * np.dtype(dtype).itemsize
        if at < 0 or n < 0 or at + nbytes > size:
            raise ValueError("an array lies outside the file")
        return np.frombuffer(os.pread(self.fd, nbytes, at), dtype=dtype)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _key(self, term: bytes) -> np.uint64:
        import numpy as np

        from rlmd.search.words import word_hash

        return np.uint64(word_hash(term) & _TERM)

    def blocks_holding(self, term: bytes) -> int:
        key = self._key(term)
        total = 0
        for s in self.segments:
            lo, hi = s.find(key)
            total += hi - lo
        return total

    def blocks_with(self, term: bytes) -> list[int]:
        """0-based numbers of the blocks holding ``term``, in order."""
        import numpy as np

        key = self._key(term)
        out: list[int] = []
        for s in self.segments:
            lo, hi = s.find(key)
            if hi > lo:
                out.extend((s.blocks(lo, hi).astype(np.int64) + s.first_block).tolist())
        return out

    def block_range(self, i: int) -> tuple[int, int]:
        return (int(self.ends[i - 1]) if i else 0), int(self.ends[i])


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
    """``python -m rlmd.search.index TEXT OUT PARENT_PID [WORKERS]``: build one index (a
    child of the daemon, so that its CPU and memory stay out of the daemon process)."""
    text, out, parent = Path(argv[0]), Path(argv[1]), int(argv[2])
    workers = int(argv[3]) if len(argv) > 3 else 1
    # Below the daemon: on a busy machine its event loop and REPL workers come first
    # (measured: with 2 workers at the same priority, a ping waited up to 180 ms).
    with contextlib.suppress(OSError):
        os.nice(BUILD_NICE)
    t0 = time.monotonic()
    blocks = build(text, out, parent=parent, workers=workers)
    print(f"{blocks} blocks in {time.monotonic() - t0:.2f} s ({workers} workers)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
