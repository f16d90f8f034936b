"""The demo's question (``.ci/demo``) through a real daemon with the embedded model, per
start mode, side by side in one run: root turns, tokens, wall time, answer, sources.

Run: ``.venv/bin/python bench/bench_demo.py [--modes auto,rlm] [--max-iterations 16]``
(prints Markdown; slow: the embedded model on the CPU).  Each mode gets a fresh daemon
(a cold prompt cache), and the model is loaded before the timed query.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rlmd.client import Client
from rlmd.launch import daemon_command, spawn_daemon, wait_until_answering

QUESTION = "What electricity price per kWh (price_per_kwh) does the example config set?"
REPO = Path(__file__).resolve().parents[1]


def one(mode: str, max_iterations: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="rlmd-demo-", dir="/tmp"))
    sock = root / "s.sock"
    with open(root / "daemon.log", "wb") as log:
        proc = spawn_daemon(
            daemon_command(sock, state_dir=root / "state", config=None, log_level="info"),
            stdout=log,
            stderr=log,
        )
    try:
        wait_until_answering(proc, sock, timeout_s=60)
        with Client(sock, timeout=3600) as c:
            c.call("context/put", {"name": "demo", "path": str(REPO / "config")})
            # Load the model first, so that the timed query is the query alone.
            c.call("query/run", {"query": "Say OK.", "options": {"max_iterations": 1}})
            t0 = time.monotonic()
            res = c.call(
                "query/run",
                {
                    "query": QUESTION,
                    "context": "demo",
                    "options": {"mode": mode, "max_iterations": max_iterations, "cache": False},
                },
            )
            res["wall_s"] = time.monotonic() - t0
            return res
    finally:
        proc.terminate()
        proc.wait(30)


def run(
    quick: bool = False, modes: tuple[str, ...] = ("auto", "rlm"), max_iterations: int = 16
) -> str:
    """Markdown: one row per mode (``quick``: the default mode only; "rlm" takes many
    turns of the slow model)."""
    lines = [
        "## The demo's question per start mode",
        "",
        f"load average at start: {os.getloadavg()[0]:.1f}",
        "",
        "| mode | answer | root turns | tokens in | tokens out | wall (s) | supported | source |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for mode in ("auto",) if quick else modes:
        r = one(mode, max_iterations)
        src = r.get("sources") or []
        where = f"{src[0].get('file')}:{src[0].get('file_line')}" if src else ""
        lines.append(
            f"| {mode} | {r['answer'][:40]} | {r['iterations']} | {r['tokens']['input']:,} | "
            f"{r['tokens']['output']:,} | {r['wall_s']:.1f} | {r.get('supported')} | {where} |"
        )
    lines += ["", f"load average at end: {os.getloadavg()[0]:.1f}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="auto,rlm")
    ap.add_argument("--max-iterations", type=int, default=16)
    args = ap.parse_args()
    print(run(modes=tuple(args.modes.split(",")), max_iterations=args.max_iterations))


if __name__ == "__main__":
    main()
