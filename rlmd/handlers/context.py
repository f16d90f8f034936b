"""``context/*``: named contexts in the store.  Store work runs in threads."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from ..jobs import Notifier
from ..protocol.errors import BAD_INPUT, DAMAGED, NOT_FOUND, AppError
from ..protocol.jsonrpc import Method, NoParams, Request
from ..protocol.schema import (
    ContextNameParams,
    ContextPeekParams,
    ContextPutParams,
    ContextSearchParams,
)
from ..store.store import ContextInfo, ContextStore, PutResult, StoreError

if TYPE_CHECKING:
    from ..app import App

T = TypeVar("T")


def store_error(exc: StoreError) -> AppError:
    """The store's error as the client sees it (``not_found`` gets its own code)."""
    kind = getattr(exc, "kind", "store_error")
    code = {"not_found": NOT_FOUND, "damaged": DAMAGED}.get(kind, BAD_INPUT)
    return AppError(kind, str(getattr(exc, "message", exc)), code=code)


async def in_thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run store work off the event loop; its errors become application errors."""
    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except StoreError as exc:
        raise store_error(exc) from None


async def put(store: ContextStore, conn: Notifier, req: Request, p: ContextPutParams) -> PutResult:
    if (p.text is None) == (p.path is None):
        raise AppError(
            "bad_params",
            "context/put takes exactly one of `text` (inline text) or `path` "
            "(a file or directory on the daemon's machine)",
            code=BAD_INPUT,
        )
    if p.text is not None:
        if p.include or p.exclude:
            raise AppError("bad_params", "include/exclude apply only with `path`", code=BAD_INPUT)
        return await in_thread(store.put_text, p.name, p.text, append=p.append)
    kw: dict[str, Any] = {"include": p.include, "exclude": p.exclude, "append": p.append}
    if p.max_file_bytes is not None:
        kw["max_file_bytes"] = p.max_file_bytes
    path = await asyncio.to_thread(os.path.expanduser, p.path or "")
    return await in_thread(store.put_path, p.name, path, **kw)


def list_(store: ContextStore, conn: Notifier, req: Request, p: NoParams) -> list[ContextInfo]:
    # Per-query temporary contexts (query/run with `text`) are not the user's.
    return [c for c in store.list() if not c.name.startswith("_query:")]


async def peek(
    store: ContextStore, conn: Notifier, req: Request, p: ContextPeekParams
) -> dict[str, str]:
    end = p.end if p.end is not None else p.start + 4096
    return {"text": await in_thread(store.peek, p.name, p.start, end)}


async def search(
    store: ContextStore, conn: Notifier, req: Request, p: ContextSearchParams
) -> dict[str, list[Any]]:
    if p.mode == "ranked" or p.pattern is None:
        if p.query is None or p.pattern is not None:
            raise AppError(
                "bad_params",
                'context/search takes `pattern` (a regex), or `mode: "ranked"` with '
                "`query` (words or a question)",
                code=BAD_INPUT,
            )
        hits, indexed = await in_thread(store.search_ranked_ex, p.name, p.query, p.k)
        return {"matches": hits, "indexed": indexed}
    # A runaway pattern is stopped between search windows instead of holding a thread.
    matches = await in_thread(store.search, p.name, p.pattern, p.max_matches, timeout_s=60.0)
    return {"matches": matches}


async def info(
    store: ContextStore, conn: Notifier, req: Request, p: ContextNameParams
) -> ContextInfo:
    return await in_thread(store.info, p.name)


async def drop(
    store: ContextStore, conn: Notifier, req: Request, p: ContextNameParams
) -> dict[str, bool]:
    return {"dropped": await in_thread(store.drop, p.name)}


def routes(app: App) -> dict[str, Method]:
    s = app.store
    return {
        "context/put": Method.of(partial(put, s), ContextPutParams),
        "context/list": Method.of(partial(list_, s)),
        "context/info": Method.of(partial(info, s), ContextNameParams),
        "context/peek": Method.of(partial(peek, s), ContextPeekParams),
        "context/search": Method.of(partial(search, s), ContextSearchParams),
        "context/drop": Method.of(partial(drop, s), ContextNameParams),
    }
