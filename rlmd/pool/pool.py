"""The pool: spreads model calls over every provider that serves the model.

A call takes one *slot* on one server (a server has ``capacity`` slots, e.g. Ollama's
``OLLAMA_NUM_PARALLEL``).  Calls beyond the free slots wait in one fair queue: ordered by
``priority`` (lower first), then by arrival.  Each time a slot frees, the queue is
walked in that order and every waiting call that can be placed is placed, so a later
call never takes a slot an earlier one could have used.  A waiting call may also
*preempt* a running call of a worse priority (speculative prefetch at priority 10 must
never delay a real call): the running one is cancelled and put back in the queue at its
old place, unless text had already reached its caller.

Failures before the first token (connect errors, 429, 5xx, a server that hangs) are
retried, on another server where one exists, with jittered exponential backoff;
``Retry-After`` blocks that server until then.  Once text has streamed, an error is
reported and never retried, so the caller never sees an answer twice.

A ``Retry-After`` block is capped at ``[pool] max_cooldown_s``.  When every server of a
model is blocked for longer than ``[pool] max_retry_after_s``, a call fails at once with
:class:`AllCoolingError` naming each server, its reason and when it is back, instead of
waiting silently until the query's own timeout.

Known secrets (``redactor``: the API keys the daemon holds) are masked here, at the one
boundary every answer crosses: streamed deltas (a key split over two pieces included),
the result's text, cache hits, what goes into the cache, and error messages.

Cancelling a ``chat()`` frees its slot or its queue place at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal, Protocol, TypeVar

import msgspec

from rlmd.config import Config, ConfigError, ProviderConfig
from rlmd.pool.accounting import Ledger
from rlmd.pool.health import Health, HealthProbe, health_loop
from rlmd.pool.strategies import Chooser
from rlmd.providers.base import ChatRequest, ChatResult, OnDelta, Provider, ProviderError, Usage
from rlmd.secrets import Redactor

log = logging.getLogger(__name__)

T = TypeVar("T")

# Affinity keys remembered (one per running query, so this is plenty).
MAX_AFFINITY_KEYS = 4096


class NoProviderError(ProviderError):
    """No configured provider serves the requested model."""


class AllCoolingError(ProviderError):
    """Every server of the model is rate-limited for longer than a call may wait."""


class CallCache(Protocol):
    """The seam for the call cache (``rlmd/cache``): consulted for deterministic calls."""

    async def get(self, req: ChatRequest) -> ChatResult | None: ...
    async def put(self, req: ChatRequest, result: ChatResult) -> None: ...


class ProviderStatus(msgspec.Struct, kw_only=True):
    """Live state and totals of one provider, for ``daemon/status`` and ``pool/status``."""

    name: str
    kind: str
    healthy: bool
    in_flight: int
    capacity: int
    priority: int
    models: list[str]
    queued: int
    ewma_ttft_s: float | None
    ewma_tokens_per_s: float | None
    error_rate: float
    cooldown_s: float  # remaining seconds of cooldown or Retry-After block
    # "ok", "cooling" (recent errors: avoided while another can serve), "rate_limited"
    # (Retry-After: nothing is sent before cooling_until) or "down" (health probe failed).
    # ``healthy`` is true only for "ok" and "cooling".
    state: str = "ok"
    cooling_reason: str = ""  # e.g. "HTTP 429 Retry-After 3600s (capped at 120s)"
    cooling_until: float | None = None  # Unix time the cooldown or block ends
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost: float
    energy_wh: float


class _Server:
    """One provider with its config and live state."""

    def __init__(
        self, cfg: ProviderConfig, provider: Provider, order: int, health: Health, ledger: Ledger
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        self.name = cfg.name
        self.capacity = cfg.capacity
        self.tier = cfg.priority
        self.order = order
        self.health = health
        self.ledger = ledger
        self.in_flight = 0
        self.running: set[_Run] = set()

    @property
    def ewma_ttft_s(self) -> float | None:
        return self.health.ewma_ttft_s

    @property
    def error_rate(self) -> float:
        return self.health.error_rate


class _Slot:
    """One taken slot on a server, until released."""

    __slots__ = ("released", "server", "token")

    def __init__(self, server: _Server, token: float) -> None:
        self.server = server
        self.token = token  # the ledger's share integral when the slot was taken
        self.released = False


class _Waiter:
    __slots__ = ("affinity", "deadline", "exclude", "fut", "model", "priority", "seq")

    def __init__(
        self,
        *,
        priority: int,
        seq: int,
        model: str,
        affinity: str | None,
        exclude: frozenset[str],
        fut: asyncio.Future[_Slot],
        deadline: float,
    ) -> None:
        self.priority = priority
        self.seq = seq
        self.model = model
        self.affinity = affinity
        self.exclude = exclude
        self.fut = fut
        self.deadline = deadline  # until when an affinity call waits for its server


class _Run:
    """A call running on a server: can be aborted (preemption, timeouts)."""

    def __init__(self, priority: int, task: asyncio.Task[object]) -> None:
        self.priority = priority
        self.task = task
        self.abort_reason: str | None = None
        self.caller_saw_text = False

    def abort(self, reason: str) -> None:
        if self.abort_reason is None and not self.task.done():
            self.abort_reason = reason
            self.task.cancel()


class _Preempted(Exception):
    """Internal: the call gave its slot to a better-priority call; queue it again."""


class Pool:
    """Load balancing, queueing, retries, health and accounting over providers.

    ``providers`` are matched by name with ``config.providers`` (and ``extra_configs``,
    for providers built outside the config such as the embedded model).  The pool owns
    them: :meth:`aclose` closes them.
    """

    def __init__(
        self,
        config: Config,
        providers: list[Provider],
        *,
        cache: CallCache | None = None,
        extra_configs: Mapping[str, ProviderConfig] | None = None,
        redactor: Redactor | None = None,
        affinity_wait_s: float = 2.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._cache = cache
        self._redactor = redactor or Redactor()
        self._affinity_wait_s = affinity_wait_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._chooser = Chooser(config.pool.strategy)
        cfgs: dict[str, ProviderConfig] = {p.name: p for p in config.providers}
        cfgs.update(extra_configs or {})
        self._servers: list[_Server] = []
        self._by_model: dict[str, list[_Server]] = {}
        seen: set[str] = set()
        for order, provider in enumerate(providers):
            cfg = cfgs.get(provider.name)
            if cfg is None:
                raise ConfigError(
                    f"provider {provider.name!r} has no configuration; "
                    f"configured: {', '.join(sorted(cfgs)) or 'none'}"
                )
            if cfg.name in seen:
                raise ConfigError(f"provider {cfg.name!r} was given to the pool twice")
            seen.add(cfg.name)
            health = Health(
                error_window=config.pool.error_window,
                cooldown_s=config.pool.cooldown_s,
                clock=clock,
            )
            ledger = Ledger(
                price_in_per_mtok=cfg.price_in_per_mtok,
                price_out_per_mtok=cfg.price_out_per_mtok,
                watts=cfg.watts,
                price_per_kwh=config.energy.price_per_kwh,
                clock=clock,
            )
            server = _Server(cfg, provider, order, health, ledger)
            self._servers.append(server)
            for model in cfg.models:
                self._by_model.setdefault(model, []).append(server)
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._affinity: OrderedDict[str, _Server] = OrderedDict()
        self._timers: set[asyncio.TimerHandle] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the background health checks (first probe right away)."""
        if self._health_task is not None or not self._servers:
            return
        interval = self._config.pool.health_interval_s
        probes = [
            HealthProbe(
                s.name,
                s.provider.health,
                s.health,
                timeout_s=max(0.5, min(s.cfg.connect_timeout_s, interval)),
            )
            for s in self._servers
        ]
        self._health_task = asyncio.create_task(
            health_loop(probes, interval, self._on_health_change), name="rlmd-pool-health"
        )

    async def aclose(self) -> None:
        """Stop health checks, fail waiting calls, close every provider."""
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
            self._health_task = None
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for w in self._waiters:
            if not w.fut.done():
                w.fut.set_exception(ProviderError("the model pool is shutting down"))
        self._waiters.clear()
        for s in self._servers:
            try:
                await s.provider.aclose()
            except Exception as exc:  # closing one must not stop closing the others
                log.warning("closing provider %s failed: %r", s.name, exc)

    # ----------------------------------------------------------------- queries

    def model_for(self, role: Literal["root", "sub", "embed"]) -> str:
        """The model for a role: ``[models]`` in the config, else the first model of the
        most preferred provider (lowest priority tier, then config order)."""
        name = getattr(self._config.models, role)
        if name:
            return name
        with_models = [s for s in self._servers if s.cfg.models]
        if not with_models:
            raise NoProviderError(
                f"no model configured for role {role!r} and no provider lists any models; "
                "add a [[providers]] entry with `models`, or set [models] " + role
            )
        best = min(with_models, key=lambda s: (s.tier, s.order))
        return best.cfg.models[0]

    def status(self) -> list[ProviderStatus]:
        """Live state and totals of every provider, in config order."""
        out = []
        for s in self._servers:
            served = set(s.cfg.models)
            queued = sum(1 for w in self._waiters if w.model in served and not w.fut.done())
            t = s.ledger.totals
            now = self._clock()
            state = s.health.state(now)
            left = s.health.cooldown_remaining()
            out.append(
                ProviderStatus(
                    name=s.name,
                    kind=s.cfg.kind,
                    healthy=state in ("ok", "cooling"),
                    state=state,
                    cooling_reason=s.health.block_reason
                    if state == "rate_limited"
                    else ("recent errors" if state == "cooling" else ""),
                    cooling_until=round(time.time() + left, 3) if left > 0 else None,
                    in_flight=s.in_flight,
                    capacity=s.capacity,
                    priority=s.tier,
                    models=list(s.cfg.models),
                    queued=queued,
                    ewma_ttft_s=s.health.ewma_ttft_s,
                    ewma_tokens_per_s=s.health.ewma_tokens_per_s,
                    error_rate=s.health.error_rate,
                    cooldown_s=s.health.cooldown_remaining(),
                    requests=t.requests,
                    errors=t.errors,
                    tokens_in=t.tokens_in,
                    tokens_out=t.tokens_out,
                    cost=t.cost,
                    energy_wh=t.energy_wh,
                )
            )
        return out

    # ----------------------------------------------------------------- calls

    async def chat(
        self,
        req: ChatRequest,
        *,
        on_delta: OnDelta | None = None,
        priority: int = 0,
        affinity: str | None = None,
    ) -> ChatResult:
        """Run one chat call on the best server that serves ``req.model``.

        ``priority``: lower runs first (0 real calls, 10 speculation).  ``affinity``: calls
        with the same key go to the same server while it is usable, waiting briefly for a
        free slot there.  Raises :class:`NoProviderError` for an unserved model and
        :class:`ProviderError` when the call failed (after retries where allowed).
        """
        self._servers_for(req.model)
        red = self._redactor
        cacheable = self._cacheable(req)
        if cacheable:
            assert self._cache is not None
            hit = await self._cache.get(req)
            if hit is not None:
                text = red.redact(hit.text) if red else hit.text  # rows from before a key was known
                if on_delta is not None and text:
                    on_delta(text)
                return msgspec.structs.replace(hit, text=text, cached=True, cost=0.0, energy_wh=0.0)

        streamer = red.stream(on_delta) if red and on_delta is not None else None

        async def call(server: _Server, deliver: OnDelta) -> ChatResult:
            return await server.provider.chat(req, deliver)

        try:
            result, server, busy_s = await self._dispatch_call(
                req.model,
                call,
                on_delta=streamer or on_delta,
                priority=priority,
                affinity=affinity,
                stream=True,
            )
        except ProviderError as err:
            if red:
                err.args = (red.redact(str(err)),)
            raise
        if streamer is not None and not result.stopped:
            streamer.flush()
        charge = server.ledger.charge(result.usage, busy_s)
        result = msgspec.structs.replace(
            result,
            text=red.redact(result.text) if red else result.text,
            provider=server.name,
            cost=charge.cost,
            energy_wh=charge.energy_wh,
        )
        if cacheable:
            assert self._cache is not None
            try:
                await self._cache.put(req, result)
            except Exception as exc:  # a broken cache must not fail a good call
                log.warning("call cache put failed: %r", exc)
        return result

    async def embed(self, texts: list[str], model: str | None = None) -> list[list[float]]:
        """Embed ``texts`` with ``model`` (default: the ``embed`` role's model)."""
        name = model or self.model_for("embed")
        self._servers_for(name)

        async def call(server: _Server, deliver: OnDelta) -> list[list[float]]:
            return await server.provider.embed(name, texts)

        vectors, server, busy_s = await self._dispatch_call(
            name, call, on_delta=None, priority=0, affinity=None, stream=False
        )
        server.ledger.charge(Usage(), busy_s)
        return vectors

    def _cacheable(self, req: ChatRequest) -> bool:
        c = self._config.cache
        return self._cache is not None and c.enabled and (req.temperature == 0 or c.cache_sampled)

    def _servers_for(self, model: str) -> list[_Server]:
        servers = self._by_model.get(model)
        if servers:
            return servers
        served = ", ".join(
            f"{m} ({', '.join(s.name for s in ss)})" for m, ss in sorted(self._by_model.items())
        )
        raise NoProviderError(
            f"no provider serves model {model!r}; configured models: {served or 'none'}. "
            "Use one of these names or add the model to a provider's `models` list."
        )

    async def _dispatch_call(
        self,
        model: str,
        call: Callable[[_Server, OnDelta], Awaitable[T]],
        *,
        on_delta: OnDelta | None,
        priority: int,
        affinity: str | None,
        stream: bool,
    ) -> tuple[T, _Server, float]:
        """Queue, run, retry.  Returns the value, the server and its busy seconds."""
        retries = self._config.pool.retries
        seq = next(self._seq)
        exclude: set[str] = set()
        failures = 0
        while True:
            slot = await self._acquire(model, priority, affinity, frozenset(exclude), seq)
            server = slot.server
            try:
                value, ttft_s, elapsed_s = await self._attempt(
                    server, call, on_delta, priority, stream
                )
            except _Preempted:
                server.ledger.charge_failed(self._release(slot))
                continue
            except ProviderError as err:
                # The error first: releasing the slot hands it on, and a server that just
                # said Retry-After must not get the next waiter.
                self._record_error(server, err)
                server.ledger.charge_failed(self._release(slot))
                server.ledger.totals.requests += 1
                failures += 1
                exclude.add(server.name)
                delay = self._retry_delay(model, err, failures, exclude)
                if delay is None or failures > retries:
                    cooling = self._cooling_error(model, self._clock())
                    if cooling is not None and not err.streamed:
                        raise cooling from err
                    raise self._final_error(model, err, failures) from err
                log.info(
                    "retrying %s after %s failed (%s) in %.2fs", model, server.name, err, delay
                )
                if delay > 0:
                    await asyncio.sleep(delay)
                continue
            except BaseException:
                busy = self._release(slot)
                server.ledger.charge_failed(busy)
                raise
            busy = self._release(slot)
            server.ledger.totals.requests += 1
            if isinstance(value, ChatResult):
                server.health.record_success(ttft_s, value.usage.output, elapsed_s - ttft_s)
            else:
                server.health.record_success(0.0, 0, 0.0)  # embeddings: no latency sample
            return value, server, busy

    async def _attempt(
        self,
        server: _Server,
        call: Callable[[_Server, OnDelta], Awaitable[T]],
        on_delta: OnDelta | None,
        priority: int,
        stream: bool,
    ) -> tuple[T, float, float]:
        """One try on one server, with the first-token and total timeouts.

        Runs the provider call in a child task so that a timeout or a preemption can
        cancel it without cancelling the caller.  Returns (value, ttft_s, elapsed_s).
        """
        loop = asyncio.get_running_loop()
        t0 = self._clock()
        first_at: float | None = None
        got_text = False
        timers: list[asyncio.TimerHandle] = []

        def deliver(text: str) -> bool | None:
            nonlocal first_at, got_text
            if first_at is None:
                first_at = self._clock()
                for h in timers[1:]:  # first-token timer(s)
                    h.cancel()
            if text:
                got_text = True
                if on_delta is not None:
                    run.caller_saw_text = True
            return on_delta(text) if on_delta is not None else None

        task: asyncio.Task[T] = asyncio.create_task(call(server, deliver))  # type: ignore[arg-type]
        run = _Run(priority, task)  # type: ignore[arg-type]
        server.running.add(run)
        cfg = server.cfg
        timers.append(loop.call_later(cfg.total_timeout_s, run.abort, "total_timeout"))
        if stream:
            timers.append(
                loop.call_later(cfg.first_token_timeout_s, run.abort, "first_token_timeout")
            )
        try:
            try:
                value = await task
            except (asyncio.CancelledError, ProviderError) as exc:
                me = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and (
                    run.abort_reason is None or (me is not None and me.cancelling())
                ):
                    raise
                if run.abort_reason == "preempted":
                    raise _Preempted() from None
                if isinstance(exc, ProviderError):
                    if got_text:
                        exc.streamed = True
                    raise
                limit = (
                    cfg.total_timeout_s
                    if run.abort_reason == "total_timeout"
                    else cfg.first_token_timeout_s
                )
                what = "an answer" if run.abort_reason == "total_timeout" else "a first token"
                raise ProviderError(
                    f"provider {server.name!r} gave no {what} within {limit:g}s",
                    retryable=run.abort_reason == "first_token_timeout",
                    streamed=got_text,
                ) from None
        finally:
            for h in timers:
                h.cancel()
            server.running.discard(run)
            if not task.done():
                task.cancel()
        t1 = self._clock()
        ttft = (first_at - t0) if first_at is not None else (t1 - t0)
        return value, ttft, t1 - t0

    def _record_error(self, server: _Server, err: ProviderError) -> None:
        server.ledger.totals.errors += 1
        retry_after = err.retry_after_s
        cap = self._config.pool.max_cooldown_s
        # 429 with Retry-After: a hard block until then; other server trouble: cooldown.
        cooldown = err.retryable and not retry_after
        reason = ""
        if retry_after:
            status = f"HTTP {err.status} " if err.status else ""
            reason = f"{status}Retry-After {retry_after:g}s"
            if retry_after > cap:
                reason += f" (capped at {cap:g}s)"
        server.health.record_error(
            cooldown=cooldown, retry_after_s=retry_after, max_block_s=cap, reason=reason
        )
        if cooldown:
            self._wake_after(min(server.health.cooldown_s, cap))
        if retry_after:
            self._wake_after(min(retry_after, cap))
        self._dispatch()  # waiters whose every server is now out for long fail at once

    def _cooling_error(self, model: str, now: float) -> AllCoolingError | None:
        """The error for a call on ``model`` when every server of it is blocked for longer
        than ``[pool] max_retry_after_s``; None when one serves (or is back soon)."""
        servers = self._by_model.get(model, [])
        if not servers or not all(s.health.blocked(now) for s in servers):
            return None
        soonest = min(s.health.block_remaining(now) for s in servers)
        if soonest <= self._config.pool.max_retry_after_s:
            return None  # back soon enough: the queue waits for it
        wall = time.time()
        parts = []
        for s in servers:
            left = s.health.block_remaining(now)
            at = time.strftime("%H:%M:%S UTC", time.gmtime(wall + left))
            parts.append(
                f"{s.name} ({s.health.block_reason or 'rate limited'}; back in {left:.0f}s, "
                f"at {at})"
            )
        which = "its only provider is" if len(servers) == 1 else "all its providers are"
        return AllCoolingError(
            f"model {model!r}: {which} rate-limited: {'; '.join(parts)}. Try again then, "
            "or add another provider serving it",
            retryable=False,
            retry_after_s=soonest,
            status=429,
        )

    def _retry_delay(
        self, model: str, err: ProviderError, failures: int, exclude: set[str]
    ) -> float | None:
        """Seconds to wait before the next try, or None when it must not be retried."""
        if err.streamed or not err.retryable or self._closed:
            return None
        now = self._clock()
        others = [
            s
            for s in self._by_model[model]
            if s.name not in exclude and s.health.healthy and not s.health.blocked(now)
        ]
        if others:
            return 0.0  # another server can take it now; backoff protects the failed one
        if (
            err.retry_after_s is not None
            and err.retry_after_s > self._config.pool.max_retry_after_s
        ):
            return None
        # The queue itself waits out a Retry-After block; backoff covers the rest.
        base = self._config.pool.backoff_base_s
        return base * 2 ** (failures - 1) * self._rng.uniform(0.5, 1.5)

    @staticmethod
    def _final_error(model: str, err: ProviderError, failures: int) -> ProviderError:
        if err.streamed or not err.retryable or failures == 1:
            return err
        return ProviderError(
            f"model {model!r}: {failures} attempts failed; last: {err}",
            retryable=err.retryable,
            retry_after_s=err.retry_after_s,
            streamed=err.streamed,
            status=err.status,
        )

    # ----------------------------------------------------------------- the queue

    async def _acquire(
        self,
        model: str,
        priority: int,
        affinity: str | None,
        exclude: frozenset[str],
        seq: int,
    ) -> _Slot:
        """Wait for a slot on a server for ``model`` in fair queue order."""
        if self._closed:
            raise ProviderError("the model pool is shut down")
        cooling = self._cooling_error(model, self._clock())
        if cooling is not None:
            raise cooling
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Slot] = loop.create_future()
        w = _Waiter(
            priority=priority,
            seq=seq,
            model=model,
            affinity=affinity,
            exclude=exclude,
            fut=fut,
            deadline=self._clock() + self._affinity_wait_s,
        )
        self._enqueue(w)
        timer = None
        if affinity is not None and affinity in self._affinity:
            timer = loop.call_later(self._affinity_wait_s, self._dispatch)
        self._dispatch()
        try:
            return await fut
        except asyncio.CancelledError:
            # Granted a slot but cancelled before it could run: give the slot back now.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not fut.done():
                fut.cancel()
            self._remove(w)

    def _enqueue(self, w: _Waiter) -> None:
        key = (w.priority, w.seq)
        i = len(self._waiters)
        while i > 0 and (self._waiters[i - 1].priority, self._waiters[i - 1].seq) > key:
            i -= 1
        self._waiters.insert(i, w)

    def _remove(self, w: _Waiter) -> None:
        try:
            self._waiters.remove(w)
        except ValueError:
            pass  # already taken off by _dispatch when it was given a slot

    def _release(self, slot: _Slot) -> float:
        """Give a slot back; returns its share of the server's busy seconds."""
        if slot.released:
            return 0.0
        slot.released = True
        server = slot.server
        server.in_flight -= 1
        busy = server.ledger.end(slot.token)
        self._dispatch()
        return busy

    def _dispatch(self) -> None:
        """Place waiting calls on free slots in queue order; preempt for better ones."""
        if not self._waiters:
            return
        now = self._clock()
        free = sum(max(0, s.capacity - s.in_flight) for s in self._servers)
        still: list[_Waiter] = []
        for w in self._waiters:
            if w.fut.done():
                continue
            if free == 0:  # nothing can be placed; keep the rest in order as they are
                cooling = self._cooling_error(w.model, now)
                if cooling is not None:
                    w.fut.set_exception(cooling)
                    continue
                still.append(w)
                continue
            server = self._pick(w, now)
            if server is None:
                cooling = self._cooling_error(w.model, now)
                if cooling is not None:
                    w.fut.set_exception(cooling)
                    continue
                still.append(w)
                continue
            server.in_flight += 1
            free -= 1
            w.fut.set_result(_Slot(server, server.ledger.begin()))
        self._waiters = still
        # Preempted calls still being torn down will free slots soon: only ask for more
        # preemptions than are already on their way.
        runs = [r for s in self._servers for r in s.running]
        worst = max((r.priority for r in runs), default=None)
        pending = sum(1 for r in runs if r.abort_reason == "preempted")
        for w in still:
            if worst is None or w.priority >= worst:
                break  # the queue is sorted: nobody behind can preempt either
            pending = self._preempt_for(w, now, pending)

    def _usable(self, w: _Waiter, now: float) -> tuple[list[_Server], list[_Server]]:
        """(good, usable) servers for a waiter: good ones if any, else any not blocked."""
        servers = self._by_model.get(w.model, [])
        cands = [s for s in servers if s.name not in w.exclude] or servers
        good = [s for s in cands if s.health.good(now)]
        usable = good or [s for s in cands if not s.health.blocked(now)]
        return good, usable

    def _pick(self, w: _Waiter, now: float) -> _Server | None:
        good, usable = self._usable(w, now)
        if not usable:
            return None
        bound = self._affinity.get(w.affinity) if w.affinity is not None else None
        if bound is not None and bound in good:
            if bound.in_flight < bound.capacity:
                self._affinity.move_to_end(w.affinity)  # type: ignore[arg-type]
                return bound
            if now < w.deadline:
                return None  # wait briefly for the server that has our prefix cached
        free = [s for s in usable if s.in_flight < s.capacity]
        if not free:
            return None
        pick = self._chooser.choose(w.model, free)
        if w.affinity is not None and (bound is None or bound not in good):
            self._affinity[w.affinity] = pick
            self._affinity.move_to_end(w.affinity)
            while len(self._affinity) > MAX_AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return pick

    def _preempt_for(self, w: _Waiter, now: float, pending: int) -> int:
        """Abort one worse-priority running call for ``w`` unless one is already pending.
        Returns the pending count left for the waiters behind ``w``."""
        _good, usable = self._usable(w, now)
        victims = [
            r
            for s in usable
            for r in s.running
            if r.priority > w.priority and r.abort_reason is None and not r.caller_saw_text
        ]
        if not victims:
            return pending
        if pending > 0:
            return pending - 1
        victim = max(victims, key=lambda r: r.priority)
        log.debug("preempting a priority-%d call for priority %d", victim.priority, w.priority)
        victim.abort("preempted")
        return 0

    def _wake_after(self, delay: float) -> None:
        """Re-run dispatch when a cooldown or block ends (it may free a server)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._dispatch()

        handle = loop.call_later(delay + 0.001, fire)
        self._timers.add(handle)

    def _on_health_change(self, name: str, healthy: bool) -> None:
        # Up: waiting calls may go there.  Down: affinity calls waiting for it move on.
        self._dispatch()
