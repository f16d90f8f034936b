"""Scorers: turn a model's answer and a task's gold answer into a score in [0, 1].

Each task names its scorer (``Task.scorer``); :func:`score` dispatches on that name.

- ``oolong:<type>`` follows the official OOLONG scorer (Bertsch et al., 2025): the answer
  is the text after the last ``:`` with ``*``, ``[`` and ``]`` removed; exact match scores 1;
  for ``comparison`` the phrases "more common", "less common" and "same frequency" match
  when the answer and the gold both contain the same one; for ``numeric`` the partial
  credit is ``0.75 ** |gold - predicted|``; ``date`` answers must parse to the same date.
  One leniency: the exact match ignores case and surrounding whitespace, quotes and a
  final full stop (OOLONG's models rarely add them; small local models often do).
- ``contains``: RULER's ``string_match_all`` for one needle: 1 if the gold string occurs
  in the answer (case-insensitive), else 0.
- ``pairs_f1``: OOLONG-Pairs (Zhang et al., 2025): F1 between the set of unordered pairs
  in the answer and the gold set.
- ``codeqa:path``: the answer names the gold file (its path or dotted module name).
- ``codeqa:name``: the gold identifier occurs in the answer as a whole word.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Sequence

Gold = str | int | list[str]

COMPARISON_PHRASES = ("more common", "less common", "same frequency")

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}


class ScoringError(ValueError):
    """A task names a scorer that does not exist."""


def oolong_extract(answer: str) -> str:
    """The part of a model's answer OOLONG scores: after the last ``:``, without ``*[]``."""
    tail = answer.rsplit(":", 1)[-1]
    for ch in "*[]":
        tail = tail.replace(ch, "")
    return tail.strip()


def _norm(text: str) -> str:
    return text.strip().strip("\"'`").strip().rstrip(".").strip().lower()


def _parse_int(text: str) -> int | None:
    m = re.fullmatch(r"[-+]?\d[\d,]*(?:\.0+)?", text.strip().rstrip("."))
    if not m:
        return None
    return int(float(m.group(0).replace(",", "")))


def parse_date(text: str) -> _dt.date | None:
    """Parse the date formats OOLONG contexts use (``Jun 16, 2024``) and ISO dates."""
    t = text.strip().rstrip(".")
    m = re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", t)
    if m:
        y, mo, d = (int(g) for g in m.groups())
    else:
        m = re.fullmatch(r"([A-Za-z]{3})[a-z]*\.?\s+(\d{1,2}),?\s+(\d{4})", t)
        if not m or m.group(1).lower() not in _MONTHS:
            return None
        y, mo, d = int(m.group(3)), _MONTHS[m.group(1).lower()], int(m.group(2))
    try:
        return _dt.date(y, mo, d)
    except ValueError:
        return None


def oolong_score(answer: str, gold: Gold, answer_type: str) -> float:
    """Score one OOLONG answer; ``answer_type`` is label, numeric, comparison or date."""
    pred = oolong_extract(answer)
    gold_s = str(gold[0] if isinstance(gold, list) else gold)
    if _norm(pred) == _norm(gold_s):
        return 1.0
    if answer_type == "comparison":
        p, g = pred.lower(), gold_s.lower()
        return 1.0 if any(ph in p and ph in g for ph in COMPARISON_PHRASES) else 0.0
    if answer_type == "numeric":
        gi, pi = _parse_int(gold_s), _parse_int(pred)
        if gi is None or pi is None:
            return 0.0
        return 0.75 ** abs(gi - pi)
    if answer_type == "date":
        gd, pd = parse_date(gold_s), parse_date(pred)
        return 1.0 if gd is not None and gd == pd else 0.0
    return 0.0


def contains_score(answer: str, gold: Gold) -> float:
    """RULER ``string_match_all`` for one reference: the gold occurs in the answer."""
    refs = gold if isinstance(gold, list) else [str(gold)]
    if not refs:
        return 0.0
    low = answer.lower()
    return sum(1.0 for r in refs if r.lower() in low) / len(refs)


_PAIR_RE = re.compile(r"(\d+)\s*(?:,|\band\b|&|-)\s*(\d+)")


def parse_pairs(text: str) -> set[tuple[str, str]]:
    """Unordered pairs of numeric IDs written as ``(a, b)``, ``a,b`` or ``a and b``."""
    pairs: set[tuple[str, str]] = set()
    for a, b in _PAIR_RE.findall(text):
        a, b = str(int(a)), str(int(b))
        if a != b:
            pairs.add((a, b) if int(a) < int(b) else (b, a))
    return pairs


def f1_score(predicted: set, gold: set) -> float:
    """F1 of two sets; two empty sets agree perfectly."""
    if not predicted and not gold:
        return 1.0
    hit = len(predicted & gold)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(predicted), hit / len(gold)
    return 2 * precision * recall / (precision + recall)


def pairs_f1(answer: str, gold: Gold) -> float:
    """OOLONG-Pairs: F1 over unordered ID pairs; gold is a list of ``"a,b"`` strings."""
    gold_list: Sequence[str] = gold if isinstance(gold, list) else [str(gold)]
    gold_set = parse_pairs(" ; ".join(gold_list))
    return f1_score(parse_pairs(answer), gold_set)


def codeqa_path(answer: str, gold: Gold) -> float:
    """The answer names the file: its relative path, or its dotted module name."""
    path = str(gold)
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    low = answer.lower()
    if path.lower() in low:
        return 1.0
    return 1.0 if re.search(rf"(?<![\w.]){re.escape(module.lower())}(?![\w])", low) else 0.0


def codeqa_name(answer: str, gold: Gold) -> float:
    """The gold identifier occurs in the answer as a whole word (case-sensitive)."""
    return 1.0 if re.search(rf"(?<!\w){re.escape(str(gold))}(?!\w)", answer) else 0.0


def codeqa_numeric(answer: str, gold: Gold) -> float:
    """OOLONG's numeric credit, taking the last integer after the last ``:``."""
    nums = re.findall(r"-?\d[\d,]*", oolong_extract(answer))
    gi = _parse_int(str(gold))
    if not nums or gi is None:
        return 0.0
    return 0.75 ** abs(gi - int(nums[-1].replace(",", "")))


_SCORERS: dict[str, Callable[[str, Gold], float]] = {
    "contains": contains_score,
    "pairs_f1": pairs_f1,
    "codeqa:path": codeqa_path,
    "codeqa:name": codeqa_name,
    "codeqa:numeric": codeqa_numeric,
}


def score(scorer: str, answer: str | None, gold: Gold) -> float:
    """Score ``answer`` against ``gold`` with the scorer named ``scorer``; no answer is 0."""
    if scorer.startswith("oolong:"):
        kind = scorer.split(":", 1)[1]
        if kind not in ("label", "numeric", "comparison", "date"):
            raise ScoringError(f"unknown OOLONG answer type {kind!r} in scorer {scorer!r}")
        return oolong_score(answer or "", gold, kind) if answer else 0.0
    fn = _SCORERS.get(scorer)
    if fn is None:
        known = ", ".join([*_SCORERS, "oolong:<label|numeric|comparison|date>"])
        raise ScoringError(f"unknown scorer {scorer!r}; known scorers: {known}")
    return fn(answer, gold) if answer else 0.0
