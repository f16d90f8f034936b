"""Running queries by job id: so that any connection can cancel one, and events carry seq."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from typing import Any, Protocol

# How long a cancel of a job that has not started yet is remembered.
EARLY_CANCEL_S = 10.0
# At most this many early cancels are remembered; the oldest are forgotten first.  A
# client that floods query/cancel for ids that never start (a million of them were seen)
# must not grow the daemon: each entry costs about 150 bytes, so this bounds it below 1 MB.
MAX_EARLY_CANCELS = 4096
# The longest job id a client may choose.  Ids are echoed in every event and kept in
# these tables; 100 MB ids (seen in a hostile test) must be refused, not stored.
MAX_JOB_ID_CHARS = 256


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


class JobIdTooLong(ValueError):
    """A client-chosen job id is longer than :data:`MAX_JOB_ID_CHARS`."""

    def __init__(self, length: int) -> None:
        super().__init__(
            f"job id of {length} characters is longer than the limit of {MAX_JOB_ID_CHARS}; "
            "choose a shorter id"
        )
        self.length = length


def check_job_id(job_id: str) -> None:
    """Raise :class:`JobIdTooLong` for an id over the limit."""
    if len(job_id) > MAX_JOB_ID_CHARS:
        raise JobIdTooLong(len(job_id))


class Jobs:
    """The registry of running jobs, and of cancels that arrived before their job."""

    def __init__(
        self, *, early_cancel_s: float = EARLY_CANCEL_S, max_early: int = MAX_EARLY_CANCELS
    ) -> None:
        self._jobs: dict[str, Job] = {}
        # id -> expiry, in insertion order.  Every entry lives the same time, so the
        # insertion order is also the expiry order and pruning only looks at the front.
        self._early: OrderedDict[str, float] = OrderedDict()
        self._early_cancel_s = early_cancel_s
        self._max_early = max_early

    def __len__(self) -> int:
        return len(self._jobs)

    def start(self, job_id: str | None, conn: Notifier) -> Job:
        """Register the current task as ``job_id`` (made up when None)."""
        jid = job_id or uuid.uuid4().hex[:12]
        check_job_id(jid)
        if jid in self._jobs:
            raise JobExists(jid)
        job = Job(jid, asyncio.current_task(), conn)
        self._jobs[jid] = job
        now = time.monotonic()
        self._prune(now)
        if self._early.pop(jid, 0.0) > now:
            job.cancel_requested = True
            if job.task is not None:
                job.task.cancel()
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
        check_job_id(job_id)
        job = self._jobs.get(job_id)
        if job is None or job.task is None or job.task.done():
            now = time.monotonic()
            self._early.pop(job_id, None)  # re-inserted at the back with a fresh expiry
            self._early[job_id] = now + self._early_cancel_s
            self._prune(now)
            return False
        job.cancel_requested = True
        job.task.cancel()
        return True

    def early_cancels(self) -> int:
        """How many not-yet-started job ids are remembered as cancelled."""
        return len(self._early)

    def _prune(self, now: float) -> None:
        # By time, then by count; both from the front (the oldest), so O(1) amortized.
        early = self._early
        while early and next(iter(early.values())) <= now:
            early.popitem(last=False)
        while len(early) > self._max_early:
            early.popitem(last=False)

    def ids(self) -> list[str]:
        return list(self._jobs)
