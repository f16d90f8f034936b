"""Hostile model servers against a real daemon: a newline flood, a long Retry-After, and
memory over many queries with the cache on and off.

Each case starts ``python -m rlmd`` on a temp socket and state dir, with one provider
pointing at a scripted loopback server in this process, and talks to it over the socket:

1. **Newline flood**: the server answers 200 and streams ``--flood-mib`` MiB with no
   ``\\n``.  The daemon's RSS before the query and its peak (``VmHWM``) after it, and the
   error the query got.
2. **Retry-After: 3600** on the only provider: how long the first query and the next one
   take to fail, what they say, and what ``pool/status`` shows between them (queries have
   a 20 s timeout; a query that "hangs" ends there).
3. **Memory under load**: ``--queries`` queries, each on its own inline text (a new
   context version each time: what the semantic tier keys on), with the cache on and off
   (and, for this tree, on with its in-memory parts at their smallest bounds); RSS after a
   warm-up and at the end, in KB per query, split into heap and mapped files.

``--compare-tree DIR`` runs the same cases side by side against another checkout of the
project (``git archive <commit> | tar -x -C DIR``): the daemon is then started with
``PYTHONPATH=DIR``, so the "before" and "after" rows come from one run on one machine.

Run: ``python bench/bench_provider_faults.py [--quick] [--compare-tree DIR]
[--cases flood,retry,memory] [--doc docs/benchmarks.md]``; ``run(quick)`` returns the
Markdown (the perf suite).  The memory case alone, recorded in its own section:
``--cases memory --queries 300 --doc docs/benchmarks.md --doc-section provider-faults-memory``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmd.client import Client, RpcError
from rlmd.launch import daemon_command, spawn_daemon, wait_until_answering
from rlmd.proc import status_kib
from rlmd.testing.scripted_server import ChatCall, Rule, ScriptedReply, ScriptedServer

REPO = Path(__file__).resolve().parents[1]
MODEL = "m"


class _Daemon:
    def __init__(self, root: Path, config: str, tree: Path | None) -> None:
        self.sock = root / "s.sock"
        cfg = root / "config.toml"
        cfg.write_text(config)
        env = {**os.environ}
        env.pop("RLMD_SOCKET", None)
        env.pop("RLMD_CONFIG", None)
        env["PYTHONPATH"] = str(tree or REPO)
        self.proc = spawn_daemon(
            daemon_command(self.sock, state_dir=root / "state", config=cfg),
            env=env,
            cwd=tree or REPO,
        )
        wait_until_answering(self.proc, self.sock, timeout_s=60)

    def client(self, timeout: float = 120) -> Client:
        return Client(self.sock, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _config(url: str, extra: str = "") -> str:
    return f"""
[[providers]]
name = "lone"
kind = "ollama"
base_url = "{url}"
models = ["{MODEL}"]
capacity = 4

[models]
root = "{MODEL}"
sub = "{MODEL}"

[limits]
timeout_s = 20
{extra}"""


def _query(d: _Daemon, params: dict) -> tuple[float, str]:
    t0 = time.monotonic()
    try:
        with d.client() as c:
            c.call("query/run", params)
        what = "answered"
    except RpcError as exc:
        what = exc.message
    return time.monotonic() - t0, what


def _short(msg: str, n: int = 220) -> str:
    msg = msg.replace("|", "/").replace("\n", " ")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def flood(tmp: Path, tree: Path | None, mib: int) -> list[str]:
    rules = [Rule(reply=ScriptedReply(flood_bytes=mib * 1024 * 1024))]
    with ScriptedServer(rules, models=[MODEL]) as srv:
        d = _Daemon(tmp, _config(srv.url, "[cache]\nenabled = false\n"), tree)
        try:
            before = status_kib(d.proc.pid)
            took, what = _query(d, {"query": "hello"})
            peak = status_kib(d.proc.pid, "VmHWM")
            after = status_kib(d.proc.pid)
        finally:
            d.stop()
    return [
        f"| {before / 1024:.0f} | {peak / 1024:.0f} | {after / 1024:.0f} | {took:.1f} "
        f"| {_short(what)} |"
    ]


def retry_after(tmp: Path, tree: Path | None) -> list[str]:
    rules = [
        Rule(reply=ScriptedReply(status=429, retry_after=3600, error="slow down"), times=1),
        Rule(reply=ScriptedReply(text="FINAL(ok)")),
    ]
    with ScriptedServer(rules, models=[MODEL]) as srv:
        d = _Daemon(tmp, _config(srv.url, "[cache]\nenabled = false\n"), tree)
        try:
            t1, first = _query(d, {"query": "one"})
            with d.client() as c:
                st = c.call("pool/status")
            p = st[0] if isinstance(st, list) else st["providers"][0]
            t2, second = _query(d, {"query": "two"})
        finally:
            d.stop()
    status = (
        f"healthy={p.get('healthy')}, cooldown_s={p.get('cooldown_s', 0):.0f}, "
        f"state={p.get('state', '-')}"
    )
    return [
        f"| first | {t1:.2f} | {_short(first)} |",
        f"| status | | {status} |",
        f"| next | {t2:.2f} | {_short(second)} |",
    ]


def _mem_kb(pid: int) -> tuple[int, int, int]:
    """VmRSS, RssAnon (heap: what a leak grows) and RssFile (mapped files), in KB."""
    return status_kib(pid), status_kib(pid, "RssAnon"), status_kib(pid, "RssFile")


def soak(tmp: Path, tree: Path | None, n: int, cache: bool, bounds: str = "") -> list[str]:
    """``n`` queries, each on a new inline text; ``bounds``: extra ``[cache]`` lines."""

    def answer(call: ChatCall) -> ScriptedReply:
        return ScriptedReply(text="FINAL(ok)")

    extra = f"[cache]\n{bounds}" if cache else "[cache]\nenabled = false\n"
    with ScriptedServer(responder=answer, models=[MODEL]) as srv:
        d = _Daemon(tmp, _config(srv.url, extra), tree)
        try:
            warm = max(20, n // 10)
            with d.client() as c:
                for i in range(n):
                    if i == warm:
                        start = _mem_kb(d.proc.pid)
                    text = f"document {i}: " + "lorem ipsum dolor sit amet " * 20
                    c.call("query/run", {"query": f"what does document {i} say?", "text": text})
            end = _mem_kb(d.proc.pid)
        finally:
            d.stop()
    per = [(e - s) / (n - warm) for s, e in zip(start, end, strict=True)]
    label = "on" if cache else "off"
    if bounds:
        label += " (" + ", ".join(b.replace(" ", "") for b in bounds.splitlines()) + ")"
    return [
        f"| {label} | {n} | {start[0] / 1024:.0f} | {end[0] / 1024:.0f} "
        f"| {per[0]:.1f} | {per[1]:.1f} | {per[2]:.1f} |"
    ]


CASES = ("flood", "retry", "memory")
#: The "bounded" memory row: both of the cache's in-memory parts at their smallest.
SMALL_BOUNDS = "semantic_index_bytes = 65536\ndb_cache_bytes = 262144\n"


def run(
    quick: bool = False,
    compare_tree: Path | None = None,
    flood_mib: int = 0,
    queries: int = 0,
    cases: tuple[str, ...] = CASES,
) -> str:
    queries = queries or (300 if quick else 2000)
    flood_mib = flood_mib or (128 if quick else 512)
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if compare_tree is not None:
        trees.insert(0, (f"before ({compare_tree.name})", compare_tree))
    out = ["# Provider faults against the daemon", ""]
    with tempfile.TemporaryDirectory(prefix="rlmd-bf-", dir="/tmp") as d:
        tmp = Path(d)
        k = 0

        def fresh() -> Path:
            nonlocal k
            k += 1
            p = tmp / f"r{k}"
            p.mkdir()
            return p

        if "flood" in cases:
            out += [
                "## Newline flood",
                "",
                f"The only provider answers 200 and streams {flood_mib} MiB with no newline.",
                "",
            ]
            for label, tree in trees:
                out += [
                    f"{label}:",
                    "",
                    "| RSS before MB | peak MB | after MB | query s | error |",
                    "|---|---|---|---|---|",
                ]
                out += [*flood(fresh(), tree, flood_mib), ""]
        if "retry" in cases:
            out += [
                "## Retry-After: 3600 on the only provider",
                "",
                "Queries time out after 20 s (`[limits] timeout_s`).",
                "",
            ]
            for label, tree in trees:
                out += [f"{label}:", "", "| query | s | what it said |", "|---|---|---|"]
                out += [*retry_after(fresh(), tree), ""]
        if "memory" in cases:
            out += [
                "## Memory under load",
                "",
                f"{queries} queries, each on a new inline text; RSS after a warm-up "
                "(a tenth of the queries) and at the end; the growth per query split into "
                "the heap (RssAnon) and mapped files (RssFile).",
                "",
            ]
            for label, tree in trees:
                out += [
                    f"{label}:",
                    "",
                    "| cache | queries | RSS after warm-up MB | at the end MB | KB per query "
                    "| heap KB/q | files KB/q |",
                    "|---|---|---|---|---|---|---|",
                ]
                for cache in (True, False):
                    out += soak(fresh(), tree, queries, cache)
                if tree is None:  # the bounds at work: the smallest stop the growth
                    out += soak(fresh(), tree, queries, True, SMALL_BOUNDS)
                out += [""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer queries, a smaller flood")
    ap.add_argument("--compare-tree", type=Path, help="another checkout to run side by side")
    ap.add_argument("--flood-mib", type=int, default=0, help="MiB the flooding server sends")
    ap.add_argument("--queries", type=int, default=0, help="queries per memory run")
    ap.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}"
    )
    ap.add_argument("--doc", type=Path, help="write the report into this file's section")
    ap.add_argument("--doc-section", default="provider-faults")
    args = ap.parse_args()
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    md = run(args.quick, args.compare_tree, args.flood_mib, args.queries, cases)
    print(md)
    if args.doc is not None:
        from rlmd.bench.doc import update_doc

        cmd = "python bench/bench_provider_faults.py " + " ".join(sys.argv[1:])
        update_doc(args.doc, args.doc_section, md, cmd.strip())


if __name__ == "__main__":
    main()
