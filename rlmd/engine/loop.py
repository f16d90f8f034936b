"""The RLM loop: a root model writes ```repl code over the context until it answers.

One ``Engine`` serves every query of the daemon; ``Engine.run`` is one query.  A turn:

1. the root model answers, streamed (``root_delta`` events); the stream is cut at the
   closing fence of the first runnable block (the model would otherwise invent its
   output), and that block starts running at that very moment (*pipelining*);
2. the block runs in the query's REPL worker (``code``/``output`` events); what it printed
   goes back, truncated, as the next user message; the model's turns stay in the
   conversation;
3. the loop ends at ``FINAL(...)``/``FINAL_VAR(...)`` (in prose or called in code).

Sub-calls from the REPL (``llm_query``, ``llm_query_batched``, ``rlm_query``) go to the
pool; ``rlm_query`` runs a nested loop while depth allows.  Budgets (iterations, sub-calls,
time, cost) end the query with an ``EngineError`` carrying the best partial answer.
Cancelling the task that runs ``run`` stops the stream, kills the worker (``close`` in a
``finally``) and abandons the sub-calls.  Every step is appended to the query's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlmd.cache import QueryCaching
from rlmd.config import Config
from rlmd.engine import prompts
from rlmd.engine.parse import (
    Final,
    ParsedReply,
    StreamCutter,
    find_final,
    non_answer_reason,
    parse_reply,
    sole_final,
    truncate_output,
    unsupported_words,
)
from rlmd.engine.trace import TraceWriter, prune_traces, trace_path
from rlmd.engine.types import EngineError, QueryOptions, QueryParams, QueryResult, Tokens
from rlmd.protocol.errors import AppError
from rlmd.providers.base import ChatRequest, ChatResult, Message, ProviderError
from rlmd.repl.sandbox import SandboxUnavailable
from rlmd.repl.session import ReplSession, WorkerError
from rlmd.store.store import StoreError

Emit = Callable[[dict[str, Any]], None]

# Run once in every fresh worker before the model's first block.
REPL_SETUP = "import re, json, math, collections, itertools"
PARTIAL_CHARS = 4000  # the longest partial answer an error carries
HEAD_CHARS = 1200  # how much of the context is peeked for its description


@dataclass(frozen=True)
class Budget:
    """The effective limits of one query (config ``[limits]`` lowered by its options)."""

    max_iterations: int
    max_depth: int
    max_sub_calls: int
    timeout_s: float
    max_cost: float | None
    output_chars: int
    cell_timeout_s: float
    pipeline: bool
    output_chars_explicit: bool = False  # set by the query: no per-model default applies


@dataclass
class _State:
    """Counters shared by a query and its nested loops."""

    job: str
    budget: Budget
    root_model: str
    sub_model: str
    trace: TraceWriter
    emit: Emit
    t0: float = field(default_factory=time.monotonic)
    iterations: int = 0
    sub_calls: int = 0
    cached_calls: int = 0
    root_tokens: Tokens = field(default_factory=Tokens)
    sub_tokens: Tokens = field(default_factory=Tokens)
    cost: float = 0.0
    max_depth_seen: int = 1
    partial: str = ""
    last_output: str = ""
    # Set by a sub-call that ran out of budget; the loop raises it after the block.
    budget_error: EngineError | None = None
    # The query's caches (semantic answer, exact-cache bypass, speculative prefetch).
    caching: QueryCaching | None = None
    # "rlm-nosub": the REPL's sub-model functions raise instead of calling a model.
    nosub: bool = False

    def tokens(self) -> Tokens:
        return Tokens(
            input=self.root_tokens.input + self.sub_tokens.input,
            output=self.root_tokens.output + self.sub_tokens.output,
        )

    def best_partial(self) -> str:
        text = self.partial.strip() or self.last_output.strip()
        return text if len(text) <= PARTIAL_CHARS else text[:PARTIAL_CHARS] + " …"

    def progress(self) -> dict[str, Any]:
        t = self.tokens()
        return {
            "kind": "progress",
            "iteration": self.iterations,
            "sub_calls": self.sub_calls,
            "tokens": {"input": t.input, "output": t.output},
            "cost": round(self.cost, 6),
            "elapsed_s": round(time.monotonic() - self.t0, 3),
        }


class _SubBudgetExceeded(Exception):
    """Raised into the REPL's call when the query's sub-call or cost budget is gone."""


def resolve_budget(config: Config, opts: QueryOptions) -> Budget:
    """The query's limits: options may lower ``[limits]``, never raise them."""
    lim = config.limits

    def lowered(name: str, value: float | None, ceiling: float | None, minimum: float) -> Any:
        if value is None:
            return ceiling
        if value < minimum:
            raise EngineError("bad_params", f"options.{name} must be at least {minimum:g}")
        if ceiling is not None and value > ceiling:
            raise EngineError(
                "bad_params",
                f"options.{name} = {value:g} is above the daemon's limit {ceiling:g}; "
                f"raise limits.{name} in the config to allow it",
            )
        return value

    output_chars = lim.output_chars if opts.output_chars is None else opts.output_chars
    if output_chars < 200:
        raise EngineError("bad_params", "options.output_chars must be at least 200")
    return Budget(
        max_iterations=int(lowered("max_iterations", opts.max_iterations, lim.max_iterations, 1)),
        max_depth=int(lowered("max_depth", opts.max_depth, lim.max_depth, 1)),
        max_sub_calls=int(lowered("max_sub_calls", opts.max_sub_calls, lim.max_sub_calls, 0)),
        timeout_s=float(lowered("timeout_s", opts.timeout_s, lim.timeout_s, 0.001)),
        max_cost=lowered("max_cost", opts.max_cost, lim.max_cost, 0.0),
        output_chars=output_chars,
        cell_timeout_s=lim.cell_timeout_s,
        pipeline=True if opts.pipeline is None else opts.pipeline,
        output_chars_explicit=opts.output_chars is not None,
    )


class Engine:
    """Runs queries.  Holds no per-query state: each ``run`` builds its own."""

    def __init__(
        self, *, config: Config, pool: Any, store: Any, state_dir: Path, cache: Any = None
    ) -> None:
        self._config = config
        self._pool = pool
        self._cache = cache  # rlmd.cache.CacheService, or None
        self._store = store
        self._state_dir = Path(state_dir)
        # Closers of workers whose query was torn down while they were still starting.
        self._background: set[asyncio.Future[None]] = set()
        self._running_traces: set[Path] = set()  # never pruned while their query runs

    # ------------------------------------------------------------------ one query

    async def run(self, params: QueryParams, job: str, emit: Emit) -> QueryResult:
        """Answer ``params.query``; events go to ``emit``; raise ``EngineError`` on failure."""
        budget = resolve_budget(self._config, params.options)
        if not params.query.strip():
            raise EngineError("bad_params", "query must not be empty")
        if params.context is not None and params.text is not None:
            raise EngineError(
                "bad_params", "give either `context` (a stored name) or `text`, not both"
            )
        try:
            root_model = params.options.root_model or self._pool.model_for("root")
            sub_model = params.options.sub_model or self._pool.model_for("sub")
        except ProviderError as exc:
            raise EngineError("model_error", str(exc)) from None
        path = trace_path(self._state_dir, job)
        writer = TraceWriter(path, secrets=self._secrets())
        self._running_traces.add(path)
        state = _State(
            job=job,
            budget=budget,
            root_model=root_model,
            sub_model=sub_model,
            trace=writer,
            emit=emit,
            nosub=params.options.mode == "rlm-nosub",
        )
        mode = params.options.mode or "rlm"
        scratch = self._state_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="query-", dir=scratch))
        pins = contextlib.ExitStack()
        try:
            try:
                async with asyncio.timeout(budget.timeout_s) as deadline:
                    ctx_path, desc = await self._resolve_context(params, work, pins)
                    writer.write(
                        "start",
                        job=job,
                        query=params.query,
                        context=params.context or ("(inline text)" if params.text else None),
                        context_chars=desc.chars if desc else 0,
                        root_model=root_model,
                        sub_model=sub_model,
                        mode=mode,
                        budget=dataclasses.asdict(budget),
                    )
                    caching = QueryCaching.for_query(
                        self._cache,
                        self._pool,
                        params=params,
                        context_path=ctx_path,
                        # Answers of the compared methods never stand in for each other.
                        root_model=root_model if mode == "rlm" else f"{root_model}|{mode}",
                        sub_model=sub_model,
                        emit=emit,
                    )
                    state.caching = caching
                    async with caching:
                        cached = await caching.cached_answer()
                        if cached is not None:
                            state.cached_calls += 1
                            writer.write("final", depth=1, answer=cached, how="cached")
                            answer, finish = cached, "cached"
                        elif mode == "base":
                            answer, finish = await self._base(
                                state, params, ctx_path, desc, emit=emit
                            )
                        else:
                            answer, finish = await self._loop(
                                state,
                                query=params.query,
                                context_path=ctx_path,
                                desc=desc,
                                depth=1,
                                work=work,
                                emit=emit,
                            )
                            t = state.tokens()
                            await caching.remember(
                                answer,
                                finish=finish,
                                job=job,
                                tokens_in=t.input,
                                tokens_out=t.output,
                                cost=state.cost,
                                elapsed_s=time.monotonic() - state.t0,
                            )
                    self._write_end(state)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise EngineError(
                    "timeout",
                    f"the query ran out of time after {budget.timeout_s:g} s "
                    "(options.timeout_s / limits.timeout_s)",
                    state.best_partial(),
                ) from None
        except AppError as exc:
            writer.write(
                "error", kind=exc.kind, message=exc.message, partial=getattr(exc, "partial", "")
            )
            self._write_end(state)
            raise
        except asyncio.CancelledError:
            writer.write("error", kind="cancelled", message="the query was cancelled")
            self._write_end(state)
            raise
        except BaseException as exc:
            writer.write("error", kind="internal", message=repr(exc))
            self._write_end(state)
            raise
        finally:
            writer.close()
            self._running_traces.discard(path)
            await asyncio.to_thread(pins.close)
            await asyncio.to_thread(shutil.rmtree, work, True)
            await asyncio.to_thread(
                prune_traces,
                self._state_dir,
                keep=self._config.traces.keep,
                max_bytes=self._config.traces.max_mb * 1024 * 1024,
                protect=frozenset(self._running_traces),
            )
        elapsed = time.monotonic() - state.t0
        result = QueryResult(
            answer=answer,
            job=job,
            iterations=state.iterations,
            sub_calls=state.sub_calls,
            tokens=state.tokens(),
            cost=round(state.cost, 6),
            elapsed_s=round(elapsed, 3),
            trace=str(path),
            root_model=root_model,
            sub_model=sub_model,
            root_tokens=state.root_tokens,
            sub_tokens=state.sub_tokens,
            cached_calls=state.cached_calls,
            depth=state.max_depth_seen,
            finish=finish,
        )
        emit(state.progress())
        emit({"kind": "final", "answer": answer})
        return result

    def _write_end(self, state: _State) -> None:
        t = state.tokens()
        state.trace.write(
            "end",
            iterations=state.iterations,
            sub_calls=state.sub_calls,
            tokens={"input": t.input, "output": t.output},
            cost=state.cost,
            elapsed_s=round(time.monotonic() - state.t0, 3),
        )

    def _secrets(self) -> list[str]:
        names = [p.api_key_env for p in self._config.providers if p.api_key_env]
        return [v for n in names if (v := os.environ.get(n))]

    async def _resolve_context(
        self, params: QueryParams, work: Path, pins: contextlib.ExitStack
    ) -> tuple[Path | None, prompts.ContextDescription | None]:
        """The file the worker maps and its description: a stored context, a text, none."""
        if params.text is not None:
            path = work / "context.txt"
            await asyncio.to_thread(path.write_text, params.text, "utf-8")
            return path, prompts.describe_text(params.text)
        if params.context is None:
            return None, None
        return await asyncio.to_thread(self._describe_stored, params.context, pins)

    def _describe_stored(
        self, name: str, pins: contextlib.ExitStack
    ) -> tuple[Path, prompts.ContextDescription]:
        # Runs in a thread: the store is synchronous.  The version is pinned for the whole
        # query, so a put meanwhile cannot pull the text from under the worker.
        try:
            pinned = pins.enter_context(self._store.pin(name))
            head = self._store.peek(name, 0, HEAD_CHARS)
        except StoreError as exc:
            if exc.kind == "not_found":
                raise EngineError(
                    "context_not_found",
                    f"no context named {name!r}; `context/list` shows the stored ones",
                ) from None
            raise EngineError("context_error", f"context {name!r}: {exc.message}") from None
        desc = prompts.ContextDescription(
            # The daemon stores an inline ``text`` under a "_query:<job>" name: not the
            # model's business.
            name="" if name.startswith("_query:") else name,
            chars=pinned.info.chars,
            lines=pinned.info.lines,
            head=prompts.cut_head(head),
        )
        return pinned.path, desc

    # ------------------------------------------------------------------ "base" method

    async def _base(
        self,
        state: _State,
        params: QueryParams,
        context_path: Path | None,
        desc: prompts.ContextDescription | None,
        *,
        emit: Emit,
    ) -> tuple[str, str]:
        """The baseline the paper compares against: the text in the prompt, cut to fit."""
        window = params.options.window_tokens or self._window_tokens(state.root_model)
        # ~3 characters a token keeps the cut text inside the window for code and prose
        # alike; 1,024 tokens stay free for the instructions, question and answer.
        budget_chars = max(0, (window - 1024) * 3)
        text, cut = "", 0
        if context_path is not None and desc is not None and desc.chars:
            text = await asyncio.to_thread(_read_head, context_path, budget_chars)
            cut = max(0, desc.chars - len(text))
        system, user = prompts.base_messages(params.query, text, cut)
        messages = [Message("system", system), Message("user", user)]
        for m in messages:
            state.trace.write("message", depth=1, role=m.role, content=m.content, cut_chars=cut)
        reply, text_out, _ = await self._root_turn(
            state,
            messages,
            None,
            depth=1,
            turn=1,
            emit=emit,
            tools=False,  # type: ignore[arg-type]
        )
        answer = reply.final.value if reply.final is not None else text_out.strip()
        state.trace.write("final", depth=1, answer=answer, how="base")
        return answer, "base"

    def _window_tokens(self, model: str) -> int:
        emb = self._config.embedded
        if not self._config.providers and model in (emb.root_model, emb.sub_model):
            return emb.ctx_size
        return 32_768

    # ------------------------------------------------------------------ the loop

    async def _loop(
        self,
        state: _State,
        *,
        query: str,
        context_path: Path | None,
        desc: prompts.ContextDescription | None,
        depth: int,
        work: Path,
        emit: Emit,
    ) -> tuple[str, str]:
        """Run turns until an answer; return (answer, how it finished)."""
        b = state.budget
        model = state.root_model
        scratch = work / f"scratch-{depth}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        # The worker starts while the root model writes its first turn (a real model's
        # first turn takes longer than a worker start, so the start costs no time).
        session = _Repl(
            lambda: ReplSession.start(
                context_path=context_path,
                limits=self._config.limits,
                sandbox=self._config.sandbox,
                scratch_dir=scratch,
                on_call=self._on_call(state, depth, work, emit),
            ),
            state.trace,
            depth,
            self._background,
        )
        try:
            small = prompts.variant_for(model) == "small"
            session.output_chars = b.output_chars
            session.question = query
            if small and not b.output_chars_explicit:
                # A small model's window holds a few short outputs, not 20,000 characters.
                session.output_chars = min(b.output_chars, prompts.SMALL_OUTPUT_CHARS)
            history_chars = prompts.SMALL_HISTORY_CHARS if small else prompts.LARGE_HISTORY_CHARS
            system = prompts.system_prompt(
                model,
                nested_rlm=depth < b.max_depth,
                output_chars=session.output_chars,
                sub_calls=not state.nosub,
            )
            messages = [
                Message("system", system),
                Message("user", prompts.first_message(query, desc)),
            ]
            for m in messages:
                state.trace.write("message", depth=depth, role=m.role, content=m.content)
            rejected_final = False
            evidence_checked = False  # small models: one check that a short answer was seen
            bare_replies = 0
            for turn in range(1, b.max_iterations + 1):
                _compact(messages, history_chars)
                reply, text, exec_task = await self._root_turn(
                    state, messages, session, depth=depth, turn=turn, emit=emit
                )
                # Some APIs refuse an empty message; an empty reply still takes its turn.
                messages.append(Message("assistant", text or "(empty reply)"))
                final_text: str | None = None
                outputs: list[str] = []
                if reply.blocks:
                    bare_replies = 0
                    outputs, final_text = await self._run_blocks(
                        state, session, reply.blocks, exec_task, depth=depth, emit=emit
                    )
                    if depth == 1:
                        emit(state.progress())
                written = False  # the answer was written by the model, not computed
                if final_text is None and reply.final is not None:
                    written = reply.final.kind == "answer"
                    final_text, problem = await self._resolve_final(state, session, reply.final)
                    if problem is not None:
                        outputs.append(prompts.missing_variable(reply.final.value, problem))
                if final_text is not None:
                    reason = non_answer_reason(final_text)
                    missing: list[str] = []
                    if reason is None and small and written and not evidence_checked:
                        # What the model was shown of the text; not the question (or a hint
                        # quoting it), whose words (the needle's key) a guess likes to repeat.
                        head = [desc.head] if desc is not None else []
                        missing = unsupported_words(final_text, [*head, *session.printed])
                    if (reason is None or rejected_final) and not missing:
                        state.trace.write("final", depth=depth, answer=final_text, how="final")
                        return final_text, "final"
                    state.partial = final_text
                    if missing:
                        evidence_checked = True
                        outputs.append(prompts.unverified_answer(final_text, missing, query))
                    else:
                        rejected_final = True
                        outputs.append(prompts.not_an_answer(reason or ""))
                elif not reply.blocks and reply.final is None:
                    bare_replies += 1
                    prose = reply.prose.strip()
                    if bare_replies >= 2 and prose and non_answer_reason(prose) is None:
                        state.trace.write("final", depth=depth, answer=prose, how="reply")
                        return prose, "reply"
                    outputs.append(prompts.NO_CODE_NO_FINAL)
                feedback = "\n\n".join(outputs) if outputs else prompts.NO_CODE_NO_FINAL
                if small and reply.blocks:
                    feedback += "\n\n" + prompts.question_reminder(query)
                messages.append(Message("user", feedback))
                state.trace.write("message", depth=depth, role="user", content=feedback)
            return await self._last_chance(state, messages, session, depth=depth, emit=emit)
        finally:
            await session.close()

    async def _root_turn(
        self,
        state: _State,
        messages: list[Message],
        session: _Repl,
        *,
        depth: int,
        turn: int,
        emit: Emit,
        tools: bool = True,
    ) -> tuple[ParsedReply, str, asyncio.Task[tuple[list[str], str | None]] | None]:
        """One streamed root call; with pipelining the first block starts as it closes.

        Returns the parsed reply, the kept text, and the task already running its first
        block (or None).  The caller awaits that task via ``_run_blocks``.
        """
        b = state.budget
        if depth == 1:
            state.iterations += 1
        cutter = StreamCutter(stop_at_block=b.pipeline and tools, stop_at_final=True)
        exec_task: asyncio.Task[tuple[list[str], str | None]] | None = None
        loop = asyncio.get_running_loop()

        def on_delta(piece: str) -> bool:
            nonlocal exec_task
            kept, stop = cutter.feed(piece)
            if kept and depth == 1:
                emit({"kind": "root_delta", "text": kept})
            if stop and exec_task is None and tools:
                early = parse_reply(cutter.text)
                if early.blocks:
                    # Pipelining: the block runs while the stream is being closed.
                    exec_task = loop.create_task(
                        self._exec_blocks(state, session, early.blocks[:1], depth=depth, emit=emit)
                    )
            return stop

        req = ChatRequest(model=state.root_model, messages=tuple(messages))
        t0 = time.monotonic()
        try:
            result: ChatResult = await self._pool.chat(req, on_delta=on_delta, affinity=state.job)
        except ProviderError as exc:
            if exec_task is not None:
                exec_task.cancel()
            raise EngineError(
                "model_error",
                f"the root model {state.root_model!r} failed: {exc}",
                state.best_partial(),
            ) from None
        except BaseException:
            if exec_task is not None:
                exec_task.cancel()
            raise
        if not cutter.text and result.text:
            # A provider that does not stream (or a cache hit delivered at once).
            cutter.feed(result.text)
        text = cutter.text
        state.root_tokens.input += result.usage.input
        state.root_tokens.output += result.usage.output
        state.cost += result.cost
        state.trace.write(
            "message",
            depth=depth,
            role="assistant",
            content=text,
            iteration=turn,
            model=result.model,
            provider=result.provider,
            elapsed_s=round(time.monotonic() - t0, 4),
            ttft_s=round(result.ttft_s, 4),
            tokens_in=result.usage.input,
            tokens_out=result.usage.output,
            cost=result.cost,
            stopped=result.stopped,
            cached=result.cached,
        )
        if depth == 1:
            emit(state.progress())
        reply = parse_reply(text)
        if reply.prose.strip():
            state.partial = reply.prose.strip()
        if exec_task is not None and not reply.blocks:
            exec_task.cancel()  # cannot happen with a consistent parser; never leak it
            exec_task = None
        try:
            self._check_cost(state)
        except EngineError:
            if exec_task is not None:
                exec_task.cancel()
            raise
        return reply, text, exec_task

    async def _run_blocks(
        self,
        state: _State,
        session: _Repl,
        blocks: list[str],
        started: asyncio.Task[tuple[list[str], str | None]] | None,
        *,
        depth: int,
        emit: Emit,
    ) -> tuple[list[str], str | None]:
        """Run the reply's blocks (the first may already run); return outputs and a FINAL."""
        outputs: list[str] = []
        rest = blocks
        if started is not None:
            try:
                outs, final = await started
            finally:
                if not started.done():
                    started.cancel()
            outputs += outs
            rest = blocks[1:]
            if final is not None:
                return outputs, final
        if rest:
            outs, final = await self._exec_blocks(state, session, rest, depth=depth, emit=emit)
            outputs += outs
            if final is not None:
                return outputs, final
        return outputs, None

    async def _exec_blocks(
        self, state: _State, session: _Repl, blocks: list[str], *, depth: int, emit: Emit
    ) -> tuple[list[str], str | None]:
        """Run blocks in order until one calls FINAL; return the messages and the FINAL."""
        b = state.budget
        outputs: list[str] = []
        for code in blocks:
            emit({"kind": "code", "code": code, **_depth(depth)})
            state.trace.write("code", depth=depth, code=code)
            key = _normalize(code)
            notice = None
            if key in session.ran:
                notice = prompts.repeated_code(session.ran[key], session.question)
            elif session.last is not None and session.last[0] == key and session.last[1]:
                notice = prompts.repeated_failure(session.last[1])
            if notice is not None:
                emit({"kind": "output", "text": notice, "repeated": True, **_depth(depth)})
                state.trace.write("output", depth=depth, text=notice, repeated=True)
                outputs.append(notice)
                continue
            res = await session.execute(code, timeout_s=b.cell_timeout_s)
            if state.budget_error is not None:
                raise state.budget_error
            meant = sole_final(code)
            if res.final is None and res.error and meant is not None and meant.kind == "answer":
                # ``FINAL(It is 7 (seven))`` in a fence: valid Python that fails; a text answer.
                state.trace.write("output", depth=depth, text="", error=res.error, elapsed_s=0)
                return outputs, meant.value
            limit = session.output_chars or b.output_chars
            shown = truncate_output(res.output or "", limit)
            error = truncate_output(res.error, limit // 4) if res.error else None
            seen = shown + (f"\n{error}" if error else "")
            session.printed.append(seen)
            if seen.strip():
                state.last_output = seen
            emit(
                {
                    "kind": "output",
                    "text": seen,
                    "timed_out": bool(res.timed_out),
                    "restarted": bool(res.restarted),
                    "elapsed_s": round(res.elapsed_s, 4),
                    **_depth(depth),
                }
            )
            state.trace.write(
                "output",
                depth=depth,
                text=shown,
                error=error,
                timed_out=bool(res.timed_out),
                restarted=bool(res.restarted),
                elapsed_s=round(res.elapsed_s, 4),
                chars=len(res.output or ""),
            )
            outputs.append(
                prompts.output_message(
                    shown,
                    error=error,
                    timed_out=bool(res.timed_out),
                    restarted=bool(res.restarted),
                    cell_timeout_s=b.cell_timeout_s,
                )
            )
            if not (res.error or res.timed_out or res.restarted):
                session.ran[key] = shown
                session.last = (key, None)
            else:
                session.last = (key, _last_line(error or "it timed out"))
            if res.final is not None:
                return outputs, _final_text(res.final)
        return outputs, None

    async def _resolve_final(
        self, state: _State, session: _Repl, final: Final
    ) -> tuple[str | None, str | None]:
        """The answer a prose FINAL gives, or (None, what went wrong)."""
        if final.kind == "answer":
            return final.value, None
        if final.kind == "expr":
            # FINAL renders any value (str as is, tuples and dicts as JSON) in the worker.
            res = await session.execute(
                f"FINAL(({final.value}))", timeout_s=state.budget.cell_timeout_s
            )
            if res.final is not None:
                return _final_text(res.final), None
            problem = (res.error or "").strip() or "evaluating it gave nothing"
            return None, problem.splitlines()[-1]
        name = final.value
        value = await session.get_var(name)
        if value is None:
            return None, f"there is no variable named {final.value!r} in the REPL"
        return str(value), None

    async def _last_chance(
        self,
        state: _State,
        messages: list[Message],
        session: _Repl,
        *,
        depth: int,
        emit: Emit,
    ) -> tuple[str, str]:
        """At max_iterations: one more call, no tools, for the best answer so far."""
        messages.append(Message("user", prompts.LAST_CHANCE))
        state.trace.write("message", depth=depth, role="user", content=prompts.LAST_CHANCE)
        reply, _text, _ = await self._root_turn(
            state,
            messages,
            session,
            depth=depth,
            turn=state.budget.max_iterations + 1,
            emit=emit,
            tools=False,
        )
        answer: str | None = None
        if reply.final is None:
            reply.final = find_final(reply.prose, anywhere=True)
        if reply.final is not None and reply.final.kind == "answer":
            answer = reply.final.value
        elif reply.final is not None:
            answer, _ = await self._resolve_final(state, session, reply.final)
        elif not reply.blocks:
            answer = reply.prose.strip()
        if answer and non_answer_reason(answer) is None:
            state.trace.write("final", depth=depth, answer=answer, how="best_effort")
            return answer, "best_effort"
        if reply.prose.strip():
            state.partial = reply.prose.strip()
        raise EngineError(
            "max_iterations",
            f"no answer after {state.budget.max_iterations} iterations "
            "(options.max_iterations / limits.max_iterations); the partial answer is the "
            "model's last words",
            state.best_partial(),
        )

    # ------------------------------------------------------------------ sub-calls

    def _check_cost(self, state: _State) -> None:
        mc = state.budget.max_cost
        if mc is not None and state.cost > mc:
            raise EngineError(
                "max_cost",
                f"the query cost ${state.cost:.4f}, above its budget of ${mc:.4f} "
                "(options.max_cost / limits.max_cost)",
                state.best_partial(),
            )

    def _take_sub_calls(self, state: _State, n: int) -> None:
        """Count ``n`` sub-calls against the budget, or stop the query."""
        b = state.budget
        if state.budget_error is not None:
            raise _SubBudgetExceeded(state.budget_error.message)
        if state.sub_calls + n > b.max_sub_calls:
            state.budget_error = EngineError(
                "max_sub_calls",
                f"the code asked for {state.sub_calls + n} sub-calls, above the budget of "
                f"{b.max_sub_calls} (options.max_sub_calls / limits.max_sub_calls)",
                state.best_partial(),
            )
            raise _SubBudgetExceeded(state.budget_error.message)
        if b.max_cost is not None and state.cost > b.max_cost:
            state.budget_error = EngineError(
                "max_cost",
                f"the query cost ${state.cost:.4f}, above its budget of ${b.max_cost:.4f} "
                "(options.max_cost / limits.max_cost)",
                state.best_partial(),
            )
            raise _SubBudgetExceeded(state.budget_error.message)
        state.sub_calls += n

    def _on_call(self, state: _State, depth: int, work: Path, emit: Emit) -> Any:
        """The REPL's handler for ``llm_query``, ``llm_query_batched`` and ``rlm_query``."""

        async def on_call(fn: str, args: dict[str, Any]) -> Any:
            if state.nosub:
                raise RuntimeError(prompts.NO_SUB_CALLS_ERROR)
            model = args.get("model") or state.sub_model
            if fn == "llm_query":
                self._take_sub_calls(state, 1)
                if state.caching is not None:
                    state.caching.before_sub_calls([str(args["prompt"])], model)
                return await self._sub_call(state, fn, str(args["prompt"]), model, depth, emit)
            if fn == "llm_query_batched":
                prompts_ = [str(p) for p in args["prompts"]]
                if not prompts_:
                    return []
                self._take_sub_calls(state, len(prompts_))
                results: list[str] = [""] * len(prompts_)

                async def one(i: int, p: str) -> None:
                    results[i] = await self._sub_call(state, fn, p, model, depth, emit)

                if state.caching is not None:
                    state.caching.before_sub_calls(prompts_, model)
                async with asyncio.TaskGroup() as tg:
                    for i, p in enumerate(prompts_):
                        tg.create_task(one(i, p))
                if state.caching is not None and depth == 1:
                    # Prefetch the same template over the next chunks while the root thinks.
                    await state.caching.after_batch(prompts_, model)
                return results
            if fn == "rlm_query":
                self._take_sub_calls(state, 1)
                prompt = str(args["prompt"])
                sub_ctx = args.get("context")
                if depth >= state.budget.max_depth:
                    text = prompt if sub_ctx is None else f"{prompt}\n\n{sub_ctx}"
                    return await self._sub_call(state, fn, text, state.sub_model, depth, emit)
                return await self._nested(state, prompt, sub_ctx, depth + 1, work, emit)
            raise ValueError(f"unknown REPL call {fn!r}")

        return on_call

    async def _sub_call(
        self, state: _State, fn: str, prompt: str, model: str, depth: int, emit: Emit
    ) -> str:
        """One sub-model call; a failure becomes an error string in the answer's place."""
        call_id = uuid.uuid4().hex[:8]
        base = {"kind": "subcall", "id": call_id, "fn": fn, "model": model, **_depth(depth)}

        def report(status: str, event: dict[str, Any], trace: dict[str, Any]) -> None:
            # The client gets the event; the trace gets the same facts plus the texts.
            emit({**base, "prompt_chars": len(prompt), "status": status, **event})
            state.trace.write(
                "subcall",
                depth=depth,
                id=call_id,
                fn=fn,
                prompt_chars=len(prompt),
                status=status,
                **{"model": model, **event, **trace},
            )

        report("start", {}, {"prompt": prompt})
        t0 = time.monotonic()
        req = ChatRequest(model=model, messages=(Message("user", prompt),))
        try:
            r = await self._pool.chat(req)
        except ProviderError as exc:
            report("error", {"elapsed_s": round(time.monotonic() - t0, 4), "error": str(exc)}, {})
            return f"[{fn} error: {exc}]"
        elapsed = round(time.monotonic() - t0, 4)
        state.sub_tokens.input += r.usage.input
        state.sub_tokens.output += r.usage.output
        state.cost += r.cost
        if r.cached:
            state.cached_calls += 1
        report(
            "cached" if r.cached else "ok",
            {
                "elapsed_s": elapsed,
                "tokens": {"input": r.usage.input, "output": r.usage.output},
                "cost": r.cost,
                "answer_chars": len(r.text),
            },
            {
                "model": r.model,
                "provider": r.provider,
                "ttft_s": round(r.ttft_s, 4),
                "answer": r.text,
                "tokens_in": r.usage.input,
                "tokens_out": r.usage.output,
            },
        )
        mc = state.budget.max_cost
        if mc is not None and state.cost > mc and state.budget_error is None:
            state.budget_error = EngineError(
                "max_cost",
                f"the query cost ${state.cost:.4f}, above its budget of ${mc:.4f} "
                "(options.max_cost / limits.max_cost)",
                state.best_partial(),
            )
        return r.text

    async def _nested(
        self, state: _State, prompt: str, sub_ctx: str | None, depth: int, work: Path, emit: Emit
    ) -> str:
        """``rlm_query`` below the depth limit: a whole loop of its own on ``sub_ctx``."""
        call_id = uuid.uuid4().hex[:8]
        state.max_depth_seen = max(state.max_depth_seen, depth)
        base = {
            "kind": "subcall",
            "id": call_id,
            "fn": "rlm_query",
            "model": state.root_model,
            "depth": depth,
        }
        emit({**base, "prompt_chars": len(prompt), "status": "start"})
        t0 = time.monotonic()
        ctx_path: Path | None = None
        desc = None
        if sub_ctx:
            ctx_path = work / f"subcontext-{call_id}.txt"
            await asyncio.to_thread(ctx_path.write_text, sub_ctx, "utf-8")
            desc = prompts.describe_text(sub_ctx)
        saved_partial = state.partial

        def nested_emit(event: dict[str, Any]) -> None:
            # Nested loops show their code, output and sub-calls, never root text or final.
            if event.get("kind") in ("code", "output", "subcall"):
                emit(event)

        try:
            answer, _how = await self._loop(
                state,
                query=prompt,
                context_path=ctx_path,
                desc=desc,
                depth=depth,
                work=work,
                emit=nested_emit,
            )
        except EngineError as exc:
            if exc.kind in ("max_sub_calls", "max_cost", "timeout", "model_error"):
                state.budget_error = state.budget_error or exc
                raise _SubBudgetExceeded(exc.message) from None
            answer = f"[rlm_query error: {exc.message}]"
        finally:
            state.partial = saved_partial
        elapsed = round(time.monotonic() - t0, 4)
        emit({**base, "prompt_chars": len(prompt), "status": "ok", "elapsed_s": elapsed})
        return answer


class _Repl:
    """A REPL session started in the background, waited for at its first use.

    The start runs as its own task (shielded: a cancelled waiter must not interrupt a
    half-spawned worker); ``close`` waits for it to finish and kills the worker.
    """

    def __init__(
        self,
        start: Callable[[], Awaitable[ReplSession]],
        trace: TraceWriter,
        depth: int,
        background: set[asyncio.Future[None]],
    ) -> None:
        self._t0 = time.monotonic()
        self._background = background
        # Blocks run without error in this loop (normalized code -> what they printed):
        # small models re-run the same block instead of answering.
        self.ran: dict[str, str] = {}
        # The last block run and the error it ended with (None: it succeeded).
        self.last: tuple[str, str | None] | None = None
        self._needs_setup = True
        # This loop's cut for printed output (None: the query's ``output_chars``).
        self.output_chars: int | None = None
        # This loop's question, for the search hint sent when a block is repeated.
        self.question = ""
        # What this loop's blocks printed: the evidence a small model's answer is checked in.
        self.printed: list[str] = []
        self._trace = trace
        self._depth = depth
        self._task = asyncio.get_running_loop().create_task(start())
        self._task.add_done_callback(self._started)

    def _close_when_started(self, task: asyncio.Task[ReplSession]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._background.add(closer := asyncio.ensure_future(task.result().close()))
            closer.add_done_callback(self._background.discard)

    def _started(self, task: asyncio.Task[ReplSession]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self._trace.write(
            "repl",
            depth=self._depth,
            event="start",
            elapsed_s=round(time.monotonic() - self._t0, 4),
            protection=_layers(getattr(task.result(), "protection", None)),
        )

    async def _session(self) -> ReplSession:
        try:
            return await asyncio.shield(self._task)
        except (WorkerError, SandboxUnavailable) as exc:
            raise EngineError(
                "repl_unavailable", f"the REPL worker could not start: {exc}"
            ) from None

    async def execute(self, code: str, *, timeout_s: float) -> Any:
        session = await self._session()
        if self._needs_setup:
            # Models (small ones above all) use ``re`` and friends without importing them.
            await session.execute(REPL_SETUP, timeout_s=timeout_s)
            self._needs_setup = False
        res = await session.execute(code, timeout_s=timeout_s)
        if res.restarted:
            self._needs_setup = True
        return res

    async def get_var(self, name: str) -> str | None:
        return await (await self._session()).get_var(name)

    async def close(self) -> None:
        try:
            session = await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled():
                return
            # Cancelled again while the worker was still starting: kill it once it is up.
            self._task.add_done_callback(self._close_when_started)
            raise
        except Exception:
            return  # it never started: nothing to kill
        await session.close()


def _layers(protection: Any) -> str:
    """``bwrap+seccomp+rlimits``: the sandbox layers a worker runs under."""
    names = [n for n in ("bwrap", "seccomp", "rlimits") if getattr(protection, n, False)]
    return "+".join(names) or "none"


def _compact(messages: list[Message], max_chars: int) -> None:
    """Shorten old outputs when the conversation outgrows the model's window.

    The system prompt, the question and the last two user messages stay whole; older
    user messages (outputs, nudges) are cut to their head and tail, oldest first, until
    the conversation fits.  Assistant turns (the model's code and reasoning) stay whole.
    """
    total = sum(len(m.content) for m in messages)
    if total <= max_chars:
        return
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    for i in users[1:-2]:
        m = messages[i]
        short = truncate_output(m.content, prompts.COMPACT_OUTPUT_CHARS)
        if len(short) < len(m.content):
            total -= len(m.content) - len(short)
            messages[i] = Message("user", short)
        if total <= max_chars:
            return


def _read_head(path: Path, max_chars: int) -> str:
    """The first ``max_chars`` characters of a UTF-8 file, without reading the rest."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(max_chars)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text


def _normalize(code: str) -> str:
    """Code with blank lines and trailing spaces gone, to spot a block run twice."""
    return "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())


def _depth(depth: int) -> dict[str, int]:
    """Events of nested loops say their depth; the root's stay as the protocol shows."""
    return {} if depth == 1 else {"depth": depth}


def _final_text(final: Any) -> str:
    """A FINAL from the REPL: a string, or (kind, value) from some worker versions."""
    if isinstance(final, str):
        return final
    value = getattr(final, "value", None)
    if value is not None:
        return str(value)
    return str(final)
