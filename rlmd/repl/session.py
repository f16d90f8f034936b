"""The daemon side of a REPL: one sandboxed worker process per query.

``ReplSession.start`` spawns a worker (see :mod:`rlmd.repl.worker`) under the protection
layers of :mod:`rlmd.repl.daemon_sandbox`; ``execute`` runs one block in it and meanwhile serves
the block's model calls through ``on_call``.  A block that outlives its wall-clock limit,
or a worker that dies, costs the worker: its whole process group (and under bubblewrap
its pid namespace) is killed, the result says ``restarted=True`` (the model must be told
that its variables are gone) and the next block gets a fresh worker.

Nothing here blocks the event loop: spawning, reading and waiting are asyncio calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from rlmd.config import LimitsConfig, SandboxConfig
from rlmd.proc import AT_ONCE, drain_stream, stop_process
from rlmd.repl import channel as ch
from rlmd.repl.ctxview import STR_THRESHOLD_BYTES
from rlmd.repl.daemon_sandbox import (
    DEFAULT_PROBE,
    SANDBOX_CONTEXT_DIR,
    SANDBOX_LIB,
    SANDBOX_SCRATCH,
    ProbeCache,
    Protection,
    SandboxUnavailable,
    bwrap_argv,
    host_sys_path,
    landlock_rules,
    python_executable,
    resolve,
    worker_env,
)
from rlmd.repl.prompt_limit import PromptLimit
from rlmd.repl.scratch import empty_dir, scratch_usage
from rlmd.repl.worker_guard import LL_SCOPE_ABSTRACT_UNIX, LL_SCOPE_SIGNAL

CallHandler = Callable[[str, dict], Awaitable[Any]]

#: Bound of captured output per block, in characters (the engine truncates further for
#: the model, see ``limits.output_chars``); keeps hostile output from flooding the daemon.
OUTPUT_CAP_CHARS = 1_000_000
#: How long a worker may take to start (bubblewrap + interpreter + imports + mapping).
START_TIMEOUT_S = 30.0
#: How long ``get_var`` waits for a variable's text (a hostile ``__str__`` may loop).
GET_VAR_TIMEOUT_S = 10.0
#: How long a timed-out worker gets to hand over what its block printed before the kill.
FLUSH_TIMEOUT_S = 0.25
#: Model calls in flight per session; more wait (protects the daemon from call floods).
MAX_CALLS_IN_FLIGHT = 64
#: Calls waiting or in flight per block; beyond this the worker is treated as abusive.
MAX_CALLS_PENDING = 1024
_STDERR_TAIL = 4096
_METHODS = ("llm_query", "llm_query_batched", "rlm_query", "search")


class ExecResult(msgspec.Struct, kw_only=True):
    """What one block did."""

    output: str
    error: str | None = None
    timed_out: bool = False
    restarted: bool = False  # the worker was replaced: the REPL's variables are lost
    final: str | None = None  # set by FINAL(...) / FINAL_VAR(...) in the block
    elapsed_s: float = 0.0
    #: Sub-call prompts the worker refused before sending (its own word: for traces).
    refused_calls: int = 0


class WorkerError(RuntimeError):
    """The worker could not be started or stopped talking sensibly; the message says why."""


def protection(
    sandbox: SandboxConfig | None = None, *, probe: ProbeCache = DEFAULT_PROBE
) -> Protection:
    """Which of bwrap / seccomp / rlimits workers get here (probe cached per process).

    Synchronous (the first call runs two short probe processes); inside the event loop
    prefer :func:`protection_async`.  Raises SandboxUnavailable for a ``require`` that
    cannot be met.
    """
    sb = sandbox or SandboxConfig()
    return resolve(probe.run_sync(), bwrap=sb.bwrap, seccomp=sb.seccomp)


async def protection_async(
    sandbox: SandboxConfig | None = None, *, probe: ProbeCache = DEFAULT_PROBE
) -> Protection:
    """:func:`protection` without blocking the event loop."""
    sb = sandbox or SandboxConfig()
    return resolve(await probe.run_async(), bwrap=sb.bwrap, seccomp=sb.seccomp)


class _Proc:
    """One worker process and its channel."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame: int,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.stderr_tail = b""
        self.send_lock = asyncio.Lock()
        self.drain_task: asyncio.Task[None] | None = None
        self.ready: ch.Ready | None = None
        self.under_bwrap = False
        self.pending_len: int | None = None
        #: Bytes read from the worker (headers and bodies), for the trace and the tests
        #: that prove a refused prompt never crossed the channel.
        self.bytes_in = 0

    async def send(self, msg: Any) -> None:
        async with self.send_lock:
            self.writer.write(ch.encode(msg))
            await self.writer.drain()

    async def recv(self) -> ch.ToDaemon:
        # Cancellation-safe: readexactly consumes nothing when cancelled, and a header
        # already read is remembered, so a timeout never leaves the stream mid-frame.
        try:
            if self.pending_len is None:
                header = await self.reader.readexactly(ch.HEADER.size)
                (length,) = ch.HEADER.unpack(header)
                self.bytes_in += ch.HEADER.size
                ch.check_length(length, self.max_frame)
                self.pending_len = length
            body = await self.reader.readexactly(self.pending_len)
            self.pending_len = None
            self.bytes_in += len(body)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise WorkerError(await self.death_note()) from exc
        return ch.decode_to_daemon(body)

    async def partial_output(self, within_s: float) -> str:
        """Ask a busy worker for what its block printed so far; "" if it cannot say."""
        try:
            async with asyncio.timeout(within_s):
                await self.send(ch.Flush())
                while True:
                    msg = await self.recv()
                    if isinstance(msg, ch.Partial):
                        return msg.output[: OUTPUT_CAP_CHARS + 200]
                    if isinstance(msg, ch.Done):
                        return msg.output[: OUTPUT_CAP_CHARS + 200]
        except (TimeoutError, WorkerError, ch.ChannelError, ConnectionError):
            return ""

    async def drain_stderr(self) -> None:
        # Keep only the tail: enough to explain a crash, bounded whatever the worker writes.

        def keep(chunk: bytes) -> None:
            self.stderr_tail = (self.stderr_tail + chunk)[-_STDERR_TAIL:]

        await drain_stream(self.proc.stderr, keep)

    async def death_note(self) -> str:
        """Why the worker went away, from its exit status and the tail of its stderr."""
        rc = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                rc = await self.proc.wait()
        if self.drain_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(0.5):
                    await asyncio.shield(self.drain_task)
        if rc is not None and self.under_bwrap and rc > 128:
            rc = -(rc - 128)  # bubblewrap reports a signal death of its child as 128 + n
        if rc is None:
            why = "closed its channel"
        elif rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            hint = {
                "SIGXCPU": " (its CPU time limit, limits.worker_cpu_s, was reached)",
                "SIGKILL": " (out of memory, or past its CPU time limit)",
                "SIGSYS": " (a forbidden system call)",
            }.get(sig, "")
            why = f"was killed by {sig}{hint}"
        else:
            why = f"exited with status {rc}"
        tail = self.stderr_tail.decode("utf-8", errors="replace").strip()
        return f"the REPL worker {why}" + (f"; its last words: {tail[-1000:]}" if tail else "")

    async def kill(self) -> None:
        """SIGKILL the whole process group (bubblewrap's pid namespace dies with it)."""
        self.writer.close()
        await stop_process(self.proc, steps=AT_ONCE, group=True)
        if self.drain_task is not None:
            self.drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.drain_task


class ReplSession:
    """A persistent REPL for one query, in a sandboxed worker process."""

    def __init__(
        self,
        *,
        context_path: Path | None,
        limits: LimitsConfig,
        sandbox: SandboxConfig,
        scratch_dir: Path,
        on_call: CallHandler,
        protection: Protection,
        str_threshold_bytes: int = STR_THRESHOLD_BYTES,
        sub_prompt: PromptLimit | None = None,
    ) -> None:
        self.context_path = context_path
        self.limits = limits
        self.sandbox = sandbox
        self.scratch_dir = scratch_dir
        self.on_call = on_call
        self.protection = protection
        self.str_threshold_bytes = str_threshold_bytes
        #: The sub-call prompt bound the worker checks before sending (``on_call`` must
        #: check it again: the worker is not trusted).
        self.sub_prompt = sub_prompt
        #: Bytes read from workers of this session that were since replaced.
        self._bytes_in_gone = 0
        #: The store's character index next to the context (``<version>.idx``), if any.
        self.index_path: Path | None = None
        self._proc: _Proc | None = None
        self._lock = asyncio.Lock()
        self._calls = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._closed = False
        #: Workers started by this session (1 + restarts).
        self.workers_started = 0

    @classmethod
    async def start(
        cls,
        *,
        context_path: Path | None,
        limits: LimitsConfig,
        sandbox: SandboxConfig,
        scratch_dir: Path,
        on_call: CallHandler,
        probe: ProbeCache = DEFAULT_PROBE,
        str_threshold_bytes: int = STR_THRESHOLD_BYTES,
        sub_prompt: PromptLimit | None = None,
    ) -> ReplSession:
        """Start a worker now; SandboxUnavailable if a required layer does not work."""
        scratch, index = await asyncio.to_thread(_check_paths, context_path, scratch_dir)
        prot = await protection_async(sandbox, probe=probe)
        self = cls(
            context_path=Path(context_path) if context_path is not None else None,
            limits=limits,
            sandbox=sandbox,
            scratch_dir=scratch,
            on_call=on_call,
            protection=prot,
            str_threshold_bytes=str_threshold_bytes,
            sub_prompt=sub_prompt,
        )
        self.index_path = index
        self._proc = await self._spawn()
        return self

    # --- worker lifecycle ---------------------------------------------------------------

    def _plan(self, fd: int) -> tuple[list[str], dict[str, str], ch.Init]:
        """Command line, environment and Init message of a worker (stats files: in a thread)."""
        prot = self.protection
        index = self.index_path
        if prot.bwrap:
            paths, home = [SANDBOX_LIB], SANDBOX_SCRATCH
            ctx = f"{SANDBOX_CONTEXT_DIR}/context.txt" if self.context_path else None
            idx = f"{SANDBOX_CONTEXT_DIR}/context.idx" if index else None
        else:
            paths, home = host_sys_path(), str(self.scratch_dir)
            ctx = str(self.context_path) if self.context_path else None
            idx = str(index) if index else None
        parent = None if prot.bwrap else os.getpid()
        boot = (
            f"import sys; sys.path[:0] = {paths!r}; from rlmd.repl.worker import main; "
            f"main({fd}, {parent!r})"
        )
        argv = [python_executable(), "-I", "-S", "-c", boot]
        env = worker_env(home)
        if prot.bwrap:
            argv = [
                *bwrap_argv(
                    bwrap=shutil.which("bwrap") or "bwrap",
                    context_path=self.context_path,
                    scratch_dir=self.scratch_dir,
                    env=env,
                    index_path=index,
                    scratch_bytes=self.sandbox.scratch_mb * 1024 * 1024,
                ),
                "--",
                *argv,
            ]
        return argv, env, self._init_msg(ctx, idx)

    async def _spawn(self) -> _Proc:
        prot = self.protection
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = child.fileno()
            argv, env, init = await asyncio.to_thread(self._plan, fd)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(fd,),
                start_new_session=True,  # its own process group: killpg takes all of it
                env=env,
                cwd=str(self.scratch_dir),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        w = _Proc(proc, reader, writer, self.limits.max_frame_bytes)
        w.under_bwrap = prot.bwrap
        w.drain_task = asyncio.get_running_loop().create_task(w.drain_stderr())
        self.workers_started += 1
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await w.send(init)
                ready = await w.recv()
            if not isinstance(ready, ch.Ready):
                raise WorkerError(f"the REPL worker sent {type(ready).__name__} instead of Ready")
            if self.sandbox.seccomp == "require" and not ready.seccomp:
                raise SandboxUnavailable(
                    f"sandbox.seccomp = 'require' but the worker could not install it: {ready.setup_error}"
                )
            if prot.seccomp and not ready.seccomp:
                self.protection = msgspec.structs.replace(
                    self.protection,
                    seccomp=False,
                    seccomp_detail=f"failed in worker: {ready.setup_error}",
                )
            if prot.privileges_dropped and not ready.privileges_dropped:
                # Never run model code with capabilities, whatever the mode.
                raise SandboxUnavailable(
                    f"the REPL worker could not drop its privileges: {ready.setup_error}"
                )
            if prot.landlock_scoped and not ready.landlock_scoped:
                self.protection = msgspec.structs.replace(self.protection, landlock_scoped=False)
            if prot.landlock and not ready.landlock:
                self.protection = msgspec.structs.replace(
                    self.protection,
                    landlock=False,
                    landlock_detail=f"failed in worker: {ready.setup_error}",
                )
            w.ready = ready
        except TimeoutError:
            await w.kill()
            raise WorkerError(
                f"the REPL worker did not start within {START_TIMEOUT_S:g} s"
            ) from None
        except BaseException:
            await w.kill()
            raise
        return w

    def _init_msg(self, ctx: str | None, idx: str | None) -> ch.Init:
        lim = self.limits
        rules: list[tuple[str, int]] = []
        if self.protection.landlock:
            rules = landlock_rules(
                context_path=self.context_path,
                index_path=self.index_path,
                scratch_dir=self.scratch_dir,
            )
        return ch.Init(
            landlock_rules=rules,
            landlock_scoped=(LL_SCOPE_SIGNAL | LL_SCOPE_ABSTRACT_UNIX)
            if self.protection.landlock_scoped
            else 0,
            context_path=ctx,
            index_path=idx,
            str_threshold_bytes=self.str_threshold_bytes,
            memory_bytes=lim.worker_memory_mb * 1024 * 1024,
            cpu_s=lim.worker_cpu_s,
            open_files=lim.worker_open_files,
            file_size_bytes=self.sandbox.scratch_mb * 1024 * 1024,
            seccomp=self.protection.seccomp,
            output_cap_chars=OUTPUT_CAP_CHARS,
            max_frame_bytes=lim.max_frame_bytes,
            sub_prompt=self.sub_prompt,
        )

    async def _scratch_over_limit(self, *, holding_lock: bool = False) -> str | None:
        """Outside bubblewrap the scratch directory is on disk with no quota: measure it
        after each block (timed out or not); over the limit, restart the worker and empty
        the directory.  Returns the note for the block's error, None when within."""
        if self.protection.bwrap:
            return None  # a tmpfs of the configured size bounds it already
        limit = self.sandbox.scratch_mb * 1024 * 1024
        used = await asyncio.to_thread(scratch_usage, self.scratch_dir, limit)
        if used <= limit:
            return None
        if holding_lock:
            await self._drop_worker()
        else:
            async with self._lock:
                await self._drop_worker()
        await asyncio.to_thread(empty_dir, self.scratch_dir)
        return (
            f"OSError: the scratch directory holds more than sandbox.scratch_mb = "
            f"{self.sandbox.scratch_mb} MiB (or too many files); it was emptied and the "
            "REPL was restarted: all variables and files were lost."
        )

    async def _drop_worker(self) -> None:
        w, self._proc = self._proc, None
        if w is not None:
            self._bytes_in_gone += w.bytes_in
            await w.kill()

    @property
    def bytes_from_workers(self) -> int:
        """Bytes the daemon read from this session's workers, the current one included."""
        return self._bytes_in_gone + (self._proc.bytes_in if self._proc is not None else 0)

    @property
    def worker_pid(self) -> int | None:
        """Pid of the current worker (the bubblewrap process under bwrap), for tests/status."""
        return self._proc.proc.pid if self._proc is not None else None

    # --- blocks -------------------------------------------------------------------------

    async def execute(self, code: str, *, timeout_s: float) -> ExecResult:
        """Run one block; calls from it go to ``on_call`` while it runs."""
        if self._closed:
            raise WorkerError("this REPL session is closed")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        t0 = time.monotonic()
        async with self._lock:
            try:
                if self._proc is None:
                    self._proc = await self._spawn()
                w = self._proc
                try:
                    async with asyncio.timeout(timeout_s):
                        done = await self._run(w, code)
                except TimeoutError:
                    output = await w.partial_output(FLUSH_TIMEOUT_S)
                    await self._drop_worker()
                    over = await self._scratch_over_limit(holding_lock=True)
                    return ExecResult(
                        output=output,
                        error=(
                            f"TimeoutError: the block ran longer than {timeout_s:g} s and was "
                            "stopped. The REPL was restarted: all variables were lost "
                            "(context and the functions are back)."
                        )
                        + (f"\n{over}" if over else ""),
                        timed_out=True,
                        restarted=True,
                        elapsed_s=time.monotonic() - t0,
                    )
                except (WorkerError, ch.ChannelError) as exc:
                    await self._drop_worker()
                    return ExecResult(
                        output="",
                        error=f"{exc}. The REPL was restarted: all variables were lost.",
                        restarted=True,
                        elapsed_s=time.monotonic() - t0,
                    )
            except BaseException:
                # Cancellation (the query was cancelled) or a bug: never leave a worker behind.
                await asyncio.shield(self._drop_worker())
                raise
        # The worker caps its output, but model code can forge frames: cap again here.
        output, error = done.output, done.error
        over = await self._scratch_over_limit()
        if over:
            error = (error + "\n" if error else "") + over
            return ExecResult(
                output=output[:OUTPUT_CAP_CHARS],
                error=error[: OUTPUT_CAP_CHARS + 1000],
                final=done.final,
                restarted=True,
                elapsed_s=time.monotonic() - t0,
                refused_calls=_count(done.refused_calls),
            )
        if len(output) > OUTPUT_CAP_CHARS + 200:
            output = output[:OUTPUT_CAP_CHARS] + "\n[output truncated by the daemon]\n"
        if error is not None and len(error) > OUTPUT_CAP_CHARS:
            error = error[:OUTPUT_CAP_CHARS] + "\n[error truncated by the daemon]\n"
        return ExecResult(
            output=output,
            error=error,
            final=done.final,
            elapsed_s=time.monotonic() - t0,
            refused_calls=_count(done.refused_calls),
        )

    async def _run(self, w: _Proc, code: str) -> ch.Done:
        await w.send(ch.Exec(code=code))
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    msg = await w.recv()
                    if isinstance(msg, ch.Done):
                        break
                    if not isinstance(msg, ch.Call):
                        raise WorkerError(
                            f"the REPL worker sent an unexpected {type(msg).__name__}"
                        )
                    if len(tasks) >= MAX_CALLS_PENDING:
                        raise WorkerError(
                            f"the block made more than {MAX_CALLS_PENDING} model calls at once"
                        )
                    t = tg.create_task(self._serve_call(w, msg))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                # Calls still running belong to threads the block left behind: abandon them.
                for t in tasks:
                    t.cancel()
        except BaseExceptionGroup as eg:
            # _serve_call never raises; the group can only carry our own errors.
            raise eg.exceptions[0] from None
        return msg

    async def _serve_call(self, w: _Proc, call: ch.Call) -> None:
        async with self._calls:
            try:
                params = _check_call(call.method, call.params)
                value = await self.on_call(call.method, params)
                if call.method == "llm_query_batched":
                    value = [v if isinstance(v, str) else str(v) for v in value]
                elif not isinstance(value, str):
                    value = str(value)
                reply = ch.CallReply(id=call.id, value=value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the error is the model's to read
                reply = ch.CallReply(id=call.id, error=str(exc) or type(exc).__name__)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await w.send(reply)

    async def get_var(self, name: str) -> str | None:
        """The text of a REPL variable (as FINAL_VAR renders it), None if it does not exist."""
        if self._closed or not isinstance(name, str) or not name.isidentifier():
            return None
        async with self._lock:
            w = self._proc
            if w is None:
                return None
            try:
                async with asyncio.timeout(GET_VAR_TIMEOUT_S):
                    await w.send(ch.GetVar(name=name))
                    msg = await w.recv()
            except (TimeoutError, WorkerError, ch.ChannelError, ConnectionError):
                await self._drop_worker()
                return None
            except BaseException:
                await asyncio.shield(self._drop_worker())
                raise
            return msg.text if isinstance(msg, ch.VarText) else None

    async def close(self) -> None:
        """Kill the worker; idempotent."""
        self._closed = True
        await self._drop_worker()


def _count(n: int) -> int:
    """A count the worker reports, bounded (it may be forged)."""
    return min(max(n, 0), MAX_CALLS_PENDING * 1024)


def _check_paths(context_path: Path | None, scratch_dir: Path) -> tuple[Path, Path | None]:
    """Clear errors for missing files before any process is spawned.

    Returns the resolved scratch directory and the store's index of the context
    (``<version>.idx`` next to ``<version>.txt``) when there is one.
    """
    if context_path is not None and not Path(context_path).is_file():
        raise WorkerError(f"context file {context_path} does not exist")
    if not Path(scratch_dir).is_dir():
        raise WorkerError(f"scratch directory {scratch_dir} does not exist; create it first")
    index = None
    if context_path is not None:
        candidate = Path(context_path).with_suffix(".idx")
        if candidate != Path(context_path) and candidate.is_file():
            index = candidate
    return Path(scratch_dir).resolve(), index


def _check_call(method: str, params: Any) -> dict[str, Any]:
    """Validate a call from the worker (hostile) before it reaches the daemon's handler."""
    if method not in _METHODS:
        raise ValueError(f"unknown REPL call {method!r}; use one of {', '.join(_METHODS)}")
    if not isinstance(params, dict):
        raise ValueError(f"{method}: malformed parameters")
    if method == "search":  # the REPL's search() over a mapped context: rlmd/search/repl.py
        query, k = params.get("query"), params.get("k")
        if not isinstance(query, str) or isinstance(k, bool) or not isinstance(k, int):
            raise ValueError("search: takes a str query and an int k")
        return {"query": query, "k": k}
    model = params.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{method}: model must be a str or None")
    if method == "llm_query_batched":
        prompts = params.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("llm_query_batched: prompts must be a list of str")
        return {"prompts": prompts, "model": model}
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"{method}: prompt must be a str")
    if method == "llm_query":
        return {"prompt": prompt, "model": model}
    ctx = params.get("context")
    if ctx is not None and not isinstance(ctx, str):
        raise ValueError("rlm_query: context must be a str or None")
    return {"prompt": prompt, "context": ctx}
