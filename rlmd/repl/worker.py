"""The REPL worker: runs in its own (sandboxed) process, one per query.

Started by :mod:`rlmd.repl.session` as ``python -I -S -c "<bootstrap>"`` with the
channel socket as an inherited file descriptor.  It reads an ``Init`` message, maps the
context, lowers its resource limits, installs its seccomp filter, says ``Ready`` and then
runs blocks one at a time in a namespace that persists across blocks.

Model calls (``llm_query`` ...) are sent to the daemon as ``Call`` messages; the calling
thread blocks until the matching ``CallReply``.  A reader thread receives every message so
that calls made from several threads of model code are answered independently.

Everything here is the model's side of the wall: the daemon trusts none of it.
"""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import os
import queue
import signal
import socket
import sys
import threading
from typing import Any

from rlmd.proc import die_with_parent
from rlmd.repl import channel as ch
from rlmd.repl.ctxview import ContextView, load_context, make_re_module
from rlmd.repl.worker_guard import (
    apply_landlock,
    apply_rlimits,
    drop_privileges,
    install_seccomp,
)
from rlmd.search.repl import make_functions as _search_functions

_ERROR_CAP = 100_000
_THIS_FILE = __file__


class _Capture(io.TextIOBase):
    """stdout and stderr of a block, in order, bounded to ``cap`` characters."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: Any) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self._lock:
            room = self.cap - self.kept
            if len(s) <= room:
                self.parts.append(s)
                self.kept += len(s)
            else:
                if room > 0:
                    self.parts.append(s[:room])
                    self.kept += room
                self.dropped += len(s) - max(room, 0)
        return len(s)

    def flush(self) -> None:
        pass

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def text(self) -> str:
        out = "".join(self.parts)
        if self.dropped:
            out += f"\n[output truncated: {self.dropped} more characters were not kept]\n"
        return out


def render(value: Any) -> str:
    """Text of a FINAL/FINAL_VAR value: str as is, list/tuple/dict as indented JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, ContextView):
        return str(value)
    if isinstance(value, (list, tuple, dict)):
        import json

        try:
            return json.dumps(value, ensure_ascii=False, indent=2, default=str)
        except (TypeError, ValueError):  # e.g. non-str dict keys mixed, cycles
            return repr(value)
    return str(value)


def _size_of(v: Any) -> str:
    if isinstance(v, (str, ContextView)):
        return f"{len(v)} chars"
    try:
        return f"{len(v)} items"
    except TypeError:
        return f"{sys.getsizeof(v)} bytes"


class Worker:
    """The state of one worker: channel, pending calls, namespace."""

    def __init__(self, chan: ch.BlockingChannel, init: ch.Init, context: Any) -> None:
        self.chan = chan
        self.init = init
        self.send_lock = threading.Lock()
        self.inbox: queue.Queue[ch.ToWorker | None] = queue.Queue()
        self.pending: dict[int, list[Any]] = {}
        self.next_id = 0
        self.final: str | None = None
        self.capture: _Capture | None = None  # of the running block
        self.blocks = 0
        self.refused_calls = 0  # sub-call prompts refused here, in the running block
        self.ns: dict[str, Any] = self._namespace(context)

    # --- messages -----------------------------------------------------------------------

    def send(self, msg: Any) -> None:
        with self.send_lock:
            self.chan.send(msg)

    def reader(self) -> None:
        """Route every message: replies to their waiting calls, the rest to the main loop."""
        try:
            while True:
                msg = self.chan.recv()
                if isinstance(msg, ch.CallReply):
                    slot = self.pending.get(msg.id)
                    if slot is not None:
                        slot[1], slot[2] = msg.value, msg.error
                        slot[0].set()
                elif isinstance(msg, ch.Flush):
                    cap = self.capture
                    self.send(ch.Partial(output=cap.text() if cap is not None else ""))
                else:
                    self.inbox.put(msg)
        except (ch.ChannelError, OSError):
            # The daemon is gone or spoke garbage: nothing left to do.
            os._exit(0)

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send a Call and block until its CallReply; the daemon's error becomes RuntimeError."""
        with self.send_lock:
            self.next_id += 1
            cid = self.next_id
        frame = ch.encode(ch.Call(id=cid, method=method, params=params))
        if len(frame) - ch.HEADER.size > self.init.max_frame_bytes:
            raise ValueError(
                f"{method}: the request is {len(frame)} bytes, over the limit of "
                f"{self.init.max_frame_bytes} bytes (limits.max_frame_bytes); send smaller pieces"
            )
        slot: list[Any] = [threading.Event(), None, None]
        self.pending[cid] = slot
        try:
            with self.send_lock:
                self.chan.sock.sendall(frame)
            slot[0].wait()
        finally:
            self.pending.pop(cid, None)
        if slot[2] is not None:
            raise RuntimeError(slot[2])
        return slot[1]

    def refuse_long(self, chars: int, *, rlm_query: bool = False) -> None:
        """Raise the daemon's refusal for a prompt over ``Init.sub_prompt`` before it is
        sent: 200 MiB of prompt would otherwise cross the channel only to be refused there.
        """
        limit = self.init.sub_prompt
        if limit is None or (rlm_query and not limit.rlm_query_plain):
            return
        why = limit.refusal(chars)
        if why is not None:
            with self.send_lock:
                self.refused_calls += 1
            raise RuntimeError(why)  # what a refusal from the daemon raises, word for word

    # --- the namespace ------------------------------------------------------------------

    def _namespace(self, context: Any) -> dict[str, Any]:
        def llm_query(prompt: str, model: str | None = None) -> str:
            """Ask a sub-model one prompt; returns its answer."""
            self.refuse_long(_chars(prompt))  # before a mapped view becomes a str
            text = _text(prompt, "llm_query")
            return str(self.call("llm_query", {"prompt": text, "model": _model(model)}))

        def llm_query_batched(prompts: list[str], model: str | None = None) -> list[str]:
            """Ask a sub-model many prompts at once (in parallel); answers in prompt order."""
            if isinstance(prompts, (str, ContextView)) or not hasattr(prompts, "__iter__"):
                raise TypeError("llm_query_batched: prompts must be a list of str")
            raw = list(prompts)
            for p in raw:  # the daemon refuses the whole batch for one long prompt
                self.refuse_long(_chars(p))
            items = [_text(p, "llm_query_batched") for p in raw]
            if not items:
                return []
            out = self.call("llm_query_batched", {"prompts": items, "model": _model(model)})
            if not isinstance(out, list) or len(out) != len(items):
                raise RuntimeError("llm_query_batched: the daemon returned a malformed answer")
            return [str(x) for x in out]

        def rlm_query(prompt: str, context: Any = None) -> str:
            """Ask a recursive RLM (a sub-query with its own REPL) about ``context``."""
            # The length of ``prompt + "\n\n" + context``, what a plain rlm_query sends.
            chars = _chars(prompt) + (0 if context is None else 2 + _chars(context))
            self.refuse_long(chars, rlm_query=True)
            sub = None if context is None else _text(context, "rlm_query context")
            text = _text(prompt, "rlm_query")
            return str(self.call("rlm_query", {"prompt": text, "context": sub}))

        def FINAL(answer: Any) -> None:
            """Mark ``answer`` (as text) as the final answer of the query."""
            self.final = render(answer)

        def FINAL_VAR(name: Any) -> None:
            """Mark the variable called ``name`` (a str) as the final answer."""
            if isinstance(name, str):
                if name not in self.ns:
                    raise NameError(
                        f"FINAL_VAR: there is no variable named {name!r}; assign it first"
                    )
                self.final = render(self.ns[name])
            else:
                self.final = render(name)

        def SHOW_VARS() -> None:
            """Print the user variables with their type and size."""
            rows = [
                f"{k}: {type(v).__name__} ({_size_of(v)})"
                for k, v in self.ns.items()
                if not k.startswith("_")
                and not (k in injected and v is injected[k])
                and not isinstance(v, type(sys))
            ]
            if isinstance(self.ns.get("context"), (str, ContextView)):
                rows.insert(
                    0,
                    f"context: {type(self.ns['context']).__name__} ({_size_of(self.ns['context'])})",
                )
            print("\n".join(rows) if rows else "(no variables)")

        injected: dict[str, Any] = {
            "llm_query": llm_query,
            "llm_query_batched": llm_query_batched,
            "rlm_query": rlm_query,
            "FINAL": FINAL,
            "FINAL_VAR": FINAL_VAR,
            "SHOW_VARS": SHOW_VARS,
            # Small models write these in lower case; a NameError would only loop them.
            "final": FINAL,
            "final_var": FINAL_VAR,
            "context": context,
            # search(query, k) / grep(pattern): ranked passages and whole matching lines
            # with their locations; a mapped (large) context asks the daemon's index first.
            # outline(file=None): the classes and functions, with their method counts.
            **_search_functions(context, self.call, via_daemon=isinstance(context, ContextView)),
        }
        bi = dict(builtins.__dict__)
        if isinstance(context, ContextView):
            re_mod = make_re_module()
            real_import = builtins.__import__

            def _import(name: str, globals=None, locals=None, fromlist=(), level=0):
                if name == "re" and level == 0:
                    return re_mod
                return real_import(name, globals, locals, fromlist, level)

            bi["__import__"] = _import
        ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": bi}
        ns.update(injected)
        return ns

    # --- running blocks -----------------------------------------------------------------

    def run_block(self, code: str) -> ch.Done:
        """Execute one block; output and errors are captured, never raised."""
        self.blocks += 1
        filename = f"<block {self.blocks}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self.final = None
        self.refused_calls = 0
        cap = self.capture = _Capture(self.init.output_cap_chars)
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = cap
        error = None
        try:
            tree = ast.parse(code, filename, "exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, filename, "exec"), self.ns)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), filename, "eval"), self.ns)
                if value is not None:
                    cap.write(repr(value) + "\n")
        except BaseException as exc:  # SystemExit too: the worker lives on
            error = _format_error(exc)
        finally:
            sys.stdout, sys.stderr = saved
            self.capture = None
        return ch.Done(
            output=cap.text(), error=error, final=self.final, refused_calls=self.refused_calls
        )

    def var_text(self, name: str) -> str | None:
        if name.startswith("__") or name not in self.ns:
            return None
        try:
            return render(self.ns[name])
        except Exception as exc:  # a hostile __str__ must not kill us
            return f"<could not render {name}: {type(exc).__name__}: {exc}>"

    def serve(self) -> None:
        while True:
            msg = self.inbox.get()
            if isinstance(msg, ch.Exec):
                done = self.run_block(msg.code)
                try:
                    self.send(done)
                except ch.ChannelError:
                    # Output too big to encode: send it truncated rather than nothing.
                    self.send(
                        ch.Done(
                            output=done.output[:1000],
                            error=(done.error or "")[:1000],
                            refused_calls=done.refused_calls,
                        )
                    )
            elif isinstance(msg, ch.GetVar):
                self.send(ch.VarText(text=self.var_text(msg.name)))


def _text(x: Any, what: str) -> str:
    if isinstance(x, ContextView):
        return str(x)
    if not isinstance(x, str):
        raise TypeError(f"{what}: expected a str, got {type(x).__name__}")
    return x


def _chars(x: Any) -> int:
    """Characters of a prompt, without copying a mapped view; 0 for a wrong type (which
    ``_text`` then refuses)."""
    return len(x) if isinstance(x, (str, ContextView)) else 0


def _model(m: Any) -> str | None:
    if m is not None and not isinstance(m, str):
        raise TypeError(f"model must be a str or None, got {type(m).__name__}")
    return m


def _format_error(exc: BaseException) -> str:
    """The traceback of model code, without the worker's own frames."""
    try:
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # formatting itself can fail (MemoryError)
        text = f"{type(exc).__name__}: (traceback unavailable)"
    if len(text) > _ERROR_CAP:
        text = (
            text[: _ERROR_CAP // 2] + "\n[... traceback truncated ...]\n" + text[-_ERROR_CAP // 2 :]
        )
    return text


def main(fd: int, parent_pid: int | None = None) -> None:
    """Entry point of the worker process; ``fd`` is its end of the socketpair.

    ``parent_pid``: the daemon's pid when the worker is its direct child (None under
    bubblewrap, whose ``--die-with-parent`` covers the same ground).
    """
    # SIGKILL when the daemon dies; if it died already, exit before anything else.
    die_with_parent(signal.SIGKILL, parent_pid=parent_pid, check=parent_pid is not None)
    # First of all, before even the first message is read: no capability survives here.
    dropped, drop_error = True, None
    try:
        drop_privileges()
    except OSError as exc:
        dropped, drop_error = False, f"privileges: {exc}"
    sock = socket.socket(fileno=fd)
    chan = ch.BlockingChannel(sock, max_frame_bytes=64 * 1024 * 1024)
    init = chan.recv()
    if not isinstance(init, ch.Init):
        raise SystemExit("rlmd worker: expected Init")
    chan.max_frame_bytes = init.max_frame_bytes
    problems: list[str] = [drop_error] if drop_error else []
    context = load_context(init.context_path, init.str_threshold_bytes, init.index_path)
    kind = "none" if context is None else ("view" if isinstance(context, ContextView) else "str")
    memory = init.memory_bytes
    if memory > 0 and init.context_path is not None and kind == "view":
        memory += os.path.getsize(init.context_path)  # the mapping counts as address space
    rlimits = True
    try:
        apply_rlimits(
            memory_bytes=memory,
            cpu_s=init.cpu_s,
            open_files=init.open_files,
            file_size_bytes=init.file_size_bytes,
        )
    except (OSError, ValueError) as exc:
        rlimits = False
        problems.append(f"rlimits: {exc}")
    landlock = scoped = False
    if init.landlock_rules or init.landlock_scoped:
        # Before any thread starts: Landlock binds the calling thread and its offspring.
        try:
            apply_landlock([(p, r) for p, r in init.landlock_rules], scoped=init.landlock_scoped)
            landlock, scoped = bool(init.landlock_rules), bool(init.landlock_scoped)
        except OSError as exc:
            problems.append(f"landlock: {exc}")
    worker = Worker(chan, init, context)
    threading.Thread(target=worker.reader, name="rlmd-reader", daemon=True).start()
    seccomp = False
    if init.seccomp:
        try:
            install_seccomp()
            seccomp = True
        except OSError as exc:
            problems.append(f"seccomp: {exc}")
    worker.send(
        ch.Ready(
            pid=os.getpid(),
            seccomp=seccomp,
            rlimits=rlimits,
            landlock=landlock,
            context_kind=kind,
            setup_error="; ".join(problems) or None,
            privileges_dropped=dropped,
            landlock_scoped=scoped,
        )
    )
    worker.serve()
