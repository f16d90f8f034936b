"""Ranked search through the daemon: put, the background index build, queries, the loop.

    python bench/bench_search.py [--size 1G] [--scan] [--workers N] [--doc docs/benchmarks.md]

Starts a real ``rlmd`` (``[search] index_min_mb = 50``, ``index_workers = N``, default 2, the daemon's)
on a temp socket and state dir, writes a generated haystack (an 8 MiB block of random words drawn Zipf-like from a
60,000-word vocabulary, repeated under numbered headers, with common query words among
the frequent ones; one
needle line at 50 % and an outdated distractor at 20 %) and measures over the socket:

- ``context/put`` by path, then the index build that follows it (from the put's answer
  to ``context/info`` saying ``search_index: ready``), side by side as a ratio;
- ``daemon/ping`` latency all through the build (pings back to back, 20 ms apart);
- the daemon's RSS (VmRSS) before the put, its peak during the build, and after;
- ranked ``context/search`` latency once indexed (the needle query and others, median
  and worst of 20), and whether the needle ranks first;
- with ``--scan``: the same queries answered by a scan (the store with no index), for
  the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import parse_size

from rlmd.bench.doc import machine, update_doc
from rlmd.client import Client
from rlmd.launch import daemon_command, spawn_daemon, wait_until_answering
from rlmd.proc import status_kib

NEEDLE = "The special magic number for zephyr-aurora is 4471828."
DISTRACTOR = "Outdated: the special magic number for zephyr-aurora was 1190021."
QUERIES = [
    "What is the special magic number for zephyr-aurora?",
    "zephyr-aurora",
    "special magic number",
    "kaloprem vistenu",
    "number",
]


def generate(path: Path, size: int) -> int:
    rng = random.Random(7)
    vocab = [
        "".join(rng.choices("abcdefghiklmnoprstuvy", k=rng.randint(3, 10))) for _ in range(60000)
    ]
    vocab[10:10] = ["the", "a", "of", "is", "for", "number", "special"]
    cum = list(itertools.accumulate(1 / (r + 1) for r in range(len(vocab))))  # Zipf-like
    lines, n = [], 0
    while n < 8 * 2**20:
        line = " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(5, 18))) + "\n"
        lines.append(line)
        n += len(line)
    block = "".join(lines).encode()
    written = blk = 0
    with open(path, "wb") as f:
        while written < size:
            head = f"### section {blk}\n".encode()
            if written <= size * 0.2 < written + len(block):
                head += DISTRACTOR.encode() + b"\n"
            if written <= size * 0.5 < written + len(block):
                head += NEEDLE.encode() + b"\n"
            f.write(head + block)
            written += len(head) + len(block)
            blk += 1
    return written


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ms (worst {max(xs) * 1000:.1f})"


def run(size_label: str, scan: bool, workers: int = 2) -> str:
    size = parse_size(size_label)
    with tempfile.TemporaryDirectory(prefix="rlmd-bse-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "c.toml").write_text(f"[search]\nindex_min_mb = 50\nindex_workers = {workers}\n")
        sock = root / "d.sock"
        argv = daemon_command(
            sock, state_dir=root / "state", config=root / "c.toml", log_level="warning"
        )
        proc = spawn_daemon(argv, stderr=None)
        wait_until_answering(proc, sock, timeout_s=30)
        pid = proc.pid
        src = root / "haystack.txt"
        nbytes = generate(src, size)
        try:
            with Client(sock, timeout=3600) as c, Client(sock, timeout=60) as pinger:
                rss0 = status_kib(pid, "VmRSS")
                t = time.perf_counter()
                c.call("context/put", {"name": "h", "path": str(src)})
                put_s = time.perf_counter() - t
                src.unlink()
                t0 = time.perf_counter()
                pings: list[float] = []
                rss_peak = 0
                while True:
                    t = time.perf_counter()
                    pinger.call("daemon/ping")
                    pings.append(time.perf_counter() - t)
                    rss_peak = max(rss_peak, status_kib(pid, "VmRSS"))
                    state = c.call("context/info", {"name": "h"}).get("search_index")
                    if state != "building":
                        break
                    time.sleep(0.02)
                build_s = time.perf_counter() - t0
                if state != "ready":
                    raise SystemExit(f"the index did not build: {state}")
                lat: list[float] = []
                first_ok = True
                for i in range(20):
                    q = QUERIES[i % len(QUERIES)]
                    t = time.perf_counter()
                    r = c.call(
                        "context/search", {"name": "h", "mode": "ranked", "query": q, "k": 10}
                    )
                    lat.append(time.perf_counter() - t)
                    assert r["indexed"]
                    if i % len(QUERIES) == 0:
                        first_ok &= r["matches"][0]["text"] == NEEDLE
                rss_after = status_kib(pid, "VmRSS")
                hwm = status_kib(pid, "VmHWM")
                idx_mb = sum(p.stat().st_size for p in (root / "state").rglob("*.sidx")) / 2**20
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        scan_line = ""
        if scan:
            from rlmd.store import ContextStore

            store = ContextStore(root / "state" / "contexts", search_index_min_bytes=None)
            st: list[float] = []
            for q in QUERIES[:2]:
                t = time.perf_counter()
                hits = store.search_ranked("h", q, 10)
                st.append(time.perf_counter() - t)
            scan_line = (
                f"| ranked search by scan (no index; 2 queries) | {_ms(st)} "
                f"| {statistics.median(st) / statistics.median(lat):,.0f}x the indexed time |"
            )
            assert hits
    rows = [
        f"Context: {nbytes / 2**20:,.0f} MiB generated haystack (`--size {size_label}`); "
        f"machine: {machine()}.",
        "",
        "| measure | value | note |",
        "| --- | ---: | --- |",
        f"| `context/put` by path | {put_s:.2f} s | |",
        f"| index build after the put (background, child process) | {build_s:.2f} s | "
        f"{build_s / put_s:.2f}x the put time (target <= 3x); index {idx_mb:.0f} MiB; "
        f"{workers} worker(s) |",
        f"| `daemon/ping` during the build ({len(pings)} pings) | {_ms(pings)} | "
        f"p99 {sorted(pings)[int(0.99 * (len(pings) - 1))] * 1000:.1f} ms |",
        f"| ranked `context/search`, indexed (20 queries, k=10) | {_ms(lat)} | "
        f"needle first: {'yes' if first_ok else 'NO'} (target <= 100 ms) |",
        *([scan_line] if scan_line else []),
        f"| daemon RSS: before put / peak during build / after queries | "
        f"{rss0 / 1024:.0f} / {rss_peak / 1024:.0f} / {rss_after / 1024:.0f} MiB | VmHWM {hwm / 1024:.0f} MiB |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--scan", action="store_true", help="also time ranked search by scan")
    ap.add_argument("--workers", type=int, default=2, help="[search] index_workers")
    ap.add_argument("--doc", type=Path, help="write the report into this Markdown file")
    a = ap.parse_args()
    report = run(a.size, a.scan, a.workers)
    print(report)
    if a.doc:
        cmd = f"python bench/bench_search.py --size {a.size}"
        cmd += (f" --workers {a.workers}" if a.workers != 2 else "") + (" --scan" if a.scan else "")
        update_doc(a.doc, f"search-{a.size}", report, cmd)
