"""A small synchronous client of the daemon's socket (the CLI, benchmarks and tests use it).

It speaks newline-delimited JSON by default, or Content-Length framing, and hands
``query/event`` notifications to a callback while a call waits for its response.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from .protocol.framing import FrameDecoder, Framing, encode_frame

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @property
    def kind(self) -> str | None:
        return self.data.get("kind") if isinstance(self.data, dict) else None


def connect_unix(path: str, *, timeout: float | None, retry_s: float) -> socket.socket:
    """Connect to ``path``, retrying for up to ``retry_s`` while the daemon is busy.

    A full listen backlog makes a non-blocking connect fail at once with EAGAIN
    (BlockingIOError), and a daemon that is restarting refuses for a moment; both pass in
    milliseconds, so a short bounded retry (5 ms doubling to 100 ms) hides them.  A
    missing socket file is not retried: nobody is there.
    """
    deadline = time.monotonic() + retry_s
    pause = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (BlockingIOError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() + pause > deadline:
                raise
        except BaseException:
            sock.close()
            raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class Client:
    """One connection to the daemon; not thread-safe (use one per thread)."""

    def __init__(
        self,
        path: str | Path,
        *,
        framing: Framing = Framing.NDJSON,
        timeout: float | None = None,
        max_frame: int = 1 << 30,
        connect_retry_s: float = 2.0,
    ) -> None:
        self.path = str(path)
        self.framing = framing
        self.sock = connect_unix(self.path, timeout=timeout, retry_s=connect_retry_s)
        self._decoder = FrameDecoder(max_frame)
        self._decoder.framing = framing
        self._ids = itertools.count(1)
        self._inbox: list[Any] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, message: Any) -> None:
        """Send one raw message (a request, a notification or a batch)."""
        self.sock.sendall(encode_frame(self.framing, _enc.encode(message)))

    def notify(self, method: str, params: Any = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def receive(self) -> Any:
        """The next message from the daemon (raises ConnectionError at end of stream)."""
        while not self._inbox:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self._inbox.extend(_dec.decode(b) for b in self._decoder.feed(data))
        return self._inbox.pop(0)

    def call(
        self,
        method: str,
        params: Any = None,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Call ``method`` and return its result; notifications go to ``on_event``."""
        rid = next(self._ids)
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        while True:
            reply = self.receive()
            if isinstance(reply, dict) and "method" in reply and "id" not in reply:
                if on_event is not None:
                    on_event(reply.get("params") or {})
                continue
            if isinstance(reply, dict) and reply.get("id") == rid:
                if "error" in reply:
                    e = reply["error"]
                    raise RpcError(e.get("code", 0), e.get("message", ""), e.get("data"))
                return reply.get("result")
            if isinstance(reply, dict) and reply.get("id") is None and "error" in reply:
                e = reply["error"]
                raise RpcError(e.get("code", 0), e.get("message", ""), e.get("data"))
