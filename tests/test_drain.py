"""SIGTERM drains in-flight queries, and the CLI shows queries and cache hits end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from rlmd.testing.scripted_server import Rule, ScriptedReply, ScriptedServer

CONFIG = """
[[providers]]
name = "scripted"
kind = "openai"
base_url = "{url}/v1"
models = ["m"]
capacity = 4

[models]
root = "m"
sub = "m"
"""


def test_sigterm_lets_a_running_query_finish(make_daemon):
    rules = [Rule(pattern="", reply=ScriptedReply(text="FINAL(slow but complete)", delay_s=2.0))]
    with ScriptedServer(rules, models=["m"]) as srv:
        d = make_daemon(CONFIG.format(url=srv.url))
        out: dict = {}

        def ask() -> None:
            with d.client() as c:
                out["result"] = c.call("query/run", {"query": "take your time", "job": "slow"})

        t = threading.Thread(target=ask)
        t.start()
        deadline = time.monotonic() + 20
        while not srv.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.in_flight, "the model call never started"
        d.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert out["result"]["answer"] == "slow but complete"
        assert d.proc.wait(30) == 0
        assert not d.socket.exists()


def test_cli_query_then_cache_hit(make_daemon, tmp_path):
    rules = [
        Rule(pattern="Question:", reply=ScriptedReply(text="```repl\nprint(len(context))\n```")),
        Rule(pattern="", reply=ScriptedReply(text="FINAL(the file has content)")),
    ]
    with ScriptedServer(rules, models=["m"]) as srv:
        d = make_daemon(CONFIG.format(url=srv.url))
        f = tmp_path / "doc.txt"
        f.write_text("hello\n" * 100)
        cmd = [
            sys.executable,
            "-m",
            "rlmd.cli.main",
            "--socket",
            str(d.socket),
            "query",
            "-q",
            "Does the file have content?",
            "-c",
            str(f),
        ]
        r1 = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ)
        assert r1.returncode == 0, r1.stderr
        assert r1.stdout.strip() == "the file has content"
        assert "iterations" in r1.stderr and "trace: rlm trace" in r1.stderr
        calls = len(srv.calls)
        r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ)
        assert r2.stdout.strip() == "the file has content"
        assert len(srv.calls) == calls  # answered from the cache: no model call
        st = subprocess.run(
            [
                sys.executable,
                "-m",
                "rlmd.cli.main",
                "--socket",
                str(d.socket),
                "--json",
                "cache",
                "stats",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(st.stdout)["enabled"] is True

        def trace(*job: str) -> str:
            r = subprocess.run(
                [sys.executable, "-m", "rlmd.cli.main", "--socket", str(d.socket), "trace", *job],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            return r.stdout

        assert "FINAL (cached)" in trace()  # the latest: the second, cached, query
        first_job = r1.stderr.rsplit("rlm trace ", 1)[1].split()[0]
        assert "print(len(context))" in trace(first_job)
