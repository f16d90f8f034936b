"""Pure tests of the engine's reading of model replies (rlmd/engine/parse.py)."""

from __future__ import annotations

import pytest

from rlmd.engine.parse import (
    Final,
    StreamCutter,
    find_final,
    non_answer_reason,
    parse_reply,
    truncate_output,
)

FENCE = "```"


def test_repl_blocks_in_order_and_prose():
    text = (
        f"Look first.\n{FENCE}repl\nx = 1\nprint(x)\n{FENCE}\n"
        f"then\n{FENCE}repl\nprint(2)\n{FENCE}\n"
    )
    r = parse_reply(text)
    assert r.blocks == ["x = 1\nprint(x)\n", "print(2)\n"]
    assert r.final is None
    assert "Look first." in r.prose and "then" in r.prose and "print" not in r.prose


def test_python_fence_runs_only_without_repl_fence():
    only_py = f"{FENCE}python\nprint(1)\n{FENCE}\n"
    assert parse_reply(only_py).blocks == ["print(1)\n"]
    both = f"{FENCE}python\nexample()\n{FENCE}\n{FENCE}repl\nprint(2)\n{FENCE}\n"
    r = parse_reply(both)
    assert r.blocks == ["print(2)\n"]
    assert "example()" in r.prose


def test_final_on_its_own_line():
    assert find_final("I found it.\nFINAL(42)\n") == Final("answer", "42")
    assert find_final("  **FINAL(Paris)**") == Final("answer", "Paris")
    # FINAL mentioned inside a sentence is not a finish.
    assert find_final("When done I will call FINAL(answer).") is None


def test_final_multiline_with_parentheses():
    text = "FINAL(The culprits are:\n- Alice (the cook)\n- Bob (the driver)\n)\nThanks."
    f = find_final(text)
    assert f == Final("answer", "The culprits are:\n- Alice (the cook)\n- Bob (the driver)")


def test_final_unbalanced_parentheses_in_answer():
    assert find_final("FINAL(1) apples, 2) pears)") == Final("answer", "1) apples, 2) pears")
    assert find_final("FINAL(it was :)") == Final("answer", "it was :")
    # A reply cut short before the closing parenthesis still yields its answer.
    assert find_final("FINAL(the answer is 7") == Final("answer", "the answer is 7")


def test_final_quoted_answers_are_unquoted():
    assert find_final('FINAL("Paris")') == Final("answer", "Paris")
    assert find_final("FINAL('It's fine')") == Final("answer", "It's fine")
    assert find_final('FINAL("""two\nlines""")') == Final("answer", "two\nlines")


def test_final_var_forms():
    assert find_final("FINAL_VAR(result)") == Final("var", "result")
    assert find_final("FINAL_VAR('result')") == Final("var", "result")
    assert find_final("FINAL_VAR((a, b))") == Final("expr", "(a, b)")
    assert find_final("FINAL_VAR(a, b)") == Final("expr", "a, b")
    assert find_final("FINAL_VAR(counts['x'])") == Final("expr", "counts['x']")


def test_final_inside_a_fence():
    # Not Python: the fenced FINAL is the model's answer.
    r = parse_reply(f"Done.\n{FENCE}repl\nFINAL(The answer is 42 (approx))\n{FENCE}\n")
    assert r.blocks == []
    assert r.final == Final("answer", "The answer is 42 (approx)")
    # Valid Python: the REPL runs it (FINAL is a function there).
    r = parse_reply(f"{FENCE}repl\nFINAL(answer)\n{FENCE}\n")
    assert r.blocks == ["FINAL(answer)\n"]
    assert r.final is None
    # A plain fence is prose.
    r = parse_reply(f"{FENCE}\nFINAL(blue)\n{FENCE}\n")
    assert r.final == Final("answer", "blue")


def test_final_in_code_is_not_a_prose_final():
    r = parse_reply(f"{FENCE}repl\nx = 1\n# FINAL(x) later\n{FENCE}\n")
    assert r.final is None


def test_unclosed_block_runs_to_end():
    r = parse_reply(f"{FENCE}repl\nprint(1)\n")
    assert r.blocks == ["print(1)\n"]


@pytest.mark.parametrize(
    "answer",
    ["", "  ", "answer", "...", "I will first look at the context.", "Let me check the logs."],
)
def test_non_answers(answer):
    assert non_answer_reason(answer) is not None


@pytest.mark.parametrize("answer", ["42", "Paris is the capital.", "Alice (the cook)"])
def test_real_answers(answer):
    assert non_answer_reason(answer) is None


def test_truncate_keeps_head_and_tail_with_note():
    text = "".join(f"line {i}\n" for i in range(10_000))
    out = truncate_output(text, 1000)
    assert out.startswith("line 0\n")
    assert out.endswith("line 9999\n")
    assert "characters cut" in out
    assert f"{len(text) - 1000:,}" in out
    assert len(out) < 1200
    assert truncate_output("short", 1000) == "short"


def _stream(text: str, size: int, **kw) -> tuple[StreamCutter, list[str], bool]:
    c = StreamCutter(**kw)
    kept: list[str] = []
    stop = False
    for i in range(0, len(text), size):
        part, stop = c.feed(text[i : i + size])
        kept.append(part)
        if stop:
            break
    return c, kept, stop


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_stream_cut_at_closing_fence(size):
    text = f"Probe.\n{FENCE}repl\nprint(len(context))\n{FENCE}\nOutput: 12345 (invented)\n"
    c, kept, stop = _stream(text, size)
    assert stop
    assert c.text == f"Probe.\n{FENCE}repl\nprint(len(context))\n{FENCE}"
    assert "".join(kept) == c.text
    assert parse_reply(c.text).blocks == ["print(len(context))\n"]


def test_stream_does_not_cut_at_other_fences_or_inner_backticks():
    text = f"{FENCE}text\nhello\n{FENCE}\nmore\n{FENCE}repl\ns = '```x'\n{FENCE}\nafter"
    c, _, stop = _stream(text, 2)
    assert stop
    assert c.text.endswith("s = '```x'\n```")


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_stream_cut_after_final(size):
    text = "All found.\nFINAL(Alice (cook)\nand Bob)\nThat is all, I hope.\n"
    c, _, stop = _stream(text, size)
    assert stop
    assert c.text == "All found.\nFINAL(Alice (cook)\nand Bob)"
    assert find_final(c.text) == Final("answer", "Alice (cook)\nand Bob")


def test_stream_without_cut_keeps_everything():
    text = f"{FENCE}repl\nprint(1)\n{FENCE}\nmore"
    c, kept, stop = _stream(text, 4, stop_at_block=False)
    assert not stop
    assert c.text == text == "".join(kept)


def test_a_bare_fence_that_calls_the_repl_runs():
    # The codeqa trace at 32k: a bare fence of grep(...) sent twice, read as prose.
    r = parse_reply(f'{FENCE}\nprint(grep(r"__new__", 5))\n{FENCE}\n')
    assert r.blocks == ['print(grep(r"__new__", 5))\n']
    # Bare fences of other text, or beside a runnable fence, stay prose.
    assert parse_reply(f"{FENCE}\nx = 1 + 2\n{FENCE}\n").blocks == []
    assert parse_reply(f"{FENCE}\nthe context holds it\n{FENCE}\n").blocks == []
    both = parse_reply(f"{FENCE}\nprint(context[:9])\n{FENCE}\n{FENCE}repl\nprint(1)\n{FENCE}\n")
    assert both.blocks == ["print(1)\n"]
