"""The answer checks against the question's names (issue 10, the fact benches' failures):
each fires on the generated haystack it was written for and stays quiet on the right
answer and on the near misses (a second hop, a question with no names)."""

from __future__ import annotations

import pytest

from rlmd.bench.facts import build_absent, build_distractor, build_needle, build_twohop
from rlmd.engine.anchors import missing_names, name_pattern, question_names
from rlmd.engine.answer_checks import missing_name, newer_value, next_hop, other_name
from rlmd.engine.context_text import ContextText
from rlmd.engine.evidence import definition_pattern, snippet
from rlmd.engine.parse import find_final, parse_reply


def ctx_of(text: str) -> ContextText:
    return ContextText(len(text), text=text)


def test_question_names_are_identifiers_and_quotes_not_words():
    q = 'What is price_per_kwh for the "east wing" M40 box of icy-ibis, camelCase too?'
    assert question_names(q) == ["price_per_kwh", "east wing", "M40", "icy-ibis"]
    assert question_names("What electricity price does the config set?") == []
    import re

    rx = re.compile(name_pattern("icy-ibis"))
    assert rx.search("the ICY IBIS key") and rx.search("icy_ibis") and not rx.search("icy-ibises")
    assert re.search(name_pattern("kWh"), "price_per_kwh = 0.45")  # a unit inside a name


@pytest.mark.parametrize("index", range(3))
def test_a_name_absent_from_the_text_is_found_missing(index):
    t = build_absent(2000, index, 0)
    assert missing_names(t.question, ctx_of(t.context)) == [t.meta["key"]]
    text = missing_name(t.meta["present"][0]["value"], [t.meta["key"]])
    assert text and "occurs nowhere" in text and "FINAL(not found)" in text
    # A needle question's name is there: nothing to say.
    n = build_needle(2000, index, 0)
    assert missing_names(n.question, ctx_of(n.context)) == []


@pytest.mark.parametrize("index", range(3))
def test_another_keys_number_is_sent_back_and_the_right_one_is_not(index):
    t = build_needle(2000, index, 0)
    ctx = ctx_of(t.context)
    wrong = t.meta["others"][0]
    text = other_name(wrong["value"], t.question, ctx)
    assert text and repr(wrong["key"]) in text and repr(t.meta["key"]) in text
    assert other_name(t.gold, t.question, ctx) is None


def test_a_second_hop_is_not_taken_for_another_name():
    t = build_twohop(2000, 0, 0)
    ctx = ctx_of(t.context)
    assert other_name(t.gold[0], t.question, ctx) is None
    assert newer_value(t.gold[0], t.question, ctx) is None


@pytest.mark.parametrize("index", range(4))  # records (even) and inline (odd) forms
def test_the_outdated_value_is_sent_back_with_both_lines(index):
    t = build_distractor(2000, index, 0)
    ctx = ctx_of(t.context)
    old, new = t.meta["outdated"], t.meta["current"]
    text = newer_value(old, t.question, ctx)
    assert text is not None and old in text and new in text and "current value" in text
    assert newer_value(new, t.question, ctx) is None


def test_an_evidence_snippet_is_cut_around_the_asked_name():
    t = build_needle(2000, 1, 0)
    at = t.meta["needle_offset"]
    passage = t.context[at - 600 : at + 600]
    shown = snippet(passage, t.question)
    assert t.gold in shown and t.meta["key"] in shown and len(shown) < 260
    assert shown.startswith("… ") and shown.endswith(" …")
    # A short passage is shown whole.
    assert snippet("a b c", t.question) == "a b c"


def test_a_definition_question_finds_definers_and_a_count_question_does_not():
    import re

    code = (
        "    other = self.__class__.__new__(self.__class__)\n"
        "    def __new__(cls, *args):\n"
        "(defun rlm-query (text)\n"
        "(rlm-query-region)\n"
    )
    rx = definition_pattern("Which file defines the function or method `__new__`?")
    assert rx is not None and [m.group(0) for m in re.finditer(rx, code)] == ["    def __new__"]
    rx = definition_pattern("Where is the definition of `rlm-query`?")
    assert rx is not None and [m.group(0) for m in re.finditer(rx, code)] == ["(defun rlm-query"]
    # codeqa's callers question counts definitions that call X: the callers, not X's own.
    q = "How many function or method definitions in the code above contain a call to `f`?"
    assert definition_pattern(q) is None
    assert definition_pattern("Which class defined in the code has the most methods?") is None


def test_final_in_another_case_is_an_answer():
    # The absent trace ended with ``Final(4458732)``, which was not read as an answer.
    assert find_final("Final(4458732)").value == "4458732"
    assert parse_reply("I looked.\nfinal(not found)").final.value == "not found"
    assert parse_reply("final_var(result)").final.kind == "var"


@pytest.mark.parametrize("index", range(3))
def test_the_first_hop_given_as_the_answer_is_sent_on_to_the_second(index):
    # The two-hop bench: the vault that keeps the records given for its magic number.
    t = build_twohop(2000, index, 0)
    ctx = ctx_of(t.context)
    text = next_hop(str(t.meta["vault"]), t.question, ctx)
    assert text is not None and f"FINAL({t.gold[0]})" in text
    assert next_hop(t.gold[0], t.question, ctx) is None
    # A needle's or a distractor's value is no step to anything.
    n = build_needle(2000, index, 0)
    assert next_hop(n.gold, n.question, ctx_of(n.context)) is None
    d = build_distractor(2000, index, 0)
    assert next_hop(d.meta["outdated"], d.question, ctx_of(d.context)) is None
