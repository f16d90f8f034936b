"""The ``rlm`` command as a user runs it, against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def rlm(*args: str, env: dict | None = None, input: str | None = None, check: bool = True):
    r = subprocess.run(
        [sys.executable, "-m", "rlmd.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        input=input,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"rlm {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def test_context_commands(daemon, tmp_path):
    s = ["--socket", str(daemon.socket)]
    f = tmp_path / "notes.txt"
    f.write_text("one\ntwo TODO\nthree\n")
    out = rlm(*s, "context", "put", "notes", str(f)).stdout
    assert "notes: 19 chars, 3 lines" in out
    rlm(*s, "context", "put", "piped", "-", input="from stdin\n")
    ls = rlm(*s, "context", "ls").stdout
    assert "notes" in ls and "piped" in ls
    assert rlm(*s, "context", "peek", "notes", "--start", "4", "--end", "7").stdout == "two\n"
    assert rlm(*s, "context", "search", "notes", "TODO").stdout.strip() == "2:8-12: TODO"
    assert rlm(*s, "context", "search", "notes", "nothing-here", check=False).returncode == 1
    j = json.loads(rlm(*s, "--json", "context", "ls").stdout)
    assert {c["name"] for c in j} == {"notes", "piped"}
    rlm(*s, "context", "rm", "piped")
    r = rlm(*s, "context", "rm", "piped", check=False)
    assert r.returncode == 1 and "no context named" in r.stderr
    st = json.loads(rlm(*s, "--json", "status").stdout)
    assert st["pid"] == daemon.proc.pid and st["contexts"] == 1
    r = rlm(*s, "context", "peek", "missing", check=False)
    assert r.returncode == 1 and "missing" in r.stderr


def test_cli_starts_a_daemon_when_none_runs(short_tmp):
    sock = short_tmp / "auto.sock"
    env = {"RLMD_STATE_DIR": str(short_tmp / "state")}
    try:
        r = rlm("--socket", str(sock), "status", env=env)
        assert "started rlmd" in r.stderr
        assert "rlmd 0." in r.stdout
        r2 = rlm("--socket", str(sock), "status", env=env)
        assert "started" not in r2.stderr
    finally:
        lock = short_tmp / "auto.sock.lock"
        if lock.exists() and lock.read_text().strip():
            os.kill(int(lock.read_text()), signal.SIGTERM)
        for _ in range(100):
            if not sock.exists():
                break
            time.sleep(0.1)


def test_no_start_reports_clearly(short_tmp):
    r = rlm("--socket", str(short_tmp / "none.sock"), "--no-start", "status", check=False)
    assert r.returncode == 1 and "cannot reach the daemon" in r.stderr


def test_client_retries_a_full_backlog(make_daemon):
    """With the backlog full, a connect fails at once with EAGAIN; the client retries
    briefly instead of failing (seen under 200 concurrent connects)."""
    import socket
    import threading

    from rlmd.client import Client

    d = make_daemon("[server]\nlisten_backlog = 2\n")
    fillers = []
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        while True:  # fill the backlog until the kernel refuses
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            fillers.append(s)
            try:
                s.connect(str(d.socket))
            except BlockingIOError:
                break
            assert len(fillers) < 100, "the backlog never filled"
        out: dict = {}

        def ping() -> None:
            try:
                with Client(d.socket, timeout=10) as c:
                    out["reply"] = c.call("daemon/ping")
            except Exception as exc:
                out["error"] = exc

        t = threading.Thread(target=ping)
        t.start()
        t.join(0.3)  # the client's first connects meet the full backlog
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    t.join(20)
    for s in fillers:
        s.close()
    assert out == {"reply": "pong"}
