"""Speculative prefetch: layout inference on real files; speculation through the real
pool, exact cache and scripted servers (hits, cancellation, never delaying a real call)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from rlmd.cache.exact import ExactCache
from rlmd.cache.prefetch import Prefetcher, infer_next, sub_request
from rlmd.config import CacheConfig, Config, PoolConfig, ProviderConfig
from rlmd.pool import Pool
from rlmd.providers.registry import build_provider
from rlmd.testing.scripted_server import Rule, ScriptedReply, ScriptedServer

MODEL = "m"


@pytest.fixture
def text_file(tmp_path) -> tuple[Path, str, list[str]]:
    rng = random.Random(7)
    words = "alpha beta gamma delta error warn info token cache pool query héllo 日本 ünï".split()
    lines = [
        f"2024-01-{i % 28 + 1:02d} {' '.join(rng.choice(words) for _ in range(8))}"
        for i in range(1500)
    ]
    text = "\n".join(lines)
    path = tmp_path / "ctx.txt"
    path.write_text(text, encoding="utf-8")
    return path, text, lines


def test_fixed_size_chunks(text_file) -> None:
    path, text, _ = text_file
    chunks = [text[i : i + 700] for i in range(0, len(text), 700)]
    seen = [f"Summarise:\n{c}\nBe brief." for c in chunks[:4]]
    assert infer_next(seen, path, 4) == [f"Summarise:\n{c}\nBe brief." for c in chunks[4:8]]


def test_overlapping_chunks(text_file) -> None:
    path, text, _ = text_file
    chunks = [text[i : i + 800] for i in range(0, len(text), 600)]
    seen = [f"Q: {c}" for c in chunks[2:5]]
    assert infer_next(seen, path, 2) == [f"Q: {c}" for c in chunks[5:7]]


def test_line_chunks_joined_and_with_line_ends(text_file) -> None:
    path, text, lines = text_file
    joined = ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    seen = [f"Errors in:\n{c}\n---" for c in joined[:3]]
    assert infer_next(seen, path, 3) == [f"Errors in:\n{c}\n---" for c in joined[3:6]]
    kept = text.splitlines(keepends=True)
    blocks = ["".join(kept[i : i + 25]) for i in range(0, len(kept), 25)]
    seen = [f"<{c}>" for c in blocks[:5]]
    assert infer_next(seen, path, 5) == [f"<{c}>" for c in blocks[5:10]]


def test_shared_chunk_edges_are_given_back(text_file) -> None:
    """Every chunk starts with "2024-01-": the common prefix eats it, inference returns it."""
    path, _, lines = text_file
    chunks = ["\n".join(lines[i : i + 10]) for i in range(0, 280, 10)]
    assert all(c.startswith("2024-01-") for c in chunks)
    seen = [f"S:{c}" for c in chunks[:3]]
    assert infer_next(seen, path, 2) == [f"S:{c}" for c in chunks[3:5]]


def test_stops_at_the_end_and_gives_up_when_unsure(text_file, tmp_path) -> None:
    path, _, lines = text_file
    joined = ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    assert infer_next([f"X {c} Y" for c in joined[-4:-1]], path, 5) == [f"X {joined[-1]} Y"]
    # Not chunks of the text: numbers, made-up texts, a single prompt, uneven chunks.
    assert infer_next([f"Is {i} prime?" for i in range(5)], path, 5) == []
    assert infer_next(["summary one " * 5, "summary two " * 5], path, 5) == []
    assert infer_next([f"Q: {joined[0]}"], path, 5) == []
    uneven = ["\n".join(lines[0:10]), "\n".join(lines[10:30]), "\n".join(lines[30:35])]
    assert infer_next([f"Q: {c}" for c in uneven], path, 3) == []
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert infer_next(["a" * 40, "b" * 40], empty, 3) == []


# --------------------------------------------------------------------------- through the pool


def make_pool(srv: ScriptedServer, cache: ExactCache, capacity: int) -> Pool:
    pc = ProviderConfig(
        name="ol",
        kind="ollama",
        base_url=srv.url,
        models=[MODEL],
        capacity=capacity,
        price_in_per_mtok=1000.0,
    )
    cfg = Config(providers=[pc], pool=PoolConfig(health_interval_s=30.0), cache=CacheConfig())
    return Pool(cfg, [build_provider(pc, {})], cache=cache)


async def test_next_turn_hits_the_prefetched_answers(text_file, tmp_path) -> None:
    path, text, _ = text_file
    chunks = [text[i : i + 500] for i in range(0, len(text), 500)]
    rules = [Rule(pattern=r"^Summarise", reply=ScriptedReply(text="a summary", delay_s=0.05))]
    with ScriptedServer(rules, models=[MODEL]) as srv:
        cache = ExactCache.open(tmp_path / "c.sqlite", max_bytes=1 << 24)
        pool = make_pool(srv, cache, capacity=2)
        events: list[dict] = []
        try:
            async with Prefetcher(pool, cache, text_path=path, on_event=events.append) as pf:
                turn1 = [f"Summarise:\n{c}" for c in chunks[:4]]
                for r in await asyncio.gather(*(pool.chat(sub_request(p, MODEL)) for p in turn1)):
                    assert not r.cached
                assert await pf.observe_batch(turn1, MODEL) == 4
                await asyncio.gather(*(s.task for s in pf._specs.values()))
                calls_before = len(srv.calls)
                turn2 = [f"Summarise:\n{c}" for c in chunks[4:8]]
                for p in turn2:
                    pf.claim(sub_request(p, MODEL))
                results = await asyncio.gather(*(pool.chat(sub_request(p, MODEL)) for p in turn2))
                assert all(r.cached and r.text == "a summary" for r in results)
                assert len(srv.calls) == calls_before  # no real call reached the server
                # The speculation went out over exactly the next chunks (two slots: any order).
                assert sorted(c.last_user for c in srv.calls[4:8]) == sorted(turn2)
            stats = pf.stats
        finally:
            await pool.aclose()
            await cache.aclose()
    assert (stats.dispatched, stats.completed, stats.hits, stats.wasted) == (4, 4, 4, 0)
    assert stats.cost > 0 and stats.tokens_in > 0
    assert events[0]["kind"] == "speculation" and events[-1]["hits"] == 4


async def test_speculation_never_delays_a_real_call(text_file, tmp_path) -> None:
    """One slot, a slow backend: a real call preempts the running speculation."""
    path, text, _ = text_file
    chunks = [text[i : i + 500] for i in range(0, len(text), 500)]
    rules = [Rule(pattern="", reply=ScriptedReply(text="ok", delay_s=1.2))]
    with ScriptedServer(rules, models=[MODEL]) as srv:
        cache = ExactCache.open(tmp_path / "c.sqlite", max_bytes=1 << 24)
        pool = make_pool(srv, cache, capacity=1)
        try:
            async with Prefetcher(pool, cache, text_path=path) as pf:
                seen = [f"Check:\n{c}" for c in chunks[:3]]
                assert await pf.observe_batch(seen, MODEL) == 3
                await asyncio.sleep(0.2)  # a speculative call now holds the only slot
                assert srv.in_flight == 1
                t0 = time.monotonic()
                real = await pool.chat(sub_request("a real question", MODEL))
                elapsed = time.monotonic() - t0
                assert not real.cached
            stats = pf.stats
        finally:
            await pool.aclose()
            await cache.aclose()
    # 1.2 s of its own; waiting for the speculative call would have made it >= 2.2 s.
    assert elapsed < 1.9, elapsed
    assert stats.dispatched == 3 and stats.cancelled == 3 and stats.hits == 0


async def test_claim_cancels_a_pending_duplicate_and_disabled_does_nothing(
    text_file, tmp_path
) -> None:
    path, text, _ = text_file
    chunks = [text[i : i + 500] for i in range(0, len(text), 500)]
    rules = [Rule(pattern="", reply=ScriptedReply(text="ok", delay_s=0.3))]
    with ScriptedServer(rules, models=[MODEL]) as srv:
        cache = ExactCache.open(tmp_path / "c.sqlite", max_bytes=1 << 24)
        pool = make_pool(srv, cache, capacity=1)
        try:
            async with Prefetcher(pool, cache, text_path=path, enabled=False) as off:
                assert await off.observe_batch([f"C:{c}" for c in chunks[:3]], MODEL) == 0
            async with Prefetcher(pool, cache, text_path=path) as pf:
                assert await pf.observe_batch([f"C:{c}" for c in chunks[:3]], MODEL) == 3
                nxt = sub_request(f"C:{chunks[5]}", MODEL)  # the last one queued
                pf.claim(nxt)
                await asyncio.sleep(0.05)
                assert pf._specs[next(reversed(pf._specs))].task.cancelled()
            stats = pf.stats
        finally:
            await pool.aclose()
            await cache.aclose()
    assert stats.cancelled == 3  # the claimed one, and two still running at the end
    assert len(srv.calls) <= 1


def test_sampled_chunks_and_huge_batches_stay_cheap(text_file) -> None:
    path, text, _ = text_file
    chunks = [text[i : i + 500] for i in range(0, len(text), 500)]
    # Every tenth chunk: a sample, not a walk through the list; nothing is guessed.
    assert infer_next([f"Q: {c}" for c in chunks[:60:10]], path, 4) == []
    # A long batch: only its tail is used to find the layout, and the answer is the same.
    batch = [f"Q: {c}" for c in chunks[:120]]
    t0 = time.monotonic()
    assert infer_next(batch, path, 3) == [f"Q: {c}" for c in chunks[120:123]]
    assert time.monotonic() - t0 < 2.0
