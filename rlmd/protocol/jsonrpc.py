"""JSON-RPC 2.0 dispatch: msgspec as the codec, jsonrpcserver's result types for handlers.

Handlers are registered in a method table (``dict[str, Method]``); each names a msgspec
Struct for its by-name params, so validation is one ``msgspec.convert`` call instead of
jsonschema.  A handler returns jsonrpcserver's ``Success(value)``/``Error(code, msg, data)``
or a plain value, or raises :class:`~rlmd.protocol.errors.AppError`.  Synchronous handlers
are answered inline (the fast path); coroutine handlers make the dispatch return an
awaitable, which the server runs as a task.

Batches are split here, element by element, because jsonrpcserver 5.0.9 answers the
spec's batch examples (``[1]``, ``[1,2,3]``, mixed batches) with a single -32600.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from jsonrpcserver.exceptions import JsonRpcError
from jsonrpcserver.result import ErrorResult, SuccessResult
from jsonrpcserver.sentinels import NODATA
from oslash.either import Left, Right

from .errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    AppError,
)

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    """Params of a method that takes none."""


# How a request is ordered against the earlier requests of its connection.  Clients such
# as socat scripts pipeline "put, then search" and expect the search to see the put, yet a
# running query must not block a later query/cancel on the same connection.
CHAIN = "chain"  # starts after earlier CHAIN requests finished; later ones wait for it
# Starts at once but is handed the earlier CHAIN requests as ``Request.after``; it awaits
# ``request.turn()`` before its real work, so it can register itself first (query/run
# registers its job id so that a query/cancel can find it while it waits).  Nothing
# waits for it.
AFTER = "after"
FREE = "free"  # runs at once (status, cancel)


class Method(msgspec.Struct, frozen=True):
    """One entry of the method table."""

    func: Callable[..., Any]
    params: type = NoParams
    is_async: bool = False
    ordering: str = CHAIN

    @classmethod
    def of(cls, func: Callable[..., Any], params: type = NoParams, ordering: str = CHAIN) -> Method:
        return cls(func, params, inspect.iscoroutinefunction(func), ordering)


class Request(msgspec.Struct, frozen=True):
    """What a handler learns about the request besides its params."""

    method: str
    id: Any
    is_notification: bool
    after: Any = None  # AFTER methods: the earlier request to let finish (see turn())

    async def turn(self) -> None:
        """Wait until the earlier ordered requests of this connection have finished."""
        if self.after is not None:
            await asyncio.wait([self.after])


def _error(code: int, message: str, id_: Any, data: Any = NODATA) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not NODATA:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": id_}


def _success(result: Any, id_: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "result": result, "id": id_}


def encode(message: Any) -> bytes:
    """Encode one outgoing message (a response, a batch or a notification)."""
    return _encoder.encode(message)


def _valid_id(value: Any) -> bool:
    # Strings, numbers and null; a bool is a JSON literal, not a number.
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


class Dispatcher:
    """Turns request bytes into response bytes using a method table.

    ``context`` is passed to every handler as its first argument: the server gives the
    connection's call context so that handlers can send notifications back.
    """

    def __init__(self, methods: dict[str, Method]) -> None:
        self.methods = methods

    def dispatch(self, body: bytes, context: Any) -> bytes | Awaitable[bytes | None] | None:
        """Answer one frame: a response, ``None`` (notifications only), or an awaitable."""
        try:
            message = _decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            return encode(_error(PARSE_ERROR, f"Parse error: {exc}", None))
        except RecursionError:
            # msgspec stops at the interpreter's recursion limit; without this the error
            # escaped into the transport and closed the connection with no answer.
            return encode(
                _error(
                    PARSE_ERROR,
                    "Parse error: JSON nested too deeply (more than about "
                    f"{sys.getrecursionlimit()} levels); flatten the message",
                    None,
                    {"kind": "too_deep"},
                )
            )
        if isinstance(message, list):
            if not message:
                return encode(_error(INVALID_REQUEST, "Invalid Request: empty batch", None))
            return self._batch(message, context)
        out = self._one(message, context)
        if out is None:
            return None
        if isinstance(out, dict):
            return encode(out)
        return _encode_later(out)

    def _batch(self, items: list[Any], context: Any) -> bytes | Awaitable[bytes | None] | None:
        answers: list[Any] = []
        pending = False
        for item in items:
            out = self._one(item, context)
            if out is not None:
                answers.append(out)
                pending = pending or not isinstance(out, dict)
        if not answers:
            return None
        if not pending:
            return encode(answers)
        return _gather_batch(answers)

    def _one(self, msg: Any, context: Any) -> dict[str, Any] | Awaitable[Any] | None:
        if not isinstance(msg, dict):
            return _error(INVALID_REQUEST, "Invalid Request: expected a JSON object", None)
        has_id = "id" in msg
        id_ = msg.get("id")
        if has_id and not _valid_id(id_):
            return _error(
                INVALID_REQUEST, "Invalid Request: id must be a string, number or null", None
            )
        name = msg.get("method")
        if msg.get("jsonrpc") != "2.0" or not isinstance(name, str):
            why = (
                'jsonrpc must be "2.0"'
                if msg.get("jsonrpc") != "2.0"
                else "method must be a string"
            )
            return _error(INVALID_REQUEST, f"Invalid Request: {why}", id_)
        method = self.methods.get(name)
        if method is None:
            if not has_id:
                return None
            return _error(METHOD_NOT_FOUND, "Method not found", id_, {"method": name})
        raw = msg.get("params", {})
        if isinstance(raw, list) and not raw:
            raw = {}
        if not isinstance(raw, dict):
            if not has_id:
                return None
            return _error(
                INVALID_PARAMS,
                "Invalid params: params must be an object of named parameters",
                id_,
            )
        try:
            params = msgspec.convert(raw, method.params)
        except msgspec.ValidationError as exc:
            if not has_id:
                return None
            return _error(INVALID_PARAMS, f"Invalid params: {exc}", id_)
        req = Request(name, id_, not has_id)
        prev = getattr(context, "chain", None) if method.ordering != FREE else None
        if prev is not None and prev.done():
            prev = None
        if prev is None and not method.is_async:
            return _finish(_call_sync(method, context, req, params), req)
        if method.ordering == AFTER:
            req = msgspec.structs.replace(req, after=prev)
            prev = None
        task = asyncio.ensure_future(self._call_async(method, context, req, params, prev))
        if method.ordering == CHAIN and hasattr(context, "chain"):
            context.chain = task
        return task

    async def _call_async(
        self, method: Method, context: Any, req: Request, params: Any, prev: Any
    ) -> Any:
        if prev is not None:
            await asyncio.wait([prev])  # its outcome is its own; only the order matters here
        if not method.is_async:
            return _finish(_call_sync(method, context, req, params), req)
        try:
            result = await method.func(context, req, params)
        except (AppError, JsonRpcError) as exc:
            result = _as_error(exc)
        except Exception as exc:  # a bug in a handler must not take the connection down
            log.exception("internal error in %s", req.method)
            result = Left(ErrorResult(INTERNAL_ERROR, f"Internal error: {exc}", NODATA))
        return _finish(result, req)


def _call_sync(method: Method, context: Any, req: Request, params: Any) -> Any:
    try:
        return method.func(context, req, params)
    except (AppError, JsonRpcError) as exc:
        return _as_error(exc)
    except Exception as exc:
        log.exception("internal error in %s", req.method)
        return Left(ErrorResult(INTERNAL_ERROR, f"Internal error: {exc}", NODATA))


def _as_error(exc: AppError | JsonRpcError) -> Any:
    if isinstance(exc, AppError):
        e = exc.to_error()
        return Left(ErrorResult(e["code"], e["message"], e["data"]))
    return Left(ErrorResult(exc.code, exc.message, exc.data))


def _finish(result: Any, req: Request) -> dict[str, Any] | None:
    if req.is_notification:
        return None
    if isinstance(result, Right):
        value = result._value
        return _success(value.result if isinstance(value, SuccessResult) else value, req.id)
    if isinstance(result, Left):
        err: ErrorResult = result._error
        return _error(err.code, err.message, req.id, err.data)
    # A plain return value is a success: handlers need not wrap every result.
    return _success(result, req.id)


async def _encode_later(pending: Awaitable[Any]) -> bytes | None:
    out = await pending
    return None if out is None else encode(out)


async def _gather_batch(answers: list[Any]) -> bytes | None:
    # Async elements of one batch run concurrently; the batch is answered when all are done.
    slots = [i for i, a in enumerate(answers) if not isinstance(a, dict)]
    results = await asyncio.gather(*(answers[i] for i in slots))
    for i, r in zip(slots, results, strict=True):
        answers[i] = r
    done = [a for a in answers if a is not None]
    return encode(done) if done else None
