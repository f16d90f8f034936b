"""Reading the query's context for the engine's own work: the whole text when it is short,
regex hits with their lines, and for directory contexts the file and line of an offset.

A stored context is read through the store (mmap'd, never copied whole); an inline text
(in-process callers) is a string.  Synchronous: call it in a thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from rlmd.search.hit import Hit
from rlmd.search.locate import Locator
from rlmd.store.search import SearchMatch

LINE_WINDOW = 400  # how far around a hit a line's ends are looked for


class Store(Protocol):
    """What the engine reads of ``rlmd.store.ContextStore``."""

    def peek(self, name: str, start: int, end: int) -> str: ...

    def search(
        self, name: str, pattern: str, max_matches: int = 100, *, timeout_s: float | None = None
    ) -> list[SearchMatch]: ...

    def locate(self, name: str, start: int, end: int) -> Hit: ...


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    line: int
    text: str


class ContextText:
    """One context, by store name or as a string."""

    def __init__(
        self, chars: int, *, store: Store | None = None, name: str = "", text: str | None = None
    ) -> None:
        self.chars = chars
        self._store = store
        self._name = name
        self._text = text
        self._locator: Locator | None = None  # an inline text's lines and file headers

    def read(self, start: int, end: int) -> str:
        end = min(end, self.chars)
        if start >= end:
            return ""
        if self._text is not None:
            return self._text[start:end]
        assert self._store is not None
        out, pos = [], start
        while pos < end:  # the store peeks in bounded pieces
            piece = self._store.peek(self._name, pos, min(end, pos + 1_000_000))
            if not piece:
                break
            out.append(piece)
            pos += len(piece)
        return "".join(out)

    def find(self, pattern: str, max_matches: int = 50) -> list[SearchMatch]:
        """Matches of a regex, in order."""
        if self._text is not None:
            out = []
            for m in re.finditer(pattern, self._text):
                line = self._text.count("\n", 0, m.start()) + 1
                out.append(
                    SearchMatch(start=m.start(), end=m.end(), line=line, text=m.group(0)[:200])
                )
                if len(out) >= max_matches:
                    break
            return out
        assert self._store is not None
        return self._store.search(self._name, pattern, max_matches, timeout_s=20.0)

    def line_at(self, m: SearchMatch) -> Span:
        """The line holding a match (cut to ``LINE_WINDOW`` characters either side)."""
        lo = max(0, m.start - LINE_WINDOW)
        around = self.read(lo, m.end + LINE_WINDOW)
        rel_s, rel_e = m.start - lo, m.end - lo
        a = around.rfind("\n", 0, rel_s) + 1
        b = around.find("\n", rel_e)
        b = len(around) if b < 0 else b
        return Span(start=lo + a, end=lo + b, line=m.line, text=around[a:b])

    def locate(self, start: int, line: int) -> tuple[str, int] | None:
        """``(file, file_line)`` of an offset in a directory context, else None."""
        if self._text is not None:
            if self._locator is None:
                self._locator = Locator(self._text)
            hit = self._locator.locate(start, start)
        else:
            assert self._store is not None
            hit = self._store.locate(self._name, start, start)
        if hit.file is None or hit.file_line is None:
            return None
        return hit.file, hit.file_line
