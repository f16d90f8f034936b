"""How the pool picks one server among those that can take a call now.

Every strategy receives only candidates that serve the model, are usable (healthy and
not cooling down, unless none is) and have a free slot; it only decides the order.  So
no strategy can overload a server or pick a dead one; they differ in what they prefer:

* ``round_robin``: the next server in config order after the last one chosen for this
  model.
* ``least_loaded``: the lowest ``in_flight / capacity``.
* ``latency``: the lowest EWMA time to first token (unmeasured servers first, so that
  each gets measured), then the least loaded.
* ``adaptive`` (default): the lowest priority tier (local before cloud), then the least
  loaded, then the lowest latency, then the lowest recent error rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from rlmd.config import Strategy


class Candidate(Protocol):
    """The live state a strategy looks at."""

    @property
    def name(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def tier(self) -> int: ...
    @property
    def order(self) -> int: ...  # position in the config, for stable ties
    @property
    def ewma_ttft_s(self) -> float | None: ...
    @property
    def error_rate(self) -> float: ...


C = TypeVar("C", bound=Candidate)


def load(c: Candidate) -> float:
    """Fraction of the server's slots in use."""
    return c.in_flight / c.capacity


def _latency(c: Candidate) -> float:
    # Unmeasured servers sort first so that each one gets a measurement.
    return -1.0 if c.ewma_ttft_s is None else c.ewma_ttft_s


class Chooser:
    """Applies one strategy; keeps the round-robin position per model."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy: Strategy = strategy
        self._rr_last: dict[str, int] = {}

    def choose(self, model: str, free: Sequence[C]) -> C:
        """Pick one of ``free`` (non-empty) for a call to ``model``."""
        if not free:
            raise ValueError("choose() needs at least one candidate")
        match self.strategy:
            case "round_robin":
                last = self._rr_last.get(model, -1)
                after = [c for c in free if c.order > last]
                pick = min(after or free, key=lambda c: c.order)
                self._rr_last[model] = pick.order
                return pick
            case "least_loaded":
                return min(free, key=lambda c: (load(c), c.order))
            case "latency":
                return min(free, key=lambda c: (_latency(c), load(c), c.order))
            case _:
                return min(
                    free,
                    key=lambda c: (c.tier, load(c), _latency(c), c.error_rate, c.order),
                )
