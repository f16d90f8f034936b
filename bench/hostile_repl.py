"""Hostile blocks against real REPL workers, in every protection mode this machine offers.

Each attack is a block of model code that prints one outcome; this script (the workers'
parent, as the daemon is) runs it under each mode and prints a Markdown table: one row per
attack, one column per mode, the outcome in each cell.  The signal attacks aim SIGUSR1 / SIGIO at this process, which counts what
arrives (a SIGKILL, as in issue 14, would end the run).  docs/sandbox.md records a run.

Run: ``python bench/hostile_repl.py`` (as root to see the capability checks bite).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmd.config import LimitsConfig, SandboxConfig
from rlmd.repl.daemon_sandbox import SandboxUnavailable
from rlmd.repl.session import ReplSession, protection

MODES = {
    "bwrap+seccomp": SandboxConfig(bwrap="require", seccomp="require", scratch_mb=8),
    "bwrap": SandboxConfig(bwrap="require", seccomp="off", scratch_mb=8),
    "seccomp+landlock": SandboxConfig(bwrap="off", seccomp="require", scratch_mb=8),
    "none": SandboxConfig(bwrap="off", seccomp="off", scratch_mb=8),
}

PRELUDE = """
import ctypes, fcntl, os, signal, socket, struct, mmap
libc = ctypes.CDLL(None, use_errno=True)
def sockfd():
    import stat
    for f in range(3, 64):
        try:
            if stat.S_ISSOCK(os.fstat(f).st_mode):
                return f
        except OSError:
            pass
"""


def attacks(parent: int, state: Path, ctx: Path) -> dict[str, str]:
    return {
        "read the daemon's /proc/<pid>/environ": f"""
try:
    print('READ' if open('/proc/{parent}/environ', 'rb').read() else 'empty')
except OSError as e:
    print('refused', type(e).__name__)
""",
        "list the state directory": f"""
try:
    print('LISTED', len(os.listdir({str(state)!r})))
except OSError as e:
    print('refused', type(e).__name__)
""",
        "write the context file": f"""
try:
    open({str(ctx)!r}, 'a').write('x'); print('WROTE')
except OSError as e:
    print('refused', type(e).__name__)
""",
        "open sockets (inet, inet6, unix, netlink, packet)": """
ok = []
for fam, typ in ((2, 1), (10, 1), (1, 1), (16, 3), (17, 3)):
    try:
        socket.socket(fam, typ).close(); ok.append(fam)
    except OSError:
        pass
print(f'OPENED {ok}' if ok else 'all refused')
""",
        "fork": """
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0); print('FORKED')
except OSError as e:
    print('refused', type(e).__name__)
""",
        "exec": """
try:
    os.execv('/bin/true', ['true'])
except OSError as e:
    print('refused', type(e).__name__)
""",
        "ptrace the daemon": f"""
r = libc.ptrace(16, {parent}, None, None)
print('ATTACHED' if r == 0 else f'refused errno {{ctypes.get_errno()}}')
if r == 0:
    libc.ptrace(17, {parent}, None, None)
""",
        "i386 int 0x80 (getpid)": """
code = bytes.fromhex('b814000000cd80c3')
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print('RAN, pid', ctypes.CFUNCTYPE(ctypes.c_int)(addr)())
""",
        "kill(daemon, SIGUSR1)": f"""
try:
    os.kill({parent}, signal.SIGUSR1); print('sent')
except OSError as e:
    print('refused', type(e).__name__)
""",
        "pipe + F_SETOWN(daemon) + F_SETSIG(SIGUSR1) + O_ASYNC": f"""
r, w = os.pipe()
out = []
for name, args in (('F_SETOWN', (8, {parent})), ('F_SETSIG', (10, signal.SIGUSR1))):
    try:
        fcntl.fcntl(r, *args); out.append(name + ' ok')
    except OSError:
        out.append(name + ' refused')
fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
os.write(w, b'x')
print(', '.join(out))
""",
        "channel socket + ioctl(FIOSETOWN, daemon) + O_ASYNC, then a reply (SIGIO)": f"""
s = sockfd()
try:
    fcntl.ioctl(s, 0x8901, struct.pack('i', {parent})); out = 'FIOSETOWN ok'
except OSError as e:
    out = 'FIOSETOWN refused ' + type(e).__name__
fcntl.fcntl(s, fcntl.F_SETFL, fcntl.fcntl(s, fcntl.F_GETFL) | os.O_ASYNC)
llm_query('x')  # the daemon's reply arrives on the socket: I/O, so SIGIO to the owner
print(out)
""",
        "capabilities (CapEff/CapBnd, NoNewPrivs)": """
f = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)
print('CapEff', f['CapEff'].strip(), 'CapBnd', f['CapBnd'].strip(), 'NNP', f['NoNewPrivs'].strip())
""",
        "settimeofday / mknod block device": """
class TV(ctypes.Structure):
    _fields_ = [('s', ctypes.c_long), ('us', ctypes.c_long)]
import time
a = libc.settimeofday(ctypes.byref(TV(int(time.time()), 0)), None)
b = libc.mknod(b'blk', 0o60600, os.makedev(8, 0))
print('settimeofday', 'ALLOWED' if a == 0 else 'refused', '/ mknod', 'ALLOWED' if b == 0 else 'refused')
""",
        "allocate 64 GB": """
try:
    x = bytearray(64 << 30); print('ALLOCATED')
except MemoryError:
    print('MemoryError')
""",
        "fill scratch (40 x 1 MiB, scratch_mb = 8)": """
n = 0
try:
    for i in range(40):
        open(f'f{i}', 'wb').write(b'z' * (1 << 20)); n += 1
    print('wrote', n)
except OSError as e:
    print('refused after', n, type(e).__name__)
""",
        "forged 100k-deep msgpack frame": """
body = (b'\\x84\\xa1t\\xa4call\\xa2id\\x01\\xa6method\\xa9llm_query\\xa6params\\x81\\xa1x'
        + b'\\x91' * 100000 + b'\\xc0')
os.write(sockfd(), len(body).to_bytes(4, 'big') + body)
import time; time.sleep(5)
""",
    }


async def no_call(method: str, params: dict) -> Any:
    return "ok"


def outcome(r: Any) -> str:
    text = (r.output or "").strip().replace("\n", " ")
    if r.restarted:
        why = (r.error or "").split(";")[0].split(". The REPL")[0].replace("the REPL worker ", "")
        return f"worker restarted: {why[:90]}" + (f" (printed: {text[:40]})" if text else "")
    if r.error:
        return f"{text[:60]} error: {r.error.strip().splitlines()[-1][:80]}"
    return text[:110]


async def main() -> None:
    got: dict[int, int] = {signal.SIGUSR1: 0, signal.SIGIO: 0}

    def count(n: int, _f: Any) -> None:
        got[n] += 1

    signal.signal(signal.SIGUSR1, count)
    signal.signal(signal.SIGIO, count)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="rlmd-hostile-", dir="/tmp") as tmp:
        root = Path(tmp)
        state = root / "state"
        state.mkdir()
        (state / "credentials.toml").write_text("api_key = 'x'\n")
        ctx = root / "context.txt"
        ctx.write_text("the context\n")
        for mode, cfg in MODES.items():
            try:
                prot = protection(cfg)
            except SandboxUnavailable as exc:
                rows.append(("(all)", mode, f"not available: {exc}"))
                continue
            for name, code in attacks(os.getpid(), state, ctx).items():
                scratch = root / f"scratch-{mode}-{len(rows)}"
                scratch.mkdir()
                s = await ReplSession.start(
                    context_path=ctx,
                    limits=LimitsConfig(worker_memory_mb=512, worker_cpu_s=30),
                    sandbox=cfg,
                    scratch_dir=scratch,
                    on_call=no_call,
                )
                try:
                    await s.execute(PRELUDE, timeout_s=20)
                    before = dict(got)
                    r = await s.execute(code, timeout_s=20)
                    await asyncio.sleep(0.2)  # a signal that got through is counted by now
                    res = outcome(r)
                    hit = {signal.Signals(k).name: v - before[k] for k, v in got.items()}
                    hit = {k: v for k, v in hit.items() if v}
                    if hit:
                        res += f" — DAEMON RECEIVED {hit}"
                    elif "SIG" in name or "kill" in name:
                        res += " — the daemon received nothing"
                finally:
                    await s.close()
                rows.append((name, f"{mode} ({prot.summary()})", res))
            ctx.write_text("the context\n")
    modes = list(dict.fromkeys(m for _n, m, _r in rows))
    table = {(n, m): r for n, m, r in rows}
    print("| attack | " + " | ".join(modes) + " |")
    print("| --- " * (len(modes) + 1) + "|")
    for name in dict.fromkeys(n for n, _m, _r in rows):
        cells = [table.get((name, m), "").replace("|", "/") for m in modes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
