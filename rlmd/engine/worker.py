"""A loop's REPL worker, started in the background and waited for at its first use.

The worker's start (0.2-0.5 s in a bubblewrap sandbox) overlaps the root model's first
turn.  The start runs as its own task (shielded: a cancelled waiter must not interrupt a
half-spawned worker); ``close`` waits for it and kills the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from rlmd.engine.record import Recorder
from rlmd.engine.types import EngineError
from rlmd.repl.sandbox import Protection, SandboxUnavailable
from rlmd.repl.session import ExecResult, ReplSession, WorkerError

# Run once in every fresh worker before the model's first block: models (small ones above
# all) use ``re`` and friends without importing them.
REPL_SETUP = "import re, json, math, collections, itertools"


class LazyRepl:
    """A ``ReplSession`` that starts now and is awaited when a block first needs it."""

    def __init__(
        self,
        start: Callable[[], Awaitable[ReplSession]],
        recorder: Recorder,
        background: set[asyncio.Future[None]],
    ) -> None:
        self._t0 = time.monotonic()
        self._background = background
        self._recorder = recorder
        self._needs_setup = True
        self._refused_calls = 0  # sub-call prompts the worker refused before sending
        self._task = asyncio.get_running_loop().create_task(start())  # type: ignore[arg-type]
        self._task.add_done_callback(self._started)

    def _close_when_started(self, task: asyncio.Task[ReplSession]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._background.add(closer := asyncio.ensure_future(task.result().close()))
            closer.add_done_callback(self._background.discard)

    def _started(self, task: asyncio.Task[ReplSession]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self._recorder.note(
            "repl",
            event="start",
            elapsed_s=round(time.monotonic() - self._t0, 4),
            protection=layers(getattr(task.result(), "protection", None)),
        )

    async def _session(self) -> ReplSession:
        try:
            return await asyncio.shield(self._task)
        except (WorkerError, SandboxUnavailable) as exc:
            raise EngineError(
                "repl_unavailable", f"the REPL worker could not start: {exc}"
            ) from None

    async def execute(self, code: str, *, timeout_s: float) -> ExecResult:
        session = await self._session()
        if self._needs_setup:
            await session.execute(REPL_SETUP, timeout_s=timeout_s)
            self._needs_setup = False
        res = await session.execute(code, timeout_s=timeout_s)
        self._refused_calls += res.refused_calls
        if res.restarted:
            self._needs_setup = True
        return res

    async def get_var(self, name: str) -> str | None:
        return await (await self._session()).get_var(name)

    async def close(self) -> None:
        try:
            session = await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled():
                return
            # Cancelled again while the worker was still starting: kill it once it is up.
            self._task.add_done_callback(self._close_when_started)
            raise
        except Exception:
            return  # it never started: nothing to kill
        await session.close()
        # What crossed the channel: a prompt the worker refused never did (Broken 5).
        self._recorder.note(
            "repl",
            event="close",
            bytes_from_worker=session.bytes_from_workers,
            refused_in_worker=self._refused_calls,
        )


def layers(protection: Protection | None) -> str:
    """``bwrap+seccomp+landlock+rlimits``: the sandbox layers a worker runs under."""
    return protection.summary() if protection is not None else "none"
