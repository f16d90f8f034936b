"""The embedded default model on this machine: join, load, prompt and generation speed,
parallel slots, and what the prompt prefix cache saves in a growing conversation.

Everything runs through the real parts: :func:`rlmd.providers.weights.ensure_model` joins the chunk
packages (into a temporary directory, so the shared cache is untouched), and
:class:`rlmd.providers.embedded.EmbeddedProvider` starts the llama.cpp server child.
Speeds are the server's own ``timings`` (prompt_n / prompt_ms, predicted_n /
predicted_ms), read from its OpenAI-compatible endpoint.

Prefix cache: two conversations (A and B) grow turn by turn (a system prompt, then a user
message and a scripted assistant reply per turn) and alternate on one server with two
slots.  Conditions:

* ``pinned``: each conversation always on its own slot (``id_slot``), what the pool's
  affinity gives;
* ``swapped, no RAM cache``: the conversations trade slots every turn and the server has
  no host-memory prompt cache: each turn reprocesses the whole conversation (what a call
  landing on another server costs);
* ``swapped, RAM cache``: the same with llama.cpp's host-memory prompt cache
  (``cache_ram_mib``, the provider's default 1024 MiB);
* ``auto``: no ``id_slot``; llama.cpp picks the slot whose cached prefix matches best.

The machine is shared (2 cores, other engineers' tests): each figure is measured
``repeats`` times and all runs are shown.

Run: ``python bench/bench_embedded.py [--quick] [--repeats N]``; ``run()`` returns Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmd.config import EmbeddedConfig
from rlmd.providers.embedded import EmbeddedProvider
from rlmd.providers.weights import MODELS, ensure_model

BIG = "qwen2.5-coder-1.5b"
SMALL = "qwen2.5-coder-0.5b"
WORDS = (
    "river stone lamp harbor winter cedar signal copper meadow lantern quiet falcon "
    "orbit candle thunder velvet anchor prism maple ember"
).split()


def filler(rng: random.Random, n_words: int) -> str:
    """Varied text (about 1.3 tokens a word) that no cache has seen."""
    return " ".join(f"{rng.choice(WORDS)}{rng.randrange(100)}" for _ in range(n_words))


def fmt_runs(values: list[float], digits: int = 1) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


# -- join ----------------------------------------------------------------------------


def bench_join(repeats: int) -> list[str]:
    rows = ["| model | size | join + sha256 (s) | second call (ms) |", "| --- | --- | --- | --- |"]
    for name in (BIG, SMALL):
        joins, again = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="rlmd-bench-models-") as d:
                t = time.perf_counter()
                ensure_model(name, Path(d))
                joins.append(time.perf_counter() - t)
                t = time.perf_counter()
                ensure_model(name, Path(d))
                again.append((time.perf_counter() - t) * 1000)
        size = MODELS[name].size / 2**20
        rows.append(f"| {name} | {size:.0f} MiB | {fmt_runs(joins)} | {fmt_runs(again, 2)} |")
    return rows


# -- speed ---------------------------------------------------------------------------


async def completion(
    client: httpx.AsyncClient, messages: list[dict], max_tokens: int, slot: int | None = None
) -> dict:
    body: dict = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "cache_prompt": True,
    }
    if slot is not None:
        body["id_slot"] = slot
    resp = await client.post("/v1/chat/completions", json=body)
    resp.raise_for_status()
    return resp.json()["timings"]


async def bench_model(name: str, repeats: int, quick: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"load": [], "pp": [], "tg": [], "tg2": []}
    rng = random.Random(1)
    for _ in range(repeats):
        p = EmbeddedProvider(EmbeddedConfig(root_model=name, sub_model=name, parallel=2))
        try:
            t = time.perf_counter()
            await p.wait_ready()
            out["load"].append(time.perf_counter() - t)
            address = p.status().models[0].address
            async with httpx.AsyncClient(base_url=address, timeout=1800) as c:
                # Prompt speed: ~600 fresh tokens, one generated.
                words = 200 if quick else 450
                tm = await completion(c, [{"role": "user", "content": filler(rng, words)}], 1)
                out["pp"].append(tm["prompt_n"] / tm["prompt_ms"] * 1000)
                # Generation speed: a short prompt, a long answer.
                ask = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
                n = 32 if quick else 64
                tm = await completion(c, ask, n)
                out["tg"].append(tm["predicted_n"] / tm["predicted_ms"] * 1000)
                # Two generations at once on the two slots: aggregate tokens/s.
                t = time.perf_counter()
                both = await asyncio.gather(completion(c, ask, n, 0), completion(c, ask, n, 1))
                wall = time.perf_counter() - t
                # Aggregate over the wall time, prompt included (it is tiny and cached).
                out["tg2"].append(sum(b["predicted_n"] for b in both) / wall)
        finally:
            await p.aclose()
    return out


# -- prefix cache ----------------------------------------------------------------------


async def bench_prefix(
    name: str, mode: str, cache_ram_mib: int, turns: int, seed: int
) -> list[list[float]]:
    """Prompt ms per turn (conversation A's and B's, averaged) for one condition."""
    rng = random.Random(seed)
    p = EmbeddedProvider(
        EmbeddedConfig(root_model=name, sub_model=name, parallel=2), cache_ram_mib=cache_ram_mib
    )
    per_turn: list[list[float]] = []
    try:
        await p.wait_ready()
        address = p.status().models[0].address
        convs = {
            tag: [{"role": "system", "content": f"[{tag}] " + filler(rng, 300)}] for tag in "AB"
        }
        async with httpx.AsyncClient(base_url=address, timeout=1800) as c:
            for turn in range(turns):
                row = []
                for i, tag in enumerate("AB"):
                    msgs = convs[tag]
                    msgs.append({"role": "user", "content": f"turn {turn}: " + filler(rng, 90)})
                    slot = {"pinned": i, "swapped": (turn + i) % 2, "auto": None}[mode]
                    tm = await completion(c, msgs, 1, slot)
                    row.append((tm["prompt_ms"], tm["prompt_n"], tm.get("cache_n", 0)))
                    msgs.append({"role": "assistant", "content": filler(rng, 60)})
                per_turn.append(row)
    finally:
        await p.aclose()
    return per_turn


async def bench_prefix_all(name: str, repeats: int, turns: int) -> list[str]:
    conditions = [
        ("pinned", "pinned", 1024),
        ("swapped, no RAM cache", "swapped", 0),
        ("swapped, RAM cache", "swapped", 1024),
        ("auto", "auto", 1024),
    ]
    head = "| condition | " + " | ".join(f"turn {t + 1}" for t in range(turns)) + " | total |"
    rows = [head, "| --- " * (turns + 2) + "|"]
    detail = []
    for label, mode, ram in conditions:
        runs = [await bench_prefix(name, mode, ram, turns, seed=r) for r in range(repeats)]
        cells = []
        for t in range(turns):
            ms = [sum(x[0] for x in run[t]) / len(run[t]) / 1000 for run in runs]
            cells.append(fmt_runs(ms))
        totals = [sum(x[0] for row in run for x in row) / 2 / 1000 for run in runs]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {fmt_runs(totals)} |")
        last = runs[0][-1]
        detail.append(
            f"- {label}: last turn reprocessed "
            + ", ".join(
                f"{tag} {x[1]} tokens (cached {x[2]})" for tag, x in zip("AB", last, strict=True)
            )
        )
    return [*rows, "", *detail]


# -- prompt-processing gap: the daemon's provider path against raw llama.cpp -------------

RAW_DEFAULTS: dict[str, object] = {}


def _raw_serve(spec_json: str) -> int:
    """Child: a bare llama.cpp server with llama.cpp's own defaults plus ``params``."""
    import json as _json

    import xllamacpp as xlc

    spec = _json.loads(spec_json)
    p = xlc.CommonParams()
    p.model.path = spec["model_path"]
    p.hostnames = ["127.0.0.1"]
    p.port = 0
    p.ui = False
    for key, value in spec["params"].items():
        target = p
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    server = xlc.Server(p)
    print(_json.dumps({"address": server.listening_address}), flush=True)
    sys.stdin.buffer.read()  # until the bench closes stdin
    os._exit(0)


class RawServer:
    """``python bench/bench_embedded.py --raw-serve SPEC`` as a child; ``address`` once ready."""

    def __init__(self, model_path: Path, params: dict[str, object]) -> None:
        self.model_path = model_path
        self.params = params
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""

    async def __aenter__(self) -> RawServer:
        import json as _json

        spec = _json.dumps({"model_path": str(self.model_path), "params": self.params})
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--raw-serve",
            spec,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 600)
        self.address = _json.loads(line)["address"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _pp_raw(address: str, text: str) -> tuple[float, int]:
    """Prompt tokens/s as the server timed it, and the prompt's token count."""
    async with httpx.AsyncClient(base_url=address, timeout=1800) as c:
        tm = await completion(c, [{"role": "user", "content": text}], 1)
    return tm["prompt_n"] / tm["prompt_ms"] * 1000, int(tm["prompt_n"])


async def _pp_provider(p: EmbeddedProvider, model: str, text: str) -> float:
    """Through the daemon's client (streaming, as the engine calls it): tokens/s to first token."""
    from rlmd.providers.base import ChatRequest, Message

    req = ChatRequest(model=model, messages=(Message("user", text),), max_tokens=1)
    res = await p.chat(req)
    return res.usage.input / res.ttft_s if res.ttft_s > 0 else float("nan")


async def bench_gap(repeats: int, quick: bool, words: int | None = None) -> list[str]:
    """Alternate A (the daemon's embedded server and client) and B (raw llama.cpp variants).

    Every request carries fresh text (no prefix cache can help), the same for A and each B
    in one round, so the rows of a round compare like with like.
    """
    model_path = ensure_model(BIG)
    threads = len(os.sched_getaffinity(0))
    words = words or (300 if quick else 1200)
    variants: dict[str, dict[str, object]] = {
        f"raw, threads {threads}, llama.cpp defaults": {
            "cpuparams.n_threads": threads,
            "cpuparams_batch.n_threads": threads,
        },
    }
    for extra in os.environ.get("RLMD_BENCH_GAP_VARIANTS", "").split(";"):
        # NAME=key:value,key:value  (for trying other settings without editing the bench)
        if "=" in extra:
            name, _, kvs = extra.partition("=")
            params: dict[str, object] = {}
            for kv in kvs.split(","):
                k, _, v = kv.partition(":")
                params[k] = int(v) if v.lstrip("-").isdigit() else v
            variants[name] = params
    rng = random.Random(7)
    a_rates: list[float] = []
    a_server: list[float] = []
    b_rates: dict[str, list[float]] = {k: [] for k in variants}
    n_tokens = 0
    p = EmbeddedProvider(EmbeddedConfig(root_model=BIG, sub_model=BIG))
    try:
        await p.wait_ready()
        servers = {k: RawServer(model_path, v) for k, v in variants.items()}
        async with contextlib.AsyncExitStack() as stack:
            for s in servers.values():
                await stack.enter_async_context(s)
            # Warm-up: the first request on a fresh server pays one-off costs.
            warm = filler(rng, 40)
            await _pp_provider(p, BIG, warm)
            for s in servers.values():
                await _pp_raw(s.address, warm)
            for r in range(repeats):
                text = filler(rng, words)
                order = ["A", *servers] if r % 2 == 0 else [*servers, "A"]
                for who in order:
                    if who == "A":
                        a_rates.append(await _pp_provider(p, BIG, text))
                        print(f"gap: round {r} A client {a_rates[-1]:.1f}", file=sys.stderr)
                        # The same server timed by itself, on other fresh text of the
                        # same size (this text is in its cache now).
                        other = filler(rng, words)
                        a_server.append((await _pp_raw(p.status().models[0].address, other))[0])
                        print(f"gap: round {r} A server {a_server[-1]:.1f}", file=sys.stderr)
                    else:
                        rate, n_tokens = await _pp_raw(servers[who].address, text)
                        b_rates[who].append(rate)
                        print(
                            f"gap: round {r} {who} {rate:.1f} ({n_tokens} tokens)", file=sys.stderr
                        )
    finally:
        await p.aclose()
    base = _median(next(iter(b_rates.values())))
    rows = [
        f"Prompt of {n_tokens} fresh tokens, 1 generated, {repeats} rounds alternating A and "
        f"B (order flipped every round); {threads} threads. Median (runs).",
        "",
        "| server | prompt tokens/s, median | runs | vs raw |",
        "| --- | ---: | --- | ---: |",
        f"| A: daemon's embedded server, its client (tokens / time to first token) | "
        f"{_median(a_rates):.1f} | {fmt_runs(a_rates)} | {_median(a_rates) / base:.2f} |",
        f"| A: the same server, its own timing | {_median(a_server):.1f} | "
        f"{fmt_runs(a_server)} | {_median(a_server) / base:.2f} |",
    ]
    for name, vals in b_rates.items():
        rows.append(
            f"| B: {name} | {_median(vals):.1f} | {fmt_runs(vals)} | {_median(vals) / base:.2f} |"
        )
    return rows


# -- report --------------------------------------------------------------------------


SECTIONS = ("join", "speed", "prefix", "gap")


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def _run(
    quick: bool, repeats: int, sections: tuple[str, ...], gap_words: int | None = None
) -> str:
    lines = [
        "## Embedded model (llama.cpp via xllamacpp, CPU)",
        "",
        f"Machine: {len(os.sched_getaffinity(0))} cores, shared with other work (load "
        f"average at start: {_load()}); each figure measured {repeats} times (runs shown "
        "as a / b).",
    ]
    if "join" in sections:
        lines += ["", "### Joining the model file", "", *bench_join(repeats)]
    if "speed" in sections:
        lines += [
            "",
            "### Speed (server timings; 2 slots, all cores)",
            "",
            "| model | load (s) | prompt tokens/s | generated tokens/s "
            "| 2 parallel, total tokens/s |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in (BIG, SMALL):
            r = await bench_model(name, repeats, quick)
            lines.append(
                f"| {name} | {fmt_runs(r['load'])} | {fmt_runs(r['pp'])} | {fmt_runs(r['tg'])} "
                f"| {fmt_runs(r['tg2'])} |"
            )
    if "prefix" in sections:
        turns = 3 if quick else 4
        lines += [
            "",
            f"### Prompt seconds per turn, growing conversation ({SMALL}; mean of A and B)",
            "",
            *await bench_prefix_all(SMALL, repeats, turns),
        ]
    if "gap" in sections:
        lines += [
            "",
            f"### Prompt processing: the daemon's embedded server against raw llama.cpp ({BIG})",
            "",
            *await bench_gap(max(repeats, 3), quick, gap_words),
        ]
    lines += ["", f"Load average at the end: {_load()}.", ""]
    return "\n".join(lines)


def run(
    quick: bool = False,
    repeats: int = 2,
    sections: tuple[str, ...] = SECTIONS,
    gap_words: int | None = None,
) -> str:
    """Measure the chosen sections (join, speed, prefix, gap); the Markdown report."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return asyncio.run(_run(quick, repeats, sections, gap_words))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-serve":
        sys.exit(_raw_serve(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter prompts and conversations")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement")
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    ap.add_argument(
        "--gap-words", type=int, help="gap: words of fresh text per prompt (about 3.5 tokens each)"
    )
    args = ap.parse_args()
    only = tuple(s for s in args.only.split(",") if s)
    print(run(args.quick, args.repeats, only, args.gap_words))


if __name__ == "__main__":
    main()
