"""One ``record()`` for every step of a query: the client's event and the trace's record.

Before this module each step was built twice, once as an event and once as a trace record,
and the two drifted.  A ``Recorder`` belongs to one loop (its ``depth``): events of nested
loops carry ``depth`` (the root's stay as the protocol shows them), and the trace gets the
same facts plus what only it keeps (texts, prompts by reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlmd.engine.trace import TraceWriter

Emit = Callable[[dict[str, Any]], None]


@dataclass
class Recorder:
    """Feeds ``emit`` (the client's event stream) and ``trace`` from one call."""

    emit: Emit
    trace: TraceWriter
    depth: int = 1

    def record(
        self,
        kind: str,
        fields: dict[str, Any],
        *,
        trace_extra: dict[str, Any] | None = None,
        event: bool = True,
        trace: bool = True,
    ) -> None:
        """``kind`` with ``fields`` as an event (unless ``event=False``) and as a trace
        record with ``trace_extra`` added (unless ``trace=False``)."""
        if event:
            self.emit(
                {"kind": kind, **fields, **({} if self.depth == 1 else {"depth": self.depth})}
            )
        if trace:
            self.trace.write(kind, depth=self.depth, **fields, **(trace_extra or {}))

    def note(self, kind: str, **fields: Any) -> None:
        """A trace-only record (messages, finals, the worker's start)."""
        self.trace.write(kind, depth=self.depth, **fields)

    def nested(self, depth: int) -> Recorder:
        """The recorder of a nested loop: its code, output and sub-calls are shown, never
        its root text, progress or final."""

        def nested_emit(ev: dict[str, Any]) -> None:
            if ev.get("kind") in ("code", "output", "subcall"):
                self.emit(ev)

        return Recorder(nested_emit, self.trace, depth)
