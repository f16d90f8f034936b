"""The engine's data at its boundary: ``query/run`` params and result, and its error.

``QueryParams``/``QueryOptions`` are what a client sends (the wire contract fixes the
names; the extra options are additions), ``QueryResult`` is what ``query/run`` answers.
``EngineError`` is an ``AppError``: the server answers it as a JSON-RPC error whose
``data`` carries ``kind`` and ``partial`` (the best answer the query had when it stopped).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from rlmd.protocol.errors import (
    APP_ERROR,
    BAD_INPUT,
    BUDGET_EXCEEDED,
    MODEL_ERROR,
    NOT_FOUND,
    UNAVAILABLE,
    AppError,
)


class QueryOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Per-query settings.  Budgets may only lower the daemon's ``[limits]``."""

    max_iterations: int | None = None
    max_depth: int | None = None
    root_model: str | None = None
    sub_model: str | None = None
    timeout_s: float | None = None
    max_cost: float | None = None
    # Additions to the wire contract:
    max_sub_calls: int | None = None
    output_chars: int | None = None
    # Start a ```repl block the moment its closing fence streams in and stop the root's
    # generation there (default on; off only to measure what it saves).
    pipeline: bool | None = None
    # false: no cache lookups for this query (exact or semantic; fresh answers are still
    # stored).  false: no speculative prefetch.  None/true: the daemon's [cache] settings.
    cache: bool | None = None
    speculation: bool | None = None
    # How to answer, for comparing methods as the paper's Table 1 does: "rlm" (default),
    # "rlm-nosub" (the REPL loop without llm_query / rlm_query), "base" (the root model
    # reads the context directly, cut to its window as a user would have to).
    # "auto" (the default): a context that fits the root model's window comfortably is
    # shown whole in the first message (the REPL stays there), a longer one as "rlm".
    mode: Literal["auto", "rlm", "rlm-nosub", "base"] | None = None
    # "base" mode: the root model's window in tokens (default: the embedded model's
    # ctx_size when it serves the root model, else 32,768).
    window_tokens: int | None = None


class QueryParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """``query/run`` params: a question, and a named context, an inline text, or neither."""

    query: str
    context: str | None = None
    text: str | None = None
    job: str | None = None
    options: QueryOptions = msgspec.field(default_factory=QueryOptions)
    # Addition: the job id of an earlier query whose question, answer and sources this one
    # builds on (its context too, unless this one names one).
    follow_up: str | None = None


class Tokens(msgspec.Struct):
    input: int = 0
    output: int = 0


class Source(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A span of the context an answer rests on (character offsets, 1-based lines)."""

    start: int
    end: int
    line: int
    text: str
    file: str | None = None  # directory contexts: the file, and the line in it
    file_line: int | None = None


class QueryResult(msgspec.Struct, kw_only=True):
    """``query/run`` result; the first eight fields are the wire contract."""

    answer: str
    job: str
    iterations: int
    sub_calls: int
    tokens: Tokens
    cost: float
    elapsed_s: float
    trace: str
    # Additions:
    root_model: str = ""
    sub_model: str = ""
    root_tokens: Tokens = msgspec.field(default_factory=Tokens)
    sub_tokens: Tokens = msgspec.field(default_factory=Tokens)
    cached_calls: int = 0
    depth: int = 1  # deepest nested loop that ran (1: no rlm_query recursion)
    # How the answer came: "final" (FINAL/FINAL_VAR), "reply" (plain text accepted),
    # "best_effort" (asked for its best answer at max_iterations).
    finish: str = "final"
    # Where the answer's key facts stand in the context, found by the engine (not the
    # model's word); ``supported`` is false when no span holds them.
    sources: list[Source] = msgspec.field(default_factory=list)
    supported: bool = False
    # How the query started: "direct" (the whole context shown), "rlm" (described only).
    start: str = "rlm"
    answer_cut: bool = False  # the answer was longer than limits.answer_chars


# Error kinds (data.kind) the engine raises, with the JSON-RPC code for each.
ERROR_CODES: dict[str, int] = {
    "bad_params": BAD_INPUT,
    "context_not_found": NOT_FOUND,
    "context_error": APP_ERROR,
    "max_iterations": BUDGET_EXCEEDED,
    "max_sub_calls": BUDGET_EXCEEDED,
    "max_cost": BUDGET_EXCEEDED,
    "timeout": BUDGET_EXCEEDED,
    "model_error": MODEL_ERROR,
    "repl_unavailable": UNAVAILABLE,
    "follow_up_not_found": NOT_FOUND,
}


class EngineError(AppError):
    """A query that could not finish; ``partial`` is the best answer it had by then."""

    def __init__(self, kind: str, message: str, partial: str = "") -> None:
        super().__init__(kind, message, code=ERROR_CODES.get(kind, APP_ERROR), partial=partial)
        self.partial = partial
