"""The engine's flows end to end over the socket: a real daemon subprocess whose config
points at the scripted loopback model server running in this test process."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from rlmd.client import RpcError
from rlmd.engine.trace import format_trace
from rlmd.testing.script import ScriptedModels, run_query

ROOT = "root-model"
SUB = "sub-model"
F = "```"


def repl(code: str, before: str = "") -> str:
    return f"{before}\n{F}repl\n{code.strip()}\n{F}\n"


EXTRA = """
[limits]
cell_timeout_s = 10
max_depth = 2

[pool]
retries = 1
backoff_base_s = 0.01

[cache]
enabled = false
"""


@pytest.fixture
def script() -> ScriptedModels:
    """The scripted root and sub models of these tests (rlmd/testing/script.py)."""
    return ScriptedModels(sub_model=SUB)


@pytest.fixture
def served(serve_scripted, script):
    with serve_scripted(script, EXTRA, root=ROOT, sub=SUB, capacity=8) as pair:
        yield pair


def check_stream(events: list[dict], job: str, last: str) -> None:
    assert events, "no events"
    assert all(e["job"] == job for e in events)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["kind"] == last
    assert [e["kind"] for e in events].count(last) == 1


def test_needle_over_the_socket(served, script):
    d, _srv = served
    lines = [f"line {i}: nothing to see" for i in range(50_000)]
    lines[31_337] = "line 31337: the launch code is ZEBRA-42"
    put = d.call("context/put", {"name": "big", "text": "\n".join(lines)})
    assert put["chars"] > 1_000_000
    script.root.append(
        (
            r"Question: What is the launch code",
            repl(
                "import re\nprint('code=' + re.search(r'launch code is (\\S+)', context).group(1))"
            ),
        )
    )
    script.root.append((r"code=(\S+)", lambda m, c: f"FINAL({m.group(1)})"))
    res, events = run_query(
        d, {"query": "What is the launch code?", "context": "big", "job": "needle-1"}
    )
    assert not isinstance(res, Exception), res
    assert res["answer"] == "ZEBRA-42"
    for key in ("answer", "job", "iterations", "sub_calls", "tokens", "cost", "elapsed_s", "trace"):
        assert key in res
    assert res["job"] == "needle-1" and res["iterations"] == 2
    assert set(res["tokens"]) >= {"input", "output"}
    check_stream(events, "needle-1", "final")
    kinds = [e["kind"] for e in events]
    for k in ("root_delta", "code", "output", "progress"):
        assert k in kinds
    out = next(e for e in events if e["kind"] == "output")
    assert "code=ZEBRA-42" in out["text"]
    # The trace is served by the daemon and renders.
    recs = d.call("query/trace", {"job": "needle-1"})["records"]
    assert recs[0]["type"] == "start" and recs[-1]["type"] == "end"
    assert "launch code" in format_trace(recs)


def test_fan_out_with_inline_text(served, script):
    d, srv = served
    text = "\n".join(f"review {i}: {'great' if i % 3 else 'awful'} product" for i in range(300))
    script.root.append(
        (
            r"Question: How many awful",
            repl(
                "ls = context.splitlines()\n"
                "parts = ['\\n'.join(ls[i:i + 50]) for i in range(0, len(ls), 50)]\n"
                "counts = llm_query_batched(['Count awful reviews:\\n' + p for p in parts])\n"
                "print('sum', sum(int(x) for x in counts))"
            ),
        )
    )
    script.sub.append((r"^Count awful", lambda m, c: str(c.last_user.count("awful product"))))
    script.root.append((r"sum (\d+)", lambda m, c: f"FINAL({m.group(1)})"))
    res, events = run_query(d, {"query": "How many awful reviews?", "text": text, "job": "fan"})
    assert not isinstance(res, Exception), res
    assert int(res["answer"]) == 100
    assert res["sub_calls"] == 6
    assert sum(1 for c in srv.calls if c.model == SUB) == 6
    subs = [e for e in events if e["kind"] == "subcall"]
    assert sum(e["status"] == "ok" for e in subs) == 6
    assert all(e["model"] == SUB and e["prompt_chars"] > 0 for e in subs)
    check_stream(events, "fan", "final")
    # The inline text never shows up as a stored context.
    assert all(not c["name"].startswith("_query") for c in d.call("context/list"))


def test_recursion_and_final_var_over_the_socket(served, script):
    d, _srv = served
    d.call(
        "context/put", {"name": "pair", "text": "left: the key is AMBER\nright: the key is JADE"}
    )
    script.root += [
        (
            r"Question: Both keys",
            repl(
                "keys = [rlm_query('Which key?', context=ln) for ln in context.splitlines()]\n"
                "result = ' and '.join(keys)\nprint(len(keys))"
            ),
        ),
        (r"Question: Which key", repl("print('k=' + re.search(r'key is (\\w+)', context)[1])")),
        (r"k=(\w+)", lambda m, c: f"FINAL({m.group(1)})"),
        (r"Output:\n2\n", "FINAL_VAR(result)"),
    ]
    res, events = run_query(
        d, {"query": "Both keys?", "context": "pair", "job": "rec", "options": {"max_depth": 2}}
    )
    assert not isinstance(res, Exception), res
    assert res["answer"] == "AMBER and JADE"
    assert res["depth"] == 2 and res["sub_calls"] == 2
    check_stream(events, "rec", "final")
    assert any(e.get("depth") == 2 and e["kind"] == "code" for e in events)


def test_budget_error_carries_kind_and_partial(served, script):
    d, _srv = served
    script.root.append(
        (r"", repl("r = llm_query_batched(['a', 'b', 'c'])", before="Three questions first."))
    )
    script.sub.append((r"", "x"))
    res, events = run_query(d, {"query": "q", "job": "budget", "options": {"max_sub_calls": 2}})
    assert isinstance(res, RpcError), res
    assert res.kind == "max_sub_calls"
    assert res.data["partial"] == "Three questions first."
    check_stream(events, "budget", "error")


def _children(pid: int) -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(p.name))
    return out


def test_cancel_from_another_connection(served, script):
    d, _srv = served
    script.root.append((r"Question: stall", repl("import time\ntime.sleep(60)")))
    holder: dict = {}

    def run() -> None:
        holder["res"], holder["events"] = run_query(d, {"query": "stall", "job": "stall-1"})

    daemon_pid = d.proc.pid
    before = _children(daemon_pid)
    t = threading.Thread(target=run)
    t.start()
    workers: set[int] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not workers:
        time.sleep(0.1)
        workers = _children(daemon_pid) - before
    assert workers, "no REPL worker appeared under the daemon"
    time.sleep(0.3)
    t0 = time.monotonic()
    assert d.call("query/cancel", {"job": "stall-1"}) == {"cancelled": True}
    t.join(10)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 5
    res = holder["res"]
    assert isinstance(res, RpcError) and res.kind == "cancelled"
    assert holder["events"][-1]["kind"] == "error"
    time.sleep(0.2)
    assert not (_children(daemon_pid) & workers), "worker still alive after cancel"


def _ask_base_for_the_password(d, script) -> tuple[dict, list[dict]]:
    """Base mode over 5,000 filler lines with the password on line 10, in a 4,096 window."""
    text = "".join(f"line {i}: filler words here\n" for i in range(5000))
    text = text.replace("line 10: filler", "line 10: the password is OTTER")
    d.call("context/put", {"name": "big", "text": text})
    script.root.append((r"Question: What is the password", "OTTER"))
    return run_query(
        d,
        {
            "query": "What is the password?",
            "context": "big",
            "options": {"mode": "base", "window_tokens": 4096},
        },
    )


def test_base_mode_reads_the_text_cut_to_the_window(served, script):
    d, srv = served
    result, events = _ask_base_for_the_password(d, script)
    assert result["answer"] == "OTTER" and result["finish"] == "base"
    assert result["iterations"] == 1 and result["sub_calls"] == 0
    [call] = [c for c in srv.calls if c.model == ROOT]
    # The text itself is in the prompt, cut to the window, and the cut is said.
    assert "line 10: the password is OTTER" in call.last_user
    assert "line 4999" not in call.last_user
    assert "characters of the text were cut" in call.last_user
    assert len(call.last_user) < (4096 - 1024) * 3 + 2000
    assert events[-1]["kind"] == "final"


def test_base_mode_cuts_again_by_the_numbers_a_full_server_gives(served, script):
    # Issue 10's OOLONG run at 32k: the cut came to 16,865 tokens, over the server's
    # 16,384, and every base query failed with HTTP 400.  The server's own numbers say how
    # much to drop; the query is asked once more with the shorter text.
    d, srv = served
    srv.n_ctx = 1500
    result, _events = _ask_base_for_the_password(d, script)
    assert result["answer"] == "OTTER" and result["finish"] == "base"
    assert result["iterations"] == 1
    first, second = [c for c in srv.calls if c.model == ROOT]
    sent = [c.prompt_tokens for c in (first, second)]
    assert sent[0] > 1500 >= sent[1] > 1500 - 1024
    assert "line 10: the password is OTTER" in second.last_user
    assert "characters of the text were cut" in second.last_user
    recs = d.call("query/trace", {"job": result["job"]})["records"]
    refits = [r for r in recs if r["type"] == "base_refit"]
    assert refits and refits[0]["window_tokens"] == 1500


def test_base_mode_says_what_failed_when_the_server_refuses_for_another_reason(served, script):
    d, srv = served
    srv.n_ctx = 10
    script.root.append((r"Question:", "never"))
    res, _events = run_query(d, {"query": "What is it?", "text": "", "options": {"mode": "base"}})
    assert isinstance(res, RpcError) and res.kind == "model_error"
    assert "exceeds the available context size" in str(res)
    assert len([c for c in srv.calls if c.model == ROOT]) == 1


def _send_query(d, job: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(d.socket))
    params = {"query": "What is it?", "text": "it is 42\n", "job": job, "options": {"mode": "base"}}
    s.sendall(
        json.dumps({"jsonrpc": "2.0", "method": "query/run", "id": 1, "params": params}).encode()
        + b"\n"
    )
    return s


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_goes_away_mid_query_cancels_it(served, script):
    # A killed client reads as end-of-file, as a half-close does; the query's model call
    # ran on for its whole length (minutes for a base prompt on a CPU) with no one to read.
    d, srv = served
    srv.delay_s = 60
    script.root.append((r"Question:", "42"))
    s = _send_query(d, "gone-1")
    assert _wait(lambda: srv.in_flight == 1), "the model call never started"
    t0 = time.monotonic()
    s.close()
    assert _wait(lambda: srv.in_flight == 0), "the model call outlived its client"
    assert time.monotonic() - t0 < 5
    recs = d.call("query/trace", {"job": "gone-1"})["records"]
    assert any(r["type"] == "error" and r["kind"] == "cancelled" for r in recs)


def test_a_half_closed_client_still_gets_its_answer(served, script):
    d, srv = served
    srv.delay_s = 1.5  # three looks at the peer while the model answers
    script.root.append((r"Question:", "42"))
    s = _send_query(d, "half-1")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(20)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    [reply] = [m for m in map(json.loads, data.splitlines()) if m.get("id") == 1]
    assert reply["result"]["answer"] == "42"


def test_nosub_mode_switches_sub_calls_off(served, script):
    d, srv = served
    script.root.append((r"sub-calls are switched off", "FINAL(done without sub-calls)"))
    script.root.append((r"Question:", repl("print(llm_query('hello?'))")))
    result, _events = run_query(
        d, {"query": "Say hello", "text": "some text\n", "options": {"mode": "rlm-nosub"}}
    )
    assert result["answer"] == "done without sub-calls"
    assert result["sub_calls"] == 0
    assert not [c for c in srv.calls if c.model == SUB]
    system = next(c for c in srv.calls if c.model == ROOT).system
    assert "switched off" in system
