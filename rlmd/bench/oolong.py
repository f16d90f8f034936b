"""OOLONG-style aggregation over TREC-coarse questions (Bertsch et al., 2025).

A context window holds N lines ``Date: Jun 16, 2024 || User: 98779 || Instance: <TREC
question>`` between an instruction header and its "Recall" repeat.  The gold coarse label
of each question is *not* shown, so answering needs a semantic label per line (RLM
sub-calls); the questions ask for exact aggregate statistics over those labels:
counting, most/least frequent label, comparisons, per-user counts and date ranges.

The data is the validated TREC-coarse pool OOLONG samples from (MIT), shipped in the
repository as ``bench/data/oolong/trec_coarse_validated.jsonl`` with its LICENSE and a
provenance note, so a clone with nothing beside it runs the tests and the benchmark.
``RLMD_OOLONG_DATA`` (the file or its directory) points elsewhere.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec

from rlmd.bench import CHARS_PER_TOKEN, BenchError, Task, format_length

DATA_FILE = "trec_coarse_validated.jsonl"
ENV_VAR = "RLMD_OOLONG_DATA"
# OOLONG's class order.
LABELS = (
    "abbreviation",
    "entity",
    "description and abstract concept",
    "human being",
    "location",
    "numeric value",
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
DATE_START = _dt.date(2022, 1, 1)
DATE_DAYS = 3 * 365
QUESTIONS_PER_WINDOW = 4


class Record(msgspec.Struct, frozen=True):
    """One labelled TREC question from the pool."""

    input: str
    label: str


class Line(msgspec.Struct, frozen=True):
    """One line of a context window, with the hidden label kept for the gold answers."""

    date: _dt.date
    user: int
    text: str
    label: str


def data_path() -> Path:
    """Where the TREC-coarse pool is: ``RLMD_OOLONG_DATA`` or ``bench/data/oolong``."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        return p / DATA_FILE if p.is_dir() else p
    repo = Path(__file__).resolve().parents[2]
    return repo / "bench" / "data" / "oolong" / DATA_FILE


def load_records(path: Path | None = None) -> list[Record]:
    """Read the pool (``input``, ``label`` per line), as OOLONG's loader does."""
    p = path or data_path()
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchError(
            f"cannot read the OOLONG TREC-coarse data at {p}: {exc.strerror}. Put "
            f"{DATA_FILE} there (see the OOLONG repository, "
            f"src/data_gen/oolong-synth/validated_data/) or set {ENV_VAR} to its path."
        ) from None
    out: list[Record] = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(Record(input=obj["input"], label=obj["label"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{p}:{i}: not an OOLONG record ({exc})") from None
    unknown = {r.label for r in out} - set(LABELS)
    if unknown:
        raise BenchError(f"{p}: unexpected labels {sorted(unknown)}; expected {LABELS}")
    return out


def format_date(d: _dt.date) -> str:
    """``Jun 16, 2024``, independent of the locale."""
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def format_line(line: Line) -> str:
    """The context line OOLONG writes (label hidden)."""
    return f"Date: {format_date(line.date)} || User: {line.user} || Instance: {line.text}"


def _header(n: int) -> str:
    cats = ", ".join(f"'{lab}'" for lab in LABELS)
    return (
        f"The following lines contain {n} general-knowledge questions, one per line. Each "
        "line has a User ID, which is not necessarily unique, i.e. each User ID can be "
        "associated with multiple questions. Each question has an answer that can be "
        f"described as one of 6 categories: {cats} -- remember, the questions are not "
        "labeled; you must determine the label of each question yourself. You will be "
        f"asked to answer questions about the aggregate label statistics across all {n} "
        "examples in this dataset. Do not try to guess, estimate, or approximate the "
        "result. Answer the question exactly."
    )


def _recall(n: int) -> str:
    return (
        f"Recall: the preceding lines contain {n} general-knowledge questions, each with a "
        "date and a User ID; each question's answer falls into one of the 6 categories "
        "above. Compute the requested statistics exactly."
    )


def build_window(
    rng: random.Random, records: list[Record], target_chars: int, n_users: int | None = None
) -> tuple[list[Line], str]:
    """Sample a window of lines that fills ``target_chars``; returns (lines, context).

    The label distribution is drawn per window (Dirichlet(1) over the six classes), so
    class priors cannot be guessed; user IDs are Zipf-skewed, as in OOLONG.
    """
    by_label: dict[str, list[Record]] = {lab: [] for lab in LABELS}
    for r in records:
        by_label[r.label].append(r)
    weights = [rng.gammavariate(1.0, 1.0) + 0.05 for _ in LABELS]
    avg_line = 80
    est_lines = max(8, target_chars // avg_line)
    users_n = n_users or max(8, min(400, int(math.sqrt(est_lines) * 2)))
    users = rng.sample(range(10_000, 100_000), users_n)
    user_w = [1.0 / (i + 1) for i in range(users_n)]
    pools = {lab: rng.sample(rs, len(rs)) for lab, rs in by_label.items()}
    cursor = dict.fromkeys(LABELS, 0)
    budget = target_chars - len(_header(est_lines)) - len(_recall(est_lines)) - 16
    lines: list[Line] = []
    used = 0
    while True:
        lab = rng.choices(LABELS, weights)[0]
        pool = pools[lab]
        rec = pool[cursor[lab] % len(pool)]
        cursor[lab] += 1
        d = DATE_START + _dt.timedelta(days=rng.randrange(DATE_DAYS))
        line = Line(date=d, user=rng.choices(users, user_w)[0], text=rec.input, label=lab)
        size = len(format_line(line)) + 1
        if used + size > budget and lines:
            break
        lines.append(line)
        used += size
    n = len(lines)
    body = "\n".join(format_line(x) for x in lines)
    return lines, f"{_header(n)}\n\n{body}\n\n{_recall(n)}\n"


_ANSWER_FMT = {
    "numeric": "Give your final answer in the form 'Answer: <number>'.",
    "label": "Give your final answer in the form 'Label: <category name>'.",
    "comparison": (
        "Give your final answer in the form 'Answer: <X> is [more common than / less common "
        "than / same frequency as] <Y>'."
    ),
}


def _count_question(rng: random.Random, lines: list[Line]) -> tuple[str, str | int, str]:
    lab = rng.choice(LABELS)
    gold = sum(1 for x in lines if x.label == lab)
    q = f"In the above data, how many data points should be classified as label '{lab}'?"
    return q, gold, "numeric"


def _extreme_question(
    rng: random.Random, lines: list[Line], most: bool
) -> tuple[str, str | int, str] | None:
    counts = Counter({lab: 0 for lab in LABELS})
    counts.update(x.label for x in lines)
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=most)
    if ranked[0][1] == ranked[1][1]:
        return None  # a tie has no single right answer
    if most:
        q = "In the above data, which of the 6 labels is the most common?"
    else:
        q = (
            "In the above data, which of the 6 labels is the least common (a label that "
            "never occurs counts as 0)?"
        )
    return q, ranked[0][0], "label"


def _compare_question(rng: random.Random, lines: list[Line]) -> tuple[str, str | int, str]:
    a, b = rng.sample(LABELS, 2)
    ca = sum(1 for x in lines if x.label == a)
    cb = sum(1 for x in lines if x.label == b)
    rel = "more common than" if ca > cb else "less common than" if ca < cb else "same frequency as"
    q = (
        f"In the above data, is label '{a}' more common, less common, or the same frequency "
        f"as label '{b}'?"
    )
    return q, f"{a} is {rel} {b}", "comparison"


def _user_question(rng: random.Random, lines: list[Line]) -> tuple[str, str | int, str]:
    users = Counter(x.user for x in lines)
    user = rng.choice([u for u, _ in users.most_common(5)])
    lab = rng.choice(LABELS)
    gold = sum(1 for x in lines if x.user == user and x.label == lab)
    q = (
        f"In the above data, for the instances associated with User ID {user}, how many "
        f"should be classified as label '{lab}'?"
    )
    return q, gold, "numeric"


def _timeline_question(rng: random.Random, lines: list[Line]) -> tuple[str, str | int, str]:
    start = DATE_START + _dt.timedelta(days=rng.randrange(DATE_DAYS // 2))
    end = start + _dt.timedelta(days=rng.randrange(60, DATE_DAYS // 2))
    lab = rng.choice(LABELS)
    gold = sum(1 for x in lines if start <= x.date <= end and x.label == lab)
    q = (
        f"In the above data, how many instances dated from {format_date(start)} to "
        f"{format_date(end)} (both inclusive) should be classified as label '{lab}'?"
    )
    return q, gold, "numeric"


def make_questions(
    rng: random.Random, lines: list[Line], k: int
) -> list[tuple[str, str | int, str, str]]:
    """``k`` questions (text, gold, answer type, task kind) over one window."""
    kinds = ["count", "most", "compare", "user", "least", "timeline"]
    rng.shuffle(kinds)
    out: list[tuple[str, str | int, str, str]] = []
    for kind in kinds * 3:
        if len(out) >= k:
            break
        if kind == "count":
            item = _count_question(rng, lines)
        elif kind in ("most", "least"):
            item = _extreme_question(rng, lines, kind == "most")
        elif kind == "compare":
            item = _compare_question(rng, lines)
        elif kind == "user":
            item = _user_question(rng, lines)
        else:
            item = _timeline_question(rng, lines)
        if item is not None and all(item[0] != o[0] for o in out):
            out.append((*item, kind))
    return out


def tasks(lengths: list[int], n: int, seed: int) -> Iterator[Task]:
    """``n`` tasks per length, up to four questions per context window."""
    records = load_records()
    for length in lengths:
        produced = 0
        window = 0
        while produced < n:
            rng = random.Random(f"oolong:{seed}:{length}:{window}")
            lines, context = build_window(rng, records, length * CHARS_PER_TOKEN)
            key = f"oolong-{format_length(length)}-s{seed}-w{window}"
            k = min(QUESTIONS_PER_WINDOW, n - produced)
            for j, (q, gold, atype, kind) in enumerate(make_questions(rng, lines, k)):
                yield Task(
                    id=f"{key}-q{j}",
                    suite="oolong",
                    length_tokens=length,
                    context_key=key,
                    context=context,
                    question=f"{q} {_ANSWER_FMT[atype]}",
                    gold=gold,
                    scorer=f"oolong:{atype}",
                    meta={"task": kind, "lines": len(lines)},
                )
                produced += 1
            window += 1
