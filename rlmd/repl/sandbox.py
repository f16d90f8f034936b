"""Kept for imports from outside ``rlmd/repl`` (the engine, benchmarks): the daemon-side
names now live in :mod:`rlmd.repl.daemon_sandbox`, what the worker applies to itself in
:mod:`rlmd.repl.worker_guard`.  New code imports from those."""

from rlmd.repl.daemon_sandbox import (
    DEFAULT_PROBE,
    ProbeCache,
    Protection,
    SandboxProbe,
    SandboxUnavailable,
    host_sys_path,
    python_executable,
    resolve,
)
from rlmd.repl.worker_guard import build_filter

__all__ = [
    "DEFAULT_PROBE",
    "ProbeCache",
    "Protection",
    "SandboxProbe",
    "SandboxUnavailable",
    "build_filter",
    "host_sys_path",
    "python_executable",
    "resolve",
]
