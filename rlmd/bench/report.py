"""Summaries of benchmark results: a Markdown report (the paper's Table 1) and a plot.

The plot (accuracy against context length per method, like the paper's Figure 1) needs
matplotlib (``pip install 'rlmd[bench]'``); without it the report says so and the rest is
written anyway.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from rlmd.bench import format_length

METHOD_ORDER = ("base", "auto", "rlm", "rlm-nosub")


class Result(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One task run by one method: the line appended to ``results.jsonl``."""

    task_id: str
    suite: str
    method: str
    length_tokens: int
    score: float
    answer: str | None = None
    gold: str | int | list[str] | None = None
    scorer: str = ""
    task_kind: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    sub_calls: int = 0
    iterations: int = 0
    elapsed_s: float = 0.0  # as the daemon measured the query
    wall_s: float = 0.0  # as the runner measured it, upload excluded
    finish: str = ""
    error: str | None = None
    error_kind: str | None = None
    root_model: str = ""
    sub_model: str = ""
    seed: int = 0
    finished_at: float = 0.0


class Stat(msgspec.Struct):
    """Mean and median of one quantity."""

    mean: float
    median: float


class SummaryRow(msgspec.Struct, kw_only=True):
    """One (suite, method, context length) cell of the results."""

    suite: str
    method: str
    length_tokens: int
    n: int
    errors: int
    score: Stat
    tokens_in: Stat
    tokens_out: Stat
    cost: Stat
    sub_calls: Stat
    wall_s: Stat
    iterations: Stat = msgspec.field(default_factory=lambda: Stat(mean=0.0, median=0.0))


def _stat(values: Sequence[float]) -> Stat:
    if not values:
        return Stat(mean=0.0, median=0.0)
    return Stat(mean=statistics.fmean(values), median=statistics.median(values))


def _method_key(m: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


def summarize(results: Iterable[Result]) -> list[SummaryRow]:
    """Group results by suite, method and length; errors count as score 0."""
    groups: dict[tuple[str, str, int], list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.suite, r.method, r.length_tokens)].append(r)
    rows = []
    for (suite, method, length), rs in groups.items():
        rows.append(
            SummaryRow(
                suite=suite,
                method=method,
                length_tokens=length,
                n=len(rs),
                errors=sum(1 for r in rs if r.error),
                score=_stat([r.score for r in rs]),
                tokens_in=_stat([r.tokens_in for r in rs]),
                tokens_out=_stat([r.tokens_out for r in rs]),
                cost=_stat([r.cost for r in rs]),
                sub_calls=_stat([r.sub_calls for r in rs]),
                wall_s=_stat([r.wall_s for r in rs]),
                iterations=_stat([r.iterations for r in rs]),
            )
        )
    rows.sort(key=lambda r: (r.suite, _method_key(r.method), r.length_tokens))
    return rows


class KindRow(msgspec.Struct, kw_only=True):
    """Mean score of one method on one kind of question (over all lengths)."""

    suite: str
    method: str
    kind: str
    n: int
    score: float


def summarize_kinds(results: Iterable[Result]) -> list[KindRow]:
    """Mean score per (suite, method, question kind): which questions a method misses."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in results:
        if r.task_kind:
            groups[(r.suite, r.method, r.task_kind)].append(r.score)
    return [
        KindRow(suite=s, method=m, kind=k, n=len(v), score=statistics.fmean(v))
        for (s, m, k), v in sorted(groups.items())
    ]


def _score_name(suite: str) -> str:
    return "F1" if suite == "pairs" else "score"


def _fmt_tokens(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}"


def markdown(
    rows: list[SummaryRow],
    meta: dict[str, Any],
    notes: Sequence[str] = (),
    kinds: Sequence[KindRow] = (),
    results: Sequence[Result] = (),
) -> str:
    """The report: per suite, a score table (methods x lengths), a cost table and, when
    the suite has several kinds of question, the score per kind; with ``results``, one
    line per query (tokens, root turns, wall time, how it ended)."""
    out = ["# rlm bench results", ""]
    for key in ("command", "root_model", "sub_model", "python", "seed", "created"):
        if meta.get(key) not in (None, ""):
            out.append(f"- {key.replace('_', ' ')}: `{meta[key]}`")
    out.append("")
    for suite in sorted({r.suite for r in rows}):
        srows = [r for r in rows if r.suite == suite]
        lengths = sorted({r.length_tokens for r in srows})
        methods = sorted({r.method for r in srows}, key=_method_key)
        cell = {(r.method, r.length_tokens): r for r in srows}
        out += [f"## {suite}", "", f"Mean {_score_name(suite)} (n per cell) by context length:", ""]
        out.append("| method | " + " | ".join(format_length(n) for n in lengths) + " |")
        out.append("| --- |" + " ---: |" * len(lengths))
        for m in methods:
            cells = []
            for n in lengths:
                r = cell.get((m, n))
                if r is None:
                    cells.append("–")
                else:
                    err = f", {r.errors} err" if r.errors else ""
                    cells.append(f"{r.score.mean:.3f} ({r.n}{err})")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out += ["", "Per task, mean / median:", ""]
        out.append(
            "| method | length | tokens in | tokens out | cost ($) | sub-calls | root turns "
            "| wall (s) |"
        )
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in sorted(srows, key=lambda r: (_method_key(r.method), r.length_tokens)):
            out.append(
                f"| {r.method} | {format_length(r.length_tokens)} "
                f"| {_fmt_tokens(r.tokens_in.mean)} / {_fmt_tokens(r.tokens_in.median)} "
                f"| {_fmt_tokens(r.tokens_out.mean)} / {_fmt_tokens(r.tokens_out.median)} "
                f"| {r.cost.mean:.4f} / {r.cost.median:.4f} "
                f"| {r.sub_calls.mean:.1f} / {r.sub_calls.median:.1f} "
                f"| {r.iterations.mean:.1f} / {r.iterations.median:.1f} "
                f"| {r.wall_s.mean:.1f} / {r.wall_s.median:.1f} |"
            )
        out.append("")
        skinds = [k for k in kinds if k.suite == suite]
        names = sorted({k.kind for k in skinds})
        if len(names) > 1:
            by = {(k.method, k.kind): k for k in skinds}
            out += [f"Mean {_score_name(suite)} by kind of question (all lengths):", ""]
            out.append("| method | " + " | ".join(names) + " |")
            out.append("| --- |" + " ---: |" * len(names))
            for m in methods:
                cells = [
                    f"{by[(m, k)].score:.3f} ({by[(m, k)].n})" if (m, k) in by else "–"
                    for k in names
                ]
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
        sres = sorted(
            (r for r in results if r.suite == suite),
            key=lambda r: (r.length_tokens, r.task_id, _method_key(r.method)),
        )
        if sres:
            out += ["Per query:", ""]
            out.append(
                "| task | kind | method | score | tokens in | tokens out | root turns "
                "| wall (s) | end |"
            )
            out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
            for r in sres:
                end = f"error: {r.error_kind or 'error'}" if r.error else (r.finish or "")
                out.append(
                    f"| {r.task_id} | {r.task_kind} | {r.method} | {r.score:.2f} "
                    f"| {r.tokens_in} | {r.tokens_out} | {r.iterations} | {r.wall_s:.1f} "
                    f"| {end} |"
                )
            out.append("")
    for note in notes:
        out.append(f"> {note}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def plot(rows: list[SummaryRow], out_dir: Path) -> tuple[list[Path], str | None]:
    """One PNG per suite (score vs. context length per method); (files, note if skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "No plot: matplotlib is not installed (pip install 'rlmd[bench]')."
    files = []
    for suite in sorted({r.suite for r in rows}):
        srows = [r for r in rows if r.suite == suite]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for m in sorted({r.method for r in srows}, key=_method_key):
            pts = sorted((r.length_tokens, r.score.mean) for r in srows if r.method == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        lengths = sorted({r.length_tokens for r in srows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"mean {_score_name(suite)}")
        ax.set_title(f"{suite}: {_score_name(suite)} vs. context length")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"accuracy-{suite}.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    return files, None
