"""Loops that go nowhere (issue 10): each rule fires on the trace pattern it was written
for, and not on its near misses; one fires through the real daemon."""

from __future__ import annotations

from rlmd.engine.steer import (
    LoopMemory,
    bare_matches,
    normalize,
    reindexing,
    repeated,
    same_shape_run,
    slice_reading,
    steer,
    stuck,
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
    assert 'grep(r"(?i)quartz\\ lantern", 5)' in text  # the block prints whole lines
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
        # The question's name is in the text (else the answer is sent back for that).
        text = "".join(f"line {i}\n" for i in range(100)) + "the quartz-lantern key is 7\n"
        with d.client() as c:
            res = c.call("query/run", {"query": Q, "text": text, "options": {"mode": "rlm"}})
        assert res["answer"] == "steered" and res["iterations"] == 4
        last = srv.calls[-1].last_user
        assert re.search(r"slice by slice.*quartz\\-lantern", last, re.S)


def test_a_repeated_empty_search_after_a_hit_quotes_the_hit():
    # The 1.4M-character needle trace (embedded model): grep printed the needle's line,
    # then a lowercased grep found nothing, re-sent turn after turn.
    mem = LoopMemory(question="What is the secret password?")
    mem.outputs += ["1399965\n[line 13580 @950530:950565] The secret password is TANGERINE-7."]
    key = normalize('print(grep(r"tangerine-7", 5))')
    mem.outputs.append("[] (no hits)")
    mem.ran[key] = "[] (no hits)"
    text = repeated(mem, key)
    assert text is not None and "It found nothing" in text
    assert "The secret password is TANGERINE-7." in text and "FINAL(the answer) now" in text


def test_searches_that_find_nothing_three_times_are_steered_to_not_found():
    # The absent-fact trace: grep of the asked key printing [] turn after turn.
    from rlmd.engine.steer import no_hits

    mem = LoopMemory(question=Q)
    mem.outputs += ["[] (no hits)", "[]"]
    key = ran(mem, "print(grep('quartz'))")
    assert no_hits(mem, key, "[]") is None  # two are still searching
    mem.outputs.append("[] (no hits)")
    text = no_hits(mem, key, "[] (no hits)")
    assert text is not None and "FINAL(not found)" in text
    # A search that found something breaks the run.
    mem.outputs[-2] = "[line 4 @10:40] the quartz lantern"
    assert no_hits(mem, key, "[]") is None


def test_a_block_refused_twice_in_a_row_is_stuck():
    # Issue 10's codeqa trace: the same search() sent 19 times after it first ran.
    mem = LoopMemory(question=Q)
    key = normalize('search("_push_exit_callback", 1)')
    assert repeated(mem, key) is None  # first time: it runs
    mem.ran[key] = "[line 498 @16375:16417] self._push_exit_callback(exit)"
    assert repeated(mem, key) is not None and not stuck(mem)  # told once
    other = normalize('grep("def _push_exit_callback")')
    assert repeated(mem, other) is None and not stuck(mem)  # new code: the count starts over
    assert repeated(mem, key) is not None and not stuck(mem)
    assert repeated(mem, key) is not None and stuck(mem)  # told twice in a row


def test_one_block_with_other_numbers_five_times_is_stuck():
    # The codeqa trace: search("lib2to3/pgen2/tokenize.py", 1), 2, 3 ... 13.
    mem = LoopMemory(question=Q)
    for k in range(1, 5):
        ran(mem, f'search("lib2to3/pgen2/tokenize.py", {k})')
    assert same_shape_run(mem) == 4 and not stuck(mem)
    ran(mem, 'search("lib2to3/pgen2/tokenize.py", 5)')
    assert stuck(mem)
    # Near misses: another block in between starts the count over; other words are
    # another shape.
    mem = LoopMemory(question=Q)
    ran(mem, *[f"print(context[{i * 300}:{i * 300 + 300}])" for i in range(4)])
    ran(mem, 'grep("price")', "print(context[1200:1500])")
    assert same_shape_run(mem) == 1 and not stuck(mem)
    ran(mem, 'search("a", 1)', 'search("b", 1)', 'search("c", 1)', 'search("d", 1)')
    ran(mem, 'search("e", 1)')
    assert not stuck(mem)
