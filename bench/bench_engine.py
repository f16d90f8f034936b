"""Engine benchmarks: its own overhead per turn, and what pipelining saves.

Run: ``.venv/bin/python bench/bench_engine.py`` (prints Markdown).  Everything is real
except the model: a real Pool and Ollama provider over the scripted loopback server, a
real REPL worker, a real context store.

1. *Overhead per turn*: an instant scripted model; N turns of a trivial block.  The
   turn's wall time is split into the model call (as the engine timed it), the block's
   execution in the worker, and the rest (the engine: parsing, events, trace, messages).
2. *Pipelining*: a scripted model that keeps writing after the closing fence (a tail of
   words streamed with a delay per piece, as a real model invents the block's output).
   With pipelining the stream is cut at the fence and the block starts at once.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from rlmd.config import Config, LimitsConfig, ModelsConfig, PoolConfig, ProviderConfig
from rlmd.engine.query import Engine
from rlmd.engine.trace import read_trace
from rlmd.engine.types import QueryOptions, QueryParams
from rlmd.pool.pool import Pool
from rlmd.providers.registry import build_provider
from rlmd.store.store import ContextStore
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

MODEL = "bench-root"
F = "```"


def _turns_responder(turns: int, tail_words: int, chunk_delay_s: float):
    """Root model: ``turns`` blocks, each followed by an invented tail, then FINAL."""
    tail = " ".join(f"invented{i}" for i in range(tail_words))

    def respond(call: ChatCall) -> ScriptedReply:
        m = re.search(r"turn (\d+)", call.last_user)
        k = int(m.group(1)) if m else 0
        if k >= turns:
            return ScriptedReply(text=f"FINAL(done after {k})")
        text = f"Next step.\n{F}repl\nx = {k} + 1\nprint('turn', x)\n{F}\n"
        if tail_words:
            text += f"Output: turn {k + 1}\n{tail}\n"
        # One piece per word of the tail; the block itself arrives in a few pieces.
        return ScriptedReply(text=text, chunks=8 + tail_words, chunk_delay_s=chunk_delay_s)

    return respond


async def _run_query(
    tmp: Path, srv: ScriptedServer, *, pipeline: bool, job: str
) -> tuple[float, list[dict]]:
    cfg = Config(
        providers=[
            ProviderConfig(name="s", kind="ollama", base_url=srv.url, models=[MODEL], capacity=4)
        ],
        models=ModelsConfig(root=MODEL, sub=MODEL),
        limits=LimitsConfig(max_iterations=100),
        pool=PoolConfig(retries=1, backoff_base_s=0.01),
    )
    pool = Pool(cfg, [build_provider(p, os.environ) for p in cfg.providers])
    engine = Engine(config=cfg, pool=pool, store=ContextStore(tmp / "contexts"), state_dir=tmp)
    params = QueryParams(
        query="count turns", text="some context\n" * 100, options=QueryOptions(pipeline=pipeline)
    )
    try:
        t0 = time.perf_counter()
        await engine.run(params, job, lambda e: None)
        elapsed = time.perf_counter() - t0
    finally:
        await pool.aclose()
    return elapsed, read_trace(tmp, job)


def _steady(records: list[dict]) -> tuple[int, float, float, float, float]:
    """From the first block's output to the final record (the worker is up by then):
    (turns, wall, model, exec, worker start)."""
    first = next(i for i, r in enumerate(records) if r["type"] == "output")
    t_a = records[first]["t"]
    t_b = next(r["t"] for r in records if r["type"] == "final")
    later = records[first + 1 :]
    turns = [r for r in later if r["type"] == "message" and r["role"] == "assistant"]
    model = sum(r["elapsed_s"] for r in turns)
    execs = sum(r["elapsed_s"] for r in later if r["type"] == "output")
    start = sum(r["elapsed_s"] for r in records if r["type"] == "repl")
    return len(turns), t_b - t_a, model, execs, start


async def _overhead(tmp: Path, turns: int, reps: int) -> list[str]:
    per_turn, engine_part, model_part, exec_part, starts, totals = [], [], [], [], [], []
    with ScriptedServer(responder=_turns_responder(turns, 0, 0.0), models=[MODEL]) as srv:
        for i in range(reps):
            # Without pipelining the model call and the block do not overlap, so the
            # remainder of the wall time is the engine's alone.
            elapsed, recs = await _run_query(tmp, srv, pipeline=False, job=f"ovh{i}")
            n, wall, model, execs, start = _steady(recs)
            totals.append(elapsed)
            per_turn.append(wall / n)
            model_part.append(model / n)
            exec_part.append(execs / n)
            engine_part.append((wall - model - execs) / n)
            starts.append(start)
    med = statistics.median
    return [
        f"| whole query ({turns + 1} turns) | {med(totals) * 1000:.0f} ms |",
        f"| REPL worker start (overlaps the first root call) | {med(starts) * 1000:.0f} ms |",
        f"| steady turn, wall time | {med(per_turn) * 1000:.1f} ms |",
        f"| of which the model call (instant scripted model, HTTP) | "
        f"{med(model_part) * 1000:.1f} ms |",
        f"| of which the block in the worker | {med(exec_part) * 1000:.1f} ms |",
        f"| the engine's own part (parse, events, trace, messages) | "
        f"{med(engine_part) * 1000:.1f} ms |",
    ]


async def _pipelining(tmp: Path, turns: int, tail_words: int, delay: float) -> list[str]:
    out = {}
    with ScriptedServer(
        responder=_turns_responder(turns, tail_words, delay), models=[MODEL]
    ) as srv:
        for pipeline in (False, True):
            elapsed, recs = await _run_query(tmp, srv, pipeline=pipeline, job=f"pipe{pipeline}")
            out_tokens = sum(
                r.get("tokens_out", 0)
                for r in recs
                if r["type"] == "message" and r["role"] == "assistant"
            )
            out[pipeline] = (elapsed, out_tokens)
    off, on = out[False], out[True]
    return [
        f"| without pipelining | {off[0]:.2f} s | {off[0] / turns:.3f} s | {off[1]} |",
        f"| with pipelining | {on[0]:.2f} s | {on[0] / turns:.3f} s | {on[1]} |",
        f"| saved | {off[0] - on[0]:.2f} s ({(1 - on[0] / off[0]) * 100:.0f} %) | "
        f"{(off[0] - on[0]) / turns:.3f} s | {off[1] - on[1]} |",
    ]


def run(turns: int = 10, reps: int = 3, tail_words: int = 60, delay: float = 0.01) -> str:
    """Both benchmarks; Markdown."""

    async def main() -> str:
        with tempfile.TemporaryDirectory(prefix="rlmd-bench-engine-") as d:
            tmp = Path(d)
            ovh = await _overhead(tmp, turns, reps)
            pipe = await _pipelining(tmp, turns, tail_words, delay)
        lines = [
            "## Engine",
            "",
            f"Overhead: {turns} turns of a trivial block + FINAL, instant scripted model, "
            f"median of {reps} queries; steady turns are those after the first output "
            "(pipelining off, so that call and block do not overlap).",
            "",
            "| measure | time |",
            "| --- | --- |",
            *ovh,
            "",
            f"Pipelining: {turns} turns; after each closing fence the model streams "
            f"{tail_words} more words, {delay * 1000:.0f} ms apart.",
            "",
            "| mode | query | per turn | output tokens |",
            "| --- | --- | --- | --- |",
            *pipe,
            "",
        ]
        return "\n".join(lines)

    return asyncio.run(main())


if __name__ == "__main__":
    print(run())
