"""An asyncio client of the daemon's socket for the MCP server: many calls in flight on
one connection, ``query/event`` notifications routed to the call that runs the job.

One connection on purpose: the daemon ties REPL sessions to the connection that opened
them, so when the MCP server exits (the host closed it) its sessions go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from rlmd.client import RpcError

log = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()
#: Longest line read from the daemon (a peek of a large range is one line).
MAX_LINE = 1 << 30

OnEvent = Callable[[dict[str, Any]], None]


#: The daemon answered with a JSON-RPC error (or the connection was lost: ``code`` 0);
#: the synchronous client's error, so both clients' callers catch one type.
DaemonError = RpcError


class DaemonLink:
    """A connection to the daemon that reconnects on the next call after a loss.

    ``connect`` makes a new ``(reader, writer)`` pair (it may start a daemon first);
    ``generation`` counts connections, so that users of per-connection state (REPL
    sessions) know when theirs was lost.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
    ) -> None:
        self._connect = connect
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._jobs: dict[str, OnEvent] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.generation = 0

    @classmethod
    def unix(cls, path: Path) -> DaemonLink:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(str(path), limit=MAX_LINE)

        return cls(connect)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call ``method``; raise DaemonError for an error answer or a lost connection."""
        writer = await self._ensure()
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            msg["params"] = params
        try:
            writer.write(_enc.encode(msg) + b"\n")
            await writer.drain()
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        writer = await self._ensure()
        writer.write(_enc.encode({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n")
        await writer.drain()

    def watch(self, job: str, on_event: OnEvent) -> Callable[[], None]:
        """Send ``query/event`` notifications of ``job`` to ``on_event``; returns the undo."""
        self._jobs[job] = on_event

        def unwatch() -> None:
            self._jobs.pop(job, None)

        return unwatch

    async def aclose(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- internals ----------------------------------------------------------------------

    async def _ensure(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is None or self._writer.is_closing():
                reader, self._writer = await self._connect()
                self.generation += 1
                self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "the daemon closed the connection"
        try:
            while line := await reader.readline():
                if line.strip():
                    self._deliver(_dec.decode(line))
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            why = f"the daemon connection failed: {exc}"
        finally:
            if self._writer is not None:
                self._writer.close()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DaemonError(0, f"{why}; retry the call"))

    def _deliver(self, msg: Any) -> None:
        if isinstance(msg, list):
            for m in msg:
                self._deliver(m)
            return
        if not isinstance(msg, dict):
            return
        if "method" in msg and "id" not in msg:
            params = msg.get("params") or {}
            cb = self._jobs.get(params.get("job", "")) if isinstance(params, dict) else None
            if cb is not None:
                try:
                    cb(params)
                except Exception:  # a failing listener must not stop the reader
                    log.exception("query/event listener failed")
            return
        fut = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
        if fut is None or fut.done():
            return
        if "error" in msg:
            e = msg["error"] or {}
            fut.set_exception(DaemonError(e.get("code", 0), e.get("message", ""), e.get("data")))
        else:
            fut.set_result(msg.get("result"))
