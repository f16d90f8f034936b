"""Running queries by job id: so that any connection can cancel one, and events carry seq."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Protocol

# How long a cancel of a job that has not started yet is remembered.
EARLY_CANCEL_S = 10.0


class Notifier(Protocol):
    def notify(self, method: str, params: Any) -> None: ...


class Job:
    """One running ``query/run``: its task, the connection it streams to, its event count."""

    __slots__ = ("cancel_requested", "conn", "id", "seq", "task")

    def __init__(self, job_id: str, task: asyncio.Task[Any] | None, conn: Notifier) -> None:
        self.id = job_id
        self.task = task
        self.conn = conn
        self.seq = 0
        self.cancel_requested = False

    def emit(self, body: dict[str, Any]) -> None:
        """Send one ``query/event`` notification; ``seq`` counts up from 0 per job."""
        params = {"job": self.id, "seq": self.seq, **body}
        self.seq += 1
        self.conn.notify("query/event", params)


class JobExists(Exception):
    pass


class Jobs:
    """The registry of running jobs."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._early: dict[str, float] = {}  # cancelled before they started: id -> expiry

    def __len__(self) -> int:
        return len(self._jobs)

    def start(self, job_id: str | None, conn: Notifier) -> Job:
        """Register the current task as ``job_id`` (made up when None)."""
        jid = job_id or uuid.uuid4().hex[:12]
        if jid in self._jobs:
            raise JobExists(jid)
        job = Job(jid, asyncio.current_task(), conn)
        self._jobs[jid] = job
        now = time.monotonic()
        if self._early.pop(jid, 0.0) > now:
            job.cancel_requested = True
            if job.task is not None:
                job.task.cancel()
        if len(self._early) > 1000:  # forget stale ids
            self._early = {k: t for k, t in self._early.items() if t > now}
        return job

    def finish(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop; False when no such job is running.

        A job id that is not running yet is remembered for a short while: a client that
        sends query/run and query/cancel back to back (the cancel may be read first) still
        gets its query cancelled when it starts.
        """
        job = self._jobs.get(job_id)
        if job is None or job.task is None or job.task.done():
            self._early[job_id] = time.monotonic() + EARLY_CANCEL_S
            return False
        job.cancel_requested = True
        job.task.cancel()
        return True

    def ids(self) -> list[str]:
        return list(self._jobs)
