"""Token, cost and energy accounting per request and per provider.

Cloud providers cost money per token (``price_in_per_mtok`` / ``price_out_per_mtok``,
dollars per million tokens).  Local GPUs cost electricity: ``watts`` times the time the
server was busy, priced at ``energy.price_per_kwh``.

Busy time is counted once per server, not once per request: when two requests share a
GPU for one second the GPU was busy for one second, and each request is charged half of
it.  The ledger keeps a running "share integral" S(t) = ∫ dt / in_flight(t) over the time
the server is busy; a request's share of busy time is S(end) - S(start), and the shares
of all requests add up exactly to the server's busy time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from rlmd.providers.base import Usage

SECONDS_PER_HOUR = 3600.0


class Charge(msgspec.Struct, frozen=True):
    """What one request cost: tokens, dollars (API + energy) and energy."""

    tokens_in: int
    tokens_out: int
    busy_s: float
    energy_wh: float
    cost: float


class ProviderTotals(msgspec.Struct):
    """Running totals for one provider, shown by ``pool/status``."""

    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    energy_wh: float = 0.0
    busy_s: float = 0.0


def token_cost(usage: Usage, price_in_per_mtok: float, price_out_per_mtok: float) -> float:
    """Dollars for ``usage`` at per-million-token prices."""
    return (usage.input * price_in_per_mtok + usage.output * price_out_per_mtok) / 1_000_000


def energy_wh(watts: float, busy_s: float) -> float:
    """Watt-hours drawn by a ``watts`` device busy for ``busy_s`` seconds."""
    return watts * busy_s / SECONDS_PER_HOUR


def energy_cost(wh: float, price_per_kwh: float) -> float:
    """Dollars for ``wh`` watt-hours at ``price_per_kwh``."""
    return wh / 1000.0 * price_per_kwh


class Ledger:
    """Accounting for one provider: busy-time sharing and running totals.

    Call :meth:`begin` when a request takes a slot and :meth:`end` when it gives it
    back (whatever the outcome); :meth:`charge` turns a finished request's share of busy
    time and its usage into a :class:`Charge` and adds it to the totals.
    """

    def __init__(
        self,
        *,
        price_in_per_mtok: float,
        price_out_per_mtok: float,
        watts: float,
        price_per_kwh: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.price_in_per_mtok = price_in_per_mtok
        self.price_out_per_mtok = price_out_per_mtok
        self.watts = watts
        self.price_per_kwh = price_per_kwh
        self.totals = ProviderTotals()
        self._clock = clock
        self._in_flight = 0
        self._last = clock()
        self._share = 0.0  # S(t): seconds of busy time per request, integrated

    def _advance(self) -> None:
        now = self._clock()
        if self._in_flight > 0:
            dt = now - self._last
            self._share += dt / self._in_flight
            self.totals.busy_s += dt
        self._last = now

    def begin(self) -> float:
        """A request took a slot; returns the token to pass to :meth:`end`."""
        self._advance()
        self._in_flight += 1
        return self._share

    def end(self, token: float) -> float:
        """The request gave its slot back; returns its share of busy seconds."""
        self._advance()
        self._in_flight = max(0, self._in_flight - 1)
        return self._share - token

    def charge(self, usage: Usage, busy_s: float) -> Charge:
        """Price a finished request and add it to the totals."""
        wh = energy_wh(self.watts, busy_s)
        cost = token_cost(usage, self.price_in_per_mtok, self.price_out_per_mtok)
        cost += energy_cost(wh, self.price_per_kwh)
        t = self.totals
        t.tokens_in += usage.input
        t.tokens_out += usage.output
        t.cost += cost
        t.energy_wh += wh
        return Charge(
            tokens_in=usage.input, tokens_out=usage.output, busy_s=busy_s, energy_wh=wh, cost=cost
        )

    def charge_failed(self, busy_s: float) -> None:
        """A failed attempt still burned GPU time: count its energy, no tokens."""
        wh = energy_wh(self.watts, busy_s)
        self.totals.energy_wh += wh
        self.totals.cost += energy_cost(wh, self.price_per_kwh)
