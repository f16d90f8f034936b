"""Params and results of the JSON-RPC methods, as msgspec Structs.

Params forbid unknown fields, so a misspelt parameter is an ``Invalid params`` error that
names it rather than a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..jobs import MAX_JOB_ID_CHARS

# A client-chosen job id: bounded, because every event echoes it and the daemon keeps it.
JobId = Annotated[str, msgspec.Meta(max_length=MAX_JOB_ID_CHARS)]


class _Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ContextPutParams(_Params):
    name: str
    text: str | None = None
    path: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    append: bool = False
    max_file_bytes: int | None = None


class ContextNameParams(_Params):
    name: str


class ContextPeekParams(_Params):
    name: str
    start: int = 0
    end: int | None = None


class ContextSearchParams(_Params):
    """``mode: "regex"`` (the default) takes ``pattern``; ``mode: "ranked"`` takes
    ``query`` (words or a question) and returns the ``k`` best passages."""

    name: str
    pattern: str | None = None
    max_matches: int = 100
    mode: Literal["regex", "ranked"] = "regex"
    query: str | None = None
    k: int = 10


class JobParams(_Params):
    job: JobId


class TraceParams(_Params):
    job: str | None = None


class ProviderBrief(msgspec.Struct):
    name: str
    kind: str
    healthy: bool
    in_flight: int
    capacity: int


class DamagedBrief(msgspec.Struct):
    """A context the store cannot read, and what to do (``damaged``)."""

    name: str
    damaged: str


class DaemonStatus(msgspec.Struct):
    version: str
    pid: int
    uptime_s: float
    contexts: int
    providers: list[ProviderBrief]
    socket: str
    state_dir: str
    jobs: int
    sandbox: dict
    embedded: str
    queries_running: int = 0  # admitted query/run (limits.max_concurrent_queries)
    queries_queued: int = 0  # waiting for a slot
    damaged_contexts: list[DamagedBrief] = []


# --- REPL sessions and single model calls (repl/*, llm/query) ------------------------


class ReplOpenParams(_Params):
    context: str | None = None  # a stored context's name; None: a REPL with no context


class ReplExecParams(_Params):
    session: str
    code: str
    timeout_s: float | None = None  # default: limits.cell_timeout_s


class ReplSessionParams(_Params):
    session: str


class LlmQueryParams(_Params):
    prompt: str
    model: str | None = None  # default: [models] sub
