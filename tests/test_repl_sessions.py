"""Persistent REPL sessions (repl/open, repl/exec, repl/close, repl/list) and llm/query,
over the real socket of a real daemon whose models are a scripted loopback server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from rlmd.client import RpcError
from rlmd.config import load_config
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

REPO = Path(__file__).resolve().parents[1]


def sub_answers(call: ChatCall) -> ScriptedReply:
    return ScriptedReply(text=f"echo:{call.last_user[:40]}")


def served_daemon(make_daemon, scripted_config, srv, extra: str = "", start: bool = True):
    cfg = "\n[limits]\ncell_timeout_s = 20\n" + extra
    return make_daemon(scripted_config(srv.url, cfg), start=start)


@pytest.fixture
def srv():
    with ScriptedServer(responder=sub_answers, models=["root", "sub"]) as s:
        yield s


def wait_for(pred, timeout_s: float = 30.0, what: str = "condition"):
    """Poll ``pred`` (a socket round trip) until it is true; a generous deadline, since the
    machine is shared (the sweeper itself runs every second at most)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_variables_persist_and_llm_query_goes_through_the_pool(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv)
    d.call("context/put", {"name": "doc", "text": "alpha beta gamma\n" * 100})
    with d.client() as c:
        s = c.call("repl/open", {"context": "doc"})
        sid = s["session"]
        assert s["context"] == "doc" and s["version"]
        r1 = c.call("repl/exec", {"session": sid, "code": "n = len(context)\nprint(n)"})
        assert r1["stdout"].strip() == "1700" and r1["error"] is None
        assert r1["truncated"] is False and r1["elapsed_s"] >= 0
        r2 = c.call("repl/exec", {"session": sid, "code": "print(n * 2, context[:5])"})
        assert r2["stdout"].strip() == "3400 alpha"
        r3 = c.call("repl/exec", {"session": sid, "code": "print(llm_query('say hi'))"})
        assert r3["stdout"].strip() == "echo:say hi" and r3["sub_calls"] == 1
        assert any(call.model == "sub" for call in srv.calls)
        r4 = c.call("repl/exec", {"session": sid, "code": "1/0"})
        assert "ZeroDivisionError" in r4["error"]
        # The error did not cost the variables.
        assert c.call("repl/exec", {"session": sid, "code": "print(n)"})["stdout"].strip() == "1700"
        big = c.call("repl/exec", {"session": sid, "code": "print('x' * 100_000)"})
        assert big["truncated"] is True and len(big["stdout"]) < 30_000
        assert c.call("repl/close", {"session": sid}) == {"closed": True}
        assert c.call("repl/close", {"session": sid}) == {"closed": False}
        with pytest.raises(RpcError) as ei:
            c.call("repl/exec", {"session": sid, "code": "print(n)"})
        assert ei.value.kind == "not_found" and "repl/open" in ei.value.message


def test_the_session_keeps_the_version_it_opened(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv)
    d.call("context/put", {"name": "doc", "text": "old text"})
    with d.client() as c:
        sid = c.call("repl/open", {"context": "doc"})["session"]
        c.call("context/put", {"name": "doc", "text": "new text, longer"})
        r = c.call("repl/exec", {"session": sid, "code": "print(str(context))"})
        assert r["stdout"].strip() == "old text"


def test_bad_requests_are_clear_errors(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv)
    with d.client() as c:
        with pytest.raises(RpcError) as ei:
            c.call("repl/open", {"context": "nope"})
        assert ei.value.kind == "not_found" and "context/put" in ei.value.message
        with pytest.raises(RpcError) as ei:
            c.call("repl/exec", {"session": "0" * 32, "code": "1"})
        assert ei.value.kind == "not_found"
        sid = c.call("repl/open", {})["session"]  # no context: a plain sandboxed REPL
        with pytest.raises(RpcError) as ei:
            c.call("repl/exec", {"session": sid, "code": "1", "timeout_s": -1})
        assert ei.value.kind == "bad_params" and "timeout_s" in ei.value.message
        assert c.call("repl/exec", {"session": sid, "code": "print(6*7)"})["stdout"] == "42\n"


def test_idle_sessions_are_closed(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv, "\n[repl]\nidle_timeout_s = 0.5\n")
    with d.client() as c:
        sid = c.call("repl/open", {})["session"]
        assert [s["session"] for s in c.call("repl/list")["sessions"]] == [sid]
        wait_for(lambda: not c.call("repl/list")["sessions"], what="the idle session to close")
        with pytest.raises(RpcError) as ei:
            c.call("repl/exec", {"session": sid, "code": "1"})
        assert ei.value.kind == "not_found" and "idle" in ei.value.message


def test_a_busy_session_is_not_idle(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv, "\n[repl]\nidle_timeout_s = 0.5\n")
    with d.client() as c:
        sid = c.call("repl/open", {})["session"]
        # Runs longer than the idle timeout several times over, then keeps its variables.
        r = c.call("repl/exec", {"session": sid, "code": "import time\ntime.sleep(2.5)\nv = 7"})
        assert r["error"] is None
        assert c.call("repl/exec", {"session": sid, "code": "print(v)"})["stdout"] == "7\n"


def test_the_session_cap(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv, "\n[repl]\nmax_sessions = 2\n")
    with d.client() as c:
        a = c.call("repl/open", {})["session"]
        c.call("repl/open", {})
        with pytest.raises(RpcError) as ei:
            c.call("repl/open", {})
        assert ei.value.kind == "too_many_sessions" and "repl/close" in ei.value.message
        assert c.call("repl/close", {"session": a})["closed"]
        assert c.call("repl/open", {})["session"]
        assert len(c.call("repl/list")["sessions"]) == 2


def test_a_closed_connection_takes_its_sessions(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv)
    other = d.client()
    with d.client() as c:
        sid = c.call("repl/open", {})["session"]
        c.call("repl/exec", {"session": sid, "code": "x = 1"})
        assert other.call("repl/list")["sessions"][0]["session"] == sid
    try:
        wait_for(lambda: not other.call("repl/list")["sessions"], what="the session to close")
        with pytest.raises(RpcError) as ei:
            other.call("repl/exec", {"session": sid, "code": "print(x)"})
        assert "connection" in ei.value.message
        assert d.call("daemon/ping") == "pong"
    finally:
        other.close()


def test_llm_query_method(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv)
    r = d.call("llm/query", {"prompt": "what is up"})
    assert r["text"] == "echo:what is up" and r["model"] == "sub"
    assert r["provider"] == "scripted" and r["cached"] is False
    assert r["tokens"]["input"] > 0 and "cost" in r
    again = d.call("llm/query", {"prompt": "what is up"})
    assert again["cached"] is True and again["text"] == r["text"]
    with pytest.raises(RpcError) as ei:
        d.call("llm/query", {"prompt": "x", "model": "no-such-model"})
    assert ei.value.kind == "model_error" and "no-such-model" in ei.value.message


def test_example_config_documents_the_repl_section():
    cfg = load_config(REPO / "config" / "example.toml")
    text = (REPO / "config" / "example.toml").read_text()
    assert "[repl]" in text
    for field in type(cfg.repl).__struct_fields__:
        assert f"{field} =" in text, f"[repl] {field} is not documented in example.toml"


def test_scratch_dirs_are_removed(make_daemon, scripted_config, srv):
    d = served_daemon(make_daemon, scripted_config, srv, start=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = d.state_dir / "tmp" / f"repl-{dead.pid}-0123456789ab"
    leftover.mkdir(parents=True)
    d.start()
    with d.client() as c:
        sid = c.call("repl/open", {})["session"]
        c.call("repl/exec", {"session": sid, "code": "open('note.txt', 'w').write('x')"})
        mine = [p for p in (d.state_dir / "tmp").glob("repl-*") if p.name.endswith(sid[:12])]
        assert len(mine) == 1 and not leftover.exists()  # a dead daemon's dir went
        c.call("repl/close", {"session": sid})
        assert not mine[0].exists()
