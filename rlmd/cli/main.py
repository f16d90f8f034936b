"""``rlm``: a thin command-line client of the daemon.

    rlm status
    rlm context put NAME PATH|--text TEXT|-   (file, directory, inline text or stdin)
    rlm context ls | peek NAME | search NAME PATTERN | rm NAME
    rlm query -q "Find all TODO items" -c ./your_project/
    rlm trace [JOB]
    rlm cache [stats|clear]
    rlm bench --suite sniah --lengths 8k,64k --n 10

If no daemon is listening, ``rlm`` starts one in the background and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..client import Client, RpcError
from ..launch import daemon_command, spawn_daemon, wait_until_answering
from ..paths import default_socket_path, default_state_dir


def _die(msg: str, code: int = 1) -> int:
    print(f"rlm: {msg}", file=sys.stderr)
    return code


def start_daemon(socket_path: Path, wait_s: float = 30.0) -> int:
    """Start ``rlmd`` in the background on ``socket_path``; return its pid once it answers."""
    log_dir = default_state_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "rlmd.log"
    with open(log_path, "ab") as log:
        proc = spawn_daemon(daemon_command(socket_path), stdout=log, stderr=log, detach=True)
    print(
        f"rlm: no daemon on {socket_path}; started rlmd (pid {proc.pid}, log {log_path})",
        file=sys.stderr,
    )
    wait_until_answering(proc, socket_path, timeout_s=wait_s, log_hint=f"see {log_path}")
    return proc.pid


def connect(args: argparse.Namespace) -> Client:
    path = Path(args.socket) if args.socket else default_socket_path()
    try:
        return Client(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if args.no_start:
            raise
        start_daemon(path)
        return Client(path)


# -- commands ----------------------------------------------------------------------------


def cmd_status(c: Client, args: argparse.Namespace) -> int:
    st = c.call("daemon/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(
        f"rlmd {st['version']}  pid {st['pid']}  up {st['uptime_s']:.0f}s  "
        f"contexts {st['contexts']}  jobs {st.get('jobs', 0)}"
    )
    print(f"socket {st['socket']}  state {st['state_dir']}")
    for d in st.get("damaged_contexts") or []:
        print(f"DAMAGED context {d['name']}: {d['damaged']}")
    if st.get("sandbox"):
        print("sandbox " + ", ".join(f"{k}={v}" for k, v in st["sandbox"].items()))
    if st.get("embedded"):
        print(f"embedded: {st['embedded']}")
    pool = c.call("pool/status")["providers"]
    if pool:
        print(
            f"{'provider':16} {'kind':9} {'health':7} {'load':7} {'ttft':>7} {'tok/s':>7} {'requests':>8} {'cost':>9}"
        )
        for p in pool:
            # EWMAs are null until the server has answered something.
            ttft = p.get("ewma_ttft_s")
            tps = p.get("ewma_tokens_per_s")
            load = f"{p['in_flight']}/{p['capacity']}"
            print(
                f"{p['name'][:16]:16} {p['kind']:9} {'up' if p['healthy'] else 'DOWN':7} "
                f"{load:7} {'-' if ttft is None else f'{ttft:.2f}':>7} "
                f"{'-' if tps is None else f'{tps:.1f}':>7} {p.get('requests', 0):8d} "
                f"${p.get('cost', 0):8.4f}"
            )
    return 0


def _fmt_size(n: int) -> str:
    for unit in ("", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def cmd_context(c: Client, args: argparse.Namespace) -> int:
    op = args.op
    if op == "put":
        params: dict[str, Any] = {"name": args.name, "append": args.append}
        if args.text is not None:
            params["text"] = args.text
        elif args.source == "-":
            params["text"] = sys.stdin.read()
        elif args.source:
            params["path"] = str(Path(args.source).expanduser().resolve())
            if args.include:
                params["include"] = args.include
            if args.exclude:
                params["exclude"] = args.exclude
        else:
            return _die("context put needs a PATH, '-' for stdin, or --text TEXT", 2)
        r = c.call("context/put", params)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            n = r.get("files") or 0
            extra = f", {n} file{'s' if n != 1 else ''}" if n else ""
            print(
                f"{r['name']}: {r['chars']} chars, {r['lines']} lines, ~{r['tokens_est']} tokens{extra}"
            )
            for s in r.get("skipped") or []:
                print(f"  skipped {s['path']}: {s['reason']}", file=sys.stderr)
        return 0
    if op == "ls":
        rows = c.call("context/list")
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'name':40} {'size':>8} {'lines':>9} {'tokens':>10}  updated")
        for r in rows:
            print(
                f"{r['name'][:40]:40} {_fmt_size(r['bytes']):>8} {r['lines']:9d} {r['tokens_est']:10d}  {r['updated']}"
            )
            if r.get("damaged"):
                print(f"  DAMAGED: {r['damaged']}")
        return 0
    if op == "peek":
        end = args.end if args.end is not None else args.start + 2000
        r = c.call("context/peek", {"name": args.name, "start": args.start, "end": end})
        sys.stdout.write(r["text"])
        if not r["text"].endswith("\n"):
            sys.stdout.write("\n")
        return 0
    if op == "search":
        if args.ranked:  # the pattern is a query: words or a question
            sp = {"name": args.name, "mode": "ranked", "query": args.pattern, "k": args.k}
        else:
            sp = {"name": args.name, "pattern": args.pattern, "max_matches": args.max}
        r = c.call("context/search", sp)
        if args.json:
            print(json.dumps(r, indent=2))
            return 0
        for m in r["matches"]:
            where = f"{m['file']}:{m['file_line'] or 0}" if m.get("file") else f"{m['line']}"
            print(f"{where}:{m['start']}-{m['end']}: {m['text']}")
        return 0 if r["matches"] else 1
    if op == "rm":
        r = c.call("context/drop", {"name": args.name})
        if not r["dropped"]:
            return _die(f"no context named {args.name!r}")
        return 0
    return _die(f"unknown context command {op!r}", 2)


class Progress:
    """A live one-line status on stderr while a query runs (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.state = "thinking"
        self.iteration = 0
        self.sub_calls = 0
        self.tokens = 0
        self.cost = 0.0
        self.cached = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True) if enabled else None
        if self._thread:
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            el = time.monotonic() - self.started
            cached = f" · {self.cached} cached" if self.cached else ""
            line = (
                f"⟳ iter {self.iteration} · {self.sub_calls} sub-calls{cached} · "
                f"{self.tokens / 1000:.1f}k tok · ${self.cost:.4f} · {el:.1f}s · {self.state}"
            )
            sys.stderr.write("\r\x1b[2K" + line[:200])
            sys.stderr.flush()

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        with self._lock:
            if kind == "root_delta":
                self.state = "thinking"
            elif kind == "code":
                self.state = "running code"
            elif kind == "output":
                self.state = "thinking"
            elif kind == "subcall":
                self.state = "sub-calls"
                if ev.get("status") == "cached":
                    self.cached += 1
            elif kind == "progress":
                self.iteration = ev.get("iteration", self.iteration)
                self.sub_calls = ev.get("sub_calls", self.sub_calls)
                tok = ev.get("tokens") or {}
                self.tokens = tok.get("input", 0) + tok.get("output", 0)
                self.cost = ev.get("cost", self.cost)

    def close(self) -> None:
        self._stop.set()
        if self.enabled:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def _context_param(c: Client, source: str) -> dict[str, Any]:
    """``-c`` is a path (file or directory), ``-`` (stdin), or an existing context name."""
    if source == "-":
        return {"text": sys.stdin.read()}
    p = Path(source).expanduser()
    if p.exists():
        name = f"cli:{p.resolve()}"
        r = c.call("context/put", {"name": name, "path": str(p.resolve())})
        print(
            f"rlm: context {name}: {r['chars']} chars, ~{r['tokens_est']} tokens"
            + (f", {r['files']} files" if r.get("files") else ""),
            file=sys.stderr,
        )
        return {"context": name}
    names = {x["name"] for x in c.call("context/list")}
    if source in names:
        return {"context": source}
    raise FileNotFoundError(f"-c {source!r} is neither a file, a directory nor a context name")


def source_lines(result: dict[str, Any]) -> list[str]:
    """The answer's sources as ``path:line: text`` (``line N: text`` for a plain text),
    or a note that nothing in the context backs it."""
    out = []
    for s in result.get("sources") or []:
        where = f"{s['file']}:{s['file_line']}" if s.get("file") else f"line {s['line']}"
        out.append(f"  {where}: {' '.join(str(s.get('text', '')).split())[:160]}")
    if "supported" in result and not result["supported"]:
        out.append("  (no source in the context backs this answer)")
    return out


def cmd_query(c: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "query": args.query,
        "job": args.job or f"cli-{uuid.uuid4().hex[:10]}",
    }
    if args.context:
        try:
            params.update(_context_param(c, args.context))
        except FileNotFoundError as exc:
            return _die(str(exc), 2)
    opts = {
        k: v
        for k, v in {
            "max_iterations": args.max_iterations,
            "max_depth": args.max_depth,
            "root_model": args.root_model,
            "sub_model": args.sub_model,
            "timeout_s": args.timeout,
            "max_cost": args.max_cost,
        }.items()
        if v is not None
    }
    if args.no_cache:
        opts["cache"] = False
    if opts:
        params["options"] = opts
    progress = Progress(sys.stderr.isatty() and not args.json and not args.quiet)
    verbose = args.verbose

    def on_event(ev: dict[str, Any]) -> None:
        progress.event(ev)
        if verbose:
            kind = ev.get("kind")
            if kind == "code":
                sys.stderr.write("\r\x1b[2K--- code ---\n" + ev.get("code", "") + "\n")
            elif kind == "output":
                sys.stderr.write("--- output ---\n" + ev.get("text", "")[:2000] + "\n")

    def on_sigint(signum: int, frame: Any) -> None:
        # Cancel from a second connection: this one is busy reading events.
        try:
            with Client(c.path, timeout=10) as c2:
                c2.call("query/cancel", {"job": params["job"]})
        except OSError:
            pass
        print("\nrlm: cancelling…", file=sys.stderr)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = c.call("query/run", params, on_event=on_event)
    except RpcError as exc:
        progress.close()
        partial = exc.data.get("partial") if isinstance(exc.data, dict) else None
        if args.json:
            print(
                json.dumps({"error": {"code": exc.code, "message": exc.message, "data": exc.data}})
            )
        elif partial:
            print(f"(partial answer)\n{partial}")
        return _die(exc.message)
    finally:
        signal.signal(signal.SIGINT, old)
        progress.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["answer"])
    for line in source_lines(result):
        print(line)
    tok = result.get("tokens", {})
    if not args.quiet:
        cached = result.get("cached_calls") or 0
        print(
            f"rlm: {result['iterations']} iterations, {result['sub_calls']} sub-calls"
            f"{f' ({cached} from cache)' if cached else ''}, "
            f"{tok.get('input', 0)}+{tok.get('output', 0)} tokens, ${result['cost']:.4f}, "
            f"{result['elapsed_s']:.1f}s; trace: rlm trace {result['job']}",
            file=sys.stderr,
        )
    return 0


def cmd_cache(c: Client, args: argparse.Namespace) -> int:
    if args.op == "clear":
        r = c.call("cache/clear")
        print(json.dumps(r) if args.json else f"deleted {r.get('deleted', 0)} cached entries")
        return 0
    st = c.call("cache/stats")
    if args.json or not st.get("enabled"):
        print(json.dumps(st, indent=2) if args.json else "cache disabled ([cache] enabled = false)")
        return 0
    ex = st.get("exact") or {}
    looked = ex.get("hits", 0) + ex.get("misses", 0)
    rate = f"{100 * ex.get('hits', 0) / looked:.0f}%" if looked else "-"
    print(
        f"exact:    {ex.get('entries', 0)} entries, {_fmt_size(ex.get('bytes', 0))} of "
        f"{_fmt_size(ex.get('max_bytes', 0))}; {ex.get('hits', 0)} hits / {looked} lookups ({rate}); "
        f"saved {ex.get('tokens_saved_in', 0)}+{ex.get('tokens_saved_out', 0)} tokens, "
        f"${ex.get('cost_saved', 0):.4f}"
    )
    thr = st.get("semantic_threshold")
    print(
        f"semantic: {'on' if st.get('semantic') else 'off'}"
        + (
            f", threshold {thr:g}, embeddings from {st.get('embed_model') or 'built-in'}"
            if st.get("semantic")
            else ""
        )
    )
    sp = st.get("speculation_totals") or {}
    print(
        f"speculation: {'on' if st.get('speculation') else 'off'}; "
        + ", ".join(f"{k} {v}" for k, v in sp.items())
    )
    return 0


def cmd_trace(c: Client, args: argparse.Namespace) -> int:
    from ..engine.trace import format_trace

    r = c.call("query/trace", {"job": args.job} if args.job else {})
    if args.json:
        print(json.dumps(r["records"], indent=2))
    else:
        print(format_trace(r["records"]))
    return 0


# -- argument parsing ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlm", description="Ask questions about large texts via rlmd")
    ap.add_argument("--socket", default=os.environ.get("RLMD_SOCKET"), help="daemon socket")
    ap.add_argument("--no-start", action="store_true", help="do not start a daemon if none runs")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="cmd", required=True)

    sub.add_parser("status", help="daemon, pool and sandbox state")

    cx = sub.add_parser("context", help="manage named contexts")
    cxs = cx.add_subparsers(dest="op", required=True)
    put = cxs.add_parser("put", help="store a file, directory, stdin (-) or --text")
    put.add_argument("name")
    put.add_argument("source", nargs="?")
    put.add_argument("--text")
    put.add_argument("--include", action="append", help="glob of files to include (repeatable)")
    put.add_argument("--exclude", action="append", help="glob of files to exclude (repeatable)")
    put.add_argument("--append", action="store_true")
    cxs.add_parser("ls", help="list contexts")
    pk = cxs.add_parser("peek", help="print characters START..END")
    pk.add_argument("name")
    pk.add_argument("--start", type=int, default=0)
    pk.add_argument("--end", type=int)
    se = cxs.add_parser("search", help="regex search, with line numbers")
    se.add_argument("name")
    se.add_argument("pattern")
    se.add_argument("--max", type=int, default=100)
    se.add_argument(
        "--ranked", action="store_true", help="PATTERN is a query: the best passages (BM25)"
    )
    se.add_argument("-k", type=int, default=10, help="passages to show with --ranked")
    rm = cxs.add_parser("rm", help="drop a context")
    rm.add_argument("name")

    q = sub.add_parser("query", help="ask a question")
    q.add_argument("-q", "--query", required=True)
    q.add_argument("-c", "--context", help="file, directory, '-' for stdin, or a context name")
    q.add_argument("--job")
    q.add_argument("--max-iterations", type=int)
    q.add_argument("--max-depth", type=int)
    q.add_argument("--root-model")
    q.add_argument("--sub-model")
    q.add_argument("--timeout", type=float)
    q.add_argument("--max-cost", type=float)
    q.add_argument("--no-cache", action="store_true")
    q.add_argument("-v", "--verbose", action="store_true", help="show code and output on stderr")
    q.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")

    ca = sub.add_parser("cache", help="cache statistics, or clear it")
    ca.add_argument("op", choices=["stats", "clear"], nargs="?", default="stats")

    tr = sub.add_parser("trace", help="print a query's trajectory (default: the latest)")
    tr.add_argument("job", nargs="?")

    sub.add_parser("bench", help="run benchmark suites (see `rlm bench --help`)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from ..bench.runner import main as bench_main
        from ..blas import single_threaded_blas

        single_threaded_blas()  # the perf scripts run engines and caches in this process

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        with connect(args) as c:
            handler = {
                "status": cmd_status,
                "context": cmd_context,
                "query": cmd_query,
                "trace": cmd_trace,
                "cache": cmd_cache,
            }[args.cmd]
            return handler(c, args)
    except RpcError as exc:
        return _die(exc.message)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        return _die(f"cannot reach the daemon: {exc}")
    except RuntimeError as exc:
        return _die(str(exc))
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
