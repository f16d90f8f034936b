"""Benchmark suites with known answers, and the ``rlm bench`` runner.

A suite turns ``(lengths, n, seed)`` into :class:`Task` objects, deterministically: the
same arguments give the same contexts, questions and gold answers on any machine (the
``codeqa`` suite reads the local Python's standard library, so it depends on the Python
version, which the runner records).  Lengths are in tokens, estimated as chars / 4.

Suites: ``sniah`` (needle in a haystack), ``oolong`` (aggregation over labelled TREC
questions), ``pairs`` (OOLONG-Pairs), ``codeqa`` (questions about the stdlib's code), and
from :mod:`rlmd.bench.facts`: ``needle`` (five depths), ``distractor`` (an outdated value
beside the current one), ``twohop``, ``absent`` (the answer is not in the text) and
``short`` (all four at <= 4k tokens).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from rlmd.bench.scoring import Gold

CHARS_PER_TOKEN = 4


class BenchError(ValueError):
    """Bad benchmark arguments or missing data; the message says what to do."""


class Task(msgspec.Struct, kw_only=True):
    """One question over one context, with its gold answer and the scorer to use.

    Tasks that share ``context_key`` share the same ``context`` text (one OOLONG window
    carries several questions), so the runner uploads it once.
    """

    id: str
    suite: str
    length_tokens: int
    context_key: str
    context: str
    question: str
    gold: Gold
    scorer: str
    meta: dict[str, Any] = {}

    def write_context(self, path: Path) -> Path:
        """Write the context to ``path`` (UTF-8) and return the path."""
        path.write_text(self.context, encoding="utf-8")
        return path

    def score(self, answer: str | None) -> float:
        """Score an answer with this task's scorer."""
        from rlmd.bench.scoring import score

        return score(self.scorer, answer, self.gold)


_UNITS = {"": 1, "k": 1024, "m": 1024**2}


def parse_lengths(spec: str) -> list[int]:
    """``"8k,64k,1m"`` -> token counts (binary units, as RULER and OOLONG use 2^k)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([km]?)", part)
        if not m:
            raise BenchError(
                f"bad context length {part!r}: write token counts like 8k, 64k, 1m or 32768"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
        if n < 1024:
            raise BenchError(f"context length {part!r} is below the minimum of 1k tokens")
        out.append(n)
    if not out:
        raise BenchError("no context lengths given: pass e.g. --lengths 8k,64k")
    return sorted(set(out))


def format_length(tokens: int) -> str:
    """Inverse of :func:`parse_lengths` for display: 65536 -> ``64k``."""
    if tokens % (1024**2) == 0:
        return f"{tokens // 1024**2}m"
    if tokens % 1024 == 0:
        return f"{tokens // 1024}k"
    return str(tokens)


SuiteFn = Callable[[list[int], int, int], Iterator[Task]]


SUITES = ("sniah", "oolong", "pairs", "codeqa", "needle", "distractor", "twohop", "absent", "short")
# Suites built by rlmd.bench.facts (one module, several suites).
FACT_SUITES = ("needle", "distractor", "twohop", "absent", "short")


def make_tasks(suite: str, lengths: list[int], n: int, seed: int = 0) -> Iterator[Task]:
    """Yield ``n`` tasks per length of ``suite``; contexts are built lazily, in order."""
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if n < 1:
        raise BenchError("--n must be at least 1")
    if suite in FACT_SUITES:
        from rlmd.bench.facts import tasks_for

        return tasks_for(suite, lengths, n, seed)
    module = importlib.import_module(f"rlmd.bench.{suite}")
    fn: SuiteFn = module.tasks
    return fn(lengths, n, seed)
