"""The REPL's model calls: ``llm_query``, ``llm_query_batched`` and ``rlm_query``.

Each counts against the query's sub-call budget before it starts (a batch counts all its
prompts).  A prompt over the sub-model's window is refused with an error the model reads,
and the prompt text in flight per query is bounded (issue 14, Broken 5).  A failed call
returns ``"[fn error: ...]"`` in the answer's place; the trace keeps long prompts and
answers by reference (length, hash, head and tail), never whole.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rlmd.cache import QueryCaching
from rlmd.engine import prompts
from rlmd.engine.budget import Meter, SubCallRefused
from rlmd.engine.record import Recorder
from rlmd.engine.trace import clip_for_trace
from rlmd.providers.base import ChatRequest, ChatResult, Message, OnDelta, ProviderError
from rlmd.repl.prompt_limit import PromptLimit, rlm_query_text
from rlmd.search.handlers import CALLS as SEARCH_CALLS
from rlmd.search.handlers import handle_call
from rlmd.store.store import ContextStore

# A nested loop for rlm_query below the depth limit: (prompt, its context, depth) -> answer.
Nested = Callable[[str, str | None, int], Awaitable[str]]


class ChatPool(Protocol):
    """What the engine needs of ``rlmd.pool.Pool``."""

    def model_for(self, role: Any) -> str: ...

    async def chat(
        self,
        req: ChatRequest,
        *,
        on_delta: OnDelta | None = None,
        priority: int = 0,
        affinity: str | None = None,
    ) -> ChatResult: ...


@dataclass
class SubCalls:
    """The ``on_call`` handler of one loop's REPL worker."""

    pool: ChatPool
    meter: Meter
    recorder: Recorder
    sub_model: str
    depth: int
    max_depth: int
    prompt_chars_limit: int  # the longest prompt a sub-model can read
    window_tokens: int  # the sub-model's window, for the refusal message
    nested: Nested
    caching: QueryCaching | None = None
    nosub: bool = False
    # The REPL's ``search()`` on a mapped context asks the daemon (its index when built).
    store: ContextStore | None = None  # read in a thread by handle_call
    context_name: str | None = None

    async def __call__(self, fn: str, args: dict[str, Any]) -> Any:
        if fn in SEARCH_CALLS:
            # Not a model call: no budget.  ValueError makes the worker scan the mapping.
            if self.store is None:
                raise ValueError("search: no stored context to ask")
            return await asyncio.to_thread(handle_call, self.store, self.context_name, fn, args)
        if self.nosub:
            raise RuntimeError(prompts.NO_SUB_CALLS_ERROR)
        model = args.get("model") or self.sub_model
        if fn == "llm_query":
            prompt = str(args["prompt"])
            self._check_prompt(prompt)
            self.meter.take_sub_calls(1)
            if self.caching is not None:
                self.caching.before_sub_calls([prompt], model)
            return await self._bounded(fn, prompt, model)
        if fn == "llm_query_batched":
            batch = [str(p) for p in args["prompts"]]
            if not batch:
                return []
            for p in batch:
                self._check_prompt(p)
            self.meter.take_sub_calls(len(batch))
            results: list[str] = [""] * len(batch)

            async def one(i: int, p: str) -> None:
                results[i] = await self.call(fn, p, model)

            if self.caching is not None:
                self.caching.before_sub_calls(batch, model)
            # The whole batch is in flight at once: reserve it whole, or refuse it whole.
            total = sum(len(p) for p in batch)
            self.meter.reserve_bytes(total)
            try:
                async with asyncio.TaskGroup() as tg:
                    for i, p in enumerate(batch):
                        tg.create_task(one(i, p))
            finally:
                self.meter.release_bytes(total)
            if self.caching is not None and self.depth == 1:
                # Prefetch the same template over the next chunks while the root thinks.
                await self.caching.after_batch(batch, model)
            return results
        if fn == "rlm_query":
            prompt = str(args["prompt"])
            sub_ctx = args.get("context")
            if self.depth >= self.max_depth:
                text = rlm_query_text(prompt, None if sub_ctx is None else str(sub_ctx))
                self._check_prompt(text)
                self.meter.take_sub_calls(1)
                return await self._bounded(fn, text, self.sub_model)
            self.meter.take_sub_calls(1)
            return await self.nested(
                prompt, None if sub_ctx is None else str(sub_ctx), self.depth + 1
            )
        raise ValueError(f"unknown REPL call {fn!r}")

    @property
    def prompt_limit(self) -> PromptLimit:
        """The bound the worker checks before it sends (the same one as ``_check_prompt``)."""
        return PromptLimit(
            chars=self.prompt_chars_limit,
            window_tokens=self.window_tokens,
            rlm_query_plain=self.depth >= self.max_depth,
        )

    def _check_prompt(self, prompt: str) -> None:
        # Checked here too, not only in the worker: a forged Call skips the worker's check.
        why = self.prompt_limit.refusal(len(prompt))
        if why is not None:
            raise SubCallRefused(why)

    async def _bounded(self, fn: str, prompt: str, model: str) -> str:
        self.meter.reserve_bytes(len(prompt))
        try:
            return await self.call(fn, prompt, model)
        finally:
            self.meter.release_bytes(len(prompt))

    async def call(self, fn: str, prompt: str, model: str) -> str:
        """One sub-model call; a failure becomes an error string in the answer's place."""
        call_id = uuid.uuid4().hex[:8]
        base = {"id": call_id, "fn": fn, "model": model, "prompt_chars": len(prompt)}
        rec = self.recorder
        rec.record(
            "subcall", {**base, "status": "start"}, trace_extra={"prompt": clip_for_trace(prompt)}
        )
        t0 = time.monotonic()
        req = ChatRequest(model=model, messages=(Message("user", prompt),))
        try:
            r = await self.pool.chat(req)
        except ProviderError as exc:
            rec.record(
                "subcall",
                {
                    **base,
                    "status": "error",
                    "elapsed_s": round(time.monotonic() - t0, 4),
                    "error": str(exc),
                },
            )
            return f"[{fn} error: {exc}]"
        self.meter.charge_sub(r)
        rec.record(
            "subcall",
            {
                **base,
                "status": "cached" if r.cached else "ok",
                "elapsed_s": round(time.monotonic() - t0, 4),
                "tokens": {"input": r.usage.input, "output": r.usage.output},
                "cost": r.cost,
                "answer_chars": len(r.text),
            },
            trace_extra={
                "provider": r.provider,
                "served_by": r.model,
                "ttft_s": round(r.ttft_s, 4),
                "answer": clip_for_trace(r.text),
                "tokens_in": r.usage.input,
                "tokens_out": r.usage.output,
            },
        )
        return r.text
