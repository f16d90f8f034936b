"""S-NIAH: one needle in a haystack, after RULER's ``niah_single`` tasks.

The haystack is essay-like prose generated from fixed word lists and sentence templates
(no downloads).  One needle -- "One of the special magic numbers for fierce-walrus is:
4711201." -- sits at a stated depth (fraction of the text before it), at a sentence
boundary.  Distractor needles of the same kind, with other keys and other values, sit
elsewhere, so an answer must match the key, not just the pattern.  Needle keys are drawn
from vocabularies the haystack never uses, so the key occurs only in its needle.
"""

from __future__ import annotations

import bisect
import random
import uuid
from collections.abc import Iterator

from rlmd.bench import CHARS_PER_TOKEN, Task, format_length

KINDS = ("number", "word", "uuid")
DEPTHS = tuple(i / 10 for i in range(11))

_SUBJECTS = (
    "the committee the engineer the river the old library the village council the harvest "
    "the orchestra the small company the museum the gardener the city the research team "
    "the ferry the lighthouse keeper the market the school the bakery the railway the "
    "painter the farmer the novelist the observatory the mayor the carpenter the weaver "
    "the orchard the fishing fleet the archive the teacher the choir the mill the bridge"
).split(" the ")
_VERBS = (
    "considered,described,rebuilt,questioned,celebrated,ignored,measured,discovered,"
    "remembered,explained,abandoned,improved,studied,welcomed,postponed,organized,"
    "documented,repaired,admired,challenged,revisited,planned,recorded,imagined,shared"
).split(",")
_OBJECTS = (
    "a quiet plan,the winter schedule,an unusual map,the northern road,a forgotten song,"
    "the annual report,a careful argument,the eastern wall,an early draft,the grain supply,"
    "a long letter,the spring festival,a modest proposal,the tide tables,an honest account,"
    "the narrow staircase,a bright lantern,the shared garden,a steady rhythm,the stone path,"
    "a patient answer,the river crossing,an open question,the evening lessons,a new ledger"
).split(",")
_TAILS = (
    "before the season turned,after many long debates,with surprising patience,"
    "without much ceremony,as the rain kept falling,in the hours before dawn,"
    "while the town slept,despite the cold weather,for reasons few understood,"
    "under a pale grey sky,as everyone expected,with a little help from friends,"
    "in a spirit of curiosity,at the edge of the valley,long after the meeting ended"
).split(",")
_OPENERS = (
    "In the end,,Over the years,,Some said that,,Later that year,,It is said that,,"
    "By most accounts,,Every autumn,,Once again,,Quite often,,Meanwhile,"
).split(",,")
_REFLECTIONS = (
    "Nobody could say exactly why it mattered so much.",
    "The lesson, if there was one, was about patience.",
    "Such stories are common in places that change slowly.",
    "Looking back, the details seem less important than the mood.",
    "It was, in its own way, a kind of progress.",
    "Few people wrote any of it down at the time.",
    "The question returned every few years in a new form.",
    "What remained was a habit of careful attention.",
)

# Needle keys: adjective-animal, from words the haystack never uses.
_KEY_ADJ = (
    "fierce amber brisk cobalt dainty eager frosty gentle hollow icy jolly keen lucid "
    "mellow nimble opal plucky quirky rustic sable tawny umber vivid wistful zesty"
).split()
_KEY_NOUN = (
    "walrus heron ocelot badger lynx marmot osprey tapir wombat gecko ibis jackal kestrel "
    "lemur mongoose narwhal otter pelican quokka raven stoat toucan vole yak zebu"
).split()
# Values for the "word" kind: code words, again absent from the haystack.
_CODE_WORDS = (
    "azimuth bramble cinder dervish ember fathom gossamer halcyon inkwell juniper kelvin "
    "lodestar mistral nebula obsidian paragon quasar rampart saffron tundra umbra vortex "
    "wharf xenon yarrow zephyr"
).split()

_TYPE_NOUN = {"number": "number", "word": "word", "uuid": "uuid"}


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.1:
        return rng.choice(_REFLECTIONS)
    opener = rng.choice(_OPENERS).strip()
    subj = rng.choice(_SUBJECTS).strip()
    if not subj.startswith("the "):
        subj = "the " + subj
    body = f"{subj} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
    if r < 0.55:
        return f"{opener} {body}"
    return body[0].upper() + body[1:]


def haystack_sentences(rng: random.Random, chars: int) -> list[str]:
    """Sentences (each ending with a space or paragraph break) totalling about ``chars``."""
    pool = [_sentence(rng) for _ in range(2048)]
    out: list[str] = []
    total = 0
    while total < chars:
        n = rng.randint(3, 8)
        para = rng.choices(pool, k=n)
        for i, s in enumerate(para):
            s = s + ("\n\n" if i == n - 1 else " ")
            out.append(s)
            total += len(s)
    return out


def make_value(rng: random.Random, kind: str) -> str:
    """A needle value of the given kind."""
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return f"{rng.choice(_CODE_WORDS)}-{rng.choice(_CODE_WORDS)}-{rng.randint(10, 99)}"
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}; choose from {', '.join(KINDS)}")


def needle_text(kind: str, key: str, value: str) -> str:
    """The needle sentence, as RULER writes it."""
    return f"One of the special magic {_TYPE_NOUN[kind]}s for {key} is: {value}. "


def build_task(length_tokens: int, index: int, seed: int) -> Task:
    """One S-NIAH task; the kind, depth and distractor count cycle with ``index``."""
    rng = random.Random(f"sniah:{seed}:{length_tokens}:{index}")
    kind = KINDS[index % len(KINDS)]
    depth = DEPTHS[(index * 7 + seed) % len(DEPTHS)]
    n_distractors = index % 4
    keys: list[str] = []
    while len(keys) < 1 + n_distractors:
        k = f"{rng.choice(_KEY_ADJ)}-{rng.choice(_KEY_NOUN)}"
        if k not in keys:
            keys.append(k)
    values: list[str] = []
    while len(values) < len(keys):
        v = make_value(rng, kind)
        if v not in values:
            values.append(v)
    needles = [needle_text(kind, k, v) for k, v in zip(keys, values, strict=True)]
    budget = length_tokens * CHARS_PER_TOKEN - sum(len(n) for n in needles)
    sents = haystack_sentences(rng, max(budget, 0))
    # Trim the haystack to the budget so the context matches the stated length.
    total = sum(len(s) for s in sents)
    while sents and total > budget:
        total -= len(sents.pop())
    starts = [0]
    for s in sents:
        starts.append(starts[-1] + len(s))
    hay_len = starts[-1]

    # Insertion points are sentence indexes; the real needle goes nearest to its depth,
    # distractors at other random boundaries.
    def boundary(frac: float) -> int:
        i = bisect.bisect_left(starts, frac * hay_len)
        if (
            i > 0
            and i < len(starts)
            and (starts[i] - frac * hay_len) > (frac * hay_len - starts[i - 1])
        ):
            i -= 1
        return min(i, len(sents))

    spots = [(boundary(depth), 0)]
    for j in range(1, len(needles)):
        spots.append((boundary(rng.random()), j))
    # Insert from the back so earlier indexes stay valid; at a shared boundary the real
    # needle goes in last, so it ends up first, exactly at its depth.
    for pos, j in sorted(spots, reverse=True):
        sents.insert(pos, needles[j])
    context = "".join(sents)
    key, value = keys[0], values[0]
    noun = _TYPE_NOUN[kind]
    question = (
        f"Some special magic {noun}s are hidden within the text. What is the special magic "
        f"{noun} for {key} mentioned in the text? Answer with the {noun} only."
    )
    tid = f"sniah-{format_length(length_tokens)}-s{seed}-{index}"
    return Task(
        id=tid,
        suite="sniah",
        length_tokens=length_tokens,
        context_key=tid,
        context=context,
        question=question,
        gold=value,
        scorer="contains",
        meta={
            "kind": kind,
            "depth": depth,
            "key": key,
            "needle": needles[0],
            "needle_offset": context.index(needles[0]),
            "distractors": [
                {"key": k, "value": v} for k, v in zip(keys[1:], values[1:], strict=True)
            ],
        },
    )


def tasks(lengths: list[int], n: int, seed: int) -> Iterator[Task]:
    """``n`` S-NIAH tasks per length."""
    for length in lengths:
        for i in range(n):
            yield build_task(length, i, seed)
