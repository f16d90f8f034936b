"""Shared fixtures: a real daemon on a temp socket and state dir, talked to over the socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlmd.blas import single_threaded_blas
from rlmd.client import Client
from rlmd.launch import DaemonStartError, daemon_command, spawn_daemon, wait_until_answering
from rlmd.protocol.framing import Framing
from rlmd.testing.scripted_server import ScriptedServer

REPO = Path(__file__).resolve().parents[1]

# Tests run engines, caches and REPL workers in this process too (see the function).
single_threaded_blas()


class Daemon:
    """A running ``python -m rlmd`` subprocess and how to talk to it."""

    def __init__(self, root: Path, config_text: str | None = None, env: dict | None = None) -> None:
        self.root = root
        self.socket = root / "s.sock"
        self.state_dir = root / "state"
        self.config = None
        if config_text is not None:
            self.config = root / "config.toml"
            self.config.write_text(config_text)
        self.env = {**os.environ, **(env or {})}
        self.env.pop("RLMD_SOCKET", None)
        self.env.pop("RLMD_CONFIG", None)
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return daemon_command(
            self.socket, state_dir=self.state_dir, config=self.config, log_level="debug"
        )

    def start(self, timeout: float = 20.0) -> Daemon:
        with open(self.log, "ab") as logf:
            self.proc = spawn_daemon(
                self.args(), stdout=logf, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )
        try:
            wait_until_answering(self.proc, self.socket, timeout_s=timeout)
        except DaemonStartError as exc:
            raise RuntimeError(f"{exc}:\n{self.log.read_text()}") from None
        return self

    def client(self, framing: Framing = Framing.NDJSON, timeout: float | None = 60) -> Client:
        return Client(self.socket, framing=framing, timeout=timeout)

    def call(self, method: str, params: dict | None = None, **kw):
        with self.client() as c:
            return c.call(method, params, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def restart(self) -> Daemon:
        self.stop()
        return self.start()


def _scripted_config(
    url: str, extra: str = "", *, root: str = "root", sub: str = "sub", capacity: int = 4
) -> str:
    return f"""
[[providers]]
name = "scripted"
kind = "ollama"
base_url = "{url}"
models = ["{root}", "{sub}"]
capacity = {capacity}

[models]
root = "{root}"
sub = "{sub}"
{extra}"""


@pytest.fixture
def scripted_config():
    """``scripted_config(url, extra="", root="root", sub="sub", capacity=4)``: a config whose
    one provider is a scripted loopback server speaking Ollama's wire format, serving
    ``root`` and ``sub``; ``extra`` is appended (more sections)."""
    return _scripted_config


@pytest.fixture
def serve_scripted(make_daemon, scripted_config):
    """``with serve_scripted(responder, extra, root=..., sub=..., capacity=4) as (d, srv)``:
    a scripted loopback model server answering with ``responder``, and a daemon whose one
    provider it is (``scripted_config``)."""

    @contextlib.contextmanager
    def serve(responder, extra: str = "", *, root: str = "root", sub: str = "sub", capacity=4):
        with ScriptedServer(responder=responder, models=[root, sub]) as srv:
            cfg = scripted_config(srv.url, extra, root=root, sub=sub, capacity=capacity)
            yield make_daemon(cfg), srv

    return serve


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path (Unix socket paths are limited to ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="rlmd-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator:
    """Factory: ``make_daemon(config_text=None, env=None)`` starts a daemon; all stop at the end."""
    started: list[Daemon] = []

    def make(config_text: str | None = None, env: dict | None = None, start: bool = True) -> Daemon:
        root = short_tmp / f"d{len(started)}"
        root.mkdir()
        d = Daemon(root, config_text, env)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop(signal.SIGKILL if d.proc and d.proc.poll() is None else signal.SIGTERM)


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A daemon with the default config."""
    return make_daemon()
