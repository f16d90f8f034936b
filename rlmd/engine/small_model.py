"""What small root models (about 3B parameters and under) get that large ones do not.

Seen with the embedded Qwen2.5-Coder-1.5B in the long-needle benchmark and issue 10:
an invented short answer right after a search that found nothing (a made-up UUID,
``12345``, the question's own key).  So a short written answer whose words no output
showed is sent back once with a concrete search block; if the next one is still shown
nowhere and its key facts stand nowhere in the context, the answer is "not found" rather
than an invented value.  Small models also get shorter outputs and a shorter history.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rlmd.engine import prompts
from rlmd.engine.budget import Budget
from rlmd.engine.context_text import ContextText
from rlmd.engine.parse import unsupported_words
from rlmd.engine.sources import find_sources, is_not_found
from rlmd.engine.steer import LoopMemory


@dataclass(frozen=True)
class Verdict:
    """``feedback`` None: take the answer (``answer`` replaces it when set)."""

    feedback: str | None = None
    answer: str | None = None
    how: str = "final"


@dataclass
class SmallModelPolicy:
    small: bool
    output_chars: int
    history_chars: int
    checked: bool = False  # one evidence check per loop

    @classmethod
    def for_model(cls, model: str, budget: Budget) -> SmallModelPolicy:
        small = prompts.variant_for(model) == "small"
        out = budget.output_chars
        if small and not budget.output_chars_explicit:
            # A small model's window holds a few short outputs, not 20,000 characters.
            out = min(out, prompts.SMALL_OUTPUT_CHARS)
        hist = prompts.SMALL_HISTORY_CHARS if small else prompts.LARGE_HISTORY_CHARS
        return cls(small=small, output_chars=out, history_chars=hist)

    async def check(
        self,
        answer: str,
        *,
        written: bool,
        memory: LoopMemory,
        ctx: ContextText | None,
        query: str,
    ) -> Verdict:
        """Whether to take a FINAL answer (only short, written answers of small models are
        checked; a value computed in the REPL is taken)."""
        if not (self.small and written) or is_not_found(answer):
            return Verdict()
        # What the model was shown of the text; not the question (or a hint quoting it),
        # whose words (the needle's key) a guess likes to repeat.
        missing = unsupported_words(answer, memory.printed)
        if not missing:
            return Verdict()
        if not self.checked:
            self.checked = True
            return Verdict(feedback=prompts.unverified_answer(answer, missing, query))
        if ctx is None:
            return Verdict()
        spans, _supported = await asyncio.to_thread(find_sources, answer, ctx, [])
        if spans:
            return Verdict()
        return Verdict(answer=prompts.not_found_answer(query), how="not_found")
