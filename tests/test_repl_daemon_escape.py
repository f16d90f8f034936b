"""Hostile blocks against the real daemon: the worker's parent is the daemon process.

A scripted loopback model writes the hostile block; the daemon runs it in a REPL worker
under each protection mode this machine offers.  The daemon must survive, and the query
must end with a normal answer or a normal ``error`` event, never a transport failure.
"""

from __future__ import annotations

import re

import pytest

from rlmd.client import RpcError
from rlmd.config import SandboxConfig
from rlmd.repl.daemon_sandbox import SandboxUnavailable
from rlmd.repl.session import protection
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

ROOT, SUB = "root-model", "sub-model"
F = "```"
MODES = {
    "bwrap+seccomp": ("require", "require"),
    "bwrap": ("require", "off"),
    "seccomp": ("off", "require"),
    "none": ("off", "off"),
}


def mode_sandbox(mode: str) -> str:
    bw, sc = MODES[mode]
    try:
        protection(SandboxConfig(bwrap=bw, seccomp=sc))  # type: ignore[arg-type]
    except SandboxUnavailable as exc:
        pytest.skip(f"{mode} not available here: {exc}")
    return f'\n[sandbox]\nbwrap = "{bw}"\nseccomp = "{sc}"\n'


EXTRA = """
[limits]
cell_timeout_s = 20
max_iterations = 3

[pool]
retries = 1
backoff_base_s = 0.01

[cache]
enabled = false
"""

# The trick of issue 14: a pipe whose owner is the daemon, SIGKILL as its I/O signal,
# O_ASYNC, one byte written.  Then the ioctl spelling (FIOSETOWN; SIGIO kills too).
FSETOWN_TRICK = """
import fcntl, os, signal, struct
def attempt(what, f, *args):
    try:
        f(*args)
        print(what, 'ok')
    except OSError as e:
        print(what, 'refused', type(e).__name__)
r, w = os.pipe()
attempt('F_SETOWN', fcntl.fcntl, r, fcntl.F_SETOWN, os.getppid())
attempt('F_SETSIG', fcntl.fcntl, r, 10, signal.SIGKILL)
attempt('F_SETOWN_EX', fcntl.fcntl, r, 15, struct.pack('ii', 1, os.getppid()))
fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
os.write(w, b'x')
import stat
def is_sock(f):
    try:
        return stat.S_ISSOCK(os.fstat(f).st_mode)
    except OSError:
        return False
chan = next(f for f in range(3, 64) if is_sock(f))  # FIOSETOWN is a socket ioctl
attempt('FIOSETOWN', fcntl.ioctl, chan, 0x8901, struct.pack('i', os.getppid()))
fcntl.fcntl(chan, fcntl.F_SETFL, fcntl.fcntl(chan, fcntl.F_GETFL) | os.O_ASYNC)
llm_query('x')  # the reply is I/O on the channel: SIGIO to its owner
import time
time.sleep(0.5)
print('worker alive')
"""


def responder(code: str):
    def answer(call: ChatCall) -> ScriptedReply:
        if "worker alive" in call.last_user or (
            "REPL" in call.last_user and "Error" in call.last_user
        ):
            summary = " ".join(re.findall(r"(\w+ (?:ok|refused))", call.last_user))
            return ScriptedReply(text=f"FINAL(seen: {summary or call.last_user[-300:]!r})")
        return ScriptedReply(text=f"Let me look.\n{F}repl\n{code.strip()}\n{F}\n")

    return answer


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def run(d, query: str) -> tuple[object, list[dict]]:
    events: list[dict] = []
    with d.client() as c:
        try:
            return c.call(
                "query/run", {"query": query, "job": "j1"}, on_event=events.append
            ), events
        except RpcError as exc:
            return exc, events


def test_fsetown_sigkill_cannot_reach_the_daemon(mode, make_daemon, scripted_config):
    extra = EXTRA + mode_sandbox(mode)
    with ScriptedServer(responder=responder(FSETOWN_TRICK), models=[ROOT, SUB]) as srv:
        d = make_daemon(scripted_config(srv.url, extra, root=ROOT, sub=SUB))
        res, events = run(d, "Please try the pipe trick.")
        assert d.proc is not None and d.proc.poll() is None, f"the daemon died: {d.proc.returncode}"
        assert d.call("daemon/ping") is not None
        assert not isinstance(res, Exception), res
        answer = res["answer"]  # type: ignore[index]
        out = "\n".join(e.get("text", "") for e in events if e["kind"] == "output")
        assert "worker alive" in out, out
        if mode != "bwrap" and mode != "none":
            # seccomp refuses every command that names a signal's target.
            for what in ("F_SETOWN", "F_SETSIG", "F_SETOWN_EX", "FIOSETOWN"):
                assert f"{what} refused" in answer, answer


# A frame the worker writes on its own channel: a Call whose params nest 100,000 deep.
DEEP_FRAME = """
import os, stat
def is_sock(f):
    try:
        return stat.S_ISSOCK(os.fstat(f).st_mode)
    except OSError:
        return False
fd = next(f for f in range(3, 64) if is_sock(f))
body = (b'\\x84\\xa1t\\xa4call\\xa2id\\x01\\xa6method\\xa9llm_query\\xa6params\\x81\\xa1x'
        + b'\\x91' * 100000 + b'\\xc0')
os.write(fd, len(body).to_bytes(4, 'big') + body)
import time
time.sleep(5)
"""


def test_a_forged_deep_frame_costs_only_the_worker(make_daemon, scripted_config):
    with ScriptedServer(responder=responder(DEEP_FRAME), models=[ROOT, SUB]) as srv:
        d = make_daemon(scripted_config(srv.url, EXTRA, root=ROOT, sub=SUB))
        res, events = run(d, "Forge a frame.")
        assert not isinstance(res, Exception), res
        outs = [e for e in events if e["kind"] == "output"]
        assert outs and "bad message from worker" in str(outs[0]), outs
        assert "restarted" in str(outs[0]).lower() or "variables were lost" in str(outs[0])
        assert d.proc is not None and d.proc.poll() is None
