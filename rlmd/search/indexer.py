"""Builds search indexes in the background: one child process at a time, fed by a thread.

The store asks for an index after a put of a large context (and at startup, for large
contexts without one, or with a damaged one).  The work runs in a child process
(``python -m rlmd.search.index``) so that neither the daemon's event loop (no GIL
held by tokenizing) nor its resident size (no tokens in the daemon's heap) feel it; the
thread only waits for the child.  The child writes a temp file; ``install`` moves it into
place atomically if the version is still current.  A child exits by itself when the
daemon is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import rlmd

log = logging.getLogger(__name__)

Install = Callable[[str, str, Path], None]  # (key, version, built temp file)


class Indexer:
    """A queue of index builds ``(key, version, text path)``, run one at a time."""

    def __init__(self, tmp_dir: Path, install: Install, workers: int = 1) -> None:
        """``workers``: processes that one build uses side by side (see index.build)."""
        self.tmp_dir = tmp_dir
        self.install = install
        self.workers = max(1, workers)
        self._q: queue.Queue[tuple[str, str, Path] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: set[tuple[str, str]] = set()
        self.failed: dict[tuple[str, str], str] = {}
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._closed = False

    def schedule(self, key: str, version: str, text_path: Path) -> bool:
        """Queue a build unless one is queued or running, or it failed; True if queued."""
        with self._lock:
            job = (key, version)
            if self._closed or job in self._pending or job in self.failed:
                return False
            self._pending.add(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rlmd-indexer", daemon=True)
                self._thread.start()
        self._q.put((key, version, text_path))
        return True

    def building(self, key: str, version: str) -> bool:
        with self._lock:
            return (key, version) in self._pending

    def close(self) -> None:
        """Stop: the running child is killed, queued builds are dropped."""
        with self._lock:
            self._closed = True
            proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
        self._q.put(None)

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            key, version, text = job
            try:
                self._build(key, version, text)
            except Exception as e:  # a failed build costs scans, never the daemon
                log.warning("search index of %s failed: %s", text, e)
                with self._lock:
                    self.failed[(key, version)] = str(e)[:500]
            finally:
                with self._lock:
                    self._pending.discard((key, version))

    def _build(self, key: str, version: str, text: Path) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.tmp_dir / f"{version}.{secrets.token_hex(6)}.sidx"
        pkg_root = str(Path(rlmd.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, *sys.path[1:]])}
        argv = [sys.executable, "-m", "rlmd.search.index", str(text), str(tmp), str(os.getpid()),
                str(self.workers)]  # fmt: skip
        try:
            with self._lock:
                if self._closed:
                    return
                self._proc = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )  # fmt: skip
            out, err = self._proc.communicate()
            rc = self._proc.returncode
            with self._lock:
                self._proc = None
            if rc != 0:
                raise RuntimeError(f"builder exited {rc}: {err.decode(errors='replace')[-400:]}")
            log.info("search index of %s: %s", text.name, out.decode(errors="replace").strip())
            self.install(key, version, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
