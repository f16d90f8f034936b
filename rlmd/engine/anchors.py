"""The names a question asks about, and whether the context holds them at all.

Seen in the absent-fact bench (issue 10): asked for the magic number of ``ancient-river``,
a key that occurs nowhere in the 1M characters, the embedded model answered at once with
the number of ``frosty-marmot`` from the evidence passages, a value that does stand in
the context, so a check of the answer's own words passes.  What gives the answer away
is the question's name: the engine can search the whole text for it, and a name found
nowhere means any value is someone else's.

A name is what a question spells like an identifier: words joined by ``-`` or ``_``,
camelCase, letters with digits (``M40``), or a quoted string.  Plain words are not
names: a question's wording often differs from the text's.
"""

from __future__ import annotations

import re
from typing import Protocol

from rlmd.store.search import SearchMatch

_NAME = re.compile(
    r"[\"“`]([^\"”`\n]{2,60})[\"”`]"
    r"|(?<![\w-])([A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)+|[a-z]+[A-Z]\w*|[A-Za-z]+\d\w*)(?![\w-])"
)
MAX_NAMES = 4


class Finder(Protocol):
    """What this module reads of ``ContextText``."""

    def find(self, pattern: str, max_matches: int = 50) -> list[SearchMatch]: ...


def question_names(question: str) -> list[str]:
    """The identifier-like names of ``question``, in order, at most :data:`MAX_NAMES`."""
    out: list[str] = []
    for m in _NAME.finditer(question):
        name = (m.group(1) or m.group(2) or "").strip()
        if len(name) >= 3 and name.lower() not in (n.lower() for n in out):
            out.append(name)
    return out[:MAX_NAMES]


def name_pattern(name: str) -> str:
    """A regex for ``name`` that ignores case and lets ``-``, ``_`` and a space stand for
    each other (``icy-ibis`` finds "icy ibis" and "ICY_IBIS").  Its ends need only not
    touch a letter or digit: "kWh" is found in ``price_per_kwh``, and a name is called
    missing only when it truly stands nowhere."""
    parts = [re.escape(p) for p in re.split(r"[-_ ]+", name) if p]
    return r"(?i)(?<![A-Za-z0-9])" + r"[-_ ]?".join(parts) + r"(?![A-Za-z0-9])"


def missing_names(question: str, ctx: Finder) -> list[str]:
    """The question's names when *none* of them occurs anywhere in the context, else [].

    One name found is enough to keep quiet: a question may also carry names of its own
    ("the well-known ...") that the text never writes.  Synchronous (store reads): call it
    in a thread.
    """
    names = question_names(question)
    if not names:
        return []
    for name in names:
        if ctx.find(name_pattern(name), 1):
            return []
    return names
