"""The exact cache of model calls: SQLite in WAL mode, bounded by bytes, LRU eviction.

The key is the SHA-256 of a canonical JSON encoding of everything that changes what a
model answers: (model, messages, temperature, max_tokens, stop).  The value is the
``ChatResult`` as msgpack.  One file, ``<state_dir>/cache/calls.sqlite``, survives
restarts; SQLite's locking makes it safe for several threads and processes, and its
journal makes a crash mid-write leave the previous state.

Every SQLite call runs on one dedicated thread (:class:`CacheDB`), so the event loop never
blocks on the disk.  A hit's "last used" time and the hit counters are buffered on that
thread and written with the next write (or every ``FLUSH_EVERY`` hits): a hit is then a
single indexed read, and a crash loses at most a little LRU precision and a few counts.

Results that the caller stopped early (``result.stopped``, the engine cutting the root's
stream at a closed code block) are kept apart as *partial* entries: :meth:`get` never
serves them as answers; :meth:`get_partial` returns them for a caller that will stop at
the same point.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from rlmd.providers.base import ChatRequest, ChatResult

T = TypeVar("T")

log = logging.getLogger(__name__)

KEY_VERSION = "rlmd-call-v1"
SCHEMA_VERSION = 1
# Buffered hits are written after this many (and with every write).
FLUSH_EVERY = 256
# Eviction brings the total down to this fraction of max_bytes, so that a full cache
# does not evict on every single put.
EVICT_TO = 0.9
# Fixed per-row overhead counted in the size (key, columns, index entries).
ROW_OVERHEAD = 96
# SQLite's page cache per connection, as SQLite's own default ("PRAGMA cache_size=-2000").
DEFAULT_PAGE_CACHE_BYTES = 2 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key BLOB PRIMARY KEY,
    model TEXT NOT NULL,
    partial INTEGER NOT NULL DEFAULT 0,
    speculative INTEGER NOT NULL DEFAULT 0,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS calls_used ON calls(used);
CREATE TABLE IF NOT EXISTS semantic (
    id INTEGER PRIMARY KEY,
    context_version TEXT NOT NULL,
    model TEXT NOT NULL,
    embed_model TEXT NOT NULL,
    question TEXT NOT NULL,
    vector BLOB NOT NULL,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS semantic_key ON semantic(context_version, model, embed_model);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v NOT NULL);
"""

_COUNTERS = (
    "hits",
    "misses",
    "puts",
    "evictions",
    "partial_hits",
    "tokens_saved_in",
    "tokens_saved_out",
    "cost_saved",
    "semantic_hits",
    "semantic_misses",
    "semantic_refused",
)


class CacheError(Exception):
    """The cache file could not be opened or used; the message names the file."""


class CacheStats(msgspec.Struct, kw_only=True):
    """``cache/stats``: sizes now and counters since the cache file was created."""

    path: str
    entries: int
    partial_entries: int
    bytes: int
    max_bytes: int
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    partial_hits: int = 0
    tokens_saved_in: int = 0
    tokens_saved_out: int = 0
    cost_saved: float = 0.0
    hit_rate: float = 0.0
    semantic_entries: int = 0
    semantic_hits: int = 0
    semantic_misses: int = 0
    semantic_refused: int = 0


def call_key(req: ChatRequest) -> bytes:
    """The cache key of a call: SHA-256 of the canonical encoding of what decides the answer."""
    canon = msgspec.json.encode(
        [
            KEY_VERSION,
            req.model,
            [[m.role, m.content] for m in req.messages],
            float(req.temperature),
            req.max_tokens,
            list(req.stop),
        ]
    )
    return hashlib.sha256(canon).digest()


class CacheDB:
    """One SQLite file used from one dedicated thread; ``run`` hands it work from asyncio.

    Several ``CacheDB`` objects (in threads or processes) may share one file: SQLite's
    locks (WAL, ``busy_timeout``) serialise their writes.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 10.0,
        page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES,
    ) -> None:
        self.path = Path(path)
        self._busy_ms = int(busy_timeout_s * 1000)
        # SQLite's page cache: what this connection keeps of the file in memory.
        self._cache_kib = max(1, page_cache_bytes // 1024)
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlmd-cache")
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self.pending_hits: dict[bytes, float] = {}
        self.pending_counts: dict[str, float] = {}
        self._buffered = 0
        self._closed = False

    # Everything below ``_``-prefixed with ``_sync`` runs on the cache thread only.

    def conn(self) -> sqlite3.Connection:
        """The connection, opened on first use (on the cache thread)."""
        if self._conn is None:
            self._thread = threading.current_thread()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = self._connect()
            except sqlite3.DatabaseError as exc:
                if "not a database" not in str(exc) and "malformed" not in str(exc):
                    raise CacheError(f"cannot open the cache file {self.path}: {exc}") from None
                # A cache is disposable: keep the damaged file for a post-mortem, start anew.
                aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
                log.warning("cache file %s is damaged (%s); moved to %s", self.path, exc, aside)
                for suffix in ("-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
                self.path.rename(aside)
                try:
                    self._conn = self._connect()
                except sqlite3.Error as exc2:
                    raise CacheError(f"cannot open the cache file {self.path}: {exc2}") from None
            except (sqlite3.Error, OSError) as exc:
                raise CacheError(f"cannot open the cache file {self.path}: {exc}") from None
        assert threading.current_thread() is self._thread, "cache used off its thread"
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        # Two processes opening a new file race to switch it to WAL; SQLite answers the
        # loser "database is locked" at once, without its busy handler.  Retry that.
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                return self._connect_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _connect_once(self) -> sqlite3.Connection:
        c = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_ms / 1000)
        try:
            c.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            c.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a commit survives a process crash; an OS crash may lose the
            # last commits but never corrupts the file (fine for a cache).
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute(f"PRAGMA cache_size=-{self._cache_kib}")  # negative: KiB, not pages
            c.executescript(_SCHEMA)
            c.execute(
                "INSERT OR IGNORE INTO meta(k, v) VALUES ('schema', ?), ('total_bytes', 0)",
                (SCHEMA_VERSION,),
            )
        except BaseException:
            c.close()
            raise
        return c

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taking the write lock at once), buffered hits included."""
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            self._flush_pending(c)
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def _flush_pending(self, c: sqlite3.Connection) -> None:
        self._buffered = 0
        if self.pending_hits:
            c.executemany(
                "UPDATE calls SET used = max(used, ?), hits = hits + 1 WHERE key = ?",
                [(t, k) for k, t in self.pending_hits.items()],
            )
            self.pending_hits.clear()
        if self.pending_counts:
            c.executemany(
                "INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = v + ?",
                [(k, v, v) for k, v in self.pending_counts.items()],
            )
            self.pending_counts.clear()

    def count(self, name: str, amount: float = 1) -> None:
        """Add to a persistent counter (buffered; cache thread only)."""
        self.pending_counts[name] = self.pending_counts.get(name, 0) + amount
        self._buffered += 1
        if self._buffered >= FLUSH_EVERY:
            with self.write():
                pass

    def flush_sync(self) -> None:
        if self.pending_hits or self.pending_counts:
            with self.write():
                pass

    def close_sync(self) -> None:
        if self._conn is not None:
            try:
                self.flush_sync()
            finally:
                self._conn.close()
                self._conn = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the cache thread and await its result."""
        if self._closed:
            raise CacheError(f"the cache {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ex, fn, *args)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the cache thread and wait (for synchronous callers)."""
        if self._closed:
            raise CacheError(f"the cache {self.path} is closed")
        return self._ex.submit(fn, *args).result()

    async def aclose(self) -> None:
        """Write buffered hits and close the file."""
        if self._closed:
            return
        try:
            await self.run(self.close_sync)
        finally:
            self._closed = True
            self._ex.shutdown(wait=True)

    def close(self) -> None:
        """Synchronous :meth:`aclose` (not from a running event loop's thread)."""
        if self._closed:
            return
        try:
            self.call(self.close_sync)
        finally:
            self._closed = True
            self._ex.shutdown(wait=True)


class ExactCache:
    """The pool's ``CallCache``: exact hits on (model, messages, sampling parameters).

    Use ``ExactCache.open(path, max_bytes=...)``; close with :meth:`aclose` (or
    :meth:`close` outside asyncio).  ``bypass`` (a context manager) makes :meth:`get`
    miss for the calls made inside it (a query with ``options.cache = false``) while
    fresh results are still stored.
    """

    def __init__(self, db: CacheDB, *, max_bytes: int, clock: Callable[[], float] = time.time):
        self.db = db
        self.max_bytes = max_bytes
        self._clock = clock
        self._bypass: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"rlmd-cache-bypass-{id(self)}", default=False
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        max_bytes: int,
        page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES,
    ) -> ExactCache:
        """Open (creating) the cache file; raises :class:`CacheError` naming the file.

        ``page_cache_bytes`` bounds the file's pages SQLite keeps in memory
        (``[cache] db_cache_bytes``)."""
        if max_bytes < 0:
            raise CacheError(f"cache max_bytes must be >= 0, got {max_bytes}")
        db = CacheDB(Path(path), page_cache_bytes=page_cache_bytes)
        cache = cls(db, max_bytes=max_bytes)
        try:
            db.call(db.conn)
        except BaseException:
            db.close()
            raise
        return cache

    @contextlib.contextmanager
    def bypass(self, on: bool = True) -> Iterator[None]:
        """Within this block (and tasks started in it) lookups miss; puts still happen."""
        token = self._bypass.set(on)
        try:
            yield
        finally:
            self._bypass.reset(token)

    # ------------------------------------------------------------------ async API

    async def get(self, req: ChatRequest) -> ChatResult | None:
        """A complete cached answer for ``req``, or None.  Counts the hit or miss.

        A failing cache (disk error, a lock held too long) is a miss, never an error:
        the call then goes to the model as if there were no cache.
        """
        if self._bypass.get():
            return None
        try:
            return await self.db.run(self.get_sync, call_key(req), False)
        except (sqlite3.Error, CacheError) as exc:
            log.warning("call cache lookup failed (treated as a miss): %r", exc)
            return None

    async def get_partial(self, req: ChatRequest) -> ChatResult | None:
        """A complete answer, else one stopped early (``stopped=True``); or None.

        Only for a caller that stops its stream at the same point (the engine's root turn
        stops at the first closed code block: same messages, same model, same cut).
        """
        if self._bypass.get():
            return None
        try:
            return await self.db.run(self.get_sync, call_key(req), True)
        except (sqlite3.Error, CacheError) as exc:
            log.warning("call cache lookup failed (treated as a miss): %r", exc)
            return None

    async def put(self, req: ChatRequest, result: ChatResult) -> None:
        """Store a fresh result (cache hits and empty answers are not stored)."""
        if result.cached or (not result.text and not result.stopped):
            return
        await self.db.run(self.put_sync, req.model, call_key(req), result)

    async def contains(self, req: ChatRequest) -> bool:
        """Whether a complete answer is stored (no counters touched)."""
        return await self.db.run(self._contains_sync, call_key(req))

    async def stats(self) -> CacheStats:
        return await self.db.run(self.stats_sync)

    async def clear(self) -> int:
        """Delete every entry (exact and semantic); returns how many were deleted."""
        return await self.db.run(self.clear_sync)

    async def aclose(self) -> None:
        await self.db.aclose()

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ cache thread

    def get_sync(self, key: bytes, allow_partial: bool = False) -> ChatResult | None:
        c = self.db.conn()
        row = c.execute("SELECT value, partial FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] and not allow_partial):
            self.db.count("misses")
            return None
        try:
            result = msgspec.msgpack.decode(row[0], type=ChatResult)
        except msgspec.DecodeError:
            self.db.count("misses")  # a value from an incompatible version: a miss
            return None
        self.db.pending_hits[key] = self._clock()
        self.db.count("partial_hits" if row[1] else "hits")
        self.db.count("tokens_saved_in", result.usage.input)
        self.db.count("tokens_saved_out", result.usage.output)
        self.db.count("cost_saved", result.cost)
        return result

    def _contains_sync(self, key: bytes) -> bool:
        c = self.db.conn()
        row = c.execute("SELECT partial FROM calls WHERE key = ?", (key,)).fetchone()
        return row is not None and not row[0]

    def put_sync(self, model: str, key: bytes, result: ChatResult) -> None:
        value = msgspec.msgpack.encode(result)
        size = len(value) + len(model) + ROW_OVERHEAD
        if size > self.max_bytes:
            return  # larger than the whole cache: storing it would evict everything
        now = self._clock()
        with self.db.write() as c:
            old = c.execute("SELECT size, partial FROM calls WHERE key = ?", (key,)).fetchone()
            if old is not None and not old[1] and result.stopped:
                return  # never replace a complete answer with a partial one
            c.execute(
                "INSERT OR REPLACE INTO calls(key, model, partial, speculative, value, size,"
                " created, used, hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (key, model, int(result.stopped), int(result.speculative), value, size, now, now),
            )
            delta = size - (old[0] if old is not None else 0)
            c.execute("UPDATE meta SET v = v + ? WHERE k = 'total_bytes'", (delta,))
            c.execute(
                "INSERT INTO meta(k, v) VALUES ('puts', 1) ON CONFLICT(k) DO UPDATE SET v = v + 1"
            )
            self._evict(c)

    def _evict(self, c: sqlite3.Connection) -> None:
        """Delete least recently used entries until the total fits (inside a write)."""
        total = self._total(c)
        if total <= self.max_bytes:
            return
        target = int(self.max_bytes * EVICT_TO)
        evicted = 0
        while total > target:
            rows = c.execute("SELECT key, size FROM calls ORDER BY used LIMIT 256").fetchall()
            if not rows:
                # Only semantic entries left: drop their oldest.
                srows = c.execute(
                    "SELECT id, size FROM semantic ORDER BY created LIMIT 256"
                ).fetchall()
                if not srows:
                    break
                for sid, size in srows:
                    c.execute("DELETE FROM semantic WHERE id = ?", (sid,))
                    total -= size
                    evicted += 1
                    if total <= target:
                        break
                continue
            for key, size in rows:
                c.execute("DELETE FROM calls WHERE key = ?", (key,))
                total -= size
                evicted += 1
                if total <= target:
                    break
        c.execute("UPDATE meta SET v = ? WHERE k = 'total_bytes'", (total,))
        c.execute(
            "INSERT INTO meta(k, v) VALUES ('evictions', ?) ON CONFLICT(k) DO UPDATE SET v = v + ?",
            (evicted, evicted),
        )

    @staticmethod
    def _total(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT v FROM meta WHERE k = 'total_bytes'").fetchone()
        return int(row[0]) if row else 0

    def stats_sync(self) -> CacheStats:
        self.db.flush_sync()
        c = self.db.conn()
        meta = dict(c.execute("SELECT k, v FROM meta").fetchall())
        entries, partial = c.execute(
            "SELECT count(*), coalesce(sum(partial), 0) FROM calls"
        ).fetchone()
        sem = c.execute("SELECT count(*) FROM semantic").fetchone()[0]
        counters = {k: meta.get(k, 0) for k in _COUNTERS}
        looked = counters["hits"] + counters["misses"]
        return CacheStats(
            path=str(self.db.path),
            entries=entries - partial,
            partial_entries=partial,
            bytes=int(meta.get("total_bytes", 0)),
            max_bytes=self.max_bytes,
            hits=int(counters["hits"]),
            misses=int(counters["misses"]),
            puts=int(meta.get("puts", 0)),
            evictions=int(counters["evictions"]),
            partial_hits=int(counters["partial_hits"]),
            tokens_saved_in=int(counters["tokens_saved_in"]),
            tokens_saved_out=int(counters["tokens_saved_out"]),
            cost_saved=round(float(counters["cost_saved"]), 6),
            hit_rate=round(counters["hits"] / looked, 4) if looked else 0.0,
            semantic_entries=sem,
            semantic_hits=int(counters["semantic_hits"]),
            semantic_misses=int(counters["semantic_misses"]),
            semantic_refused=int(counters["semantic_refused"]),
        )

    def clear_sync(self) -> int:
        self.db.pending_hits.clear()
        with self.db.write() as c:
            n = c.execute("DELETE FROM calls").rowcount
            n += c.execute("DELETE FROM semantic").rowcount
            c.execute("UPDATE meta SET v = 0 WHERE k = 'total_bytes'")
        return n
