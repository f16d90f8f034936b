"""What small root models (about 3B parameters and under) get that large ones do not.

Seen with the embedded Qwen2.5-Coder-1.5B in the long-needle benchmark and issue 10:
an invented short answer right after a search that found nothing (a made-up UUID,
``12345``, the question's own key).  So a short written answer whose words no output
showed is sent back once with a concrete search block; if the next one is still shown
nowhere and its key facts stand nowhere in the context, the answer is "not found" rather
than an invented value.  Small models also get shorter outputs and a shorter history.

Every answer, whatever the model, is also held against the question's names
(:mod:`rlmd.engine.answer_checks`): a name found nowhere in the text, the answer's number
sitting in a sentence about another name, or a newer value for the asked name.  Each
sends the answer back once; a small model that insists on a value for a name the text
never writes gets "not found".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from rlmd.engine import answer_checks, prompts
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
    # The question's names when none occurs in the text (``anchors.missing_names``).
    missing_names: list[str] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)  # the answer checks already sent back
    checks: bool = True  # False: the task is not a question about the text (no checks)

    @classmethod
    def for_model(
        cls,
        model: str,
        budget: Budget,
        missing_names: list[str] | None = None,
        *,
        checks: bool = True,
    ) -> SmallModelPolicy:
        small = prompts.variant_for(model) == "small"
        out = budget.output_chars
        if small and not budget.output_chars_explicit:
            # A small model's window holds a few short outputs, not 20,000 characters.
            out = min(out, prompts.SMALL_OUTPUT_CHARS)
        hist = prompts.SMALL_HISTORY_CHARS if small else prompts.LARGE_HISTORY_CHARS
        return cls(
            small=small,
            output_chars=out,
            history_chars=hist,
            missing_names=missing_names or [],
            checks=checks,
        )

    async def check(
        self,
        answer: str,
        *,
        written: bool,
        memory: LoopMemory,
        ctx: ContextText | None,
        query: str,
    ) -> Verdict:
        """Whether to take a FINAL answer: the checks against the question's names for
        every answer, then (small models, short written answers) whether any output
        showed its words.  A value computed in the REPL skips that last check."""
        if not self.checks or is_not_found(answer):
            return Verdict()
        if self.missing_names:
            if "missing_name" not in self.sent:
                self.sent.add("missing_name")
                return Verdict(feedback=answer_checks.missing_name(answer, self.missing_names))
            if self.small:
                return Verdict(answer=prompts.not_found_answer(query), how="not_found")
        if self.small and ctx is not None:
            for check in (
                answer_checks.other_name,
                answer_checks.newer_value,
                answer_checks.next_hop,
            ):
                if check.__name__ in self.sent:
                    continue
                feedback = await asyncio.to_thread(check, answer, query, ctx)
                if feedback is not None:
                    self.sent.add(check.__name__)
                    return Verdict(feedback=feedback)
        if not (self.small and written):
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

    async def last_word(self, answer: str, *, ctx: ContextText | None, query: str) -> str:
        """The last-chance answer of a small model, which cannot be sent back: "not found"
        when the question's names stand nowhere in the text or the answer's key facts
        nowhere in the context (issue 10, the absent bench: ``Final(4458732)`` after
        twenty searches with no hit)."""
        if not (self.small and self.checks) or is_not_found(answer):
            return answer
        if self.missing_names:
            return prompts.not_found_answer(query)
        if ctx is None:
            return answer
        spans, _supported = await asyncio.to_thread(find_sources, answer, ctx, [])
        return answer if spans else prompts.not_found_answer(query)
