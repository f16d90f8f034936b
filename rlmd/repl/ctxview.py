"""``context`` in the REPL: the store's UTF-8 text file, mapped read-only, usable as a str.

Decision (see docs/sandbox.md): a context file smaller than ``STR_THRESHOLD_BYTES``
(32 MiB) is decoded once into a real ``str`` in the worker, since then everything a model
writes works exactly as on a str and the copy is cheap.  Above the threshold the worker
gets a :class:`ContextView` over the mmap, so that a 1 GB context is not copied:

* ``len``, indexing and slicing are by character; ``find``/``rfind``/``index``/``count``/
  ``in``/``startswith``/``endswith``/``split(sep)``/``splitlines`` search the mapped bytes
  and decode only what they return.  ``str(context)`` and methods not listed here
  (``lower``, ``replace``, ...) decode the whole text (a copy), as they must.
* Character offsets: an ASCII text maps characters to bytes one to one.  A non-ASCII text
  gets an index built on first use (the byte offset and character count of every 16 KiB
  block); a lookup decodes at most one block.
* ``re`` works on the view: model code that does ``import re`` gets a thin shim whose
  functions and compiled patterns accept the view.  When the pattern's meaning on UTF-8
  bytes is provably the same as on the str (any ASCII pattern on an ASCII text; on a
  non-ASCII text an ASCII pattern made only of ASCII literals, ASCII classes, groups,
  repeats, alternation and anchors, without IGNORECASE, that cannot match the empty
  string), it runs on the mapped bytes
  directly and match offsets are converted to characters.  Otherwise (``.``, ``\\w``,
  negated classes ... on non-ASCII text) the text is decoded once, kept, and the real
  ``re`` runs on it.

This module runs in the worker only.
"""

from __future__ import annotations

import bisect
import mmap
import os
import re as _re
import types
from array import array
from collections.abc import Callable, Iterator
from typing import Any

from rlmd.utf8_regex import runs_on_utf8_bytes

#: Context files smaller than this are handed over as a real str.
STR_THRESHOLD_BYTES = 32 * 1024 * 1024
_BLOCK = 1 << 14
_SCAN = 16 * 1024 * 1024
_CONTINUATION = bytes(range(0x80, 0xC0))
# Information separators are whitespace for str (``\s``, split) but not for bytes.
_SEPARATOR_BYTES = (b"\x1c", b"\x1d", b"\x1e", b"\x1f")
# str.splitlines boundaries, as UTF-8 (self-synchronising, so no false matches).
_LINE_BREAK = _re.compile(rb"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e]|\xc2\x85|\xe2\x80[\xa8\xa9]")


def load_context(
    path: str | None, threshold: int = STR_THRESHOLD_BYTES, index_path: str | None = None
) -> str | ContextView | None:
    """The value of ``context``: None, a str (small file) or a view (large file).

    ``index_path``: the store's character index of the file (``<version>.idx``), used
    when it loads and matches the file, so that a large view opens without a scan.
    """
    if path is None:
        return None
    size = os.path.getsize(path)
    if size < threshold:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    return ContextView.open(path, index_path)


class _CharIndex:
    """Byte offset and character count at the start of every block of a non-ASCII text.

    Conversions remember the last answer, so that a run of increasing offsets (the
    matches of ``finditer``) decodes each stretch of text once in all.
    """

    def __init__(self, buf: Any, byte_at: array, char_at: array) -> None:
        self.buf = buf
        self.byte_at = byte_at
        self.char_at = char_at
        self.chars = char_at[-1]
        self._last = (0, 0)  # (byte, char) of the last conversion

    @classmethod
    def build(cls, buf: Any, size: int) -> _CharIndex:
        byte_at, char_at = array("q"), array("q")
        pos = chars = 0
        while pos < size:
            end = min(pos + _BLOCK, size)
            while end < size and (buf[end] & 0xC0) == 0x80:
                end -= 1  # do not split a character
            chunk = buf[pos:end]
            byte_at.append(pos)
            char_at.append(chars)
            chars += len(chunk) if chunk.isascii() else len(chunk.translate(None, _CONTINUATION))
            pos = end
        byte_at.append(size)
        char_at.append(chars)
        return cls(buf, byte_at, char_at)

    def char_to_byte(self, c: int) -> int:
        lb, lc = self._last
        if 0 <= c - lc <= _BLOCK:
            k = c - lc
            b0 = lb
        else:
            i = bisect.bisect_right(self.char_at, c) - 1
            if i >= len(self.byte_at) - 1:
                return self.byte_at[-1]
            b0, c0 = self.byte_at[i], self.char_at[i]
            b1, c1 = self.byte_at[i + 1], self.char_at[i + 1]
            if b1 - b0 == c1 - c0:  # ASCII block
                return b0 + (c - c0)
            k = c - c0
        # k characters take at most 4k bytes: decode only that much (a character cut at
        # the end lies beyond the k wanted, so dropping it is harmless).
        head = self.buf[b0 : b0 + 4 * k].decode("utf-8", errors="ignore")
        b = b0 + len(head[:k].encode("utf-8"))
        self._last = (b, c)
        return b

    def byte_to_char(self, b: int) -> int:
        lb, lc = self._last
        if 0 <= b - lb <= 4 * _BLOCK:
            b0, c0 = lb, lc
        else:
            i = bisect.bisect_right(self.byte_at, b) - 1
            if i >= len(self.byte_at) - 1:
                return self.chars
            b0, c0 = self.byte_at[i], self.char_at[i]
        c = c0 + len(self.buf[b0:b].decode("utf-8", errors="replace"))
        self._last = (b, c)
        return c


def _store_index(buf: Any, size: int, index_path: str) -> tuple[bool, _CharIndex | None] | None:
    """(is ASCII, index) from the store's sidecar file; None if it is missing or stale.

    ``rlmd/store/charindex.py`` is loaded by file so that the store package (and what it
    imports) stays out of the worker.
    """
    try:
        import importlib.util

        import rlmd

        src = os.path.join(os.path.dirname(rlmd.__file__), "store", "charindex.py")
        spec = importlib.util.spec_from_file_location("_rlmd_store_charindex", src)
        if spec is None or spec.loader is None:
            return None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        idx = mod.CharIndex.load(index_path)
        if idx.nbytes != size:
            return None
        if idx.ascii:
            return True, None
        n = len(idx.offsets)
        byte_at = array("q", idx.offsets)
        char_at = array("q", range(0, n * idx.stride, idx.stride))
        if byte_at[-1] != size:
            byte_at.append(size)
            char_at.append(idx.chars)
        return False, _CharIndex(buf, byte_at, char_at)
    except Exception:  # a sidecar we cannot use costs a scan, nothing more
        return None


class ContextView:
    """A read-only str-like view of a UTF-8 file (see the module docstring)."""

    def __init__(self, buf: Any, *, known: tuple[bool, _CharIndex | None] | None = None) -> None:
        self._buf = buf
        self._size = len(buf)
        self._ascii: bool | None = None if known is None else known[0]
        self._index: _CharIndex | None = None if known is None else known[1]
        self._seps: bool | None = None
        self._full: str | None = None
        self._compiled: dict[tuple[str, int], tuple[str, Any, Any]] = {}

    @classmethod
    def open(cls, path: str, index_path: str | None = None) -> ContextView:
        """Map ``path`` read-only (with the store's index at ``index_path`` if usable)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return cls(b"")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        known = _store_index(buf, size, index_path) if index_path else None
        return cls(buf, known=known)

    @property
    def is_ascii(self) -> bool:
        """Whether the text is pure ASCII (scanned on first use unless the index said)."""
        if self._ascii is None:
            self._ascii = all(
                self._buf[p : p + _SCAN].isascii() for p in range(0, self._size, _SCAN)
            )
        return self._ascii

    @property
    def _plain_bytes_re(self) -> bool:
        # Any ASCII pattern means the same on the bytes: ASCII text without the
        # information separators (whitespace to str, not to bytes).
        if self._seps is None:
            self._seps = self.is_ascii and any(self._buf.find(b) >= 0 for b in _SEPARATOR_BYTES)
        return self.is_ascii and not self._seps

    # --- offsets ------------------------------------------------------------------------

    def _idx(self) -> _CharIndex:
        if self._index is None:
            self._index = _CharIndex.build(self._buf, self._size)
        return self._index

    def _b(self, c: int) -> int:
        return c if self.is_ascii else self._idx().char_to_byte(c)

    def _c(self, b: int) -> int:
        return b if self.is_ascii else self._idx().byte_to_char(b)

    def _dec(self, b0: int, b1: int) -> str:
        return self._buf[b0:b1].decode("utf-8", errors="replace")

    def _range(self, start: int | None, end: int | None) -> tuple[int, int]:
        n = len(self)
        s = 0 if start is None else (max(start + n, 0) if start < 0 else start)
        e = n if end is None else (max(end + n, 0) if end < 0 else min(end, n))
        return s, e

    # --- the str-like surface -----------------------------------------------------------

    def __len__(self) -> int:
        return self._size if self.is_ascii else self._idx().chars

    def __bool__(self) -> bool:
        return self._size > 0

    def __str__(self) -> str:
        return self._full if self._full is not None else self._dec(0, self._size)

    def __repr__(self) -> str:
        return f"<context: {len(self)} characters; a str-like view, str(context) copies it>"

    def __getitem__(self, key: int | slice) -> str:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._dec(self._b(start), self._b(stop)) if stop > start else ""
            r = range(start, stop, step)
            if not r:
                return ""
            lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
            sub = self[lo:hi]
            last = r[-1] - lo + (1 if step > 0 else -1)
            return sub[r[0] - lo : last if last >= 0 else None : step]
        i = key.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("string index out of range")
        return self._dec(self._b(i), self._b(i + 1))

    def __iter__(self) -> Iterator[str]:
        pos = 0
        while pos < self._size:
            end = min(pos + _BLOCK, self._size)
            while end < self._size and (self._buf[end] & 0xC0) == 0x80:
                end -= 1
            yield from self._dec(pos, end)
            pos = end

    def __contains__(self, sub: str) -> bool:
        return self.find(_need_str(sub, "in <context>")) != -1

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ContextView):
            return self._buf[:] == other._buf[:] if self is not other else True
        if isinstance(other, str):
            return len(other) == len(self) and other.encode("utf-8") == self._buf[:]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __add__(self, other: str) -> str:
        return str(self) + other

    def __radd__(self, other: str) -> str:
        return other + str(self)

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if encoding.lower().replace("-", "").replace("_", "") == "utf8":
            return bytes(self._buf[:])
        return str(self).encode(encoding, errors)

    def find(self, sub: str, start: int | None = None, end: int | None = None) -> int:
        s, e = self._range(start, end)
        if s > len(self):
            return -1
        pos = self._buf.find(_need_str(sub, "find").encode("utf-8"), self._b(s), self._b(e))
        return -1 if pos < 0 else self._c(pos)

    def rfind(self, sub: str, start: int | None = None, end: int | None = None) -> int:
        s, e = self._range(start, end)
        if s > len(self):
            return -1
        pos = self._buf.rfind(_need_str(sub, "rfind").encode("utf-8"), self._b(s), self._b(e))
        return -1 if pos < 0 else self._c(pos)

    def index(self, sub: str, start: int | None = None, end: int | None = None) -> int:
        i = self.find(sub, start, end)
        if i < 0:
            raise ValueError("substring not found")
        return i

    def rindex(self, sub: str, start: int | None = None, end: int | None = None) -> int:
        i = self.rfind(sub, start, end)
        if i < 0:
            raise ValueError("substring not found")
        return i

    def count(self, sub: str, start: int | None = None, end: int | None = None) -> int:
        s, e = self._range(start, end)
        if s > len(self):
            return 0
        needle = _need_str(sub, "count").encode("utf-8")
        if not needle:
            return max(e - s, 0) + 1
        b, be, n = self._b(s), self._b(e), 0
        while True:
            b = self._buf.find(needle, b, be)
            if b < 0:
                return n
            n += 1
            b += len(needle)

    def startswith(
        self, prefix: str | tuple[str, ...], start: int | None = None, end: int | None = None
    ) -> bool:
        s, e = self._range(start, end)
        if s > len(self):
            return False
        b, be = self._b(s), self._b(e)
        for p in prefix if isinstance(prefix, tuple) else (prefix,):
            pb = _need_str(p, "startswith").encode("utf-8")
            if b + len(pb) <= be and self._buf[b : b + len(pb)] == pb:
                return True
        return False

    def endswith(
        self, suffix: str | tuple[str, ...], start: int | None = None, end: int | None = None
    ) -> bool:
        s, e = self._range(start, end)
        if s > len(self):
            return False
        b, be = self._b(s), self._b(e)
        for p in suffix if isinstance(suffix, tuple) else (suffix,):
            pb = _need_str(p, "endswith").encode("utf-8")
            if be - len(pb) >= b and self._buf[be - len(pb) : be] == pb:
                return True
        return False

    def split(self, sep: str | None = None, maxsplit: int = -1) -> list[str]:
        if sep is None:
            return str(self).split(None, maxsplit)
        needle = _need_str(sep, "split").encode("utf-8")
        if not needle:
            raise ValueError("empty separator")
        out: list[str] = []
        pos = 0
        while maxsplit < 0 or len(out) < maxsplit:
            hit = self._buf.find(needle, pos)
            if hit < 0:
                break
            out.append(self._dec(pos, hit))
            pos = hit + len(needle)
        out.append(self._dec(pos, self._size))
        return out

    def splitlines(self, keepends: bool = False) -> list[str]:
        out: list[str] = []
        pos = 0
        for m in _LINE_BREAK.finditer(self._buf):
            out.append(self._dec(pos, m.end() if keepends else m.start()))
            pos = m.end()
        if pos < self._size:
            out.append(self._dec(pos, self._size))
        return out

    def __getattr__(self, name: str) -> Any:
        # Any other str method works on a decoded copy (lower, replace, strip, ...).
        attr = getattr(str, name, None)
        if attr is None or name.startswith("_"):
            raise AttributeError(f"'context' (a str-like view) has no attribute {name!r}")
        return lambda *a, **k: attr(str(self), *a, **k)

    # --- regular expressions ------------------------------------------------------------

    @property
    def materialized(self) -> bool:
        """Whether a regex needed the whole text decoded (and kept) as a str."""
        return self._full is not None

    def _full_str(self) -> str:
        if self._full is None:
            self._full = self._dec(0, self._size)
        return self._full

    def _compile(self, pattern: Any, flags: int) -> tuple[str, Any, _re.Pattern[str]]:
        """('bytes', bytes pattern, str pattern) or ('str', None, str pattern)."""
        if isinstance(pattern, _re.Pattern):
            if flags:
                raise ValueError("cannot process flags argument with a compiled pattern")
            pstr, flags = pattern.pattern, pattern.flags
        else:
            pstr = pattern
        if not isinstance(pstr, str):
            raise TypeError("cannot use a bytes pattern on the context (a str); use a str pattern")
        key = (pstr, flags)
        hit = self._compiled.get(key)
        if hit is None:
            spat = _re.compile(pstr, flags)
            bpat = None
            if pstr.isascii() and (
                self._plain_bytes_re or runs_on_utf8_bytes(pstr, flags, allow_empty=False)
            ):
                try:
                    bpat = _re.compile(pstr.encode("ascii"), flags & ~_re.UNICODE)
                except (_re.error, ValueError):
                    bpat = None
            hit = ("bytes", bpat, spat) if bpat is not None else ("str", None, spat)
            self._compiled[key] = hit
        return hit

    def re_call(self, fn: str, pattern: Any, flags: int = 0, *args: Any, **kwargs: Any) -> Any:
        """``re.<fn>(pattern, self, ...)`` computed on the bytes when that is equivalent."""
        kind, bpat, spat = self._compile(pattern, flags)
        if fn in ("sub", "subn"):
            # sub builds a new string of the whole text anyway.
            return getattr(spat, fn)(*_sub_args(fn, self, args, kwargs))
        if kind == "str":
            return getattr(spat, fn)(self._full_str(), *args, **kwargs)
        return self.pattern_call(fn, bpat, spat, *args, **kwargs)

    def pattern_call(
        self, fn: str, bpat: Any, spat: _re.Pattern[str], *args: Any, **kwargs: Any
    ) -> Any:
        """Pattern method ``fn`` on the mapped bytes, results converted to str terms."""
        buf = self._buf
        if fn in ("search", "match", "fullmatch", "finditer"):
            pos = kwargs.pop("pos", args[0] if len(args) > 0 else 0)
            endpos = kwargs.pop("endpos", args[1] if len(args) > 1 else None)
            n = len(self)
            s = min(max(pos, 0), n)
            e = n if endpos is None else min(max(endpos, s), n)
            bs, be = self._b(s), self._b(e)
            if fn == "finditer":
                return (ViewMatch(m, self, spat) for m in bpat.finditer(buf, bs, be))
            m = getattr(bpat, fn)(buf, bs, be)
            return None if m is None else ViewMatch(m, self, spat)
        if fn == "findall":
            if args or kwargs:
                return spat.findall(self._full_str(), *args, **kwargs)
            found = bpat.findall(buf)
            if bpat.groups <= 1:  # a list of bytes: decode inline (the hot path)
                return [x.decode("utf-8", "replace") for x in found]
            # Tuples of bytes (an unmatched group is b"", never None).
            return [tuple([y.decode("utf-8", "replace") for y in t]) for t in found]
        if fn == "split":
            maxsplit = kwargs.pop("maxsplit", args[0] if args else 0)
            return [_dec_group(x) for x in bpat.split(buf, maxsplit)]
        raise AttributeError(fn)


def _sub_args(fn: str, view: ContextView, args: tuple, kwargs: dict) -> tuple:
    # re.sub(pattern, repl, string, count=0, flags=0) arrives here as (repl, count...).
    repl, *rest = args if args else (kwargs.pop("repl"),)
    count = rest[0] if rest else kwargs.pop("count", 0)
    return (repl, view._full_str(), count)


def _dec_group(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if isinstance(x, tuple):
        return tuple(_dec_group(y) for y in x)
    return x


class ViewMatch:
    """A match found in the mapped bytes, answering in characters like ``re.Match``."""

    def __init__(self, m: Any, view: ContextView, spat: _re.Pattern[str]) -> None:
        self._m = m
        self.string = view
        self.re = spat
        self.lastindex = m.lastindex
        self.lastgroup = m.lastgroup

    @property
    def pos(self) -> int:
        return self.string._c(self._m.pos)

    @property
    def endpos(self) -> int:
        return self.string._c(self._m.endpos)

    def group(self, *groups: int | str) -> Any:
        return _dec_group(self._m.group(*groups))

    def __getitem__(self, g: int | str) -> Any:
        return self.group(g)

    def groups(self, default: Any = None) -> tuple:
        return tuple(default if x is None else _dec_group(x) for x in self._m.groups())

    def groupdict(self, default: Any = None) -> dict[str, Any]:
        return {k: default if v is None else _dec_group(v) for k, v in self._m.groupdict().items()}

    def start(self, g: int | str = 0) -> int:
        b = self._m.start(g)
        return -1 if b < 0 else self.string._c(b)

    def end(self, g: int | str = 0) -> int:
        b = self._m.end(g)
        return -1 if b < 0 else self.string._c(b)

    def span(self, g: int | str = 0) -> tuple[int, int]:
        return self.start(g), self.end(g)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<re.Match object; span={self.span()!r}, match={self.group()!r}>"


def _need_str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{what}: must be str, not {type(x).__name__}")
    return x


# --- the ``re`` seen by model code ------------------------------------------------------

_PATTERN_FNS = ("search", "match", "fullmatch", "findall", "finditer", "split", "sub", "subn")


class PatternProxy:
    """A compiled pattern whose methods also accept the context view."""

    def __init__(self, pattern: _re.Pattern) -> None:
        self._p = pattern

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._p, name)
        if name not in _PATTERN_FNS:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            i = 1 if name in ("sub", "subn") else 0
            target = args[i] if len(args) > i else kwargs.get("string")
            if isinstance(target, ContextView):
                rest = list(args)
                if len(args) > i:
                    del rest[i]
                else:
                    kwargs.pop("string")
                return target.re_call(name, self._p, 0, *rest, **kwargs)
            return real(*args, **kwargs)

        return call

    def __repr__(self) -> str:
        return repr(self._p)

    def __eq__(self, other: object) -> bool:
        return self._p == (other._p if isinstance(other, PatternProxy) else other)

    def __hash__(self) -> int:
        return hash(self._p)


def _module_fn(name: str) -> Callable[..., Any]:
    real = getattr(_re, name)
    sub = name in ("sub", "subn")

    def fn(pattern: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(pattern, PatternProxy):
            pattern = pattern._p
        i = 1 if sub else 0
        target = args[i] if len(args) > i else kwargs.get("string")
        if isinstance(target, ContextView):
            rest = list(args)
            if len(args) > i:
                del rest[i]
            else:
                kwargs.pop("string")
            flags = kwargs.pop("flags", 0)
            if sub and len(rest) >= 3:
                flags = rest.pop(2)
            elif (
                not sub and name in ("search", "match", "fullmatch", "findall", "finditer") and rest
            ):
                flags = rest.pop(0)
            elif name == "split" and len(rest) >= 2:
                flags = rest.pop(1)
            return target.re_call(name, pattern, flags, *rest, **kwargs)
        return real(pattern, *args, **kwargs)

    fn.__name__ = name
    fn.__doc__ = real.__doc__
    return fn


def make_re_module() -> types.ModuleType:
    """A stand-in ``re`` for model code: the real module plus view-aware functions."""
    mod = types.ModuleType("re", _re.__doc__)
    mod.__dict__["__getattr__"] = lambda name: getattr(_re, name)
    for name in _PATTERN_FNS:
        setattr(mod, name, _module_fn(name))

    def compile(pattern: Any, flags: int = 0) -> PatternProxy:
        if isinstance(pattern, PatternProxy):
            pattern = pattern._p
        return PatternProxy(_re.compile(pattern, flags))

    mod.compile = compile  # type: ignore[attr-defined]
    return mod
