"""``query/*``: running RLM queries as jobs, cancelling them, reading their traces."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
from jsonrpcserver import Error
from jsonrpcserver.result import Result

from ..admission import QueueFull
from ..engine.types import QueryParams, QueryResult
from ..jobs import Job, JobExists, JobIdTooLong, Jobs, Notifier
from ..protocol.errors import (
    BAD_INPUT,
    BUSY,
    CANCELLED,
    INVALID_PARAMS,
    NOT_FOUND,
    SHUTTING_DOWN,
    UNAVAILABLE,
    AppError,
)
from ..protocol.jsonrpc import AFTER, FREE, Method, NoParams, Request
from ..protocol.schema import JobParams, TraceParams
from .context import in_thread

if TYPE_CHECKING:
    from ..app import App
    from ..store.store import ContextStore


def start_job(jobs: Jobs, job_id: str | None, conn: Notifier) -> Job:
    try:
        return jobs.start(job_id, conn)
    except JobIdTooLong as exc:
        raise AppError("bad_params", str(exc), code=INVALID_PARAMS) from None
    except JobExists:
        raise AppError(
            "job_exists",
            f"a job named {job_id!r} is already running; choose another id",
            code=BAD_INPUT,
        ) from None


def cancelled(job: Job, what: str) -> Result:
    """The answer to a job stopped by ``query/cancel`` (the current task keeps running to
    send it): the job's last event, ``error`` of kind ``cancelled``, and the error result."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    msg = f"{what} cancelled (query/cancel)"
    job.emit({"kind": "error", "message": msg, "error_kind": "cancelled"})
    return Error(CANCELLED, msg, {"kind": "cancelled", "job": job.id})


async def run(app: App, conn: Notifier, req: Request, p: QueryParams) -> QueryResult | Result:
    if app.draining:
        raise AppError(
            "shutting_down", "the daemon is shutting down; retry shortly", code=SHUTTING_DOWN
        )
    engine = app.models.engine
    if engine is None:
        raise AppError(
            "unavailable",
            app.models.embedded_note
            or "no model is available: configure [[providers]] in the config",
            code=UNAVAILABLE,
        )
    if p.context is not None and p.text is not None:
        raise AppError("bad_params", "give `context` (a name) or `text`, not both", code=BAD_INPUT)
    job = start_job(app.jobs, p.job, conn)
    adm = app.admission
    temp_name = None
    try:
        # Registered above, before waiting for this connection's earlier puts and for a
        # slot, so that a query/cancel sent meanwhile finds the job.
        await req.turn()

        def queued(position: int) -> None:
            job.emit(
                {
                    "kind": "queued",
                    "position": position,
                    "running": adm.running,
                    "limit": adm.limit,
                }
            )

        try:
            async with adm.slot(queued):
                if p.text is not None:
                    temp_name = f"_query:{job.id}"
                    await in_thread(app.store.put_text, temp_name, p.text)
                    p = msgspec.structs.replace(p, context=temp_name, text=None)
                elif p.context is not None:
                    await in_thread(app.store.info, p.context)  # a missing name fails fast
                return await engine.run(p, job.id, job.emit)
        except QueueFull as exc:
            raise AppError(
                "busy", str(exc), code=BUSY, running=exc.running, queued=exc.waiting
            ) from None
    except asyncio.CancelledError:
        if not job.cancel_requested or app.draining:
            raise
        return cancelled(job, "query")
    except AppError as exc:  # engine errors included: they carry kind and partial
        job.emit({"kind": "error", "message": exc.message, "error_kind": exc.kind, **exc.data})
        raise
    finally:
        app.jobs.finish(job)
        if temp_name is not None:
            await asyncio.shield(asyncio.to_thread(_drop_quietly, app.store, temp_name))


def cancel(jobs: Jobs, conn: Notifier, req: Request, p: JobParams) -> dict[str, bool]:
    return {"cancelled": jobs.cancel(p.job)}


def list_jobs(jobs: Jobs, conn: Notifier, req: Request, p: NoParams) -> dict[str, list[str]]:
    return {"jobs": jobs.ids()}


async def trace(
    app: App, conn: Notifier, req: Request, p: TraceParams
) -> dict[str, list[dict[str, Any]]]:
    from ..engine.trace import read_trace

    try:
        records = await asyncio.to_thread(read_trace, app.state_dir, p.job)
    except FileNotFoundError:
        raise AppError(
            "not_found",
            f"no trace for job {p.job!r}" if p.job else "no traces yet",
            code=NOT_FOUND,
        ) from None
    return {"records": records}


def _drop_quietly(store: ContextStore, name: str) -> None:
    try:
        store.drop(name)
    except Exception:  # a leftover temp context is harmless; never mask the query's result
        pass


def routes(app: App) -> dict[str, Method]:
    return {
        "query/run": Method.of(partial(run, app), QueryParams, ordering=AFTER),
        "query/cancel": Method.of(partial(cancel, app.jobs), JobParams, ordering=FREE),
        "query/jobs": Method.of(partial(list_jobs, app.jobs), ordering=FREE),
        "query/trace": Method.of(partial(trace, app), TraceParams),
    }
