"""Fact-finding suites with exact answers: needle depths, distractors, two hops, absence.

Every suite here builds on the S-NIAH haystack (:mod:`rlmd.bench.sniah`: generated prose
whose words never occur in needle keys or values) and is deterministic from its seed:

- ``needle``: one needle at one of five depths (0, 0.25, 0.5, 0.75, 1, cycling with the
  task index), with two same-shaped needles for other keys elsewhere.  Scorer
  ``contains``.
- ``distractor``: the key has an outdated value and a current one.  Odd tasks say it in
  one sentence ("was X until <date>; on <later date> it was updated to Y"); even tasks
  hold two dated records far apart, the older one placed *after* the newer one in half of
  them, so the text order does not give the answer away.  Scorer ``contains_only``: the
  current value appears and the outdated one does not.
- ``twohop``: "K keeps its records in vault N." and, far away, "The magic number of
  vault N is V." plus three other vaults with their own numbers: the answer needs both
  facts.  Scorer ``contains_only`` (V, and no other vault's number).
- ``absent``: three needles for other keys; the question asks for a key that occurs
  nowhere in the text.  Scorer ``not_found`` (see :func:`rlmd.bench.scoring.not_found`):
  1 only for a "not found"-style answer that names no value of the asked kind.
- ``short``: the four kinds above in turn (needle, distractor, twohop, absent), for
  contexts of at most 4k tokens, where ``base`` and the size-aware default are compared
  on accuracy and wall time in one run.

Each task's ``meta`` records what a test needs to check the claim: the needle's offset
and depth, the dates of both records, the keys present.
"""

from __future__ import annotations

import bisect
import datetime as dt
import random
from collections.abc import Iterator

from rlmd.bench import CHARS_PER_TOKEN, BenchError, Task, format_length
from rlmd.bench.sniah import _KEY_ADJ, _KEY_NOUN, haystack_sentences, make_value

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHORT_MAX_TOKENS = 4096
SUITES = ("needle", "distractor", "twohop", "absent", "short")
_SHORT_CYCLE = ("needle", "distractor", "twohop", "absent")
KIND = "number"  # 7-digit values: exact to score, easy to tell apart from the prose


def _keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(_KEY_ADJ)}-{rng.choice(_KEY_NOUN)}"
        if k not in keys:
            keys.append(k)
    return keys


def _values(rng: random.Random, n: int) -> list[str]:
    vals: list[str] = []
    while len(vals) < n:
        v = make_value(rng, KIND)
        if v not in vals:
            vals.append(v)
    return vals


def _date(rng: random.Random, year_lo: int, year_hi: int) -> dt.date:
    start = dt.date(year_lo, 1, 1).toordinal()
    end = dt.date(year_hi, 12, 28).toordinal()
    return dt.date.fromordinal(rng.randint(start, end))


def _fmt(d: dt.date) -> str:
    return d.strftime("%d %B %Y").lstrip("0")


def place(
    rng: random.Random, chars: int, inserts: list[tuple[float, str]]
) -> tuple[str, list[int]]:
    """A haystack of about ``chars`` characters with each text at its depth, and offsets.

    Depth is the fraction of the haystack before the insert, rounded to the nearest
    sentence boundary.  Inserts at one boundary keep their list order.
    """
    budget = max(chars - sum(len(t) for _, t in inserts), 0)
    sents = haystack_sentences(rng, budget)
    total = sum(len(s) for s in sents)
    while sents and total > budget:
        total -= len(sents.pop())
    starts = [0]
    for s in sents:
        starts.append(starts[-1] + len(s))
    hay_len = starts[-1]

    def boundary(frac: float) -> int:
        target = frac * hay_len
        i = bisect.bisect_left(starts, target)
        if 0 < i < len(starts) and starts[i] - target > target - starts[i - 1]:
            i -= 1
        return min(i, len(sents))

    spots = [(boundary(frac), j) for j, (frac, _) in enumerate(inserts)]
    # From the back so earlier indexes stay valid; at a shared boundary the later insert
    # goes in first, so the list order is kept.
    for pos, j in sorted(spots, reverse=True):
        sents.insert(pos, inserts[j][1])
    context = "".join(sents)
    offsets: list[int] = []
    for _, text in inserts:
        offsets.append(context.index(text))
    return context, offsets


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}. "


def _question(key: str, extra: str = "") -> str:
    return (
        f"Some special magic numbers are hidden within the text. What is the special magic "
        f"number for {key}{extra}? Answer with the number only, or say that it is not found."
    )


def _far(rng: random.Random) -> tuple[float, float]:
    """Two depths at least half the text apart, in random order."""
    a = rng.uniform(0.05, 0.3)
    b = rng.uniform(0.7, 0.95)
    return (a, b) if rng.random() < 0.5 else (b, a)


def build_needle(length_tokens: int, index: int, seed: int, suite: str = "needle") -> Task:
    rng = random.Random(f"needle:{seed}:{length_tokens}:{index}")
    depth = DEPTHS[index % len(DEPTHS)]
    keys, values = _keys(rng, 3), _values(rng, 3)
    inserts = [(depth, _needle(keys[0], values[0]))]
    inserts += [(rng.random(), _needle(k, v)) for k, v in zip(keys[1:], values[1:], strict=True)]
    context, offsets = place(rng, length_tokens * CHARS_PER_TOKEN, inserts)
    tid = f"{suite}-{format_length(length_tokens)}-s{seed}-{index}"
    return Task(
        id=tid,
        suite=suite,
        length_tokens=length_tokens,
        context_key=tid,
        context=context,
        question=_question(keys[0]),
        gold=values[0],
        scorer="contains",
        meta={
            "kind": f"depth {depth:g}" if suite == "needle" else "needle",
            "depth": depth,
            "key": keys[0],
            "needle": inserts[0][1],
            "needle_offset": offsets[0],
            "others": [{"key": k, "value": v} for k, v in zip(keys[1:], values[1:], strict=True)],
        },
    )


def build_distractor(length_tokens: int, index: int, seed: int, suite: str = "distractor") -> Task:
    rng = random.Random(f"distractor:{seed}:{length_tokens}:{index}")
    key, other = _keys(rng, 2)
    old, new, other_value = _values(rng, 3)
    old_date = _date(rng, 2019, 2022)
    new_date = old_date + dt.timedelta(days=rng.randint(30, 900))
    chars = length_tokens * CHARS_PER_TOKEN
    if index % 2 == 1:
        form = "inline"
        text = (
            f"The special magic number for {key} was {old} until {_fmt(old_date)}; on "
            f"{_fmt(new_date)} it was updated to {new}, which is its current value. "
        )
        inserts = [(rng.uniform(0.1, 0.9), text)]
    else:
        form = "records"
        old_text = f"[{old_date.isoformat()}] Record: the special magic number for {key} is {old}. "
        new_text = (
            f"[{new_date.isoformat()}] Record: the special magic number for {key} is {new} "
            f"(this replaces every earlier record). "
        )
        d_new, d_old = _far(rng)
        inserts = [(d_new, new_text), (d_old, old_text)]
    inserts.append((rng.random(), _needle(other, other_value)))
    context, offsets = place(rng, chars, inserts)
    tid = f"{suite}-{format_length(length_tokens)}-s{seed}-{index}"
    return Task(
        id=tid,
        suite=suite,
        length_tokens=length_tokens,
        context_key=tid,
        context=context,
        question=_question(key, " now, after any updates"),
        gold=[new, old],
        scorer="contains_only",
        meta={
            "kind": f"distractor {form}" if suite == "distractor" else "distractor",
            "form": form,
            "key": key,
            "current": new,
            "outdated": old,
            "current_date": new_date.isoformat(),
            "outdated_date": old_date.isoformat(),
            "offsets": offsets,
        },
    )


def build_twohop(length_tokens: int, index: int, seed: int, suite: str = "twohop") -> Task:
    rng = random.Random(f"twohop:{seed}:{length_tokens}:{index}")
    (key,) = _keys(rng, 1)
    vaults = rng.sample(range(100, 1000), 4)
    codes = _values(rng, 4)
    first = f"The records of {key} are kept in vault {vaults[0]}. "
    second = f"The special magic number of vault {vaults[0]} is {codes[0]}. "
    d1, d2 = _far(rng)
    inserts = [(d1, first), (d2, second)]
    for v, c in zip(vaults[1:], codes[1:], strict=True):
        inserts.append((rng.random(), f"The special magic number of vault {v} is {c}. "))
    context, offsets = place(rng, length_tokens * CHARS_PER_TOKEN, inserts)
    tid = f"{suite}-{format_length(length_tokens)}-s{seed}-{index}"
    question = (
        f"The text says in which vault the records of {key} are kept, and elsewhere the "
        f"special magic number of each vault. What is the special magic number of the vault "
        f"that keeps the records of {key}? Answer with the number only."
    )
    return Task(
        id=tid,
        suite=suite,
        length_tokens=length_tokens,
        context_key=tid,
        context=context,
        question=question,
        gold=codes,  # the right one first, then the other vaults' numbers
        scorer="contains_only",
        meta={
            "kind": "twohop",
            "key": key,
            "vault": vaults[0],
            "facts": [first, second],
            "offsets": offsets[:2],
            "depths": [d1, d2],
        },
    )


def build_absent(length_tokens: int, index: int, seed: int, suite: str = "absent") -> Task:
    rng = random.Random(f"absent:{seed}:{length_tokens}:{index}")
    keys = _keys(rng, 4)
    asked, present = keys[0], keys[1:]
    values = _values(rng, len(present))
    inserts = [(rng.random(), _needle(k, v)) for k, v in zip(present, values, strict=True)]
    context, _ = place(rng, length_tokens * CHARS_PER_TOKEN, inserts)
    tid = f"{suite}-{format_length(length_tokens)}-s{seed}-{index}"
    return Task(
        id=tid,
        suite=suite,
        length_tokens=length_tokens,
        context_key=tid,
        context=context,
        question=_question(asked),
        gold=KIND,  # the kind of value an invented answer would look like
        scorer="not_found",
        meta={
            "kind": "absent",
            "key": asked,
            "present": [{"key": k, "value": v} for k, v in zip(present, values, strict=True)],
        },
    )


_BUILDERS = {
    "needle": build_needle,
    "distractor": build_distractor,
    "twohop": build_twohop,
    "absent": build_absent,
}


def tasks_for(suite: str, lengths: list[int], n: int, seed: int) -> Iterator[Task]:
    """``n`` tasks per length of one of :data:`SUITES`."""
    if suite == "short":
        too_long = [format_length(x) for x in lengths if x > SHORT_MAX_TOKENS]
        if too_long:
            raise BenchError(
                f"the short suite is for contexts of at most 4k tokens; drop {', '.join(too_long)}"
                " from --lengths (e.g. --lengths 2k,4k)"
            )
        for length in lengths:
            for i in range(n):
                kind = _SHORT_CYCLE[i % len(_SHORT_CYCLE)]
                yield _BUILDERS[kind](length, i, seed, "short")
        return
    build = _BUILDERS[suite]
    for length in lengths:
        for i in range(n):
            yield build(length, i, seed)
