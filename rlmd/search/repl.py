"""``search`` and ``grep`` as REPL functions (bound in ``rlmd/repl/worker.py``).

They return lists of :class:`ReplHit`: dicts (``hit["text"]``, JSON-able) that also read
as attributes (``hit.line``) and print one readable line each, ``file:file_line`` or
``line N``, the character offsets, and the text.  A large context (the mapped view) asks
the daemon first, which answers from the context's index when one is built (the call
``search`` with ``{"query", "k"}``, see :func:`rlmd.search.handlers.handle_call`); when the
daemon cannot (no index, no such call), the worker scans the mapping itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from rlmd.search.grep import grep as _grep
from rlmd.search.hit import Hit
from rlmd.search.locate import Locator
from rlmd.search.ranked import ranked as _ranked

#: The REPL call a worker sends to search a large context through the daemon.
CALL_SEARCH = "search"


class ReplHit(dict):
    """One hit as model code sees it: a dict that prints readably."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def where(self) -> str:
        if self.get("file") is not None:
            fl = self.get("file_line")
            return f"{self['file']}:{fl}" if fl is not None else f"{self['file']} (header)"
        return f"line {self['line']}"

    def __repr__(self) -> str:
        return f"[{self.where()} @{self['start']}:{self['end']}] {self['text']}"

    __str__ = __repr__


class HitList(list):
    """A list of hits that prints one hit per line (``print(search(...))`` reads well)."""

    def __repr__(self) -> str:
        return "\n".join(repr(h) for h in self) if self else "[] (no hits)"

    __str__ = __repr__


def _wrap(hits: list[Hit] | list[dict]) -> HitList:
    return HitList(ReplHit(h if isinstance(h, dict) else msgspec.to_builtins(h)) for h in hits)


def make_functions(
    context: Any,
    call: Callable[[str, dict[str, Any]], Any] | None = None,
    *,
    via_daemon: bool = False,
) -> dict[str, Callable[..., HitList]]:
    """The REPL's ``search`` and ``grep`` over ``context`` (a str or the mapped view).

    ``via_daemon``: try the daemon's index first (``call(CALL_SEARCH, ...)``)."""
    state: dict[str, Locator] = {}

    def loc() -> Locator:
        if context is None:
            raise RuntimeError("there is no context in this REPL to search")
        if "loc" not in state:
            state["loc"] = Locator(context)  # offsets, lines, file headers: built once
        return state["loc"]

    def search(query: str, k: int = 10) -> HitList:
        """The k passages of the context that best match ``query`` (keywords or a
        question), best first: each with start/end (character offsets), line, file and
        file_line (directory contexts), score and text."""
        if not isinstance(query, str):
            raise TypeError(f"search: query must be a str, got {type(query).__name__}")
        if via_daemon and call is not None:
            try:
                out = call(CALL_SEARCH, {"query": query, "k": int(k)})
                if isinstance(out, list):
                    return _wrap(out)
            except RuntimeError:
                pass  # the daemon could not: scan the mapping here
        return _wrap(_ranked(loc(), query, k))

    def grep(pattern: str, max_matches: int = 100) -> HitList:
        """Every line matching the Python regex ``pattern`` (the whole line, not just the
        match), in order, with start/end, line, file and file_line."""
        return _wrap(_grep(loc(), pattern, max_matches))

    return {"search": search, "grep": grep}
