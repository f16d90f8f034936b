"""Persistent REPL sessions in the daemon, for any client (repl/open, repl/exec, repl/close).

A query's REPL lives as long as the query.  These live as long as their client wants:
the MCP server's ``execute_code`` and Emacs' ``rlm-repl`` buffer keep variables between
calls the way the root model does between turns.  Each session is a
:class:`~rlmd.repl.session.ReplSession` (same worker, sandbox and limits as the engine)
bound to one stored context, whose version is pinned while the session is open, so a
later ``context/put`` never pulls the text from under the worker.  ``llm_query`` and
``llm_query_batched`` in it go through the pool (with its cache and accounting); a prompt
over the sub-model's window is refused as in a query (by the worker before it sends, and
here again), so a 200 MiB prompt reaches neither the daemon nor a provider.

Sessions are bounded in number (``[repl] max_sessions``), closed after ``[repl]
idle_timeout_s`` without use, and closed with the connection that opened them: at once,
through the connection's ``on_close`` hook, and otherwise (an owner without the hook) by
the sweeper task, which runs only while sessions exist and also closes idle ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from rlmd.config import Config
from rlmd.engine.sizing import window_tokens
from rlmd.providers.base import ChatRequest, Message, ProviderError
from rlmd.repl.prompt_limit import PromptLimit, rlm_query_text
from rlmd.repl.session import ExecResult, ReplSession

log = logging.getLogger(__name__)

#: How often the sweeper looks for idle sessions and closed owners (at most).
SWEEP_INTERVAL_S = 1.0
#: How many closed session ids are remembered, to say why a late repl/exec failed.
_REMEMBER_GONE = 1000


class Owner(Protocol):
    """The connection that opened a session (the server's ``Connection``).

    An owner may also have ``on_close(hook)``: then its sessions close as it closes.
    """

    @property
    def is_open(self) -> bool: ...


class ReplRegistryError(Exception):
    """A session request that cannot be served; ``kind`` is the wire's ``data.kind``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class ExecReply(msgspec.Struct, kw_only=True):
    """What ``repl/exec`` answers."""

    stdout: str
    error: str | None
    truncated: bool
    elapsed_s: float
    timed_out: bool = False
    restarted: bool = False  # the worker was replaced: the session's variables are gone
    final: str | None = None  # FINAL(...) / FINAL_VAR(...) was called in the block
    sub_calls: int = 0  # llm_query prompts the block sent to the pool


class Opened(msgspec.Struct, kw_only=True):
    """What ``repl/open`` answers: the session id and the context version it sees."""

    session: str
    context: str | None
    version: str | None


class SessionInfo(msgspec.Struct, kw_only=True):
    """One open session, as ``repl/list`` shows it."""

    session: str
    context: str | None
    version: str | None
    idle_s: float
    busy: bool
    execs: int


StartSession = Callable[..., Awaitable[ReplSession]]


@dataclass
class _Entry:
    id: str
    context: str | None
    version: str | None
    owner: Owner | None
    pins: contextlib.ExitStack
    scratch: Path
    session: ReplSession | None = None
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    execs: int = 0
    sub_calls: int = 0  # in the running block (the budget is per block)
    prompt_limit: PromptLimit | None = None  # None: no model, so no sub-call at all


class ReplRegistry:
    """The open sessions of the daemon.

    ``pool`` may be None (no model configured): code still runs, model calls fail with a
    message the code can read.  ``start`` is :meth:`ReplSession.start` (a parameter so
    the sandbox probe of tests can be passed in).
    """

    def __init__(
        self,
        *,
        config: Config,
        store: Any,
        pool: Any,
        state_dir: Path,
        start: StartSession = ReplSession.start,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self._config = config
        self._store = store
        self._pool = pool
        self._tmp = state_dir / "tmp"
        self._start = start
        self._interval = min(sweep_interval_s, config.repl.idle_timeout_s / 4)
        self._entries: dict[str, _Entry] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # closes started by owners' hooks
        self._swept_leftovers = False

    def __len__(self) -> int:
        return len(self._entries)

    # --- the three methods ------------------------------------------------------------

    async def open(self, context: str | None, owner: Owner | None) -> Opened:
        """Start a session bound to stored context ``context`` (None: no context)."""
        cap = self._config.repl.max_sessions
        if len(self._entries) >= cap:
            raise ReplRegistryError(
                "too_many_sessions",
                f"{len(self._entries)} REPL sessions are open, the most allowed "
                f"([repl] max_sessions = {cap}); close one with repl/close, or let an idle "
                "one time out",
            )
        sid = uuid.uuid4().hex
        entry = _Entry(
            id=sid,
            context=context,
            version=None,
            owner=owner,
            pins=contextlib.ExitStack(),
            scratch=self._tmp / f"repl-{os.getpid()}-{sid[:12]}",
        )
        # Reserve the slot now: concurrent opens must not overshoot the cap.
        self._entries[sid] = entry
        try:
            if not self._swept_leftovers:
                self._swept_leftovers = True
                await asyncio.to_thread(_remove_leftovers, self._tmp)
            path = None
            if context is not None:
                path, entry.version = await asyncio.to_thread(self._pin, entry)
            await asyncio.to_thread(entry.scratch.mkdir, parents=True, exist_ok=True)
            entry.prompt_limit = self._prompt_limit()
            entry.session = await self._start(
                context_path=path,
                limits=self._config.limits,
                sandbox=self._config.sandbox,
                scratch_dir=entry.scratch,
                on_call=self._on_call(entry),
                sub_prompt=entry.prompt_limit,
            )
        except BaseException:
            self._entries.pop(sid, None)
            await asyncio.shield(self._release(entry))
            raise
        if self._entries.get(sid) is not entry:  # closed (repl/close) while it started
            await self._release(entry)
            raise ReplRegistryError("not_found", f"REPL session {sid!r} was closed as it opened")
        entry.last_used = time.monotonic()
        on_close = getattr(owner, "on_close", None)
        if on_close is not None:
            on_close(lambda: self._owner_closed(entry))
        self._ensure_sweeper()
        log.info("REPL session %s opened on %s", sid[:12], context or "(no context)")
        return Opened(session=sid, context=context, version=entry.version)

    async def execute(self, sid: str, code: str, timeout_s: float | None) -> ExecReply:
        """Run ``code`` in session ``sid``; its variables stay for the next call."""
        entry = self._get(sid)
        limits = self._config.limits
        t = limits.cell_timeout_s if timeout_s is None else timeout_s
        if not 0 < t <= limits.timeout_s:
            raise ReplRegistryError(
                "bad_params",
                f"timeout_s must be in (0, {limits.timeout_s:g}] seconds (limits.timeout_s); "
                f"the default is limits.cell_timeout_s = {limits.cell_timeout_s:g}",
            )
        assert entry.session is not None
        entry.busy += 1
        entry.sub_calls = 0
        try:
            res = await entry.session.execute(code, timeout_s=t)
        finally:
            entry.busy -= 1
            entry.last_used = time.monotonic()
        entry.execs += 1
        return self._reply(res, entry.sub_calls)

    async def close(self, sid: str) -> bool:
        """Close session ``sid``; False when it was not open."""
        entry = self._entries.pop(sid, None)
        if entry is None:
            return False
        self._forget(sid, "it was closed (repl/close)")
        await self._release(entry)
        return True

    def list(self) -> list[SessionInfo]:
        now = time.monotonic()
        return [
            SessionInfo(
                session=e.id,
                context=e.context,
                version=e.version,
                idle_s=round(0.0 if e.busy else now - e.last_used, 3),
                busy=e.busy > 0,
                execs=e.execs,
            )
            for e in self._entries.values()
        ]

    async def aclose(self) -> None:
        """Close every session (daemon shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sid in list(self._entries):
            await self.close(sid)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # --- sweeping -----------------------------------------------------------------------

    async def sweep(self) -> int:
        """Close idle sessions and those whose connection has gone; return how many."""
        now = time.monotonic()
        idle = self._config.repl.idle_timeout_s
        doomed: list[tuple[_Entry, str]] = []
        for e in self._entries.values():
            if e.session is None:
                continue  # still starting: open() owns it until then
            if e.owner is not None and not e.owner.is_open:
                doomed.append((e, "the connection that opened it closed"))
            elif e.busy == 0 and now - e.last_used > idle:
                doomed.append((e, f"it was idle for more than {idle:g} s ([repl] idle_timeout_s)"))
        for e, why in doomed:
            await self._drop(e, why)
        return len(doomed)

    def _owner_closed(self, entry: _Entry) -> None:
        """The owner's ``on_close`` hook (on the loop, must not block): close its session
        now rather than at the next sweep."""
        if self._entries.get(entry.id) is not entry:
            return  # closed already (repl/close, idle)
        task = asyncio.get_running_loop().create_task(
            self._drop(entry, "the connection that opened it closed")
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drop(self, entry: _Entry, why: str) -> None:
        """Close ``entry`` for ``why`` unless someone else closed it first."""
        if self._entries.get(entry.id) is entry:
            del self._entries[entry.id]
            self._forget(entry.id, why)
            log.info("REPL session %s closed: %s", entry.id[:12], why)
            await self._release(entry)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while self._entries:
            await asyncio.sleep(self._interval)
            try:
                await self.sweep()
            except Exception:  # a failed close must not stop the sweeping of the rest
                log.exception("sweeping REPL sessions failed")

    # --- internals ----------------------------------------------------------------------

    def _get(self, sid: str) -> _Entry:
        entry = self._entries.get(sid)
        if entry is not None and entry.session is not None:
            return entry
        if entry is not None:
            raise ReplRegistryError("not_ready", f"REPL session {sid!r} is still starting")
        why = self._gone.get(sid)
        raise ReplRegistryError(
            "not_found",
            f"no open REPL session {sid!r}"
            + (f": {why}" if why else "")
            + "; open a new one with repl/open (its variables start empty)",
        )

    def _pin(self, entry: _Entry) -> tuple[Path, str]:
        # In a thread: the store is synchronous.
        from rlmd.store.store import StoreError

        try:
            pinned = entry.pins.enter_context(self._store.pin(entry.context))
        except StoreError as exc:
            if getattr(exc, "kind", "") == "not_found":
                raise ReplRegistryError(
                    "not_found",
                    f"no context named {entry.context!r}; store it first (context/put), "
                    "context/list shows the stored ones",
                ) from None
            raise ReplRegistryError("context_error", f"context {entry.context!r}: {exc}") from None
        return pinned.path, pinned.info.version

    async def _release(self, entry: _Entry) -> None:
        if entry.session is not None:
            with contextlib.suppress(Exception):
                await entry.session.close()
        await asyncio.to_thread(entry.pins.close)
        await asyncio.to_thread(shutil.rmtree, entry.scratch, True)

    def _forget(self, sid: str, why: str) -> None:
        self._gone[sid] = why
        while len(self._gone) > _REMEMBER_GONE:
            self._gone.popitem(last=False)

    def _reply(self, res: ExecResult, sub_calls: int) -> ExecReply:
        # The host model reads this, as the root model reads a block's output: head and
        # tail of a long output, and a flag saying that the middle is missing.
        cap = self._config.limits.output_chars
        out, truncated = res.output, False
        if len(out) > cap:
            head = cap * 2 // 3
            tail = cap - head
            cut = len(out) - head - tail
            out = f"{out[:head]}\n[... {cut} characters cut ...]\n{out[len(out) - tail :]}"
            truncated = True
        return ExecReply(
            stdout=out,
            error=res.error,
            truncated=truncated,
            elapsed_s=round(res.elapsed_s, 4),
            timed_out=res.timed_out,
            restarted=res.restarted,
            final=res.final,
            sub_calls=sub_calls,
        )

    def _prompt_limit(self) -> PromptLimit | None:
        """The sub-call prompt bound of a query (``[limits] sub_prompt_chars``, else the
        sub-model's window in characters); None without a sub-model."""
        if self._pool is None:
            return None
        try:
            model = self._pool.model_for("sub")
        except ProviderError:
            return None  # every call fails anyway, with the pool's message
        window = window_tokens(self._config, model)
        chars = self._config.limits.sub_prompt_chars or int(
            window * self._config.engine.chars_per_token
        )
        return PromptLimit(chars=chars, window_tokens=window, rlm_query_plain=True)

    def _on_call(self, entry: _Entry) -> Callable[[str, dict], Awaitable[Any]]:
        """The session's handler for llm_query / llm_query_batched / rlm_query."""

        async def one(fn: str, prompt: str, model: str | None) -> str:
            pool = self._pool
            if pool is None:
                raise RuntimeError("no model is configured in rlmd; llm_query is unavailable")
            req = ChatRequest(
                model=model or pool.model_for("sub"), messages=(Message("user", prompt),)
            )
            try:
                return (await pool.chat(req)).text
            except ProviderError as exc:  # the code reads the failure, as in the engine
                return f"[{fn} error: {exc}]"

        def check(prompt: str) -> None:
            # Again here: the worker checked, but model code can forge the Call.
            why = entry.prompt_limit.refusal(len(prompt)) if entry.prompt_limit else None
            if why is not None:
                raise RuntimeError(why)

        def take(n: int) -> None:
            cap = self._config.limits.max_sub_calls
            if entry.sub_calls + n > cap:
                raise RuntimeError(
                    f"this block asked for more than {cap} model calls (limits.max_sub_calls)"
                )
            entry.sub_calls += n

        async def on_call(fn: str, args: dict[str, Any]) -> Any:
            model = args.get("model")
            if fn == "llm_query":
                check(prompt := str(args["prompt"]))
                take(1)
                return await one(fn, prompt, model)
            if fn == "llm_query_batched":
                prompts = [str(p) for p in args["prompts"]]
                for p in prompts:
                    check(p)
                take(len(prompts))
                results = [""] * len(prompts)

                async def run(i: int, p: str) -> None:
                    results[i] = await one(fn, p, model)

                async with asyncio.TaskGroup() as tg:
                    for i, p in enumerate(prompts):
                        tg.create_task(run(i, p))
                return results
            if fn == "rlm_query":
                # A session has no root loop of its own: one sub-model call on the text.
                sub_ctx = args.get("context")
                text = rlm_query_text(str(args["prompt"]), None if not sub_ctx else str(sub_ctx))
                check(text)
                take(1)
                return await one(fn, text, None)
            raise ValueError(f"unknown REPL call {fn!r}")

        return on_call


def _remove_leftovers(tmp: Path) -> None:
    """Scratch dirs of sessions of daemons that are gone (a daemon that was killed never
    removed its own); those of a live daemon sharing the state dir stay."""
    if not tmp.is_dir():
        return
    for d in tmp.glob("repl-*-*"):
        pid = d.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # a live process of someone else: not ours to judge
