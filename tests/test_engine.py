"""The engine end to end in-process: a real Pool over a real Ollama provider talking to
the scripted loopback model server, a real REPL worker and a real context store.

The scripted "root model" answers by what the last user message says (the first
message carries the question; later ones carry the REPL output), so each test is a
small conversation whose answers can only come out right if the code really ran.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import string
import time
from pathlib import Path

import pytest

from rlmd.config import (
    Config,
    LimitsConfig,
    ModelsConfig,
    PoolConfig,
    ProviderConfig,
    TracesConfig,
)
from rlmd.engine import prompts
from rlmd.engine.parse import unsupported_words
from rlmd.engine.query import Engine
from rlmd.engine.trace import format_trace, prune_traces, read_trace
from rlmd.engine.types import EngineError, QueryOptions, QueryParams
from rlmd.pool.pool import Pool
from rlmd.providers.registry import build_provider
from rlmd.store.store import ContextStore
from rlmd.testing.script import ScriptedModels
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

ROOT = "root-model"
SUB = "sub-model"
SMALL = "tiny-coder-1.5b"  # a name that selects the small-model prompt
F = "```"


def repl(code: str, before: str = "", after: str = "") -> str:
    """A root reply holding one ```repl block."""
    return f"{before}\n{F}repl\n{code.strip()}\n{F}\n{after}"


class Script(ScriptedModels):
    """The scripted root and sub models of these tests (rlmd/testing/script.py)."""

    def __init__(self) -> None:
        super().__init__(sub_model=SUB)


class Rig:
    """An engine and everything it needs, plus the events of the last run."""

    def __init__(self, tmp: Path, srv: ScriptedServer, config: Config) -> None:
        self.tmp = tmp
        self.srv = srv
        self.config = config
        self.store = ContextStore(tmp / "contexts")
        providers = [build_provider(p, os.environ) for p in config.providers]
        self.pool = Pool(config, providers)
        self.engine = Engine(config=config, pool=self.pool, store=self.store, state_dir=tmp)
        self.events: list[dict] = []

    async def run(self, query: str, *, job: str = "job1", **kw) -> object:
        # These tests exercise the paper's loop; the size-aware start has its own tests.
        opts = {"mode": "rlm", **kw.pop("options", {})}
        params = QueryParams(query=query, job=job, options=QueryOptions(**opts), **kw)
        self.events = []
        return await self.engine.run(params, job, self.events.append)

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.events]


def make_config(url: str, *, price: float = 0.0, **limits) -> Config:
    lim = {"cell_timeout_s": 10.0, **limits}
    return Config(
        providers=[
            ProviderConfig(
                name="scripted",
                kind="ollama",
                base_url=url,
                models=[ROOT, SUB, SMALL],
                capacity=16,
                price_in_per_mtok=price,
                price_out_per_mtok=price,
            )
        ],
        models=ModelsConfig(root=ROOT, sub=SUB),
        limits=LimitsConfig(**lim),
        pool=PoolConfig(retries=1, backoff_base_s=0.01),
    )


@pytest.fixture
def script() -> Script:
    return Script()


def limits(**kw):
    """Decorator: config limits (and ``price``) for the ``rig`` of one test."""

    def deco(f):
        f.rig_limits = kw
        return f

    return deco


@pytest.fixture
async def rig(tmp_path, script, request):
    limits = dict(getattr(request.function, "rig_limits", {}))
    price = limits.pop("price", 0.0)
    with ScriptedServer(responder=script, models=[ROOT, SUB, SMALL]) as srv:
        r = Rig(tmp_path, srv, make_config(srv.url, price=price, **limits))
        try:
            yield r
        finally:
            await r.pool.aclose()


def haystack(n_lines: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    words = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(3, 9))) for _ in range(500)]
    return [" ".join(rnd.choices(words, k=12)) for _ in range(n_lines)]


# --------------------------------------------------------------------------- flows


async def test_needle_in_multi_mb_context(rig, script):
    lines = haystack(60_000)
    lines[41_234] = "note: the vault combination is 48213, keep it safe"
    rig.store.put_text("hay", "\n".join(lines))
    assert rig.store.info("hay").chars > 4_000_000
    script.on_root(
        r"Question: What is the vault combination",
        repl(
            "import re\nm = re.search(r'vault combination is (\\d+)', context)\n"
            "print('found', m.group(1), 'at', m.start())",
            before="I will search with a regex.",
            # A model that writes on after the fence invents output: must be cut off.
            after="Output: found 11111\nFINAL(11111)",
        ),
    )
    script.on_root(r"found (\d+) at", lambda m, c: f"The code found it.\nFINAL({m.group(1)})")
    res = await rig.run("What is the vault combination?", context="hay")
    assert res.answer == "48213"
    assert res.iterations == 2
    assert res.finish == "final"
    assert res.tokens.input > 0 and res.tokens.output > 0
    # The context was described to the model, never sent whole.
    first = rig.srv.calls[0]
    assert "4," in first.last_user and "characters" in first.last_user
    assert all(len(m.content) < 50_000 for c in rig.srv.calls for m in c.messages)
    # Pipelining: the kept assistant turn ends at the closing fence.
    assistant = rig.srv.calls[1].messages[2]
    assert assistant.role == "assistant"
    assert assistant.content.rstrip().endswith(F)
    assert "11111" not in assistant.content
    kinds = rig.kinds()
    assert kinds[-1] == "final" and kinds.count("final") == 1
    assert kinds.index("code") < kinds.index("output") < kinds.index("final")
    streamed = "".join(e["text"] for e in rig.events if e["kind"] == "root_delta")
    assert "11111" not in streamed and "48213" in streamed


async def test_no_context_query(rig, script):
    script.on_root(r"no context.*Question: What is 6 times 7", "FINAL(42)")
    res = await rig.run("What is 6 times 7?")
    assert res.answer == "42"
    assert res.sub_calls == 0


async def test_inline_text_context(rig, script):
    script.on_root(r"Question: how many lines", repl("print('lines', len(context.splitlines()))"))
    script.on_root(r"lines (\d+)", lambda m, c: f"FINAL({m.group(1)} lines)")
    res = await rig.run("how many lines?", text="a\nb\nc\n")
    assert res.answer == "3 lines"


async def test_fan_out_with_llm_query_batched(rig, script):
    lines = haystack(2_000, seed=3)
    for i in range(0, 2_000, 97):
        lines[i] += " apple"
    expected = sum(1 for ln in lines if ln.endswith("apple"))
    rig.store.put_text("fruit", "\n".join(lines))
    script.on_root(
        r"Question: How many apples",
        repl(
            "lines = context.splitlines()\n"
            "chunks = ['\\n'.join(lines[i:i + 250]) for i in range(0, len(lines), 250)]\n"
            "answers = llm_query_batched([f'Count apples:\\n{c}' for c in chunks])\n"
            "print('chunks', len(chunks), 'total', sum(int(a) for a in answers))"
        ),
    )
    script.on_sub(
        r"^Count apples",
        lambda m, c: ScriptedReply(
            text=str(sum(ln.endswith(" apple") for ln in c.last_user.splitlines())),
            delay_s=0.2,  # slow enough that a serial loop could not overlap them
        ),
    )
    script.on_root(r"total (\d+)", lambda m, c: f"FINAL({m.group(1)})")
    res = await rig.run("How many apples are there?", context="fruit")
    assert int(res.answer) == expected
    n_chunks = 2_000 // 250
    assert res.sub_calls == n_chunks
    assert sum(1 for c in rig.srv.calls if c.model == SUB) == n_chunks
    assert rig.srv.max_concurrent > 1  # the batch really ran concurrently
    subs = [e for e in rig.events if e["kind"] == "subcall"]
    assert [e["status"] for e in subs].count("start") == n_chunks
    assert [e["status"] for e in subs].count("ok") == n_chunks
    assert all(e["model"] == SUB and e["prompt_chars"] > 0 for e in subs)
    assert res.sub_tokens.input > 0


async def test_failed_sub_call_becomes_error_string(rig, script):
    script.on_root(
        r"Question: try",
        repl("r = llm_query_batched(['ok please', 'fail please'])\nprint('got', r)"),
    )
    script.on_sub(r"ok please", "fine")
    script.on_sub(r"fail please", ScriptedReply(status=400, error="bad prompt"))
    script.on_root(r"got \[", lambda m, c: f"FINAL({c.last_user.splitlines()[1]})")
    res = await rig.run("try")
    assert "'fine'" in res.answer
    assert "[llm_query_batched error:" in res.answer


async def test_final_var_and_tuple(rig, script):
    script.on_root(r"Question: vars", repl("a = 'left'\nb = 7\nresult = f'{a}-{b}'"))
    script.on_root(r"Output:\n\(the code printed nothing\)", "FINAL_VAR(result)")
    res = await rig.run("vars")
    assert res.answer == "left-7"
    script.root.clear()
    script.on_root(r"Question: tuple", repl("a = 'x'\nb = 2"))
    script.on_root(r"printed nothing", "Both are ready.\nFINAL_VAR((a, b))")
    res = await rig.run("tuple", job="job2")
    assert "x" in res.answer and "2" in res.answer


async def test_final_called_inside_code(rig, script):
    script.on_root(r"Question: inside", repl("x = 40 + 2\nFINAL(f'the answer is {x}')"))
    res = await rig.run("inside")
    assert res.answer == "the answer is 42"
    assert res.iterations == 1


async def test_missing_final_var_is_told_to_the_model(rig, script):
    script.on_root(r"Question: missing", "FINAL_VAR(nothing_here)")
    script.on_root(r"FINAL_VAR\(nothing_here\) failed: there is no variable", "FINAL(recovered)")
    res = await rig.run("missing")
    assert res.answer == "recovered"


async def test_plan_as_answer_is_asked_again(rig, script):
    script.on_root(r"Question: plan", "FINAL(I will first look at the context.)")
    script.on_root(r"was not accepted: it describes what you plan", "FINAL(Blue.)")
    res = await rig.run("plan")
    assert res.answer == "Blue."
    assert res.iterations == 2


async def test_final_in_a_fence_that_is_not_python(rig, script):
    script.on_root(r"Question: fenced", f"Done.\n{F}repl\nFINAL(It is 7 (seven))\n{F}\n")
    res = await rig.run("fenced")
    assert res.answer == "It is 7 (seven)"


@limits(max_depth=2)
async def test_recursion_depth_two(rig, script):
    parts = ["alpha section. The code word is HERON.", "beta section. The code word is OTTER."]
    rig.store.put_text("two", "\n".join(parts))
    script.on_root(
        r"Question: Collect",
        repl(
            "halves = context.splitlines()\n"
            "words = [rlm_query('Find the code word', context=h) for h in halves]\n"
            "print('words', words)"
        ),
    )
    # The nested loop is a real loop of its own: it probes its sub-context with code.
    script.on_root(
        r"Question: Find the code word",
        repl("import re\nprint('word=' + re.search(r'code word is (\\w+)', context).group(1))"),
    )
    script.on_root(r"word=(\w+)", lambda m, c: f"FINAL({m.group(1)})")
    script.on_root(r"words \[(.*)\]", lambda m, c: f"FINAL({m.group(1)})")
    res = await rig.run("Collect the code words", context="two", options={"max_depth": 2})
    assert res.answer == "'HERON', 'OTTER'"
    assert res.depth == 2
    assert res.sub_calls == 2
    nested = [e for e in rig.events if e.get("depth") == 2]
    assert {e["kind"] for e in nested} >= {"code", "output"}
    assert not any(e["kind"] in ("root_delta", "final") and e.get("depth") for e in rig.events)


async def test_rlm_query_at_depth_one_is_a_plain_call(rig, script):
    script.on_root(r"Question: plain", repl("print('sub says', rlm_query('hello sub'))"))
    script.on_sub(r"hello sub", "hi root")
    script.on_root(r"sub says ([^\n]*)", lambda m, c: f"FINAL({m.group(1).strip()})")
    res = await rig.run("plain")
    assert res.answer == "hi root"
    assert res.depth == 1


async def test_repeated_block_is_not_rerun(rig, script):
    block = repl("import re\nprint('hits', len(re.findall('a', context)))")
    script.on_root(r"already ran exactly this code", "FINAL(stopped repeating)")
    script.on_root(r"", block)
    res = await rig.run("repeat", text="banana")
    assert res.answer == "stopped repeating"
    outs = [e for e in rig.events if e["kind"] == "output"]
    assert len(outs) == 2 and "hits 3" in outs[0]["text"] and outs[1].get("repeated")
    assert "hits 3" in outs[1]["text"]  # the first output is quoted back


async def test_repeated_failing_block_is_not_rerun(rig, script):
    script.on_root(r"same code that just failed with: NameError", "FINAL(gave up)")
    script.on_root(r"", repl("print(undefined_thing)"))
    res = await rig.run("fail twice")
    assert res.answer == "gave up"
    outs = [e for e in rig.events if e["kind"] == "output"]
    assert len(outs) == 2 and "NameError" in outs[0]["text"] and outs[1].get("repeated")


async def test_common_modules_need_no_import(rig, script):
    script.on_root(r"Question: vowels", repl("print('->', re.sub('a', 'o', context))"))
    script.on_root(r"-> (\w+)", lambda m, c: f"FINAL({m.group(1)})")
    res = await rig.run("vowels", text="banana")
    assert res.answer == "bonono"


async def test_small_model_prompt_and_question_reminder(rig, script):
    script.on_root(r"The question is: Which fruit\?", "FINAL(banana)")
    script.on_root(r"Question: Which fruit", repl("print(context[:6])"))
    res = await rig.run("Which fruit?", text="banana split", options={"root_model": SMALL})
    assert res.answer == "banana"
    first = rig.srv.calls[0]
    assert first.model == SMALL
    system = first.messages[0].content
    assert "FINAL(Lisbon)" in system  # the small prompt's worked example
    assert "How to work well" not in system  # not the large prompt


async def test_small_model_guess_is_sent_back_to_check_once(rig, script):
    """A small model's short answer that no output showed is questioned once; an answer
    the code computed, or the second FINAL, is taken."""
    text = "filler line\n" * 50 + "the code for keen-walrus is: ZEBRA\n" + "filler line\n" * 50
    script.on_root(
        r"no output so far shows 'knightrider'",
        repl("import re\nprint(re.findall(r'[^\\n]*keen-walrus[^\\n]*', context)[:5])"),
    )
    script.on_root(r"code for keen-walrus is: (\w+)", lambda m, c: f"FINAL({m.group(1)})")
    script.on_root(r"Question: What is the code", repl("print(context[:100])"))
    script.on_root(r"The question is", "FINAL(knightrider)")
    res = await rig.run(
        "What is the code for keen-walrus?", text=text, options={"root_model": SMALL}
    )
    assert res.answer == "ZEBRA" and res.iterations == 4
    asked = [m.content for m in rig.srv.calls[2].messages if m.role == "user"][-1]
    assert "FINAL(knightrider) was not accepted yet" in asked and "keen\\-walrus" in asked
    # The same guess twice, standing nowhere in the context, is answered "not found"
    # (issue 10: never an invented value); computed answers are never checked.
    script.root.clear()
    script.on_root(r"", "FINAL(knightrider)")
    res = await rig.run("What is the code?", text=text, job="j2", options={"root_model": SMALL})
    assert res.answer.startswith("not found") and res.iterations == 2
    assert res.supported is False and res.sources == []
    script.root.clear()
    script.on_root(r"", repl("FINAL('zz' + 'top')"))
    res = await rig.run("Code?", text=text, job="j3", options={"root_model": SMALL})
    assert res.answer == "zztop" and res.iterations == 1
    # Repeating the question's own words is no evidence either.
    script.root.clear()
    script.on_root(r"not accepted yet", "FINAL(ZEBRA)")
    script.on_root(r"The question is", "FINAL(keen-walrus)")
    script.on_root(r"Question: Code for", repl("print(context[:100])"))
    res = await rig.run("Code for keen-walrus?", text=text, job="j5", options={"root_model": SMALL})
    assert res.answer == "ZEBRA" and res.iterations == 3
    # Nor is the engine's own search hint, which quotes the question's key.
    script.root.clear()
    script.on_root(r"not accepted yet", "FINAL(ZEBRA)")
    script.on_root(r"It found nothing", "FINAL(keen-walrus)")
    script.on_root(r"", repl("print(context.find('nowhere'))"))
    res = await rig.run("Code for keen-walrus?", text=text, job="j6", options={"root_model": SMALL})
    assert res.answer == "ZEBRA" and res.iterations == 4
    # Large models are not second-guessed.
    script.root.clear()
    script.on_root(r"", "FINAL(knightrider)")
    res = await rig.run("What is the code?", text=text, job="j4")
    assert res.answer == "knightrider" and res.iterations == 1


def test_a_repeated_empty_search_is_not_an_invitation_to_answer() -> None:
    for empty in ("", "[]", "1048533\n[]", "-1"):
        assert "Search differently" in prompts.repeated_code(empty)
    hint = prompts.repeated_code("[]", "What is the code for hollow-wombat?")
    assert 'print(grep(r"(?i)hollow\\-wombat", 5))' in hint  # whole lines, with locations
    assert "Use that output" in prompts.repeated_code("['the code is 7']", "q")


def test_unsupported_words() -> None:
    seen = ["Output:\nthe meeting is in Lisbon on 2024-05-01", "Question: Where is it?"]
    assert unsupported_words("Lisbon", seen) == []
    assert unsupported_words("lisbon, 2024", seen) == []
    assert unsupported_words("Porto", seen) == ["porto"]
    assert unsupported_words("in Porto or Faro", seen) == ["porto", "or", "faro"]
    long = "a summary that the model composed from many outputs it read carefully"
    assert unsupported_words(long, seen) == []  # longer answers are not checked
    assert unsupported_words("", seen) == []


async def test_small_model_outputs_are_shorter_and_history_is_compacted(rig, script):
    def turn(m, call: ChatCall) -> str:
        k = sum(1 for msg in call.messages if msg.role == "user")
        if k >= 8:
            return "FINAL(turn7)"  # shown by the last output, so taken at once
        # A letter of its own per turn: blocks that differ only in numbers are steer.stuck.
        return repl(f"print('turn{k}', 'x' * 10000, '{chr(97 + k)}')")

    script.on_root(r"", turn)
    res = await rig.run("big outputs", options={"root_model": SMALL})
    assert res.answer == "turn7"
    last = rig.srv.calls[-1].messages
    outputs = [m.content for m in last if m.role == "user"][1:]
    assert len(outputs) == 7
    # Each output was cut for the small model (4,000 characters and a note) ...
    assert all(len(o) < 5_000 for o in outputs)
    assert "characters cut" in outputs[-1]
    # ... and the old ones shrank further so the conversation fits its window.
    assert len(outputs[0]) < 2_000 and len(outputs[-1]) > 4_000
    assert sum(len(m.content) for m in last) < 30_000
    # A large model keeps the configured 20,000 characters.
    script.root.clear()
    script.on_root(r"Question: big", repl("print('y' * 30000)"))
    script.on_root(r"Output:", "FINAL(ok)")
    await rig.run("big", job="large")
    assert 20_000 <= len(rig.srv.calls[-1].messages[-1].content) < 21_000


# --------------------------------------------------------------------------- budgets


async def test_max_iterations_best_effort(rig, script):
    script.on_root(r"used all your turns", "From what I saw: FINAL(probably 5)")
    # A new block each turn (the same block twice in a row is steer.stuck).
    turns = itertools.count()
    script.on_root(
        r"", lambda m, c: repl(f"print('still looking', {next(turns)})", before="Looking further.")
    )
    res = await rig.run("loop", options={"max_iterations": 3})
    assert res.answer == "probably 5"
    assert res.finish == "best_effort"
    assert res.iterations == 4


async def test_max_iterations_error_carries_partial(rig, script):
    turns = itertools.count()
    script.on_root(
        r"",
        lambda m, c: repl(f"print('still looking', {next(turns)})", before="Seen 3 candidates."),
    )
    with pytest.raises(EngineError) as ei:
        await rig.run("loop", options={"max_iterations": 2})
    assert ei.value.kind == "max_iterations"
    assert "Seen 3 candidates" in ei.value.partial and "after 2 iterations" in str(ei.value)
    assert ei.value.to_error()["data"]["partial"] == ei.value.partial


async def test_stuck_without_an_answer_says_why(rig, script):
    script.on_root(r"", repl("print('still looking')", before="Seen 3 candidates so far."))
    with pytest.raises(EngineError) as ei:
        await rig.run("loop", options={"max_iterations": 10})
    # one block run, refused twice, the last-chance call, the call afresh from the outputs
    assert ei.value.kind == "max_iterations" and "after 5 iterations" in str(ei.value)
    assert "kept sending the same code" in str(ei.value)


async def test_max_sub_calls(rig, script):
    script.on_root(
        r"Question: many",
        repl("r = llm_query_batched([f'q{i}' for i in range(5)])", before="Asking five."),
    )
    script.on_sub(r"", "x")
    with pytest.raises(EngineError) as ei:
        await rig.run("many", options={"max_sub_calls": 3})
    assert ei.value.kind == "max_sub_calls"
    assert "Asking five." in ei.value.partial
    assert not any(c.model == SUB for c in rig.srv.calls)


@limits(price=100_000.0)
async def test_max_cost(rig, script):
    script.on_root(r"", repl("print(1)", before="Partial idea."))
    with pytest.raises(EngineError) as ei:
        await rig.run("cost", options={"max_cost": 0.5})
    assert ei.value.kind == "max_cost"
    assert ei.value.partial == "Partial idea."


async def test_query_timeout(rig, script):
    script.on_root(r"", repl("import time\ntime.sleep(20)", before="Sleeping on it."))
    t0 = time.monotonic()
    with pytest.raises(EngineError) as ei:
        await rig.run("slow", options={"timeout_s": 1.0})
    assert ei.value.kind == "timeout"
    assert time.monotonic() - t0 < 8
    assert ei.value.partial == "Sleeping on it."


@limits(cell_timeout_s=1.0)
async def test_cell_timeout_is_told_to_the_model(rig, script):
    script.on_root(r"Question: sleepy", repl("import time\ntime.sleep(30)"))
    script.on_root(r"stopped after 1 s", "FINAL(saw the timeout)")
    t0 = time.monotonic()
    res = await rig.run("sleepy")
    assert res.answer == "saw the timeout"
    assert time.monotonic() - t0 < 15
    out = [e for e in rig.events if e["kind"] == "output"]
    assert out and out[0]["timed_out"]


async def test_options_cannot_raise_limits(rig):
    with pytest.raises(EngineError) as ei:
        await rig.run("x", options={"max_depth": 5})
    assert ei.value.kind == "bad_params" and "limits.max_depth" in ei.value.message


async def test_unknown_context(rig):
    with pytest.raises(EngineError) as ei:
        await rig.run("x", context="nope")
    assert ei.value.kind == "context_not_found"


async def test_root_model_failure(rig, script):
    script.on_root(r"", ScriptedReply(status=400, error="model exploded"))
    with pytest.raises(EngineError) as ei:
        await rig.run("x")
    assert ei.value.kind == "model_error" and "model exploded" in ei.value.message


# --------------------------------------------------------------------------- cancel


def child_pids() -> set[int]:
    """Live processes whose parent is this test process (the worker, or its bwrap)."""
    me = os.getpid()
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            out.add(int(d.name))
    return out


async def test_cancel_kills_worker_promptly(rig, script):
    script.on_root(r"Question: cancel", repl("print('started')"))
    script.on_root(r"started", repl("import time\ntime.sleep(60)"))
    before = child_pids()
    task = asyncio.create_task(rig.run("cancel me"))
    for _ in range(300):
        await asyncio.sleep(0.05)
        if [e["kind"] for e in rig.events].count("code") >= 2:
            break
    else:
        pytest.fail(f"the second block never started: {rig.events}")
    await asyncio.sleep(0.2)
    workers = child_pids() - before
    assert workers, "no worker process found while a block runs"
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 3
    assert not (child_pids() & workers), "worker still alive after cancel"
    recs = read_trace(rig.tmp, "job1")
    assert recs[-2]["type"] == "error" and recs[-2]["kind"] == "cancelled"


# --------------------------------------------------------------------------- trace


def _slurp(path: str) -> str:
    return Path(path).read_text()


async def test_trace_written_readable_and_secret_free(tmp_path, script, monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("RLMD_TEST_KEY", secret)
    with ScriptedServer(responder=script, models=[ROOT, SUB]) as srv:
        cfg = make_config(srv.url)
        cfg.providers[0].api_key_env = "RLMD_TEST_KEY"
        r = Rig(tmp_path, srv, cfg)
        try:
            script.on_root(
                r"Question: trace",
                repl("print('sub:', llm_query('echo'))", before=f"My key is {secret}."),
            )
            script.on_sub(r"echo", "echoed")
            script.on_root(r"sub: echoed", "FINAL(traced)")
            res = await r.run("trace", job="tr-1")
        finally:
            await r.pool.aclose()
    assert res.trace.endswith("tr-1.jsonl")
    raw = _slurp(res.trace)
    assert secret not in raw and "[redacted]" in raw
    recs = read_trace(tmp_path, "tr-1")
    types = [x["type"] for x in recs]
    assert types[0] == "start" and types[-1] == "end"
    for t in ("message", "code", "output", "subcall", "final"):
        assert t in types
    assert read_trace(tmp_path) == recs  # latest
    text = format_trace(recs)
    assert "llm_query('echo')" in text and "FINAL" in text and "traced" in text
    sub = next(x for x in recs if x["type"] == "subcall" and x["status"] == "ok")
    assert sub["answer"] == "echoed" and sub["elapsed_s"] >= 0


async def test_odd_job_ids_stay_inside_the_traces_dir(rig, script):
    script.on_root(r"", "FINAL(ok)")
    res = await rig.run("q", job="../../etc/passwd")
    p = Path(res.trace)
    assert p.parent == rig.tmp / "traces"
    assert read_trace(rig.tmp, "../../etc/passwd")[0]["type"] == "start"


async def test_old_traces_are_pruned_after_each_query(tmp_path, script):
    """[traces] keep: a daemon running for months keeps the newest traces only."""
    with ScriptedServer(responder=script, models=[ROOT, SUB]) as srv:
        cfg = make_config(srv.url)
        cfg.traces = TracesConfig(keep=2)
        r = Rig(tmp_path, srv, cfg)
        script.on_root(r"", "FINAL(ok)")
        try:
            for i in range(4):
                await r.run("q", job=f"keep-{i}")
                os.utime(tmp_path / "traces" / f"keep-{i}.jsonl", (1000 + i, 1000 + i))
        finally:
            await r.pool.aclose()
    names = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert names == ["keep-2.jsonl", "keep-3.jsonl"]
    assert read_trace(tmp_path, "keep-3")[-1]["type"] == "end"


def test_prune_traces_by_count_and_size_keeps_newest_and_running(tmp_path):
    d = tmp_path / "traces"
    d.mkdir()
    for i in range(6):  # t0 oldest ... t5 newest, 1000 bytes each
        f = d / f"t{i}.jsonl"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (100 + i, 100 + i))
    (d / "notes.txt").write_text("not a trace")
    left = lambda: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert prune_traces(tmp_path, keep=10, max_bytes=10**6) == 0
    # A running query's trace (t0, the oldest) survives; the others go oldest first.
    assert prune_traces(tmp_path, keep=3, max_bytes=10**6, protect=frozenset({d / "t0.jsonl"})) == 2
    assert left() == ["notes.txt", "t0.jsonl", "t3.jsonl", "t4.jsonl", "t5.jsonl"]
    assert prune_traces(tmp_path, keep=10, max_bytes=1500) == 3  # by size: t4, t3, t0 go
    assert left() == ["notes.txt", "t5.jsonl"]
    assert prune_traces(tmp_path, keep=1, max_bytes=1) == 0  # the newest always stays
    assert prune_traces(tmp_path / "nowhere", keep=1, max_bytes=1) == 0


async def test_cancel_while_the_worker_starts_leaves_no_process(rig, script):
    # The worker starts while the root model "thinks"; cancel lands in that window.
    script.on_root(r"", ScriptedReply(text="FINAL(late)", delay_s=5))
    before = child_pids()
    for wait in (0.0, 0.02, 0.1, 0.4):
        task = asyncio.create_task(rig.run("q", job=f"early{wait}"))
        await asyncio.sleep(wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for _ in range(40):
        if not (child_pids() - before):
            break
        await asyncio.sleep(0.05)
    assert not (child_pids() - before), "a worker outlived its cancelled query"


# ------------------------------------------------------------ issue 14, Broken 5 and 8


@limits(sub_prompt_chars=600_000, sub_bytes_in_flight_mb=1)
async def test_sub_call_prompts_in_flight_are_bounded_and_traced_by_reference(rig, script):
    """Eight threads of llm_query("A" * 200 MiB) took the daemon to 1.86 GB and wrote
    1.2 GB of trace: prompt text in flight is bounded per query, and the trace keeps a
    long prompt by reference (length, hash, head, tail), never whole."""
    script.on_sub(r"", "ok")
    script.on_root(r"over the query's limit", "FINAL(bounded)")
    script.on_root(
        r"Question:",
        repl(
            "print(len(llm_query('B' * 300_000)))\n"
            "try:\n    llm_query_batched(['A' * 400_000] * 3)\n"
            "except Exception as e:\n    print(e)"
        ),
    )
    res = await rig.run("Go", text="x\n")
    assert res.answer == "bounded"
    subs = [c for c in rig.srv.calls if c.model == SUB]
    assert len(subs) == 1  # the single call ran, the batch of 1.2 M characters did not
    out = [m.content for m in rig.srv.calls[-1].messages if m.role == "user"][-1]
    assert "sub-call prompts of 1,200,000 characters would be in flight" in out
    records = read_trace(rig.tmp, "job1")
    [start] = [r for r in records if r["type"] == "subcall" and r["status"] == "start"]
    ref = start["prompt"]
    assert ref["chars"] == 300_000 and len(ref["sha256"]) == 64
    assert len(ref["head"]) + len(ref["tail"]) <= 8_000
    size = await asyncio.to_thread(os.path.getsize, res.trace)
    assert size < 100_000


@limits(answer_chars=1000)
async def test_the_answer_is_cut_before_the_trace_and_cache(rig, script):
    script.on_root(r"Question:", repl("FINAL('Z' * 1_000_000)"))
    res = await rig.run("Zs", text="x\n")
    assert res.answer_cut and res.answer.endswith(
        "of 1,000,000 characters shown (limits.answer_chars)]"
    )
    [final] = [r for r in read_trace(rig.tmp, "job1") if r["type"] == "final"]
    assert len(final["answer"]) < 2000


def test_trace_protection_lists_landlock():
    """The trace's protection string used to name bwrap/seccomp/rlimits only."""
    from rlmd.engine.worker import layers
    from rlmd.repl.sandbox import Protection

    p = Protection(bwrap=False, seccomp=True, rlimits=True, landlock=True)
    assert layers(p).split("+")[:3] == ["seccomp", "landlock", "rlimits"]
    assert layers(None) == "none"
