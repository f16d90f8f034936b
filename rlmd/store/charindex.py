"""Character -> byte offsets for a UTF-8 file, without decoding it from the start.

A context is stored as a UTF-8 file and read through ``mmap``; clients speak in *character*
offsets (Python ``str`` indices).  For pure-ASCII text the two are equal.  For other text a
small sidecar index records the byte offset of every ``stride``-th character (default one
entry per 64 Ki characters: 128 KiB of index for 1 Gi characters), so that finding the byte
offset of any character decodes at most ``stride`` characters after the nearest checkpoint.

The module uses only the standard library, so a sandboxed REPL worker can import it to give
model code a ``str``-like view of a mapped file.

File format (all integers little-endian)::

    offset  size  field
    0       8     magic b"RLMDCIX1"
    8       4     u32 stride       characters between checkpoints (> 0)
    12      4     u32 flags        bit 0: the text is pure ASCII (then n == 0)
    16      8     u64 chars        total characters
    24      8     u64 nbytes       total bytes
    32      8     u64 n            number of checkpoints that follow
    40      8*n   u64 offsets[k]   byte offset of character k*stride, k = 0..n-1
                                   (n == chars // stride + 1; offsets[0] == 0)

API::

    idx = CharIndex.load(path)               # or CharIndex.from_bytes(data)
    b = idx.byte_offset(buf, char_pos)       # buf: mmap / bytes of the UTF-8 text
    c = idx.char_offset(buf, byte_pos)       # byte_pos must be a character boundary
    s = idx.slice(buf, start, end)           # str of characters [start, end)

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
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

MAGIC = b"RLMDCIX1"
DEFAULT_STRIDE = 64 * 1024
_HEADER = struct.Struct("<8sIIQQQ")
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


class CharIndex:
    """Checkpoints of character -> byte offsets of one immutable UTF-8 text."""

    __slots__ = ("ascii", "chars", "nbytes", "offsets", "stride")

    def __init__(
        self, *, stride: int, ascii: bool, chars: int, nbytes: int, offsets: array
    ) -> None:
        self.stride = stride
        self.ascii = ascii
        self.chars = chars
        self.nbytes = nbytes
        self.offsets = offsets  # array('Q'); empty when ascii

    # -- persistence -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The index in the file format described in the module docstring."""
        flags = _FLAG_ASCII if self.ascii else 0
        offs = array("Q", self.offsets)
        if offs.itemsize != 8:  # pragma: no cover - every supported platform has 8
            raise RuntimeError("array('Q') is not 8 bytes on this platform")
        if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian
            offs.byteswap()
        head = _HEADER.pack(MAGIC, self.stride, flags, self.chars, self.nbytes, len(offs))
        return head + offs.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> CharIndex:
        """Parse an index file's content; ``ValueError`` if it is not one."""
        if len(data) < _HEADER.size:
            raise ValueError("char index: file too short")
        magic, stride, flags, chars, nbytes, n = _HEADER.unpack_from(data)
        if magic != MAGIC or stride <= 0:
            raise ValueError("char index: bad magic or stride")
        if len(data) != _HEADER.size + 8 * n:
            raise ValueError("char index: size does not match its entry count")
        offs = array("Q")
        offs.frombytes(data[_HEADER.size :])
        if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian
            offs.byteswap()
        ascii_ = bool(flags & _FLAG_ASCII)
        if not ascii_ and n != chars // stride + 1:
            raise ValueError("char index: wrong number of checkpoints")
        return cls(stride=stride, ascii=ascii_, chars=chars, nbytes=nbytes, offsets=offs)

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
        # At most 4 bytes per character; the slice may end inside a character, which
        # 'ignore' drops (the text itself is valid UTF-8).
        head = buf[base : min(base + 4 * rest, self.nbytes)].decode("utf-8", "ignore")
        return base + len(head[:rest].encode("utf-8"))

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
        b1 = self.byte_offset(buf, end)
        return buf[b0:b1].decode("utf-8")


class CharIndexBuilder:
    """Builds a :class:`CharIndex` while a text is written out in order."""

    def __init__(self, stride: int = DEFAULT_STRIDE) -> None:
        if stride <= 0:
            raise ValueError("stride must be positive")
        self.stride = stride
        self.chars = 0
        self.nbytes = 0
        self.ascii = True
        self._offsets = array("Q", [0])  # only maintained once the text is not ASCII

    @classmethod
    def resume(cls, index: CharIndex) -> CharIndexBuilder:
        """A builder continuing after the text that ``index`` describes (for appends)."""
        b = cls(index.stride)
        b.chars, b.nbytes, b.ascii = index.chars, index.nbytes, index.ascii
        if not index.ascii:
            b._offsets = array("Q", index.offsets)
        return b

    def add_ascii(self, n: int) -> None:
        """Record ``n`` bytes of pure ASCII text."""
        if not self.ascii:
            self._advance_ascii(n)
        self.chars += n
        self.nbytes += n

    def _advance_ascii(self, n: int) -> None:
        # Checkpoints inside an ASCII run are at fixed byte distances.
        offs, stride = self._offsets, self.stride
        next_cp = len(offs) * stride
        while next_cp <= self.chars + n:
            offs.append(self.nbytes + (next_cp - self.chars))
            next_cp += stride

    def _leave_ascii(self) -> None:
        self.ascii = False
        self._offsets = array("Q", range(0, self.chars + 1, self.stride))

    def add_str(self, text: str) -> Iterator[bytes]:
        """Record ``text`` and yield its UTF-8 encoding in pieces (write them in order).

        ``text`` must not contain lone surrogates.  Consume the iterator fully.
        """
        if text.isascii():
            data = text.encode("ascii")
            self.add_ascii(len(data))
            if data:
                yield data
            return
        if self.ascii:
            self._leave_ascii()
        offs, stride = self._offsets, self.stride
        pos, n = 0, len(text)
        while pos < n:
            next_cp = len(offs) * stride
            take = min(n - pos, next_cp - self.chars)
            piece = text[pos : pos + take].encode("utf-8")
            pos += take
            self.chars += take
            self.nbytes += len(piece)
            if self.chars == next_cp:
                offs.append(self.nbytes)
            yield piece

    def add_utf8(self, data: bytes) -> None:
        """Record ``data``: valid UTF-8 made of whole characters (already written)."""
        if data.isascii():
            self.add_ascii(len(data))
            return
        for _ in self.add_str(data.decode("utf-8")):
            pass

    def finish(self) -> CharIndex:
        """The index of everything recorded so far."""
        offs = array("Q") if self.ascii else array("Q", self._offsets)
        return CharIndex(
            stride=self.stride,
            ascii=self.ascii,
            chars=self.chars,
            nbytes=self.nbytes,
            offsets=offs,
        )
