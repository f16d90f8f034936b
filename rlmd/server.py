"""The Unix socket server: connections, peer check, framing, half-close and notifications.

Each connection is an ``asyncio.Protocol`` (no stream objects on the hot path).  Requests
answered synchronously are written back inside ``data_received``; coroutine handlers run
as tasks owned by the connection, so a client that disconnects cancels its work.

Bounds that protect everyone from one client: the frame limit per message (framing.py),
the unfinished bytes held across all connections together (``max_buffered_bytes``), an
idle timeout for connections that never send anything, and the listen backlog asked for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from .protocol.errors import BUSY, INTERNAL_ERROR, INVALID_REQUEST, PARSE_ERROR
from .protocol.framing import FrameDecoder, FrameError, Framing, encode_frame
from .protocol.jsonrpc import Dispatcher, encode

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")
PEER_CHECK_S = 0.5  # how often a half-closed connection with work in flight is looked at
# The code of the one error a connection gets before it is closed, by FrameError kind.
_FATAL_CODES = {
    "frame_too_large": INVALID_REQUEST,
    "idle_timeout": INVALID_REQUEST,
    "server_busy": BUSY,
}


def peer_uid(sock: Any) -> int | None:
    """The uid of the process on the other end of a Unix socket (SO_PEERCRED)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    return _PEERCRED.unpack(raw)[1]


def peer_gone(sock: Any) -> bool:
    """Whether the other end of a Unix socket has closed it both ways (POLLHUP), not just
    shut its writing side."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return any(ev & select.POLLHUP for _fd, ev in poller.poll(0))
    except (OSError, AttributeError, ValueError):
        return False


class Connection(asyncio.Protocol):
    """One client.  Also the ``context`` handlers receive: ``notify`` sends to this client."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.max_frame)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.eof = False
        self.closed = False
        self.chain: asyncio.Future[Any] | None = None  # the last ordered request (see jsonrpc)
        self._paused_writing = False
        self._buffered = 0  # this connection's share of server.buffered
        self._idle: asyncio.TimerHandle | None = None
        self._on_close: list[Callable[[], None]] = []  # see on_close

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        uid = peer_uid(transport.get_extra_info("socket"))
        if uid != self.server.uid:
            log.warning(
                "refused a connection from uid %s (daemon runs as uid %s)", uid, self.server.uid
            )
            err = {
                "jsonrpc": "2.0",
                "error": {
                    "code": -32000,
                    "message": f"refused: peer uid {uid} differs from the daemon's uid {self.server.uid}",
                    "data": {"kind": "peer_refused"},
                },
                "id": None,
            }
            transport.write(encode(err) + b"\n")
            transport.close()
            self.closed = True
            return
        self.server.connections.add(self)
        # A client that connects and never sends holds an fd forever; enough of them
        # (1,010 were seen) exhaust the daemon's descriptors and new clients are reset.
        self._idle = asyncio.get_running_loop().call_later(
            self.server.idle_timeout_s, self._idle_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            bodies = self.decoder.feed(data)
        except FrameError as exc:
            self._fatal(exc)
            return
        if not self._account(self.decoder.pending()):
            return
        dispatch = self.server.dispatcher.dispatch
        for body in bodies:
            try:
                out = dispatch(body, self)
            except Exception as exc:  # a bug or a hostile message: answer, keep serving
                log.exception("internal error while dispatching")
                self._write(
                    encode(
                        {
                            "jsonrpc": "2.0",
                            "error": {
                                "code": INTERNAL_ERROR,
                                "message": f"Internal error: {exc!r}",
                            },
                            "id": None,
                        }
                    )
                )
                continue
            if out is None:
                continue
            if isinstance(out, bytes):
                self._write(out)
            else:
                self._spawn(out)

    def eof_received(self) -> bool:
        # A half-close: answer what is in flight, then close (socat -t relies on this).
        self.eof = True
        if not self.tasks:
            self._close()
        else:
            self._watch_peer()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._release()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for task in list(self.tasks):
            task.cancel()
        hooks, self._on_close = self._on_close, []
        for hook in hooks:
            try:
                hook()
            except Exception:  # one owner's failure must not skip the others' cleanup
                log.exception("a connection close hook failed")

    def pause_writing(self) -> None:
        # The client is not reading: stop reading its requests until it catches up.
        self._paused_writing = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- used by handlers ------------------------------------------------------------------

    def notify(self, method: str, params: Any) -> None:
        """Send a JSON-RPC notification to this client (dropped if it has gone)."""
        self._write(encode({"jsonrpc": "2.0", "method": method, "params": params}))

    @property
    def is_open(self) -> bool:
        return not self.closed

    def on_close(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` once, on the event loop, when this connection closes (at once,
        soon, if it already has): what a client opened (REPL sessions) goes with it
        without anyone polling ``is_open``.  The hook must not block; start a task."""
        if self.closed:
            asyncio.get_running_loop().call_soon(hook)
        else:
            self._on_close.append(hook)

    # -- internals ---------------------------------------------------------------------

    def _account(self, pending: int) -> bool:
        """Track this connection's unfinished bytes in the server-wide total.

        Returns False (after answering and closing) when the total would pass
        ``server.max_buffered_bytes``: one connection's frame limit alone does not stop
        eight clients from each holding 200 MB.
        """
        srv = self.server
        grow = pending - self._buffered
        if grow > 0 and srv.buffered + grow > srv.max_buffered_bytes:
            others = srv.buffered - self._buffered
            self._release()
            self._fatal(
                FrameError(
                    f"the daemon already holds {others} bytes of unfinished messages from "
                    f"other connections; this message would pass the server-wide limit of "
                    f"{srv.max_buffered_bytes} bytes (server.max_buffered_bytes). Retry "
                    "later, or put large text by path (context/put {name, path})",
                    kind="server_busy",
                )
            )
            return False
        srv.buffered += grow
        self._buffered = pending
        return True

    def _release(self) -> None:
        self.server.buffered -= self._buffered
        self._buffered = 0

    def _idle_timeout(self) -> None:
        self._idle = None
        if self.closed or self.decoder.framing is not None or self.tasks:
            return
        log.info("closing a connection that sent nothing for %gs", self.server.idle_timeout_s)
        self._fatal(
            FrameError(
                f"no request within {self.server.idle_timeout_s:g}s of connecting "
                "(server.idle_timeout_s); connect when there is something to send",
                kind="idle_timeout",
            )
        )

    def _watch_peer(self) -> None:
        """Cancel the work of a client that has gone, not only half-closed.

        A killed client reads as end-of-file, like ``socat -t``'s half-close, and a query
        that writes nothing for minutes (a base query's prompt on a CPU) ran on to its end
        with no one to read it.  Linux flags a Unix socket whose peer closed both ways
        with POLLHUP; a half-closed one only with POLLRDHUP.  Checked while work is in
        flight, twice a second (one poll(2) of one fd).
        """
        if self.closed or not self.tasks or self.transport is None:
            return
        if peer_gone(self.transport.get_extra_info("socket")):
            log.info("client went away with %d request(s) in flight: cancelled", len(self.tasks))
            self.transport.abort()  # connection_lost cancels the tasks
            return
        asyncio.get_running_loop().call_later(PEER_CHECK_S, self._watch_peer)

    def _write(self, body: bytes) -> None:
        t = self.transport
        if t is None or self.closed or t.is_closing():
            return
        t.write(encode_frame(self.decoder.framing, body))

    def _spawn(self, pending: Awaitable[bytes | None]) -> None:
        task = asyncio.ensure_future(pending)
        self.tasks.add(task)
        self.server.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        self.server.tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("request task failed: %r", exc)
            else:
                out = task.result()
                if out is not None:
                    self._write(out)
        if self.eof and not self.tasks:
            self._close()

    def _fatal(self, exc: FrameError) -> None:
        self._release()
        code = _FATAL_CODES.get(exc.kind, PARSE_ERROR)
        err = {
            "jsonrpc": "2.0",
            "error": {"code": code, "message": str(exc), "data": {"kind": exc.kind}},
            "id": None,
        }
        framing = self.decoder.framing or Framing.NDJSON
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(framing, encode(err)))
        log.info("closing a connection: %s", exc)
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Server:
    """Accepts connections on a listening socket and tracks them for draining."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_frame: int,
        uid: int | None = None,
        backlog: int = 512,
        max_buffered_bytes: int | None = None,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_frame = max_frame
        self.uid = os.getuid() if uid is None else uid
        self.backlog = backlog
        self.max_buffered_bytes = max_buffered_bytes or 4 * max_frame
        self.idle_timeout_s = idle_timeout_s
        self.buffered = 0  # unfinished bytes held across all connections
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening Unix socket."""
        loop = asyncio.get_running_loop()
        # create_unix_server calls listen() again, with its own default of 100 unless told:
        # the backlog asked for at bind time was silently lowered.
        self._server = await loop.create_unix_server(
            lambda: Connection(self), sock=sock, backlog=self.backlog
        )

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout_s: float) -> bool:
        """Wait for in-flight requests to finish; cancel what is left after the timeout.

        Returns True when everything finished on its own.
        """
        finished = True
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=timeout_s)
            if pending:
                finished = False
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=5)
        for conn in list(self.connections):
            conn._close()
        return finished
