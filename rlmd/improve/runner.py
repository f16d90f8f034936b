"""Running a proposal's test or benchmark command under the REPL workers' protection.

The command is the user's own (not the model's), but it runs the model's patched code, so
it gets what a REPL worker gets: bubblewrap with every namespace unshared (no network, its
own pid namespace, so killing bwrap ends every process it started), no capabilities, a
clean environment (no variable of the daemon's, so no API key), the daemon's state and
config directories hidden, an address-space limit, and a wall-clock limit after which the
whole process group is killed.  Without bubblewrap (``[sandbox] bwrap = "off"``, or
``"auto"`` where it cannot run) the command runs with the same environment and limits but
shares the network; the result says which protection it had.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import msgspec
import platformdirs

from rlmd.repl.daemon_sandbox import BWRAP_ISOLATION


class CommandResult(msgspec.Struct, kw_only=True):
    """One run of a test or benchmark command (``tests`` in the decision point)."""

    passed: bool
    output: str
    elapsed_s: float
    exit_code: int | None = None
    timed_out: bool = False
    truncated: bool = False
    protection: str = ""


class RunnerError(Exception):
    """The command could not be run as configured (``message`` says what to do)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def clean_env(tmp: str) -> dict[str, str]:
    """The environment a test command sees: a fixed set, nothing of the daemon's."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": tmp,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": tmp,
        "PYTHONDONTWRITEBYTECODE": "1",
        "CI": "true",
    }


def _hidden_dirs(state_dir: Path) -> list[str]:
    # The state dir (contexts, caches, traces) and the user's rlmd config dir, where the
    # systemd unit's env file with API keys lives.
    out = [str(state_dir.resolve()), platformdirs.user_config_dir("rlmd")]
    return [d for d in out if Path(d).is_dir() and d != "/"]


def bwrap_command(tree: Path, tmp: Path, shell_cmd: list[str], *, state_dir: Path) -> list[str]:
    """The bubblewrap argv that runs ``shell_cmd`` with ``tree`` as its writable cwd and
    ``tmp`` as its writable TMPDIR and HOME; everything else is read-only.

    /tmp is not replaced by a tmpfs: the project (or its virtualenv) may live under it,
    as a CI clone does; the command writes its temp files to ``tmp`` instead.
    """
    bw = shutil.which("bwrap") or "bwrap"
    argv = [
        bw,
        *BWRAP_ISOLATION,
        "--new-session",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    for d in _hidden_dirs(state_dir):
        argv += ["--tmpfs", d]
    # After the tmpfs mounts, so a copy kept under the (hidden) state dir shows.
    argv += ["--bind", str(tree), str(tree), "--bind", str(tmp), str(tmp)]
    argv += ["--chdir", str(tree), "--"]
    return argv + shell_cmd


def _limited_shell(command: str, memory_mb: int) -> list[str]:
    # ulimit in the shell that execs the command: no preexec_fn in a threaded daemon.
    kb = max(memory_mb, 64) * 1024
    return ["/bin/sh", "-c", f"ulimit -v {kb} 2>/dev/null; exec /bin/sh -c {shlex.quote(command)}"]


async def run_command(
    command: str,
    tree: Path,
    *,
    state_dir: Path,
    use_bwrap: bool,
    timeout_s: float,
    memory_mb: int,
    output_bytes: int,
) -> CommandResult:
    """Run ``command`` (a shell command line) in ``tree``; never raises for its failure."""
    shell_cmd = _limited_shell(command, memory_mb)
    # Beside the copy (not in it, so the tests see the tree as it is); removed with it.
    tmp = tree.with_name(tree.name + ".tmp")
    await asyncio.to_thread(tmp.mkdir, exist_ok=True)
    if use_bwrap:
        argv = bwrap_command(tree, tmp, shell_cmd, state_dir=state_dir)
        protection = "bwrap (no network, own namespaces, no capabilities), clean env, limits"
    else:
        argv = shell_cmd
        protection = "clean env, limits (bubblewrap off: the network is not isolated)"
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=str(tree),
        env=clean_env(str(tmp)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    buf = bytearray()
    dropped = 0

    async def read() -> None:
        nonlocal dropped
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            buf.extend(chunk)
            if len(buf) > output_bytes:  # keep the tail: failures print last
                dropped += len(buf) - output_bytes
                del buf[: len(buf) - output_bytes]

    timed_out = False
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(read(), proc.wait())
    except TimeoutError:
        timed_out = True
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            await proc.wait()
    text = buf.decode(errors="replace")
    if dropped:
        text = f"[... {dropped} bytes of earlier output cut ...]\n" + text
    if timed_out:
        text += f"\n[killed: the command ran past its limit of {timeout_s:g} s]\n"
    return CommandResult(
        passed=not timed_out and proc.returncode == 0,
        output=text,
        elapsed_s=round(time.monotonic() - t0, 3),
        exit_code=None if timed_out else proc.returncode,
        timed_out=timed_out,
        truncated=bool(dropped),
        protection=protection,
    )


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
