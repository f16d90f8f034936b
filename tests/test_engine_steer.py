"""Loops that go nowhere (issue 10): each rule fires on the trace pattern it was written
for, and not on its near misses; one fires through the real daemon."""

from __future__ import annotations

from rlmd.engine.steer import (
    LoopMemory,
    bare_matches,
    normalize,
    reindexing,
    repeated,
    slice_reading,
    steer,
)

Q = "What is the current value of the quartz-lantern key?"


def ran(memory: LoopMemory, *codes: str) -> str:
    for c in codes:
        memory.history.append(normalize(c))
    return memory.history[-1]


def test_reindexing_one_findall_result_is_steered():
    # The 1M-character trace: findall on the phrase, then m[1], m[2], ... to IndexError.
    mem = LoopMemory(question=Q)
    ran(mem, "m = re.findall(r'quartz-lantern', context)")
    key = ran(mem, "print(m[1])", "print(m[2])")
    text = reindexing(mem, key, "quartz-lantern")
    assert text is not None and "item by item" in text and "quartz\\-lantern" in text
    # Two different blocks are no loop.
    mem = LoopMemory(question=Q)
    key = ran(mem, "print(m[1])", "print(len(m))")
    assert reindexing(mem, key, "3") is None


def test_printing_bare_matches_is_steered():
    mem = LoopMemory(question=Q)
    key = ran(mem, "print(re.findall(r'quartz lantern', context))")
    text = bare_matches(mem, key, "['quartz lantern', 'quartz lantern']")
    assert text is not None and "not the text around them" in text
    assert "grep(r\"quartz\\ lantern\", 5)" in text  # the block prints whole lines
    # A pattern that already takes the line around the match is fine.
    key = ran(mem, "print(re.findall(r'[^\\n]*quartz[^\\n]*', context))")
    assert bare_matches(mem, key, "['the quartz lantern key is 7']") is None


def test_reading_slice_after_slice_is_steered():
    # The demo trace: context[:4000], then 300-character slices, one a turn.
    mem = LoopMemory(question=Q)
    key = ran(mem, "print(context[:4000])", "print(context[4000:4300])")
    assert slice_reading(mem, key, "...") is None  # two are still reading
    key = ran(mem, "print(context[4300:4600])")
    text = slice_reading(mem, key, "...")
    assert text is not None and "slice by slice" in text and "quartz\\-lantern" in text


def test_a_failed_block_rerun_is_not_run_again():
    mem = LoopMemory(question=Q)
    key = normalize("print(undefined_name)")
    mem.last = (key, "NameError: name 'undefined_name' is not defined")
    text = repeated(mem, key)
    assert text is not None and "same code that just failed" in text


def test_each_steer_fires_once_a_loop():
    mem = LoopMemory(question=Q)
    key = ran(mem, "print(context[:300])", "print(context[300:600])", "print(context[600:900])")
    assert steer(mem, key, "...") is not None
    key = ran(mem, "print(context[900:1200])")
    assert steer(mem, key, "...") is None


def test_slice_reading_steer_reaches_the_model(make_daemon, scripted_config):
    import re

    from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

    turn = {"n": 0}

    def respond(call: ChatCall) -> ScriptedReply:
        if "slice by slice" in call.last_user:
            return ScriptedReply(text="FINAL(steered)")
        n = turn["n"]
        turn["n"] += 1
        return ScriptedReply(text=f"```repl\nprint(context[{n * 10}:{n * 10 + 10}])\n```\n")

    with ScriptedServer(responder=respond, models=["root", "sub"]) as srv:
        d = make_daemon(scripted_config(srv.url, "[cache]\nenabled = false\n"))
        text = "".join(f"line {i}\n" for i in range(100))
        with d.client() as c:
            res = c.call("query/run", {"query": Q, "text": text, "options": {"mode": "rlm"}})
        assert res["answer"] == "steered" and res["iterations"] == 4
        last = srv.calls[-1].last_user
        assert re.search(r"slice by slice.*quartz\\-lantern", last, re.S)
