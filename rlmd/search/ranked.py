"""Ranked passage search (BM25) over a context's UTF-8 bytes, by scanning.

Passages are lines; a line longer than ``PASSAGE_BYTES`` is cut into pieces at the last
space before each limit (or at the limit, on a character boundary, when there is none),
so every passage is found from its own line alone.  Tokens are runs of ASCII letters and
digits and bytes >= 0x80 (ASCII folded to lower case, the rest kept as is), byte for
byte the words that the index finds (``rlmd/search/words.py``, ``index.py``), so the
index and this scan see the same words.  Query words in ``STOPWORDS`` are dropped
(unless nothing else is left).

BM25 (k1 = 1.2, b = 0.75) with a passage's length in bytes and an average length that
both the scan and the index compute from the text's size alone: ``nbytes / N`` with
``N = newlines + 1 + nbytes // PASSAGE_BYTES``.  A word's weight (IDF) counts the units
that hold it: passages in a text under ``BLOCK_MODE_BYTES``; in a larger one, blocks of
whole lines of about ``BLOCK_BYTES`` (the unit the index stores, so that the index and
a scan weigh words the same, exactly).  Equal scores rank by position.

This module runs in REPL workers too: standard library and msgspec only.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from typing import Any

from rlmd.search.hit import Hit
from rlmd.search.locate import Locator

PASSAGE_BYTES = 1000
BLOCK_MODE_BYTES = 8 * 1024 * 1024
BLOCK_BYTES = 64 * 1024
SCAN_WINDOW = 16 * 1024 * 1024
MAX_K = 1000
MAX_TERMS = 32
K1, B = 1.2, 0.75

TOKEN = re.compile(rb"[A-Za-z0-9\x80-\xff]+")
STOPWORDS = frozenset(
    b"a about an and any are as at be been but by can could did do does for from had has "
    b"have how i if in into is it its me my no not of on or our so than that the their "
    b"them then there these they this those to under us was we were what when where which "
    b"who whom whose why will with would you your".split()
)


def tokens(data: bytes) -> list[bytes]:
    """The words of ``data`` (UTF-8), ASCII lower-cased."""
    return TOKEN.findall(data.lower())


def query_terms(query: str) -> list[bytes]:
    """The distinct words of a query, stopwords dropped (unless only they are left)."""
    words = tokens(query.encode("utf-8", "replace"))
    kept = [w for w in words if w not in STOPWORDS] or words
    return list(dict.fromkeys(kept))[:MAX_TERMS]


def pieces(buf: Any, ls: int, le: int) -> list[tuple[int, int]]:
    """The passages of the line at bytes ``[ls, le)`` (``le`` before its newline)."""
    out: list[tuple[int, int]] = []
    s = ls
    while le - s > PASSAGE_BYTES:
        cut = buf.rfind(b" ", s + PASSAGE_BYTES // 2, s + PASSAGE_BYTES)
        if cut < 0:
            cut = s + PASSAGE_BYTES
            while cut > s and (buf[cut] & 0xC0) == 0x80:
                cut -= 1  # not inside a character
        else:
            cut += 1
        out.append((s, cut))
        s = cut
    out.append((s, le))
    return out


def block_ends(buf: Any, start: int = 0) -> Any:
    """The end (exclusive) of each block from ``start`` on: the first line end at or after
    ``BLOCK_BYTES`` into the block."""
    n = len(buf)
    s = start
    while s < n:
        e = buf.find(b"\n", min(n, s + BLOCK_BYTES) - 1)
        s = n if e < 0 else e + 1
        yield s


def collection(nbytes: int, newlines: int) -> tuple[int, float]:
    """(N, average passage length in bytes) of a text (see the module docstring)."""
    n = newlines + 1 + nbytes // PASSAGE_BYTES
    return n, max(1.0, nbytes / n)


def idf(n: int, df: int) -> float:
    return math.log(1.0 + (n - df + 0.5) / (df + 0.5))


def bm25(tf: int, dl: int, w: float, avgdl: float) -> float:
    return w * tf * (K1 + 1) / (tf + K1 * (1 - B + B * max(1, dl) / avgdl))


def term_regex(terms: list[bytes]) -> re.Pattern[bytes]:
    """Whole-word occurrences of any of ``terms`` (ASCII case-insensitive)."""
    alt = b"|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(
        rb"(?<![A-Za-z0-9\x80-\xff])(?:" + alt + rb")(?![A-Za-z0-9\x80-\xff])", re.IGNORECASE
    )


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    return min(k, MAX_K)


Found = dict[int, tuple[int, Counter[bytes]]]


def scan_passages(
    loc: Locator,
    terms: list[bytes],
    lo: int = 0,
    hi: int | None = None,
    found: Found | None = None,
) -> Found:
    """Every passage in bytes ``[lo, hi)`` (whole lines) holding a query word, added to
    ``found``: start byte -> (end byte, word counts)."""
    buf = loc.src.buf
    found = {} if found is None else found
    if not terms or loc.src.nbytes == 0:
        return found
    hi = loc.src.nbytes if hi is None else hi
    line_end = -1
    cur: list[tuple[int, int]] = []
    starts: list[int] = []
    for m in term_regex(terms).finditer(buf, lo, hi):
        b = m.start()
        if b >= line_end:  # a new line: find it and its passages once
            ls, line_end = loc.line_bounds(b)
            cur = pieces(buf, ls, line_end) if line_end - ls > PASSAGE_BYTES else [(ls, line_end)]
            starts = [p[0] for p in cur]
        ps, pe = cur[bisect.bisect_right(starts, b) - 1]
        slot = found.get(ps)
        if slot is None:
            slot = found[ps] = (pe, Counter())
        slot[1][m.group().lower()] += 1
    return found


def newline_count(loc: Locator) -> int:
    return loc.line_of_byte(loc.src.nbytes) - 1


def score(loc: Locator, found: Found, weights: dict[bytes, float]) -> list[tuple[float, int, int]]:
    """(-score, start, end) of every passage ``found``, best first."""
    _, avgdl = collection(loc.src.nbytes, newline_count(loc))
    scored = []
    for ps, (pe, tfs) in found.items():
        s = sum(bm25(tf, pe - ps, weights.get(t, 0.0), avgdl) for t, tf in tfs.items())
        scored.append((-s, ps, pe))
    scored.sort()
    return scored


def hits(loc: Locator, scored: list[tuple[float, int, int]], k: int) -> list[Hit]:
    return [loc.hit_bytes(ps, pe, score=round(-neg, 6)) for neg, ps, pe in scored[:k]]


def block_df(loc: Locator, found: Found) -> tuple[int, Counter[bytes]]:
    """(number of blocks, blocks holding each word) of a large text, from its passages."""
    df: Counter[bytes] = Counter()
    starts = sorted(found)
    i, nblocks = 0, 0
    for end in block_ends(loc.src.buf):
        nblocks += 1
        seen: set[bytes] = set()
        while i < len(starts) and starts[i] < end:
            seen.update(found[starts[i]][1])
            i += 1
        df.update(seen)
    return max(1, nblocks), df


def ranked_scan(loc: Locator, query: str, k: int = 10) -> list[Hit]:
    """The ``k`` best passages for ``query`` found by scanning the whole text."""
    k = check_k(k)
    terms = query_terms(query)
    found: Found = {}
    lo = 0
    for hi in block_ends(loc.src.buf):  # window by window, each let go once scanned
        if hi - lo >= SCAN_WINDOW or hi == loc.src.nbytes:
            scan_passages(loc, terms, lo, hi, found)
            loc.src.release(lo, hi)
            lo = hi
    if loc.src.nbytes >= BLOCK_MODE_BYTES:
        n, df = block_df(loc, found)
    else:
        n, _ = collection(loc.src.nbytes, newline_count(loc))
        df = Counter()
        for _, tfs in found.values():
            df.update(tfs.keys())
    return hits(loc, score(loc, found, {t: idf(n, d) for t, d in df.items()}), k)


def ranked(text: Any, query: str, k: int = 10) -> list[Hit]:
    """The ``k`` passages of ``text`` (a ``str`` or the REPL's context view) that best
    match ``query`` (keywords or a natural-language question), best first."""
    if not isinstance(query, str):
        raise TypeError(f"search: query must be a str, got {type(query).__name__}")
    loc = text if isinstance(text, Locator) else Locator(text)
    return ranked_scan(loc, query, k)
