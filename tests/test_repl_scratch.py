"""Scratch space of REPL workers: leftovers of a dead daemon are removed at startup (never
those of a live one), and one worker's scratch space is bounded in every mode."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rlmd.config import LimitsConfig, SandboxConfig, parse_config
from rlmd.repl.daemon_sandbox import SandboxUnavailable
from rlmd.repl.session import ReplSession, protection
from tests.conftest import Daemon

MODES = {
    "bwrap": SandboxConfig(bwrap="require", seccomp="require", scratch_mb=8),
    "seccomp": SandboxConfig(bwrap="off", seccomp="require", scratch_mb=8),
    "none": SandboxConfig(bwrap="off", seccomp="off", scratch_mb=8),
}


def leftover(state: Path, name: str) -> Path:
    d = state / "tmp" / name / "scratch-0-abc"
    d.mkdir(parents=True)
    (d / "big.bin").write_bytes(b"x" * 100_000)
    return d.parent


def test_startup_removes_what_a_dead_daemon_left(short_tmp: Path) -> None:
    first = Daemon(short_tmp / "a")
    (short_tmp / "a").mkdir()
    first.start()
    stale = leftover(first.state_dir, "query-crashed")
    first.stop(signal.SIGKILL)  # died: nobody removes its query directory
    assert stale.exists()
    second = Daemon(short_tmp / "a")
    second.start()
    try:
        assert not stale.exists()
        assert (first.state_dir / "tmp").is_dir()
    finally:
        second.stop()


def test_startup_leaves_a_live_daemons_scratch_alone(short_tmp: Path) -> None:
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    live = Daemon(short_tmp / "a").start()
    try:
        mine = leftover(live.state_dir, "query-running")
        other = Daemon(short_tmp / "b")
        other.state_dir = live.state_dir  # same state directory, another socket
        other.start()
        try:
            assert mine.exists() and (mine / "scratch-0-abc" / "big.bin").exists()
        finally:
            other.stop()
    finally:
        live.stop()


def test_scratch_mb_is_validated() -> None:
    assert parse_config({"sandbox": {"scratch_mb": 64}}).sandbox.scratch_mb == 64
    with pytest.raises(Exception, match="scratch_mb"):
        parse_config({"sandbox": {"scratch_mb": 0}})


async def no_call(method: str, params: dict) -> Any:
    raise AssertionError(method)


@pytest.fixture(params=sorted(MODES))
async def repl(request: pytest.FixtureRequest, short_tmp: Path) -> AsyncIterator[ReplSession]:
    cfg = MODES[request.param]
    try:
        protection(cfg)
    except SandboxUnavailable as exc:
        pytest.skip(f"{request.param} not available here: {exc}")
    scratch = short_tmp / "scratch"
    scratch.mkdir()
    s = await ReplSession.start(
        context_path=None, limits=LimitsConfig(), sandbox=cfg, scratch_dir=scratch,
        on_call=no_call,
    )  # fmt: skip
    yield s
    await s.close()


async def test_scratch_space_is_bounded(repl: ReplSession) -> None:
    # Many files of 1 MiB each (each under the per-file limit): 40 MiB against 8 MiB.
    code = (
        "import os\n"
        "n = 0\n"
        "try:\n"
        "    for i in range(40):\n"
        "        with open(f'f{i}', 'wb') as f:\n"
        "            f.write(b'z' * (1 << 20))\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('refused', type(e).__name__)\n"
        "print('files', n)\n"
    )
    r = await repl.execute(code, timeout_s=30)
    if repl.protection.bwrap:
        # The tmpfs is full: the write fails in the block, the worker lives on.
        assert "refused" in r.output and not r.restarted, r
        assert int(r.output.split("files ")[1]) <= 8
        assert not any(repl.scratch_dir.iterdir())  # nothing on the daemon's disk
    else:
        assert r.restarted and r.error is not None and "sandbox.scratch_mb" in r.error, r
        assert not any(repl.scratch_dir.iterdir())
    one_file = await repl.execute(
        "try:\n    open('one', 'wb').write(b'y' * (9 << 20))\nexcept OSError as e:\n"
        "    print('too big', type(e).__name__)\n",
        timeout_s=30,
    )
    assert "too big" in one_file.output, one_file
    assert (await repl.execute("print('fresh')", timeout_s=10)).output == "fresh\n"


async def test_a_block_that_fills_scratch_until_its_timeout_is_caught(
    repl: ReplSession,
) -> None:
    if repl.protection.bwrap:
        pytest.skip("under bubblewrap the tmpfs refuses the writes themselves")
    code = (
        "i = 0\n"
        "while True:\n"
        "    if i < 40:\n"
        "        open(f'g{i}', 'wb').write(b'z' * (1 << 20))\n"
        "        i += 1\n"
    )
    r = await repl.execute(code, timeout_s=2)
    assert r.timed_out and r.error is not None and "sandbox.scratch_mb" in r.error, r
    assert not any(repl.scratch_dir.iterdir())
