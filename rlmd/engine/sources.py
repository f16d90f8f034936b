"""Where an answer stands in the context: its key facts found in the text, not taken on
the model's word.

Key facts are the numbers, quoted strings and distinctive tokens of the answer (all its
content words when it is short).  Each is searched in the context; the lines holding the
most of them are the sources, lines the model was shown first.  The answer is supported
when the chosen lines hold all its numbers, quotes and identifiers, and at least half of
its other words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlmd.engine.context_text import ContextText, Span
from rlmd.engine.types import Source

MAX_FACTS = 6
MAX_SOURCES = 3
SHORT_WORDS = 8
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,:/]\d+)*(?![\w])")
_QUOTED = re.compile(r"[\"'`“]([^\"'`”\n]{2,80})[\"'`”]")
_TOKEN = re.compile(r"[A-Za-z_][\w.-]*[\w]|[A-Za-z]{2,}")
# Words that say nothing about where an answer came from.
_STOP = frozenset(
    """a an and are as at be been by can could did do does for from has have he her his how
    i if in into is it its no not of on or our she so such than that the their them then
    there these they this those to was we were what when where which who why will with
    would you your yes answer text context question value set sets per example config
    found shows shown says given""".split()
)
_NOT_FOUND = re.compile(
    r"\b(not found|no (?:such|mention)|does not (?:say|contain|mention)|"
    r"could not find|cannot find|isn't (?:in|mentioned))\b",
    re.I,
)


@dataclass(frozen=True)
class Fact:
    text: str
    strict: bool  # a number, quote or identifier: must be found for the answer to count
    pattern: str


def key_facts(answer: str) -> list[Fact]:
    """The facts of ``answer`` worth finding in the context, most distinctive first."""
    facts: dict[str, Fact] = {}
    for m in _QUOTED.finditer(answer):
        q = m.group(1).strip()
        if q:
            facts.setdefault(q.lower(), Fact(q, True, re.escape(q)))
    for m in _NUMBER.finditer(answer):
        n = m.group(0).lstrip("+")
        facts.setdefault(n, Fact(n, True, rf"(?<![\d.]){re.escape(n)}(?![\d])"))
    short = len(answer.split()) <= SHORT_WORDS
    for m in _TOKEN.finditer(answer):
        w = m.group(0).strip(".-")
        if len(w) < 3 or w.lower() in _STOP or w.lower() in facts:
            continue
        ident = bool(re.search(r"\d|_|[a-z][A-Z]|^[A-Z0-9-]{3,}$", w))
        if not (short or ident or w[0].isupper()):
            continue
        facts.setdefault(w.lower(), Fact(w, ident, rf"(?i)(?<!\w){re.escape(w)}(?!\w)"))
    ordered = sorted(facts.values(), key=lambda f: (not f.strict, -len(f.text)))
    return ordered[:MAX_FACTS]


def is_not_found(answer: str) -> bool:
    """The answer says the context does not hold what was asked."""
    return bool(_NOT_FOUND.search(answer))


def find_sources(answer: str, ctx: ContextText, shown: list[str]) -> tuple[list[Source], bool]:
    """The spans of ``ctx`` that hold ``answer``'s key facts, and whether they support it.

    ``shown`` are the texts the model saw (outputs, the context when shown whole): lines
    among them win ties.  Synchronous (store reads): call it in a thread.
    """
    facts = key_facts(answer)
    if not facts or is_not_found(answer):
        return [], False
    seen = "\n".join(shown).lower()
    lines: dict[int, Span] = {}
    for f in facts:
        for m in ctx.find(f.pattern, 50):
            span = ctx.line_at(m)
            lines.setdefault(span.start, span)
    if not lines:
        return [], False
    compiled = [(f, re.compile(f.pattern)) for f in facts]

    def holds(span: Span) -> set[int]:
        return {i for i, (_f, rx) in enumerate(compiled) if rx.search(span.text)}

    def same_case(span: Span, held: set[int]) -> int:
        # Words match in any case, so "Class" found "an abstract base class" in the
        # text's opening lines before "class Class(SymbolTable):" (issue 10's codeqa
        # trace): the line that spells the answer as given is the better source.
        return sum(facts[i].text in span.text for i in held)

    covered: set[int] = set()
    chosen: list[Span] = []
    pool = list(lines.values())
    while pool and len(chosen) < MAX_SOURCES:
        best = max(
            pool,
            key=lambda s: (
                len(holds(s) - covered),
                same_case(s, holds(s) - covered),
                s.text.strip().lower() in seen if s.text.strip() else False,
                -s.start,
            ),
        )
        gain = holds(best) - covered
        if not gain:
            break
        chosen.append(best)
        covered |= gain
        pool.remove(best)
    strict = {i for i, (f, _rx) in enumerate(compiled) if f.strict}
    loose = set(range(len(facts))) - strict
    supported = strict <= covered and (not loose or len(loose & covered) * 2 >= len(loose))
    out = []
    for s in sorted(chosen, key=lambda s: s.start):
        loc = ctx.locate(s.start, s.line)
        text = s.text if len(s.text) <= 300 else s.text[:300] + " …"
        out.append(
            Source(
                start=s.start,
                end=s.end,
                line=s.line,
                text=text,
                file=loc[0] if loc else None,
                file_line=loc[1] if loc else None,
            )
        )
    return out, supported
