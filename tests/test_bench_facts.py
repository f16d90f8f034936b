"""The fact-finding suites (rlmd.bench.facts) and their scorers: deterministic, exact."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from rlmd.bench import BenchError, make_tasks
from rlmd.bench.facts import DEPTHS, SHORT_MAX_TOKENS
from rlmd.bench.runner import METHODS, query_options
from rlmd.bench.scoring import score

L = 16 * 1024  # tokens; 64k characters: fast to build, long enough to place depths apart


def _tasks(suite: str, n: int = 5, seed: int = 0, length: int = L):
    return list(make_tasks(suite, [length], n, seed))


@pytest.mark.parametrize("suite", ["needle", "distractor", "twohop", "absent"])
def test_same_seed_same_tasks_other_seed_other_tasks(suite):
    a, b, c = _tasks(suite, 3), _tasks(suite, 3), _tasks(suite, 3, seed=1)
    assert [(t.context, t.question, t.gold) for t in a] == [
        (t.context, t.question, t.gold) for t in b
    ]
    assert [t.context for t in a] != [t.context for t in c]
    for t in a:
        assert abs(len(t.context) - L * 4) < 2000  # the stated length, within a sentence or so


def test_needle_sits_at_its_stated_depth_and_only_there():
    tasks = _tasks("needle", 5)
    assert sorted(t.meta["depth"] for t in tasks) == sorted(DEPTHS)
    for t in tasks:
        needle = t.meta["needle"]
        assert t.context.count(needle) == 1
        assert t.context.count(t.meta["key"]) == 1  # the key occurs only in its needle
        off = t.context.index(needle)
        assert off == t.meta["needle_offset"]
        # Fraction of the rest of the text before it (the needle's own length excluded).
        frac = off / (len(t.context) - len(needle))
        assert abs(frac - t.meta["depth"]) < 0.01, (t.id, frac)
        assert t.score(f"The number is {t.gold}.") == 1.0
        assert t.score(t.meta["others"][0]["value"]) == 0.0


def test_large_needle_task_is_one_million_characters():
    (t,) = make_tasks("needle", [250_000], 1, 0)
    assert 999_000 <= len(t.context) <= 1_000_000
    assert t.context.count(t.meta["needle"]) == 1


def test_distractor_outdated_value_is_really_older():
    tasks = _tasks("distractor", 6)
    forms = {t.meta["form"] for t in tasks}
    assert forms == {"inline", "records"}
    later_in_text = 0
    for t in tasks:
        new, old = t.gold
        assert new == t.meta["current"] and old == t.meta["outdated"]
        assert dt.date.fromisoformat(t.meta["outdated_date"]) < dt.date.fromisoformat(
            t.meta["current_date"]
        )
        assert t.context.count(new) == 1 and t.context.count(old) == 1
        if t.meta["form"] == "records":
            # Each value sits in the record carrying its own date.
            rec_new = re.search(rf"\[(\d{{4}}-\d\d-\d\d)\][^\[]*?\b{new}\b", t.context)
            rec_old = re.search(rf"\[(\d{{4}}-\d\d-\d\d)\][^\[]*?\b{old}\b", t.context)
            assert rec_new and rec_new.group(1) == t.meta["current_date"]
            assert rec_old and rec_old.group(1) == t.meta["outdated_date"]
            later_in_text += t.context.index(old) > t.context.index(new)
        else:
            sentence = re.search(rf"was {old} until .*? updated to {new}", t.context)
            assert sentence is not None
    # Text order must not give the answer away: the outdated record comes later sometimes.
    assert 0 < later_in_text
    t = tasks[0]
    new, old = t.gold
    assert t.score(new) == 1.0
    assert t.score(f"It was {old}, now {new}") == 0.0  # both named: not an answer
    assert t.score(old) == 0.0


def test_twohop_needs_both_facts_far_apart():
    for t in _tasks("twohop", 5):
        first, second = t.meta["facts"]
        o1, o2 = t.meta["offsets"]
        assert t.context.count(first) == 1 and t.context.count(second) == 1
        assert abs(o1 - o2) > 0.35 * len(t.context)
        # The key names only the vault; the number is given only for the vault.
        assert t.context.count(t.meta["key"]) == 1
        assert len(re.findall(rf"vault {t.meta['vault']}\b", t.context)) == 2
        right, *others = t.gold
        assert right in second and len(others) == 3
        for o in others:
            assert o in t.context and o not in second
        assert t.score(right) == 1.0
        assert t.score(others[0]) == 0.0


def test_absent_key_really_absent():
    for t in _tasks("absent", 5):
        assert t.meta["key"] not in t.context
        adj, noun = t.meta["key"].split("-")
        assert f"{adj}-{noun}" not in t.context
        for p in t.meta["present"]:
            assert p["key"] in t.context and p["value"] in t.context
        assert t.gold == "number" and t.scorer == "not_found"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Not found", 1.0),
        ("The special magic number for lucid-otter is not mentioned in the text.", 1.0),
        ("I could not find it in the context.", 1.0),
        ("There is no such key.", 1.0),
        ("None", 1.0),
        ("The text does not contain a number for that key.", 1.0),
        ("4711201", 0.0),  # an invented (or borrowed) value
        ("Not found; the closest is 4711201 for another key.", 0.0),  # names a value
        ("12345", 0.0),  # a short invented number is still no "not found"
        ("The number is 8812345.", 0.0),
        ("", 0.0),
    ],
)
def test_not_found_scorer(answer, expected):
    assert score("not_found", answer, "number") == expected


def test_contains_only_matches_whole_tokens():
    assert score("contains_only", "1234567", ["1234567", "7654321"]) == 1.0
    assert score("contains_only", "11234567", ["1234567", "7654321"]) == 0.0
    assert score("contains_only", "1234567 or 7654321", ["1234567", "7654321"]) == 0.0


def test_short_suite_cycles_kinds_and_refuses_long_contexts():
    tasks = list(make_tasks("short", [2048, 4096], 8, 0))
    assert len(tasks) == 16
    kinds = [t.meta["kind"] for t in tasks[:4]]
    assert kinds == ["needle", "distractor", "twohop", "absent"]
    assert all(t.suite == "short" and len(t.context) <= SHORT_MAX_TOKENS * 4 for t in tasks)
    with pytest.raises(BenchError, match="at most 4k"):
        list(make_tasks("short", [8192], 1, 0))


def test_auto_method_sends_no_mode_and_rlm_asks_for_the_loop():
    from rlmd.bench.runner import BenchOptions

    opts = BenchOptions(suites=["needle"], lengths=[L], n=1, methods=list(METHODS))
    assert "auto" in METHODS
    assert query_options(opts, "auto").get("mode", "auto") == "auto"
    assert query_options(opts, "rlm")["mode"] == "rlm"
    assert query_options(opts, "base")["mode"] == "base"


def test_report_lists_each_query_with_tokens_turns_and_wall_time():
    from rlmd.bench.report import Result, markdown, summarize

    rs = [
        Result(
            task_id="needle-16k-s0-0",
            suite="needle",
            method="auto",
            length_tokens=L,
            score=1.0,
            task_kind="depth 0",
            tokens_in=4321,
            tokens_out=12,
            iterations=2,
            wall_s=17.25,
            finish="final",
        ),
        Result(
            task_id="needle-16k-s0-0",
            suite="needle",
            method="base",
            length_tokens=L,
            score=0.0,
            task_kind="depth 0",
            wall_s=3.0,
            error="timeout",
            error_kind="timeout",
        ),
    ]
    md = markdown(summarize(rs), {}, results=rs)
    assert "| needle-16k-s0-0 | depth 0 | auto | 1.00 | 4321 | 12 | 2 | 17.2 | final |" in md
    assert "| needle-16k-s0-0 | depth 0 | base | 0.00 | 0 | 0 | 0 | 3.0 | error: timeout |" in md
    assert "root turns" in md
