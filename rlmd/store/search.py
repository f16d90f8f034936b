"""Regex search over a mapped UTF-8 text, window by window, in character offsets.

Two modes, chosen by :func:`plan`:

- ``bytes``: the pattern is compiled for bytes and run on the raw UTF-8.  Exact when the
  text is pure ASCII (any ASCII pattern), and when the pattern can only ever match ASCII
  characters (ASCII literals and ranges, no ``.``, no negated sets, ``\\w``-style classes
  and ``\\b`` only under ``(?a)``, no case folding without ``(?a)``): such a match never
  starts or ends inside a multi-byte character, and empty matches found inside one are
  dropped.  Byte offsets are turned into character offsets with the char index.
- ``str``: windows are decoded and searched as ``str`` (everything else).

Windows: units (bytes or characters) ``[a - CTX, a + W + O)``; matches starting in
``[a, a + W)`` are taken.  A match reaching the window's end (short of the text's end)
might be cut, so the next window starts at it, doubling the overlap if it starts the
window (up to ``MAX_OVERLAP``).  See ``docs/store.md`` for the resulting limits.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import time
from typing import Literal

import msgspec

from rlmd.store.charindex import CharIndex, count_chars
from rlmd.utf8_regex import runs_on_utf8_bytes

MAX_MATCHES = 10_000
MAX_MATCH_TEXT = 2_000
_MADVISE_ALIGN = 2 * 1024 * 1024
_CONTINUATION = range(0x80, 0xC0)

Mode = Literal["bytes", "str"]


class SearchTimeout(Exception):
    """The deadline passed; ``position`` of ``total`` units had been scanned."""

    def __init__(self, position: int, total: int) -> None:
        super().__init__(f"search stopped at {position} of {total}")
        self.position, self.total = position, total


class SearchMatch(msgspec.Struct, kw_only=True):
    """A regex match: character offsets, 1-based line of ``start``, the matched text
    (cut to ``MAX_MATCH_TEXT`` characters, then ``truncated`` is true); in a directory
    context also the ``file`` (relative path) and ``file_line`` (1-based in the file)."""

    start: int
    end: int
    line: int
    text: str
    truncated: bool = False
    file: str | None = None
    file_line: int | None = None


def dontneed(buf: mmap.mmap | bytes, b0: int, b1: int) -> None:
    """Let the kernel drop this process's mapping of [b0, b1) (the page cache keeps it).

    Widened to 2 MiB boundaries: a page fault maps neighbouring pages too (fault-around,
    and whole large folios of the page cache); measured, 64 KiB left ~150 KiB per peek.
    """
    if isinstance(buf, mmap.mmap) and b1 > b0:
        start = max(0, b0 - b0 % _MADVISE_ALIGN)
        stop = min(len(buf), b1 + (-b1) % _MADVISE_ALIGN)
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                buf.madvise(mmap.MADV_DONTNEED, start, stop - start)


# -- choosing the mode ----------------------------------------------------------------------


def plan(pattern: str, rx: re.Pattern[str], text_ascii: bool) -> tuple[re.Pattern, Mode]:
    """The compiled pattern and mode to scan a text with (``rx`` is ``pattern`` as str)."""
    if pattern.isascii() and (text_ascii or runs_on_utf8_bytes(pattern)):
        with contextlib.suppress(re.error):
            return re.compile(pattern.encode("ascii")), "bytes"
    return rx, "str"


# -- the scan -------------------------------------------------------------------------------


class Scanner:
    """One search over one text (``buf`` + its ``index``)."""

    CTX = 64 * 1024
    MAX_OVERLAP = 64 * 1024 * 1024

    def __init__(
        self,
        buf: mmap.mmap | bytes,
        index: CharIndex,
        rx: re.Pattern,
        mode: Mode,
        *,
        window: int,
        overlap: int,
        deadline: float | None = None,
    ) -> None:
        self.buf, self.index, self.rx, self.mode = buf, index, rx, mode
        self.window, self.overlap = window, overlap
        self.deadline = deadline  # time.monotonic() after which run() stops

    def _check_deadline(self, a: int, total: int) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise SearchTimeout(a, total)

    def _text(self, u0: int, u1: int) -> str | bytes:
        """Units [u0, u1) of the text: bytes in bytes mode, characters in str mode."""
        if self.mode == "bytes":
            b0, b1 = u0, u1
        else:
            b0 = self.index.byte_offset(self.buf, u0)
            b1 = self.index.byte_offset(self.buf, u1)
        data = self.buf[b0:b1]
        dontneed(self.buf, b0, b1)
        return data if self.mode == "bytes" else data.decode("utf-8")

    def run(self, max_matches: int) -> list[SearchMatch]:
        idx, buf = self.index, self.buf
        as_bytes = self.mode == "bytes"
        utf8_bytes = as_bytes and not idx.ascii  # byte units differ from characters
        total = idx.nbytes if as_bytes else idx.chars
        nl = b"\n" if as_bytes else "\n"
        out: list[SearchMatch] = []
        a, overlap = 0, self.overlap
        last_empty_at = -1
        while True:
            self._check_deadline(a, total)
            c0 = max(0, a - self.CTX)
            end = min(total, a + self.window + overlap)
            s = self._text(c0, end)
            limit = a + self.window if end < total else total + 1
            restart: int | None = None
            last_end = a
            prev = -1  # unit offset of the previous match in this window
            line = char = 0
            for m in self.rx.finditer(s, a - c0):
                ms, me = m.start() + c0, m.end() + c0
                if ms >= limit:
                    break
                if me == end and end < total and overlap < self.MAX_OVERLAP:
                    restart = ms  # may continue past the window: redo with more text
                    break
                if ms == me:
                    if ms == last_empty_at:
                        continue  # already reported before a window change
                    if utf8_bytes and ms < total and s[ms - c0] in _CONTINUATION:
                        continue  # an empty match inside a multi-byte character
                if prev < 0:  # first match of the window: ask the index
                    char = idx.char_offset(buf, ms) if utf8_bytes else ms
                    line = idx.line_of(buf, char)
                else:
                    if utf8_bytes:
                        char += count_chars(s[prev - c0 : ms - c0])
                    else:
                        char += ms - prev
                    line += s.count(nl, prev - c0, ms - c0)
                prev = ms
                text = m.group()
                cut = len(text) > MAX_MATCH_TEXT
                if cut:
                    text = text[:MAX_MATCH_TEXT]
                if isinstance(text, bytes):
                    text = text.decode("ascii")  # bytes mode matches only ASCII
                out.append(
                    SearchMatch(
                        start=char,
                        end=char + (me - ms),
                        line=line,
                        text=text,
                        truncated=cut or (me == end and end < total),
                    )
                )
                last_end = me
                if ms == me:
                    last_empty_at = ms
                if len(out) >= max_matches:
                    return out
            if restart is not None:
                if restart == a:
                    overlap *= 2
                    continue
                a, overlap = restart, self.overlap
            elif end >= total:
                return out
            else:
                a, overlap = max(limit, last_end), self.overlap
