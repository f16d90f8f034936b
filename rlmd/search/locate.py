"""Where a span of a context is: its line, and in a text of joined files its file and line there.

Everything here works on the context's UTF-8 bytes (a ``bytes`` object or a read-only
``mmap``) without decoding the whole text.  A :class:`Source` knows how to turn byte
offsets into character offsets (the caller gives the conversion: the store's char index,
the REPL view's own, or a block index built here for a ``str``); a :class:`Locator` adds
line numbers (newline counts every ``_NL_BLOCK`` bytes, built on first use) and the file
headers (:func:`header_path`), found once with C-speed ``find`` loops.

This module runs in REPL workers too: standard library and msgspec only.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import re
from array import array
from collections.abc import Callable
from typing import Any

from rlmd.search.hit import MAX_HIT_TEXT, Hit

_NL_BLOCK = 1 << 20
_HEAD_WINDOW = 64 << 20
_CHAR_BLOCK = 1 << 16
_CONTINUATION = bytes(range(0x80, 0xC0))
_HEAD_OPEN = b"===== "
_HEAD_CLOSE = b" ====="
# What a header line holds, to find candidates with ``find``: every kind has one of these.
_HEAD_MARKS = (_HEAD_OPEN, b"==> ", b"FILE:")
HEAD_MAX = 4096  # bytes: a longer line is never a header (and bounds the search back)
_HEAD_TAIL = re.compile(rb"==> (\S(?:.*\S)?) <==")
_HEAD_BANNER = re.compile(rb"(?:#|//|--|;+)? ?={3,} ?FILE: ?(\S+) ?={3,}")


def count_chars(data: bytes) -> int:
    """Characters in ``data`` (UTF-8 that may start or end inside a character)."""
    if data.isascii():
        return len(data)
    return len(data.translate(None, _CONTINUATION))


def header_path(line: bytes) -> str | None:
    """The file a header line names, or None when ``line`` (without its newline) is not one.

    Three kinds, each a line of its own: ``===== rel =====``, which rlmd writes before each
    file of a directory context (``rlmd/store/ingest.py:file_header``); ``==> rel <==``,
    which ``head`` and ``tail`` write for several files; and a ``==== FILE: rel ====``
    banner, optionally after a comment marker (``#``, ``//``, ``--``, ``;``), a common way
    to join sources into one text.  (Issue 10's codeqa traces: a text of joined sources
    with banners gave hits with a line only, so "which file defines X" could not be
    answered from the passages and the model re-ran one search twenty times.)"""
    if len(line) > HEAD_MAX:
        return None
    line = line.rstrip(b"\r")
    if line.startswith(_HEAD_OPEN) and line.endswith(_HEAD_CLOSE):
        rel = line[len(_HEAD_OPEN) : -len(_HEAD_CLOSE)]
    else:
        m = _HEAD_TAIL.fullmatch(line) or _HEAD_BANNER.fullmatch(line)
        rel = m.group(1) if m else b""
    return rel.decode("utf-8", "replace") if rel.strip() else None


def find_headers(buf: Any, lo: int, hi: int) -> list[tuple[int, str]]:
    """(byte offset, file) of the header lines that start in bytes ``[lo, hi)`` of ``buf``
    (bytes or a read-only mmap), in order.  A header that starts before ``hi`` may end
    after it; one that starts before ``lo`` is not included."""
    n = len(buf)
    end = min(n, hi + HEAD_MAX)
    starts: set[int] = set()
    for mark in _HEAD_MARKS:
        pos = buf.find(mark, lo, end)
        while pos >= 0:
            s = buf.rfind(b"\n", max(0, pos - HEAD_MAX), pos) + 1
            if (s or pos <= HEAD_MAX) and lo <= s < hi:
                starts.add(s)
            pos = buf.find(mark, pos + 1, end)
    out = []
    for s in sorted(starts):
        e = buf.find(b"\n", s, min(n, s + HEAD_MAX + 1))
        if e < 0 and n - s > HEAD_MAX:
            continue  # a line too long to be a header
        rel = header_path(buf[s : n if e < 0 else e])
        if rel is not None:
            out.append((s, rel))
    return out


class _BlockIndex:
    """Character counts at every ~64 KiB of a non-ASCII UTF-8 buffer (for ``str`` input)."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        n = len(buf)
        self.byte_at, self.char_at = array("q"), array("q")
        pos = chars = 0
        while pos < n:
            end = min(pos + _CHAR_BLOCK, n)
            while end < n and (buf[end] & 0xC0) == 0x80:
                end -= 1  # never split a character
            self.byte_at.append(pos)
            self.char_at.append(chars)
            chars += count_chars(buf[pos:end])
            pos = end
        self.byte_at.append(n)
        self.char_at.append(chars)

    def to_char(self, b: int) -> int:
        i = bisect.bisect_right(self.byte_at, b) - 1
        if i >= len(self.byte_at) - 1:
            return self.char_at[-1]
        return self.char_at[i] + count_chars(self.buf[self.byte_at[i] : b])

    def to_byte(self, c: int) -> int:
        i = bisect.bisect_right(self.char_at, c) - 1
        if i >= len(self.char_at) - 1:
            return self.byte_at[-1]
        b0, k = self.byte_at[i], c - self.char_at[i]
        head = self.buf[b0 : b0 + 4 * k].decode("utf-8", "ignore")[:k]
        return b0 + len(head.encode("utf-8"))


class Source:
    """A context's UTF-8 bytes with its byte <-> character conversions.

    Build one with :func:`source_of` (a ``str`` or the REPL's ``ContextView``) or
    directly (the store passes its mapping and char index)."""

    def __init__(
        self,
        buf: Any,
        *,
        to_char: Callable[[int], int] | None = None,
        to_byte: Callable[[int], int] | None = None,
        ascii: bool = False,
        text: Callable[[], str] | None = None,
        newlines_before: Callable[[int], int] | None = None,
    ) -> None:
        self.buf = buf
        self.nbytes = len(buf)
        self.ascii = ascii
        self._to_char = to_char
        self._to_byte = to_byte
        self._text = text
        self._newlines_before = newlines_before

    def to_char(self, b: int) -> int:
        return b if self.ascii or self._to_char is None else self._to_char(b)

    def to_byte(self, c: int) -> int:
        return c if self.ascii or self._to_byte is None else self._to_byte(c)

    def text(self) -> str:
        """The whole text as a ``str`` (a copy unless the source is one)."""
        if self._text is not None:
            return self._text()
        return bytes(self.buf[:]).decode("utf-8", "replace")

    def release(self, b0: int, b1: int) -> None:
        """Let the kernel drop this process's pages of bytes ``[b0, b1)`` of a mapping (the
        page cache keeps them), so that a scan does not grow the resident size."""
        madvise = getattr(self.buf, "madvise", None)
        if madvise is None or b1 <= b0:
            return
        align = 2 * 1024 * 1024  # whole large folios (see rlmd/store/search.py dontneed)
        start = b0 - b0 % align
        stop = min(self.nbytes, b1 + (-b1) % align)
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                madvise(mmap.MADV_DONTNEED, start, stop - start)

    def decode(self, b0: int, b1: int, cap: int = MAX_HIT_TEXT) -> str:
        """Characters of bytes ``[b0, b1)``, at most ``cap`` of them."""
        return self.buf[b0 : min(b1, b0 + 4 * cap)].decode("utf-8", "ignore")[:cap]


def source_of(text: Any) -> Source:
    """A :class:`Source` over a ``str``, ``bytes`` (UTF-8) or the REPL's ``ContextView``."""
    if isinstance(text, Source):
        return text
    if isinstance(text, str):
        buf = text.encode("utf-8", "replace")  # lone surrogates: one char -> one "?"
        if len(buf) == len(text):
            return Source(buf, ascii=True, text=lambda: text)
        bi = _BlockIndex(buf)
        return Source(buf, to_char=bi.to_char, to_byte=bi.to_byte, text=lambda: text)
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if raw.isascii():
            return Source(raw, ascii=True)
        bi = _BlockIndex(raw)
        return Source(raw, to_char=bi.to_char, to_byte=bi.to_byte)
    buf = getattr(text, "_buf", None)  # the REPL's ContextView (rlmd/repl/ctxview.py)
    if buf is not None and hasattr(text, "_c") and hasattr(text, "_b"):
        return Source(
            buf,
            to_char=text._c,
            to_byte=text._b,
            ascii=bool(text.is_ascii),
            text=lambda: str(text),
        )
    raise TypeError(f"search: expected the context (a str), got {type(text).__name__}")


class Locator:
    """Maps offsets of one text to lines and, in a text of joined files, files.

    Cheap to build: the newline blocks and the header list are computed on first use
    (one pass each over the bytes) and kept, so keep a Locator per text version."""

    def __init__(self, source: Any) -> None:
        self.src = source_of(source)
        self._nl: array | None = None
        self._heads: list[tuple[int, int, str]] | None = None  # (byte, line, rel)
        self._head_bytes: list[int] = []

    # -- lines -------------------------------------------------------------------------

    def _newlines_before(self, b: int) -> int:
        if self.src._newlines_before is not None:
            return self.src._newlines_before(b)
        buf = self.src.buf
        if self._nl is None:
            nl = array("q", [0])
            for p in range(0, self.src.nbytes, _NL_BLOCK):
                nl.append(nl[-1] + buf[p : p + _NL_BLOCK].count(b"\n"))
                self.src.release(p, p + _NL_BLOCK)
            self._nl = nl
        k = b // _NL_BLOCK
        return self._nl[k] + buf[k * _NL_BLOCK : b].count(b"\n")

    def line_of_byte(self, b: int) -> int:
        """1-based line of the character starting at byte ``b``."""
        return 1 + self._newlines_before(b)

    def line_bounds(self, b: int) -> tuple[int, int]:
        """Bytes ``[start, end)`` of the line holding byte ``b`` (without its newline)."""
        buf = self.src.buf
        s = buf.rfind(b"\n", 0, b) + 1
        e = buf.find(b"\n", b)
        return s, (self.src.nbytes if e < 0 else e)

    # -- files -------------------------------------------------------------------------

    def headers(self) -> list[tuple[int, int, str]]:
        """(byte offset, line, relative path) of every file header line, in order."""
        if self._heads is None:
            buf, n = self.src.buf, self.src.nbytes
            heads: list[tuple[int, int, str]] = []
            done, line = 0, 1  # the newlines counted so far: up to byte ``done``
            indexed = self.src._newlines_before is not None  # the store's newline index
            # Window by window, letting go of each one: one pass, a small resident size.
            for w0 in range(0, n, _HEAD_WINDOW):
                w1 = min(n, w0 + _HEAD_WINDOW)
                for at, rel in find_headers(buf, w0, w1):
                    if indexed:
                        line = self.line_of_byte(at)
                    else:
                        # From the last header on: counting from the newline block's start
                        # for each header took 3.5 s over 64 MiB of joined sources.
                        line += buf[done:at].count(b"\n")
                        done = at
                    heads.append((at, line, rel))
                self.src.release(w0, min(n, w1 + HEAD_MAX))
            self._heads = heads
            self._head_bytes = [h[0] for h in heads]
        return self._heads

    def set_headers(self, heads: list[tuple[int, int, str]]) -> None:
        """Take the header list from elsewhere (the search index found it at build time)."""
        if self._heads is None:
            self._heads = list(heads)
            self._head_bytes = [h[0] for h in self._heads]

    def file_of_byte(self, b: int, line: int) -> tuple[str | None, int | None]:
        """(file, file_line) of byte ``b`` on ``line``; the header line itself has no
        file line (None), text before the first header has no file."""
        heads = self.headers()
        i = bisect.bisect_right(self._head_bytes, b) - 1
        if i < 0:
            return None, None
        _, hline, rel = heads[i]
        return rel, (line - hline if line > hline else None)

    # -- hits --------------------------------------------------------------------------

    def hit_bytes(self, b0: int, b1: int, text: str | None = None, score: float = 0.0) -> Hit:
        """The hit for bytes ``[b0, b1)``; ``text`` defaults to those characters."""
        line = self.line_of_byte(b0)
        file, file_line = self.file_of_byte(b0, line)
        c0 = self.src.to_char(b0)
        c1 = c0 + count_chars(self.src.buf[b0:b1]) if b1 - b0 < 1 << 20 else self.src.to_char(b1)
        return Hit(
            start=c0,
            end=c1,
            line=line,
            text=self.src.decode(b0, b1) if text is None else text,
            score=score,
            file=file,
            file_line=file_line,
        )

    def locate(self, start: int, end: int) -> Hit:
        """The location of characters ``[start, end)`` (clamped to the text); ``text``
        holds those characters (cut to ``MAX_HIT_TEXT``)."""
        if start < 0 or end < start:
            raise ValueError(f"locate needs 0 <= start <= end; got {start}..{end}")
        n = self.src.nbytes
        b0 = min(n, self.src.to_byte(start))
        b1 = min(n, self.src.to_byte(end))
        return self.hit_bytes(b0, b1)
