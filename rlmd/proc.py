"""Child processes: dying with the parent, stopping them, draining their output.

Shared by the REPL workers (:mod:`rlmd.repl.session`, :mod:`rlmd.repl.worker`) and the
embedded model's llama.cpp child (:mod:`rlmd.providers.embedded`).  The REPL worker
imports :func:`die_with_parent`, so this module stays light: asyncio is used only by the
coroutines, which the worker never calls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

#: Ask (close stdin), then SIGTERM, then SIGKILL, with the seconds each step waits.
GENTLE: Sequence[tuple[int | None, float]] = (
    (None, 5.0),
    (signal.SIGTERM, 3.0),
    (signal.SIGKILL, 5.0),
)
#: SIGKILL at once (hostile children: a REPL worker is never asked).
AT_ONCE: Sequence[tuple[int | None, float]] = ((signal.SIGKILL, 5.0),)


def status_kib(pid: int, field: str = "VmRSS") -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...), or 0
    when the process or the field is gone: what the memory benchmarks read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def die_with_parent(sig: int, *, parent_pid: int | None = None, check: bool = True) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux).

    The parent may already be gone before the ``prctl`` takes effect; then this process
    exits at once: when ``parent_pid`` is given, if the parent is no longer that process;
    otherwise, if the parent is pid 1 (reparented to init).  ``check=False`` skips that
    (inside a pid namespace, where pid 1 is a real parent such as bubblewrap's).
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    if not check:
        return
    ppid = os.getppid()
    if (parent_pid is not None and ppid != parent_pid) or (parent_pid is None and ppid == 1):
        os._exit(1)


async def stop_process(
    proc: asyncio.subprocess.Process,
    *,
    steps: Sequence[tuple[int | None, float]] = GENTLE,
    group: bool = False,
) -> int | None:
    """Stop ``proc``: close its stdin, then each (signal, wait) step until it has exited.

    ``group``: signal its whole process group (it was started with
    ``start_new_session=True``), even after the leader exited, so that what it left
    behind dies too.  Returns the exit status, None if it outlived every step.
    """
    import asyncio

    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    for sig, wait_s in steps:
        if proc.returncode is not None and not group:
            break
        if sig is not None:
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(wait_s):
                await proc.wait()
        if proc.returncode is not None and sig == signal.SIGKILL:
            break
    return proc.returncode


async def drain_stream(
    stream: asyncio.StreamReader | None, sink: Callable[[bytes], None], *, by_line: bool = False
) -> None:
    """Read ``stream`` to its end (a full pipe would block the child), handing each chunk
    (or each line, ``by_line``) to ``sink``; the sink keeps what it wants (a bounded tail)."""
    if stream is None:
        return
    while True:
        chunk = await (stream.readline() if by_line else stream.read(65536))
        if not chunk:
            return
        sink(chunk)
