"""Sandboxed REPL workers: model-written code never runs inside the daemon.

``ReplSession`` (daemon side, :mod:`rlmd.repl.session`) runs blocks in a worker process
(:mod:`rlmd.repl.worker`) protected as :mod:`rlmd.repl.daemon_sandbox` (daemon side) and :mod:`rlmd.repl.worker_guard` (in the worker) describe.  Exports are
lazy so that the worker, which imports submodules of this package, does not pay for
asyncio and the daemon-side code at start-up.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CallHandler", "ExecResult", "Protection", "ReplSession", "protection"]


def __getattr__(name: str) -> Any:
    if name in ("CallHandler", "ExecResult", "ReplSession", "protection"):
        from rlmd.repl import session

        return getattr(session, name)
    if name == "Protection":
        from rlmd.repl.daemon_sandbox import Protection

        return Protection
    raise AttributeError(f"module 'rlmd.repl' has no attribute {name!r}")
