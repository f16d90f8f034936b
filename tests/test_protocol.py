"""The wire contract, against the real daemon over its socket, in both framings."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

from rlmd.client import Client, RpcError
from rlmd.protocol.framing import FrameDecoder, FrameError, Framing


def raw_exchange(path, payload: bytes, *, expect: int, timeout: float = 10) -> list:
    """Send raw bytes as NDJSON, half-close, and read every answer line until EOF."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    out = [json.loads(line) for line in data.split(b"\n") if line.strip()]
    assert len(out) == expect, out
    return out


def test_status_both_framings(daemon):
    for framing in (Framing.NDJSON, Framing.CONTENT_LENGTH):
        with daemon.client(framing) as c:
            st = c.call("daemon/status")
        assert st["pid"] == daemon.proc.pid
        assert st["version"]
        assert isinstance(st["providers"], list)
        assert st["contexts"] == 0
        assert st["uptime_s"] >= 0


def test_socket_permissions(daemon):
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) == 0o700


def test_spec_examples(daemon):
    """The JSON-RPC 2.0 specification's examples, answered element by element."""
    p = daemon.socket
    # rpc call with an unknown method
    [r] = raw_exchange(p, b'{"jsonrpc": "2.0", "method": "foobar", "id": "1"}\n', expect=1)
    assert r["error"]["code"] == -32601 and r["id"] == "1"
    # invalid JSON
    [r] = raw_exchange(
        p, b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]\n', expect=1
    )
    assert r["error"]["code"] == -32700 and r["id"] is None
    # invalid Request object
    [r] = raw_exchange(p, b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}\n', expect=1)
    assert r["error"]["code"] == -32600 and r["id"] is None
    # batch, invalid JSON
    [r] = raw_exchange(
        p,
        b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        b'{"jsonrpc": "2.0", "method"]\n',
        expect=1,
    )
    assert r["error"]["code"] == -32700
    # empty array
    [r] = raw_exchange(p, b"[]\n", expect=1)
    assert r["error"]["code"] == -32600 and r["id"] is None
    # invalid batch but not empty: [1]
    [r] = raw_exchange(p, b"[1]\n", expect=1)
    assert isinstance(r, list) and len(r) == 1 and r[0]["error"]["code"] == -32600
    # invalid batch: [1,2,3]
    [r] = raw_exchange(p, b"[1,2,3]\n", expect=1)
    assert [e["error"]["code"] for e in r] == [-32600] * 3
    # mixed batch
    batch = [
        {"jsonrpc": "2.0", "method": "daemon/status", "id": "1"},
        {"jsonrpc": "2.0", "method": "context/list"},
        {"jsonrpc": "2.0", "method": "context/drop", "params": {"name": 7}, "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "context/list", "id": "9"},
    ]
    [r] = raw_exchange(p, json.dumps(batch).encode() + b"\n", expect=1)
    by_id = {e.get("id"): e for e in r}
    assert len(r) == 5
    assert "result" in by_id["1"]
    assert by_id["2"]["error"]["code"] == -32602
    assert by_id[None]["error"]["code"] == -32600
    assert by_id["5"]["error"]["code"] == -32601
    assert by_id["9"]["result"] == []
    # all notifications: no answer at all
    raw_exchange(
        p,
        b'[{"jsonrpc": "2.0", "method": "context/list"},'
        b'{"jsonrpc": "2.0", "method": "daemon/status"}]\n',
        expect=0,
    )


def test_invalid_params_named(daemon):
    with daemon.client() as c:
        with pytest.raises(RpcError) as ei:
            c.call("context/peek", {"name": "x", "start": "zero"})
        assert ei.value.code == -32602
        assert "start" in ei.value.message
        with pytest.raises(RpcError) as ei:
            c.call("context/peek", {"name": "x", "strat": 0})
        assert ei.value.code == -32602 and "strat" in ei.value.message
        with pytest.raises(RpcError) as ei:
            c.call("context/peek", ["x", 0, 1])
        assert ei.value.code == -32602
        # The connection is still usable after errors.
        assert c.call("context/list") == []


def test_application_error_has_kind(daemon):
    with daemon.client() as c, pytest.raises(RpcError) as ei:
        c.call("context/peek", {"name": "missing", "start": 0, "end": 5})
    assert -32099 <= ei.value.code <= -32000
    assert ei.value.kind == "not_found"
    assert "missing" in ei.value.message


def test_garbage_bytes_then_daemon_still_serves(daemon):
    for junk in (
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(4096),
    ):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(daemon.socket))
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        # Either a parse/framing error was answered or the connection was closed; never a hang.
        if data:
            assert b"error" in data
    assert daemon.call("daemon/status")["pid"] == daemon.proc.pid


def test_oversize_frame_refused_before_body(make_daemon):
    d = make_daemon("[limits]\nmax_frame_bytes = 67108864\n")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(d.socket))
    # Only the header: the daemon must answer without waiting for the 100 MB body.
    s.sendall(b"Content-Length: 100000000\r\n\r\n")
    data = s.recv(65536)
    assert b"frame limit" in data and b"-32600" in data
    assert s.recv(65536) == b""  # closed
    s.close()
    # An over-long NDJSON line is refused too, once it passes the limit.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(d.socket))
    piece = b'{"jsonrpc":"2.0","method":"context/put","params":{"name":"x","text":"' + b"a" * (
        1 << 20
    )
    sent = 0
    try:
        while sent < 70 * (1 << 20):
            s.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    s.close()
    assert b"frame limit" in data
    assert d.call("daemon/status")["pid"] == d.proc.pid


def test_client_disconnects_mid_request(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    s.sendall(b'{"jsonrpc":"2.0","method":"context/put","id":1,"params":{"name":"half","text":"abc')
    s.close()
    time.sleep(0.2)
    assert daemon.call("context/list") == []


def test_half_close_answers_everything(daemon):
    lines = b"".join(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "context/put",
                "id": i,
                "params": {"name": f"c{i}", "text": "x" * i},
            }
        ).encode()
        + b"\n"
        for i in range(1, 21)
    )
    out = raw_exchange(daemon.socket, lines, expect=20)
    assert sorted(r["id"] for r in out) == list(range(1, 21))
    assert all(r["result"]["chars"] == r["id"] for r in out)


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_socat_script(daemon):
    req = (
        b'{"jsonrpc":"2.0","method":"context/put","id":1,"params":{"name":"s","text":"hello\\nworld"}}\n'
        b'{"jsonrpc":"2.0","method":"context/search","id":2,"params":{"name":"s","pattern":"w.r"}}\n'
    )
    out = subprocess.run(
        ["socat", "-t", "30", "-", f"UNIX-CONNECT:{daemon.socket}"],
        input=req,
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    replies = {r["id"]: r for r in map(json.loads, out.splitlines())}
    assert replies[1]["result"]["lines"] == 2
    [m] = replies[2]["result"]["matches"]
    assert (m["start"], m["end"], m["line"], m["text"]) == (6, 9, 2, "wor")


def test_second_daemon_refuses(daemon, make_daemon):
    d2 = make_daemon(start=False)
    d2.socket = daemon.socket
    r = subprocess.run(d2.args(), capture_output=True, text=True, timeout=30, env=d2.env)
    assert r.returncode == 1
    assert "already" in r.stderr and str(daemon.socket) in r.stderr
    assert daemon.call("daemon/status")["pid"] == daemon.proc.pid


def test_stale_socket_replaced(make_daemon):
    d = make_daemon(start=False)
    # A socket file left behind by a dead daemon.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(d.socket))
    s.close()
    d.start()
    assert d.call("daemon/status")["pid"] == d.proc.pid


def test_peer_with_other_uid_refused(daemon):
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    for d in (daemon.root.parent, daemon.root):
        os.chmod(d, 0o755)
    os.chmod(daemon.socket, 0o666)
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
        "data = b''\n"
        "while True:\n"
        "    c = s.recv(4096)\n"
        "    if not c: break\n"
        "    data += c\n"
        "sys.stdout.write(data.decode())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(daemon.socket)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert "peer_refused" in r.stdout and '"pid"' not in r.stdout


def test_sigterm_exits_cleanly_and_removes_socket(daemon):
    assert daemon.stop() == 0
    assert not daemon.socket.exists()


def test_systemd_socket_activation(short_tmp):
    path = short_tmp / "act.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(16)
    code = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "from rlmd.daemon import main\n"
        "sys.exit(main(['--state-dir', sys.argv[2]]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(lsock.fileno()), str(short_tmp / "st")],
        pass_fds=(lsock.fileno(),),
        stderr=subprocess.PIPE,
    )
    lsock.close()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(path, timeout=5) as c:
                    st = c.call("daemon/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "activated daemon never answered"
                time.sleep(0.05)
        assert st["pid"] == proc.pid
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_bad_config_names_key_and_file(make_daemon):
    d = make_daemon("[limits]\ncell_timout_s = 3\n", start=False)
    r = subprocess.run(d.args(), capture_output=True, text=True, timeout=30, env=d.env)
    assert r.returncode == 2
    assert "cell_timout_s" in r.stderr and str(d.config) in r.stderr


def test_frame_decoder_unit():
    dec = FrameDecoder(100)
    assert dec.feed(b"  \n") == []
    assert dec.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert dec.feed(b":2}\n") == [b'{"b":2}']
    dec = FrameDecoder(100)
    body = b'{"x":1}'
    assert dec.feed(b"Content-Length: 7\r\nContent-Type: application/json\r\n\r\n" + body[:3]) == []
    assert dec.feed(body[3:] + b"Content-Length: 2\r\n\r\n[]") == [body, b"[]"]
    with pytest.raises(FrameError):
        FrameDecoder(10).feed(b"Content-Length: 11\r\n\r\n")


# -- hardening (issue 14) ------------------------------------------------------------------


def test_early_cancels_bounded_by_count_and_time():
    from rlmd.jobs import MAX_EARLY_CANCELS, Jobs

    jobs = Jobs()
    for i in range(MAX_EARLY_CANCELS * 3):
        assert jobs.cancel(f"never-{i}") is False
    assert len(jobs._early) <= MAX_EARLY_CANCELS
    # Pruned by time on every insert, not only when a job starts.
    jobs = Jobs(early_cancel_s=0.0)
    for i in range(50):
        jobs.cancel(f"gone-{i}")
    assert len(jobs._early) <= 1


def test_long_job_id_refused_with_invalid_params(daemon):
    with daemon.client() as c:
        with pytest.raises(RpcError) as ei:
            c.call("query/cancel", {"job": "j" * 100_000})
        assert ei.value.code == -32602 and "length" in ei.value.message
        with pytest.raises(RpcError) as ei:
            c.call("query/run", {"query": "q", "job": "j" * 100_000})
        assert ei.value.code == -32602 and "256" in ei.value.message
        assert c.call("query/cancel", {"job": "j" * 256}) == {"cancelled": False}


def test_ndjson_long_line_is_linear():
    """One 128 MiB line fed in 64 KiB pieces: the old decoder searched the whole buffer for
    a newline on every piece (quadratic, about 20 s here); searching only the new bytes
    takes a fraction of a second.  The bound is loose on purpose: it separates the two."""
    dec = FrameDecoder(256 << 20)
    piece = b"a" * (64 << 10)
    t0 = time.perf_counter()
    assert dec.feed(b'{"x":"') == []
    for _ in range(2048):
        assert dec.feed(piece) == []
    [line] = dec.feed(b'"}\n')
    elapsed = time.perf_counter() - t0
    assert len(line) == 2048 * len(piece) + 8
    assert elapsed < 5.0, f"feeding one long line took {elapsed:.1f}s"
    # Over the limit with no newline: refused as soon as the buffer passes the limit.
    dec = FrameDecoder(1 << 20)
    dec.feed(b"{" + b"a" * ((1 << 20) - 1))
    with pytest.raises(FrameError) as ei:
        dec.feed(b"a")
    assert ei.value.kind == "frame_too_large"
    # Several lines in one piece, and a line split over pieces.
    dec = FrameDecoder(100)
    assert dec.feed(b'{"a":1}\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert dec.feed(b":3") == []
    assert dec.feed(b"}\n") == [b'{"c":3}']


def test_deeply_nested_json_answered_and_connection_kept(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(daemon.socket))
    s.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    s.sendall(b'{"jsonrpc":"2.0","method":"daemon/ping","id":7}\n')
    data = b""
    while data.count(b"\n") < 2:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    s.close()
    first, second = (json.loads(x) for x in data.split(b"\n")[:2])
    assert first["error"]["code"] == -32700 and "deep" in first["error"]["message"]
    assert second == {"jsonrpc": "2.0", "result": "pong", "id": 7}
    assert daemon.call("daemon/ping") == "pong"


def _recv_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_total_buffered_bytes_bounded_across_connections(make_daemon):
    d = make_daemon(
        "[limits]\nmax_frame_bytes = 67108864\n[server]\nmax_buffered_bytes = 83886080\n"
    )
    body = b'{"jsonrpc":"2.0","method":"daemon/ping","id":1}'
    size = 50_000_000
    body = body + b" " * (size - len(body))
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(30)
    a.connect(str(d.socket))
    a.sendall(b"Content-Length: %d\r\n\r\n" % size + body[:-1000])
    # A second unfinished 50 MB body would pass the 80 MiB total: refused, clearly.
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(30)
    b.connect(str(d.socket))
    try:
        b.sendall(b"Content-Length: %d\r\n\r\n" % size + body[:-1000])
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = _recv_all(b)
    b.close()
    assert b"server_busy" in data and b"-32008" in data and b"max_buffered_bytes" in data
    # The first connection is unaffected and finishes its message.
    a.sendall(body[-1000:])
    reply = a.recv(65536)
    a.close()
    assert b'"result":"pong"' in reply
    assert d.call("daemon/ping") == "pong"


def test_listen_backlog_is_real(make_daemon):
    import signal

    d = make_daemon()
    socks = []
    os.kill(d.proc.pid, signal.SIGSTOP)  # nothing is accepted: connects queue in the backlog
    try:
        refused = 0
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(d.socket))
            except BlockingIOError:
                refused += 1
            socks.append(s)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    for s in socks:
        s.close()
    assert refused == 0, f"{refused} of 200 connects found the backlog full"
    assert d.call("daemon/ping") == "pong"


def test_idle_connection_closed_busy_one_kept(make_daemon):
    d = make_daemon("[server]\nidle_timeout_s = 0.5\n")
    with d.client() as used:
        assert used.call("daemon/ping") == "pong"
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.settimeout(20)
        idle.connect(str(d.socket))
        data = _recv_all(idle)  # returns when the daemon closes it
        idle.close()
        assert b"idle_timeout" in data
        # The connection that sent a request stays open though it is idle longer.
        assert used.call("daemon/ping") == "pong"


def test_open_files_soft_limit_raised(make_daemon):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip("the hard open-files limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the daemon inherits it
    try:
        d = make_daemon()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = open(f"/proc/{d.proc.pid}/limits").read()
    [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
    assert line.split()[3] == str(hard), line
