"""One RLM loop: root turns, the blocks they run, and how the loop ends.

A turn: the root model answers, streamed (``root_delta`` events); the stream is cut at the
closing fence of the first runnable block, which starts running at that moment
(*pipelining*); what it printed goes back, truncated, as the next user message.  The loop
ends at ``FINAL(...)``/``FINAL_VAR(...)`` (in prose or called in code), a plain reply
accepted, or the no-tools last-chance turn at ``max_iterations``.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from rlmd.cache import QueryCaching
from rlmd.config import Config
from rlmd.engine import prompts
from rlmd.engine.budget import Meter, SubCallRefused
from rlmd.engine.context_text import ContextText
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
from rlmd.engine.record import Recorder
from rlmd.engine.small_model import SmallModelPolicy
from rlmd.engine.sources import is_not_found
from rlmd.engine.steer import LoopMemory, normalize, repeated, steer, stuck
from rlmd.engine.subcalls import ChatPool, SubCalls
from rlmd.engine.trace import clip_for_trace
from rlmd.engine.types import EngineError
from rlmd.engine.worker import LazyRepl
from rlmd.providers.base import ChatRequest, ChatResult, Message, ProviderError
from rlmd.repl.session import ReplSession
from rlmd.store.store import ContextStore

BlockRun = asyncio.Task[tuple[list[str], str | None]]


@dataclass
class LoopStart:
    """How a loop begins: its question, context and first message."""

    query: str
    context_path: Path | None
    desc: prompts.ContextDescription | None
    ctx: ContextText | None  # for the small model's not-found check
    depth: int
    context_name: str | None = None  # the stored context's name (REPL search via the daemon)
    system: str | None = None  # None: the RLM system prompt for the model
    first: str | None = None  # None: the context described
    shown: list[str] = field(default_factory=list)  # texts shown up front (the context)
    # A question about the text (False: another task, such as the improvement cycle's
    # diff, whose answers the question-answering checks would misjudge).
    qa: bool = True
    # The evidence turn's message (a small model, a long text shown whole, or passages
    # that code found exactly before the REPL loop): asked first, with its system prompt.
    evidence_turn: str | None = None
    evidence_system: str = prompts.EVIDENCE_TURN_SYSTEM
    evidence: str = ""
    # The question's names when none of them occurs in the context (anchors.missing_names).
    missing_names: list[str] = field(default_factory=list)


@dataclass
class QueryRun:
    """What every loop of one query shares."""

    config: Config
    pool: ChatPool
    meter: Meter
    job: str
    root_model: str
    sub_model: str
    work: Path
    background: set[asyncio.Future[None]]
    sub_prompt_chars: int
    sub_window_tokens: int
    caching: QueryCaching | None = None
    nosub: bool = False
    store: ContextStore | None = None  # for the REPL's search() calls
    max_depth_seen: int = 1
    # The texts every loop's blocks printed (and what was shown up front), for sources.
    shown: list[str] = field(default_factory=list)


class RootLoop:
    """Runs one loop (the query's, or a nested ``rlm_query``'s) to its answer."""

    def __init__(self, run: QueryRun, recorder: Recorder, start: LoopStart) -> None:
        self.run_ = run
        self.rec = recorder
        self.start = start
        self.depth = start.depth
        self.memory = LoopMemory(question=start.query)
        self.policy = SmallModelPolicy.for_model(
            run.root_model, run.meter.budget, start.missing_names, checks=start.qa
        )
        self.output_chars = self.policy.output_chars
        self.memory.printed.extend(start.shown)

    # ------------------------------------------------------------------ the loop

    async def answer(self) -> tuple[str, str]:
        """Run turns until an answer; return (answer, how it finished)."""
        run, b = self.run_, self.run_.meter.budget
        scratch = run.work / f"scratch-{self.depth}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        calls = SubCalls(
            pool=run.pool,
            meter=run.meter,
            recorder=self.rec,
            sub_model=run.sub_model,
            depth=self.depth,
            max_depth=b.max_depth,
            prompt_chars_limit=run.sub_prompt_chars,
            window_tokens=run.sub_window_tokens,
            nested=self._nested,
            caching=run.caching,
            nosub=run.nosub,
            store=run.store if self.start.context_name else None,
            context_name=self.start.context_name,
        )
        # The worker starts while the root model writes its first turn.
        session = LazyRepl(
            lambda: ReplSession.start(
                context_path=self.start.context_path,
                limits=run.config.limits,
                sandbox=run.config.sandbox,
                scratch_dir=scratch,
                on_call=calls,
                sub_prompt=None if run.nosub else calls.prompt_limit,
            ),
            self.rec,
            run.background,
        )
        try:
            system = self.start.system or prompts.system_prompt(
                run.root_model,
                nested_rlm=self.depth < b.max_depth,
                output_chars=self.output_chars,
                sub_calls=not run.nosub,
                qa=self.start.qa,
            )
            first = self.start.first or prompts.first_message(self.start.query, self.start.desc)
            if self.start.evidence_turn is not None:
                taken = await self._evidence_turn(session)
                if taken is not None:
                    return taken, "final"
            messages = [Message("system", system), Message("user", first)]
            for m in messages:
                self.rec.note("message", role=m.role, content=m.content)
            rejected_final = False
            bare_replies = 0
            for turn in range(1, b.max_iterations + 1):
                compact(messages, self.policy.history_chars)
                reply, text, exec_task = await self._root_turn(messages, session, turn=turn)
                # Some APIs refuse an empty message; an empty reply still takes its turn.
                messages.append(Message("assistant", text or "(empty reply)"))
                final_text: str | None = None
                outputs: list[str] = []
                if reply.blocks:
                    bare_replies = 0
                    outputs, final_text = await self._run_blocks(session, reply.blocks, exec_task)
                    if self.depth == 1:
                        self.rec.record("progress", run.meter.progress(), trace=False)
                written = False  # the answer was written by the model, not computed
                if final_text is None and reply.final is not None:
                    written = reply.final.kind == "answer"
                    final_text, problem = await self._resolve_final(session, reply.final)
                    if problem is not None:
                        outputs.append(prompts.missing_variable(reply.final.value, problem))
                if final_text is not None:
                    reason = non_answer_reason(final_text)
                    if reason is not None and not rejected_final:
                        rejected_final = True
                        run.meter.partial = final_text
                        outputs.append(prompts.not_an_answer(reason))
                    else:
                        verdict = await self.policy.check(
                            final_text,
                            written=written,
                            memory=self.memory,
                            ctx=self.start.ctx,
                            query=self.start.query,
                        )
                        if verdict.feedback is None:
                            answer = verdict.answer or final_text
                            self.rec.note("final", answer=clip_for_trace(answer), how=verdict.how)
                            return answer, "final"
                        run.meter.partial = final_text
                        outputs.append(verdict.feedback)
                elif not reply.blocks and reply.final is None:
                    bare_replies += 1
                    prose = reply.prose.strip()
                    short = bare_answer(prose) if self.start.system and turn == 1 else None
                    if short is not None and not unsupported_words(
                        short.value, self.memory.printed
                    ):
                        # The text was shown whole and the reply is a short value: the
                        # answer, if the checks pass (a FINAL wrapper would add nothing).
                        verdict = await self.policy.check(
                            short.value,
                            written=True,
                            memory=self.memory,
                            ctx=self.start.ctx,
                            query=self.start.query,
                        )
                        if verdict.feedback is None:
                            answer = verdict.answer or short.value
                            self.rec.note("final", answer=clip_for_trace(answer), how="reply")
                            return answer, "final"
                        outputs.append(verdict.feedback)
                        messages.append(Message("user", "\n\n".join(outputs)))
                        self.rec.note("message", role="user", content=messages[-1].content)
                        continue
                    # A fenced block is never an answer (the codeqa trace above parse.py's
                    # _REPL_CALL: code taken as the answer).
                    if (
                        bare_replies >= 2
                        and prose
                        and "```" not in prose
                        and non_answer_reason(prose) is None
                    ):
                        self.rec.note("final", answer=clip_for_trace(prose), how="reply")
                        return prose, "reply"
                    outputs.append(prompts.NO_CODE_NO_FINAL)
                feedback = "\n\n".join(outputs) if outputs else prompts.NO_CODE_NO_FINAL
                if reply.blocks and stuck(self.memory):
                    self.rec.note("steer", rule="stuck", repeats=self.memory.repeats_in_row)
                    return await self._last_chance(messages, session, stuck=feedback)
                if self.policy.small and reply.blocks:
                    feedback += "\n\n" + prompts.question_reminder(self.start.query)
                messages.append(Message("user", feedback))
                self.rec.note("message", role="user", content=feedback)
            return await self._last_chance(messages, session)
        finally:
            await session.close()

    async def _evidence_turn(self, session: LazyRepl) -> str | None:
        """Ask from the evidence passages alone, no tools; the answer if its words stand
        in the passages and it passes the answer checks, else None (the text is shown).

        The demo (issue 10): 15,195 characters of config shown whole cost 3,811 prompt
        tokens and 96 s on the embedded model; the passage holding ``price_per_kwh`` was
        the first of five, a few hundred tokens."""
        assert self.start.evidence_turn is not None
        messages = [
            Message("system", self.start.evidence_system),
            Message("user", self.start.evidence_turn),
        ]
        for m in messages:
            self.rec.note("message", role=m.role, content=m.content)
        reply, _text, _ = await self._root_turn(messages, session, turn=1, tools=False)
        final = reply.final or find_final(reply.prose, anywhere=True)
        if final is None and not reply.blocks:
            # The demo's reply was a bare "0.45": a short reply is the answer it gives.
            final = bare_answer(reply.prose)
        if (
            final is None
            or final.kind != "answer"
            or non_answer_reason(final.value)
            or is_not_found(final.value)  # the passages lack it; the whole text may not
        ):
            self.rec.note("evidence_turn", taken=False, why="no answer")
            return None
        # A trial check: what it sends back must not be spent before the text is read.
        trial = replace(self.policy, sent=set(self.policy.sent), checked=False)
        verdict = await trial.check(
            final.value,
            written=True,
            memory=LoopMemory(question=self.start.query, printed=[self.start.evidence]),
            ctx=self.start.ctx,
            query=self.start.query,
        )
        if verdict.feedback is not None or verdict.answer is not None:
            self.rec.note("evidence_turn", taken=False, why="not shown in the passages")
            return None
        self.rec.note("evidence_turn", taken=True)
        self.rec.note("final", answer=clip_for_trace(final.value), how="evidence")
        return final.value

    async def _root_turn(
        self, messages: list[Message], session: LazyRepl, *, turn: int, tools: bool = True
    ) -> tuple[ParsedReply, str, BlockRun | None]:
        """One streamed root call; with pipelining the first block starts as it closes."""
        run, b = self.run_, self.run_.meter.budget
        if self.depth == 1:
            run.meter.iterations += 1
            chars = sum(len(m.content) for m in messages)
            self.rec.record(
                "phase",
                {
                    "phase": "prompt",
                    "tokens": int(chars / run.config.engine.chars_per_token) + 1,
                    "iteration": turn,
                },
                trace=False,
            )
        cutter = StreamCutter(stop_at_block=b.pipeline and tools, stop_at_final=True)
        exec_task: BlockRun | None = None
        loop = asyncio.get_running_loop()
        first_delta = True

        def on_delta(piece: str) -> bool:
            nonlocal exec_task, first_delta
            kept, stop = cutter.feed(piece)
            if kept and self.depth == 1:
                if first_delta:
                    first_delta = False
                    self.rec.record("phase", {"phase": "generating"}, trace=False)
                self.rec.record("root_delta", {"text": kept}, trace=False)
            if stop and exec_task is None and tools:
                early = parse_reply(cutter.text)
                if early.blocks:
                    # Pipelining: the block runs while the stream is being closed.
                    exec_task = loop.create_task(self._exec_blocks(session, early.blocks[:1]))
            return stop

        max_tokens = None if tools else run.config.limits.last_chance_max_tokens
        req = ChatRequest(model=run.root_model, messages=tuple(messages), max_tokens=max_tokens)
        t0 = time.monotonic()
        try:
            result: ChatResult = await run.pool.chat(req, on_delta=on_delta, affinity=run.job)
        except ProviderError as exc:
            if exec_task is not None:
                exec_task.cancel()
            raise EngineError(
                "model_error",
                f"the root model {run.root_model!r} failed: {exc}",
                run.meter.best_partial(),
            ) from None
        except BaseException:
            if exec_task is not None:
                exec_task.cancel()
            raise
        if not cutter.text and result.text:
            cutter.feed(result.text)  # a provider that does not stream, or a cache hit
        text = cutter.text
        run.meter.charge_root(result)
        self.rec.note(
            "message",
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
        if self.depth == 1:
            self.rec.record("progress", run.meter.progress(), trace=False)
        reply = parse_reply(text)
        if reply.prose.strip():
            run.meter.partial = reply.prose.strip()
        if exec_task is not None and not reply.blocks:
            exec_task.cancel()  # cannot happen with a consistent parser; never leak it
            exec_task = None
        try:
            run.meter.check_cost()
        except EngineError:
            if exec_task is not None:
                exec_task.cancel()
            raise
        return reply, text, exec_task

    async def _run_blocks(
        self, session: LazyRepl, blocks: list[str], started: BlockRun | None
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
            outs, final = await self._exec_blocks(session, rest)
            outputs += outs
            if final is not None:
                return outputs, final
        return outputs, None

    async def _exec_blocks(
        self, session: LazyRepl, blocks: list[str]
    ) -> tuple[list[str], str | None]:
        """Run blocks in order until one calls FINAL; return the messages and the FINAL."""
        meter, b, rec, mem = self.run_.meter, self.run_.meter.budget, self.rec, self.memory
        outputs: list[str] = []
        for code in blocks:
            rec.record("code", {"code": code})
            key = normalize(code)
            notice = repeated(mem, key)
            if notice is not None:
                rec.record("output", {"text": notice, "repeated": True})
                outputs.append(notice)
                continue
            res = await session.execute(code, timeout_s=b.cell_timeout_s)
            mem.history.append(key)
            if meter.error is not None:
                raise meter.error
            meant = sole_final(code)
            if res.final is None and res.error and meant is not None and meant.kind == "answer":
                # ``FINAL(It is 7 (seven))`` in a fence: valid Python that fails; a text answer.
                rec.note("output", text="", error=res.error, elapsed_s=0)
                return outputs, meant.value
            shown = truncate_output(res.output or "", self.output_chars)
            error = truncate_output(res.error, self.output_chars // 4) if res.error else None
            seen = shown + (f"\n{error}" if error else "")
            mem.printed.append(seen)
            mem.outputs.append(seen)
            self.run_.shown.append(seen)
            if seen.strip():
                meter.last_output = seen
            rec.record(
                "output",
                {
                    "text": seen,
                    "timed_out": bool(res.timed_out),
                    "restarted": bool(res.restarted),
                    "elapsed_s": round(res.elapsed_s, 4),
                },
                trace_extra={"error": error, "chars": len(res.output or "")},
            )
            message = prompts.output_message(
                shown,
                error=error,
                timed_out=bool(res.timed_out),
                restarted=bool(res.restarted),
                cell_timeout_s=b.cell_timeout_s,
            )
            hint = steer(mem, key, res.output or "")
            if hint is not None:
                rec.note("steer", text=hint)
                message += "\n\n" + hint
            outputs.append(message)
            if not (res.error or res.timed_out or res.restarted):
                mem.ran[key] = shown
                mem.last = (key, None)
            else:
                mem.last = (key, _last_line(error or "it timed out"))
            if res.final is not None:
                return outputs, _final_text(res.final)
        return outputs, None

    async def _resolve_final(
        self, session: LazyRepl, final: Final
    ) -> tuple[str | None, str | None]:
        """The answer a prose FINAL gives, or (None, what went wrong)."""
        if final.kind == "answer":
            return final.value, None
        if final.kind == "expr":
            # FINAL renders any value (str as is, tuples and dicts as JSON) in the worker.
            res = await session.execute(
                f"FINAL(({final.value}))", timeout_s=self.run_.meter.budget.cell_timeout_s
            )
            if res.final is not None:
                return _final_text(res.final), None
            problem = (res.error or "").strip() or "evaluating it gave nothing"
            return None, problem.splitlines()[-1]
        value = await session.get_var(final.value)
        if value is None:
            return None, f"there is no variable named {final.value!r} in the REPL"
        return str(value), None

    async def _last_chance(
        self, messages: list[Message], session: LazyRepl, *, stuck: str | None = None
    ) -> tuple[str, str]:
        """At max_iterations: one more call, no tools, output capped, for the best answer.
        ``stuck``: the feedback of a turn that only re-sent code already run, to lead the
        call's message (earlier, see steer.stuck)."""
        if stuck is None:
            prompt, turn = prompts.LAST_CHANCE, self.run_.meter.budget.max_iterations + 1
        else:
            prompt, turn = (
                stuck + "\n\n" + prompts.STUCK_LAST_CHANCE,
                self.run_.meter.iterations + 1,
            )
        messages.append(Message("user", prompt))
        self.rec.note("message", role="user", content=prompt)
        reply, _text, _ = await self._root_turn(messages, session, turn=turn, tools=False)
        printed = [o for o in self.memory.outputs if not prompts.is_empty_output(o)]
        if reply.blocks and reply.final is None and printed:
            # Issue 10's codeqa trace: told that no more code would run, the embedded model
            # sent its search block a fourth time, with the answer's two hits on screen.
            # Asked afresh, without the code-writing conversation to copy, it answers.
            reply = await self._outputs_turn(session, printed, turn=turn + 1)
        answer: str | None = None
        if reply.final is None:
            reply.final = find_final(reply.prose, anywhere=True)
        if reply.final is not None and reply.final.kind == "answer":
            answer = reply.final.value
        elif reply.final is not None:
            answer, _ = await self._resolve_final(session, reply.final)
        elif not reply.blocks:
            answer = reply.prose.strip()
        if answer and non_answer_reason(answer) is None:
            answer = await self.policy.last_word(answer, ctx=self.start.ctx, query=self.start.query)
            self.rec.note("final", answer=clip_for_trace(answer), how="best_effort")
            return answer, "best_effort"
        if reply.prose.strip():
            self.run_.meter.partial = reply.prose.strip()
        raise self.run_.meter.iterations_error(stuck=stuck is not None)

    async def _outputs_turn(
        self, session: LazyRepl, printed: list[str], *, turn: int
    ) -> ParsedReply:
        """One call without tools or history: the question and what the blocks printed."""
        # The evidence was read before any block ran: the outline's counts answer what the
        # outputs may not (codeqa trace: the last chance, shown a grep of file headers only,
        # answered 2 where the counts said 6).
        if self.start.evidence:
            printed = [self.start.evidence, *printed]
        shown = prompts.outputs_turn_message(self.start.query, printed)
        system = prompts.OUTPUTS_TURN_SYSTEM
        if self.start.qa:  # a question, not a task like the improvement cycle's diff
            system += prompts.OUTPUTS_TURN_NOT_FOUND
        messages = [Message("system", system), Message("user", shown)]
        for m in messages:
            self.rec.note("message", role=m.role, content=m.content)
        reply, _text, _ = await self._root_turn(messages, session, turn=turn, tools=False)
        return reply

    # ------------------------------------------------------------------ recursion

    async def _nested(self, prompt: str, sub_ctx: str | None, depth: int) -> str:
        """``rlm_query`` below the depth limit: a whole loop of its own on ``sub_ctx``."""
        run = self.run_
        call_id = uuid.uuid4().hex[:8]
        run.max_depth_seen = max(run.max_depth_seen, depth)
        rec = self.rec.nested(depth)
        base = {
            "id": call_id,
            "fn": "rlm_query",
            "model": run.root_model,
            "prompt_chars": len(prompt),
        }
        rec.record("subcall", {**base, "status": "start"}, trace=False)
        t0 = time.monotonic()
        ctx_path: Path | None = None
        desc = None
        ctx = None
        if sub_ctx:
            ctx_path = run.work / f"subcontext-{call_id}.txt"
            await asyncio.to_thread(ctx_path.write_text, sub_ctx, "utf-8")
            desc = prompts.describe_text(sub_ctx)
            ctx = ContextText(len(sub_ctx), text=sub_ctx)
        saved_partial = run.meter.partial
        try:
            answer, _how = await RootLoop(
                run,
                rec,
                LoopStart(query=prompt, context_path=ctx_path, desc=desc, ctx=ctx, depth=depth),
            ).answer()
        except EngineError as exc:
            if exc.kind in ("max_sub_calls", "max_cost", "timeout", "model_error"):
                run.meter.error = run.meter.error or exc
                raise SubCallRefused(exc.message) from None
            answer = f"[rlm_query error: {exc.message}]"
        finally:
            run.meter.partial = saved_partial
        rec.record(
            "subcall",
            {**base, "status": "ok", "elapsed_s": round(time.monotonic() - t0, 4)},
            trace=False,
        )
        return answer


def compact(messages: list[Message], max_chars: int) -> None:
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


BARE_ANSWER_WORDS = 6


_ANSWER_LABEL = re.compile(r"^(?:final\s+)?answer\s*:\s*", re.I)


def bare_answer(prose: str) -> Final | None:
    """A reply of a few words and no FINAL, as the answer it states (None for longer
    prose, a plan, or READ)."""
    text = prose.strip().strip("`").strip()
    if not text or text.upper().rstrip(".") == "READ" or "\n" in text:
        return None
    # "Answer: 6" is the form the question asked for; the label is no part of the answer
    # (codeqa trace of s0-3: the counts' "6" refused for the word "Answer").
    text = _ANSWER_LABEL.sub("", text, count=1).strip() or text
    if len(text.split()) > BARE_ANSWER_WORDS or non_answer_reason(text) is not None:
        return None
    return Final("answer", text.rstrip("."))


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text


def _final_text(final: object) -> str:
    """A FINAL from the REPL: a string, or (kind, value) from some worker versions."""
    if isinstance(final, str):
        return final
    value = getattr(final, "value", None)
    if value is not None:
        return str(value)
    return str(final)
