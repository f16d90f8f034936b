"""Request throughput and latency over the daemon's socket, in both framings.

Starts a real daemon (``python -m rlmd``) on a temp socket and drives it from client
processes.  For comparison in the same run, the same socket server is also started with
jsonrpcserver's default ``dispatch`` (jsonschema validation, its own JSON codec) in place
of rlmd's dispatcher: ratios survive a noisy machine, absolute numbers do not.

    python bench/bench_protocol.py [--seconds 3] [--clients 2] [--sizes 25,50,100,200]
        [--baseline-tree DIR]

The second table is the receive time of ONE large message (a ping padded to N MB), in
each framing: NDJSON searched the whole buffer for a newline on every read (quadratic)
until the hardening round.  ``--baseline-tree DIR`` (an exported older tree, e.g. ``git
archive 4b54b4a | tar -x -C DIR``) adds its daemon's times side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rlmd.launch import daemon_command, spawn_daemon, wait_until_answering

REQ = b'{"jsonrpc":"2.0","method":"daemon/ping","id":%d}'


def _frame(framing: str, body: bytes) -> bytes:
    if framing == "content-length":
        return b"Content-Length: %d\r\n\r\n" % len(body) + body
    return body + b"\n"


def _throughput_client(path: str, framing: str, seconds: float, window: int, q: mp.Queue) -> None:
    """Pipelines ``window`` requests at a time; counts answered requests."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    batch = b"".join(_frame(framing, REQ % i) for i in range(window))
    # Count answers by their "result" key, across chunk boundaries: count in tail + chunk,
    # minus what the tail alone held (it was counted with the previous chunk).
    done = 0
    deadline = time.perf_counter() + seconds
    tail = b""
    while time.perf_counter() < deadline:
        s.sendall(batch)
        got = 0
        while got < window:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            joined = tail + chunk
            got += joined.count(b'"result"') - tail.count(b'"result"')
            tail = joined[-16:]
        done += window
    s.close()
    q.put(done)


def _latency(path: str, framing: str, n: int) -> list[float]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    out = []
    for i in range(n):
        t = time.perf_counter()
        s.sendall(_frame(framing, REQ % i))
        data = b""
        while not data.endswith(b"}\n") and not data.endswith(b"}"):
            data += s.recv(65536)
        out.append(time.perf_counter() - t)
    s.close()
    return out


def measure(path: str, framing: str, seconds: float, clients: int, window: int = 64) -> dict:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_throughput_client, args=(path, framing, seconds, window, q))
        for _ in range(clients)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    lat = sorted(_latency(path, framing, 2000))
    return {
        "rps": total / elapsed,
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
    }


def _start_daemon(
    root: Path, tree: Path | None = None, name: str = "d", config: Path | None = None
) -> subprocess.Popen:
    """Start ``python -m rlmd`` from this tree, or from ``tree`` (an older export)."""
    sock = root / f"{name}.sock"
    argv = daemon_command(
        sock, state_dir=root / f"{name}-state", config=config, log_level="warning"
    )
    env = None
    if tree is not None:
        env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = spawn_daemon(argv, env=env, cwd=tree)
    wait_until_answering(proc, sock, timeout_s=30)
    return proc


def padded_ping(size: int) -> bytes:
    """A daemon/ping request of exactly ``size`` bytes (a pad member it ignores)."""
    head = b'{"jsonrpc":"2.0","method":"daemon/ping","id":1,"pad":"'
    return head + b"a" * (size - len(head) - 2) + b'"}'


def large_message_s(path: str, framing: str, size: int) -> float:
    """Seconds from the first byte of one ``size``-byte message to its answer."""
    body = _frame(framing, padded_ping(size))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(600)
    s.connect(path)
    t = time.perf_counter()
    s.sendall(body)
    data = b""
    while b"pong" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        data += chunk
    elapsed = time.perf_counter() - t
    s.close()
    return elapsed


def large_messages(
    sizes_mb: list[int], baseline_tree: Path | None = None
) -> list[tuple[int, dict[str, float]]]:
    """Per size: receive seconds keyed "<tree> <framing>" (tree: "now" or "baseline")."""
    trees: list[tuple[str, Path | None]] = [("now", None)]
    if baseline_tree is not None:
        trees.append(("baseline", baseline_tree))
    rows: dict[int, dict[str, float]] = {mb: {} for mb in sizes_mb}
    with tempfile.TemporaryDirectory(prefix="rlmd-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        for label, tree in trees:
            proc = _start_daemon(root, tree, name=label)
            try:
                for mb in sizes_mb:
                    for framing in ("ndjson", "content-length"):
                        t = large_message_s(str(root / f"{label}.sock"), framing, mb * 10**6)
                        rows[mb][f"{label} {framing}"] = t
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    return list(rows.items())


def large_table(rows: list[tuple[int, dict[str, float]]]) -> str:
    cols = list(rows[0][1]) if rows else []
    lines = [
        "One message of N MB (a padded `daemon/ping`), from its first byte to the answer:",
        "",
        "| size | " + " | ".join(cols) + " |",
        "| ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for mb, r in rows:
        lines.append(f"| {mb} MB | " + " | ".join(f"{r[c]:.2f} s" for c in cols) + " |")
    return "\n".join(lines)


def _baseline_server(path: str, ready: mp.Event) -> None:
    """The same socket server with jsonrpcserver's default dispatch path."""
    import uvloop
    from jsonrpcserver import Success, dispatch

    from rlmd.server import Server

    def ping() -> object:
        return Success("pong")

    class DefaultDispatch:
        def dispatch(self, body: bytes, context: object) -> bytes | None:
            out = dispatch(body.decode(), methods={"daemon/ping": ping})
            return out.encode() if out else None

    async def main() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(128)
        server = Server(DefaultDispatch(), max_frame=64 << 20)  # type: ignore[arg-type]
        await server.start(s)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


def run(
    seconds: float = 3.0,
    clients: int = 2,
    quick: bool = False,
    sizes_mb: list[int] | None = None,
    baseline_tree: Path | None = None,
) -> str:
    """Run the comparison; return Markdown tables."""
    if sizes_mb is None:
        sizes_mb = [25, 50] if quick else [25, 50, 100, 200]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlmd-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        proc = _start_daemon(root)
        try:
            for framing in ("ndjson", "content-length"):
                r = measure(str(root / "d.sock"), framing, seconds, clients)
                rows.append(("rlmd (msgspec + Structs)", framing, r))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        base_path = str(root / "b.sock")
        bp = ctx.Process(target=_baseline_server, args=(base_path, ready), daemon=True)
        bp.start()
        ready.wait(30)
        try:
            r = measure(base_path, "ndjson", seconds, clients)
            rows.append(("jsonrpcserver default dispatch", "ndjson", r))
        finally:
            bp.kill()
    ours = rows[0][2]["rps"]
    lines = [
        f"Trivial requests over the Unix socket: {clients} client processes pipelining 64 "
        f"requests each for {seconds:.0f} s; latency is one request at a time (2,000 samples).",
        "",
        "| server | framing | requests/s | p50 latency | p99 latency | vs default |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, framing, r in rows:
        lines.append(
            f"| {name} | {framing} | {r['rps']:,.0f} | {r['p50_us']:.0f} µs | "
            f"{r['p99_us']:.0f} µs | {r['rps'] / rows[-1][2]['rps']:.1f}× |"
        )
    lines.append("")
    lines.append(
        f"Target ≥ 20,000 requests/s: {'met' if ours >= 20000 else 'NOT met'} ({ours:,.0f}/s)."
    )
    lines += ["", large_table(large_messages(sizes_mb, baseline_tree))]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--sizes", default="25,50,100,200", help="MB per large message")
    ap.add_argument("--baseline-tree", type=Path, help="an older exported tree to compare")
    ap.add_argument("--large-only", action="store_true", help="only the large-message table")
    a = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.large_only:
        print(large_table(large_messages(sizes, a.baseline_tree)))
    else:
        print(run(a.seconds, a.clients, sizes_mb=sizes, baseline_tree=a.baseline_tree))
