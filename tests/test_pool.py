"""The pool against real providers talking to real scripted servers on loopback.

Every test builds real providers (Ollama, OpenAI-compatible, Anthropic wire formats) with
``build_provider`` and points them at :class:`ScriptedServer` instances, so the HTTP
streaming, the failures (dead sockets, 429, hangs) and the timing are real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from rlmd.config import (
    Config,
    ConfigError,
    EnergyConfig,
    ModelsConfig,
    PoolConfig,
    ProviderConfig,
)
from rlmd.pool import NoProviderError, Pool
from rlmd.pool.accounting import Ledger
from rlmd.pool.strategies import Chooser
from rlmd.providers.base import ChatRequest, ChatResult, Message, ProviderError
from rlmd.providers.registry import build_provider
from rlmd.testing.scripted_server import Rule, ScriptedReply, ScriptedServer

MODEL = "m"
ENV = {"RLMD_TEST_KEY": "sk-test-key"}  # anthropic providers need a key


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def servers() -> Iterator[list[ScriptedServer]]:
    """Start scripted servers with ``servers.append(ScriptedServer(...).start())``."""
    started: list[ScriptedServer] = []
    yield started
    for s in started:
        s.close()


def serve(started: list[ScriptedServer], *rules: Rule, **kw: object) -> ScriptedServer:
    srv = ScriptedServer(list(rules), models=[MODEL], **kw).start()  # type: ignore[arg-type]
    started.append(srv)
    return srv


def pcfg(name: str, srv: ScriptedServer, kind: str = "ollama", **kw: object) -> ProviderConfig:
    base = srv.url + "/v1" if kind == "openai" else srv.url
    kw.setdefault("models", [MODEL])
    if kind == "anthropic":
        kw.setdefault("max_tokens", 256)
        kw.setdefault("api_key_env", "RLMD_TEST_KEY")
    return ProviderConfig(name=name, kind=kind, base_url=base, **kw)  # type: ignore[arg-type]


def make_pool(pcs: list[ProviderConfig], *, config: Config | None = None, **pool: object) -> Pool:
    pool.setdefault("backoff_base_s", 0.05)
    pool.setdefault("health_interval_s", 30.0)
    cfg = config or Config(providers=pcs, pool=PoolConfig(**pool))  # type: ignore[arg-type]
    return Pool(cfg, [build_provider(p, ENV) for p in pcs], affinity_wait_s=1.0)


def ask(text: str, model: str = MODEL, temperature: float = 0.0) -> ChatRequest:
    return ChatRequest(model=model, messages=(Message("user", text),), temperature=temperature)


def used(srv: ScriptedServer) -> int:
    return len(srv.calls)


async def wait_for(pred: Callable[[], bool], within_s: float = 3.0) -> None:
    """Poll ``pred`` until it holds; fail the test after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def slow(text: str, delay: float, pattern: str = "") -> Rule:
    return Rule(pattern=pattern, reply=ScriptedReply(text=text, delay_s=delay))


# --------------------------------------------------------------------------- spreading


async def test_spreads_over_wire_formats_within_capacity(servers) -> None:
    a = serve(servers, slow("from ollama", 0.25))
    b = serve(servers, slow("from openai", 0.25))
    c = serve(servers, slow("from anthropic", 0.25))
    pcs = [
        pcfg("ol", a, "ollama", capacity=2),
        pcfg("oa", b, "openai", capacity=1),
        pcfg("an", c, "anthropic", capacity=3),
    ]
    pool = make_pool(pcs)
    try:
        results = await asyncio.gather(*(pool.chat(ask(f"q{i}")) for i in range(18)))
    finally:
        await pool.aclose()
    assert a.max_concurrent <= 2 and b.max_concurrent <= 1 and c.max_concurrent <= 3
    assert used(a) > 0 and used(b) > 0 and used(c) > 0
    assert used(a) + used(b) + used(c) == 18  # nothing sent twice
    by_name = {"ol": "from ollama", "oa": "from openai", "an": "from anthropic"}
    for r in results:
        assert r.text == by_name[r.provider]
    # All six slots were kept busy: the 18 calls ran in three waves.
    assert (a.max_concurrent, b.max_concurrent, c.max_concurrent) == (2, 1, 3)


async def test_tier_preference_and_overflow(servers) -> None:
    local = serve(servers, slow("local", 0.2))
    cloud = serve(servers, slow("cloud", 0.2))
    pool = make_pool(
        [
            pcfg("cloud", cloud, "openai", capacity=4, priority=1),
            pcfg("local", local, capacity=2, priority=0),
        ]
    )
    try:
        first = await asyncio.gather(*(pool.chat(ask("x")) for _ in range(2)))
        assert {r.provider for r in first} == {"local"} and used(cloud) == 0
        more = await asyncio.gather(*(pool.chat(ask("y")) for _ in range(5)))
    finally:
        await pool.aclose()
    # Local takes what fits in its slots; the rest overflows to the cloud tier at once.
    assert sorted(r.provider for r in more) == ["cloud"] * 3 + ["local"] * 2
    assert local.max_concurrent == 2


async def test_fair_queue_beyond_capacity(servers) -> None:
    srv = serve(servers, slow("ok", 0.1))
    pool = make_pool([pcfg("one", srv, capacity=1)])
    try:
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(pool.chat(ask(f"q{i}"))))
            await asyncio.sleep(0)  # arrival order
        await wait_for(lambda: pool.status()[0].in_flight == 1)
        assert pool.status()[0].queued == 4
        await asyncio.gather(*tasks)
    finally:
        await pool.aclose()
    assert [c.last_user for c in srv.calls] == [f"q{i}" for i in range(5)]
    assert srv.max_concurrent == 1


# --------------------------------------------------------------------------- failures


async def test_server_dying_mid_run_is_retried_elsewhere(servers) -> None:
    a = serve(servers, slow("from a", 0.4))
    b = serve(servers, slow("from b", 0.1))
    pool = make_pool([pcfg("a", a, capacity=2), pcfg("b", b, capacity=2)], strategy="round_robin")
    try:
        tasks = [asyncio.create_task(pool.chat(ask(f"q{i}"))) for i in range(4)]
        await wait_for(lambda: a.in_flight == 2)
        a.down()  # cuts the two open calls before their first token
        results = await asyncio.gather(*tasks)
    finally:
        await pool.aclose()
    assert sorted(r.text for r in results) == ["from b"] * 4
    st = {s.name: s for s in pool.status()}
    assert st["a"].errors == 2 and st["a"].cooldown_s > 0
    assert len(b.calls) == 4  # two of its own, two retried from a; none twice


async def test_mid_stream_failure_is_reported_not_duplicated(servers) -> None:
    text = "one two three four five six"
    a = serve(servers, Rule(reply=ScriptedReply(text=text, chunk_delay_s=0.02, die_after_chunks=2)))
    b = serve(servers, slow(text, 0.0))
    pool = make_pool([pcfg("a", a, priority=0), pcfg("b", b, priority=1)])
    seen: list[str] = []
    try:
        with pytest.raises(ProviderError) as info:
            await pool.chat(ask("q"), on_delta=lambda t: seen.append(t) and None)
    finally:
        await pool.aclose()
    assert info.value.streamed
    assert "".join(seen) == "one two "  # exactly what streamed before the cut, once
    assert used(a) == 1 and used(b) == 0


async def test_429_retry_after_is_honoured(servers) -> None:
    srv = serve(
        servers,
        Rule(reply=ScriptedReply(status=429, retry_after=0.6), times=1),
        slow("ok", 0.0),
    )
    pool = make_pool([pcfg("only", srv)])
    try:
        result = await pool.chat(ask("q"))
        st = pool.status()[0]
    finally:
        await pool.aclose()
    assert result.text == "ok"
    gap = srv.calls[1].t_start - srv.calls[0].t_end  # type: ignore[operator]
    assert gap >= 0.55, f"retried {gap:.2f}s after a Retry-After of 0.6s"
    assert st.errors == 1 and st.requests == 2


async def test_429_goes_to_another_server_which_then_serves(servers) -> None:
    a = serve(
        servers, Rule(reply=ScriptedReply(status=429, retry_after=5), times=1), slow("a", 0.0)
    )
    b = serve(servers, slow("b", 0.0))
    pool = make_pool([pcfg("a", a, priority=0), pcfg("b", b, priority=1)])
    try:
        t0 = time.monotonic()
        first = await pool.chat(ask("q"))
        took = time.monotonic() - t0
        second = await pool.chat(ask("q"))  # a is still blocked by its Retry-After
        st = {s.name: s for s in pool.status()}
    finally:
        await pool.aclose()
    assert first.provider == "b" and second.provider == "b" and took < 2.0
    assert used(a) == 1 and st["a"].cooldown_s > 3


async def test_hang_before_first_token_times_out_and_retries_elsewhere(servers) -> None:
    a = serve(servers, Rule(reply=ScriptedReply(text="never", hang=True)))
    b = serve(servers, slow("b", 0.0))
    pool = make_pool(
        [pcfg("a", a, priority=0, first_token_timeout_s=0.3), pcfg("b", b, priority=1)]
    )
    try:
        t0 = time.monotonic()
        result = await pool.chat(ask("q"))
        took = time.monotonic() - t0
    finally:
        await pool.aclose()
    assert result.provider == "b" and 0.3 <= took < 2.0
    await wait_for(lambda: a.in_flight == 0)  # the hung request was really abandoned


async def test_all_attempts_fail_gives_one_clear_error(servers) -> None:
    srv = serve(servers, Rule(reply=ScriptedReply(status=503, error="overloaded")))
    pool = make_pool([pcfg("only", srv)], retries=2)
    try:
        with pytest.raises(ProviderError) as info:
            await pool.chat(ask("q"))
    finally:
        await pool.aclose()
    assert "3 attempts failed" in str(info.value) and "overloaded" in str(info.value)
    assert used(srv) == 3


async def test_client_error_is_not_retried(servers) -> None:
    srv = serve(servers, Rule(reply=ScriptedReply(status=400, error="bad request body")))
    pool = make_pool([pcfg("only", srv)])
    try:
        with pytest.raises(ProviderError, match="bad request body"):
            await pool.chat(ask("q"))
    finally:
        await pool.aclose()
    assert used(srv) == 1


async def test_health_checks_mark_down_and_back_up(servers) -> None:
    a = serve(servers, slow("a", 0.0))
    b = serve(servers, slow("b", 0.0))
    pool = make_pool([pcfg("a", a, priority=0), pcfg("b", b, priority=1)], health_interval_s=0.1)
    healthy = lambda: {s.name: s.healthy for s in pool.status()}  # noqa: E731
    try:
        await pool.start()
        a.down()
        await wait_for(lambda: not healthy()["a"])
        assert (await pool.chat(ask("q"))).provider == "b"  # no failed attempt on a
        assert pool.status()[0].errors == 0
        a.up()
        await wait_for(lambda: healthy()["a"])
        assert (await pool.chat(ask("q"))).provider == "a"
    finally:
        await pool.aclose()


async def test_cooldown_after_errors(servers) -> None:
    a = serve(servers, Rule(reply=ScriptedReply(status=500), times=1), slow("a", 0.0))
    b = serve(servers, slow("b", 0.0))
    pool = make_pool([pcfg("a", a, priority=0), pcfg("b", b, priority=1)], cooldown_s=0.5)
    try:
        assert (await pool.chat(ask("q"))).provider == "b"  # 500 on a, retried on b
        assert (await pool.chat(ask("q"))).provider == "b"  # a is cooling down
        assert pool.status()[0].cooldown_s > 0
        await asyncio.sleep(0.55)
        assert (await pool.chat(ask("q"))).provider == "a"  # cooldown over
        st = pool.status()[0]
    finally:
        await pool.aclose()
    assert st.errors == 1 and st.error_rate == pytest.approx(0.5)


async def test_lone_server_in_cooldown_is_still_used(servers) -> None:
    srv = serve(servers, Rule(reply=ScriptedReply(status=500), times=1), slow("ok", 0.0))
    pool = make_pool([pcfg("only", srv)], cooldown_s=30)
    try:
        assert (await pool.chat(ask("q"))).text == "ok"
    finally:
        await pool.aclose()


# --------------------------------------------------------------------------- affinity


async def test_affinity_sticks_waits_briefly_and_falls_back(servers) -> None:
    a = serve(servers, slow("a", 0.15))
    b = serve(servers, slow("b", 0.15))
    pool = make_pool([pcfg("a", a, capacity=2), pcfg("b", b, capacity=2)], health_interval_s=0.1)
    try:
        await pool.start()
        one = [(await pool.chat(ask("q"), affinity="job1")).provider for _ in range(4)]
        assert len(set(one)) == 1
        # Three at once on a capacity-2 server: the third waits for its server.
        three = await asyncio.gather(*(pool.chat(ask("q"), affinity="job1") for _ in range(3)))
        assert {r.provider for r in three} == {one[0]}
        # Another key is free to go elsewhere; least-loaded choice spreads it.
        bound = a if one[0] == "a" else b
        other = "b" if one[0] == "a" else "a"
        bound.down()
        await wait_for(lambda: not {s.name: s.healthy for s in pool.status()}[one[0]])
        moved = await pool.chat(ask("q"), affinity="job1")
        again = await pool.chat(ask("q"), affinity="job1")
    finally:
        await pool.aclose()
    assert moved.provider == other and again.provider == other


async def test_affinity_falls_back_when_its_server_stays_busy(servers) -> None:
    # The blocker hangs until it is cancelled (no race with a timer), so the affine call
    # can only finish by giving up on "a" after affinity_wait_s and going to "b".
    a = serve(
        servers,
        slow("a", 0.3, pattern="first"),
        Rule(pattern="block", reply=ScriptedReply(hang=True)),
    )
    b = serve(servers, slow("b", 0.0))
    pool = make_pool([pcfg("a", a, priority=0), pcfg("b", b, priority=1)])
    try:
        assert (await pool.chat(ask("first"), affinity="k")).provider == "a"
        blocker = asyncio.create_task(pool.chat(ask("block")))
        # Wait for the blocker itself on "a": its in_flight can still count the first call
        # (the server thread leaves after the client has the reply), and then the affine
        # call took a's slot and the blocker went to "b" (one full-suite run of four today).
        await wait_for(lambda: any(c.last_user == "block" for c in a.calls))
        t0 = time.monotonic()
        r = await pool.chat(ask("first"), affinity="k")  # a stays full
        waited = time.monotonic() - t0
        assert not blocker.done()
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
    finally:
        await pool.aclose()
    assert r.provider == "b" and waited >= 0.9  # affinity_wait_s = 1.0


# --------------------------------------------------------------------------- priority


async def test_priority_10_never_delays_priority_0(servers) -> None:
    srv = serve(servers, slow("spec", 1.0, pattern="spec"), slow("real", 0.2, pattern="real"))
    pool = make_pool([pcfg("one", srv, capacity=1)])
    done: dict[str, float] = {}

    async def run(text: str, priority: int) -> ChatResult:
        r = await pool.chat(ask(text), priority=priority)
        done[text] = time.monotonic()
        return r

    try:
        t0 = time.monotonic()
        spec = asyncio.create_task(run("spec", 10))
        await wait_for(lambda: srv.in_flight == 1)
        real = await run("real", 0)
        real_took = time.monotonic() - t0
        spec_result = await spec
    finally:
        await pool.aclose()
    # The running speculative call gave its slot up at once and ran again afterwards.
    assert real.text == "real" and spec_result.text == "spec"
    assert real_took < 0.8 and done["real"] < done["spec"]
    assert [c.last_user for c in srv.calls] == ["spec", "real", "spec"]


async def test_queued_priority_0_goes_before_queued_priority_10(servers) -> None:
    srv = serve(servers, slow("ok", 0.1))
    pool = make_pool([pcfg("one", srv, capacity=1)])
    try:
        first = asyncio.create_task(pool.chat(ask("first")))
        await wait_for(lambda: srv.in_flight == 1)
        low = [asyncio.create_task(pool.chat(ask(f"low{i}"), priority=10)) for i in range(3)]
        await asyncio.sleep(0.01)
        high = asyncio.create_task(pool.chat(ask("high")))
        await asyncio.gather(first, high, *low)
    finally:
        await pool.aclose()
    order = [c.last_user for c in srv.calls]
    assert order == ["first", "high", "low0", "low1", "low2"]


# --------------------------------------------------------------------------- cancellation


async def test_cancellation_frees_slot_and_queue_place(servers) -> None:
    srv = serve(servers, slow("slow", 5.0, pattern="slow"), slow("fast", 0.0, pattern="fast"))
    pool = make_pool([pcfg("one", srv, capacity=1)])
    try:
        running = asyncio.create_task(pool.chat(ask("slow")))
        await wait_for(lambda: srv.in_flight == 1)
        queued = asyncio.create_task(pool.chat(ask("slow queued")))
        waiting = asyncio.create_task(pool.chat(ask("fast")))
        await wait_for(lambda: pool.status()[0].queued == 2)
        queued.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert pool.status()[0].queued == 1  # its queue place is gone
        t0 = time.monotonic()
        running.cancel()
        result = await waiting
        assert result.text == "fast" and time.monotonic() - t0 < 1.0
        await wait_for(lambda: srv.in_flight == 0)  # the server saw the client leave
        assert pool.status()[0].in_flight == 0
    finally:
        await pool.aclose()
    assert [c.last_user for c in srv.calls] == ["slow", "fast"]


async def test_stopped_call_frees_its_slot_and_is_charged(servers) -> None:
    text = "```repl\nprint(1)\n``` and then a lot more text that nobody wants"
    srv = serve(servers, Rule(reply=ScriptedReply(text=text, chunk_delay_s=0.05)))
    pool = make_pool([pcfg("one", srv, capacity=1, price_out_per_mtok=1e6)])
    seen: list[str] = []

    def until_block_closes(piece: str) -> bool:
        seen.append(piece)
        return "```" in "".join(seen)[3:]

    try:
        stopped = await pool.chat(ask("q"), on_delta=until_block_closes)
        assert pool.status()[0].in_flight == 0
        again = await pool.chat(ask("q"))
    finally:
        await pool.aclose()
    assert stopped.stopped and not again.stopped and again.text == text
    assert stopped.usage.output > 0 and stopped.cost == pytest.approx(stopped.usage.output)


async def test_aclose_fails_waiting_calls_clearly(servers) -> None:
    srv = serve(servers, slow("x", 1.0))
    pool = make_pool([pcfg("one", srv, capacity=1)])
    running = asyncio.create_task(pool.chat(ask("a")))
    waiting = asyncio.create_task(pool.chat(ask("b")))
    await wait_for(lambda: pool.status()[0].queued == 1)
    await pool.aclose()
    with pytest.raises(ProviderError, match="shutting down"):
        await waiting
    running.cancel()
    with pytest.raises((asyncio.CancelledError, ProviderError)):
        await running


# --------------------------------------------------------------------------- accounting


async def test_accounting_tokens_and_prices_exact(servers) -> None:
    srv = serve(servers, Rule(reply=ScriptedReply(text="answer", usage_in=1000, usage_out=500)))
    pool = make_pool(
        [pcfg("cloud", srv, "anthropic", price_in_per_mtok=3.0, price_out_per_mtok=15.0)]
    )
    try:
        results = [await pool.chat(ask("q")) for _ in range(3)]
        st = pool.status()[0]
    finally:
        await pool.aclose()
    for r in results:
        assert (r.usage.input, r.usage.output) == (1000, 500)
        assert r.cost == pytest.approx(1000 * 3.0 / 1e6 + 500 * 15.0 / 1e6, rel=1e-12)
        assert r.energy_wh == 0.0
    assert (st.tokens_in, st.tokens_out, st.requests) == (3000, 1500, 3)
    assert st.cost == pytest.approx(3 * 0.0105, rel=1e-12)


async def test_accounting_energy_shared_busy_time(servers) -> None:
    srv = serve(servers, Rule(reply=ScriptedReply(text="x", delay_s=0.5, usage_in=10, usage_out=2)))
    config = Config(
        providers=[pcfg("gpu", srv, capacity=2, watts=3600.0)],
        energy=EnergyConfig(price_per_kwh=0.5),
    )
    pool = make_pool(config.providers, config=config)
    try:
        two = await asyncio.gather(pool.chat(ask("a")), pool.chat(ask("b")))
        st = pool.status()[0]
    finally:
        await pool.aclose()
    # 3600 W busy for ~0.5 s is ~0.5 Wh, shared by the two calls that ran together.
    for r in two:
        assert 0.2 <= r.energy_wh <= 0.4
        assert r.cost == pytest.approx(r.energy_wh / 1000 * 0.5, rel=1e-9)
    assert st.energy_wh == pytest.approx(sum(r.energy_wh for r in two), rel=1e-9)
    assert st.cost == pytest.approx(st.energy_wh / 1000 * 0.5, rel=1e-9)


def test_ledger_shares_busy_time_exactly() -> None:
    now = [0.0]
    led = Ledger(
        price_in_per_mtok=0,
        price_out_per_mtok=0,
        watts=1000,
        price_per_kwh=1.0,
        clock=lambda: now[0],
    )
    a = led.begin()
    now[0] = 1.0
    b = led.begin()  # a alone for 1 s, then both for 2 s
    now[0] = 3.0
    share_a = led.end(a)
    now[0] = 4.0  # b alone for 1 s
    share_b = led.end(b)
    now[0] = 10.0  # idle time costs nothing
    c = led.begin()
    share_c = led.end(c)
    assert (share_a, share_b, share_c) == (2.0, 2.0, 0.0)
    assert led.totals.busy_s == 4.0


# --------------------------------------------------------------------------- the rest


async def test_unknown_model_names_the_configured_ones(servers) -> None:
    srv = serve(servers, slow("x", 0.0))
    pool = make_pool([pcfg("gpu", srv, models=["qwen:7b", "qwen:32b"])])
    try:
        with pytest.raises(NoProviderError) as info:
            await pool.chat(ask("q", model="llama:70b"))
    finally:
        await pool.aclose()
    msg = str(info.value)
    assert "'llama:70b'" in msg and "qwen:7b (gpu)" in msg and "qwen:32b (gpu)" in msg


def test_provider_without_config_is_a_clear_error(servers) -> None:
    srv = serve(servers, slow("x", 0.0))
    stray = build_provider(pcfg("stray", srv), ENV)
    with pytest.raises(ConfigError, match="'stray' has no configuration"):
        Pool(Config(), [stray])


async def test_model_for_roles(servers) -> None:
    srv = serve(servers, slow("x", 0.0))
    pcs = [
        pcfg("cloud", srv, "openai", models=["big", "small"], priority=1),
        pcfg("local", srv, models=["qwen", "tiny"], priority=0),
    ]
    pool = make_pool(pcs)
    configured = Pool(
        Config(providers=pcs, models=ModelsConfig(root="big", sub="tiny")),
        [build_provider(p, ENV) for p in pcs],
    )
    try:
        assert [pool.model_for(r) for r in ("root", "sub", "embed")] == ["qwen"] * 3
        assert (configured.model_for("root"), configured.model_for("sub")) == ("big", "tiny")
    finally:
        await pool.aclose()
        await configured.aclose()


async def test_extra_configs_for_providers_built_outside_the_config(servers) -> None:
    srv = serve(servers, slow("hello", 0.0))
    extra = pcfg("side", srv, capacity=2)
    pool = Pool(Config(), [build_provider(extra, ENV)], extra_configs={"side": extra})
    try:
        assert (await pool.chat(ask("q"))).text == "hello"
    finally:
        await pool.aclose()


class DictCache:
    """A minimal cache behind the pool's seam (the real one lives in rlmd/cache)."""

    def __init__(self) -> None:
        self.data: dict[ChatRequest, ChatResult] = {}

    async def get(self, req: ChatRequest) -> ChatResult | None:
        return self.data.get(req)

    async def put(self, req: ChatRequest, result: ChatResult) -> None:
        self.data[req] = result


async def test_cache_seam_for_deterministic_calls(servers) -> None:
    srv = serve(servers, slow("cached answer", 0.0))
    pc = pcfg("one", srv, price_in_per_mtok=1.0)
    cache = DictCache()
    pool = Pool(Config(providers=[pc]), [build_provider(pc, ENV)], cache=cache)
    streamed: list[str] = []
    try:
        first = await pool.chat(ask("q"))
        second = await pool.chat(ask("q"), on_delta=streamed.append)
        sampled = [await pool.chat(ask("q", temperature=0.7)) for _ in range(2)]
    finally:
        await pool.aclose()
    assert not first.cached and first.cost > 0
    assert second.cached and second.text == "cached answer" and second.cost == 0.0
    assert streamed == ["cached answer"]
    assert not any(r.cached for r in sampled)
    assert used(srv) == 3


async def test_embed(servers) -> None:
    srv = serve(servers, slow("x", 0.0))
    pool = make_pool([pcfg("one", srv)])
    try:
        vectors = await pool.embed(["alpha beta", "alpha beta", "gamma"])
    finally:
        await pool.aclose()
    assert len(vectors) == 3 and vectors[0] == vectors[1] != vectors[2]


class _C:
    def __init__(
        self,
        name: str,
        order: int,
        *,
        tier: int = 0,
        in_flight: int = 0,
        capacity: int = 2,
        ttft: float | None = None,
    ) -> None:
        self.name, self.order, self.tier = name, order, tier
        self.in_flight, self.capacity = in_flight, capacity
        self.ewma_ttft_s, self.error_rate = ttft, 0.0


def test_strategies_choose() -> None:
    a = _C("a", 0, tier=1, in_flight=0, ttft=0.5)
    b = _C("b", 1, tier=0, in_flight=1, ttft=0.2)
    c = _C("c", 2, tier=0, in_flight=1, ttft=0.1)
    rr = Chooser("round_robin")
    assert [rr.choose(MODEL, [a, b, c]).name for _ in range(4)] == ["a", "b", "c", "a"]
    assert Chooser("least_loaded").choose(MODEL, [a, b, c]).name == "a"
    assert Chooser("latency").choose(MODEL, [a, b, c]).name == "c"
    assert Chooser("adaptive").choose(MODEL, [a, b, c]).name == "c"  # tier 0, then latency


# --------------------------------------------------------------------------- long Retry-After


async def test_long_retry_after_is_capped_reported_and_fails_fast(servers) -> None:
    """``Retry-After: 3600`` on a lone server: the call fails at once naming the server,
    the reason and when it is back; status says rate_limited (not plain healthy) with
    the block capped; the next call fails at once too (it used to hang until the
    query's own timeout); after the cap the server serves again."""
    srv = serve(
        servers,
        Rule(reply=ScriptedReply(status=429, retry_after=3600, error="slow down"), times=1),
        slow("back", 0.0),
    )
    pool = make_pool([pcfg("only", srv)], max_cooldown_s=1.0, max_retry_after_s=0.2)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(ProviderError) as first:
                await pool.chat(ask("q"))
        st = pool.status()[0]
        assert not st.healthy and st.state == "rate_limited"
        assert 0 < st.cooldown_s <= 1.0 and st.cooling_until is not None
        assert st.cooling_reason == "HTTP 429 Retry-After 3600s (capped at 1s)"
        t0 = time.monotonic()
        async with asyncio.timeout(5):
            with pytest.raises(ProviderError) as second:
                await pool.chat(ask("q"))
        assert time.monotonic() - t0 < 0.5 and used(srv) == 1  # nothing was sent
        for err in (first.value, second.value):
            msg = str(err)
            assert "'only'" in msg or "only (" in msg, msg
            assert "Retry-After 3600s" in msg and "back in" in msg, msg
        await wait_for(lambda: pool.status()[0].state == "ok", within_s=3.0)
        assert (await pool.chat(ask("q"))).text == "back"
    finally:
        await pool.aclose()


async def test_waiting_call_fails_when_its_last_server_gets_a_long_block(servers) -> None:
    """A call queued behind a busy lone server is failed as soon as that server answers
    429 with a long Retry-After, instead of waiting for the block to end."""
    srv = serve(
        servers,
        Rule(pattern="first", reply=ScriptedReply(status=429, retry_after=3600, delay_s=0.3)),
        slow("never", 0.0),
    )
    pool = make_pool([pcfg("only", srv, capacity=1)], max_cooldown_s=60, max_retry_after_s=5)
    try:
        async with asyncio.timeout(5):
            a = asyncio.create_task(pool.chat(ask("first")))
            await wait_for(lambda: srv.in_flight == 1)
            b = asyncio.create_task(pool.chat(ask("second")))
            results = await asyncio.gather(a, b, return_exceptions=True)
    finally:
        await pool.aclose()
    assert all(isinstance(r, ProviderError) for r in results), results
    assert "rate-limited" in str(results[1]) and "back in" in str(results[1])
    assert used(srv) == 1


async def test_short_retry_after_is_still_waited_for_by_new_calls(servers) -> None:
    srv = serve(
        servers, Rule(reply=ScriptedReply(status=429, retry_after=0.4), times=1), slow("ok", 0.0)
    )
    pool = make_pool([pcfg("only", srv)], retries=0)
    try:
        with pytest.raises(ProviderError):
            await pool.chat(ask("q"))  # no retries: the 429 is reported
        assert pool.status()[0].state == "rate_limited"
        assert (await pool.chat(ask("q"))).text == "ok"  # waits the 0.4 s block out
    finally:
        await pool.aclose()
