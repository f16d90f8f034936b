"""Context put / peek / search through the daemon's socket, with the daemon's RSS.

    python bench/bench_store_daemon.py [--sizes 100M,1G]

Starts a real ``rlmd`` on a temp socket and state dir, writes a generated text file of
each size, and measures over the socket: ``context/put`` by path, peeks at random
offsets, a full-scan literal search and a regex search.  The daemon's resident size
(VmRSS) and its peak (VmHWM) are read from /proc after each step: the point is that a
1 GB context costs the daemon almost no memory.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import generate, parse_size

from rlmd.client import Client
from rlmd.launch import daemon_command, spawn_daemon, wait_until_answering
from rlmd.proc import status_kib


def _start(root: Path) -> subprocess.Popen:
    sock = root / "d.sock"
    argv = daemon_command(sock, state_dir=root / "state", log_level="warning")
    proc = spawn_daemon(argv, stderr=None)
    wait_until_answering(proc, sock, timeout_s=20)
    return proc


def run(sizes: list[str] | None = None) -> str:
    """Measure each size; return a Markdown table."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlmd-bsd-", dir="/tmp") as tmp:
        root = Path(tmp)
        proc = _start(root)
        pid = proc.pid
        base_rss = status_kib(pid, "VmRSS")
        try:
            with Client(root / "d.sock", timeout=600) as c:
                for label in sizes or ["100M", "1G"]:
                    size = parse_size(label)
                    src = root / f"ctx-{label}.txt"
                    generate(src, size, "ascii")
                    t = time.perf_counter()
                    info = c.call("context/put", {"name": label, "path": str(src)})
                    put_s = time.perf_counter() - t
                    src.unlink()
                    rss_put = status_kib(pid, "VmRSS")
                    rng = random.Random(1)
                    t = time.perf_counter()
                    for _ in range(200):
                        start = rng.randrange(0, max(1, info["chars"] - 1000))
                        c.call("context/peek", {"name": label, "start": start, "end": start + 1000})
                    peek_ms = (time.perf_counter() - t) / 200 * 1000
                    t = time.perf_counter()
                    c.call("context/search", {"name": label, "pattern": "zzqx-not-there"})
                    lit_s = time.perf_counter() - t
                    t = time.perf_counter()
                    c.call(
                        "context/search",
                        {"name": label, "pattern": r"ERROR 99\d: code\d+", "max_matches": 1000},
                    )
                    re_s = time.perf_counter() - t
                    rows.append(
                        (
                            label,
                            info["bytes"],
                            put_s,
                            peek_ms,
                            lit_s,
                            re_s,
                            rss_put,
                            status_kib(pid, "VmRSS"),
                            status_kib(pid, "VmHWM"),
                        )
                    )
                    c.call("context/drop", {"name": label})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    out = [
        "Through the daemon's socket (`context/put` by path, 200 peeks of 1,000 chars at random "
        f"offsets, a full-scan literal search, a regex search). Daemon RSS at start: {base_rss / 1024:.0f} MiB.",
        "",
        "| context | put | peek (avg) | literal search | regex search | daemon RSS after put | after searches | peak (VmHWM) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, nbytes, put_s, peek_ms, lit_s, re_s, r1, r2, hwm in rows:
        out.append(
            f"| {label} ({nbytes / 2**20:,.0f} MiB) | {put_s:.2f} s | {peek_ms:.2f} ms | "
            f"{lit_s:.2f} s | {re_s:.2f} s | {r1 / 1024:.0f} MiB | {r2 / 1024:.0f} MiB | "
            f"{hwm / 1024:.0f} MiB |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100M,1G")
    a = ap.parse_args()
    print(run(a.sizes.split(",")))
