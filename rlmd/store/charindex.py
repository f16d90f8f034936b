"""Character -> byte offsets (and line numbers) for a UTF-8 file, without decoding it.

A context is stored as a UTF-8 file and read through ``mmap``; clients speak in *character*
offsets (Python ``str`` indices) and 1-based line numbers.  For pure-ASCII text characters
and bytes coincide.  A small sidecar index records, for every ``stride``-th character
(default one checkpoint per 16 Ki characters: 1 MiB of index for 1 Gi characters), its
byte offset (non-ASCII text only) and the number of newlines before it.  Finding the byte
offset or the line of any character then decodes or scans at most ``stride`` characters
after the nearest checkpoint.

The module uses only the standard library, so a sandboxed REPL worker can import it to give
model code a ``str``-like view of a mapped file.

File format (all integers little-endian)::

    offset  size  field
    0       8     magic b"RLMDCIX2"
    8       4     u32 stride       characters between checkpoints (> 0)
    12      4     u32 flags        bit 0: the text is pure ASCII (then n == 0)
    16      8     u64 chars        total characters
    24      8     u64 nbytes       total bytes
    32      8     u64 newlines     total newline characters (LF)
    40      8     u64 n            number of byte-offset checkpoints
    48      8*n   u64 offsets[k]   byte offset of character k*stride (offsets[0] == 0)
    48+8n   8*m   u64 nl[k]        newlines before character k*stride (nl[0] == 0)

    with m == chars // stride + 1, and n == m, or n == 0 when the text is ASCII.

API::

    idx = CharIndex.load(path)               # or CharIndex.from_bytes(data)
    b = idx.byte_offset(buf, char_pos)       # buf: mmap / bytes of the UTF-8 text
    c = idx.char_offset(buf, byte_pos)       # byte_pos must be a character boundary
    s = idx.slice(buf, start, end)           # str of characters [start, end), clamped
    n = idx.line_of(buf, char_pos)           # 1-based line holding that character

    builder = CharIndexBuilder()             # or CharIndexBuilder.resume(idx) to append
    for piece in builder.add_str(text):      # yields the UTF-8 encoding, in order
        out.write(piece)
    builder.add_utf8(data)                   # or: valid UTF-8 made of whole characters
    idx = builder.finish(); idx.save(path)

The text indexed must be valid UTF-8 (the store guarantees it: invalid input bytes are
replaced with U+FFFD before writing).
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

MAGIC = b"RLMDCIX2"
DEFAULT_STRIDE = 16 * 1024
_HEADER = struct.Struct("<8sIIQQQQ")
_FLAG_ASCII = 1
# Bytes 0x80..0xBF continue a UTF-8 sequence; every other byte starts a character.
_CONTINUATION = bytes(range(0x80, 0xC0))


class Buffer(Protocol):
    """Anything sliceable into bytes: ``bytes``, ``mmap.mmap``, ``memoryview``."""

    def __getitem__(self, key: slice, /) -> bytes: ...


def count_chars(data: bytes) -> int:
    """Number of characters in ``data`` (valid UTF-8; may start/end inside a character)."""
    if data.isascii():
        return len(data)
    return len(data.translate(None, _CONTINUATION))


def split_incomplete(data: bytes) -> tuple[bytes, bytes]:
    """Split ``data`` into whole UTF-8 sequences and a trailing incomplete one (<= 3 bytes).

    Used when reading a stream in chunks: decode the first part, keep the second for the
    next chunk.  Invalid bytes are left in place for the decoder to deal with.
    """
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:  # ASCII: everything before it is complete too
            return data, b""
        if b >= 0xC0:  # the lead byte of the last sequence: is it complete?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if need > back:
                return data[: n - back], data[n - back :]
            return data, b""
    return data, b""


def _le(a: array) -> array:
    """``a`` in little-endian order (a copy on big-endian machines)."""
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
        a = array("Q", a)
        a.byteswap()
    return a


class CharIndex:
    """Checkpoints of one immutable UTF-8 text: byte offsets and newline counts."""

    __slots__ = ("ascii", "chars", "nbytes", "newlines", "nl", "offsets", "stride")

    def __init__(
        self,
        *,
        stride: int,
        ascii: bool,
        chars: int,
        nbytes: int,
        newlines: int,
        offsets: array,
        nl: array,
    ) -> None:
        self.stride = stride
        self.ascii = ascii
        self.chars = chars
        self.nbytes = nbytes
        self.newlines = newlines
        self.offsets = offsets  # array('Q'); empty when ascii
        self.nl = nl  # array('Q'): newlines before each checkpoint

    # -- persistence -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The index in the file format described in the module docstring."""
        flags = _FLAG_ASCII if self.ascii else 0
        head = _HEADER.pack(
            MAGIC, self.stride, flags, self.chars, self.nbytes, self.newlines, len(self.offsets)
        )
        return head + _le(self.offsets).tobytes() + _le(self.nl).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> CharIndex:
        """Parse an index file's content; ``ValueError`` if it is not one."""
        if len(data) < _HEADER.size:
            raise ValueError("char index: file too short")
        magic, stride, flags, chars, nbytes, newlines, n = _HEADER.unpack_from(data)
        if magic != MAGIC or stride <= 0:
            raise ValueError("char index: bad magic or stride")
        ascii_ = bool(flags & _FLAG_ASCII)
        m = chars // stride + 1
        if n != (0 if ascii_ else m) or len(data) != _HEADER.size + 8 * (n + m):
            raise ValueError("char index: size does not match its entry counts")
        offs, nl = array("Q"), array("Q")
        offs.frombytes(data[_HEADER.size : _HEADER.size + 8 * n])
        nl.frombytes(data[_HEADER.size + 8 * n :])
        return cls(
            stride=stride, ascii=ascii_, chars=chars, nbytes=nbytes, newlines=newlines,
            offsets=_le(offs), nl=_le(nl),
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> CharIndex:
        """Read an index file."""
        return cls.from_bytes(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        """Write the index file (not atomically: the caller renames it into place)."""
        Path(path).write_bytes(self.to_bytes())

    # -- lookups -----------------------------------------------------------------------

    def byte_offset(self, buf: Buffer, char_pos: int) -> int:
        """Byte offset of character ``char_pos`` (0 <= char_pos <= chars) in ``buf``."""
        if not 0 <= char_pos <= self.chars:
            raise IndexError(f"character offset {char_pos} outside 0..{self.chars}")
        if self.ascii:
            return char_pos
        if char_pos == self.chars:
            return self.nbytes
        k, rest = divmod(char_pos, self.stride)
        base = self.offsets[k]
        if rest == 0:
            return base
        return base + len(self._head(buf, base, rest).encode("utf-8"))

    def _head(self, buf: Buffer, b0: int, n: int) -> str:
        """The (up to) ``n`` characters starting at byte ``b0``."""
        # At most 4 bytes per character; the slice may end inside a character, which
        # 'ignore' drops (the text itself is valid UTF-8).
        return buf[b0 : min(b0 + 4 * n, self.nbytes)].decode("utf-8", "ignore")[:n]

    def char_offset(self, buf: Buffer, byte_pos: int) -> int:
        """Character offset of the character starting at byte ``byte_pos``."""
        if not 0 <= byte_pos <= self.nbytes:
            raise IndexError(f"byte offset {byte_pos} outside 0..{self.nbytes}")
        if self.ascii:
            return byte_pos
        k = bisect_right(self.offsets, byte_pos) - 1
        return k * self.stride + count_chars(buf[self.offsets[k] : byte_pos])

    def slice(self, buf: Buffer, start: int, end: int) -> str:
        """The characters ``[start, end)`` as a ``str`` (clamped like ``str`` slicing)."""
        start = max(0, min(start, self.chars))
        end = max(start, min(end, self.chars))
        if start == end:
            return ""
        b0 = self.byte_offset(buf, start)
        if self.ascii:
            return buf[b0 : b0 + end - start].decode("ascii")
        if end - start <= self.stride:  # one short decode instead of a second lookup
            return self._head(buf, b0, end - start)
        return buf[b0 : self.byte_offset(buf, end)].decode("utf-8")

    def line_of(self, buf: Buffer, char_pos: int) -> int:
        """1-based line number of character ``char_pos`` (``chars`` is allowed)."""
        if not 0 <= char_pos <= self.chars:
            raise IndexError(f"character offset {char_pos} outside 0..{self.chars}")
        k = char_pos // self.stride
        b0 = k * self.stride if self.ascii else self.offsets[k]
        b1 = self.byte_offset(buf, char_pos)
        return 1 + self.nl[k] + buf[b0:b1].count(b"\n")


class CharIndexBuilder:
    """Builds a :class:`CharIndex` while a text is written out in order."""

    def __init__(self, stride: int = DEFAULT_STRIDE) -> None:
        if stride <= 0:
            raise ValueError("stride must be positive")
        self.stride = stride
        self.chars = 0
        self.nbytes = 0
        self.newlines = 0
        self.ascii = True
        self._nl = array("Q", [0])
        self._offsets = array("Q", [0])  # only maintained once the text is not ASCII

    @classmethod
    def resume(cls, index: CharIndex) -> CharIndexBuilder:
        """A builder continuing after the text that ``index`` describes (for appends)."""
        b = cls(index.stride)
        b.chars, b.nbytes, b.ascii = index.chars, index.nbytes, index.ascii
        b.newlines = index.newlines
        b._nl = array("Q", index.nl)
        if not index.ascii:
            b._offsets = array("Q", index.offsets)
        return b

    def add_ascii(self, data: bytes) -> None:
        """Record ``data``, pure ASCII text."""
        stride, nl, n = self.stride, self._nl, len(data)
        pos = 0
        while True:
            take = len(nl) * stride - self.chars  # up to the next checkpoint (> 0)
            if take > n - pos:
                break
            self.newlines += data.count(b"\n", pos, pos + take)
            pos += take
            self.chars += take
            self.nbytes += take
            nl.append(self.newlines)
            if not self.ascii:
                self._offsets.append(self.nbytes)
        self.newlines += data.count(b"\n", pos, n)
        self.chars += n - pos
        self.nbytes += n - pos

    def add_str(self, text: str) -> Iterator[bytes]:
        """Record ``text`` and yield its UTF-8 encoding in pieces (write them in order).

        ``text`` must not contain lone surrogates.  Consume the iterator fully.
        """
        if text.isascii():
            data = text.encode("ascii")
            self.add_ascii(data)
            if data:
                yield data
            return
        if self.ascii:  # from now on byte offsets differ from character offsets
            self.ascii = False
            self._offsets = array("Q", range(0, self.chars + 1, self.stride))
        offs, nl, stride = self._offsets, self._nl, self.stride
        pos, n = 0, len(text)
        while pos < n:
            next_cp = len(nl) * stride
            take = min(n - pos, next_cp - self.chars)
            piece = text[pos : pos + take].encode("utf-8")
            pos += take
            self.chars += take
            self.nbytes += len(piece)
            self.newlines += piece.count(b"\n")
            if self.chars == next_cp:
                offs.append(self.nbytes)
                nl.append(self.newlines)
            yield piece

    def add_utf8(self, data: bytes) -> None:
        """Record ``data``: valid UTF-8 made of whole characters (already written)."""
        if data.isascii():
            self.add_ascii(data)
            return
        for _ in self.add_str(data.decode("utf-8")):
            pass

    def finish(self) -> CharIndex:
        """The index of everything recorded so far."""
        return CharIndex(
            stride=self.stride,
            ascii=self.ascii,
            chars=self.chars,
            nbytes=self.nbytes,
            newlines=self.newlines,
            offsets=array("Q") if self.ascii else array("Q", self._offsets),
            nl=array("Q", self._nl),
        )
