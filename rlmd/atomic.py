"""Replacing a file whole: readers see the old content or the new, never a torn file."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

#: Temp files start with this, beside their target (the store sweeps leftovers of a crash).
TMP_PREFIX = ".tmp-"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file and a rename (no dir fsync).

    The temp file is removed if anything fails, so a failed write leaves nothing behind.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{secrets.token_hex(8)}{path.suffix}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
