"""Recent answers kept for follow-up questions (``query/run {..., follow_up: JOB}``).

In memory, bounded by ``[engine] follow_up_jobs`` (oldest dropped first): a follow-up is
asked minutes after its answer, and a restart ends the conversation, as a closed chat
would.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rlmd.engine.types import EngineError, Source


@dataclass(frozen=True)
class Earlier:
    """One finished query as a follow-up sees it."""

    query: str
    answer: str
    sources: list[Source]
    context: str | None  # the stored context's name; None: none, or inline text
    inline: bool = False


class FollowUps:
    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._jobs: OrderedDict[str, Earlier] = OrderedDict()

    def remember(self, job: str, earlier: Earlier) -> None:
        if self._keep <= 0:
            return
        self._jobs[job] = earlier
        self._jobs.move_to_end(job)
        while len(self._jobs) > self._keep:
            self._jobs.popitem(last=False)

    def get(self, job: str) -> Earlier:
        try:
            return self._jobs[job]
        except KeyError:
            raise EngineError(
                "follow_up_not_found",
                f"no recent answer of job {job!r} to follow up on (the daemon keeps the last "
                "[engine] follow_up_jobs answers, in memory); ask the question again in full",
            ) from None

    def sources_text(self, earlier: Earlier) -> list[str]:
        return [
            f"{s.file}:{s.file_line}: {s.text}" if s.file else f"line {s.line}: {s.text}"
            for s in earlier.sources
        ]
