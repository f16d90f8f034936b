"""``rlm mcp`` end to end: the MCP SDK's own client (ClientSession over stdio_client)
starts ``rlm mcp`` against a real daemon whose models are a scripted loopback server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from rlmd.client import Client
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

REPO = Path(__file__).resolve().parents[1]
F = "```"
TOOLS = {
    "load_context",
    "list_contexts",
    "context_info",
    "peek_context",
    "search_context",
    "execute_code",
    "llm_subquery",
    "rlm_query",
}


class Script:
    """Root turns by regex on the last user message; sub calls echo their prompt."""

    def __init__(self) -> None:
        self.root: list[tuple[str, ScriptedReply]] = []

    def __call__(self, call: ChatCall) -> ScriptedReply | None:
        if call.model == "sub":
            return ScriptedReply(text=f"sub says: {call.last_user[:60]}")
        for pattern, reply in self.root:
            if re.search(pattern, call.last_user, re.S):
                return reply
        return None


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def served(make_daemon, scripted_config, script):
    with ScriptedServer(responder=script, models=["root", "sub"]) as srv:
        extra = "\n[limits]\ncell_timeout_s = 20\n\n[pool]\nretries = 1\n"
        yield make_daemon(scripted_config(srv.url, extra)), srv


def mcp_argv(d) -> list[str]:
    return ["-m", "rlmd.cli.main", "--socket", str(d.socket), "--no-start", "mcp"]


@contextlib.asynccontextmanager
async def mcp_client(d) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable, args=mcp_argv(d), env={"PYTHONPATH": str(REPO)}, cwd=str(d.root)
    )
    err = await asyncio.to_thread(open, d.root / "mcp.err", "w")  # the server's stderr
    try:
        async with stdio_client(params, errlog=err) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            yield s
    finally:
        err.close()


def text_of(res) -> str:
    return "".join(getattr(c, "text", "") for c in res.content)


def data_of(res):
    assert not res.is_error, text_of(res)
    return json.loads(text_of(res))


async def test_every_tool(served, tmp_path):
    d, _srv = served
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "app.py").write_text("def main():\n    return 'the launch code is ZEBRA'\n")
    (repo / "README.md").write_text("# Demo\nNothing here about codes.\n")
    text = "".join(f"line {i}: π is about 3.14159 — café {i}\n" for i in range(3000))
    async with mcp_client(d) as s:
        names = {t.name for t in (await s.list_tools()).tools}
        assert names >= TOOLS
        put = data_of(await s.call_tool("load_context", {"name": "doc", "content": text}))
        assert put["chars"] == len(text) and put["lines"] == 3000
        rp = data_of(await s.call_tool("load_context", {"name": "repo", "path": str(repo)}))
        assert rp["files"] == 2 and rp["skipped_count"] == 0

        # peek: the exact characters, multibyte ones included; a default length.
        for a, b in ((0, 10), (12345, 12399), (len(text) - 7, len(text))):
            r = await s.call_tool("peek_context", {"name": "doc", "start": a, "end": b})
            assert not r.is_error and text_of(r) == text[a:b]
        r = await s.call_tool("peek_context", {"name": "doc", "start": 100})
        assert text_of(r) == text[100:4100]

        listed = {c["name"] for c in data_of(await s.call_tool("list_contexts", {}))["contexts"]}
        assert listed >= {"doc", "repo"}
        info = data_of(await s.call_tool("context_info", {"name": "repo"}))
        assert {f["path"] for f in info["files"]} == {"src/app.py", "README.md"}
        assert info["chars"] > 0 and info["lines"] > 0 and info["tokens"] > 0 and info["version"]

        found = data_of(
            await s.call_tool("search_context", {"name": "repo", "query": "launch code", "k": 3})
        )
        assert found["hits"] and "ZEBRA" in found["hits"][0]["text"]
        hit = found["hits"][0]
        assert hit["file"] == "src/app.py" and hit["file_line"] == 2
        peek = await s.call_tool(
            "peek_context", {"name": "repo", "start": hit["start"], "end": hit["end"]}
        )
        assert "launch" in text_of(peek).lower()

        # execute_code: variables persist; the sandbox has no network.
        r1 = data_of(
            await s.call_tool(
                "execute_code", {"context": "doc", "code": "n = context.count('café')\nprint(n)"}
            )
        )
        assert r1["stdout"].strip() == "3000" and r1["error"] is None and r1["truncated"] is False
        r2 = data_of(await s.call_tool("execute_code", {"context": "doc", "code": "print(n + 1)"}))
        assert r2["stdout"].strip() == "3001"
        net = data_of(
            await s.call_tool(
                "execute_code",
                {
                    "context": "doc",
                    "code": (
                        "import socket\n"
                        f"s = socket.socket(socket.AF_UNIX)\ns.connect({str(d.socket)!r})\n"
                        "print('connected')"
                    ),
                },
            )
        )
        assert "connected" not in net["stdout"] and net["error"]
        sub = data_of(
            await s.call_tool(
                "execute_code", {"context": "doc", "code": "print(llm_query('hello there'))"}
            )
        )
        assert "sub says: hello there" in sub["stdout"]

        ans = data_of(await s.call_tool("llm_subquery", {"prompt": "what is 2+2"}))
        assert ans["text"] == "sub says: what is 2+2" and ans["model"] == "sub"
        assert ans["provider"] == "scripted" and "cost" in ans and "cached" in ans

        # Every context is a resource.
        uris = {str(x.uri) for x in (await s.list_resources()).resources}
        assert {"rlm://context/doc", "rlm://context/repo"} <= uris
        res = await s.read_resource("rlm://context/doc")
        assert res.contents[0].text == text


async def test_errors_are_tool_errors_and_the_server_goes_on(served):
    d, _srv = served
    async with mcp_client(d) as s:
        bad = [
            ("peek_context", {"name": "nope"}, "load_context"),
            ("context_info", {"name": "nope"}, "list_contexts"),
            ("load_context", {"name": "x"}, "exactly one"),
            ("load_context", {"name": "x", "content": "a", "path": "/tmp"}, "exactly one"),
            ("load_context", {"name": "x", "path": "/no/such/dir"}, "/no/such/dir"),
            ("peek_context", {"name": "nope", "start": -1}, "start"),
            ("peek_context", {"name": "doc", "start": "abc"}, "start"),
            ("execute_code", {"context": "nope", "code": "1"}, "load_context"),
            ("search_context", {"name": "nope", "query": ""}, "query"),
            ("llm_subquery", {"prompt": "x", "model": "no-such-model"}, "no-such-model"),
            ("rlm_query", {"question": "q", "context": "nope"}, "nope"),
            ("rlm_query", {"question": "q", "context": "", "options": {"bogus": 1}}, "bogus"),
        ]
        for tool, args, needle in bad:
            r = await s.call_tool(tool, args)
            assert r.is_error, (tool, args, text_of(r))
            assert needle in text_of(r), (tool, text_of(r))
        # Still serving, and the daemon too.
        r = await s.call_tool("load_context", {"name": "ok", "content": "fine"})
        assert not r.is_error
        assert text_of(await s.call_tool("peek_context", {"name": "ok"})) == "fine"
    assert d.call("daemon/ping") == "pong"


async def test_rlm_query_reports_progress_and_answers(served, script):
    d, _srv = served
    d.call("context/put", {"name": "doc", "text": "alpha\nthe secret word is HERON\nomega\n"})
    script.root.append(
        (
            r"secret word",
            ScriptedReply(
                text=f"{F}repl\nimport re\nprint('w=' + re.search(r'word is (\\w+)', context).group(1))\n{F}\n"
            ),
        )
    )
    script.root.append((r"w=HERON", ScriptedReply(text="FINAL(HERON)")))
    progress: list[tuple[float, str | None]] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append((p, message))

    async with mcp_client(d) as s:
        r = await s.call_tool(
            "rlm_query",
            {"question": "What is the secret word?", "context": "doc"},
            progress_callback=on_progress,
        )
        out = data_of(r)
    assert out["answer"] == "HERON"
    assert out["trace"] and out["job"].startswith("mcp-")
    assert set(out["tokens"]) >= {"input", "output"} and out["cost"] is not None
    assert progress and any(m == "running code" for _, m in progress)
    assert [p for p, _ in progress] == sorted(p for p, _ in progress)


async def test_cancel_stops_the_query_on_the_daemon(served, script):
    d, _srv = served
    d.call("context/put", {"name": "doc", "text": "some text\n"})
    script.root.append((r"Question", ScriptedReply(text=f"{F}repl\nprint('step one')\n{F}\n")))
    script.root.append((r"step one", ScriptedReply(text="FINAL(late)", delay_s=30)))
    started = anyio.Event()

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        if message == "running code":
            started.set()

    async with mcp_client(d) as s:
        scope = anyio.CancelScope()

        async def ask() -> None:
            with scope:
                await s.call_tool(
                    "rlm_query",
                    {"question": "What happens?", "context": "doc"},
                    progress_callback=on_progress,
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            with anyio.fail_after(30):
                await started.wait()
            jobs = await asyncio.to_thread(d.call, "query/jobs")
            assert len(jobs["jobs"]) == 1 and jobs["jobs"][0].startswith("mcp-")
            t0 = time.monotonic()
            scope.cancel()
        # The daemon's query is gone well before the model would have answered.
        while (await asyncio.to_thread(d.call, "query/jobs"))["jobs"]:
            assert time.monotonic() - t0 < 20, "the query kept running after the cancel"
            await asyncio.sleep(0.05)
        assert not (await s.call_tool("list_contexts", {})).is_error


async def test_an_older_protocol_version_and_a_clean_stdout(served):
    """mcp.el offers 2025-03-26; every byte on stdout is a JSON-RPC message."""
    d, _srv = served
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *mcp_argv(d),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdin is not None and proc.stdout is not None

    async def send(msg: dict) -> None:
        proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await proc.stdin.drain()

    async def answer(rid: int) -> dict:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "rlm mcp closed stdout"
            msg = json.loads(line)  # anything else on stdout fails here
            assert msg.get("jsonrpc") == "2.0"
            if msg.get("id") == rid:
                return msg

    try:
        await send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-03-26",
                    "capabilities": {},
                    "clientInfo": {"name": "mcp.el", "version": "0.1"},
                },
            }
        )
        init = await answer(1)
        assert init["result"]["protocolVersion"] == "2025-03-26"
        assert "tools" in init["result"]["capabilities"]
        await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        tools = {t["name"] for t in (await answer(2))["result"]["tools"]}
        assert tools >= TOOLS
        await send(
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "load_context", "arguments": {"name": "old", "content": "hi"}},
            }
        )
        assert (await answer(3))["result"]["isError"] is False
        await send(
            {
                "jsonrpc": "2.0",
                "id": 4,
                "method": "tools/call",
                "params": {"name": "peek_context", "arguments": {"name": "old"}},
            }
        )
        assert (await answer(4))["result"]["content"][0]["text"] == "hi"
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_starts_a_daemon_when_none_answers(short_tmp):
    """Like `rlm`, `rlm mcp` starts rlmd on RLMD_SOCKET when nothing listens there."""
    sock = short_tmp / "auto.sock"
    cfg = short_tmp / "c.toml"
    cfg.write_text(
        '[[providers]]\nname = "x"\nkind = "ollama"\nbase_url = "http://127.0.0.1:9"\n'
        'models = ["m"]\n[models]\nroot = "m"\nsub = "m"\n'
    )
    env = {
        "PYTHONPATH": str(REPO),
        "RLMD_SOCKET": str(sock),
        "RLMD_STATE_DIR": str(short_tmp / "state"),
        "RLMD_CONFIG": str(cfg),
    }
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "rlmd.cli.main", "mcp"], env=env, cwd=str(short_tmp)
    )
    err = await asyncio.to_thread(open, short_tmp / "mcp.err", "w")
    pid = None
    try:
        async with stdio_client(params, errlog=err) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            assert not (await s.call_tool("load_context", {"name": "a", "content": "b"})).is_error
            with Client(sock) as c:
                pid = c.call("daemon/status")["pid"]
                assert [x["name"] for x in c.call("context/list")] == ["a"]
    finally:
        err.close()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    assert "started rlmd" in (short_tmp / "mcp.err").read_text()
