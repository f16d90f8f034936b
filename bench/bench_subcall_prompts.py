"""Issue 14, Broken 5 re-run: eight threads of model code each call
``llm_query("A" * 200 MiB)`` in one query, against a real daemon.

The daemon runs as ``python -m rlmd`` on a temp socket and state dir; its one provider is a
scripted loopback server in this process (Ollama's wire format) whose provider line names
an ``api_key_env``, so the trace redactor has a secret to look for.  The root model's first
turn is the eight-thread block; its second turn answers.  Measured per tree:

- the daemon's RSS before the query, its peak (``VmHWM``) and its RSS 2 s after;
- the size of the query's trace file;
- the worst ``daemon/ping`` latency while the query ran (a second connection pings every
  20 ms);
- what the model code saw (refused / answered / other), and how long the query took.

``--compare NAME=COMMIT`` (repeatable) runs the same case first against that commit of
this repository (``git archive`` into a temp dir, started with ``PYTHONPATH`` there), so
the rows of one table come from one run on one machine.  Runs one daemon at a time.

Run: ``python bench/bench_subcall_prompts.py [--mib 200] [--threads 8]
[--compare NAME=COMMIT ...] [--doc docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmd.client import Client, RpcError
from rlmd.launch import daemon_command, spawn_daemon, wait_until_answering
from rlmd.proc import status_kib
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

REPO = Path(__file__).resolve().parents[1]
MODEL = "m"
KEY_ENV = "RLMD_BENCH_SUBCALL_KEY"
F = "```"
DONE = "THREADS DONE"


def block(mib: int, threads: int) -> str:
    return f"""
{F}repl
import threading
seen = []
def one():
    try:
        llm_query("A" * ({mib} * 2**20))
        seen.append("answered")
    except Exception as e:
        seen.append("refused" if "window" in str(e) else type(e).__name__ + ": " + str(e)[:80])
ts = [threading.Thread(target=one) for _ in range({threads})]
for t in ts: t.start()
for t in ts: t.join()
print("{DONE}", sorted(set(seen)), len(seen))
{F}
"""


def _config(url: str) -> str:
    return f"""
[[providers]]
name = "lone"
kind = "ollama"
base_url = "{url}"
models = ["{MODEL}"]
capacity = 8
api_key_env = "{KEY_ENV}"

[models]
root = "{MODEL}"
sub = "{MODEL}"

[limits]
timeout_s = 600
cell_timeout_s = 300

[cache]
enabled = false
"""


class _Pinger(threading.Thread):
    """Pings the daemon every 20 ms on its own connection; keeps the worst latency."""

    def __init__(self, sock: Path) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.stop = threading.Event()
        self.worst = 0.0
        self.count = 0

    def run(self) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            f = s.makefile("rb")
            while not self.stop.is_set():
                t0 = time.monotonic()
                s.sendall(b'{"jsonrpc":"2.0","method":"daemon/ping","id":1}\n')
                f.readline()
                self.worst = max(self.worst, time.monotonic() - t0)
                self.count += 1
                self.stop.wait(0.02)


def case(tmp: Path, tree: Path | None, mib: int, threads: int) -> dict:
    code = block(mib, threads)

    def answer(call: ChatCall) -> ScriptedReply:
        last = call.last_user
        if last.startswith("AAAA"):  # a sub-call that got through (the old trees)
            return ScriptedReply(text="ok")
        i = last.find(DONE)
        if i >= 0:
            return ScriptedReply(text="FINAL(" + last[i : i + 200].splitlines()[0] + ")")
        return ScriptedReply(text=code)

    key = "sk-bench-" + secrets.token_hex(16)
    with ScriptedServer(responder=answer, models=[MODEL]) as srv:
        (tmp / "config.toml").write_text(_config(srv.url))
        env = {**os.environ, KEY_ENV: key, "PYTHONPATH": str(tree or REPO)}
        env.pop("RLMD_SOCKET", None)
        env.pop("RLMD_CONFIG", None)
        sock = tmp / "s.sock"
        proc = spawn_daemon(
            daemon_command(sock, state_dir=tmp / "state", config=tmp / "config.toml"),
            env=env,
            cwd=tree or REPO,
        )
        try:
            wait_until_answering(proc, sock, timeout_s=60)
            before = status_kib(proc.pid)
            pinger = _Pinger(sock)
            pinger.start()
            t0 = time.monotonic()
            try:
                with Client(sock, timeout=900) as c:
                    res = c.call(
                        "query/run", {"query": "go", "job": "big", "options": {"mode": "rlm"}}
                    )
                what = str(res.get("answer", ""))[:160]
            except RpcError as exc:
                what = "error: " + exc.message[:160]
            took = time.monotonic() - t0
            pinger.stop.set()
            pinger.join(30)
            peak = status_kib(proc.pid, "VmHWM")
            time.sleep(2)
            after = status_kib(proc.pid)
            trace = tmp / "state" / "traces" / "big.jsonl"
            size = trace.stat().st_size if trace.exists() else 0
            leaked = trace.exists() and key.encode() in trace.read_bytes()
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "after_mb": after / 1024,
        "trace_mb": size / 2**20,
        "ping_max_s": pinger.worst,
        "pings": pinger.count,
        "took_s": took,
        "answer": what.replace("|", "/"),
        "key_in_trace": leaked,
    }


def _size(mib: float) -> str:
    return f"{mib:,.0f} MiB" if mib >= 10 else f"{mib * 1024:,.1f} KiB"


def _checkout(commit: str, into: Path) -> Path:
    """The tree of ``commit`` of this repository, extracted under ``into``."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(mib: int, threads: int, compare: list[tuple[str, str]]) -> str:
    rows = []
    trees: list[tuple[str, str | None]] = [*compare, ("this tree", None)]
    for name, commit in trees:
        with tempfile.TemporaryDirectory(prefix="rlmd-bsp-", dir="/tmp") as d:
            tree = None if commit is None else _checkout(commit, Path(d) / "tree")
            r = case(Path(d), tree, mib, threads)
        rows.append(
            f"| {name} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | {r['after_mb']:.0f} "
            f"| {_size(r['trace_mb'])} | {r['ping_max_s'] * 1000:.0f} ms ({r['pings']} pings) "
            f"| {r['took_s']:.1f} s | {r['answer']} |"
            + (" **the API key is in the trace** |" if r["key_in_trace"] else "")
        )
    return "\n".join(
        [
            f'# Sub-call prompts: {threads} threads × `llm_query("A" * {mib} MiB)`',
            "",
            "One query; the provider names an `api_key_env`, so traces are redacted. Daemon RSS "
            "in MB (peak is `VmHWM`), size of the query's trace, worst `daemon/ping` latency "
            "while the query ran, and what the model code saw.",
            "",
            "| tree | RSS before | RSS peak | RSS 2 s after | trace | worst ping | query | model code saw |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            "| issue 14 (as filed) | | 1860 | 750 | 1.2 GB | 7200 ms | | |",
            *rows,
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=200, help="MiB of each prompt")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=COMMIT",
        help="a commit of this repository to run first (repeatable), e.g. before=0f1f3a0",
    )
    ap.add_argument("--doc", type=Path, help="write the report into this Markdown file")
    ap.add_argument("--doc-section", default="hardening-subcalls")
    a = ap.parse_args()
    compare = []
    for spec in a.compare:
        name, _, commit = spec.rpartition("=")
        compare.append((name or commit, commit))
    report = run(a.mib, a.threads, compare)
    print(report)
    if a.doc is not None:
        from rlmd.bench.doc import update_doc

        cmd = "python bench/bench_subcall_prompts.py" + "".join(
            f" --compare {shlex.quote(s)}" for s in a.compare
        )
        update_doc(a.doc, a.doc_section, report, cmd + f" --doc {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
