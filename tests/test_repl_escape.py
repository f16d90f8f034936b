"""Hostile blocks: network, secrets, runaway loops and memory, forks, the file system.

Parametrized over the protection modes this machine offers (bubblewrap + seccomp,
bubblewrap alone, seccomp alone, rlimits only); a mode that does not work here is
skipped, and a check that only one layer can give is asserted only under that layer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rlmd.config import LimitsConfig, SandboxConfig
from rlmd.repl.daemon_sandbox import SandboxUnavailable
from rlmd.repl.session import ReplSession, protection

MODES = {
    "bwrap+seccomp": SandboxConfig(bwrap="require", seccomp="require"),
    "bwrap": SandboxConfig(bwrap="require", seccomp="off"),
    "seccomp": SandboxConfig(bwrap="off", seccomp="require"),
    "none": SandboxConfig(bwrap="off", seccomp="off"),
}
SECRET = "s3cr3t-value-that-must-not-leak-4711"
RLMD_DIR = Path(__file__).resolve().parents[1] / "rlmd"


def mode_config(mode: str) -> SandboxConfig:
    cfg = MODES[mode]
    try:
        protection(cfg)
    except SandboxUnavailable as exc:
        pytest.skip(f"{mode} not available here: {exc}")
    return cfg


async def no_call(method: str, params: dict) -> Any:
    raise AssertionError(f"unexpected call {method}")


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def repl(
    mode: str, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ReplSession]:
    # Secrets in the daemon's environment must not reach the worker.
    monkeypatch.setenv("RLMD_TEST_SECRET", SECRET)
    monkeypatch.setenv("DEEPSEEK_API_KEY", SECRET)
    scratch = short_tmp / "scratch"
    scratch.mkdir()
    ctx = short_tmp / "context.txt"
    ctx.write_text("the context\n")
    s = await ReplSession.start(
        context_path=ctx,
        limits=LimitsConfig(worker_memory_mb=512, worker_cpu_s=3),
        sandbox=mode_config(mode),
        scratch_dir=scratch,
        on_call=no_call,
    )
    yield s
    await s.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def exists(path: str | Path) -> bool:
    return os.path.exists(path)


async def wait_gone(pgid: int, within_s: float = 2.0) -> None:
    """The process group is gone soon (a pid namespace takes a few ms to tear down)."""
    deadline = time.monotonic() + within_s
    members = group_members(pgid)
    while members and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        members = group_members(pgid)
    assert members == []


async def run(s: ReplSession, code: str, timeout_s: float = 20) -> str:
    r = await s.execute(code, timeout_s=timeout_s)
    return r.output + (r.error or "")


async def test_no_network_to_loopback(mode: str, repl: ReplSession) -> None:
    if mode == "none":
        pytest.skip("without bwrap or seccomp the worker has the host's network")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        out = await run(
            repl,
            "import socket\n"
            "for fam, addr in ((socket.AF_INET, ('127.0.0.1', PORT)), (socket.AF_INET6, ('::1', PORT))):\n"
            "    try:\n"
            "        s = socket.socket(fam, socket.SOCK_STREAM)\n"
            "        s.settimeout(2)\n"
            "        s.connect(addr)\n"
            "        print('CONNECTED', addr)\n"
            "    except OSError as e:\n"
            "        print('blocked', type(e).__name__)\n"
            "try:\n"
            "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    u.sendto(b'x', ('127.0.0.1', PORT))\n"
            "    print('UDP SENT')\n"
            "except OSError as e:\n"
            "    print('blocked', type(e).__name__)\n".replace("PORT", str(port)),
        )
        assert "CONNECTED" not in out and out.count("blocked") >= 2, out
        if "seccomp" in mode:
            assert "UDP SENT" not in out and "PermissionError" in out
        await asyncio.sleep(0.1)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
    finally:
        listener.close()


async def test_no_unix_sockets(mode: str, repl: ReplSession, short_tmp: Path) -> None:
    if mode == "none":
        pytest.skip("without bwrap or seccomp the worker shares the host's sockets")
    path = str(short_tmp / "daemon.sock")
    abstract = f"\0rlmd-test-{os.getpid()}"
    listeners = []
    for addr in (path, abstract):
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(addr)
        ls.listen(4)
        ls.setblocking(False)
        listeners.append(ls)
    try:
        out = await run(
            repl,
            "import socket\n"
            f"for addr in ({path!r}, {abstract!r}):\n"
            "    try:\n"
            "        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "        s.connect(addr)\n"
            "        print('CONNECTED')\n"
            "    except OSError as e:\n"
            "        print('blocked', type(e).__name__)\n"
            "try:\n"
            "    socket.socketpair()\n"
            "    print('PAIR')\n"
            "except OSError as e:\n"
            "    print('blocked pair')\n",
        )
        assert "CONNECTED" not in out and out.count("blocked") >= 2, out
        if "seccomp" in mode:
            assert "PAIR" not in out
        for ls in listeners:
            with pytest.raises(BlockingIOError):
                ls.accept()
    finally:
        for ls in listeners:
            ls.close()


async def test_environment_holds_no_secrets(mode: str, repl: ReplSession) -> None:
    out = await run(
        repl,
        "import os\n"
        "print(sorted(os.environ))\n"
        "print(dict(os.environ))\n"
        "try:\n    print(open('/proc/self/environ').read())\n"
        "except OSError as e:\n    print('own environ not readable', type(e).__name__)\n"
        f"try:\n    print(open('/proc/{os.getpid()}/environ').read())\n"
        "except OSError as e:\n    print('daemon environ not visible', type(e).__name__)\n",
    )
    keys = eval(out.splitlines()[0])
    assert set(keys) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PWD", "PYTHONDONTWRITEBYTECODE",
                         "PYTHONNOUSERSITE", "PYTHONIOENCODING", "PYTHONHASHSEED"}  # fmt: skip
    if repl.protection.bwrap or repl.protection.landlock:
        # Its own pid namespace, or Landlock: the daemon's /proc entry is out of reach.
        assert SECRET not in out and "daemon environ not visible" in out
    else:
        # Without either a same-uid worker can read /proc/<daemon>/environ (docs/sandbox.md);
        # what the daemon passes itself must still be clean.
        before = out.split(f"/proc/{os.getpid()}")[0]
        assert SECRET not in out.splitlines()[0] + out.splitlines()[1] + before


async def test_infinite_loop_is_killed(repl: ReplSession) -> None:
    pid = repl.worker_pid
    assert pid is not None
    t0 = time.monotonic()
    r = await repl.execute(
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
        timeout_s=0.5,
    )
    assert r.timed_out and r.restarted
    assert time.monotonic() - t0 < 5
    await wait_gone(pid)
    assert (await run(repl, "print(6 * 7)")) == "42\n"


async def test_memory_bomb_fails_without_harm(repl: ReplSession) -> None:
    out = await run(repl, "x = bytearray(64 * 1024**3)")
    assert "MemoryError" in out
    out = await run(repl, "chunks = []\nwhile True:\n    chunks.append(b'x' * (64 * 1024 * 1024))")
    assert "MemoryError" in out or "REPL was restarted" in out
    assert (await run(repl, "chunks = None\nprint('alive')")).endswith("alive\n")


async def test_process_creation_is_bounded(mode: str, repl: ReplSession) -> None:
    pid = repl.worker_pid
    assert pid is not None
    out = await run(
        repl,
        "import os, time, subprocess\n"
        "n = 0\n"
        "try:\n"
        "    for i in range(20):\n"
        "        child = os.fork()\n"
        "        if child == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('fork denied', type(e).__name__)\n"
        "try:\n"
        "    subprocess.Popen(['sleep', '60'])\n"
        "    n += 1\n"
        "except OSError as e:\n"
        "    print('spawn denied', type(e).__name__)\n"
        "print('forked', n)\n",
    )
    if "seccomp" in mode:
        assert "fork denied PermissionError" in out and "spawn denied" in out and "forked 0" in out
    else:
        assert "forked 21" in out, out
        assert len(group_members(pid)) > 1
    await repl.close()
    await wait_gone(pid)


async def test_rlimits_cannot_be_raised(mode: str, repl: ReplSession) -> None:
    out = await run(
        repl,
        "import resource\n"
        "try:\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "    print('RAISED')\n"
        "except (OSError, ValueError) as e:\n"
        "    print('refused', type(e).__name__)\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n",
    )
    assert "(0, 0) 256" in out
    if mode != "none":  # root without namespaces or seccomp keeps CAP_SYS_RESOURCE
        assert "refused" in out and "RAISED" not in out


async def test_cpu_limit_kills_a_spinning_worker(mode: str, repl: ReplSession) -> None:
    if mode != "bwrap+seccomp" and mode != "none":
        pytest.skip("rlimits are the same in every mode; two modes suffice")
    r = await repl.execute("while True:\n    pass", timeout_s=60)
    assert r.restarted and not r.timed_out
    assert r.error is not None and "killed by SIGXCPU" in r.error and "CPU time limit" in r.error


def fs_isolated(repl: ReplSession) -> bool:
    """bubblewrap (mount namespace) or Landlock confines the worker's file system view."""
    return repl.protection.bwrap or repl.protection.landlock


async def test_writes_outside_scratch_fail(mode: str, repl: ReplSession, short_tmp: Path) -> None:
    if not fs_isolated(repl):
        pytest.skip("file system isolation needs bubblewrap or Landlock")
    outside = short_tmp / "outside.txt"
    out = await run(
        repl,
        "import os\n"
        "open('inside.txt', 'w').write('ok')\n"
        f"for p in ({str(outside)!r}, '/usr/evil.txt', '/context/context.txt', '/opt/rlmd-lib/rlmd/evil.py',\n"
        "          '/evil.txt', '/tmp/evil.txt', '/dev/shm/evil', '/proc/evil',\n"
        f"          {str(short_tmp / 'context.txt')!r}, {str(RLMD_DIR / 'evil.py')!r}):\n"
        "    try:\n"
        "        open(p, 'a').write('pwned')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('refused', type(e).__name__)\n",
    )
    assert "WROTE" not in out and out.count("refused") == 10, out
    if repl.protection.bwrap:  # the scratch is a tmpfs of sandbox.scratch_mb in the sandbox
        assert (await run(repl, "print(open('inside.txt').read())")) == "ok\n"
    else:
        assert (short_tmp / "scratch" / "inside.txt").read_text() == "ok"
    assert not any(map(exists, (outside, "/usr/evil.txt", RLMD_DIR / "evil.py")))
    assert (short_tmp / "context.txt").read_text() == "the context\n"


async def test_daemon_files_are_invisible(mode: str, repl: ReplSession, short_tmp: Path) -> None:
    if not fs_isolated(repl):
        pytest.skip("file system isolation needs bubblewrap or Landlock")
    state = short_tmp / "state"
    state.mkdir()
    (state / "credentials.toml").write_text(f"api_key = '{SECRET}'\n")
    out = await run(
        repl,
        "import os\n"
        f"for p in ({str(state / 'credentials.toml')!r}, '/proc/{os.getpid()}/environ'):\n"
        "    try:\n        print(open(p).read())\n"
        "    except OSError as e:\n        print('not visible', type(e).__name__)\n"
        f"try:\n    print(sorted(os.listdir({str(state)!r})))\n"
        "except OSError as e:\n    print('not listable', type(e).__name__)\n"
        "print(sorted(os.listdir('/')) if os.access('/', os.R_OK) else [])\n",
    )
    assert SECRET not in out and out.count("not visible") == 2 and "not listable" in out, out
    if repl.protection.bwrap:
        top = eval(out.splitlines()[-1])
        assert "work" not in top and "home" not in top and "scratch" in top


@pytest.mark.parametrize(
    "payload",
    [
        "b'\\x00\\x00\\x00\\x05hello'",  # not msgpack of any message
        "b'\\xff\\xff\\xff\\xff'",  # a 4 GiB frame announced
        "b''.join(__import__('rlmd.repl.channel', fromlist=['x']).encode("
        "__import__('rlmd.repl.channel', fromlist=['x']).Call(id=i, method='llm_query', "
        "params={'prompt': 'x'})) for i in range(5000))",  # a call flood
        # A Call whose params nest 100,000 deep (was a RecursionError above the session).
        "(lambda b: len(b).to_bytes(4, 'big') + b)(b'\\x84\\xa1t\\xa4call\\xa2id\\x01"
        "\\xa6method\\xa9llm_query\\xa6params\\x81\\xa1x' + b'\\x91' * 100000 + b'\\xc0')",
        # A Done whose output is a map, not a str.
        "(lambda b: len(b).to_bytes(4, 'big') + b)(b'\\x82\\xa1t\\xa4done\\xa6output\\x81\\xa1a\\x01')",
    ],
    ids=["garbage", "huge-length", "call-flood", "deep", "wrong-type"],
)
async def test_forged_frames_cost_only_the_worker(
    mode: str, repl: ReplSession, payload: str
) -> None:
    if mode not in ("bwrap+seccomp", "none"):
        pytest.skip("the daemon's side is the same in every mode; two modes suffice")
    code = (
        "import os, stat\n"
        "fd = next(f for f in range(3, 64) if _ok(f))\n"
        f"os.write(fd, {payload})\n"
        "import time\n"
        "time.sleep(5)\n"
    )
    prelude = (
        "def _ok(f):\n"
        "    import os, stat\n"
        "    try:\n"
        "        return stat.S_ISSOCK(os.fstat(f).st_mode)\n"
        "    except OSError:\n"
        "        return False\n"
    )
    await repl.execute(prelude, timeout_s=10)
    t0 = time.monotonic()
    r = await repl.execute(code, timeout_s=20)
    assert r.restarted and not r.timed_out, r
    assert time.monotonic() - t0 < 4
    assert (await run(repl, "print('fresh')")) == "fresh\n"


async def test_cannot_signal_the_daemon(mode: str, repl: ReplSession) -> None:
    if mode == "none" and not repl.protection.landlock_scoped:
        pytest.skip("without bwrap, seccomp or Landlock scopes a same-uid worker can signal")
    received: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda n, f: received.append(n))
    try:
        out = await run(
            repl,
            "import os, signal\n"
            "os.kill(os.getpid(), 0)\n"
            "signal.raise_signal(signal.SIGUSR2) if signal.signal(signal.SIGUSR2, lambda *a: print('own signal')) or True else None\n"
            f"for target in ({os.getpid()}, -1):\n"
            "    try:\n"
            "        os.kill(target, signal.SIGUSR1)\n"
            "        print('sent', target)\n"
            "    except OSError as e:\n"
            "        print('refused', type(e).__name__)\n",
        )
        await asyncio.sleep(0.2)  # a signal that got through would be handled by now
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert "own signal" in out and f"sent {os.getpid()}" not in out, out
    # kill(-1) reports success when every target refused with EPERM (Landlock scopes);
    # seccomp refuses the call itself.  Either way nothing reaches this process.
    assert received == [], (out, received)
    if repl.protection.seccomp:
        assert out.count("refused") == 2, out


async def test_worker_has_no_capabilities_and_no_new_privs(mode: str, repl: ReplSession) -> None:
    # Read by the worker itself: what model code would have.  (The tests run as root on
    # the development machine, so the daemon side has every capability to lose.)
    out = await run(
        repl,
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith(('Cap', 'NoNewPrivs')):\n"
        "        print(line.strip())\n",
    )
    fields = dict(line.split(":\t") for line in out.splitlines())
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (mode, out)
    assert fields["NoNewPrivs"] == "1", (mode, out)
    assert repl.protection.privileges_dropped


async def test_privileged_calls_fail(mode: str, repl: ReplSession) -> None:
    # What issue 14 saw get past the capability check as root in the Landlock mode.
    out = await run(
        repl,
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "class TV(ctypes.Structure):\n"
        "    _fields_ = [('s', ctypes.c_long), ('us', ctypes.c_long)]\n"
        "now = TV(int(time.time()), 0)\n"
        "for name, f in (('settimeofday', lambda: libc.settimeofday(ctypes.byref(now), None)),\n"
        "                ('acct', lambda: libc.acct(None)),\n"
        "                ('mknod', lambda: libc.mknod(b'blk', 0o60600, os.makedev(8, 0))),\n"
        "                ('fanotify_init', lambda: libc.fanotify_init(0, 0)),\n"
        "                ('syslog', lambda: libc.klogctl(3, ctypes.create_string_buffer(64), 64))):\n"
        "    rc = f()\n"
        "    print(name, 'refused' if rc < 0 else 'ALLOWED')\n",
    )
    assert "ALLOWED" not in out and out.count("refused") == 5, (mode, out)
