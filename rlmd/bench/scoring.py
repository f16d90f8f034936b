"""Scorers: turn a model's answer and a task's gold answer into a score in [0, 1].

Each task names its scorer (``Task.scorer``); :func:`score` dispatches on that name.

- ``oolong:<type>`` follows the official OOLONG scorer (Bertsch et al., 2025, its
  ``synth_process_response``): the answer is the text after the last ``:`` with ``*``,
  ``[`` and ``]`` removed (see :func:`oolong_extract`); exact match scores 1; a comparison
  phrase ("more common", "less common", "same frequency") scores 1 when the gold contains
  it; ``numeric`` answers get ``0.75 ** |gold - predicted|``; ``date`` answers must parse to
  the same date.  One leniency: the exact match ignores case, quotes and a final full stop
  (OOLONG's models rarely add them; small local models often do).
- ``contains``: RULER's ``string_match_all`` for one needle: 1 if the gold string occurs
  in the answer (case-insensitive), else 0.
- ``pairs_f1``: OOLONG-Pairs (Zhang et al., 2025): F1 between the set of unordered pairs
  in the answer and the gold set.
- ``codeqa:path``: the answer names the gold file (its path or dotted module name).
- ``codeqa:name``: the gold identifier occurs in the answer as a whole word.
- ``contains_only``: gold is ``[right, wrong, ...]``: 1 if ``right`` occurs in the answer
  and none of the wrong values does (each matched as a whole token, case-insensitive);
  an answer listing the outdated value beside the current one scores 0.
- ``not_found``: the answer is absent from the context; gold names the kind of value
  (``number``, ``word``, ``uuid``).  1 if the answer says it is not there (a phrase of
  :data:`NOT_FOUND_RE`: "not found", "not mentioned", "no such ...", "could not find",
  "does not appear", "there is no", "none", ...) AND names no value of that kind (no
  7-digit number, code word or UUID: invented or copied from another key, either is
  wrong); else 0.  An empty answer is 0.
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
    """The part of a model's answer OOLONG scores (its ``synth_attempt_answer_parse``).

    Without a ``:``, a short answer (< 20 chars) is taken whole and a long one by its
    last word.  Otherwise the text after the last ``:``, stripped, without ``*``, ``[``
    and ``]``; when that is 20 chars or longer and holds a comparison phrase, the phrase.
    """
    if ":" not in answer:
        if len(answer) < 20:
            return answer
        words = answer.split()
        return words[-1] if words else ""
    cand = answer.split(":")[-1].strip()
    for ch in "*[]":
        cand = cand.replace(ch, "")
    if len(cand) >= 20:
        for phrase in COMPARISON_PHRASES:
            if phrase in cand:
                return phrase
    return cand


def _norm(text: str) -> str:
    return text.strip().strip("\"'`").strip().rstrip(".").strip().lower()


def _parse_int(text: str) -> int | None:
    m = re.fullmatch(r"[-+]?\d+", text.strip())
    return int(m.group(0)) if m else None


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
    """Score one OOLONG answer; ``answer_type`` is label, numeric, comparison or date.

    The official rules in their order: exact match; a bare comparison phrase that occurs
    in the gold; numeric partial credit; equal dates.  Our one leniency: the exact match
    (and the integer parse) also ignore case, quotes and a final full stop.
    """
    pred = oolong_extract(answer)
    gold_s = str(gold[0] if isinstance(gold, list) else gold)
    if pred == gold_s or _norm(pred) == _norm(gold_s):
        return 1.0
    if pred in COMPARISON_PHRASES:
        return 1.0 if pred in gold_s else 0.0
    if answer_type == "numeric":
        gi, pi = _parse_int(gold_s), _parse_int(_norm(pred))
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
    """OOLONG's numeric credit for the last integer after the last ``:`` (if any)."""
    nums = re.findall(r"-?\d[\d,]*", answer.split(":")[-1])
    gi = _parse_int(str(gold))
    if not nums or gi is None:
        return 0.0
    return 0.75 ** abs(gi - int(nums[-1].replace(",", "")))


def _token_re(value: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", re.IGNORECASE)


def contains_only(answer: str, gold: Gold) -> float:
    """The first gold value occurs in the answer, and none of the others (distractors)."""
    refs = gold if isinstance(gold, list) else [str(gold)]
    if not refs:
        return 0.0
    right, wrong = refs[0], refs[1:]
    if not _token_re(right).search(answer):
        return 0.0
    return 0.0 if any(_token_re(w).search(answer) for w in wrong) else 1.0


NOT_FOUND_RE = re.compile(
    r"not\s+(?:be\s+)?(?:found|present|mentioned|given|stated|provided|included|available"
    r"|listed|specified|contained|in\s+the\s+(?:text|context|document))"
    r"|\bno\s+(?:such|special|magic|mention|information|record|value|number|answer|data)"
    r"|(?:does|did|do)(?:n't|\s+not)\s+(?:appear|exist|contain|mention|include|say|state|occur)"
    r"|(?:cannot|can't|could\s+not|couldn't|unable\s+to|failed\s+to)\s+(?:find|locate|determine)"
    r"|\bthere\s+is\s+no\b|\bisn't\s+(?:mentioned|present|there|in)|\bnone\b|\bunknown\b"
    r"|\bnot\s+(?:there|anywhere)\b",
    re.IGNORECASE,
)
VALUE_RES = {
    "number": re.compile(r"(?<!\d)\d{7}(?!\d)"),
    "word": re.compile(r"\b[a-z]+-[a-z]+-\d{2}\b", re.IGNORECASE),
    "uuid": re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I),
}


def not_found(answer: str, gold: Gold) -> float:
    """1 for a "not found"-style answer with no value of the asked kind in it (see above)."""
    kind = str(gold[0] if isinstance(gold, list) else gold)
    value_re = VALUE_RES.get(kind)
    if value_re is None:
        raise ScoringError(f"not_found: unknown value kind {kind!r}; use {', '.join(VALUE_RES)}")
    if value_re.search(answer):
        return 0.0
    return 1.0 if NOT_FOUND_RE.search(answer) else 0.0


_SCORERS: dict[str, Callable[[str, Gold], float]] = {
    "contains": contains_score,
    "pairs_f1": pairs_f1,
    "codeqa:path": codeqa_path,
    "codeqa:name": codeqa_name,
    "codeqa:numeric": codeqa_numeric,
    "contains_only": contains_only,
    "not_found": not_found,
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
