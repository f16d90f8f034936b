"""The method table: every family's routes, merged.

A family is a function ``routes(app) -> {method name: Method}`` in its own module.
Registering one is one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..improve import handlers as improve
from ..protocol.jsonrpc import Method
from ..repl import handlers as repl
from . import cache, context, daemon, pool, query

if TYPE_CHECKING:
    from ..app import App

Routes = dict[str, Method]
Family = Callable[["App"], Routes]

FAMILIES: tuple[Family, ...] = (
    daemon.routes,
    context.routes,
    query.routes,
    pool.routes,
    cache.routes,
    repl.routes,
    improve.routes,
)


def build_methods(app: App, families: Iterable[Family] = FAMILIES) -> Routes:
    """The method table for ``app``; a name claimed by two families is a startup error."""
    table: Routes = {}
    for family in families:
        for name, method in family(app).items():
            if name in table:
                raise ValueError(f"method {name!r} is registered twice ({family.__module__})")
            table[name] = method
    return table
