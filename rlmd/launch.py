"""Starting a daemon process and waiting until it answers on its socket.

One place for what the CLI's auto-start, the test fixtures and the benchmarks all do:
run ``python -m rlmd`` with a socket (and optionally a state dir and config), then poll
the socket until a client connects, failing early and clearly if the process exits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from rlmd.client import Client

_Sink = int | IO[bytes] | None


class DaemonStartError(RuntimeError):
    """The daemon exited or stayed silent; the message says which and where to look."""


def daemon_command(
    socket_path: Path,
    *,
    state_dir: Path | None = None,
    config: Path | None = None,
    log_level: str | None = None,
) -> list[str]:
    """The argv that starts ``rlmd`` with this interpreter."""
    argv = [sys.executable, "-m", "rlmd", "--socket", str(socket_path)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    if config is not None:
        argv += ["--config", str(config)]
    if log_level is not None:
        argv += ["--log-level", log_level]
    return argv


def spawn_daemon(
    argv: Sequence[str],
    *,
    stdout: _Sink = subprocess.DEVNULL,
    stderr: _Sink = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    detach: bool = False,
) -> subprocess.Popen[bytes]:
    """Start the daemon; ``detach`` puts it in its own session (it outlives a Ctrl-C)."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=detach,
    )


def wait_until_answering(
    proc: subprocess.Popen[bytes], socket_path: Path, *, timeout_s: float, log_hint: str = ""
) -> None:
    """Return once the daemon answers ``daemon/ping`` on ``socket_path``; raise
    DaemonStartError if the process exits first or ``timeout_s`` passes.  ``log_hint``
    ends each message.  (A connect alone can succeed while the daemon is still starting.)"""
    hint = f"; {log_hint}" if log_hint else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DaemonStartError(f"rlmd exited with status {proc.returncode}{hint}")
        try:
            with Client(socket_path, timeout=5, connect_retry_s=0) as c:
                c.call("daemon/ping")
            return
        except OSError:
            time.sleep(0.05)
    raise DaemonStartError(f"rlmd did not answer on {socket_path} within {timeout_s:g}s{hint}")
