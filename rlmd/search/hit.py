"""The shape of one search hit or source span (the wire shape too)."""

from __future__ import annotations

import msgspec

#: The text of a hit is cut to this many characters (a passage or line can be huge).
MAX_HIT_TEXT = 2_000


class Hit(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A span of a context: character offsets ``[start, end)``, the 1-based ``line`` of
    ``start``, its ``text`` (the passage, the whole matching line, or the span itself;
    cut to ``MAX_HIT_TEXT`` characters), a ``score`` (ranked search), and for directory
    contexts the ``file`` (relative path) and ``file_line`` (1-based, within the file)."""

    start: int
    end: int
    line: int
    text: str
    score: float = 0.0
    file: str | None = None
    file_line: int | None = None
