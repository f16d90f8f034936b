"""JSON-RPC error codes and the application errors every part of the daemon raises.

Application errors use codes -32000..-32099 with a human-readable ``message`` (what was
wrong and what to do) and a machine-readable ``data.kind``.
"""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Application codes, one per family of failure so that scripts can branch on the code too.
APP_ERROR = -32000  # generic
NOT_FOUND = -32001  # a named thing (context, job, trace) does not exist
BAD_INPUT = -32002  # params well-typed but unusable (bad regex, bad range, bad path)
MODEL_ERROR = -32003  # every provider failed or none serves the model
BUDGET_EXCEEDED = -32004  # iterations, sub-calls, time or cost ran out
CANCELLED = -32005  # query/cancel or the client went away
UNAVAILABLE = -32006  # a part is not installed or not configured (embedded model)
SHUTTING_DOWN = -32007  # the daemon is draining
DAMAGED = -32010  # stored state is broken beyond repair here (drop the context, put it again)


class AppError(Exception):
    """An error answered to the client as ``{code, message, data: {kind, ...}}``."""

    def __init__(self, kind: str, message: str, *, code: int = APP_ERROR, **data: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.data = data

    def to_error(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "data": {"kind": self.kind, **self.data},
        }
