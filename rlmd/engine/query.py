"""One query from start to end: ``Engine.run``.

It resolves the context (pinned for the query), decides how the loop starts (the whole
context shown when it fits the root model's window, "auto"; described only, "rlm"; or
the paper's "base" reading), puts the ranked passages for the question in the first
message, runs the loop, finds the answer's sources in the context, caps the answer, and
always leaves a trace.  Cancelling the task that runs ``run`` stops the stream, kills the
worker and abandons the sub-calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import msgspec

from rlmd.cache import CacheService, QueryCaching
from rlmd.config import Config
from rlmd.engine import prompts
from rlmd.engine.anchors import missing_names
from rlmd.engine.budget import Meter, resolve_budget
from rlmd.engine.context_text import ContextText
from rlmd.engine.evidence import (
    OUTLINE_EVIDENCE_BYTES,
    Evidence,
    asks_structure,
    definition_pattern,
    evidence_text,
    outline_text,
    with_definitions,
)
from rlmd.engine.followup import Earlier, FollowUps
from rlmd.engine.parse import parse_reply
from rlmd.engine.record import Emit, Recorder
from rlmd.engine.sizing import (
    ModelStates,
    Tokenizer,
    cut_to_limit,
    fits_whole,
    model_address,
    overflow,
    refit,
    window_tokens,
)
from rlmd.engine.sources import find_sources
from rlmd.engine.subcalls import ChatPool
from rlmd.engine.trace import TraceWriter, clip_for_trace, prune_traces, trace_path
from rlmd.engine.turns import LoopStart, QueryRun, RootLoop
from rlmd.engine.types import EngineError, QueryParams, QueryResult, Source
from rlmd.protocol.errors import AppError
from rlmd.providers.base import ChatRequest, Message, ProviderError
from rlmd.search.hit import Hit
from rlmd.store.store import ContextStore, StoreError

HEAD_CHARS = 1200  # how much of the context is peeked for its description
# Base mode leaves this much of the window free for its instructions, the question and the answer.
BASE_RESERVE = 1024


@dataclasses.dataclass
class _Context:
    path: Path | None = None
    desc: prompts.ContextDescription | None = None
    text: ContextText | None = None
    name: str | None = None  # the store's name


class Engine:
    """Runs queries.  Holds no per-query state but the recent answers for follow-ups."""

    def __init__(
        self,
        *,
        config: Config,
        pool: ChatPool,
        store: ContextStore,
        state_dir: Path,
        cache: CacheService | None = None,
        tokenizer: Tokenizer | None = None,
        models: ModelStates | None = None,
    ) -> None:
        self._config = config
        self._pool = pool
        self._cache = cache
        self._store = store
        self._state_dir = Path(state_dir)
        self._tokenizer = tokenizer
        self._models = models  # the embedded provider, to tell a cold model (phase events)
        # Closers of workers whose query was torn down while they were still starting.
        self._background: set[asyncio.Future[None]] = set()
        self._running_traces: set[Path] = set()  # never pruned while their query runs
        self.follow_ups = FollowUps(config.engine.follow_up_jobs)

    async def run(
        self, params: QueryParams, job: str, emit: Emit, *, system: str | None = None
    ) -> QueryResult:
        """Answer ``params.query``; events go to ``emit``; raise ``EngineError`` on failure.

        ``system`` replaces the question-answering system prompt when the context is shown
        whole (in-process callers whose task is not a question: the improvement cycle
        writes a diff, and the QA prompt's "FINAL(not found)" rule misleads small models).
        """
        budget = resolve_budget(self._config, params.options)
        if not params.query.strip():
            raise EngineError("bad_params", "query must not be empty")
        if params.context is not None and params.text is not None:
            raise EngineError(
                "bad_params", "give either `context` (a stored name) or `text`, not both"
            )
        earlier = self.follow_ups.get(params.follow_up) if params.follow_up else None
        if earlier is not None and params.context is None and params.text is None:
            if earlier.inline:
                raise EngineError(
                    "bad_params",
                    f"job {params.follow_up!r} asked about an inline text, which is not kept; "
                    "send it again as `text` with the follow-up",
                )
            params = msgspec.structs.replace(params, context=earlier.context)
        if earlier is not None:
            # The answer depends on the earlier exchange: never a cached stand-alone answer.
            params = msgspec.structs.replace(
                params, options=msgspec.structs.replace(params.options, cache=False)
            )
        try:
            root_model = params.options.root_model or self._pool.model_for("root")
            sub_model = params.options.sub_model or self._pool.model_for("sub")
        except ProviderError as exc:
            raise EngineError("model_error", str(exc)) from None
        mode = params.options.mode or "auto"
        path = trace_path(self._state_dir, job)
        writer = TraceWriter(path, secrets=self._secrets())
        self._running_traces.add(path)
        rec = Recorder(emit, writer)
        meter = Meter(budget)
        scratch = self._state_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="query-", dir=scratch))
        cfg = self._config.engine
        sub_window = window_tokens(self._config, sub_model)
        run = QueryRun(
            config=self._config,
            pool=self._pool,
            meter=meter,
            job=job,
            root_model=root_model,
            sub_model=sub_model,
            work=work,
            background=self._background,
            sub_prompt_chars=budget.sub_prompt_chars or int(sub_window * cfg.chars_per_token),
            sub_window_tokens=sub_window,
            nosub=mode == "rlm-nosub",
            store=self._store,
        )
        pins = contextlib.ExitStack()
        ctx = _Context()
        started = "rlm"
        cut = False
        sources: list[Source] = []
        supported = False
        try:
            try:
                async with asyncio.timeout(budget.timeout_s) as deadline:
                    ctx = await self._resolve_context(params, work, pins)
                    writer.write(
                        "start",
                        job=job,
                        query=params.query,
                        context=params.context or ("(inline text)" if params.text else None),
                        context_chars=ctx.desc.chars if ctx.desc else 0,
                        root_model=root_model,
                        sub_model=sub_model,
                        mode=mode,
                        follow_up=params.follow_up,
                        budget=dataclasses.asdict(budget),
                    )
                    self._phase_loading(rec, root_model)
                    caching = QueryCaching.for_query(
                        self._cache,
                        self._pool,
                        params=params,
                        context_path=ctx.path,
                        # Answers of the compared methods never stand in for each other.
                        root_model=root_model if mode == "rlm" else f"{root_model}|{mode}",
                        sub_model=sub_model,
                        emit=emit,
                    )
                    run.caching = caching
                    async with caching:
                        cached = await caching.cached_answer()
                        if cached is not None:
                            meter.cached_calls += 1
                            rec.note("final", answer=clip_for_trace(cached), how="cached")
                            answer, finish = cached, "cached"
                        elif mode == "base":
                            answer, finish = await self._base(run, rec, params, ctx)
                        else:
                            start = await self._loop_start(
                                run, rec, params, ctx, mode, earlier, system
                            )
                            started = "direct" if start.system else "rlm"
                            answer, finish = await RootLoop(run, rec, start).answer()
                            answer, cut = _cap(answer, budget.answer_chars)
                            if finish != "final" or answer != prompts.not_found_answer(
                                params.query
                            ):
                                t = meter.tokens()
                                await caching.remember(
                                    answer,
                                    finish=finish,
                                    job=job,
                                    tokens_in=t.input,
                                    tokens_out=t.output,
                                    cost=meter.cost,
                                    elapsed_s=meter.elapsed_s(),
                                )
                    if not cut:  # cached and base answers
                        answer, cut = _cap(answer, budget.answer_chars)
                    if ctx.text is not None:
                        sources, supported = await asyncio.to_thread(
                            find_sources, answer, ctx.text, run.shown
                        )
                    rec.note(
                        "sources",
                        supported=supported,
                        sources=[msgspec.to_builtins(s) for s in sources],
                    )
                    self._write_end(rec, meter)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise meter.timeout_error() from None
        except AppError as exc:
            writer.write(
                "error", kind=exc.kind, message=exc.message, partial=getattr(exc, "partial", "")
            )
            self._write_end(rec, meter)
            raise
        except asyncio.CancelledError:
            writer.write("error", kind="cancelled", message="the query was cancelled")
            self._write_end(rec, meter)
            raise
        except BaseException as exc:
            writer.write("error", kind="internal", message=repr(exc))
            self._write_end(rec, meter)
            raise
        finally:
            self._running_traces.discard(path)
            await asyncio.shield(self._cleanup(writer, pins, work))
        self.follow_ups.remember(
            job,
            Earlier(
                query=params.query,
                answer=answer,
                sources=sources,
                context=None if (ctx.name or "").startswith("_query:") else ctx.name,
                inline=params.text is not None or (ctx.name or "").startswith("_query:"),
            ),
        )
        result = QueryResult(
            answer=answer,
            job=job,
            iterations=meter.iterations,
            sub_calls=meter.sub_calls,
            tokens=meter.tokens(),
            cost=round(meter.cost, 6),
            elapsed_s=meter.elapsed_s(),
            trace=str(path),
            root_model=root_model,
            sub_model=sub_model,
            root_tokens=meter.root_tokens,
            sub_tokens=meter.sub_tokens,
            cached_calls=meter.cached_calls,
            depth=run.max_depth_seen,
            finish=finish,
            sources=sources,
            supported=supported,
            start=started,
            answer_cut=cut,
        )
        emit(meter.progress())
        emit({"kind": "final", "answer": answer})
        return result

    async def _cleanup(self, writer: TraceWriter, pins: contextlib.ExitStack, work: Path) -> None:
        await asyncio.to_thread(writer.close)
        await asyncio.to_thread(pins.close)
        await asyncio.to_thread(shutil.rmtree, work, True)
        await asyncio.to_thread(
            prune_traces,
            self._state_dir,
            keep=self._config.traces.keep,
            max_bytes=self._config.traces.max_mb * 1024 * 1024,
            protect=frozenset(self._running_traces),
        )

    def _write_end(self, rec: Recorder, meter: Meter) -> None:
        t = meter.tokens()
        rec.trace.write(
            "end",
            iterations=meter.iterations,
            sub_calls=meter.sub_calls,
            tokens={"input": t.input, "output": t.output},
            cost=meter.cost,
            elapsed_s=meter.elapsed_s(),
        )

    def _secrets(self) -> list[str]:
        names = [p.api_key_env for p in self._config.providers if p.api_key_env]
        return [v for n in names if (v := os.environ.get(n))]

    def _phase_loading(self, rec: Recorder, model: str) -> None:
        """A cold embedded model takes its load (seconds to minutes) before a first token."""
        if self._models is None:
            return
        state, _ = model_address(self._models, model)
        if state in ("idle", "loading"):
            rec.record("phase", {"phase": "loading_model", "model": model}, trace=False)

    # ------------------------------------------------------------------ how a loop starts

    async def _loop_start(
        self,
        run: QueryRun,
        rec: Recorder,
        params: QueryParams,
        ctx: _Context,
        mode: str,
        earlier: Earlier | None,
        system: str | None = None,
    ) -> LoopStart:
        cfg = self._config.engine
        query = params.query
        preamble = ""
        if earlier is not None:
            preamble = prompts.follow_up_preamble(
                earlier.query, earlier.answer, self.follow_ups.sources_text(earlier)
            )
        found = Evidence()
        small = prompts.variant_for(run.root_model) == "small"
        if ctx.text is not None and ctx.name and (small or cfg.evidence_large):
            found = await self._evidence(rec, ctx.name, query)
        evidence = found.text
        missing: list[str] = []
        if ctx.text is not None and system is None:
            missing = await asyncio.to_thread(missing_names, query, ctx.text)
            if missing:
                rec.note("names_absent", names=missing)
        start = LoopStart(
            query=query,
            context_path=ctx.path,
            desc=ctx.desc,
            ctx=ctx.text,
            depth=1,
            context_name=ctx.name,
            missing_names=missing,
            qa=system is None,
        )
        if ctx.desc is not None and ctx.desc.head:
            start.shown.append(ctx.desc.head)
        if evidence:
            start.shown.append(evidence)
        # What the model reads before the question: the passages and, when the question's
        # names stand nowhere in the text, a note saying so (not evidence of anything).
        lead = "\n\n".join(
            x for x in (evidence, prompts.names_absent_note(missing) if missing else "") if x
        )
        if mode == "auto" and ctx.text is not None and ctx.desc is not None and ctx.desc.chars:
            text_ctx = ctx.text

            async def read() -> str:
                return await asyncio.to_thread(text_ctx.read, 0, text_ctx.chars)

            window = window_tokens(self._config, run.root_model, params.options.window_tokens)
            fits, tokens = await fits_whole(
                ctx.desc.chars,
                read,
                model=run.root_model,
                window=window,
                fraction=cfg.direct_fraction,
                chars_per_token=cfg.chars_per_token,
                tokenizer=self._tokenizer,
            )
            if fits:
                text = await read()
                start.system = system or prompts.direct_system_prompt(sub_calls=not run.nosub)
                start.first = preamble + prompts.direct_first_message(query, text, ctx.desc, lead)
                start.shown.append(text)
                run.shown.append(text)
                if (
                    small
                    and evidence
                    and not missing
                    and system is None
                    and earlier is None
                    and cfg.evidence_turn_tokens
                    and tokens >= cfg.evidence_turn_tokens
                ):
                    start.evidence_turn = prompts.evidence_turn_message(query, evidence)
                    start.evidence = evidence
                return start
        start.first = preamble + prompts.with_evidence(prompts.first_message(query, ctx.desc), lead)
        if small and found.exact and not missing and system is None and earlier is None:
            # Shown the outline's counts or the lines defining the asked name in the first
            # message, the embedded model still wrote code (a grep of file headers, outline()
            # printed whole, search("__new__") that ranked "if new_name:") and answered from
            # its output (codeqa traces of s0-3, s0-6, s0-8); asked without tools first, it
            # reads them.
            start.evidence_turn = prompts.evidence_turn_message(query, evidence)
            start.evidence_system = prompts.EVIDENCE_TURN_SYSTEM_REPL
            start.evidence = evidence
        run.shown.extend(start.shown)
        return start

    async def _evidence(self, rec: Recorder, name: str, query: str) -> Evidence:
        """The ranked passages for the question, with their locations (the search helper's
        ``ContextStore.search_ranked``), the lines defining an asked name first and the
        outline's counts for a question about classes."""
        k = self._config.engine.evidence_passages
        ranked = getattr(self._store, "search_ranked", None)
        if k <= 0 or ranked is None:
            return Evidence()
        rec.record("phase", {"phase": "searching"}, trace=False)
        defining = definition_pattern(query)

        def find() -> tuple[list[Hit], list[Hit]]:
            """The passages to show, and the lines among them that define the asked name."""
            hits = ranked(name, query, k)
            if defining is None:
                return hits, []
            definers = self._store.grep(name, defining, k)
            return with_definitions(definers, hits, k), definers

        def structure() -> str:
            if not asks_structure(query):
                return ""
            try:
                return outline_text(self._store.outline(name, OUTLINE_EVIDENCE_BYTES), query)
            except StoreError as exc:
                rec.note("outline", error=str(exc))
                return ""

        try:
            hits, definers = await asyncio.to_thread(find)
        except (StoreError, ValueError) as exc:
            rec.note("evidence", error=str(exc))
            return Evidence()
        block = evidence_text(hits, query)
        classes = await asyncio.to_thread(structure)
        rec.note("evidence", passages=len(hits), **({"outline": True} if classes else {}))
        # The counts last, next to the question: small models answer from what they read last.
        text = "\n\n".join(x for x in (block, classes) if x)
        return Evidence(text, exact=bool(classes or definers))

    async def _resolve_context(
        self, params: QueryParams, work: Path, pins: contextlib.ExitStack
    ) -> _Context:
        """The file the worker maps, its description and reader: a stored context, a text,
        or none."""
        if params.text is not None:
            path = work / "context.txt"
            await asyncio.to_thread(path.write_text, params.text, "utf-8")
            return _Context(
                path=path,
                desc=prompts.describe_text(params.text),
                text=ContextText(len(params.text), text=params.text),
            )
        if params.context is None:
            return _Context()
        return await asyncio.to_thread(self._describe_stored, params.context, pins)

    def _describe_stored(self, name: str, pins: contextlib.ExitStack) -> _Context:
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
        return _Context(
            path=pinned.path,
            desc=desc,
            text=ContextText(pinned.info.chars, store=self._store, name=name),
            name=name,
        )

    # ------------------------------------------------------------------ "base" method

    async def _base(
        self, run: QueryRun, rec: Recorder, params: QueryParams, ctx: _Context
    ) -> tuple[str, str]:
        """The baseline the paper compares against: the text in the prompt, cut to fit."""
        window = window_tokens(self._config, run.root_model, params.options.window_tokens)
        text, total = "", 0
        if ctx.text is not None and ctx.desc is not None and ctx.desc.chars:
            reader, total = ctx.text, ctx.desc.chars
            text = await cut_to_limit(
                lambda chars: asyncio.to_thread(reader.read, 0, chars),
                model=run.root_model,
                limit=max(0, window - BASE_RESERVE),
                chars_per_token=self._config.engine.chars_per_token,
                tokenizer=self._tokenizer,
            )

        def on_delta(piece: str) -> bool:
            rec.record("root_delta", {"text": piece}, trace=False)
            return False

        run.meter.iterations += 1
        for attempt in range(2):
            cut = max(0, total - len(text))
            system, user = prompts.base_messages(params.query, text, cut)
            messages = [Message("system", system), Message("user", user)]
            for m in messages:
                rec.note("message", role=m.role, content=m.content, cut_chars=cut)
            req = ChatRequest(model=run.root_model, messages=tuple(messages))
            try:
                result = await run.pool.chat(req, on_delta=on_delta, affinity=run.job)
                break
            except ProviderError as exc:
                over = overflow(str(exc))
                if attempt or over is None or not text:
                    raise EngineError(
                        "model_error", f"the root model {run.root_model!r} failed: {exc}"
                    ) from None
                # The server knows its window better than our estimate or config: cut once
                # more by the numbers it gave.
                sent, server_window = over
                text = refit(text, tokens=sent, limit=max(0, server_window - BASE_RESERVE))
                rec.note(
                    "base_refit", sent_tokens=sent, window_tokens=server_window, chars=len(text)
                )
        run.shown.append(text)
        run.meter.charge_root(result)
        rec.note(
            "message",
            role="assistant",
            content=result.text,
            iteration=1,
            model=result.model,
            tokens_in=result.usage.input,
            tokens_out=result.usage.output,
        )
        reply = parse_reply(result.text)
        answer = reply.final.value if reply.final is not None else result.text.strip()
        rec.note("final", answer=clip_for_trace(answer), how="base")
        return answer, "base"


def _cap(answer: str, limit: int) -> tuple[str, bool]:
    """Issue 14, Broken 8: ``FINAL("Z" * 100e6)`` gave a 100 MB answer, trace and cache row."""
    if len(answer) <= limit:
        return answer, False
    note = f"\n[answer cut: {limit:,} of {len(answer):,} characters shown (limits.answer_chars)]"
    return answer[:limit] + note, True


__all__ = ["Engine"]
