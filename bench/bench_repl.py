"""REPL worker costs: start-up, block round trip, model calls from the worker, the context view.

Measured with real workers under each protection mode this machine offers (bubblewrap +
seccomp, seccomp only, rlimits only) and an instant ``on_call`` handler, so the figures
are the REPL's own overhead:

* worker start: ``ReplSession.start`` until the worker said Ready (spawn, bubblewrap,
  interpreter, imports, context mapping, limits, seccomp), and for comparison the bare
  interpreter (``python -I -S -c pass``) and the venv interpreter with ``site``;
* block round trip: ``execute("x = 1")``;
* one ``llm_query`` from the worker to the daemon and back;
* one ``llm_query_batched`` of 1,000 prompts (one message each way);
* the context view on a large file: opening (ASCII scan), character index of a non-ASCII
  text, a slice, and ``re.findall`` on the mapped bytes versus on a decoded str.

Run: ``python bench/bench_repl.py [--quick] [--context-mb 64]``; ``run(quick, context_mb)``
returns the Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmd.config import LimitsConfig, SandboxConfig
from rlmd.repl.ctxview import ContextView, make_re_module
from rlmd.repl.daemon_sandbox import SandboxUnavailable, host_sys_path, python_executable
from rlmd.repl.session import ReplSession, protection

MODES = {
    "bwrap+seccomp": SandboxConfig(bwrap="require", seccomp="require"),
    "seccomp only": SandboxConfig(bwrap="off", seccomp="require"),
    "rlimits only": SandboxConfig(bwrap="off", seccomp="off"),
}


async def instant(method: str, params: dict) -> Any:
    if method == "llm_query_batched":
        return ["ok"] * len(params["prompts"])
    return "ok"


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    return f"{statistics.median(xs) * 1000:.1f} / {p90 * 1000:.1f}"


async def bench_mode(
    cfg: SandboxConfig, root: Path, n_start: int, n_blocks: int, n_calls: int
) -> dict[str, str]:
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    ctx = root / "ctx.txt"
    ctx.write_text("hello\n" * 1000)
    starts = []
    for _ in range(n_start):
        t0 = time.perf_counter()
        s = await ReplSession.start(
            context_path=ctx,
            limits=LimitsConfig(),
            sandbox=cfg,
            scratch_dir=scratch,
            on_call=instant,
        )
        starts.append(time.perf_counter() - t0)
        await s.close()
    s = await ReplSession.start(
        context_path=ctx, limits=LimitsConfig(), sandbox=cfg, scratch_dir=scratch, on_call=instant
    )
    try:
        rts = []
        for _ in range(n_blocks):
            t0 = time.perf_counter()
            await s.execute("x = 1", timeout_s=30)
            rts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = await s.execute(f"for _ in range({n_calls}):\n    llm_query('p')", timeout_s=120)
        assert r.error is None, r.error
        per_call = (time.perf_counter() - t0) / n_calls
        batch = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = await s.execute(
                "out = llm_query_batched([f'prompt {i}' for i in range(1000)])", timeout_s=120
            )
            assert r.error is None, r.error
            batch.append(time.perf_counter() - t0)
    finally:
        await s.close()
    return {
        "start": ms(starts),
        "block": f"{statistics.median(rts) * 1e6:.0f}",
        "call": f"{per_call * 1e6:.0f}",
        "batch": f"{statistics.median(batch) * 1000:.1f}",
    }


def interpreter_start(n: int) -> tuple[str, str, str]:
    def timed(cmd: list[str]) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            out.append(time.perf_counter() - t0)
        return out

    bare = timed([python_executable(), "-I", "-S", "-c", "pass"])
    boot = f"import sys; sys.path[:0] = {host_sys_path()!r}; import rlmd.repl.worker"
    imports = timed([python_executable(), "-I", "-S", "-c", boot])
    site = timed([sys.executable, "-c", "pass"])
    return ms(bare), ms(imports), ms(site)


def bench_view(root: Path, mb: int) -> list[str]:
    rows = []
    line_a = "The quick brown fox 123 jumps over the lazy dog; ERROR code 42 in module x.\n"
    line_u = "Größe ünd Maß — 日本語 テキスト 123; ERROR code 42 in módulo ☃ café naïve.\n"
    rem = make_re_module()
    for kind, line in (("ASCII", line_a), ("non-ASCII", line_u)):
        p = root / f"big-{kind}.txt"
        reps = mb * 1024 * 1024 // len(line.encode())
        with open(p, "w", encoding="utf-8") as f:
            for _ in range(reps // 1000):
                f.write(line * 1000)
        size = os.path.getsize(p)
        t0 = time.perf_counter()
        v = ContextView.open(str(p))
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = len(v)
        t_len = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(1000):
            v[(i * 7919 * 131) % n : (i * 7919 * 131) % n + 100]
        t_slice = (time.perf_counter() - t0) / 1000
        t_re_view = t_decode = t_re_str = float("inf")
        for _ in range(2):  # best of two: the first pass also faults the pages in
            t0 = time.perf_counter()
            hits = rem.findall(r"ERROR code [0-9]+", v)
            t_re_view = min(t_re_view, time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = str(v)
            t_decode = min(t_decode, time.perf_counter() - t0)
            t0 = time.perf_counter()
            hits2 = re.findall(r"ERROR code [0-9]+", s)
            t_re_str = min(t_re_str, time.perf_counter() - t0)
            del s
        assert hits == hits2 and not v.materialized
        rows.append(
            f"| {kind} {size / 2**20:.0f} MiB | {t_open * 1000:.0f} | {t_len * 1000:.0f} | "
            f"{t_slice * 1e6:.0f} | {t_re_view * 1000:.0f} | {t_decode * 1000:.0f} | {t_re_str * 1000:.0f} |"
        )
        p.unlink()
    return rows


def run(quick: bool = False, context_mb: int = 64) -> str:
    """Run the benchmark; return Markdown."""
    n_start, n_blocks, n_calls = (5, 100, 200) if quick else (20, 500, 2000)
    out = ["## REPL workers", ""]
    bare, imports, site = interpreter_start(n_start)
    out.append(f"Bare interpreter `python -I -S -c pass`: {bare} ms (median / p90); ")
    out.append(f"the same importing the worker's modules (msgspec included): {imports} ms; ")
    out.append(f"venv interpreter with `site`, for comparison: {site} ms.")
    out.append("")
    out.append(
        "| protection | worker start ms (median / p90) | trivial block µs | llm_query round trip µs "
        "| llm_query_batched(1000) ms |"
    )
    out.append("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="rlmd-bench-") as d:
        for name, cfg in MODES.items():
            try:
                protection(cfg)
            except SandboxUnavailable as exc:
                out.append(f"| {name} | unavailable: {exc} | | | |")
                continue
            r = asyncio.run(bench_mode(cfg, Path(d), n_start, n_blocks, n_calls))
            out.append(f"| {name} | {r['start']} | {r['block']} | {r['call']} | {r['batch']} |")
        out.append("")
        out.append(
            f"Context view (in-process, {context_mb} MiB files; times in ms unless noted; "
            "`re.findall` and `str` best of two):"
        )
        out.append("")
        out.append(
            "| file | open (scan) | len (index) | 100-char slice µs | re.findall on view "
            "| str(view) | re.findall on str |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- |")
        out.extend(bench_view(Path(d), context_mb))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--context-mb", type=int, default=64, help="size of the context view files")
    args = ap.parse_args(argv)
    print(run(args.quick, args.context_mb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
