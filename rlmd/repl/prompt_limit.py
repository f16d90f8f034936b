"""The bound of one sub-call prompt, shared by the REPL worker and the daemon.

The worker checks it before a prompt leaves the sandbox, so a 200 MiB
``llm_query("A" * 200 * 2**20)`` is refused without crossing the channel (issue 14,
Broken 5); the daemon checks it again on every Call, because the worker runs model code
and a forged frame skips the worker's check.  Both say the same words.

Imported by the worker: msgspec and the standard library only.
"""

from __future__ import annotations

import msgspec


class PromptLimit(msgspec.Struct, frozen=True, kw_only=True):
    """How long a sub-call prompt may be (sent to the worker in its Init message)."""

    chars: int  # the longest prompt the sub-model can read, in characters
    window_tokens: int  # the sub-model's window, named in the refusal
    #: ``rlm_query`` is one sub-model call on ``prompt + "\n\n" + context`` (the query is
    #: at its depth limit), so that text is bounded too; below the limit it starts a loop
    #: of its own, whose context may be large.
    rlm_query_plain: bool = True

    def refusal(self, chars: int) -> str | None:
        """The error the model reads for a prompt of ``chars`` characters; None: it fits."""
        if chars <= self.chars:
            return None
        return (
            f"prompt of {chars:,} chars is over the sub-model's window of "
            f"{self.window_tokens:,} tokens; filter or split it first "
            f"(at most about {self.chars:,} characters a prompt)"
        )


def rlm_query_text(prompt: str, context: str | None) -> str:
    """What a plain ``rlm_query`` sends to the sub-model."""
    return prompt if context is None else f"{prompt}\n\n{context}"
