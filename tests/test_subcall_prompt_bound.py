"""Issue 14, Broken 5: a sub-call prompt over the sub-model's window is refused by the REPL
worker before it is sent, so it never crosses the worker-to-daemon channel; the daemon
refuses a forged Call that skips the worker's check.  A real daemon over its socket, whose
one provider is the scripted loopback model server."""

from __future__ import annotations

import pytest

from rlmd.client import RpcError
from rlmd.testing.script import ScriptedModels
from rlmd.testing.scripted_server import ScriptedServer

ROOT = "root-model"
SUB = "sub-model"
F = "```"
LIMIT = 2000
BIG = 1_000_000  # characters: 500 times the limit

EXTRA = f"""
[limits]
cell_timeout_s = 20
sub_prompt_chars = {LIMIT}

[cache]
enabled = false
"""

REFUSED = f"prompt of {BIG:,} chars is over the sub-model's window"


def repl(code: str) -> str:
    return f"\n{F}repl\n{code.strip()}\n{F}\n"


@pytest.fixture
def served(make_daemon, scripted_config):
    script = ScriptedModels(sub_model=SUB)
    script.on_sub(r"", "sub answer")
    with ScriptedServer(responder=script, models=[ROOT, SUB]) as srv:
        d = make_daemon(scripted_config(srv.url, EXTRA, root=ROOT, sub=SUB))
        yield d, srv, script


def run(d, script, code: str, job: str) -> tuple[str, list[dict]]:
    """One query whose root model runs ``code`` once, then answers with what it printed."""
    script.on_root(r"REFUSALS (\d+)", lambda m, c: f"FINAL(refusals {m.group(1)})")
    script.on_root(r"Question:", repl(code))
    try:
        res = d.call(
            "query/run", {"query": "Go", "text": "x\n", "job": job, "options": {"mode": "rlm"}}
        )
    except RpcError as exc:
        raise AssertionError(exc) from None
    records = d.call("query/trace", {"job": job})["records"]
    return res["answer"], records


def closed_repl(records: list[dict]) -> dict:
    [rec] = [r for r in records if r["type"] == "repl" and r.get("event") == "close"]
    return rec


WORKER_SIDE = f"""
n = 0
for call in (
    lambda: llm_query('A' * {BIG}),
    lambda: llm_query_batched(['short', 'A' * {BIG}]),
    lambda: rlm_query('A' * {BIG // 2}, 'B' * {BIG // 2 - 2}),
):
    try:
        call()
    except RuntimeError as e:
        assert "filter or split it first" in str(e), e
        assert {REFUSED!r} in str(e), e
        n += 1
print("REFUSALS", n)
"""


def test_the_worker_refuses_a_long_prompt_without_sending_it(served):
    d, srv, script = served
    answer, records = run(d, script, WORKER_SIDE, "worker-side")
    assert answer == "refusals 3"
    assert not [c for c in srv.calls if c.model == SUB]  # not even the batch's short prompt
    closed = closed_repl(records)
    assert closed["refused_in_worker"] == 3
    # Three prompts of a million characters each were refused; what crossed the channel
    # is the blocks' Ready/Done frames, a few hundred bytes.
    assert closed["bytes_from_worker"] < 20_000, closed


# Model code is hostile: it can reach the worker's own ``call`` (through the closure of
# ``llm_query``) and send the Call the worker's check would have refused.
FORGED = """
w = next(c.cell_contents for c in llm_query.__closure__ if hasattr(c.cell_contents, "chan"))
try:
    w.call({method!r}, {params})
    print("SENT")
except RuntimeError as e:
    print("DAEMON SAYS", e)
    print("REFUSALS", int("filter or split it first" in str(e)))
"""


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("llm_query", "{'prompt': 'A' * 5000, 'model': None}"),
        ("llm_query_batched", "{'prompts': ['short', 'A' * 5000], 'model': None}"),
        ("rlm_query", "{'prompt': 'A' * 2500, 'context': 'B' * 2500}"),
    ],
)
def test_the_daemon_still_refuses_a_forged_over_limit_call(served, method, params):
    d, srv, script = served
    answer, records = run(d, script, FORGED.format(method=method, params=params), "forged")
    assert answer == "refusals 1"
    assert not [c for c in srv.calls if c.model == SUB]
    closed = closed_repl(records)
    assert closed["refused_in_worker"] == 0
    assert closed["bytes_from_worker"] > 5000  # the forged frame did cross; the daemon said no
    out = [c for c in srv.calls if c.model == ROOT][-1].last_user
    assert "over the sub-model's window" in out


def test_a_repl_session_refuses_a_long_prompt_in_the_worker_and_in_the_daemon(served):
    # repl/open sessions (MCP execute_code, Emacs) had no bound: the prompt went to the
    # provider whole.  The worker refuses it; a forged Call is refused by the daemon.
    d, srv, _script = served
    with d.client() as c:
        sid = c.call("repl/open", {})["session"]
        r = c.call("repl/exec", {"session": sid, "code": WORKER_SIDE})
        assert r["error"] is None, r
        assert "REFUSALS 3" in r["stdout"] and r["sub_calls"] == 0
        forged = FORGED.format(method="llm_query", params="{'prompt': 'A' * 5000, 'model': None}")
        r = c.call("repl/exec", {"session": sid, "code": forged})
        assert "REFUSALS 1" in r["stdout"], r
        assert "prompt of 5,000 chars is over the sub-model's window" in r["stdout"]
        ok = c.call("repl/exec", {"session": sid, "code": "print(llm_query('A' * 1000))"})
        assert ok["stdout"] == "sub answer\n" and ok["sub_calls"] == 1
    assert len([c for c in srv.calls if c.model == SUB]) == 1  # only the short one
