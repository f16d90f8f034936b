"""Messages between the daemon and a REPL worker, framed over their private socketpair.

A frame is a 4-byte big-endian length followed by that many bytes of msgspec MessagePack.
Both ends use the same tagged union of Structs, so a malformed or unexpected message is a
decode error on the receiving side, never an arbitrary object.  The daemon treats every
frame from the worker as hostile: it bounds the length before reading the body and
validates the message type; a bad frame ends the worker.

This module is imported by the worker, so it must stay light (msgspec and the standard
library only; no asyncio at import time).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

from rlmd.repl.prompt_limit import PromptLimit

HEADER = struct.Struct(">I")
#: Hard ceiling of one frame, whatever the configured limit says (the length field is u32).
MAX_FRAME_CEILING = 2**32 - 1


class ChannelError(Exception):
    """The peer sent a frame that is too big or not a valid message, or hung up."""


class _Msg(msgspec.Struct, tag_field="t", array_like=False, kw_only=True):
    pass


# --- daemon -> worker -------------------------------------------------------------------


class Init(_Msg, tag="init"):
    """First message: how the worker sets itself up before it runs any model code."""

    context_path: str | None
    index_path: str | None  # the store's character index of the context, if any
    str_threshold_bytes: int
    memory_bytes: int  # RLIMIT_AS; 0: unlimited
    cpu_s: int  # RLIMIT_CPU; 0: unlimited
    open_files: int  # RLIMIT_NOFILE; 0: unchanged
    file_size_bytes: int  # RLIMIT_FSIZE; 0: unlimited
    seccomp: bool
    output_cap_chars: int
    max_frame_bytes: int
    #: (path, Landlock rights) the worker allows itself; empty: no Landlock.
    landlock_rules: list[tuple[str, int]] = []
    #: Landlock scopes (``LL_SCOPE_*`` bits) the worker puts itself under; 0: none.
    landlock_scoped: int = 0
    #: The bound of a sub-call prompt, checked before a Call is sent; None: no check in
    #: the worker (the daemon checks every Call anyway).
    sub_prompt: PromptLimit | None = None


class Exec(_Msg, tag="exec"):
    """Run one block of code in the persistent namespace."""

    code: str


class GetVar(_Msg, tag="getvar"):
    """Ask for the text of a variable (FINAL_VAR written outside code)."""

    name: str


class Flush(_Msg, tag="flush"):
    """The block overran its time: send what it printed so far (answered by the reader
    thread while the main thread is still busy), before the worker is killed."""


class CallReply(_Msg, tag="reply"):
    """The answer to a worker's Call; ``error`` set means the call raises in the worker."""

    id: int
    value: Any = None
    error: str | None = None


# --- worker -> daemon -------------------------------------------------------------------


class Ready(_Msg, tag="ready"):
    """The worker is set up; ``seccomp`` says whether its filter is installed."""

    pid: int
    seccomp: bool
    rlimits: bool
    landlock: bool
    context_kind: str  # "none" | "str" | "view"
    setup_error: str | None = None
    #: Every capability dropped (bounding and ambient sets too) and no_new_privs set.
    privileges_dropped: bool = False
    #: The Landlock scopes of ``Init.landlock_scoped`` are in force.
    landlock_scoped: bool = False


class Call(_Msg, tag="call"):
    """A model call made by the block (llm_query, llm_query_batched, rlm_query)."""

    id: int
    method: str
    # Only what the worker's functions send (prompt, prompts, model, context; search's
    # query and k; grep's pattern and max_matches): a forged
    # frame cannot smuggle deep structures past the decoder.
    params: dict[str, str | int | float | bool | list[str] | None]


class Done(_Msg, tag="done"):
    """The block finished: its captured output, its error text, and FINAL if it was called."""

    output: str
    error: str | None = None
    final: str | None = None
    #: Sub-call prompts the worker refused without sending (``Init.sub_prompt``); the
    #: worker's own word, for the trace only.
    refused_calls: int = 0


class Partial(_Msg, tag="partial"):
    """The answer to Flush: the output of the running block so far."""

    output: str


class VarText(_Msg, tag="vartext"):
    """The answer to GetVar; ``text`` None when there is no such variable."""

    text: str | None = None


ToWorker = Init | Exec | GetVar | Flush | CallReply
ToDaemon = Ready | Call | Done | Partial | VarText

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_daemon = msgspec.msgpack.Decoder(ToDaemon)


def encode(msg: _Msg) -> bytes:
    """One frame (header + body) for ``msg``."""
    body = _encoder.encode(msg)
    if len(body) > MAX_FRAME_CEILING:
        raise ChannelError(f"message of {len(body)} bytes does not fit in one frame")
    return HEADER.pack(len(body)) + body


def decode_to_worker(body: bytes) -> ToWorker:
    """Decode a frame body the daemon sent."""
    try:
        return _to_worker.decode(body)
    except msgspec.DecodeError as exc:
        raise ChannelError(f"bad message from daemon: {exc}") from None


def decode_to_daemon(body: bytes) -> ToDaemon:
    """Decode a frame body the worker sent; raises ChannelError on anything unexpected.

    The frame is hostile: besides malformed and ill-typed ones (DecodeError), a frame
    nested deeper than the interpreter's recursion limit raises RecursionError and a huge
    one MemoryError; each of them is the worker's fault and ends only the worker.
    """
    try:
        return _to_daemon.decode(body)
    except msgspec.DecodeError as exc:
        raise ChannelError(f"bad message from worker: {exc}") from None
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        raise ChannelError(
            f"bad message from worker: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def check_length(length: int, max_frame_bytes: int) -> None:
    """Refuse a frame longer than the limit before reading its body."""
    if length > max_frame_bytes:
        raise ChannelError(
            f"frame of {length} bytes exceeds the limit of {max_frame_bytes} bytes "
            "(limits.max_frame_bytes)"
        )


class BlockingChannel:
    """The worker's end: blocking reads and writes on the inherited socket."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes

    def send(self, msg: _Msg) -> None:
        """Send one message (callers serialise sends with their own lock)."""
        self.sock.sendall(encode(msg))

    def recv(self) -> ToWorker:
        """Block for the next message; ChannelError when the daemon hung up."""
        header = self._read_exact(HEADER.size)
        (length,) = HEADER.unpack(header)
        check_length(length, self.max_frame_bytes)
        return decode_to_worker(self._read_exact(length))

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ChannelError("daemon closed the channel")
            got += k
        return bytes(buf)
