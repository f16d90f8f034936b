"""The daemon side of the REPL's ``search`` call (see ``rlmd/search/repl.py``).

The engine's ``on_call`` dispatches ``fn == "search"`` here, in a thread (it reads the
store): ``await asyncio.to_thread(handle_call, store, context_name, fn, args)``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rlmd.search.repl import CALL_SEARCH

CALLS = frozenset({CALL_SEARCH})


def handle_call(store: Any, context_name: str | None, fn: str, args: dict[str, Any]) -> Any:
    """Answer a worker's ``search`` call ``{"query": str, "k": int}`` from the store (its
    index when built) as a list of hit dicts.  Raises ``ValueError`` for anything else;
    the worker then scans the mapping itself."""
    if fn not in CALLS:
        raise ValueError(f"unknown REPL call {fn!r}")
    if context_name is None:
        raise ValueError("search: this query has no context")
    query, k = args.get("query"), args.get("k", 10)
    if not isinstance(query, str) or isinstance(k, bool) or not isinstance(k, int):
        raise ValueError("search: takes a str query and an int k")
    return msgspec.to_builtins(store.search_ranked(context_name, query, k))
