"""Dispatch efficiency of the pool: many sub-calls over a few capacity-limited servers.

Three scripted loopback servers speak the real Ollama wire format; each serves at most
``capacity`` (2) requests at once, like ``OLLAMA_NUM_PARALLEL=2``, and queues the rest,
and each request takes a fixed time of "GPU work".  The same batch of sub-calls is sent
three ways, in the same run, through the same real providers:

* ``pool``: :class:`rlmd.pool.Pool` (fair queue, adaptive strategy);
* ``semaphore(16) round-robin``: a fixed ``asyncio.Semaphore(16)`` with calls dealt to
  the servers in turn (what the official RLM implementation's ``llm_query_batched``
  does);
* ``sequential``: one blocking call at a time (the paper's implementation).

Dispatch efficiency = ideal time / measured time, where the ideal time is the best any
dispatcher could do given the servers' capacities and speeds (all slots busy all the
time).  A second scenario uses servers of different speeds, where dealing calls out in
turn leaves the fast servers idle while the slow one works through its share.

Run: ``python bench/bench_dispatch.py [--quick]``; ``run(quick)`` returns the Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmd.config import Config, PoolConfig, ProviderConfig
from rlmd.pool import Pool
from rlmd.providers.base import ChatRequest, Message, Provider
from rlmd.providers.registry import build_provider
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

MODEL = "qwen2.5-coder:7b"
CAPACITY = 2
NAIVE_CONCURRENCY = 16


class Gpu:
    """A server-side model of a GPU box: ``capacity`` requests at once, the rest wait.

    Used as the scripted server's responder, so it runs in the server's handler threads
    (never on the client's event loop).
    """

    def __init__(self, capacity: int, seconds: float) -> None:
        self._slots = threading.Semaphore(capacity)
        self.seconds = seconds

    def __call__(self, call: ChatCall) -> ScriptedReply:
        with self._slots:
            time.sleep(self.seconds)
        return ScriptedReply(text="ok", usage_in=100, usage_out=10)


def ideal_time(n: int, seconds: list[float], capacity: int) -> float:
    """Makespan of ``n`` equal calls when every slot takes the next call as soon as it is
    free (the best possible dispatch for identical calls)."""
    slots = [(0.0, s) for s in seconds for _ in range(capacity)]
    heapq.heapify(slots)
    end = 0.0
    for _ in range(n):
        free_at, s = heapq.heappop(slots)
        end = max(end, free_at + s)
        heapq.heappush(slots, (free_at + s, s))
    return end


def request(i: int) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=(Message("user", f"sub-call {i}: summarise"),))


async def via_pool(cfgs: list[ProviderConfig], providers: list[Provider], n: int) -> None:
    config = Config(providers=cfgs, pool=PoolConfig(health_interval_s=60))
    pool = Pool(config, providers)
    await asyncio.gather(*(pool.chat(request(i)) for i in range(n)))


async def via_semaphore(cfgs: list[ProviderConfig], providers: list[Provider], n: int) -> None:
    sem = asyncio.Semaphore(NAIVE_CONCURRENCY)

    async def one(i: int, p: Provider) -> None:
        async with sem:
            await p.chat(request(i))

    await asyncio.gather(*(one(i, providers[i % len(providers)]) for i in range(n)))


async def via_sequential(cfgs: list[ProviderConfig], providers: list[Provider], n: int) -> None:
    for i in range(n):
        await providers[i % len(providers)].chat(request(i))


Dispatcher = Callable[[list[ProviderConfig], list[Provider], int], Awaitable[None]]


async def timed(cfgs: list[ProviderConfig], dispatch: Dispatcher, n: int) -> float:
    """Seconds ``dispatch`` takes for ``n`` calls, with providers built and warmed up
    beforehand (httpx client set-up is a one-off cost, not dispatch)."""
    providers = [build_provider(c, {}) for c in cfgs]
    try:
        for p in providers:
            await p.health()
        t0 = time.monotonic()
        await dispatch(cfgs, providers, n)
        return time.monotonic() - t0
    finally:
        for p in providers:
            await p.aclose()


def measure(name: str, dispatch: Dispatcher, n: int, seconds: list[float]) -> list[str]:
    """Run one dispatcher against fresh servers; one Markdown table row."""
    servers = [ScriptedServer(responder=Gpu(CAPACITY, s), models=[MODEL]).start() for s in seconds]
    try:
        cfgs = [
            ProviderConfig(
                name=f"gpu{i}", kind="ollama", base_url=srv.url, models=[MODEL], capacity=CAPACITY
            )
            for i, srv in enumerate(servers)
        ]
        took = asyncio.run(timed(cfgs, dispatch, n))
        calls = [len(s.calls) for s in servers]
        peak = [s.max_concurrent for s in servers]
    finally:
        for s in servers:
            s.close()
    ideal = ideal_time(n, seconds, CAPACITY)
    return [
        name,
        str(n),
        " / ".join(f"{s:g}" for s in seconds),
        f"{took:.2f}",
        f"{ideal:.2f}",
        f"{ideal / took:.3f}",
        " / ".join(map(str, calls)),
        " / ".join(map(str, peak)),
    ]


def run(quick: bool = False) -> str:
    """Run both scenarios; returns a Markdown table (``quick``: fewer calls)."""
    n = 48 if quick else 256
    equal = [0.5, 0.5, 0.5]
    mixed = [0.25, 0.5, 1.0]
    rows = [
        measure("pool (adaptive)", via_pool, n, equal),
        measure(f"semaphore({NAIVE_CONCURRENCY}) round-robin", via_semaphore, n, equal),
        measure("sequential", via_sequential, n, equal),
        measure("pool (adaptive)", via_pool, n, mixed),
        measure(f"semaphore({NAIVE_CONCURRENCY}) round-robin", via_semaphore, n, mixed),
    ]
    head = [
        "dispatch",
        "calls",
        "seconds per call (3 servers, capacity 2)",
        "measured s",
        "ideal s",
        "efficiency",
        "calls per server",
        "peak requests at a server",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="48 calls instead of 256")
    args = ap.parse_args(argv)
    print(run(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
