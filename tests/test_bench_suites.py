"""Benchmark suites: deterministic per seed, and their gold answers are right.

The gold answers are recomputed here independently, from the context text alone (plus the
label map of the OOLONG data file), by code written differently from the generators.
"""

from __future__ import annotations

import ast
import datetime as dt
import itertools
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from rlmd.bench import BenchError, make_tasks, parse_lengths
from rlmd.bench.oolong import data_path
from rlmd.bench.scoring import ScoringError, oolong_extract, parse_pairs, score

L8K = 8192
L16K = 16384


def _tasks(suite: str, lengths=(L8K,), n: int = 6, seed: int = 0):
    return list(make_tasks(suite, list(lengths), n, seed))


# ---------------------------------------------------------------- lengths and registry


def test_parse_lengths_binary_units_sorted_and_deduplicated():
    assert parse_lengths("64k, 8k,1m,8K") == [8192, 65536, 1048576]
    assert parse_lengths("32768") == [32768]


@pytest.mark.parametrize("bad", ["", "8x", "eight", "512"])
def test_parse_lengths_rejects_bad_input_with_advice(bad):
    with pytest.raises(BenchError, match=r"8k|1k|length"):
        parse_lengths(bad)


def test_unknown_suite_is_a_clear_error():
    with pytest.raises(BenchError, match="unknown suite 'nope'; choose from sniah"):
        make_tasks("nope", [L8K], 1)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("suite", ["sniah", "oolong", "pairs", "codeqa"])
def test_suites_are_deterministic_per_seed(suite):
    a = _tasks(suite, n=3, seed=5)
    b = _tasks(suite, n=3, seed=5)
    c = _tasks(suite, n=3, seed=6)
    assert [(t.id, t.context, t.question, t.gold) for t in a] == [
        (t.id, t.context, t.question, t.gold) for t in b
    ]
    assert [t.context for t in a] != [t.context for t in c]
    assert len({t.id for t in a}) == len(a) == 3


@pytest.mark.parametrize("suite", ["sniah", "oolong", "pairs", "codeqa"])
def test_contexts_fill_but_do_not_exceed_the_length(suite):
    for t in _tasks(suite, lengths=(L8K, L16K), n=2):
        chars = t.length_tokens * 4
        assert 0.85 * chars <= len(t.context) <= chars, (t.id, len(t.context))


# ---------------------------------------------------------------- sniah


def test_sniah_needle_at_stated_depth_and_distractors_differ():
    kinds = set()
    for t in _tasks("sniah", lengths=(L8K, L16K), n=8):
        ctx, meta = t.context, t.meta
        kinds.add(meta["kind"])
        needle = re.escape(meta["key"])
        hits = [m.start() for m in re.finditer(rf"magic \w+s for {needle} is: ", ctx)]
        assert len(hits) == 1, t.id  # the key occurs only in its needle
        # The value after the key is the gold answer.
        value = ctx[hits[0] :].split(" is: ", 1)[1].split(". ", 1)[0]
        assert value == t.gold
        assert ctx.count(str(t.gold)) == 1
        start = hits[0] - len("One of the special ")
        assert ctx[start:].startswith("One of the special magic")
        # Depth: the needle starts within one sentence (plus distractors) of its depth.
        slack = 400 + sum(60 + len(d["value"]) for d in meta["distractors"])
        assert abs(start - meta["depth"] * len(ctx)) <= slack, (t.id, start, meta["depth"])
        for d in meta["distractors"]:
            assert d["key"] != meta["key"] and d["value"] != t.gold
            assert ctx.count(f"for {d['key']} is: {d['value']}.") == 1
        total = len(re.findall(r"One of the special magic", ctx))
        assert total == 1 + len(meta["distractors"])
        assert t.score(f"The number is {t.gold}.") == 1.0
        assert t.score("I could not find it.") == 0.0
    assert kinds == {"number", "word", "uuid"}


def test_sniah_depths_cover_the_range():
    depths = {t.meta["depth"] for t in _tasks("sniah", n=11)}
    assert min(depths) == 0.0 and max(depths) == 1.0 and len(depths) == 11


# ---------------------------------------------------------------- oolong

_LINE = re.compile(r"^Date: (\w{3} \d{1,2}, \d{4}) \|\| User: (\d+) \|\| Instance: (.*)$", re.M)


def _label_map() -> dict[str, str]:
    with open(data_path(), encoding="utf-8") as f:
        return {obj["input"]: obj["label"] for obj in map(json.loads, f)}


def _rows(context: str, labels: dict[str, str]):
    rows = []
    for date, user, text in _LINE.findall(context):
        rows.append((dt.datetime.strptime(date, "%b %d, %Y").date(), int(user), labels[text]))
    return rows


def _oolong_gold(question: str, rows) -> str | int:
    """Answer an OOLONG question from the rows, by parsing the question text."""
    labels_in_q = re.findall(r"label '([^']+)'", question)
    if "how many" in question:
        (lab,) = labels_in_q
        keep = rows
        if m := re.search(r"User ID (\d+)", question):
            keep = [r for r in keep if r[1] == int(m.group(1))]
        if m := re.search(r"from (\w+ \d+, \d+) to (\w+ \d+, \d+)", question):
            lo, hi = (dt.datetime.strptime(g, "%b %d, %Y").date() for g in m.groups())
            keep = [r for r in keep if lo <= r[0] <= hi]
        return len([r for r in keep if r[2] == lab])
    six = [
        "abbreviation",
        "entity",
        "description and abstract concept",
        "human being",
        "location",
        "numeric value",
    ]
    tally = {lab: 0 for lab in six}
    for r in rows:
        tally[r[2]] += 1
    if "most common?" in question:
        return max(six, key=lambda lab: tally[lab])
    if "least common" in question:
        return min(six, key=lambda lab: tally[lab])
    a, b = labels_in_q
    word = (
        "more common than"
        if tally[a] > tally[b]
        else "less common than"
        if tally[a] < tally[b]
        else "same frequency as"
    )
    return f"{a} is {word} {b}"


def test_oolong_gold_matches_an_independent_count_over_the_data():
    labels = _label_map()
    tasks = _tasks("oolong", lengths=(L8K, L16K), n=12, seed=3)
    kinds = {t.meta["task"] for t in tasks}
    assert kinds == {"count", "most", "least", "compare", "user", "timeline"}
    for t in tasks:
        rows = _rows(t.context, labels)
        assert len(rows) == t.meta["lines"]
        assert f"contain {len(rows)} general-knowledge questions" in t.context
        assert not any(lab in t.context for lab in ("|| Label:", "label: location"))
        assert _oolong_gold(t.question, rows) == t.gold, t.id
        assert t.score(f"Answer: {t.gold}") == 1.0


def test_oolong_windows_share_context_between_questions():
    tasks = _tasks("oolong", n=6)
    keys = [t.context_key for t in tasks]
    assert keys.count(keys[0]) == 4 and len(set(keys)) == 2
    assert tasks[0].context is tasks[1].context


def test_oolong_missing_data_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("RLMD_OOLONG_DATA", str(tmp_path / "nothing.jsonl"))
    with pytest.raises(BenchError, match="RLMD_OOLONG_DATA"):
        _tasks("oolong", n=1)


# ---------------------------------------------------------------- pairs


def _pairs_gold(question: str, rows) -> set[tuple[str, str]]:
    per: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _, user, lab in rows:
        per[user][lab] += 1
    cond = question.split("where both users have ", 1)[1].split(". Each of", 1)[0]
    labs = re.findall(r"'([^']+)'", cond)
    if m := re.match(r"at least (\d+) instances? with the label '[^']+' or", cond):
        ok = lambda c: c[labs[0]] + c[labs[1]] >= int(m.group(1))  # noqa: E731
    elif m := re.match(r"at least (\d+) instances? with the label '[^']+'$", cond):
        ok = lambda c: c[labs[0]] >= int(m.group(1))  # noqa: E731
    elif cond.startswith("exactly one"):
        ok = lambda c: c[labs[0]] == 1  # noqa: E731
    else:
        assert cond.startswith("at least one instance"), cond
        ok = lambda c: c[labs[0]] > 0 and c[labs[1]] == 0  # noqa: E731
    users = sorted(u for u in per if ok(per[u]))
    return {(str(a), str(b)) for a, b in itertools.combinations(users, 2)}


def test_pairs_gold_matches_an_independent_computation():
    labels = _label_map()
    for t in _tasks("pairs", lengths=(L8K, L16K), n=6, seed=2):
        rows = _rows(t.context, labels)
        expected = _pairs_gold(t.question, rows)
        assert parse_pairs("\n".join(t.gold)) == expected, t.id
        assert 1 <= len(expected) <= 435
        answer = "\n".join(f"({a}, {b})" for a, b in sorted(expected))
        assert t.score(answer) == 1.0


# ---------------------------------------------------------------- codeqa


class _Facts(ast.NodeVisitor):
    """A second AST walk: a stack of open definitions instead of nested ast.walk calls."""

    def __init__(self) -> None:
        self.defined: list[str] = []
        self.callers: dict[str, set[int]] = defaultdict(set)
        self.methods: dict[str, int] = {}
        self.classes = 0
        self._open: list[int] = []
        self._next = 0

    def _func(self, node) -> None:
        self.defined.append(node.name)
        self._open.append(self._next)
        self._next += 1
        self.generic_visit(node)
        self._open.pop()

    visit_FunctionDef = _func
    visit_AsyncFunctionDef = _func

    def visit_ClassDef(self, node) -> None:
        self.classes += 1
        n = len([b for b in node.body if type(b).__name__ in ("FunctionDef", "AsyncFunctionDef")])
        self.methods[node.name] = max(n, self.methods.get(node.name, 0))
        self.generic_visit(node)

    def visit_Call(self, node) -> None:
        f = node.func
        name = getattr(f, "id", None) or getattr(f, "attr", None)
        if name:
            for d in self._open:
                self.callers[name].add(d)
        self.generic_visit(node)


def _split_files(context: str) -> dict[str, str]:
    parts = re.split(r"^# ==== FILE: (.+?) ====\n", context, flags=re.M)
    assert parts[0] == ""
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_codeqa_gold_matches_an_independent_ast_walk():
    seen = set()
    for t in _tasks("codeqa", lengths=(L8K, L16K), n=8, seed=1):
        files = _split_files(t.context)
        assert list(files) == t.meta["files"]
        facts = {}
        for path, src in files.items():
            v = _Facts()
            v.visit(ast.parse(src))
            facts[path] = v
        q, kind = t.question, t.meta["task"]
        seen.add(kind)
        if kind == "where":
            name = re.search(r"method `(\w+)`", q).group(1)
            owners = [p for p, v in facts.items() if name in v.defined]
            assert owners == [t.gold] and facts[t.gold].defined.count(name) == 1
        elif kind == "callers":
            name = re.search(r"named `(\w+)`", q).group(1)
            assert sum(len(v.callers.get(name, ())) for v in facts.values()) == t.gold
        elif kind == "most_methods":
            allm = [(n, m) for v in facts.values() for n, m in v.methods.items()]
            names = [n for n, _ in allm]
            unique = [(m, n) for n, m in allm if names.count(n) == 1]
            best = max(unique)
            assert best[1] == t.gold
            assert sum(1 for m, _ in unique if m == best[0]) == 1
        else:
            path = re.search(r"does the file (\S+) define", q).group(1)
            assert facts[path].classes == t.gold
        assert t.score(f"Answer: {t.gold}") == 1.0
    assert seen == {"where", "callers", "most_methods", "classes_in"}


# ---------------------------------------------------------------- scorers


def test_oolong_extract_follows_the_official_parse():
    assert oolong_extract("Reasoning: blah. Answer: **[location]**") == "location"
    assert oolong_extract("location") == "location"  # no colon, short: whole
    assert oolong_extract("The most frequent label is entity") == "entity"  # last word
    assert oolong_extract("Answer: entity is less common than location") == "less common"


@pytest.mark.parametrize(
    ("answer", "gold", "kind", "expected"),
    [
        ("Label: location", "location", "label", 1.0),
        ("Label: Location.", "location", "label", 1.0),
        ("Label: entity", "location", "label", 0.0),
        ("Answer: 12", 12, "numeric", 1.0),
        ("Answer: 10", 12, "numeric", 0.75**2),
        ("Answer: 15", 12, "numeric", 0.75**3),
        ("Answer: about twelve", 12, "numeric", 0.0),
        ("The count is exactly 12", 12, "numeric", 1.0),
        ("There are 12", 12, "numeric", 0.0),
        ("Answer: 12 instances", 12, "numeric", 0.0),
        ("Label: more common", "location", "label", 0.0),
        ("Answer: location is more common than entity", "location is more common than entity",
         "comparison", 1.0),
        ("Answer: more common", "location is more common than entity", "comparison", 1.0),
        ("Answer: less common", "location is more common than entity", "comparison", 0.0),
        ("Answer: same frequency", "a is same frequency as b", "comparison", 1.0),
        ("Answer: 2024-06-16", "Jun 16, 2024", "date", 1.0),
        ("Answer: Jun 17, 2024", "Jun 16, 2024", "date", 0.0),
        (None, "location", "label", 0.0),
    ],
)  # fmt: skip
def test_oolong_scorer_rules(answer, gold, kind, expected):
    assert score(f"oolong:{kind}", answer, gold) == pytest.approx(expected)


def test_pairs_f1_and_contains_and_unknown_scorer():
    gold = ["1,2", "1,3", "2,3"]
    assert score("pairs_f1", "(1, 2)\n(3, 1)\n(2, 3)", gold) == 1.0
    # 2 right of 2 predicted, 2 of 3 found: P=1, R=2/3.
    assert score("pairs_f1", "(1, 2), (1, 3)", gold) == pytest.approx(0.8)
    assert score("pairs_f1", "none", gold) == 0.0
    assert score("contains", "the value is 4711201", "4711201") == 1.0
    assert score("codeqa:path", "It is in json.decoder", "json/decoder.py") == 1.0
    assert score("codeqa:path", "Answer: json/encoder.py", "json/decoder.py") == 0.0
    assert score("codeqa:name", "Answer: Misc.", "Misc") == 1.0
    assert score("codeqa:name", "Answer: Miscellaneous", "Misc") == 0.0
    with pytest.raises(ScoringError, match="unknown scorer 'f2'"):
        score("f2", "x", "y")


def test_oolong_data_ships_inside_the_repository(monkeypatch):
    """A clone with nothing beside it has the data: bench/data/oolong, byte for byte."""
    import hashlib

    monkeypatch.delenv("RLMD_OOLONG_DATA", raising=False)
    repo = Path(__file__).resolve().parents[1]
    p = data_path()
    assert p == repo / "bench" / "data" / "oolong" / "trec_coarse_validated.jsonl"
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest == "84bcac41e631eb8d6666b04646977d6e4be5c444a5b939905cf589deb4d13dcc"
    assert (p.parent / "LICENSE").is_file() and (p.parent / "README.md").is_file()
