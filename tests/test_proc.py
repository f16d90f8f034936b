"""rlmd.proc: the process helpers the REPL workers and the embedded model's child share;
and the split of the sandbox code by the side it runs on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from rlmd.proc import die_with_parent, stop_process
from rlmd.repl.daemon_sandbox import Protection

REPO = Path(__file__).resolve().parents[1]


def test_a_child_whose_parent_is_already_gone_exits() -> None:
    # The parent is this process, not pid 4242's: the check sees a different parent.
    code = (
        "from rlmd.proc import die_with_parent; die_with_parent(15, parent_pid={}); print('alive')"
    )
    gone = subprocess.run([sys.executable, "-c", code.format(4242)], capture_output=True, cwd=REPO)
    assert gone.returncode == 1 and gone.stdout == b""
    here = subprocess.run(
        [sys.executable, "-c", code.format("__import__('os').getppid()")],
        capture_output=True,
        cwd=REPO,
    )
    assert here.returncode == 0 and here.stdout == b"alive\n"
    die_with_parent(0, check=False)  # signal 0 clears it; no exit without the check


async def test_stop_process_escalates_to_sigkill() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "sys.stdin.read()\n"
        "time.sleep(60)\n",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"
    rc = await stop_process(proc, steps=((None, 0.2), (15, 0.2), (9, 5.0)))
    assert rc == -9


async def test_stop_process_of_a_group_kills_what_the_leader_left() -> None:
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", "sleep 60 & echo $!; exec sleep 60",
        stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    child = int(await proc.stdout.readline())
    assert await stop_process(proc, steps=((9, 5.0),), group=True) == -9
    for _ in range(100):
        try:
            stat = await asyncio.to_thread(Path(f"/proc/{child}/stat").read_text)
        except FileNotFoundError:
            break
        if stat.split(") ")[1].startswith("Z"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the leader's child survived")


def test_the_worker_never_loads_the_daemon_side() -> None:
    # The worker imports what it applies to itself, never the probing / bubblewrap code.
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, rlmd.repl.worker; "
         "print(sorted(m for m in sys.modules if m.startswith('rlmd')))"],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    assert "rlmd.repl.worker_guard" in out and "rlmd.proc" in out
    assert "rlmd.repl.daemon_sandbox" not in out and "rlmd.repl.session" not in out, out


def test_protection_summary_names_every_layer() -> None:
    ll = Protection(bwrap=False, seccomp=True, rlimits=True, landlock=True, landlock_scoped=True)
    assert ll.summary() == "seccomp+landlock+rlimits"
    bw = Protection(bwrap=True, seccomp=True, rlimits=True, landlock_scoped=True,
                    privileges_dropped=True)  # fmt: skip
    assert bw.summary() == "bwrap+seccomp+rlimits+landlock-scope+nocaps"
    assert Protection(bwrap=False, seccomp=False, rlimits=False).summary() == "none"


def test_status_kib_reads_a_field_and_is_zero_for_a_gone_process() -> None:
    import os

    from rlmd.proc import status_kib

    assert status_kib(os.getpid()) > 1000  # this interpreter's VmRSS, in kB
    assert status_kib(os.getpid(), "VmHWM") >= status_kib(os.getpid(), "RssAnon") > 0
    assert status_kib(os.getpid(), "NoSuchField") == 0
    assert status_kib(2**22 + 12345) == 0  # beyond pid_max: no such process
