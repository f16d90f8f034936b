"""Live health of one provider: probe result, error window, cooldown, rate-limit block.

Three separate signals, because they mean different things:

* ``healthy``: the last background probe (``Provider.health()``) answered.  Only probes
  change it, so one failed call cannot take a server out for a whole probe interval.
* cooldown: a call failed (connect error, timeout, 5xx).  The server is avoided while
  another one can serve, but still used when it is the only one (soft).
* blocked: the server said 429 with ``Retry-After``; nothing is sent to it before then
  (hard), even if it is the only server.  The block is capped (``[pool] max_cooldown_s``)
  so that a ``Retry-After: 3600`` cannot take a lone server out for an hour, and it keeps
  its reason ("HTTP 429 Retry-After 3600s") for status and errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.3


def ewma(old: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    """Exponentially weighted moving average; the first sample starts it."""
    return sample if old is None else old + alpha * (sample - old)


class Health:
    """Health signals of one provider (see the module docstring)."""

    def __init__(
        self, *, error_window: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.healthy = True
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._window: deque[bool] = deque(maxlen=max(1, error_window))
        self.cooldown_until = 0.0
        self.blocked_until = 0.0
        self.block_reason = ""  # why the current block (or the last one) was set
        self.ewma_ttft_s: float | None = None
        self.ewma_tokens_per_s: float | None = None

    @property
    def error_rate(self) -> float:
        """Fraction of failed calls among the last ``error_window`` calls."""
        return sum(self._window) / len(self._window) if self._window else 0.0

    def cooling(self, now: float | None = None) -> bool:
        return (self._clock() if now is None else now) < self.cooldown_until

    def blocked(self, now: float | None = None) -> bool:
        return (self._clock() if now is None else now) < self.blocked_until

    def cooldown_remaining(self) -> float:
        now = self._clock()
        return max(0.0, self.cooldown_until - now, self.blocked_until - now)

    def block_remaining(self, now: float | None = None) -> float:
        """Seconds until the Retry-After block ends (0 when not blocked)."""
        return max(0.0, self.blocked_until - (self._clock() if now is None else now))

    def state(self, now: float | None = None) -> str:
        """``down`` (probe failed), ``rate_limited`` (blocked), ``cooling`` (recent
        errors: avoided while another server can serve) or ``ok``."""
        now = self._clock() if now is None else now
        if not self.healthy:
            return "down"
        if self.blocked(now):
            return "rate_limited"
        if self.cooling(now):
            return "cooling"
        return "ok"

    def good(self, now: float) -> bool:
        """Preferred for new calls: probed healthy, not cooling down, not blocked."""
        return self.healthy and not self.cooling(now) and not self.blocked(now)

    def record_success(self, ttft_s: float, tokens_out: int, gen_s: float) -> None:
        self._window.append(False)
        # A success ends a cooldown early: the server evidently works again.
        self.cooldown_until = 0.0
        if ttft_s > 0:
            self.ewma_ttft_s = ewma(self.ewma_ttft_s, ttft_s)
        if tokens_out > 0 and gen_s > 0:
            self.ewma_tokens_per_s = ewma(self.ewma_tokens_per_s, tokens_out / gen_s)

    def record_error(
        self,
        *,
        cooldown: bool,
        retry_after_s: float | None = None,
        max_block_s: float = float("inf"),
        reason: str = "",
    ) -> None:
        """Count a failed call; ``retry_after_s`` blocks the server for that long, but
        never more than ``max_block_s`` from now (a longer block only ever shrinks)."""
        self._window.append(True)
        now = self._clock()
        if cooldown:
            self.cooldown_until = max(self.cooldown_until, now + min(self.cooldown_s, max_block_s))
        if retry_after_s is not None and retry_after_s > 0:
            until = now + min(retry_after_s, max_block_s)
            if until >= self.blocked_until:
                self.block_reason = reason
            self.blocked_until = min(max(self.blocked_until, until), now + max_block_s)


class HealthProbe:
    """One provider as the health checker sees it."""

    def __init__(
        self, name: str, check: Callable[[], Awaitable[bool]], health: Health, timeout_s: float
    ) -> None:
        self.name = name
        self.check = check
        self.health = health
        self.timeout_s = timeout_s


async def probe_once(probe: HealthProbe) -> bool:
    """Run one probe; a timeout or any exception counts as down."""
    try:
        async with asyncio.timeout(probe.timeout_s):
            ok = bool(await probe.check())
    except Exception as exc:  # a probe must never take the checker down
        log.debug("health probe of %s failed: %r", probe.name, exc)
        ok = False
    return ok


async def check_all(probes: Sequence[HealthProbe], on_change: Callable[[str, bool], None]) -> None:
    """HealthProbe every provider at once and record the results.

    ``on_change(name, healthy)`` is called when a provider goes down or comes back up
    (the pool wakes waiting calls when one comes back).
    """
    results = await asyncio.gather(*(probe_once(p) for p in probes))
    for probe, ok in zip(probes, results, strict=True):
        if ok != probe.health.healthy:
            probe.health.healthy = ok
            log.info("provider %s is %s", probe.name, "up" if ok else "down")
            on_change(probe.name, ok)


async def health_loop(
    probes: Sequence[HealthProbe], interval_s: float, on_change: Callable[[str, bool], None]
) -> None:
    """HealthProbe all providers now and then every ``interval_s`` seconds, until cancelled."""
    while True:
        await check_all(probes, on_change)
        await asyncio.sleep(interval_s)
