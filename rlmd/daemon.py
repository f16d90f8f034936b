"""``rlmd``: the daemon's startup, socket ownership and shutdown.

Start-up order: flags and config (validated once; a bad config exits with a message that
names the key and file), the socket (systemd activation, or our own with a lock so that a
second daemon refuses instead of stealing it), the parts (store, providers, pool, engine),
then serve until SIGTERM/SIGINT, which drains in-flight work before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from . import __version__
from .app import App
from .blas import single_threaded_blas
from .config import Config, ConfigError, load_config
from .handlers.registry import build_methods
from .paths import default_config_path, default_socket_path, default_state_dir
from .protocol.jsonrpc import Dispatcher
from .server import Server

log = logging.getLogger("rlmd")

SD_LISTEN_FDS_START = 3


class StartupError(Exception):
    """The daemon cannot start; the message tells the user what to do."""


def _not_dumpable() -> None:
    """Hide our /proc files (environ holds API keys) from other processes of the same user.

    A REPL worker runs as the same uid; PR_SET_DUMPABLE=0 makes /proc/<daemon>/environ and
    /proc/<daemon>/mem unreadable to it in every sandbox mode.
    """
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rlmd", description="Recursive Language Model daemon")
    ap.add_argument("--socket", help="Unix socket path (env RLMD_SOCKET)")
    ap.add_argument(
        "--state-dir", help="where contexts, caches and traces persist (env RLMD_STATE_DIR)"
    )
    ap.add_argument("--config", help="TOML config file (env RLMD_CONFIG)")
    ap.add_argument(
        "--log-level",
        default=os.environ.get("RLMD_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    ap.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight work finish on SIGTERM (default 30)",
    )
    ap.add_argument("--version", action="version", version=f"rlmd {__version__}")
    return ap.parse_args(argv)


def _activated_socket() -> socket.socket | None:
    """The listening socket systemd passed us (LISTEN_FDS), if any."""
    fds = os.environ.get("LISTEN_FDS")
    pid = os.environ.get("LISTEN_PID")
    if not fds or (pid and pid != str(os.getpid())):
        return None
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not inherited by anything we start
    if int(fds) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX:
        raise StartupError("LISTEN_FDS: the passed socket is not a Unix socket")
    return sock


def _live_daemon_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; return (old soft, new soft).

    Every client holds a descriptor; the usual soft default of 1024 is reached by a
    thousand idle clients long before the hard limit is.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def bind_socket(path: Path, backlog: int = 512) -> tuple[socket.socket, int]:
    """Bind our own listening socket at ``path``, holding a lock beside it.

    Returns the socket and the lock's fd (kept open for the daemon's lifetime).
    """
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(parent, 0o700)
    lock_path = path.with_name(path.name + ".lock")
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(
                f"another rlmd is already running on {path}; stop it first "
                "(or use --socket PATH for a second daemon)"
            ) from None
        raise
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            os.close(lock_fd)
            raise StartupError(f"{path} exists and is not a socket; remove it or choose --socket")
        if _live_daemon_answers(path):
            os.close(lock_fd)
            raise StartupError(f"a daemon is already answering on {path}; not replacing it")
        path.unlink()  # left by a dead daemon
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    return sock, lock_fd


@contextlib.asynccontextmanager
async def build_app(config: Config, socket_path: Path, state_dir: Path) -> AsyncIterator[App]:
    """Create the daemon's parts and join them; close them in reverse order on exit."""
    from .compose import build_models
    from .repl.scratch import claim_scratch
    from .store.store import ContextStore

    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
    store = await asyncio.to_thread(
        ContextStore,
        state_dir / "contexts",
        search_index_min_bytes=int(config.search.index_min_mb * 1024 * 1024),
        search_index_workers=config.search.index_workers,
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(store.close)  # stops a search index build still running
        # Scratch files of daemons that died are removed; this one's are claimed (a lock).
        stack.enter_context(await asyncio.to_thread(claim_scratch, state_dir / "tmp"))
        models = await build_models(config, state_dir, store, stack)
        app = App.assemble(config, socket_path, state_dir, store, models)
        stack.push_async_callback(app.repl.aclose)
        yield app


async def serve(args: argparse.Namespace, config: Config) -> int:
    socket_path = Path(args.socket) if args.socket else default_socket_path()
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    sock = _activated_socket()
    lock_fd = None
    if sock is None:
        sock, lock_fd = bind_socket(socket_path, config.server.listen_backlog)
    else:
        socket_path = Path(sock.getsockname() or socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with build_app(config, socket_path, state_dir) as app:
            dispatcher = Dispatcher(build_methods(app))
            server = Server(
                dispatcher,
                max_frame=config.limits.max_frame_bytes,
                backlog=config.server.listen_backlog,
                max_buffered_bytes=config.server.max_buffered_bytes,
                idle_timeout_s=config.server.idle_timeout_s,
            )
            await server.start(sock)
            log.info("rlmd %s listening on %s (state in %s)", __version__, socket_path, state_dir)
            print(f"rlmd: listening on {socket_path}", file=sys.stderr, flush=True)
            await stop.wait()
            log.info("draining: %d request(s) in flight", len(server.tasks))
            app.draining = True
            await server.stop_accepting()
            clean = await server.drain(args.drain_timeout)
            log.info("stopped (%s)", "drained" if clean else "cancelled leftovers")
    finally:
        if lock_fd is not None:
            with contextlib.suppress(OSError):
                socket_path.unlink()
            os.close(lock_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlmd`` and ``python -m rlmd``."""
    single_threaded_blas()
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO, health checks included: keep the journal readable.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    _not_dumpable()
    config_path = args.config or default_config_path()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"rlmd: bad config: {exc}", file=sys.stderr)
        return 2
    if config.server.raise_nofile:
        raise_nofile_limit()
    import uvloop

    try:
        return uvloop.run(serve(args, config))
    except StartupError as exc:
        print(f"rlmd: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found while building providers (e.g. a missing API key)
        print(f"rlmd: bad config: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
