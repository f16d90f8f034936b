"""A REPL session closes as soon as the connection that opened it closes, through the
server's ``Connection.on_close`` hook, not at the registry's next sweep.

The real socket server (``rlmd.server.Server``) and the real ``repl/*`` handlers over a
real ``ReplRegistry`` whose workers are real sandboxed processes, in this test's event
loop; the sweeper's interval is set far beyond the test's deadline, so only the hook can
close the session in time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
from functools import partial
from pathlib import Path

from rlmd.config import Config
from rlmd.protocol.jsonrpc import Dispatcher, Method
from rlmd.protocol.schema import ReplExecParams, ReplOpenParams
from rlmd.repl.handlers import repl_exec, repl_list, repl_open
from rlmd.repl.registry import ReplRegistry
from rlmd.server import Server


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, params):
    writer.write(
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode() + b"\n"
    )
    await writer.drain()
    return json.loads(await reader.readline())


async def test_sessions_close_when_their_connection_closes(tmp_path: Path) -> None:
    reg = ReplRegistry(
        config=Config(), store=None, pool=None, state_dir=tmp_path, sweep_interval_s=3600
    )
    table = {
        "repl/open": Method.of(partial(repl_open, reg), ReplOpenParams),
        "repl/list": Method.of(partial(repl_list, reg)),
        "repl/exec": Method.of(partial(repl_exec, reg), ReplExecParams),
    }
    closed = asyncio.Event()

    class _Closed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "closed: the connection that opened it closed" in record.getMessage():
                closed.set()

    handler = _Closed()
    log = logging.getLogger("rlmd.repl.registry")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    server = Server(Dispatcher(table), max_frame=64 * 1024 * 1024)
    sock_dir = tempfile.mkdtemp(prefix="rlmd-oc-", dir="/tmp")
    path = os.path.join(sock_dir, "s.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    await server.start(lsock)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        opened = await _call(reader, writer, "repl/open", {})
        sid = opened["result"]["session"]
        assert len(reg) == 1
        writer.close()
        await writer.wait_closed()
        # The hook closes it at once; the sweeper would wait 450 s (idle_timeout_s / 4).
        async with asyncio.timeout(20):
            await closed.wait()
        assert len(reg) == 0
        r2, w2 = await asyncio.open_unix_connection(path)
        assert (await _call(r2, w2, "repl/list", {}))["result"] == {"sessions": []}
        late = await _call(r2, w2, "repl/exec", {"session": sid, "code": "1"})
        assert "the connection that opened it closed" in late["error"]["message"], late
        w2.close()
    finally:
        log.removeHandler(handler)
        await reg.aclose()
        await server.stop_accepting()
        lsock.close()
        os.unlink(path)
        os.rmdir(sock_dir)
