"""``rlm bench``: run suites through the daemon, compare methods, write a report.

    rlm bench --suite sniah --lengths 8k,64k,1m --n 10 --methods base,rlm,rlm-nosub

Each task's context is uploaded with ``context/put`` (by path of a temporary file when it
is large), each method answers with ``query/run`` (``options.mode`` = ``base``, ``rlm``
or ``rlm-nosub``), and every result is appended to ``OUT/results.jsonl`` as soon as it is
known.  Rerunning the same command resumes: (task, method) pairs already in that file are
skipped.  At the end ``OUT/results.json``, ``OUT/report.md`` and, with matplotlib,
``OUT/accuracy-<suite>.png`` are written.

``--suite perf`` runs the project's micro-benchmarks (``bench/bench_*.py``, each with a
``run(...) -> str`` returning Markdown) and adds their output to the report.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import os
import platform
import queue
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import msgspec

from rlmd.bench import SUITES, BenchError, Task, format_length, make_tasks, parse_lengths
from rlmd.bench.report import Result, markdown, plot, summarize, summarize_kinds

# "auto" is the daemon's default (size-aware: the text itself when it fits the
# root model's window, else the REPL loop); "rlm" always asks for the paper's loop.
METHODS = ("base", "rlm", "rlm-nosub", "auto")
# Contexts larger than this go to the daemon as a file path, not inside the JSON frame.
INLINE_LIMIT = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]


class RpcClient(Protocol):
    """What the runner needs of a daemon connection (``rlmd.client.Client`` has it)."""

    def call(
        self,
        method: str,
        params: Any = None,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any: ...

    def close(self) -> None: ...


class DaemonUnavailable(Exception):
    """The daemon cannot be reached, stopped answering, or cannot run queries at all.

    Nothing is recorded for the task at hand, so rerunning the command resumes there.
    """


# Errors that say the daemon or the request is wrong, not that the method failed the task:
# they stop the run instead of being recorded as a score of 0.
SETUP_ERROR_KINDS = frozenset(
    {"unavailable", "shutting_down", "bad_params", "context_not_found", "job_exists", "cancelled"}
)
SETUP_ERROR_CODES = frozenset({-32600, -32601, -32602})


class BenchOptions(msgspec.Struct, kw_only=True):
    """Everything that decides what runs and where results go."""

    suites: list[str]
    lengths: list[int]
    n: int
    methods: list[str]
    seed: int = 0
    socket: str = ""
    out: Path = Path("bench-results")
    timeout_s: float | None = None
    max_iterations: int | None = None
    root_model: str | None = None
    sub_model: str | None = None
    cache: bool | None = None  # None: the daemon's default
    base_window: int | None = None  # "base": the root model's window (tokens)
    retry_errors: bool = False
    perf_dir: Path = REPO_ROOT / "bench"
    quick: bool = False
    export: Path | None = None
    parallel: int = 1
    command: str = ""
    perf_only: list[str] = []  # perf: run only these scripts (names without bench_)
    perf_skip: list[str] = []  # perf: leave these out
    doc: Path | None = None  # write the report into this document (docs/benchmarks.md)
    doc_section: str = ""


# ---------------------------------------------------------------- results file


def load_results(path: Path) -> list[Result]:
    """The results recorded so far; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    dec = msgspec.json.Decoder(Result)
    out = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            out.append(dec.decode(line))
        except msgspec.DecodeError:
            continue
    return out


def append_result(path: Path, result: Result) -> None:
    """Append one result and make it durable before the next task starts."""
    data = msgspec.json.encode(result) + b"\n"
    with open(path, "ab") as f:
        # A torn line from a killed run must not glue itself to this one.
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# Settings that change answers: a resumed run must use the same ones.
_ANSWER_SETTINGS = (
    "timeout_s",
    "max_iterations",
    "root_model",
    "sub_model",
    "cache",
    "base_window",
)


def check_settings(opts: BenchOptions) -> None:
    """Record the answer-changing settings in ``OUT/settings.json``, or check a rerun's.

    Raises BenchError when the directory holds results made with other settings, so that
    a resumed run never mixes two configurations in one table.
    """
    path = opts.out / "settings.json"
    mine = {k: getattr(opts, k) for k in _ANSWER_SETTINGS}
    if path.exists():
        try:
            theirs = msgspec.json.decode(path.read_bytes())
        except msgspec.DecodeError:
            theirs = None
        if isinstance(theirs, dict):
            diff = [
                f"{k}: {theirs.get(k)!r} then, {mine[k]!r} now"
                for k in _ANSWER_SETTINGS
                if theirs.get(k) != mine[k]
            ]
            if diff:
                raise BenchError(
                    f"{opts.out} holds results made with other settings ({'; '.join(diff)}); "
                    "rerun with the same options to resume, or choose another --out"
                )
            return
    path.write_bytes(msgspec.json.encode(mine))


def latest_by_key(results: list[Result]) -> dict[tuple[str, str], Result]:
    """The last result recorded for each (task id, method)."""
    return {(r.task_id, r.method): r for r in results}


def pending(task: Task, methods: list[str], done: dict, retry_errors: bool) -> list[str]:
    """The methods still to run on ``task``."""
    todo = []
    for m in methods:
        r = done.get((task.id, m))
        if r is None or (retry_errors and r.error):
            todo.append(m)
    return todo


# ---------------------------------------------------------------- progress


class Progress:
    """A live status line on a terminal, one line per result otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.live = stream.isatty()
        self.count = 0
        self.scores: dict[str, list[float]] = defaultdict(list)
        self._current = ""

    def skip(self, k: int) -> None:
        self.count += k

    def _acc(self) -> str:
        return " ".join(f"{m}={sum(v) / len(v):.2f}" for m, v in sorted(self.scores.items()) if v)

    def start(self, task: Task, method: str) -> None:
        self._current = f"[{self.count + 1}/{self.total}] {self._label(task, method)}"
        if self.live:
            self._write(self._current + " ...")

    def event(self, params: dict[str, Any]) -> None:
        """A ``query/event`` of the query in flight: show its iterations and sub-calls."""
        if self.live and params.get("kind") == "progress":
            self._write(
                f"{self._current} iteration {params.get('iteration', '?')}, "
                f"{params.get('sub_calls', 0)} sub-calls"
            )

    def done(self, task: Task, result: Result) -> None:
        self.count += 1
        self.scores[result.method].append(result.score)
        tail = f" error: {result.error_kind or result.error}" if result.error else ""
        text = (
            f"[{self.count}/{self.total}] {self._label(task, result.method)} "
            f"score={result.score:.2f} {result.wall_s:.1f}s{tail} | acc {self._acc()}"
        )
        if self.live:
            self._write(text)
        else:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream, flush=True)

    def finish(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()

    @staticmethod
    def _label(task: Task, method: str) -> str:
        return f"{task.suite} {format_length(task.length_tokens)} {method:<9} {task.id}"

    def _write(self, text: str) -> None:
        width = 200
        self.stream.write("\r\x1b[K" + text[:width])
        self.stream.flush()


# ---------------------------------------------------------------- running


def query_options(opts: BenchOptions, method: str) -> dict[str, Any]:
    """``query/run`` options for one method; only what differs from the daemon's defaults."""
    # Always named: the daemon's default ("auto") is itself one of the compared methods.
    o: dict[str, Any] = {"mode": method}
    for key in ("cache", "timeout_s", "max_iterations", "root_model", "sub_model"):
        v = getattr(opts, key)
        if v is not None:
            o[key] = v
    if method == "base" and opts.base_window is not None:
        o["window_tokens"] = opts.base_window
    return o


def upload_context(client: RpcClient, name: str, task: Task, tmp_dir: Path) -> None:
    """``context/put`` the task's context: inline when small, by file path when large."""
    if len(task.context) <= INLINE_LIMIT:
        client.call("context/put", {"name": name, "text": task.context})
        return
    fd, tmp = tempfile.mkstemp(prefix="ctx-", suffix=".txt", dir=tmp_dir)
    os.close(fd)
    path = Path(tmp)
    try:
        task.write_context(path)
        client.call("context/put", {"name": name, "path": str(path)})
    finally:
        path.unlink(missing_ok=True)


def run_one(
    client: RpcClient,
    task: Task,
    method: str,
    ctx_name: str,
    opts: BenchOptions,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    job: str | None = None,
) -> Result:
    """Ask one question with one method and score the answer."""
    from rlmd.client import RpcError

    job = job or new_job_id(task, method)
    params = {
        "query": task.question,
        "context": ctx_name,
        "job": job,
        "options": query_options(opts, method),
    }
    base = dict(
        task_id=task.id,
        suite=task.suite,
        method=method,
        length_tokens=task.length_tokens,
        gold=task.gold,
        scorer=task.scorer,
        task_kind=str(task.meta.get("task", task.meta.get("kind", ""))),
        seed=opts.seed,
    )
    t0 = time.monotonic()
    try:
        res = client.call("query/run", params, on_event=on_event)
    except KeyboardInterrupt:
        # Leave no orphan job burning model time on the daemon.
        notify = getattr(client, "notify", None)
        if notify is not None:
            try:
                notify("query/cancel", {"job": job})
            except OSError:
                pass
        raise
    except RpcError as exc:
        if exc.kind in SETUP_ERROR_KINDS or exc.code in SETUP_ERROR_CODES:
            raise DaemonUnavailable(
                f"the daemon cannot run {method} queries: {exc.message} ({exc.kind or exc.code})"
            ) from None
        wall = time.monotonic() - t0
        data = exc.data if isinstance(exc.data, dict) else {}
        partial = data.get("partial") or None
        return Result(
            **base,
            score=task.score(partial) if partial else 0.0,
            answer=partial,
            wall_s=wall,
            error=exc.message,
            error_kind=exc.kind or str(exc.code),
            finished_at=time.time(),
        )
    except (OSError, ConnectionError) as exc:
        raise DaemonUnavailable(f"the daemon stopped answering during {job}: {exc}") from exc
    wall = time.monotonic() - t0
    answer = str(res.get("answer", ""))
    tokens = res.get("tokens") or {}
    return Result(
        **base,
        score=task.score(answer),
        answer=answer,
        tokens_in=int(tokens.get("input", 0)),
        tokens_out=int(tokens.get("output", 0)),
        cost=float(res.get("cost", 0.0)),
        sub_calls=int(res.get("sub_calls", 0)),
        iterations=int(res.get("iterations", 0)),
        elapsed_s=float(res.get("elapsed_s", 0.0)),
        wall_s=wall,
        finish=str(res.get("finish", "")),
        root_model=str(res.get("root_model", "")),
        sub_model=str(res.get("sub_model", "")),
        finished_at=time.time(),
    )


def new_job_id(task: Task, method: str) -> str:
    """A job id that names the task and method (so ``rlm trace`` finds it) and is unique."""
    return f"bench-{task.id}-{method}-{uuid.uuid4().hex[:8]}"


def _tasks(opts: BenchOptions) -> Iterator[Task]:
    for suite in opts.suites:
        yield from make_tasks(suite, opts.lengths, opts.n, opts.seed)


def run_tasks(
    client: RpcClient,
    opts: BenchOptions,
    progress: Progress,
    results_path: Path,
    connect: Callable[[str], RpcClient] | None = None,
) -> int:
    """Run every pending (task, method); returns how many ran.

    With ``opts.parallel`` > 1 that many queries run at once, each worker on its own
    connection made with ``connect``.
    """
    if opts.parallel > 1:
        return _run_parallel(client, opts, progress, results_path, connect or _connect)
    done = latest_by_key(load_results(results_path))
    tmp_dir = opts.out / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    uploaded: str | None = None
    ran = 0
    try:
        for task in _tasks(opts):
            todo = pending(task, opts.methods, done, opts.retry_errors)
            progress.skip(len(opts.methods) - len(todo))
            if not todo:
                continue
            name = f"bench-{task.context_key}"
            if uploaded != name:
                if uploaded is not None:
                    _drop(client, uploaded)
                upload_context(client, name, task, tmp_dir)
                uploaded = name
            for method in todo:
                progress.start(task, method)
                result = run_one(client, task, method, name, opts, progress.event)
                append_result(results_path, result)
                progress.done(task, result)
                ran += 1
    finally:
        if uploaded is not None:
            try:
                _drop(client, uploaded)
            except (OSError, ConnectionError, DaemonUnavailable):
                pass
        with contextlib.suppress(OSError):
            tmp_dir.rmdir()  # only when empty: a big context is deleted once uploaded
    return ran


class _Shared:
    """State the parallel workers share, guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.refs: dict[str, int] = {}  # context name -> queued or running queries
        self.closed: set[str] = set()  # contexts no further query will use
        self.inflight: set[str] = set()  # job ids running now
        self.failure: DaemonUnavailable | None = None
        self.ran = 0

    def release(self, name: str, n: int = 1) -> bool:
        """Count ``n`` queries on ``name`` as finished; True when it can be dropped now."""
        with self.lock:
            self.refs[name] -= n
            return self.refs[name] == 0 and name in self.closed

    def close(self, name: str) -> bool:
        """No more queries will be queued on ``name``; True when it can be dropped now."""
        with self.lock:
            self.closed.add(name)
            return self.refs.get(name, 0) == 0


def _run_parallel(
    client: RpcClient,
    opts: BenchOptions,
    progress: Progress,
    results_path: Path,
    connect: Callable[[str], RpcClient],
) -> int:
    done = latest_by_key(load_results(results_path))
    tmp_dir = opts.out / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    sh = _Shared()
    # A bounded queue keeps the uploads at most a few contexts ahead of the workers.
    work: queue.Queue[tuple[Task, str, str] | None] = queue.Queue(maxsize=opts.parallel)
    clients = [connect(opts.socket) for _ in range(opts.parallel)]

    def on_event(params: dict[str, Any]) -> None:
        with sh.lock:
            progress.event(params)

    def worker(wc: RpcClient) -> None:
        while True:
            item = work.get()
            if item is None or sh.stop.is_set():
                return
            task, method, name = item
            job = new_job_id(task, method)
            with sh.lock:
                sh.inflight.add(job)
                progress.start(task, method)
            try:
                result = run_one(wc, task, method, name, opts, on_event, job=job)
            except DaemonUnavailable as exc:
                with sh.lock:
                    sh.failure = sh.failure or exc
                sh.stop.set()
                return
            finally:
                with sh.lock:
                    sh.inflight.discard(job)
            with sh.lock:
                append_result(results_path, result)
                progress.done(task, result)
                sh.ran += 1
            if sh.release(name):
                with contextlib.suppress(OSError, ConnectionError, DaemonUnavailable):
                    _drop(wc, name)

    def put(item: tuple[Task, str, str] | None) -> None:
        while not sh.stop.is_set():
            try:
                work.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    current: str | None = None
    try:
        for task in _tasks(opts):
            if sh.stop.is_set():
                break
            todo = pending(task, opts.methods, done, opts.retry_errors)
            with sh.lock:
                progress.skip(len(opts.methods) - len(todo))
            if not todo:
                continue
            name = f"bench-{task.context_key}"
            if name != current:
                if current is not None and sh.close(current):
                    _drop(client, current)
                upload_context(client, name, task, tmp_dir)
                current = name
            with sh.lock:
                sh.refs[name] = sh.refs.get(name, 0) + len(todo)
            for method in todo:
                put((task, method, name))
        if current is not None and sh.close(current):
            _drop(client, current)
        for _ in threads:
            put(None)
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        # Ctrl-C or a failed upload: cancel what runs, then cut the workers' connections.
        sh.stop.set()
        notify = getattr(client, "notify", None)
        with sh.lock:
            jobs = list(sh.inflight)
        for job in jobs:
            if notify is not None:
                with contextlib.suppress(OSError):
                    notify("query/cancel", {"job": job})
        raise
    finally:
        for c in clients:
            with contextlib.suppress(OSError):
                c.close()
        with contextlib.suppress(OSError):
            tmp_dir.rmdir()
    if sh.failure is not None:
        raise sh.failure
    return sh.ran


def _drop(client: RpcClient, name: str) -> None:
    try:
        client.call("context/drop", {"name": name})
    except (OSError, ConnectionError) as exc:
        raise DaemonUnavailable(f"the daemon stopped answering: {exc}") from exc


def export_tasks(opts: BenchOptions, stream: TextIO) -> int:
    """Write the tasks to ``opts.export`` (tasks.jsonl + one file per context), no daemon."""
    assert opts.export is not None
    ctx_dir = opts.export / "contexts"
    ctx_dir.mkdir(parents=True, exist_ok=True)
    enc = msgspec.json.Encoder()
    count = 0
    with open(opts.export / "tasks.jsonl", "wb") as f:
        for suite in opts.suites:
            if suite == "perf":
                continue
            for task in make_tasks(suite, opts.lengths, opts.n, opts.seed):
                ctx_file = ctx_dir / f"{task.context_key}.txt"
                if not ctx_file.exists():
                    task.write_context(ctx_file)
                record = msgspec.structs.asdict(task)
                del record["context"]
                record["context_file"] = str(ctx_file.relative_to(opts.export))
                f.write(enc.encode(record) + b"\n")
                count += 1
    print(f"exported {count} tasks to {opts.export / 'tasks.jsonl'}", file=stream)
    return 0


# ---------------------------------------------------------------- perf suite


def run_perf(
    perf_dir: Path,
    quick: bool,
    progress: Progress,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> str:
    """Run ``bench_*.py`` under ``perf_dir`` (each exposes ``run(...) -> str``).

    ``only``/``skip`` name scripts without the ``bench_`` prefix (``embedded``, ``store``).
    """
    scripts = [
        p
        for p in sorted(perf_dir.glob("bench_*.py"))
        if (not only or p.stem.removeprefix("bench_") in only)
        and p.stem.removeprefix("bench_") not in skip
    ]
    if not scripts:
        return f"No perf benchmarks found under {perf_dir} (bench_*.py).\n"
    parts = ["# perf benchmarks", ""]
    for script in scripts:
        progress.note(f"perf: {script.name} ...")
        t0 = time.monotonic()
        try:
            spec = importlib.util.spec_from_file_location(f"_rlmd_perf_{script.stem}", script)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {script}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            fn = getattr(module, "run", None)
            if not callable(fn):
                raise TypeError(f"{script.name} has no run() function")
            params = inspect.signature(fn).parameters
            required = [
                n
                for n, prm in params.items()
                if prm.default is inspect.Parameter.empty
                and prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)
            ]
            if required:
                raise TypeError(
                    f"run() of {script.name} needs arguments ({', '.join(required)}); "
                    "give them defaults so that `rlm bench --suite perf` can call run()"
                )
            kwargs = {"quick": quick} if "quick" in params else {}
            text = _demote_headings(str(fn(**kwargs)))
        except Exception as exc:  # one broken script must not lose the others' results
            text = f"**failed**: `{type(exc).__name__}: {exc}`\n"
        parts += [
            f"## {script.stem}",
            "",
            text.rstrip(),
            "",
            f"_({time.monotonic() - t0:.1f}s)_",
            "",
        ]
    return "\n".join(parts)


def _demote_headings(md: str) -> str:
    """Nest a script's Markdown headings under its own ``##`` section (not in code)."""
    out, fenced = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(out)


# ---------------------------------------------------------------- report


def write_outputs(
    opts: BenchOptions, results_path: Path, meta: dict[str, Any], perf_md: str | None
) -> tuple[Path, Path, list[Path], str | None]:
    """Write results.json, report.md and the plots from everything in results.jsonl."""
    wanted = {s for s in opts.suites}
    results = [
        r
        for r in latest_by_key(load_results(results_path)).values()
        if r.suite in wanted and r.method in opts.methods and r.length_tokens in opts.lengths
    ]
    rows = summarize(results)
    models = {(r.root_model, r.sub_model) for r in results if r.root_model}
    if len(models) == 1:
        meta["root_model"], meta["sub_model"] = next(iter(models))
    notes: list[str] = []
    files, note = plot(rows, opts.out) if rows else ([], None)
    if note:
        notes.append(note)
    kinds = summarize_kinds(results)
    md = markdown(rows, meta, notes, kinds, results) if rows or not perf_md else ""
    if perf_md:
        md = (md + "\n" if md else "") + perf_md
    report = opts.out / "report.md"
    report.write_text(md, encoding="utf-8")
    payload = {
        "meta": meta,
        "summary": rows,
        "by_kind": kinds,
        "results": results,
        "perf": perf_md,
    }
    out_json = opts.out / "results.json"
    out_json.write_bytes(msgspec.json.format(msgspec.json.encode(payload), indent=2))
    return out_json, report, files, note


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="rlm bench",
        description=(
            "Run benchmark suites through the daemon and compare base, rlm and rlm-nosub. "
            "Rerun the same command to resume an interrupted run."
        ),
    )
    ap.add_argument(
        "--suite",
        default="sniah",
        help=f"comma-separated suites: {', '.join(SUITES)}, or perf (default: sniah)",
    )
    ap.add_argument("--lengths", default="8k,32k", help="context lengths in tokens, e.g. 8k,64k,1m")
    ap.add_argument("--n", type=int, default=10, help="tasks per suite and length (default 10)")
    ap.add_argument(
        "--methods", default="base,rlm,rlm-nosub", help=f"comma-separated: {', '.join(METHODS)}"
    )
    ap.add_argument("--seed", type=int, default=0, help="task generation seed (default 0)")
    ap.add_argument("--socket", help="daemon socket (default: $RLMD_SOCKET or the user default)")
    ap.add_argument("--out", help="output directory (default: bench-results/<suites>-s<seed>)")
    ap.add_argument("--timeout", type=float, help="per-query time limit in seconds")
    ap.add_argument("--max-iterations", type=int, help="per-query root iteration limit")
    ap.add_argument("--root-model", help="root model for every query")
    ap.add_argument("--sub-model", help="sub model for every query")
    ap.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "use (--cache) or bypass (--no-cache) the daemon's model-call cache; default: "
            "the daemon's setting. --no-cache makes every task pay its own cost"
        ),
    )
    ap.add_argument(
        "--base-window",
        type=int,
        metavar="TOKENS",
        help=(
            "base: the root model's window, which the context is cut to (default: the "
            "daemon's idea of it: the embedded model's ctx_size, else 32768)"
        ),
    )
    ap.add_argument(
        "--retry-errors", action="store_true", help="on resume, rerun tasks that ended in error"
    )
    ap.add_argument("--perf-dir", help="where --suite perf finds bench_*.py (default: ./bench)")
    ap.add_argument("--quick", action="store_true", help="perf: pass quick=True to scripts")
    ap.add_argument("--perf-only", help="perf: only these scripts, e.g. embedded,store")
    ap.add_argument("--perf-skip", help="perf: leave out these scripts, e.g. embedded")
    ap.add_argument(
        "--doc", help="also write the report into this Markdown file (e.g. docs/benchmarks.md)"
    )
    ap.add_argument(
        "--doc-section", help="name of the section --doc replaces (default: the suites)"
    )
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="K",
        help="queries in flight at once, each on its own connection (default 1)",
    )
    ap.add_argument(
        "--export",
        metavar="DIR",
        help="write the tasks (tasks.jsonl, contexts/) to DIR and exit; no daemon needed",
    )
    return ap


def parse_options(argv: list[str]) -> BenchOptions:
    """Validate the command line into :class:`BenchOptions` (BenchError on bad input)."""
    args = build_parser().parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in (*SUITES, "perf")]
    if bad or not suites:
        raise BenchError(
            f"unknown suite {', '.join(bad) or '(none)'}; choose from {', '.join(SUITES)}, perf"
        )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    badm = [m for m in methods if m not in METHODS]
    if badm or not methods:
        raise BenchError(
            f"unknown method {', '.join(badm) or '(none)'}; choose from {', '.join(METHODS)}"
        )
    if args.n < 1:
        raise BenchError("--n must be at least 1")
    if args.parallel < 1:
        raise BenchError("--parallel must be at least 1")
    if args.base_window is not None and args.base_window < 2048:
        raise BenchError("--base-window must be at least 2048 tokens")
    from rlmd.paths import default_socket_path

    seed = args.seed
    out = Path(args.out) if args.out else Path("bench-results") / f"{'+'.join(suites)}-s{seed}"
    perf_dir = Path(args.perf_dir) if args.perf_dir else _default_perf_dir()
    return BenchOptions(
        suites=suites,
        lengths=parse_lengths(args.lengths),
        n=args.n,
        methods=methods,
        seed=seed,
        socket=args.socket or str(default_socket_path()),
        out=out,
        timeout_s=args.timeout,
        max_iterations=args.max_iterations,
        root_model=args.root_model,
        sub_model=args.sub_model,
        cache=args.cache,
        retry_errors=args.retry_errors,
        perf_dir=perf_dir,
        quick=args.quick,
        export=Path(args.export) if args.export else None,
        parallel=args.parallel,
        base_window=args.base_window,
        command="rlm bench " + shlex.join(argv),
        perf_only=[x for x in (args.perf_only or "").split(",") if x],
        perf_skip=[x for x in (args.perf_skip or "").split(",") if x],
        doc=Path(args.doc) if args.doc else None,
        doc_section=args.doc_section or "+".join(suites),
    )


def _default_perf_dir() -> Path:
    cwd = Path.cwd() / "bench"
    return cwd if cwd.is_dir() else REPO_ROOT / "bench"


def _connect(path: str) -> RpcClient:
    from rlmd.client import Client

    try:
        return Client(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnavailable(
            f"no daemon answers on {path} ({exc.strerror}); start it with `rlmd` "
            "(or pass --socket PATH)"
        ) from None
    except OSError as exc:
        raise DaemonUnavailable(f"cannot connect to {path}: {exc}") from None


def run(
    opts: BenchOptions,
    *,
    connect: Callable[[str], RpcClient] = _connect,
    stream: TextIO | None = None,
) -> int:
    """Run the benchmark described by ``opts``; returns an exit status."""
    err = stream or sys.stderr
    opts.out.mkdir(parents=True, exist_ok=True)
    results_path = opts.out / "results.jsonl"
    task_suites = [s for s in opts.suites if s != "perf"]
    total = len(task_suites) * len(opts.lengths) * opts.n * len(opts.methods)
    progress = Progress(total, err)
    meta: dict[str, Any] = {
        "command": opts.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seed": opts.seed,
        "suites": opts.suites,
        "lengths": opts.lengths,
        "n": opts.n,
        "methods": opts.methods,
    }
    from rlmd.client import RpcError

    status = 0
    if task_suites:
        check_settings(opts)
        try:
            client = connect(opts.socket)
        except DaemonUnavailable as exc:
            print(f"rlm bench: {exc}", file=err)
            return 2
        try:
            try:
                meta["daemon"] = client.call("daemon/status")
            except (OSError, ConnectionError) as exc:
                raise DaemonUnavailable(
                    f"the daemon on {opts.socket} is not answering: {exc}"
                ) from exc
            sub = msgspec.structs.replace(opts, suites=task_suites)
            run_tasks(client, sub, progress, results_path, connect)
        except DaemonUnavailable as exc:
            progress.note(
                f"rlm bench: {exc}. Results so far are in {results_path}; "
                "rerun the same command to resume."
            )
            status = 2
        except RpcError as exc:
            # A context/put or context/drop failed: a set-up problem, not a task result.
            progress.note(f"rlm bench: the daemon refused a request: {exc.message}")
            status = 2
        except KeyboardInterrupt:
            progress.note(
                f"rlm bench: interrupted. Results so far are in {results_path}; "
                "rerun the same command to resume."
            )
            status = 130
        finally:
            client.close()
    perf_md = None
    if "perf" in opts.suites and status == 0:
        perf_md = run_perf(opts.perf_dir, opts.quick, progress, opts.perf_only, opts.perf_skip)
        (opts.out / "perf.md").write_text(perf_md, encoding="utf-8")
    progress.finish()
    out_json, report, plots, note = write_outputs(opts, results_path, meta, perf_md)
    print(f"results: {out_json}\nreport:  {report}", file=err)
    if opts.doc is not None and status == 0:
        from .doc import update_doc

        update_doc(
            opts.doc, opts.doc_section, report.read_text(encoding="utf-8"), opts.command, plots
        )
        print(f"doc:     {opts.doc} (section {opts.doc_section})", file=err)
    for p in plots:
        print(f"plot:    {p}", file=err)
    if note:
        print(note, file=err)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlm bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_options(argv)
    except BenchError as exc:
        print(f"rlm bench: {exc}", file=sys.stderr)
        return 2
    try:
        if opts.export is not None:
            return export_tasks(opts, sys.stderr)
        return run(opts)
    except BenchError as exc:
        print(f"rlm bench: {exc}", file=sys.stderr)
        return 2
