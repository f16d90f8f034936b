"""Named contexts kept as files under the state dir, read through ``mmap``.

Layout of ``root`` (``<state_dir>/contexts``)::

    root/
      .locks/<key>.lock          flock of writers of one context (across processes)
      <key>/                     key = blake2b(name), so any name maps to a safe file name
        meta.json                the commit point: name, version, sizes, times
        <version>.txt            the text, UTF-8; immutable once written
        <version>.idx            its character index (see ``charindex.py``)
        <version>.sidx           its search index, large contexts only (``rlmd/search/index.py``)
        .tmp-*                   a write in progress (removed at startup if left over)

``version`` is the SHA-256 (hex) of the UTF-8 text, computed while writing (what
``sha256sum <version>.txt`` prints), so re-putting the same text keeps it.  A write
streams into temp files, fsyncs them, renames them to their content-addressed names, then
atomically replaces ``meta.json`` (fsync of file and directory on each step).  A process killed at any point leaves ``meta.json`` naming either
the old version or the new one, whose files are complete; startup removes the rest.
Version files are immutable and only unlinked after ``meta.json`` stops naming them, so
a reader holding a mapping (a REPL worker) keeps a consistent text.

Reads never decode the whole text: peeks map character offsets to bytes with the
sidecar index, and searches run window by window over the mapping, advising the kernel
to drop pages already scanned so the resident size stays small.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import msgspec

from rlmd.atomic import TMP_PREFIX, write_atomic
from rlmd.search import Hit, Locator, Source
from rlmd.search.grep import grep as _grep
from rlmd.search.index import IndexError_, SearchIndex, ranked_indexed
from rlmd.search.indexer import Indexer
from rlmd.search.outline import Definition
from rlmd.search.outline import outline as _outline
from rlmd.search.ranked import BLOCK_MODE_BYTES, ranked_scan
from rlmd.store.charindex import CharIndex, CharIndexBuilder, split_incomplete
from rlmd.store.ingest import BINARY_SNIFF_BYTES, file_header, is_binary, walk_tree
from rlmd.store.search import (
    MAX_MATCH_TEXT,
    MAX_MATCHES,
    Scanner,
    SearchMatch,
    SearchTimeout,
    dontneed,
    plan,
)

__all__ = [
    "MAX_MATCHES",
    "MAX_MATCH_TEXT",
    "ContextInfo",
    "ContextStore",
    "Pinned",
    "PutResult",
    "SearchMatch",
    "Skipped",
    "StoreError",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_NAME_CHARS = 256
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PEEK_CHARS = 16 * 1024 * 1024
_CHUNK = 1 << 20
_COPY_CHUNK = 4 << 20
_MAX_OPEN = 64
_INDEX_TMP = ".search-tmp"
DEFAULT_SEARCH_INDEX_MIN_BYTES = 50 * 1024 * 1024
_META = "meta.json"
_TMP = TMP_PREFIX
_FORMAT = 1
_SURROGATES = re.compile("[\ud800-\udfff]")


class StoreError(Exception):
    """A store operation failed; ``kind`` is machine-readable, the message says what to do."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Skipped(msgspec.Struct, frozen=True):
    """A file of a directory put that was left out, and why."""

    path: str
    reason: str


class PutResult(msgspec.Struct, kw_only=True):
    """What a put stored.  ``files``/``skipped``/``ignored``/``excluded`` describe path puts;
    ``replaced`` counts invalid UTF-8 sequences that became U+FFFD, in the files listed in
    ``replaced_in``."""

    name: str
    chars: int
    bytes: int
    lines: int
    tokens_est: int
    files: int = 0
    skipped: list[Skipped] = []
    ignored: int = 0
    excluded: int = 0
    replaced: int = 0
    replaced_in: list[str] = []
    version: str = ""


class ContextInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One stored context (times are ISO 8601 UTC, e.g. ``2026-11-22T00:44:01Z``).

    ``damaged`` (only present then) says what is wrong with a context that cannot be
    read and what to do about it; its sizes are those its metadata records (0 when the
    metadata itself is unreadable)."""

    name: str
    chars: int
    bytes: int
    lines: int
    tokens_est: int
    created: str
    updated: str
    version: str
    damaged: str | None = None
    search_index: str | None = None  # large contexts: "ready", "building", "failed: ..."


class _Meta(msgspec.Struct, kw_only=True):
    format: int = _FORMAT
    name: str
    version: str
    chars: int
    bytes: int
    newlines: int
    lines: int
    ascii: bool
    created: str
    updated: str

    def info(self) -> ContextInfo:
        return ContextInfo(
            name=self.name,
            chars=self.chars,
            bytes=self.bytes,
            lines=self.lines,
            tokens_est=_tokens(self.chars),
            created=self.created,
            updated=self.updated,
            version=self.version,
        )


def _tokens(chars: int) -> int:
    return (chars + 3) // 4


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _damaged(name: str, problem: str) -> StoreError:
    return StoreError(
        "damaged",
        f"context {name!r} is damaged: {problem}; context/drop it and put it again",
    )


def _salvage_name(raw: bytes) -> str | None:
    """The ``name`` field of a damaged meta.json, when it can still be read."""
    m = re.search(rb'"name":("(?:[^"\\]|\\.)*")', raw)
    if m is None:
        return None
    try:
        name = json.loads(m.group(1))
    except ValueError:
        return None
    return name if isinstance(name, str) else None


def _rebuild_index(f: BinaryIO, meta: _Meta) -> CharIndex:
    """The char index of an open text file, computed again (its sidecar was unusable)."""
    f.seek(0)
    b = CharIndexBuilder()
    carry = b""
    while True:
        chunk = f.read(_CHUNK)
        data, carry = split_incomplete(carry + chunk) if chunk else (carry, b"")
        try:
            b.add_utf8(data)
        except UnicodeDecodeError:
            raise _damaged(meta.name, "its text file is not valid UTF-8") from None
        if not chunk:
            break
    idx = b.finish()
    if idx.nbytes != meta.bytes or idx.chars != meta.chars:
        raise _damaged(meta.name, "its text file does not match its metadata")
    return idx


def _not_found(name: str) -> StoreError:
    return StoreError("not_found", f"no context named {name!r}; see context/list")


@dataclass(frozen=True)
class Pinned:
    """A version kept on disk by :meth:`ContextStore.pin`: its text file and info."""

    path: Path
    info: ContextInfo


@dataclass
class _Handle:
    """An open version of a context: its meta, mapping and index (shared by readers)."""

    sig: tuple[int, int, int]
    meta: _Meta
    path: Path
    buf: mmap.mmap | bytes
    index: CharIndex
    locator: Locator | None = None  # built on the first ranked search / grep / locate
    search: SearchIndex | None = None  # opened on the first ranked search, if built

    def locate(self) -> Locator:
        """Lines and file headers of this version (kept: versions are immutable)."""
        if self.locator is None:
            buf, idx = self.buf, self.index
            self.locator = Locator(
                Source(
                    buf,
                    to_char=lambda b: idx.char_offset(buf, b),
                    to_byte=lambda c: idx.byte_offset(buf, min(c, idx.chars)),
                    ascii=idx.ascii,
                    newlines_before=lambda b: idx.line_of(buf, idx.char_offset(buf, b)) - 1,
                )
            )
        return self.locator


class _Writer:
    """Streams a new version into temp files, hashing, counting and indexing as it goes."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.tmp = d / f"{_TMP}{secrets.token_hex(8)}.txt"
        self.f = open(self.tmp, "xb")
        self.hash = hashlib.sha256()
        self.builder = CharIndexBuilder()
        self.last = b""

    def _raw(self, data: bytes) -> None:
        if data:
            self.f.write(data)
            self.hash.update(data)
            self.last = data[-1:]

    def write_str(self, text: str) -> None:
        """Append ``text`` (no lone surrogates)."""
        for i in range(0, len(text), _CHUNK):
            for piece in self.builder.add_str(text[i : i + _CHUNK]):
                self._raw(piece)

    def write_utf8(self, data: bytes) -> None:
        """Append valid UTF-8 made of whole characters."""
        self.builder.add_utf8(data)
        self._raw(data)

    def copy_version(self, path: Path, index: CharIndex) -> None:
        """Start with an existing version's text (for appends); its index is reused."""
        self.builder = CharIndexBuilder.resume(index)
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        with open(path, "rb") as src:
            while n := src.readinto(buf):
                self.f.write(view[:n])
                self.hash.update(view[:n])
                self.last = bytes(view[n - 1 : n])

    def finish(self) -> tuple[str, CharIndex]:
        """Flush and fsync the text; return its version and index."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.hash.hexdigest(), self.builder.finish()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def _stream_file(w: _Writer, f: BinaryIO, first: bytes) -> int:
    """Copy an open binary file into ``w`` as UTF-8; return invalid sequences replaced."""
    replaced = 0
    carry = b""
    data = first
    while True:
        more = f.read(_CHUNK)
        block = carry + data
        if more:
            block, carry = split_incomplete(block)
        else:
            carry = b""
        if block.isascii():
            w.write_utf8(block)
        elif block:
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError:  # rare: pay for counting the replacements
                text = block.decode("utf-8", "replace")
                # Each invalid sequence became one U+FFFD; genuine ones were already there.
                replaced += text.count("\ufffd") - block.count(b"\xef\xbf\xbd")
            w.write_str(text)
        if not more:
            return replaced
        data = more


def _text_ok(d: Path, meta: _Meta) -> bool:
    """Whether the version's text file is there with the size its metadata records."""
    try:
        return os.stat(d / f"{meta.version}.txt").st_size == meta.bytes
    except OSError:
        return False


def _load_or_rebuild_index(d: Path, meta: _Meta, f: BinaryIO) -> CharIndex:
    """The version's char index; rebuilt from the text (and saved) when the sidecar is
    missing or unusable: it is derived data, so damage there costs one scan."""
    path = d / f"{meta.version}.idx"
    try:
        index = CharIndex.load(path)
        if index.nbytes == meta.bytes and index.chars == meta.chars:
            return index
        problem = "does not match the text"
    except (OSError, ValueError) as e:
        problem = str(e)
    index = _rebuild_index(f, meta)
    log.warning("context %r: char index %s (%s); rebuilt it", meta.name, path.name, problem)
    with contextlib.suppress(OSError):  # a read-only state dir still serves the text
        write_atomic(path, index.to_bytes())
    return index


@dataclass
class _KeyLock:
    """The in-process lock of one context name, and how many threads hold or await it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class ContextStore:
    """Named contexts that persist under ``root``; thread-safe, synchronous.

    Concurrent writes to one name serialize (across threads and processes); readers see
    either the old or the new version, never a mix.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_peek_chars: int = DEFAULT_MAX_PEEK_CHARS,
        search_window_chars: int = 4 * 1024 * 1024,
        search_overlap_chars: int = 512 * 1024,
        search_index_min_bytes: int | None = DEFAULT_SEARCH_INDEX_MIN_BYTES,
        search_index_workers: int = 1,
    ) -> None:
        """``search_index_min_bytes``: contexts this large get a search index, built in the
        background after a put (None: never), by ``search_index_workers`` processes (at
        most one per core)."""
        self.root = Path(root)
        self.index_min_bytes = search_index_min_bytes
        workers = min(search_index_workers, os.cpu_count() or 1)
        self._indexer = Indexer(self.root / _INDEX_TMP, self._install_index, workers)
        self.max_peek_chars = max_peek_chars
        self._window = search_window_chars
        self._overlap = search_overlap_chars
        self._mutex = threading.Lock()
        self._locks: dict[str, _KeyLock] = {}
        self._handles: dict[str, _Handle] = {}
        self._metas: dict[str, tuple[tuple[int, int, int], _Meta]] = {}
        self._pins: Counter[tuple[str, str]] = Counter()
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.root / ".locks").mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreError("io", f"cannot create the context store at {self.root}: {e}") from e
        self._recover()

    # -- names, locks ------------------------------------------------------------------

    @staticmethod
    def _key(name: object) -> str:
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
            raise StoreError(
                "invalid_name",
                f"context names are 1..{MAX_NAME_CHARS} characters; got {name!r:.80}",
            )
        for c in name:
            o = ord(c)
            if o < 32 or 127 <= o < 160 or 0xD800 <= o <= 0xDFFF:
                raise StoreError(
                    "invalid_name",
                    f"context name {name!r:.80} contains a control character {c!r}; "
                    "use printable characters",
                )
        return hashlib.blake2b(name.encode("utf-8"), digest_size=16).hexdigest()

    @contextlib.contextmanager
    def _locked(self, key: str, *, blocking: bool = True, remove: bool = False) -> Iterator[bool]:
        """Hold the writers' lock of ``key`` (in-process and across processes).

        ``remove``: delete the lock file before letting go (``drop``: one was left per
        name ever used, i.e. per inline query).  Whoever then wakes up on the deleted file
        sees it gone and takes a new one."""
        # One lock per name while someone holds or waits for it, then forgotten: every
        # inline query stores its text under a new name, and a lock kept per name ever
        # used grew without end (issue 14).
        with self._mutex:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = _KeyLock()
            entry.users += 1
        try:
            with self._flocked(key, entry.lock, blocking=blocking, remove=remove) as got:
                yield got
        finally:
            with self._mutex:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[key]

    @contextlib.contextmanager
    def _flocked(
        self, key: str, lock: threading.Lock, *, blocking: bool, remove: bool = False
    ) -> Iterator[bool]:
        if not lock.acquire(blocking=blocking):
            yield False
            return
        path = self.root / ".locks" / f"{key}.lock"
        try:
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    yield False
                    return
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # a drop deleted the file we waited on: take the new one
            try:
                yield True
            finally:
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                os.close(fd)  # releases the flock
        finally:
            lock.release()

    # -- startup -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Remove what crashed writes left: temp files, unreferenced versions, dirs
        without a committed meta; queue the search indexes that large contexts lack."""
        shutil.rmtree(self.root / _INDEX_TMP, ignore_errors=True)
        for d in self.root.iterdir():
            if d.name.startswith(".") or not d.is_dir():
                continue
            with self._locked(d.name, blocking=False) as got:
                if not got:  # another process is writing it right now: leave it alone
                    continue
                try:
                    self._clean_dir(d.name)
                    meta = self._read_meta(d.name)
                except StoreError:
                    continue  # damaged metadata: keep the files; info() reports it
            if meta is not None:
                self._want_index(d.name, meta)

    def _clean_dir(self, key: str) -> None:
        """Under the key's lock: delete everything but the current, or pinned, version."""
        d = self.root / key
        meta = self._read_meta(key)
        keep = {meta.version} if meta else set()
        with self._mutex:
            keep |= {v for (k, v), n in self._pins.items() if k == key and n > 0}
        try:
            entries = list(d.iterdir())
        except FileNotFoundError:
            return
        for p in entries:
            if p.name == _META and meta is not None:
                continue
            if p.stem in keep and p.suffix in (".txt", ".idx", ".sidx"):
                continue
            with contextlib.suppress(FileNotFoundError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        if meta is None and not keep:
            with contextlib.suppress(OSError):
                d.rmdir()

    def _read_meta(self, key: str) -> _Meta | None:
        path = self.root / key / _META
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._mutex:
            cached = self._metas.get(key)
        if cached and cached[0] == sig:
            return cached[1]
        try:
            meta = msgspec.json.decode(path.read_bytes(), type=_Meta)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as e:
            raise StoreError(
                "damaged",
                f"context metadata {path} is unreadable ({e}); context/drop that name and "
                "put it again",
            ) from e
        with self._mutex:
            self._metas[key] = (sig, meta)
        return meta

    # -- writes ------------------------------------------------------------------------

    def _put(
        self,
        name: str,
        produce: Callable[[_Writer, _Meta | None], T],
        *,
        append: bool,
    ) -> tuple[_Meta, T]:
        key = self._key(name)
        d = self.root / key
        with self._locked(key):
            if not d.is_dir():
                d.mkdir(mode=0o700)
                _fsync_dir(self.root)
            try:
                old = self._read_meta(key)
            except StoreError:
                if append:
                    raise
                old = None  # a put replaces a context whose metadata is damaged
            if old is not None and not _text_ok(d, old):
                if append:
                    raise _damaged(name, f"its text file {old.version}.txt is missing or cut")
                old = None  # so a re-put of the same text writes it again
            w = _Writer(d)
            try:
                if append and old is not None:
                    with open(d / f"{old.version}.txt", "rb") as f:
                        old_index = _load_or_rebuild_index(d, old, f)
                    w.copy_version(d / f"{old.version}.txt", old_index)
                extra = produce(w, old if append else None)
                version, index = w.finish()
            except BaseException:
                w.abort()
                if old is None:
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise
            if old is not None and old.version == version:
                w.abort()
                return old, extra
            try:
                os.replace(w.tmp, d / f"{version}.txt")
                write_atomic(d / f"{version}.idx", index.to_bytes())
                _fsync_dir(d)
                now = _now()
                meta = _Meta(
                    name=name,
                    version=version,
                    chars=index.chars,
                    bytes=index.nbytes,
                    newlines=index.newlines,
                    lines=index.newlines + (1 if index.nbytes and w.last != b"\n" else 0),
                    ascii=index.ascii,
                    created=old.created if old else now,
                    updated=now,
                )
                write_atomic(d / _META, msgspec.json.encode(meta))  # the commit point
                _fsync_dir(d)
            except BaseException:
                w.abort()
                self._clean_dir(key)
                raise
            with self._mutex:
                self._handles.pop(key, None)
            self._clean_dir(key)
        self._want_index(key, meta)
        return meta, extra

    def put_text(self, name: str, text: str, *, append: bool = False) -> PutResult:
        """Store ``text`` as context ``name`` (replacing it, or appending to it)."""
        if not isinstance(text, str):
            raise StoreError("invalid_argument", "text must be a string")
        if not text.isascii() and _SURROGATES.search(text):
            text = _SURROGATES.sub("\ufffd", text)  # cannot be encoded as UTF-8
        try:
            meta, _ = self._put(name, lambda w, _old: w.write_str(text), append=append)
        except OSError as e:
            raise StoreError("io", f"storing context {name!r} failed: {e}") from e
        return self._result(meta)

    def put_path(
        self,
        name: str,
        path: str | Path,
        *,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        append: bool = False,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> PutResult:
        """Store a file's text, or a directory's files concatenated with headers.

        A single file is taken whole (``max_file_bytes`` applies to files of a
        directory); a binary file is refused.  See ``ingest.py`` for directories.
        """
        self._key(name)
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = Path.cwd() / p
        try:
            st = p.stat()
        except FileNotFoundError:
            raise StoreError(
                "path_not_found", f"no such file or directory: {str(p)!r}; check the path"
            ) from None
        except OSError as e:
            raise StoreError("io", f"cannot access {str(p)!r}: {e.strerror}") from e
        try:
            if p.is_dir():
                return self._put_dir(name, p, include, exclude, append, max_file_bytes)
            if not p.is_file():
                raise StoreError(
                    "not_a_file", f"{str(p)!r} is neither a regular file nor a directory"
                )
            return self._put_file(name, p, st.st_size, append)
        except OSError as e:
            raise StoreError("io", f"storing {str(p)!r} as context {name!r} failed: {e}") from e

    def _put_file(self, name: str, p: Path, size: int, append: bool) -> PutResult:
        try:
            f = open(p, "rb")
        except OSError as e:
            raise StoreError("io", f"cannot read {str(p)!r}: {e.strerror}") from e
        with f:
            head = f.read(BINARY_SNIFF_BYTES)
            if is_binary(head):
                raise StoreError(
                    "binary",
                    f"{str(p)!r} looks binary (it contains NUL bytes); "
                    "only text files can be contexts",
                )
            meta, replaced = self._put(
                name, lambda w, _old: _stream_file(w, f, head), append=append
            )
        res = self._result(meta)
        res.files, res.replaced = 1, replaced
        res.replaced_in = [str(p)] if replaced else []
        return res

    def _put_dir(
        self,
        name: str,
        root: Path,
        include: list[str] | None,
        exclude: list[str] | None,
        append: bool,
        max_file_bytes: int,
    ) -> PutResult:
        walk = walk_tree(root, include=include, exclude=exclude, max_file_bytes=max_file_bytes)
        skipped = [Skipped(rel, why) for rel, why in walk.skipped]
        if not walk.files:
            raise StoreError(
                "no_files",
                f"no files to read under {str(root)!r}: {walk.ignored} ignored "
                f"(.gitignore, .git), {walk.excluded} excluded by include/exclude globs, "
                f"{len(skipped)} skipped; check the path and the globs",
            )

        replaced_in: list[str] = []

        def produce(w: _Writer, old: _Meta | None) -> tuple[int, int]:
            files = replaced = 0
            if old is not None and old.bytes and w.last != b"\n":
                w.write_utf8(b"\n")  # headers start on a line of their own
            for entry in walk.files:
                try:
                    f = open(entry.path, "rb")
                except OSError as e:
                    skipped.append(Skipped(entry.rel, f"unreadable: {e.strerror}"))
                    continue
                with f:
                    try:
                        head = f.read(BINARY_SNIFF_BYTES)
                    except OSError as e:
                        skipped.append(Skipped(entry.rel, f"unreadable: {e.strerror}"))
                        continue
                    if is_binary(head):
                        skipped.append(Skipped(entry.rel, "binary (contains NUL bytes)"))
                        continue
                    w.write_str(file_header(entry.rel))
                    before = w.builder.nbytes
                    try:
                        bad = _stream_file(w, f, head)
                        if bad:
                            replaced += bad
                            replaced_in.append(entry.rel)
                    except OSError as e:
                        skipped.append(Skipped(entry.rel, f"read error, text cut: {e.strerror}"))
                    if w.builder.nbytes > before and w.last != b"\n":
                        w.write_utf8(b"\n")
                    w.write_utf8(b"\n")
                    files += 1
            return files, replaced

        meta, (files, replaced) = self._put(name, produce, append=append)
        res = self._result(meta)
        res.files, res.skipped, res.replaced = files, skipped, replaced
        res.replaced_in = replaced_in
        res.ignored, res.excluded = walk.ignored, walk.excluded
        return res

    @staticmethod
    def _result(meta: _Meta) -> PutResult:
        return PutResult(
            name=meta.name,
            chars=meta.chars,
            bytes=meta.bytes,
            lines=meta.lines,
            tokens_est=_tokens(meta.chars),
            version=meta.version,
        )

    def drop(self, name: str) -> bool:
        """Delete context ``name``; False if there was none.  Open mappings stay valid."""
        key = self._key(name)
        with self._locked(key, remove=True):
            meta_path = self.root / key / _META
            try:
                meta_path.unlink()
            except FileNotFoundError:
                return False
            _fsync_dir(meta_path.parent)
            with self._mutex:
                self._handles.pop(key, None)
                self._metas.pop(key, None)
            self._clean_dir(key)
            return True

    # -- reads -------------------------------------------------------------------------

    def _get(self, name: str) -> _Handle:
        key = self._key(name)
        meta_path = self.root / key / _META
        for _ in range(5):  # a concurrent writer may replace the version under us
            try:
                st = os.stat(meta_path)
            except FileNotFoundError:
                raise _not_found(name) from None
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            with self._mutex:
                h = self._handles.get(key)
            if h is not None and h.sig == sig:
                return h
            try:
                h = self._open(key, sig)
            except FileNotFoundError:
                continue
            if h.meta.name != name:  # pragma: no cover - a hash collision
                raise StoreError("io", f"context storage {key} holds {h.meta.name!r}")
            with self._mutex:
                self._handles.pop(key, None)
                self._handles[key] = h
                # Each mapping holds a file descriptor: keep the most recent ones only
                # (readers still using an evicted handle keep it alive).
                while len(self._handles) > _MAX_OPEN:
                    del self._handles[next(iter(self._handles))]
            return h
        raise StoreError("io", f"context {name!r} kept changing while being read; retry")

    def _meta_sig(self, key: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.root / key / _META)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _open(self, key: str, sig: tuple[int, int, int]) -> _Handle:
        meta = self._read_meta(key)
        if meta is None:
            raise FileNotFoundError(key)
        d = self.root / key
        path = d / f"{meta.version}.txt"
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            if self._meta_sig(key) != sig:
                raise  # a writer replaced the version meanwhile: _get looks again
            raise _damaged(meta.name, f"its text file {path.name} is missing") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != meta.bytes:
                raise _damaged(
                    meta.name,
                    f"its text file has {size} bytes where its metadata says {meta.bytes}",
                )
            index = _load_or_rebuild_index(d, meta, f)
            buf: mmap.mmap | bytes = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            )
        return _Handle(sig=sig, meta=meta, path=path, buf=buf, index=index)

    def list(self) -> list[ContextInfo]:
        """All contexts, sorted by name; damaged ones too, with ``damaged`` set."""
        out = []
        for d in self.root.iterdir():
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                meta = self._read_meta(d.name)
            except StoreError as e:
                out.append(self._damaged_info(d, e.message))
                continue
            if meta is None:
                continue
            info = meta.info()
            if not _text_ok(d, meta):
                info.damaged = (
                    f"its text file {meta.version}.txt is missing or cut; "
                    "context/drop it and put it again"
                )
            out.append(info)
        return sorted(out, key=lambda i: i.name)

    @staticmethod
    def _damaged_info(d: Path, problem: str) -> ContextInfo:
        try:
            name = _salvage_name((d / _META).read_bytes())
        except OSError:
            name = None
        if name is None:
            name = f"<unknown name, {d.name}>"
            problem += f"; its name is lost: remove the directory {d} by hand"
        return ContextInfo(
            name=name, chars=0, bytes=0, lines=0, tokens_est=0, created="", updated="",
            version="", damaged=problem,
        )  # fmt: skip

    def info(self, name: str) -> ContextInfo:
        """Sizes, times and version of context ``name`` (and its search index's state)."""
        key = self._key(name)
        meta = self._read_meta(key)
        if meta is None:
            raise _not_found(name)
        info = meta.info()
        info.search_index = self._index_state(key, meta)
        return info

    def version(self, name: str) -> str:
        """The content hash of the current text (changes exactly when the text does)."""
        return self.info(name).version

    def text_path(self, name: str) -> Path:
        """The UTF-8 file of the current version, to be mapped read-only.

        It is never modified.  A later put or drop unlinks it (unless pinned, see
        :meth:`pin`), so open it promptly: an open descriptor or mapping stays valid.
        """
        return self._get(name).path

    @contextlib.contextmanager
    def pin(self, name: str) -> Iterator[Pinned]:
        """Keep the current version's files on disk while the block runs, for a REPL
        worker that opens the text file later than now; a put or drop meanwhile leaves
        them in place until the block ends."""
        h = self._get(name)
        key = self._key(name)
        pin = (key, h.meta.version)
        with self._mutex:
            self._pins[pin] += 1
        try:
            yield Pinned(path=h.path, info=h.meta.info())
        finally:
            with self._mutex:
                self._pins[pin] -= 1
                if self._pins[pin] <= 0:
                    del self._pins[pin]
            with self._locked(key):
                self._clean_dir(key)

    def peek(self, name: str, start: int, end: int) -> str:
        """Characters ``[start, end)``; ``end`` past the text is clamped."""
        h = self._get(name)
        n = h.meta.chars
        if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
            raise StoreError(
                "invalid_range",
                f"peek needs 0 <= start <= end (character offsets); got {start}..{end}",
            )
        if start > n:
            raise StoreError(
                "invalid_range", f"start {start} is past the end of {name!r} ({n} characters)"
            )
        end = min(end, n)
        if end - start > self.max_peek_chars:
            raise StoreError(
                "invalid_range",
                f"peek at most {self.max_peek_chars} characters at a time; asked for "
                f"{end - start}; use several peeks or context/search",
            )
        if start == end:
            return ""
        idx = h.index
        text = idx.slice(h.buf, start, end)
        # The bytes touched lie between the checkpoint before `start` and 4 bytes a char on.
        lo = start if idx.ascii else idx.offsets[start // idx.stride]
        dontneed(h.buf, lo, lo + 4 * (idx.stride + end - start))
        return text

    def search(
        self,
        name: str,
        pattern: str,
        max_matches: int = 100,
        *,
        timeout_s: float | None = None,
    ) -> list[SearchMatch]:
        """Matches of a Python regex, in order, at most ``max_matches`` (capped at
        ``MAX_MATCHES``).  See ``docs/store.md`` for the limits at window boundaries.

        ``timeout_s`` bounds the scan (checked between windows of a few MiB): past it the
        search stops with a ``timeout`` error (a thread running it cannot be cancelled).
        """
        if not isinstance(max_matches, int) or max_matches < 1:
            raise StoreError("invalid_argument", f"max_matches must be >= 1; got {max_matches!r}")
        if not isinstance(pattern, str):
            raise StoreError("invalid_pattern", "pattern must be a string")
        max_matches = min(max_matches, MAX_MATCHES)
        try:
            rx: re.Pattern = re.compile(pattern)
        except (re.error, OverflowError, RecursionError, ValueError) as e:
            raise StoreError(
                "invalid_pattern",
                f"bad regular expression {pattern!r:.200}: {e} (Python `re` syntax)",
            ) from None
        h = self._get(name)
        if h.meta.chars == 0:
            return [SearchMatch(start=0, end=0, line=1, text="") for _ in rx.finditer("")][
                :max_matches
            ]
        rx, mode = plan(pattern, rx, h.index.ascii)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        scanner = Scanner(
            h.buf,
            h.index,
            rx,
            mode,
            window=self._window,
            overlap=self._overlap,
            deadline=deadline,
        )
        try:
            matches = scanner.run(max_matches)
        except SearchTimeout as e:
            done = 100 * e.position // max(1, e.total)
            raise StoreError(
                "timeout",
                f"search of {name!r} stopped after {timeout_s} s, {done}% of the text "
                "scanned; use a more specific pattern or a longer timeout",
            ) from None
        loc = h.locate()
        if matches and loc.headers():  # a directory context: say which file, which line
            for m in matches:
                m.file, m.file_line = loc.file_of_byte(h.index.byte_offset(h.buf, m.start), m.line)
        return matches

    # -- ranked search, grep, locations (rlmd/search) ----------------------------------

    def search_ranked(self, name: str, query: str, k: int = 10) -> list[Hit]:
        """The ``k`` passages of context ``name`` that best match ``query`` (BM25; see
        ``docs/search.md``), best first; through the search index when it is built."""
        return self.search_ranked_ex(name, query, k)[0]

    def search_ranked_ex(self, name: str, query: str, k: int = 10) -> tuple[list[Hit], bool]:
        """:meth:`search_ranked` and whether the index answered (else: a scan)."""
        if not isinstance(query, str):
            raise StoreError("invalid_argument", "query must be a string")
        h = self._get(name)
        try:
            index = self._open_index(self._key(name), h)
            if index is not None:
                return ranked_indexed(h.locate(), index, query, k), True
            return ranked_scan(h.locate(), query, k), False
        except ValueError as e:
            raise StoreError("invalid_argument", str(e)) from None

    # -- the search index ---------------------------------------------------------------

    def _index_path(self, key: str, version: str) -> Path:
        return self.root / key / f"{version}.sidx"

    def _indexable(self, nbytes: int) -> bool:
        # Under BLOCK_MODE_BYTES a scan weighs words by passage, which the index cannot.
        m = self.index_min_bytes
        return m is not None and nbytes >= max(m, BLOCK_MODE_BYTES)

    def _want_index(self, key: str, meta: _Meta) -> None:
        """Queue a build if this version is large enough and has no index yet."""
        if not self._indexable(meta.bytes):
            return
        if not self._index_path(key, meta.version).exists():
            self._indexer.schedule(key, meta.version, self.root / key / f"{meta.version}.txt")

    def _index_state(self, key: str, meta: _Meta) -> str | None:
        if not self._indexable(meta.bytes):
            return None
        if self._indexer.building(key, meta.version):
            return "building"
        failed = self._indexer.failed.get((key, meta.version))
        if failed is not None:
            return f"failed: {failed}"
        return "ready" if self._index_path(key, meta.version).exists() else "missing"

    def _install_index(self, key: str, version: str, built: Path) -> None:
        """Move a built index into place if its version is still the current one."""
        with self._locked(key):
            try:
                meta = self._read_meta(key)
            except StoreError:
                return
            if meta is None or meta.version != version:
                return  # replaced or dropped meanwhile
            os.replace(built, self._index_path(key, version))
            _fsync_dir(self.root / key)

    def _open_index(self, key: str, h: _Handle) -> SearchIndex | None:
        """The version's index if built (opened once per handle); a damaged one is
        removed and built again, and the search scans meanwhile."""
        if h.search is not None:
            return h.search
        if not self._indexable(h.meta.bytes):
            return None
        path = self._index_path(key, h.meta.version)
        if not path.exists():
            self._want_index(key, h.meta)
            return None
        try:
            index = SearchIndex(path, h.meta.bytes)
        except IndexError_ as e:
            log.warning("context %r: %s; building it again", h.meta.name, e)
            with self._locked(key):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._want_index(key, h.meta)
            return None
        with self._mutex:
            if h.search is None:
                h.search = index
            elif h.search is not index:
                index.close()
        h.locate().set_headers(h.search.heads)
        return h.search

    def close(self) -> None:
        """Stop background index builds (the daemon calls this on shutdown)."""
        self._indexer.close()

    def grep(self, name: str, pattern: str, max_matches: int = 100) -> list[Hit]:
        """Every line of context ``name`` matching the regex ``pattern``, with locations."""
        h = self._get(name)
        try:
            return _grep(h.locate(), pattern, max_matches)
        except TypeError as e:
            raise StoreError("invalid_pattern", str(e)) from None
        except ValueError as e:
            kind = "invalid_pattern" if "regular expression" in str(e) else "invalid_argument"
            raise StoreError(kind, str(e)) from None

    def outline(self, name: str, max_bytes: int | None = None) -> list[Definition]:
        """The classes and functions defined in context ``name`` (:mod:`rlmd.search.outline`);
        StoreError ``too_large`` over ``max_bytes``."""
        h = self._get(name)
        try:
            return _outline(h.locate(), max_bytes)
        except ValueError as e:
            raise StoreError("too_large", str(e)) from None

    def locate(self, name: str, start: int, end: int) -> Hit:
        """Line, file and file line of characters ``[start, end)`` of context ``name``."""
        h = self._get(name)
        if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
            raise StoreError(
                "invalid_range", f"locate needs 0 <= start <= end (characters); got {start}..{end}"
            )
        if start > h.meta.chars:
            raise StoreError(
                "invalid_range",
                f"start {start} is past the end of {name!r} ({h.meta.chars} characters)",
            )
        return h.locate().locate(start, min(end, h.meta.chars))
