"""Checks of an answer against the context, for what the answer's own words cannot show.

Each check answers one failure seen in the issue 10 fact benches with the embedded model,
and returns the feedback the model gets (once a loop) or None:

- :func:`missing_name`: the question's name occurs nowhere in the text, yet a value came
  back (the absent bench: the number of another key, taken from the evidence).
- :func:`other_name`: the sentence that holds the answer names another key of the same
  shape and not the asked one (the distractor bench: ``gentle-wombat``'s number given
  for the asked key).
- :func:`newer_value`: the text gives the asked name a second value that is marked newer
  (a later date, "updated to", "replaces every earlier record") than the one answered
  (the distractor bench: the outdated record taken because it came first).

- :func:`next_hop`: the answer is the key of a further fact the question asks for (the
  two-hop bench: ``854``, the vault that keeps the records, given for "the magic number
  of the vault", while the text says "The special magic number of vault 854 is 9933116").

All are synchronous (store reads): call them in a thread.
"""

from __future__ import annotations

import datetime as dt
import re

from rlmd.engine.anchors import name_pattern, question_names
from rlmd.engine.context_text import ContextText

SENTENCE_BACK = 200  # how far back from a value its sentence is looked for
AROUND = 240  # how much text around a name is read for its values
_NAME = re.compile(r"(?<![\w-])[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)+(?![\w-])")
_INT = re.compile(r"(?<![\w.,])\d{3,}(?![\w.,]\d)")
_ISO = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_MONTHS = {
    m: i
    for i, m in enumerate(
        "january february march april may june july august september october november "
        "december".split(),
        1,
    )
}
_DMY = re.compile(r"\b(\d{1,2}) (" + "|".join(_MONTHS) + r") (\d{4})\b", re.I)
_UPDATE = re.compile(
    r"\b(updated to|changed to|replaced by|replaces|superseded|supersedes|now|became|"
    r"current(?:ly)?|latest|corrected to)\b",
    re.I,
)


def missing_name(answer: str, names: list[str]) -> str | None:
    """Feedback when every name of the question is absent from the text (``names``: what
    :func:`rlmd.engine.anchors.missing_names` found) and the answer is a value anyway."""
    if not names:
        return None
    quoted = ", ".join(repr(n) for n in names)
    return (
        f"FINAL({_short(answer)}) was not accepted: {quoted} occurs nowhere in the text "
        "(the whole text was searched, ignoring case), so that value belongs to something "
        "else. If the text does not give the answer, write FINAL(not found)."
    )


def _shape(name: str) -> tuple[str, ...]:
    return tuple(
        "d" if p.isdigit() else "a" if p.isalpha() else "x" for p in re.split(r"[-_]", name)
    ) + (("_",) if "_" in name else ("-",))


def other_name(answer: str, question: str, ctx: ContextText) -> str | None:
    """Feedback when every sentence of the text holding the answer's number is about
    another name of the same shape as the question's (and none names the asked one)."""
    names = question_names(question)
    wanted = [n for n in names if _NAME.fullmatch(n)]
    numbers = _INT.findall(answer)
    if not wanted or len(numbers) != 1:
        return None
    shapes = {_shape(n) for n in wanted}
    asked = [re.compile(name_pattern(n)) for n in wanted]
    others: list[str] = []
    matches = ctx.find(rf"(?<![\d.]){re.escape(numbers[0])}(?!\d)", 20)
    if not matches:
        return None
    for m in matches:
        back = ctx.read(max(0, m.start - SENTENCE_BACK), m.start)
        cut = max(back.rfind(". "), back.rfind("\n"))
        sentence = back[cut + 1 :]
        if any(rx.search(sentence) for rx in asked):
            return None
        found = [x for x in _NAME.findall(sentence) if _shape(x) in shapes]
        if not found:
            return None  # a sentence with no name at all (a second hop): no judgement
        others.append(found[-1])
    return (
        f"FINAL({_short(answer)}) was not accepted: in the text that number belongs to "
        f"{others[0]!r}, not to {wanted[0]!r}. Find the sentence that names {wanted[0]!r} "
        "and take its value."
    )


def _date(text: str) -> dt.date | None:
    dates = []
    for y, mo, d in _ISO.findall(text):
        try:
            dates.append(dt.date(int(y), int(mo), int(d)))
        except ValueError:
            pass
    for d, month, y in _DMY.findall(text):
        try:
            dates.append(dt.date(int(y), _MONTHS[month.lower()], int(d)))
        except ValueError:
            pass
    return max(dates) if dates else None


def newer_value(answer: str, question: str, ctx: ContextText) -> str | None:
    """Feedback when the text gives the question's name another value of the answer's
    shape, marked newer than the answered one (a later date or an update phrase)."""
    numbers = _INT.findall(answer)
    if len(numbers) != 1:
        return None
    value = numbers[0]
    for name in question_names(question):
        mentions = []  # (value, date, marked, where, text) per value near the name
        for m in ctx.find(name_pattern(name), 20):
            lo = max(0, m.start - AROUND // 2)
            around = ctx.read(lo, m.end + AROUND)
            rel = m.start - lo
            start = max(around.rfind("\n", 0, rel), around.rfind("[", 0, rel), 0)
            text = around[start : around.find("\n", rel) if "\n" in around[rel:] else None]
            for v in _INT.finditer(text):
                if len(v.group(0)) != len(value):
                    continue
                tail = text[: v.start()]
                marked = bool(_UPDATE.search(tail[-60:])) or bool(
                    _UPDATE.search(text[v.end() : v.end() + 60])
                )
                mentions.append((v.group(0), _date(text), marked, v.start(), m.line, text))
        answered = [x for x in mentions if x[0] == value]
        rivals = [x for x in mentions if x[0] != value]
        if not answered or not rivals:
            continue
        a = answered[0]
        for r in rivals:
            same_text = r[5] == a[5]
            newer = (
                (same_text and r[3] > a[3] and r[2])
                or (not same_text and r[1] and a[1] and r[1] > a[1])
                or (not same_text and r[2] and not a[2])
            )
            if newer:
                return (
                    f"FINAL({_short(answer)}) was not accepted yet: the text gives {name!r} "
                    f"more than one value. Line {a[4]}: {_clip(a[5])}\nLine {r[4]}: "
                    f"{_clip(r[5])}\nThe question asks for the current value: the one with "
                    "the later date, or the one said to update or replace the other."
                )
    return None


_CONTENT = re.compile(r"[A-Za-z]{4,}")
_FUNCTION_WORDS = frozenset(
    "what which that this their there these those with from into about text says said "
    "answer only number".split()
)


def next_hop(answer: str, question: str, ctx: ContextText) -> str | None:
    """Feedback when the answer's number is the subject of a sentence that gives it a
    value ("... of vault 854 is 9933116") and shares at least two of the question's
    content words: the answer is a step on the way, not what was asked."""
    numbers = _INT.findall(answer)
    if len(numbers) != 1:
        return None
    n = numbers[0]
    asked = {w.lower() for w in _CONTENT.findall(question)} - _FUNCTION_WORDS
    rx = re.compile(rf"(?<![\d.]){re.escape(n)}\s+(?:is|was|=|:)\s+(\d{{3,}})(?![\d])")
    for m in ctx.find(rf"(?<![\d.]){re.escape(n)}\s+(?:is|was|=|:)\s+\d{{3,}}", 20):
        lo = max(0, m.start - SENTENCE_BACK)
        around = ctx.read(lo, m.end + 40)
        rel = m.start - lo
        cut = max(around.rfind(". ", 0, rel), around.rfind("\n", 0, rel))
        end = around.find(".", rel + len(n))
        sentence = around[cut + 1 : end if end > 0 else None].strip()
        hit = rx.search(sentence)
        words = {w.lower() for w in _CONTENT.findall(sentence)}
        if hit is None or hit.group(1) == n or len(asked & words) < 2:
            continue
        return (
            f"FINAL({_short(answer)}) was not accepted yet: line {m.line} says "
            f'"{_clip(sentence)}." {n} leads to {hit.group(1)} there. If the question '
            f"asks for that value, answer FINAL({hit.group(1)})."
        )
    return None


def _clip(text: str, limit: int = 220) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + " …"


def _short(answer: str, limit: int = 80) -> str:
    return answer if len(answer) <= limit else answer[:limit] + "…"
