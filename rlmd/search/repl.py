"""``search``, ``grep`` and ``outline`` as REPL functions (bound in ``rlmd/repl/worker.py``).

They return lists of :class:`ReplHit`: dicts (``hit["text"]``, JSON-able) that also read
as attributes (``hit.line``) and print one readable line each, ``file:file_line`` or
``line N``, the character offsets, and the text.  A large context (the mapped view) asks
the daemon first, which answers from the context's index when one is built (the call
``search`` with ``{"query", "k"}``, see :func:`rlmd.search.handlers.handle_call`); when the
daemon cannot (no index, no such call), the worker scans the mapping itself.  ``outline``
(:mod:`rlmd.search.outline`) reads the text in the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from rlmd.search.grep import grep as _grep
from rlmd.search.hit import Hit
from rlmd.search.locate import Locator
from rlmd.search.outline import outline as _outline
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
        """``file:line`` for a text of joined files, else ``line N``."""
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


class ReplDefinition(ReplHit):
    """One definition of ``outline()``: prints its place, kind, name and, for a class,
    its method count; for a nested one, what encloses it."""

    def __repr__(self) -> str:
        what = f"{self['kind']} {self['name']}"
        if self.get("methods") is not None:
            what += f" ({self['methods']} methods)"
        if self.get("parent"):
            what += f" in {self['parent']}"
        return f"[{self.where()} @{self['start']}:{self['end']}] {what}"

    __str__ = __repr__


def _wrap(hits: list[Hit] | list[dict]) -> HitList:
    return HitList(ReplHit(h if isinstance(h, dict) else msgspec.to_builtins(h)) for h in hits)


def make_functions(
    context: Any,
    call: Callable[[str, dict[str, Any]], Any] | None = None,
    *,
    via_daemon: bool = False,
) -> dict[str, Callable[..., HitList]]:
    """The REPL's ``search``, ``grep`` and ``outline`` over ``context`` (a str or the
    mapped view).

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

    def outline(file: str | None = None) -> HitList:
        """The classes and functions defined in the context (or in the one ``file`` of a
        directory context), in order: each with kind, name, start/end, line, file,
        file_line, depth, parent and, for a class, ``methods`` (functions directly in its
        body)."""
        if file is not None and not isinstance(file, str):
            raise TypeError(f"outline: file must be a str, got {type(file).__name__}")
        defs = _outline(loc())
        if file is not None:
            defs = [d for d in defs if d.file is not None and _same_file(d.file, file)]
        return HitList(ReplDefinition(msgspec.to_builtins(d)) for d in defs)

    return {"search": search, "grep": grep, "outline": outline}


def _same_file(rel: str, asked: str) -> bool:
    """``asked`` names ``rel``: the same path, or its last components (``server.py`` for
    ``http/server.py``)."""
    asked = asked.strip()
    while asked.startswith("./"):
        asked = asked[2:]
    return rel == asked or rel.endswith("/" + asked)
