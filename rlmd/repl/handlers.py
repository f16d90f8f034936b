"""The JSON-RPC handlers of repl/open, repl/exec, repl/close and repl/list.

Plain functions over a :class:`~rlmd.repl.registry.ReplRegistry`; the method table binds
the registry (``functools.partial``).  ``conn`` is the calling connection: the sessions
it opens close with it.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from rlmd.protocol.errors import BAD_INPUT, NOT_FOUND, UNAVAILABLE, AppError
from rlmd.protocol.jsonrpc import AFTER, FREE, Method
from rlmd.protocol.schema import LlmQueryParams, ReplExecParams, ReplOpenParams, ReplSessionParams
from rlmd.repl.registry import ExecReply, Opened, ReplRegistry, ReplRegistryError
from rlmd.repl.sandbox import SandboxUnavailable
from rlmd.repl.session import WorkerError

if TYPE_CHECKING:
    from rlmd.app import App

_CODES = {"not_found": NOT_FOUND, "too_many_sessions": UNAVAILABLE}


def _app_error(exc: ReplRegistryError) -> AppError:
    return AppError(exc.kind, exc.message, code=_CODES.get(exc.kind, BAD_INPUT))


async def repl_open(reg: ReplRegistry, conn: Any, req: Any, p: ReplOpenParams) -> Opened:
    """``repl/open {context}`` → ``{session, context, version}``."""
    await req.turn()  # a context/put sent just before on this connection lands first
    owner = conn if hasattr(conn, "is_open") else None
    try:
        return await reg.open(p.context, owner)
    except ReplRegistryError as exc:
        raise _app_error(exc) from None
    except (SandboxUnavailable, WorkerError) as exc:
        msg = f"cannot start a REPL worker: {exc}"
        raise AppError("repl_unavailable", msg, code=UNAVAILABLE) from None


async def repl_exec(reg: ReplRegistry, conn: Any, req: Any, p: ReplExecParams) -> ExecReply:
    """``repl/exec {session, code, timeout_s?}`` → ``{stdout, error, truncated, elapsed_s}``."""
    try:
        return await reg.execute(p.session, p.code, p.timeout_s)
    except ReplRegistryError as exc:
        raise _app_error(exc) from None
    except WorkerError as exc:
        raise AppError("repl_unavailable", str(exc), code=UNAVAILABLE) from None


async def repl_close(reg: ReplRegistry, conn: Any, req: Any, p: ReplSessionParams) -> Any:
    """``repl/close {session}`` → ``{closed: bool}``."""
    return {"closed": await reg.close(p.session)}


def repl_list(reg: ReplRegistry, conn: Any, req: Any, p: Any) -> Any:
    """``repl/list`` → ``{sessions: [{session, context, version, idle_s, busy, execs}]}``."""
    return {"sessions": reg.list()}


def routes(app: App) -> dict[str, Method]:
    """The ``repl/*`` family, and ``llm/query`` (one sub-model call, as a session makes)."""
    from rlmd.llm import llm_query

    reg = app.repl
    assert reg is not None, "App.assemble always makes the REPL registry"
    return {
        "repl/open": Method.of(partial(repl_open, reg), ReplOpenParams, ordering=AFTER),
        "repl/exec": Method.of(partial(repl_exec, reg), ReplExecParams, ordering=FREE),
        "repl/close": Method.of(partial(repl_close, reg), ReplSessionParams, ordering=FREE),
        "repl/list": Method.of(partial(repl_list, reg), ordering=FREE),
        "llm/query": Method.of(partial(llm_query, app.models.pool), LlmQueryParams, ordering=FREE),
    }
