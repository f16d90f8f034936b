"""OOLONG-Pairs-style questions (Zhang, Kraska, Khattab, 2025) over OOLONG windows.

Each question asks for every pair of user IDs where both users meet a condition on the
(hidden) labels of their questions, e.g. "both users have at least 3 instances labelled
'location'".  The answer is a set of pairs, scored by F1.  Conditions are drawn until the
set of qualifying users has between 2 and 30 members, so that the gold list stays
writable (at most 435 pairs) at every context length.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from itertools import combinations

from rlmd.bench import CHARS_PER_TOKEN, BenchError, Task, format_length
from rlmd.bench.oolong import LABELS, Line, build_window, load_records

MIN_USERS, MAX_USERS = 2, 30

_INSTRUCTIONS = (
    "Each of the questions can be labelled as one of the labels (the data does not provide "
    "the labels; you need to figure out the label from the semantics of the question): "
    + ", ".join(LABELS)
    + ". In your answer, list all pairs in the format (user_id_1, user_id_2), one pair per "
    "line, with the lower ID first and no duplicate pairs. If no pair qualifies, answer "
    "'none'."
)

Cond = Callable[[Counter], bool]


def user_counts(lines: list[Line]) -> dict[int, Counter]:
    """Per user, how many of their lines carry each label."""
    out: dict[int, Counter] = defaultdict(Counter)
    for x in lines:
        out[x.user][x.label] += 1
    return dict(out)


def _n(t: int) -> str:
    return f"{t} instance" if t == 1 else f"{t} instances"


def _threshold(rng: random.Random, values: list[int]) -> int | None:
    """A threshold t such that between MIN_USERS and MAX_USERS values are >= t."""
    ranked = sorted(values, reverse=True)
    ks = [
        k
        for k in range(MIN_USERS, min(MAX_USERS, len(ranked)) + 1)
        if ranked[k - 1] > 0 and (k == len(ranked) or ranked[k - 1] > ranked[k])
    ]
    return ranked[rng.choice(ks) - 1] if ks else None


def _condition(rng: random.Random, counts: dict[int, Counter]) -> tuple[str, Cond] | None:
    kind = rng.choice(["at_least", "either", "exactly_one", "both_labels_none"])
    a, b = rng.sample(LABELS, 2)
    if kind == "at_least":
        t = _threshold(rng, [c[a] for c in counts.values()])
        if t is None:
            return None
        return f"at least {_n(t)} with the label '{a}'", lambda c: c[a] >= t
    if kind == "either":
        t = _threshold(rng, [c[a] + c[b] for c in counts.values()])
        if t is None:
            return None
        return (
            f"at least {_n(t)} with the label '{a}' or '{b}' (counted together)",
            lambda c: c[a] + c[b] >= t,
        )
    if kind == "exactly_one":
        return f"exactly one instance with the label '{a}'", lambda c: c[a] == 1
    return (
        f"at least one instance with the label '{a}' and no instance with the label '{b}'",
        lambda c: c[a] >= 1 and c[b] == 0,
    )


def pick_question(rng: random.Random, lines: list[Line]) -> tuple[str, list[str], list[int]]:
    """(condition text, gold pairs as ``"a,b"``, qualifying users) for one window."""
    counts = user_counts(lines)
    for _ in range(200):
        got = _condition(rng, counts)
        if got is None:
            continue
        text, cond = got
        users = sorted(u for u, c in counts.items() if cond(c))
        if MIN_USERS <= len(users) <= MAX_USERS:
            gold = [f"{a},{b}" for a, b in combinations(users, 2)]
            return text, gold, users
    raise BenchError("could not find a pairs condition with 2..30 qualifying users")


def tasks(lengths: list[int], n: int, seed: int) -> Iterator[Task]:
    """``n`` pair questions per length, one per context window."""
    records = load_records()
    for length in lengths:
        for i in range(n):
            rng = random.Random(f"pairs:{seed}:{length}:{i}")
            lines, context = build_window(rng, records, length * CHARS_PER_TOKEN)
            cond, gold, users = pick_question(rng, lines)
            tid = f"pairs-{format_length(length)}-s{seed}-{i}"
            question = (
                "In the above data, list all pairs of user IDs where both users have "
                f"{cond}. {_INSTRUCTIONS}"
            )
            yield Task(
                id=tid,
                suite="pairs",
                length_tokens=length,
                context_key=tid,
                context=context,
                question=question,
                gold=gold,
                scorer="pairs_f1",
                meta={"condition": cond, "users": users, "lines": len(lines)},
            )
