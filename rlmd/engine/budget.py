"""One query's limits and what it has spent: the only place budget errors are built.

``resolve_budget`` lowers the config's ``[limits]`` by the query's options (never raises
them).  ``Meter`` counts iterations, sub-calls, tokens, cost and the sub-call prompt bytes
in flight, shared by a query and its nested loops, and builds the typed errors that end a
query when a budget is gone (``max_cost`` and ``max_sub_calls`` each in one place).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rlmd.config import Config
from rlmd.engine.types import EngineError, QueryOptions, Tokens
from rlmd.providers.base import ChatResult

PARTIAL_CHARS = 4000  # the longest partial answer an error carries


@dataclass(frozen=True)
class Budget:
    """The effective limits of one query (config ``[limits]`` lowered by its options)."""

    max_iterations: int
    max_depth: int
    max_sub_calls: int
    timeout_s: float
    max_cost: float | None
    output_chars: int
    cell_timeout_s: float
    pipeline: bool
    output_chars_explicit: bool = False  # set by the query: no per-model default applies
    answer_chars: int = 100_000
    sub_prompt_chars: int = 0  # 0: the sub-model's window decides
    sub_bytes_in_flight: int = 64 * 1024 * 1024


class SubCallRefused(Exception):
    """Raised into the model's code (its REPL call fails with this message)."""


def resolve_budget(config: Config, opts: QueryOptions) -> Budget:
    """The query's limits: options may lower ``[limits]``, never raise them."""
    lim = config.limits

    def lowered(name: str, value: float | None, ceiling: float | None, minimum: float) -> Any:
        if value is None:
            return ceiling
        if value < minimum:
            raise EngineError("bad_params", f"options.{name} must be at least {minimum:g}")
        if ceiling is not None and value > ceiling:
            raise EngineError(
                "bad_params",
                f"options.{name} = {value:g} is above the daemon's limit {ceiling:g}; "
                f"raise limits.{name} in the config to allow it",
            )
        return value

    output_chars = lim.output_chars if opts.output_chars is None else opts.output_chars
    if output_chars < 200:
        raise EngineError("bad_params", "options.output_chars must be at least 200")
    return Budget(
        max_iterations=int(lowered("max_iterations", opts.max_iterations, lim.max_iterations, 1)),
        max_depth=int(lowered("max_depth", opts.max_depth, lim.max_depth, 1)),
        max_sub_calls=int(lowered("max_sub_calls", opts.max_sub_calls, lim.max_sub_calls, 0)),
        timeout_s=float(lowered("timeout_s", opts.timeout_s, lim.timeout_s, 0.001)),
        max_cost=lowered("max_cost", opts.max_cost, lim.max_cost, 0.0),
        output_chars=output_chars,
        cell_timeout_s=lim.cell_timeout_s,
        pipeline=True if opts.pipeline is None else opts.pipeline,
        output_chars_explicit=opts.output_chars is not None,
        answer_chars=lim.answer_chars,
        sub_prompt_chars=lim.sub_prompt_chars,
        sub_bytes_in_flight=lim.sub_bytes_in_flight_mb * 1024 * 1024,
    )


@dataclass
class Meter:
    """What a query (with its nested loops) has used, checked against its ``Budget``."""

    budget: Budget
    t0: float = field(default_factory=time.monotonic)
    iterations: int = 0
    sub_calls: int = 0
    cached_calls: int = 0
    root_tokens: Tokens = field(default_factory=Tokens)
    sub_tokens: Tokens = field(default_factory=Tokens)
    cost: float = 0.0
    bytes_in_flight: int = 0
    # The best answer so far (the model's last prose, else the last output it saw).
    partial: str = ""
    last_output: str = ""
    # Set by a sub-call that ran out of budget; the loop raises it after the block.
    error: EngineError | None = None

    def tokens(self) -> Tokens:
        return Tokens(
            input=self.root_tokens.input + self.sub_tokens.input,
            output=self.root_tokens.output + self.sub_tokens.output,
        )

    def elapsed_s(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def best_partial(self) -> str:
        text = self.partial.strip() or self.last_output.strip()
        return text if len(text) <= PARTIAL_CHARS else text[:PARTIAL_CHARS] + " …"

    def progress(self) -> dict[str, Any]:
        """The ``progress`` event body."""
        t = self.tokens()
        return {
            "kind": "progress",
            "iteration": self.iterations,
            "sub_calls": self.sub_calls,
            "tokens": {"input": t.input, "output": t.output},
            "cost": round(self.cost, 6),
            "elapsed_s": self.elapsed_s(),
        }

    # -- spending ---------------------------------------------------------------------

    def charge_root(self, r: ChatResult) -> None:
        self.root_tokens.input += r.usage.input
        self.root_tokens.output += r.usage.output
        self.cost += r.cost

    def charge_sub(self, r: ChatResult) -> None:
        self.sub_tokens.input += r.usage.input
        self.sub_tokens.output += r.usage.output
        self.cost += r.cost
        if r.cached:
            self.cached_calls += 1
        if self.error is None:
            self.error = self.cost_error()

    # -- the errors ---------------------------------------------------------------------

    def cost_error(self) -> EngineError | None:
        """The ``max_cost`` error when spending passed the budget, else None."""
        mc = self.budget.max_cost
        if mc is None or self.cost <= mc:
            return None
        return EngineError(
            "max_cost",
            f"the query cost ${self.cost:.4f}, above its budget of ${mc:.4f} "
            "(options.max_cost / limits.max_cost)",
            self.best_partial(),
        )

    def check_cost(self) -> None:
        """Raise the ``max_cost`` error if spending passed the budget."""
        err = self.cost_error()
        if err is not None:
            raise err

    def take_sub_calls(self, n: int) -> None:
        """Count ``n`` sub-calls against the budget, or refuse them (and end the query
        after the running block)."""
        if self.error is None and self.sub_calls + n > self.budget.max_sub_calls:
            self.error = EngineError(
                "max_sub_calls",
                f"the code asked for {self.sub_calls + n} sub-calls, above the budget of "
                f"{self.budget.max_sub_calls} (options.max_sub_calls / limits.max_sub_calls)",
                self.best_partial(),
            )
        if self.error is None:
            self.error = self.cost_error()
        if self.error is not None:
            raise SubCallRefused(self.error.message)
        self.sub_calls += n

    def timeout_error(self) -> EngineError:
        return EngineError(
            "timeout",
            f"the query ran out of time after {self.budget.timeout_s:g} s "
            "(options.timeout_s / limits.timeout_s)",
            self.best_partial(),
        )

    def iterations_error(self, stuck: bool = False) -> EngineError:
        """No answer by the last-chance call: at max_iterations, or ``stuck`` sending the
        same code again (steer.stuck)."""
        why = (
            f"no answer after {self.iterations} iterations: the model kept sending the same code"
            if stuck
            else f"no answer after {self.budget.max_iterations} iterations "
            "(options.max_iterations / limits.max_iterations)"
        )
        return EngineError(
            "max_iterations", f"{why}; the partial answer is the model's last words",
            self.best_partial(),
        )  # fmt: skip

    # -- prompt bytes ---------------------------------------------------------------------

    def reserve_bytes(self, n: int) -> None:
        """Hold ``n`` bytes of sub-call prompts in flight, or refuse (Broken 5: eight
        threads each sending 200 MiB took the daemon to 1.86 GB)."""
        cap = self.budget.sub_bytes_in_flight
        if self.bytes_in_flight + n > cap:
            raise SubCallRefused(
                f"sub-call prompts of {self.bytes_in_flight + n:,} characters would be in "
                f"flight at once, over the query's limit of {cap:,} "
                "(limits.sub_bytes_in_flight_mb); send fewer or smaller prompts at a time"
            )
        self.bytes_in_flight += n

    def release_bytes(self, n: int) -> None:
        self.bytes_in_flight = max(0, self.bytes_in_flight - n)
