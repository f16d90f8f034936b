"""Scratch space of REPL workers, daemon side: claimed at startup, cleaned, measured.

The engine gives each query a directory ``<state>/tmp/query-*`` (each REPL gets a
``scratch-*`` directory in it) and removes it when the query ends.  A daemon that dies
(``kill -9``, a crash, the machine going down) leaves them behind, and with them whatever
model code wrote.  So every daemon holds a lock file in ``<state>/tmp`` for its lifetime:
a shared ``flock``, which any number of live daemons sharing the state directory can
hold at once.  At startup a daemon first tries the lock *exclusively*: if that works, no
live daemon owns anything under ``tmp`` and every leftover entry is removed; if not,
another daemon is running there and nothing is touched.

Blocking file system work: call these from a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".owners.lock"
#: How many entries a scratch measurement looks at before it calls the directory too big
#: (millions of empty files cost inodes and time, not bytes).
MAX_SCRATCH_ENTRIES = 100_000


class ScratchClaim:
    """This daemon's share of ``<state>/tmp``; ``close()`` (or the context) gives it up."""

    def __init__(self, fd: int, removed: int) -> None:
        self.fd = fd
        #: Leftover entries removed at startup (0 when another daemon was running).
        self.removed = removed

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1

    def __enter__(self) -> ScratchClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def claim_scratch(tmp_dir: Path) -> ScratchClaim:
    """Create ``tmp_dir`` if needed, remove what dead daemons left there, and hold a shared
    lock on it until the claim is closed."""
    tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(tmp_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    removed = 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another daemon uses %s: its scratch files are left alone", tmp_dir)
        else:
            removed = _remove_leftovers(tmp_dir)
        # Shared from now on: later daemons see this one as alive and keep off.
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    if removed:
        log.info("removed %d scratch entr%s left by a daemon that died", removed,
                 "y" if removed == 1 else "ies")  # fmt: skip
    return ScratchClaim(fd, removed)


def _remove_leftovers(tmp_dir: Path) -> int:
    removed = 0
    for entry in os.scandir(tmp_dir):
        if entry.name == LOCK_NAME:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError as exc:  # keep going: one stubborn entry must not block startup
            log.warning("could not remove leftover scratch entry %s: %s", entry.path, exc)
    return removed


def scratch_usage(path: Path, limit_bytes: int) -> int:
    """Bytes used under ``path`` (allocated blocks, so sparse files count as what they
    take); stops early and returns more than ``limit_bytes`` once it is over, or once it
    has seen ``MAX_SCRATCH_ENTRIES`` entries."""
    total, seen = 0, 0
    stack = [str(path)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                seen += 1
                if seen > MAX_SCRATCH_ENTRIES:
                    return limit_bytes + 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += max(st.st_blocks * 512, 4096)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                if total > limit_bytes:
                    return total
    return total


def empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` (the directory itself stays)."""
    for entry in os.scandir(path):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
