"""Admission of queries: at most N run at once, at most M wait, the rest are refused.

Each running query holds a REPL worker (a few processes) and model calls; a batch of 200
``query/run`` once made 600 processes and 3.5 GB of workers and slowed ``daemon/ping``
to 5.7 s.  Waiting queries hold only a future.  Waiters are served first come, first
served; a waiter that is cancelled (``query/cancel``, client gone) leaves the queue, and a
slot handed to it just before it was cancelled is passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable


class QueueFull(Exception):
    """Every slot is taken and the queue is full; the message says the limits."""

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(
            f"the daemon is busy: {running} queries are running and {waiting} are waiting "
            "(limits.max_concurrent_queries and limits.max_queued_queries); retry later"
        )
        self.running = running
        self.waiting = waiting


class Admission:
    """Counts running queries and queues the ones over ``limit``."""

    def __init__(self, limit: int = 8, max_queued: int = 64) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, on_queued: Callable[[int], None] | None = None) -> AsyncIterator[None]:
        """Hold a slot for the body; ``on_queued(position)`` is called (1 = next) if the
        query has to wait.  Raises :class:`QueueFull` when the queue is full too."""
        if self.running < self.limit and not self._waiters:
            self.running += 1
        else:
            if len(self._waiters) >= self.max_queued:
                raise QueueFull(self.running, len(self._waiters))
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            if on_queued is not None:
                on_queued(len(self._waiters))
            try:
                await fut  # resolved by _release, which hands its slot over
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()  # the slot was ours already: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # ``running`` stays: the slot changes hands
                return
        self.running -= 1
