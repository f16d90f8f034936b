"""The MCP server behind ``rlm mcp``: rlmd's contexts, REPL and models as MCP tools.

Every tool is a thin call of the daemon's socket (see :mod:`rlmd.mcp.link`), so a
context loaded here is there for Emacs and the CLI, and the other way round.  Only MCP
goes to stdout (the SDK's stdio transport); logs go to stderr.

A bad argument, an unknown context or a daemon error is a tool error (``isError``) whose
text says what to do; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import inspect
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp_types import Resource as MCPResource

from rlmd import __version__
from rlmd.mcp.link import DaemonError, DaemonLink
from rlmd.protocol.errors import INVALID_PARAMS

log = logging.getLogger(__name__)

#: peek_context's length when no end is given.
DEFAULT_PEEK_CHARS = 4000
#: The largest context a resource read returns whole (beyond: peek_context).
MAX_RESOURCE_CHARS = 4_000_000
#: How often rlm_query reports progress while the daemon is silent (hosts drop silent
#: calls after about a minute).
HEARTBEAT_S = 10.0
#: A directory context's file headers (rlmd/store/ingest.py file_header).
_FILE_HEADER = r"(?m)^===== (.+) =====$"
_MAX_FILES_LISTED = 2000
_WORD = re.compile(r"\w{2,}")
_STOP = frozenset(
    "the a an and or of to in on for is are was were be by with as at it this that what "
    "which who how why where when does do did from".split()
)

INSTRUCTIONS = """rlmd holds large texts (files, whole repositories) as named contexts that
outlive this session and are shared with the user's other tools. Load one with
load_context, look into it with context_info, search_context and peek_context, run
Python over it with execute_code (the variable `context` holds the text; variables
persist between calls; llm_query(prompt) asks a sub-model), ask the local model pool
with llm_subquery, or have rlmd's own root model answer a question over a whole context
with rlm_query."""


def _hint(exc: DaemonError) -> str:
    if exc.kind in ("not_found", "context_not_found") and "context" in exc.message:
        return " (list_contexts shows the stored contexts; load_context stores one)"
    if exc.code == 0:
        return " (is rlmd running? `rlm status` checks)"
    return ""


class RlmdMcp:
    """The tools, over one daemon link.  ``cwd`` resolves relative paths of load_context
    (the host's project directory, not the daemon's)."""

    def __init__(self, link: DaemonLink, *, cwd: Path) -> None:
        self.link = link
        self.cwd = cwd
        self._sessions: dict[str, tuple[int, str]] = {}  # context -> (link generation, id)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return await self.link.call(method, params)
        except DaemonError as exc:
            raise ToolError(f"{exc.message}{_hint(exc)}") from None

    # --- contexts -------------------------------------------------------------------

    async def load_context(
        self,
        name: str,
        content: str | None = None,
        path: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> dict[str, Any]:
        """Store a context: inline `content`, or a file or directory at `path` (read by the
        daemon; a directory becomes one text with a `===== path =====` header per file,
        honouring .gitignore; `include`/`exclude` are globs). Replaces an earlier context
        of that name. Returns its size and the files that were skipped."""
        if (content is None) == (path is None):
            raise ToolError(
                "give exactly one of `content` (the text itself) or `path` (a file or "
                "directory on this machine)"
            )
        params: dict[str, Any] = {"name": name}
        if content is not None:
            if include or exclude:
                raise ToolError("include/exclude apply only with `path`")
            params["text"] = content
        else:
            p = Path(await asyncio.to_thread(os.path.expanduser, path or ""))
            params["path"] = str(p if p.is_absolute() else self.cwd / p)
            if include:
                params["include"] = include
            if exclude:
                params["exclude"] = exclude
        r = await self.call("context/put", params)
        self._sessions.pop(name, None)  # a REPL bound to the old text would mislead
        skipped = r.get("skipped") or []
        return {
            "name": r["name"],
            "chars": r["chars"],
            "lines": r["lines"],
            "tokens_est": r["tokens_est"],
            "files": r.get("files", 0),
            "skipped": skipped[:50],
            "skipped_count": len(skipped),
        }

    async def list_contexts(self) -> dict[str, Any]:
        """The stored contexts: name, size in characters, lines and estimated tokens."""
        keys = ("name", "chars", "lines", "tokens_est", "updated")
        return {
            "contexts": [{k: c[k] for k in keys if k in c} for c in await self.call("context/list")]
        }

    async def context_info(self, name: str) -> dict[str, Any]:
        """Size (chars, lines, tokens), version, times, and for a directory context the
        files it holds with the line where each starts."""
        info = await self.call("context/info", {"name": name})
        files = await self._files(name)
        return {
            "name": info["name"],
            "chars": info["chars"],
            "bytes": info["bytes"],
            "lines": info["lines"],
            "tokens": info["tokens_est"],
            "version": info["version"],
            "created": info["created"],
            "updated": info["updated"],
            "files": files,
            "files_truncated": len(files) >= _MAX_FILES_LISTED,
        }

    async def _files(self, name: str) -> list[dict[str, Any]]:
        """A directory context's files: path, the line and offset of its header."""
        found = await self.call(
            "context/search",
            {"name": name, "pattern": _FILE_HEADER, "max_matches": _MAX_FILES_LISTED},
        )
        return [
            {"path": m["text"][6:-6], "line": m["line"], "start": m["start"]}
            for m in found.get("matches", [])
        ]

    async def peek_context(self, name: str, start: int = 0, end: int | None = None) -> str:
        """The exact text of characters [start, end) of a context (default: 4000
        characters from start). Offsets are characters, as context_info's `chars`."""
        if start < 0 or (end is not None and end < start):
            raise ToolError(f"need 0 <= start <= end (character offsets); got {start}..{end}")
        stop = start + DEFAULT_PEEK_CHARS if end is None else end
        r = await self.call("context/peek", {"name": name, "start": start, "end": stop})
        return r["text"]

    async def search_context(self, name: str, query: str, k: int = 10) -> dict[str, Any]:
        """Find where a context talks about `query` (words or a question): up to k hits,
        each with its character offsets (for peek_context), line and text."""
        if not query.strip():
            raise ToolError("`query` is empty: give words or a question to look for")
        if not 1 <= k <= 200:
            raise ToolError("k must be between 1 and 200")
        ranked = {"name": name, "mode": "ranked", "query": query}
        for params in ({**ranked, "max_matches": k}, ranked):
            try:
                r = await self.link.call("context/search", params)
                return {"mode": "ranked", "hits": r.get("matches", r.get("hits", []))[:k]}
            except DaemonError as exc:
                # Invalid params: this daemon has no ranked search (or no count for it).
                if exc.code != INVALID_PARAMS:
                    raise ToolError(f"{exc.message}{_hint(exc)}") from None
        return {"mode": "keyword", "hits": await self._keyword_search(name, query, k)}

    async def _keyword_search(self, name: str, query: str, k: int) -> list[dict[str, Any]]:
        # Until the daemon ranks: lines scored by how many of the query's words they hold.
        words = [w for w in dict.fromkeys(_WORD.findall(query.lower())) if w not in _STOP]
        if not words:
            words = [query.strip().lower()]
        pattern = "(?i)" + "|".join(re.escape(w) for w in words)
        found = await self.call(
            "context/search", {"name": name, "pattern": pattern, "max_matches": 2000}
        )
        by_line: dict[int, list[dict[str, Any]]] = {}
        for m in found.get("matches", []):
            by_line.setdefault(m["line"], []).append(m)
        ranked = sorted(
            by_line.items(), key=lambda kv: (-len({x["text"].lower() for x in kv[1]}), kv[0])
        )
        files = await self._files(name)
        starts = [f["start"] for f in files]
        hits = []
        for line, ms in ranked[:k]:
            a, b = ms[0]["start"], ms[-1]["end"]
            lo = max(0, a - 120)
            around = await self.call("context/peek", {"name": name, "start": lo, "end": b + 120})
            hit = {"start": a, "end": b, "line": line, "text": around["text"], "text_start": lo}
            i = bisect.bisect_right(starts, a) - 1
            if i >= 0:  # a directory context: the file and the line in it, as sources have
                hit["file"] = files[i]["path"]
                hit["file_line"] = line - files[i]["line"]
            hits.append(hit)
        return hits

    # --- code and models --------------------------------------------------------------

    async def execute_code(self, code: str, context: str) -> dict[str, Any]:
        """Run Python in rlmd's sandboxed REPL bound to `context` (the variable `context`
        holds its text, usable as a str). Variables persist between calls for the same
        context. In the code: llm_query(prompt), llm_query_batched(prompts) (sub-model
        calls through rlmd's pool), SHOW_VARS(). No network, no files outside a scratch
        directory. Returns stdout, the error (a traceback) and whether output was cut."""
        note = ""
        sid = await self._session(context)
        try:
            r = await self.link.call("repl/exec", {"session": sid, "code": code})
        except DaemonError as exc:
            if exc.kind != "not_found" and exc.code != 0:
                raise ToolError(exc.message) from None
            # Closed (idle timeout, daemon restart): a fresh session; say what was lost.
            self._sessions.pop(context, None)
            sid = await self._session(context)
            note = f"a new REPL session was opened (the previous one is gone: {exc.message})"
            r = await self.call("repl/exec", {"session": sid, "code": code})
        out = {
            "stdout": r["stdout"],
            "error": r["error"],
            "truncated": r["truncated"],
            "elapsed_s": r["elapsed_s"],
        }
        if r.get("restarted"):
            note = "the REPL was restarted: earlier variables are gone"
        if r.get("final") is not None:
            out["final"] = r["final"]
        if note:
            out["note"] = note
        return out

    async def _session(self, context: str) -> str:
        have = self._sessions.get(context)
        if have is not None and have[0] == self.link.generation:
            return have[1]
        r = await self.call("repl/open", {"context": context})
        self._sessions[context] = (self.link.generation, r["session"])
        return r["session"]

    async def llm_subquery(self, prompt: str, model: str | None = None) -> dict[str, Any]:
        """One call of a sub-model through rlmd's pool (local GPUs first; cached and
        accounted). `model`: default the configured sub model. Returns text, model,
        provider, tokens, cost and whether it came from the cache."""
        return await self.call(
            "llm/query", {"prompt": prompt, **({"model": model} if model else {})}
        )

    async def rlm_query(
        self, ctx: Context, question: str, context: str, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A full RLM run: rlmd's root model writes code over the whole context, asks
        sub-models, and answers. Returns the answer, its sources (character spans of the
        context) when found, tokens, cost and the trace id. Long runs report progress.
        `options`: max_iterations, max_depth, root_model, sub_model, timeout_s, max_cost,
        mode, cache."""
        job = f"mcp-{uuid.uuid4().hex[:12]}"
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        unwatch = self.link.watch(job, events.put_nowait)
        params: dict[str, Any] = {"query": question, "job": job}
        if context:
            params["context"] = context
        if options:
            params["options"] = options
        run = asyncio.ensure_future(self.link.call("query/run", params))
        try:
            await _report_while(run, events, ctx)
            r = await run
        except DaemonError as exc:
            raise ToolError(f"{exc.message}{_hint(exc)}") from None
        except asyncio.CancelledError:
            # The host cancelled (notifications/cancelled): stop the daemon's query too.
            run.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.link.call("query/cancel", {"job": job}))
            raise
        finally:
            unwatch()
        out = {
            "answer": r.get("answer"),
            "job": r.get("job", job),
            "trace": r.get("trace"),
            "tokens": r.get("tokens"),
            "cost": r.get("cost"),
            "iterations": r.get("iterations"),
            "sub_calls": r.get("sub_calls"),
            "elapsed_s": r.get("elapsed_s"),
        }
        if r.get("sources"):
            out["sources"] = r["sources"]
        if "supported" in r:
            out["supported"] = r["supported"]
        return out


async def _report_while(
    run: asyncio.Future[Any], events: asyncio.Queue[dict[str, Any]], ctx: Context
) -> None:
    """Turn the job's query/event stream into MCP progress until ``run`` finishes."""
    n = 0
    while not run.done():
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait(
            {run, getter}, timeout=HEARTBEAT_S, return_when="FIRST_COMPLETED"
        )
        if getter not in done:
            getter.cancel()
            if run.done():
                break
            n += 1
            await ctx.report_progress(n, None, "working")
            continue
        msg = _describe(getter.result())
        if msg is not None:
            n += 1
            await ctx.report_progress(n, None, msg)


def _describe(ev: dict[str, Any]) -> str | None:
    kind = ev.get("kind")
    if kind == "progress":
        t = ev.get("tokens") or {}
        return (
            f"iteration {ev.get('iteration')}, {ev.get('sub_calls')} sub-calls, "
            f"{t.get('input', 0) + t.get('output', 0)} tokens"
        )
    if kind == "code":
        return "running code"
    if kind == "subcall" and ev.get("status") == "start":
        return f"asking {ev.get('model')}"
    if kind == "final":
        return "answered"
    return None


class _Server(MCPServer):
    """MCPServer whose resource list is the daemon's contexts, read when listed."""

    def __init__(self, tools: RlmdMcp, **kw: Any) -> None:
        super().__init__(**kw)
        self._rlmd = tools

    async def list_resources(self) -> list[MCPResource]:
        try:
            contexts = await self._rlmd.link.call("context/list")
        except DaemonError as exc:
            log.warning("cannot list contexts: %s", exc.message)
            contexts = []
        return [
            MCPResource(
                uri=f"rlm://context/{c['name']}",
                name=c["name"],
                description=f"rlmd context: {c['chars']} characters, {c['lines']} lines",
                mime_type="text/plain",
                size=c.get("bytes"),
            )
            for c in contexts
        ]


def build_server(tools: RlmdMcp) -> MCPServer:
    """The MCP server with rlmd's tools and the contexts as resources."""
    server = _Server(
        tools, name="rlmd", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING"
    )
    for fn in (
        tools.load_context,
        tools.list_contexts,
        tools.context_info,
        tools.peek_context,
        tools.search_context,
        tools.execute_code,
        tools.llm_subquery,
        tools.rlm_query,
    ):
        server.add_tool(fn, description=inspect.cleandoc(fn.__doc__ or ""))

    @server.resource("rlm://context/{name}", mime_type="text/plain")
    async def read_context(name: str) -> str:
        """The whole text of a stored context."""
        try:
            info = await tools.link.call("context/info", {"name": name})
            if info["chars"] > MAX_RESOURCE_CHARS:
                raise ResourceError(
                    f"context {name!r} has {info['chars']} characters, more than a resource "
                    f"read returns ({MAX_RESOURCE_CHARS}); use the peek_context tool"
                )
            r = await tools.link.call(
                "context/peek", {"name": name, "start": 0, "end": info["chars"]}
            )
        except DaemonError as exc:
            raise ResourceError(f"{exc.message}{_hint(exc)}") from None
        return r["text"]

    return server


async def serve(socket_path: Path, *, autostart: bool) -> int:
    """Serve MCP on stdin/stdout until the host closes them."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from rlmd.mcp.link import MAX_LINE

        try:
            return await asyncio.open_unix_connection(str(socket_path), limit=MAX_LINE)
        except (FileNotFoundError, ConnectionRefusedError):
            if not autostart:
                raise
        from rlmd.cli.main import start_daemon  # says so on stderr, as `rlm` does

        await asyncio.to_thread(start_daemon, socket_path)
        return await asyncio.open_unix_connection(str(socket_path), limit=MAX_LINE)

    link = DaemonLink(connect)
    try:
        await link.call("daemon/ping")  # fail now, clearly, rather than at the first tool
    except (OSError, RuntimeError, DaemonError) as exc:  # RuntimeError: it did not start
        log.error("cannot reach rlmd on %s: %s", socket_path, exc)
        return 1
    server = build_server(RlmdMcp(link, cwd=Path.cwd()))
    try:
        await server.run_stdio_async()
    finally:
        await link.aclose()
    return 0
