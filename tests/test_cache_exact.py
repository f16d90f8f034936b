"""The exact call cache on real SQLite files, through the real pool and scripted servers.

Concurrency and crash tests use real threads and real processes on one file; the crash
test SIGKILLs a writer in the middle of a transaction and reopens the file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlmd.cache import CacheService, ExactCache, call_key
from rlmd.config import CacheConfig, Config, ConfigError, PoolConfig, ProviderConfig, parse_config
from rlmd.pool import Pool
from rlmd.providers.base import ChatRequest, ChatResult, Message, Usage
from rlmd.providers.registry import build_provider
from rlmd.testing.scripted_server import Rule, ScriptedReply, ScriptedServer

MODEL = "m"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    rules = [
        Rule(
            pattern=r"say (\w+)",
            expand=True,
            reply=ScriptedReply(text=r"\1!", usage_in=7, usage_out=3),
        ),
        Rule(pattern="long", reply=ScriptedReply(text="one two three four five six seven eight")),
    ]
    with ScriptedServer(rules, models=[MODEL]) as srv:
        yield srv


def pool_for(srv: ScriptedServer, cache: ExactCache, **cache_cfg: object) -> Pool:
    pc = ProviderConfig(
        name="ol", kind="ollama", base_url=srv.url, models=[MODEL], price_in_per_mtok=1000.0
    )
    cfg = Config(
        providers=[pc],
        pool=PoolConfig(health_interval_s=30.0),
        cache=CacheConfig(**cache_cfg),  # type: ignore[arg-type]
    )
    return Pool(cfg, [build_provider(pc, {})], cache=cache)


def ask(text: str, temperature: float = 0.0, **kw: object) -> ChatRequest:
    return ChatRequest(
        model=MODEL, messages=(Message("user", text),), temperature=temperature, **kw
    )  # type: ignore[arg-type]


def result(text: str, n: int = 0) -> ChatResult:
    return ChatResult(text=text, model=MODEL, usage=Usage(input=n, output=n), cost=0.01)


def integrity(path: Path) -> tuple[str, int, int]:
    """(integrity_check, stored total_bytes, actual sum of sizes) of a cache file."""
    c = sqlite3.connect(path)
    try:
        ok = c.execute("PRAGMA integrity_check").fetchone()[0]
        total = c.execute("SELECT v FROM meta WHERE k = 'total_bytes'").fetchone()[0]
        actual = c.execute(
            "SELECT coalesce((SELECT sum(size) FROM calls), 0)"
            " + coalesce((SELECT sum(size) FROM semantic), 0)"
        ).fetchone()[0]
        return ok, int(total), int(actual)
    finally:
        c.close()


# --------------------------------------------------------------------------- through the pool


async def test_hit_after_miss_costs_nothing_and_skips_the_server(server, tmp_path) -> None:
    cache = ExactCache.open(tmp_path / "calls.sqlite", max_bytes=1 << 20)
    pool = pool_for(server, cache)
    try:
        first = await pool.chat(ask("say hello"))
        second = await pool.chat(ask("say hello"))
        other = await pool.chat(ask("say bye"))
    finally:
        await pool.aclose()
    assert first.text == second.text == "hello!" and other.text == "bye!"
    assert not first.cached and first.cost > 0
    assert second.cached and second.cost == 0.0 and second.usage.input == 7
    assert len(server.calls) == 2  # hello once, bye once
    stats = await cache.stats()
    await cache.aclose()
    assert (stats.hits, stats.entries, stats.puts) == (1, 2, 2)
    assert stats.misses == 2
    assert stats.tokens_saved_in == 7 and stats.tokens_saved_out == 3
    assert stats.cost_saved == pytest.approx(first.cost)


async def test_sampled_calls_bypass_unless_cache_sampled(server, tmp_path) -> None:
    cache = ExactCache.open(tmp_path / "a.sqlite", max_bytes=1 << 20)
    pool = pool_for(server, cache)
    try:
        await pool.chat(ask("say hot", temperature=0.7))
        again = await pool.chat(ask("say hot", temperature=0.7))
    finally:
        await pool.aclose()
    assert not again.cached and len(server.calls) == 2
    server.reset_calls()
    pool = pool_for(server, cache, cache_sampled=True)
    try:
        await pool.chat(ask("say warm", temperature=0.7))
        again = await pool.chat(ask("say warm", temperature=0.7))
        # The sampling parameters are part of the key.
        other_t = await pool.chat(ask("say warm", temperature=0.2))
    finally:
        await pool.aclose()
        await cache.aclose()
    assert again.cached and not other_t.cached and len(server.calls) == 2


async def test_key_covers_model_messages_and_sampling() -> None:
    base = ask("x")
    variants = [
        ask("y"),
        ask("x", max_tokens=5),
        ask("x", stop=("\n",)),
        ask("x", temperature=0.1),
        ChatRequest(model="other", messages=base.messages),
        ChatRequest(model=MODEL, messages=(Message("system", "x"),)),
        ChatRequest(model=MODEL, messages=(Message("user", "x"), Message("user", ""))),
    ]
    keys = {call_key(v) for v in variants}
    assert len(keys) == len(variants) and call_key(base) not in keys
    assert call_key(ask("x")) == call_key(base)


async def test_stopped_results_are_never_served_as_complete(server, tmp_path) -> None:
    cache = ExactCache.open(tmp_path / "s.sqlite", max_bytes=1 << 20)
    pool = pool_for(server, cache)
    seen: list[str] = []

    def stop_early(piece: str) -> bool:
        seen.append(piece)
        return len(seen) >= 2

    try:
        cut = await pool.chat(ask("long"), on_delta=stop_early)
        full = await pool.chat(ask("long"))
    finally:
        await pool.aclose()
    assert cut.stopped and full.text == "one two three four five six seven eight"
    assert not full.cached and len(server.calls) == 2
    # The complete answer replaced the partial one; a partial never replaces a complete.
    await cache.put(ask("long"), cut)
    got = await cache.get(ask("long"))
    assert got is not None and got.text == full.text
    await cache.put(ask("partial only"), ChatResult(text="one", model=MODEL, stopped=True))
    assert await cache.get(ask("partial only")) is None
    part = await cache.get_partial(ask("partial only"))
    await cache.aclose()
    assert part is not None and part.stopped and part.text == "one"


async def test_bypass_misses_but_still_stores(tmp_path) -> None:
    cache = ExactCache.open(tmp_path / "b.sqlite", max_bytes=1 << 20)
    await cache.put(ask("q"), result("a"))
    with cache.bypass():
        assert await cache.get(ask("q")) is None
        await cache.put(ask("q2"), result("a2"))
    got = await cache.get(ask("q2"))
    await cache.aclose()
    assert got is not None and got.text == "a2"


# --------------------------------------------------------------------------- persistence, size


async def test_persists_across_reopen(tmp_path) -> None:
    path = tmp_path / "cache" / "calls.sqlite"
    cache = ExactCache.open(path, max_bytes=1 << 20)
    await cache.put(ask("q"), result("kept", 5))
    assert await cache.get(ask("q")) is not None
    await cache.aclose()
    again = ExactCache.open(path, max_bytes=1 << 20)
    got = await again.get(ask("q"))
    stats = await again.stats()
    await again.aclose()
    assert got is not None and got.text == "kept" and got.usage.input == 5
    assert stats.hits == 2 and stats.entries == 1  # counters persisted too


async def test_eviction_keeps_size_bound_and_recently_used(tmp_path) -> None:
    clock = iter(float(i) for i in range(1, 10_000))
    cache = ExactCache.open(tmp_path / "e.sqlite", max_bytes=1 << 20)
    cache._clock = lambda: next(clock)  # deterministic LRU order
    value = "x" * 900
    await cache.put(ask("k0"), result(value))
    per_entry = (await cache.stats()).bytes
    cache.max_bytes = per_entry * 10 + per_entry // 2  # room for ten
    for i in range(1, 10):
        await cache.put(ask(f"k{i}"), result(value))
    assert await cache.get(ask("k0")) is not None  # k0 is now the most recently used
    for i in range(10, 16):
        await cache.put(ask(f"k{i}"), result(value))
    stats = await cache.stats()
    present = [i for i in range(16) if await cache.contains(ask(f"k{i}"))]
    await cache.aclose()
    assert stats.bytes <= cache.max_bytes and stats.evictions >= 6
    assert 0 in present and 1 not in present and 15 in present
    assert integrity(tmp_path / "e.sqlite")[1:] == (stats.bytes, stats.bytes)


async def test_service_clear_and_disabled(tmp_path) -> None:
    svc = CacheService.open(Config(), tmp_path)
    assert svc.exact is not None and svc.exact.db.path == tmp_path / "cache" / "calls.sqlite"
    await svc.exact.put(ask("q"), result("a"))
    assert (await svc.stats()).exact.entries == 1  # type: ignore[union-attr]
    assert await svc.clear() == {"deleted": 1}
    assert await svc.exact.get(ask("q")) is None
    await svc.aclose()
    off = CacheService.open(Config(cache=CacheConfig(enabled=False)), tmp_path / "off")
    assert off.exact is None and not (tmp_path / "off").exists()
    assert (await off.stats()).enabled is False


# --------------------------------------------------------------------------- concurrency


def test_concurrent_threads_on_one_file(tmp_path) -> None:
    path = tmp_path / "t.sqlite"
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            cache = ExactCache.open(path, max_bytes=1 << 30)
            try:
                for i in range(40):
                    key = call_key(ask(f"t{t}-{i}"))
                    cache.db.call(cache.put_sync, MODEL, key, result(f"v{t}-{i}"))
                    got = cache.db.call(cache.get_sync, key)
                    assert got is not None and got.text == f"v{t}-{i}"
            finally:
                cache.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    ok, total, actual = integrity(path)
    assert ok == "ok" and total == actual
    c = sqlite3.connect(path)
    assert c.execute("SELECT count(*) FROM calls").fetchone()[0] == 240
    assert c.execute("SELECT v FROM meta WHERE k = 'hits'").fetchone()[0] == 240
    c.close()


WRITER = textwrap.dedent(
    """
    import sys
    from rlmd.cache.exact import ExactCache, call_key
    from rlmd.providers.base import ChatRequest, ChatResult, Message
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = ExactCache.open(path, max_bytes=int(sys.argv[4]))
    print("ready", flush=True)
    for i in range(n):
        req = ChatRequest(model="m", messages=(Message("user", f"{tag}-{i}"),))
        cache.db.call(cache.put_sync, "m", call_key(req), ChatResult(text="v" * 2000, model="m"))
    cache.close()
    print("done", flush=True)
    """
)


def run_writer(path: Path, tag: str, n: int, max_bytes: int = 1 << 30) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), tag, str(n), str(max_bytes)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )


def test_two_processes_write_one_file(tmp_path) -> None:
    path = tmp_path / "p.sqlite"
    # A small bound, so both processes evict while the other writes.
    procs = [run_writer(path, tag, 150, max_bytes=200_000) for tag in ("a", "b")]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and out.split() == ["ready", "done"]
    ok, total, actual = integrity(path)
    assert ok == "ok" and total == actual and 0 < total <= 200_000


def test_sigkill_mid_write_leaves_a_consistent_file(tmp_path) -> None:
    path = tmp_path / "k.sqlite"
    done = run_writer(path, "before", 20)
    assert done.communicate(timeout=60)[0].split() == ["ready", "done"]
    # A writer killed while it holds an open write transaction.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time
                from rlmd.cache.exact import ExactCache, call_key
                from rlmd.providers.base import ChatRequest, ChatResult, Message
                cache = ExactCache.open(sys.argv[1], max_bytes=1 << 30)
                def half_written():
                    with cache.db.write() as c:
                        for i in range(500):
                            c.execute(
                                "INSERT INTO calls(key, model, value, size, created, used)"
                                " VALUES (?, 'm', ?, 10, 0, 0)", (b"k%d" % i, b"x" * 5000))
                        c.execute("UPDATE meta SET v = v + 5000 WHERE k = 'total_bytes'")
                        print("in transaction", flush=True)
                        time.sleep(60)
                cache.db.call(half_written)
                """
            ),
            str(path),
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "in transaction"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # And writers killed at arbitrary points of a put loop.
    for delay in (0.3, 0.6):
        w = run_writer(path, f"killed{delay}", 100_000)
        assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        threading.Event().wait(delay)
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
    ok, total, actual = integrity(path)
    assert ok == "ok" and total == actual
    cache = ExactCache.open(path, max_bytes=1 << 30)
    try:
        got = cache.db.call(
            cache.get_sync,
            call_key(ChatRequest(model="m", messages=(Message("user", "before-3"),))),
        )
        half = cache.db.call(
            lambda: (
                cache.db.conn().execute("SELECT count(*) FROM calls WHERE size = 10").fetchone()[0]
            )
        )
    finally:
        cache.close()
    assert got is not None and got.text == "v" * 2000
    assert half == 0  # the killed transaction left nothing behind


async def test_waiting_on_sqlite_does_not_block_the_event_loop(tmp_path) -> None:
    """A write waiting on another connection's lock must not stall the loop."""
    path = tmp_path / "l.sqlite"
    cache = ExactCache.open(path, max_bytes=1 << 20)
    await cache.put(ask("q"), result("a"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # writers now wait (busy_timeout)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    put = asyncio.create_task(cache.put(ask("q2"), result("b")))
    await asyncio.sleep(0.4)
    assert not put.done()  # really waiting on the lock ...
    assert ticks >= 15  # ... while the loop kept running
    blocker.execute("ROLLBACK")
    blocker.close()
    await asyncio.wait_for(put, 5)
    t.cancel()
    got = await cache.get(ask("q2"))
    await cache.aclose()
    assert got is not None and got.text == "b"


# --------------------------------------------------------------------------- the daemon

F = "```"


def _daemon_model(call):  # type: ignore[no-untyped-def]
    if call.model == "sub":
        return ScriptedReply(text="fine", delay_s=0.05)
    if not any(m.role == "assistant" for m in call.messages):
        code = (
            "chunks = [context[i:i+500] for i in range(0, len(context), 500)]\n"
            "print(llm_query_batched([f'Check:\\n{c}' for c in chunks[:3]]))"
        )
        return ScriptedReply(text=f"Looking.\n{F}repl\n{code}\n{F}\n")
    return ScriptedReply(text="FINAL(all fine)")


def test_daemon_cache_survives_restart_and_obeys_controls(make_daemon, scripted_config) -> None:
    """Through the real daemon: cache/stats, the semantic tier after a restart,
    options.cache = false, cache/clear."""
    with ScriptedServer(responder=_daemon_model, models=["root", "sub"]) as srv:
        d = make_daemon(scripted_config(srv.url, "[cache]\nsemantic_threshold = 0.75\n"))
        d.call("context/put", {"name": "t", "text": "hello world line\n" * 500})
        first = d.call("query/run", {"query": "Is everything fine?", "context": "t"})
        assert first["answer"] == "all fine"
        stats = d.call("cache/stats")
        assert stats["exact"]["entries"] >= 3 and stats["exact"]["semantic_entries"] == 1
        d.restart()
        n = len(srv.calls)
        again = d.call("query/run", {"query": "is everything fine", "context": "t"})
        assert again["answer"] == "all fine" and len(srv.calls) == n  # no model call at all
        fresh = d.call(
            "query/run",
            {"query": "Is everything fine?", "context": "t", "options": {"cache": False}},
        )
        assert fresh["answer"] == "all fine" and fresh["cached_calls"] == 0
        assert len(srv.calls) > n
        d.call("context/put", {"name": "t", "text": "another text entirely\n" * 500})
        n = len(srv.calls)
        changed = d.call("query/run", {"query": "Is everything fine?", "context": "t"})
        assert changed["answer"] == "all fine" and len(srv.calls) > n  # never the old answer
        assert d.call("cache/clear")["deleted"] > 0
        after = d.call("cache/stats")
        assert after["exact"]["entries"] == 0 and after["exact"]["bytes"] == 0


async def test_damaged_file_is_moved_aside_and_replaced(tmp_path) -> None:
    path = tmp_path / "calls.sqlite"
    path.write_bytes(b"this is not a database, " * 100)
    cache = ExactCache.open(path, max_bytes=1 << 20)
    await cache.put(ask("q"), result("a"))
    got = await cache.get(ask("q"))
    await cache.aclose()
    assert got is not None and got.text == "a"
    aside = list(tmp_path.glob("calls.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")


async def test_unusable_location_is_a_clear_error(tmp_path) -> None:
    from rlmd.cache import CacheError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot open the cache file"):
        ExactCache.open(blocker / "cache" / "calls.sqlite", max_bytes=1 << 20)


async def test_db_cache_bytes_bounds_sqlite_page_cache(tmp_path) -> None:
    """Issue 14: ``[cache] db_cache_bytes`` is what the cache file's connection keeps of
    the file in memory (SQLite's page cache), and a bad value stops the daemon at start."""
    for conf, kib in (
        (parse_config({"cache": {"db_cache_bytes": 256 * 1024}}), 256),
        (Config(), 2048),
    ):
        svc = CacheService.open(conf, tmp_path / str(kib))
        assert svc.exact is not None
        db = svc.exact.db
        try:
            size = await db.run(lambda d=db: d.conn().execute("PRAGMA cache_size").fetchone()[0])
        finally:
            await svc.aclose()
        assert size == -kib  # negative: KiB
    with pytest.raises(ConfigError, match="db_cache_bytes must be between 65536"):
        parse_config({"cache": {"db_cache_bytes": 1000}})
