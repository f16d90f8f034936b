"""The ``improve/*`` JSON-RPC methods over an ``ImproveService``.

``improve/start`` and ``improve/reject`` run rounds, so they run as jobs: their events go
out as ``query/event`` notifications of the cycle's job id (kinds ``phase``, ``proposal``,
``test`` plus the analysis query's own events), and ``query/cancel {job}`` stops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from rlmd.handlers.query import cancelled, start_job
from rlmd.improve.cycle import (
    ImproveJobParams,
    ImproveRejectParams,
    ImproveService,
    ImproveStartParams,
)
from rlmd.jobs import Job, Jobs, Notifier
from rlmd.protocol.errors import UNAVAILABLE, AppError
from rlmd.protocol.jsonrpc import AFTER, FREE, Method, Request

if TYPE_CHECKING:
    from rlmd.app import App


def _service(svc: ImproveService | None) -> ImproveService:
    if svc is None:
        raise AppError(
            "unavailable",
            "the improvement cycle needs a model: configure [[providers]] or install rlmd[local]",
            code=UNAVAILABLE,
        )
    return svc


async def _as_job(
    jobs: Jobs, conn: Notifier, job_id: str | None, work: Callable[[Job], Awaitable[Any]]
) -> Any:
    job = start_job(jobs, job_id, conn)
    try:
        return await work(job)
    except asyncio.CancelledError:
        if not job.cancel_requested:
            raise
        return cancelled(job, "improvement cycle")
    except AppError as exc:
        job.emit({"kind": "error", "message": exc.message, "error_kind": exc.kind})
        raise
    finally:
        jobs.finish(job)


async def improve_start(
    svc: ImproveService | None, jobs: Jobs, conn: Notifier, req: Request, p: ImproveStartParams
) -> Any:
    service = _service(svc)
    await req.turn()

    async def work(job: Job) -> Any:
        point = await service.start(p, job.id, job.emit)
        job.emit({"kind": "final", "answer": point.summary, "state": point.state})
        return point

    return await _as_job(jobs, conn, p.job, work)


async def improve_reject(
    svc: ImproveService | None, jobs: Jobs, conn: Notifier, req: Request, p: ImproveRejectParams
) -> Any:
    service = _service(svc)

    async def work(job: Job) -> Any:
        point = await service.reject(p.job, p.feedback, job.emit)
        job.emit({"kind": "final", "answer": point.summary or point.state, "state": point.state})
        return point

    return await _as_job(jobs, conn, p.job, work)


async def improve_approve(
    svc: ImproveService | None, conn: Notifier, req: Request, p: ImproveJobParams
) -> Any:
    return await _service(svc).approve(p.job)


async def improve_list(svc: ImproveService | None, conn: Notifier, req: Request, p: Any) -> Any:
    return {"cycles": await _service(svc).list()}


async def improve_show(
    svc: ImproveService | None, conn: Notifier, req: Request, p: ImproveJobParams
) -> Any:
    return await _service(svc).show(p.job)


def routes(app: App) -> dict[str, Method]:
    """The ``improve/*`` family."""
    svc, jobs = app.improve, app.jobs
    return {
        "improve/start": Method.of(
            partial(improve_start, svc, jobs), ImproveStartParams, ordering=AFTER
        ),
        "improve/approve": Method.of(partial(improve_approve, svc), ImproveJobParams),
        "improve/reject": Method.of(
            partial(improve_reject, svc, jobs), ImproveRejectParams, ordering=FREE
        ),
        "improve/list": Method.of(partial(improve_list, svc), ordering=FREE),
        "improve/show": Method.of(partial(improve_show, svc), ImproveJobParams, ordering=FREE),
    }
