"""The words of a byte chunk as 64-bit hashes, vectorized with numpy, and the same hash of
one word in plain Python (for a query), so that the index and a query agree exactly.

Words are ``ranked.TOKEN``'s: runs of ASCII letters and digits and bytes >= 0x80, ASCII
folded to lower case.  A word of up to ``SHORT`` bytes is hashed from its length and its
bytes read 8 at a time (little-endian, zero past its end), each round mixed in by one
multiplication; a longer word (rare: long identifiers, hex strings, base64) is hashed with
BLAKE2b in a Python loop, since a vectorized round per 8 bytes would cost a pass per round.

Why hashes and not the words: a hash is one ``uint64`` per word, sortable in C at numpy's
speed; the words themselves would need Python objects (the cost that made the SQLite FTS5
build ~10 MB/s here).  A collision of two words (about ``D**2 / 2**55`` expected pairs for
``D`` distinct words: the index keeps 54 bits, the low 10 hold a block number) only
makes the index offer extra blocks and count a word in more blocks than it is; it never
hides a passage, since the query reads the blocks' text again.
"""

from __future__ import annotations

import hashlib

import numpy as np

SHORT = 64  # vectorized rounds of 8 bytes up to this length (hex digests fit)
MASK64 = (1 << 64) - 1
_MUL = 0x9E3779B97F4A7C15  # odd: the mixing multiplier
_LEN = 0xC2B2AE3D27D4EB4F


def _finish(h: int) -> int:
    # The low bits carry block numbers in the index: spread the mix into every bit.
    h ^= h >> 31
    h = (h * _MUL) & MASK64
    return h ^ (h >> 29)


def word_hash(word: bytes) -> int:
    """The hash of one word (already lower-cased), as ``chunk_words`` computes it."""
    n = len(word)
    if n > SHORT:
        return int.from_bytes(hashlib.blake2b(word, digest_size=8).digest(), "little")
    h = (n * _LEN) & MASK64
    for off in range(0, n, 8):
        h = ((h ^ int.from_bytes(word[off : off + 8], "little")) * _MUL) & MASK64
    return _finish(h)


def chunk_words(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(start offset, hash) of every word of ``data`` (raw bytes; no word may run past its
    end), in text order, as ``int64`` and ``uint64`` arrays."""
    m = len(data)
    low = np.empty(m + 16, dtype=np.uint8)  # lower-cased, zero-padded for 8-byte reads
    lowered = data.lower()
    low[:m] = np.frombuffer(lowered, dtype=np.uint8)
    low[m:] = 0
    b = low[: m + 1]  # ends with a zero (the padding): no word is open at the end
    # w[j + 1]: is byte j a word byte (ranked.TOKEN on lower-cased bytes; a lookup table
    # is 3x slower); w[0] = False, so that a change at j is an edge at byte j.
    w = np.empty(m + 2, dtype=bool)
    w[0] = False
    wb = w[1:]
    np.less(np.subtract(b, 97, dtype=np.uint8), 26, out=wb)
    wb |= np.subtract(b, 48, dtype=np.uint8) < 10
    wb |= b >= 128
    edge = np.flatnonzero(w[1:] ^ w[:-1])  # word starts and ends, alternating
    starts, ends = edge[0::2], edge[1::2]
    lens = ends - starts
    # An unaligned little-endian uint64 at every byte offset (a view, no copy).
    at = np.ndarray((m + 8,), dtype="<u8", buffer=low, offset=0, strides=(1,))
    with np.errstate(over="ignore"):
        h = lens.astype(np.uint64) * np.uint64(_LEN)
        for rnd in range(SHORT // 8):
            sel = np.flatnonzero(lens > 8 * rnd) if rnd else None
            if sel is not None and not len(sel):
                break
            s = starts if sel is None else starts[sel]
            rest = (lens if sel is None else lens[sel]) - 8 * rnd
            # Keep the word's own bytes: shift the others out (cheaper than a mask table).
            cut = ((8 - np.minimum(rest, 8)) * 8).astype(np.uint64)
            v = (at[s + 8 * rnd] << cut) >> cut
            if sel is None:
                h = (h ^ v) * np.uint64(_MUL)
            else:
                h[sel] = (h[sel] ^ v) * np.uint64(_MUL)
        h ^= h >> np.uint64(31)
        h *= np.uint64(_MUL)
        h ^= h >> np.uint64(29)
    for i in np.flatnonzero(lens > SHORT).tolist():
        s = int(starts[i])
        h[i] = word_hash(lowered[s : s + int(lens[i])])
    return starts, h
