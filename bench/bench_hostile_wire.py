"""The hostile wire cases of issue 14, re-run: this tree's daemon beside an older one.

Each case starts a real daemon (``python -m rlmd``) on a temp socket and attacks it the
way the hostile test did; ``--baseline-tree DIR`` (an exported older tree, e.g. ``git
archive 4b54b4a | tar -x -C DIR``) runs the same cases against that tree's daemon too.

1. ``query/cancel`` flood: a million small never-started job ids, then 8 huge ids; the
   daemon's RSS before, right after, and after the 10 s early-cancel expiry.
2. One 256 MiB NDJSON line with no newline: seconds until it is refused.
3. JSON nested 100,000 deep: what the client gets, and whether the connection still
   answers.
4. 200 connects while the daemon accepts nothing (SIGSTOP): how many the kernel queued.
5. A batch of N ``query/run`` (each runs a 2 s REPL block): peak processes and RSS under
   the daemon, ``daemon/ping`` latency meanwhile, how many were answered or refused.
6. 1,010 idle connections with the daemon's soft open-files limit at 1024: whether a new
   client is served, and how many idle ones the daemon closed.

The receive times of one large message per framing are bench_protocol's second table.

    python bench/bench_hostile_wire.py [--quick] [--baseline-tree DIR]
        [--doc docs/benchmarks.md --doc-section hardening]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rlmd.launch import daemon_command, spawn_daemon, wait_until_answering
from rlmd.proc import status_kib
from rlmd.testing.scripted_server import Rule, ScriptedReply, ScriptedServer

REPO = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (REPL workers and their helpers)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Daemon:
    def __init__(self, root: Path, tree: Path | None, name: str, config: str | None) -> None:
        self.socket = root / f"{name}.sock"
        cfg = None
        if config is not None:
            cfg = root / f"{name}.toml"
            cfg.write_text(config)
        argv = daemon_command(
            self.socket, state_dir=root / f"{name}-state", config=cfg, log_level="warning"
        )
        env = {**os.environ, "PYTHONPATH": str(tree or REPO)}
        self.proc = spawn_daemon(argv, env=env, cwd=tree or REPO)
        wait_until_answering(self.proc, self.socket, timeout_s=60)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, timeout: float = 60) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.socket))
        return s

    def ping_s(self) -> float:
        t = time.perf_counter()
        with contextlib.closing(self.connect()) as s:
            s.sendall(b'{"jsonrpc":"2.0","method":"daemon/ping","id":1}\n')
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
        return time.perf_counter() - t

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def daemon(root: Path, tree: Path | None, name: str, config: str | None = None) -> Iterator[Daemon]:
    d = Daemon(root, tree, name, config)
    try:
        yield d
    finally:
        d.stop()


def _read_line(s: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


# -- the cases -------------------------------------------------------------------------------


def cancel_flood(d: Daemon, small: int, huge: int, huge_mb: int) -> dict:
    before = status_kib(d.pid) / 1024
    with contextlib.closing(d.connect(600)) as s:
        line = b'{"jsonrpc":"2.0","method":"query/cancel","params":{"job":"j%d"}}\n'
        step = 50_000
        for start in range(0, small, step):
            s.sendall(b"".join(line % i for i in range(start, min(start + step, small))))
        pad = b"x" * (huge_mb * 10**6)
        for i in range(huge):
            s.sendall(
                b'{"jsonrpc":"2.0","method":"query/cancel","params":{"job":"%d' % i + pad + b'"}}\n'
            )
        s.sendall(b'{"jsonrpc":"2.0","method":"daemon/ping","id":1}\n')
        while b"pong" not in _read_line(s):
            pass
        after = status_kib(d.pid) / 1024
        time.sleep(11)  # past the 10 s early-cancel expiry
        s.sendall(line % 0 + b'{"jsonrpc":"2.0","method":"daemon/ping","id":2}\n')
        while b"pong" not in _read_line(s):
            pass
    return {"before": before, "after": after, "expired": status_kib(d.pid) / 1024}


def refuse_long_line(d: Daemon, limit: int) -> float:
    """Seconds until a newline-less line just over ``limit`` bytes is refused."""
    piece = b"a" * (1 << 20)
    with contextlib.closing(d.connect(600)) as s:
        t = time.perf_counter()
        s.sendall(b'{"pad":"')
        sent = 0
        try:
            while sent <= limit + (1 << 20):
                s.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        with contextlib.suppress(ConnectionResetError):
            while s.recv(65536):
                pass
        return time.perf_counter() - t


def deep_json(d: Daemon) -> str:
    with contextlib.closing(d.connect(60)) as s:
        s.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        first = _read_line(s)
        if not first:
            return "connection closed, no answer"
        code = json.loads(first)["error"]["code"]
        try:
            s.sendall(b'{"jsonrpc":"2.0","method":"daemon/ping","id":2}\n')
            again = b"pong" in _read_line(s)
        except OSError:
            again = False
        return f"{code} answered; same connection {'still serves' if again else 'closed'}"


def backlog(d: Daemon, n: int = 200) -> int:
    socks = []
    queued = 0
    os.kill(d.pid, signal.SIGSTOP)
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(d.socket))
                queued += 1
            except BlockingIOError:
                pass
            socks.append(s)
    finally:
        os.kill(d.pid, signal.SIGCONT)
        for s in socks:
            s.close()
    return queued


def query_batch(d: Daemon, n: int) -> dict:
    batch = [
        {
            "jsonrpc": "2.0",
            "id": i,
            "method": "query/run",
            "params": {"query": f"question {i}", "options": {"mode": "rlm", "cache": False}},
        }
        for i in range(n)
    ]
    peak = {"procs": 0, "rss": 0.0}
    pings: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            kids = descendants(d.pid)
            rss = 0.0
            for k in kids:
                with contextlib.suppress(OSError):
                    rss += status_kib(k) / 1024
            peak["procs"] = max(peak["procs"], len(kids))
            peak["rss"] = max(peak["rss"], rss)
            pings.append(d.ping_s())
            done.wait(0.2)

    w = threading.Thread(target=watch)
    w.start()
    t = time.perf_counter()
    with contextlib.closing(d.connect(900)) as s:
        s.sendall(json.dumps(batch).encode() + b"\n")
        data = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
            answer = next((ln for ln in data.split(b"\n") if ln.startswith(b"[")), None)
            if answer is not None:
                break
    elapsed = time.perf_counter() - t
    done.set()
    w.join()
    replies = json.loads(answer) if answer else []
    ok = sum(1 for r in replies if "result" in r)
    busy = sum(1 for r in replies if r.get("error", {}).get("code") == -32008)
    return {
        "elapsed": elapsed,
        "ok": ok,
        "busy": busy,
        "other": len(replies) - ok - busy,
        "procs": peak["procs"],
        "rss": peak["rss"],
        "ping_p50": statistics.median(pings) if pings else float("nan"),
        "ping_max": max(pings) if pings else float("nan"),
    }


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
        return True
    except OSError:
        return False


def idle_connections(d: Daemon, n: int, wait_s: float) -> dict:
    idle = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        deadline = time.monotonic() + 5
        while True:
            try:
                s.connect(str(d.socket))
                break
            except BlockingIOError:  # the backlog is full for a moment: wait for accept
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            except OSError:
                break
        if _connected(s):
            idle.append(s)
        else:
            s.close()
            break
    out: dict = {"opened": len(idle)}
    time.sleep(0.5)  # let the daemon accept them all

    def newcomer() -> str:
        try:
            return f"served in {d.ping_s() * 1000:.0f} ms"
        except OSError as exc:
            return f"failed: {type(exc).__name__}"

    out["new_client"] = newcomer()
    time.sleep(wait_s)
    closed = 0
    for s in idle:
        s.setblocking(False)
        try:
            data = s.recv(65536)
            closed += 1 if data == b"" or b"idle_timeout" in data else 0
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    out["closed"] = closed
    out["new_client_after"] = newcomer()
    return out


# -- the run ----------------------------------------------------------------------------------

QUERY_RULES = [
    Rule(
        pattern="Question:",
        reply=ScriptedReply(text="```repl\nimport time\ntime.sleep(2)\nprint('ok')\n```"),
    ),
    Rule(pattern="", reply=ScriptedReply(text="FINAL(done)")),
]


def _provider_config(url: str) -> str:
    return f"""
[[providers]]
name = "scripted"
kind = "ollama"
base_url = "{url}"
models = ["root", "sub"]
capacity = 256

[models]
root = "root"
sub = "sub"

[cache]
enabled = false
"""


@contextlib.contextmanager
def _soft_nofile(limit: int) -> Iterator[None]:
    """Lower our soft open-files limit (the daemon started inside inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run(quick: bool = False, baseline_tree: Path | None = None) -> str:
    small = 200_000 if quick else 1_000_000
    huge_mb = 10 if quick else 100
    nq = 20 if quick else 50
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if baseline_tree is not None:
        trees.append(("baseline", baseline_tree))
    res: dict[str, dict] = {label: {} for label, _ in trees}
    with tempfile.TemporaryDirectory(prefix="rlmd-hostile-", dir="/tmp") as tmp:
        root = Path(tmp)
        for i, (label, tree) in enumerate(trees):
            r = res[label]
            with daemon(root, tree, f"a{i}") as d:
                r["cancel"] = cancel_flood(d, small, 8, huge_mb)
                r["deep"] = deep_json(d)
                r["backlog"] = backlog(d)
                if not quick:
                    r["refuse"] = refuse_long_line(d, 256 << 20)
            with ScriptedServer(QUERY_RULES, models=["root", "sub"]) as srv:
                with daemon(root, tree, f"q{i}", _provider_config(srv.url)) as d:
                    r["queries"] = query_batch(d, nq)
            # Only this tree knows [server]; the baseline keeps its defaults.
            cfg = "[server]\nidle_timeout_s = 5\n" if tree is None else None
            with _soft_nofile(1024), daemon(root, tree, f"i{i}", cfg) as d:
                r["idle"] = idle_connections(d, 1010, 6.0)
    cols = [label for label, _ in trees]

    def row(name: str, fn) -> str:
        return f"| {name} | " + " | ".join(fn(res[c]) for c in cols) + " |"

    lines = [
        "| case | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
        row(
            f"`query/cancel` flood: {small:,} small ids + 8 × {huge_mb} MB ids, daemon RSS "
            "before → after → after the 10 s expiry",
            lambda r: "{before:.0f} → {after:.0f} → {expired:.0f} MB".format(**r["cancel"]),
        ),
    ]
    if not quick:
        lines.append(
            row(
                "256 MiB NDJSON line, no newline: refused after",
                lambda r: f"{r['refuse']:.1f} s",
            )
        )
    lines += [
        row("JSON nested 100,000 deep", lambda r: r["deep"]),
        row(
            "200 connects while the daemon is stopped: queued by the kernel",
            lambda r: f"{r['backlog']} / 200",
        ),
        row(
            f"batch of {nq} `query/run` (2 s REPL block each): answered / refused busy / other",
            lambda r: "{ok} / {busy} / {other} in {elapsed:.1f} s".format(**r["queries"]),
        ),
        row(
            "… peak processes and RSS under the daemon",
            lambda r: "{procs} processes, {rss:.0f} MB".format(**r["queries"]),
        ),
        row(
            "… `daemon/ping` latency meanwhile (median / max)",
            lambda r: "{:.1f} / {:.0f} ms".format(
                r["queries"]["ping_p50"] * 1000, r["queries"]["ping_max"] * 1000
            ),
        ),
        row(
            "1,010 idle connections, soft open-files limit 1024: a new client",
            lambda r: f"{r['idle']['opened']} opened; {r['idle']['new_client']}",
        ),
        row(
            "… idle ones closed by the daemon 6 s later; a new client then",
            lambda r: f"{r['idle']['closed']}; {r['idle']['new_client_after']}",
        ),
    ]
    notes = [
        "",
        "This tree: `limits.max_concurrent_queries = 8`, `max_queued_queries = 64` (defaults), "
        "`server.idle_timeout_s = 5` for the idle case; the baseline has no such settings.",
    ]
    return "\n".join(lines + notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline-tree", type=Path)
    ap.add_argument("--doc", type=Path, help="write the report into this Markdown file")
    ap.add_argument("--doc-section", default="hardening")
    ap.add_argument("--extra", type=Path, help="Markdown appended to the report (e.g. a table)")
    a = ap.parse_args()
    report = "# Hostile wire cases, re-run\n\n" + run(a.quick, a.baseline_tree)
    if a.extra is not None:
        report += "\n\n" + a.extra.read_text()
    print(report)
    if a.doc is not None:
        from rlmd.bench.doc import update_doc

        cmd = "python bench/bench_hostile_wire.py" + (" --quick" if a.quick else "")
        if a.baseline_tree is not None:
            cmd = (
                "git archive 4b54b4a | tar -x -C /tmp/wire-old && "
                + cmd
                + " --baseline-tree /tmp/wire-old"
            )
        update_doc(
            a.doc, a.doc_section, report, cmd + f" --doc {a.doc} --doc-section {a.doc_section}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
