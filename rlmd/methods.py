"""The JSON-RPC method table: one small handler per method, over the daemon's parts.

Handlers take ``(conn, request, params)``; file and CPU work goes to threads so that the
event loop keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from jsonrpcserver import Error

from . import __version__
from .config import Config
from .engine.types import QueryParams
from .jobs import JobExists, Jobs
from .protocol.errors import (
    BAD_INPUT,
    CANCELLED,
    DAMAGED,
    NOT_FOUND,
    SHUTTING_DOWN,
    UNAVAILABLE,
    AppError,
)
from .protocol.jsonrpc import AFTER, FREE, Method, NoParams
from .protocol.schema import (
    ContextNameParams,
    ContextPeekParams,
    ContextPutParams,
    ContextSearchParams,
    DaemonStatus,
    DamagedBrief,
    JobParams,
    ProviderBrief,
    TraceParams,
)


@dataclass
class App:
    """Everything a handler may use, passed in explicitly (no module-level state)."""

    config: Config
    socket_path: Path
    state_dir: Path
    store: Any
    pool: Any = None
    engine: Any = None
    cache: Any = None
    protection: Callable[[], Any] | None = None
    embedded_note: str = ""
    embedded: Any = None  # the embedded provider, when it serves (its describe() is live)
    jobs: Jobs = field(default_factory=Jobs)
    started: float = field(default_factory=time.monotonic)
    draining: bool = False


def _store_error(exc: Exception) -> AppError:
    kind = getattr(exc, "kind", "store_error")
    code = {"not_found": NOT_FOUND, "damaged": DAMAGED}.get(kind, BAD_INPUT)
    return AppError(kind, str(getattr(exc, "message", exc)), code=code)


def build_methods(app: App) -> dict[str, Method]:
    """The method table for ``app``."""
    from .store.store import StoreError  # the store is a required part

    async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except StoreError as exc:
            raise _store_error(exc) from None

    def daemon_status(conn: Any, req: Any, p: NoParams) -> Any:
        providers = []
        if app.pool is not None:
            providers = [
                ProviderBrief(s.name, s.kind, s.healthy, s.in_flight, s.capacity)
                for s in app.pool.status()
            ]
        prot = app.protection() if app.protection else {}
        contexts = app.store.list()
        return DaemonStatus(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - app.started, 3),
            contexts=len(contexts),
            providers=providers,
            socket=str(app.socket_path),
            state_dir=str(app.state_dir),
            jobs=len(app.jobs),
            sandbox=msgspec.to_builtins(prot),
            embedded=app.embedded.describe() if app.embedded is not None else app.embedded_note,
            damaged_contexts=[DamagedBrief(c.name, c.damaged) for c in contexts if c.damaged],
        )

    async def context_put(conn: Any, req: Any, p: ContextPutParams) -> Any:
        if (p.text is None) == (p.path is None):
            raise AppError(
                "bad_params",
                "context/put takes exactly one of `text` (inline text) or `path` "
                "(a file or directory on the daemon's machine)",
                code=BAD_INPUT,
            )
        if p.text is not None:
            if p.include or p.exclude:
                raise AppError(
                    "bad_params", "include/exclude apply only with `path`", code=BAD_INPUT
                )
            return await in_thread(app.store.put_text, p.name, p.text, append=p.append)
        kw: dict[str, Any] = {"include": p.include, "exclude": p.exclude, "append": p.append}
        if p.max_file_bytes is not None:
            kw["max_file_bytes"] = p.max_file_bytes
        path = await asyncio.to_thread(os.path.expanduser, p.path or "")
        return await in_thread(app.store.put_path, p.name, path, **kw)

    def context_list(conn: Any, req: Any, p: NoParams) -> Any:
        return [c for c in app.store.list() if not c.name.startswith("_query:")]

    async def context_peek(conn: Any, req: Any, p: ContextPeekParams) -> Any:
        end = p.end if p.end is not None else p.start + 4096
        return {"text": await in_thread(app.store.peek, p.name, p.start, end)}

    async def context_search(conn: Any, req: Any, p: ContextSearchParams) -> Any:
        if p.mode == "ranked" or p.pattern is None:
            if p.query is None or p.pattern is not None:
                raise AppError(
                    "bad_params",
                    'context/search takes `pattern` (a regex), or `mode: "ranked"` with '
                    "`query` (words or a question)",
                    code=BAD_INPUT,
                )
            return {"matches": await in_thread(app.store.search_ranked, p.name, p.query, p.k)}
        # A runaway pattern is stopped between search windows instead of holding a thread.
        matches = await in_thread(
            app.store.search, p.name, p.pattern, p.max_matches, timeout_s=60.0
        )
        return {"matches": matches}

    async def context_info(conn: Any, req: Any, p: ContextNameParams) -> Any:
        return await in_thread(app.store.info, p.name)

    async def context_drop(conn: Any, req: Any, p: ContextNameParams) -> Any:
        return {"dropped": await in_thread(app.store.drop, p.name)}

    async def query_run(conn: Any, req: Any, p: QueryParams) -> Any:
        if app.draining:
            raise AppError(
                "shutting_down", "the daemon is shutting down; retry shortly", code=SHUTTING_DOWN
            )
        if app.engine is None:
            raise AppError(
                "unavailable",
                app.embedded_note or "no model is available: configure [[providers]] in the config",
                code=UNAVAILABLE,
            )
        if p.context is not None and p.text is not None:
            raise AppError(
                "bad_params", "give `context` (a name) or `text`, not both", code=BAD_INPUT
            )
        try:
            job = app.jobs.start(p.job, conn)
        except JobExists:
            raise AppError(
                "job_exists",
                f"a job named {p.job!r} is already running; choose another id",
                code=BAD_INPUT,
            ) from None
        temp_name = None
        try:
            # Registered above, before waiting for this connection's earlier puts, so that a
            # query/cancel sent meanwhile finds the job.
            await req.turn()
            if p.text is not None:
                temp_name = f"_query:{job.id}"
                await in_thread(app.store.put_text, temp_name, p.text)
                p = msgspec.structs.replace(p, context=temp_name, text=None)
            elif p.context is not None:
                await in_thread(app.store.info, p.context)  # a missing name fails fast
            return await app.engine.run(p, job.id, job.emit)
        except asyncio.CancelledError:
            if not job.cancel_requested or app.draining:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            msg = "query cancelled (query/cancel)"
            job.emit({"kind": "error", "message": msg, "error_kind": "cancelled"})
            return Error(CANCELLED, msg, {"kind": "cancelled", "job": job.id})
        except AppError as exc:  # engine errors included: they carry kind and partial
            job.emit({"kind": "error", "message": exc.message, "error_kind": exc.kind, **exc.data})
            raise
        finally:
            app.jobs.finish(job)
            if temp_name is not None:
                await asyncio.shield(asyncio.to_thread(_drop_quietly, app.store, temp_name))

    def query_cancel(conn: Any, req: Any, p: JobParams) -> Any:
        return {"cancelled": app.jobs.cancel(p.job)}

    def query_jobs(conn: Any, req: Any, p: NoParams) -> Any:
        return {"jobs": app.jobs.ids()}

    async def query_trace(conn: Any, req: Any, p: TraceParams) -> Any:
        from .engine.trace import read_trace

        try:
            records = await asyncio.to_thread(read_trace, app.state_dir, p.job)
        except FileNotFoundError:
            raise AppError(
                "not_found",
                f"no trace for job {p.job!r}" if p.job else "no traces yet",
                code=NOT_FOUND,
            ) from None
        return {"records": records}

    def pool_status(conn: Any, req: Any, p: NoParams) -> Any:
        return {"providers": app.pool.status() if app.pool is not None else []}

    async def cache_stats(conn: Any, req: Any, p: NoParams) -> Any:
        if app.cache is None:
            return {"enabled": False}
        return await app.cache.stats()

    async def cache_clear(conn: Any, req: Any, p: NoParams) -> Any:
        if app.cache is None:
            return {"deleted": 0}
        return await app.cache.clear()

    def daemon_ping(conn: Any, req: Any, p: NoParams) -> Any:
        return "pong"

    table = {
        "daemon/ping": Method.of(daemon_ping, ordering=FREE),
        "daemon/status": Method.of(daemon_status, ordering=FREE),
        "context/put": Method.of(context_put, ContextPutParams),
        "context/list": Method.of(context_list),
        "context/info": Method.of(context_info, ContextNameParams),
        "context/peek": Method.of(context_peek, ContextPeekParams),
        "context/search": Method.of(context_search, ContextSearchParams),
        "context/drop": Method.of(context_drop, ContextNameParams),
        "query/run": Method.of(query_run, QueryParams, ordering=AFTER),
        "query/cancel": Method.of(query_cancel, JobParams, ordering=FREE),
        "query/jobs": Method.of(query_jobs, ordering=FREE),
        "query/trace": Method.of(query_trace, TraceParams),
        "pool/status": Method.of(pool_status, ordering=FREE),
        "cache/stats": Method.of(cache_stats, ordering=FREE),
        "cache/clear": Method.of(cache_clear),
    }
    return table


def _drop_quietly(store: Any, name: str) -> None:
    try:
        store.drop(name)
    except Exception:  # a leftover temp context is harmless; never mask the query's result
        pass
