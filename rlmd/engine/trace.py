"""Trajectories: every query's steps as JSON lines under ``<state_dir>/traces/<job>.jsonl``.

A record is appended (and flushed) the moment its step happens, so a query that crashed
or was cancelled still leaves its trace.  Records are flat JSON objects with ``t`` (seconds
since the query started), ``type`` (start, message, code, output, subcall, progress,
final, error, end) and the step's fields.  Known secrets (the values of the providers'
``api_key_env`` variables) are replaced by ``[redacted]`` before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

_SAFE_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")
_encoder = msgspec.json.Encoder()


class TraceNotFound(FileNotFoundError):
    """No trace for the asked job (or none at all); the message says what to do."""


def traces_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "traces"


def trace_path(state_dir: Path, job: str) -> Path:
    """The trace file of ``job``.  Job ids come from clients, so odd ones are hashed."""
    if _SAFE_JOB.fullmatch(job) and ".." not in job:
        stem = job
    else:
        stem = "job-" + hashlib.sha256(job.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return traces_dir(state_dir) / f"{stem}.jsonl"


# A prompt or answer longer than this is written cut (head and tail) with its length and
# hash: issue 14 (Broken 5) saw one query write 1.2 GB of trace from 200 MiB prompts.
TRACE_TEXT_CHARS = 8_000


def clip_for_trace(text: str, limit: int = TRACE_TEXT_CHARS) -> str | dict[str, Any]:
    """``text`` when short; else a reference: its length, SHA-256, head and tail."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    half = limit // 2
    return {"chars": len(text), "sha256": digest, "head": text[:half], "tail": text[-half:]}


class TraceWriter:
    """Appends records to one trace file from a thread of its own.

    ``write`` only queues the record: encoding, redaction and the disk write happen off
    the event loop (with redaction on, doing them on the loop froze ``daemon/ping`` for
    7.2 s in issue 14).  ``close`` (blocking: call it in a thread) drains the queue.
    """

    def __init__(self, path: Path, *, secrets: list[str] | None = None) -> None:
        self.path = path
        self._t0 = time.monotonic()
        # Longest first, so that a secret containing another is redacted whole.
        self._secrets = sorted({s for s in (secrets or []) if len(s) >= 4}, key=len, reverse=True)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_APPEND: each record lands whole at the end even if a reader tails the file.
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600
        )
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="rlmd-trace", daemon=True)
        self._thread.start()

    def write(self, type_: str, **fields: Any) -> None:
        """Queue one record; a closed writer ignores it (late sub-call after the end)."""
        if self._closed:
            return
        self._queue.put({"t": round(time.monotonic() - self._t0, 4), "type": type_, **fields})

    def _drain(self) -> None:
        while (record := self._queue.get()) is not None:
            try:
                data = _encoder.encode(record)
            except (TypeError, ValueError, OverflowError):
                data = _encoder.encode({"t": record.get("t"), "type": "unencodable"})
            if self._secrets:
                data = self._redact(data)
            try:
                assert self._fd is not None
                os.write(self._fd, data + b"\n")
            except OSError:
                # A full disk must not fail the query; the trace is a record, not the result.
                pass

    def _redact(self, data: bytes) -> bytes:
        text = data.decode("utf-8")
        for s in self._secrets:
            # The secret as it appears inside JSON (escaped) and as is.
            for form in {s, _encoder.encode(s).decode()[1:-1]}:
                text = text.replace(form, "[redacted]")
        return text.encode("utf-8")

    def close(self) -> None:
        """Write what is queued and close the file (blocks until then)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prune_traces(
    state_dir: Path, *, keep: int, max_bytes: int, protect: frozenset[Path] = frozenset()
) -> int:
    """Delete the oldest traces beyond ``keep`` files or ``max_bytes`` in all; return how many.

    The newest trace always stays, and so do the ``protect``ed ones (queries still
    running: their files may be older than a finished query's).  A file that vanished
    meanwhile (another prune, a user's ``rm``) is skipped.
    """
    d = traces_dir(state_dir)
    entries: list[tuple[float, int, Path]] = []
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith(".jsonl"):
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    entries.append((st.st_mtime, st.st_size, Path(e.path)))
    except FileNotFoundError:
        return 0
    entries.sort(reverse=True)  # newest first
    count = total = removed = 0
    for i, (_mtime, size, path) in enumerate(entries):
        count += 1
        total += size
        if i == 0 or path in protect or (count <= keep and total <= max_bytes):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        else:
            removed += 1
        count -= 1
        total -= size
    return removed


def read_trace(state_dir: Path, job: str | None = None) -> list[dict[str, Any]]:
    """The records of ``job``'s trace, or of the most recent trace when ``job`` is None.

    A line that is not valid JSON (a record cut by a crash) ends the list.
    """
    d = traces_dir(state_dir)
    if job is None:
        files = sorted(d.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if d.is_dir() else []
        if not files:
            raise TraceNotFound(f"no traces in {d}: run a query first (rlm query ...)")
        path = files[-1]
    else:
        path = trace_path(Path(state_dir), job)
        if not path.is_file():
            raise TraceNotFound(
                f"no trace for job {job!r} in {d}; `rlm trace` with no id shows the latest"
            )
    records: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                break
    return records


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in str(text).splitlines()) or prefix


def _clip(text: str, limit: int) -> str:
    text = str(text)
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit:,} more characters)"


def format_trace(records: list[dict[str, Any]], *, max_chars: int = 4000) -> str:
    """A readable rendering of a trace for ``rlm trace``: turns, code, output, sub-calls."""
    out: list[str] = []
    for r in records:
        t = f"[{r.get('t', 0):8.2f}s]"
        depth = r.get("depth", 1)
        pad = "  " * (depth - 1)
        kind = r.get("type")
        if kind == "start":
            out.append(
                f"{t} query {r.get('job', '')!s}: root={r.get('root_model')} "
                f"sub={r.get('sub_model')} context={r.get('context') or '(none)'} "
                f"({r.get('context_chars', 0):,} chars)"
            )
            out.append(_indent(_clip(r.get("query", ""), max_chars)))
        elif kind == "message":
            role = r.get("role", "?")
            if role == "system":
                out.append(f"{t} {pad}system prompt ({len(r.get('content', '')):,} chars)")
                continue
            extra = ""
            if role == "assistant":
                extra = (
                    f" (iteration {r.get('iteration')}, {r.get('elapsed_s', 0):.2f}s, "
                    f"tokens {r.get('tokens_in', 0)}/{r.get('tokens_out', 0)}"
                    f"{', stopped at fence' if r.get('stopped') else ''})"
                )
            out.append(f"{t} {pad}{role}{extra}:")
            out.append(_indent(_clip(r.get("content", ""), max_chars), pad + "    "))
        elif kind == "repl":
            out.append(
                f"{t} {pad}REPL worker up in {r.get('elapsed_s', 0):.2f}s "
                f"({r.get('protection') or 'protection unknown'})"
            )
        elif kind == "code":
            out.append(f"{t} {pad}code:")
            out.append(_indent(_clip(r.get("code", ""), max_chars), pad + "  | "))
        elif kind == "output":
            flags = [
                f
                for f, on in (("timed out", r.get("timed_out")), ("restarted", r.get("restarted")))
                if on
            ]
            note = f" ({', '.join(flags)})" if flags else ""
            out.append(f"{t} {pad}output in {r.get('elapsed_s', 0):.2f}s{note}:")
            out.append(_indent(_clip(r.get("text", ""), max_chars), pad + "  > "))
        elif kind == "subcall":
            status = r.get("status")
            if status == "start":
                continue
            err = f" error: {r.get('error')}" if r.get("error") else ""
            out.append(
                f"{t} {pad}sub-call {r.get('fn', 'llm_query')} {r.get('model')} {status} "
                f"{r.get('prompt_chars', 0):,} chars in, {r.get('elapsed_s', 0):.2f}s{err}"
            )
        elif kind == "final":
            out.append(f"{t} FINAL ({r.get('how', '')}):")
            out.append(_indent(_clip(r.get("answer", ""), max_chars)))
        elif kind == "error":
            out.append(f"{t} ERROR {r.get('kind')}: {r.get('message')}")
            if r.get("partial"):
                out.append(_indent("partial: " + _clip(r["partial"], max_chars)))
        elif kind == "end":
            tok = r.get("tokens", {})
            out.append(
                f"{t} end: {r.get('iterations', 0)} iterations, {r.get('sub_calls', 0)} sub-calls, "
                f"tokens {tok.get('input', 0)}/{tok.get('output', 0)}, cost ${r.get('cost', 0):.4f}"
            )
    return "\n".join(out) + "\n"
