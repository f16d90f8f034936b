"""Protection of REPL workers, daemon side: probing, choosing the layers, bubblewrap.

Three layers, each optional, each probed once on this machine:

* **rlimits** (always, on Linux): address space, CPU seconds, open files, file size,
  no core dumps.  The worker lowers its own soft *and* hard limits before running model
  code; the seccomp filter then forbids raising them again (root could otherwise).
* **seccomp** (``SandboxConfig.seccomp``): a classic BPF filter installed by the worker
  itself through ctypes (``PR_SET_NO_NEW_PRIVS`` + ``seccomp(SECCOMP_SET_MODE_FILTER)``).
  It makes ``socket``/``socketpair`` fail with EPERM (no network, loopback and Unix
  sockets included; the worker already holds its channel), forbids creating processes
  (fork, vfork, clone without CLONE_THREAD; clone3 gets ENOSYS so that libc falls back to
  clone, which keeps threads working), exec, ptrace and cross-process memory access,
  io_uring (which could create sockets behind seccomp's back), namespace and mount calls,
  bpf, perf and keyring calls, setting rlimits (reading them stays allowed), and
  signals to any process but itself (the daemon is a same-uid process).  The filter checks the architecture
  field and kills the process on a foreign one (and on x32 syscalls).
* **bubblewrap** (``SandboxConfig.bwrap``): the worker runs in fresh namespaces
  (``--unshare-all``: no network at all, its own pid namespace, ...), sees only read-only
  binds of the system libraries and the Python it needs, the context file read-only and
  a scratch directory read-write; ``--clearenv`` with an explicit minimal environment,
  ``--cap-drop ALL``, ``--die-with-parent``.

``auto`` uses a layer when the probe says it works, ``require`` refuses to start a worker
without it, ``off`` never uses it.  (The worker never imports this module.)

What the worker applies to itself (rlimits, capabilities, Landlock, the seccomp program)
is :mod:`rlmd.repl.worker_guard`; this module runs in the daemon.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Literal

import msgspec

from rlmd.repl.worker_guard import LL_ALL, LL_READ, LL_SCOPES_ABI, landlock_abi, seccomp_supported

if TYPE_CHECKING:
    from pathlib import Path

Mode = Literal["auto", "require", "off"]

#: Where the worker's Python packages (rlmd, msgspec) are mounted inside bubblewrap.
SANDBOX_LIB = "/opt/rlmd-lib"
SANDBOX_SCRATCH = "/scratch"
SANDBOX_CONTEXT_DIR = "/context"


class SandboxUnavailable(RuntimeError):
    """A layer set to ``require`` does not work on this machine; the message says why."""


class Protection(msgspec.Struct, kw_only=True):
    """Which protections REPL workers get here (shown in ``daemon/status``)."""

    bwrap: bool
    seccomp: bool
    rlimits: bool
    bwrap_detail: str = ""
    seccomp_detail: str = ""
    #: File system confinement without bubblewrap (see ``apply_landlock``).
    landlock: bool = False
    landlock_detail: str = ""
    #: Landlock signal (and abstract socket) scoping, in every mode where the kernel has it.
    landlock_scoped: bool = False
    #: Every capability dropped and no_new_privs set in the worker (every mode, Linux).
    privileges_dropped: bool = False

    def summary(self) -> str:
        """``bwrap+seccomp+landlock+rlimits``: the layers a worker runs under ("none")."""
        names = [n for n in ("bwrap", "seccomp", "landlock", "rlimits") if getattr(self, n)]
        if self.landlock_scoped and not self.landlock:
            names.append("landlock-scope")
        if self.privileges_dropped:
            names.append("nocaps")
        return "+".join(names) or "none"


class SandboxProbe(msgspec.Struct, kw_only=True):
    """What works on this machine, whatever the configuration says."""

    bwrap: bool
    seccomp: bool
    bwrap_detail: str
    seccomp_detail: str
    landlock_abi: int = 0


# --- Landlock rules (the worker applies them) -----------------------------------------


def landlock_rules(
    *, context_path: Path | None, index_path: Path | None, scratch_dir: Path
) -> list[tuple[str, int]]:
    """What a worker outside bubblewrap may touch: the same things bubblewrap would mount."""
    rules: list[tuple[str, int]] = [
        (top, LL_READ) for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
    ]
    rules += [("/etc/ld.so.cache", LL_READ), ("/etc/localtime", LL_READ)]
    # Its own /proc entry (resolved by the worker, so its own pid): /proc/self/status
    # says what it may do; every other process, the daemon included, stays out of reach.
    rules.append(("/proc/self", LL_READ))
    rules.append((os.path.realpath(sys.base_prefix), LL_READ))
    rules += [(d, LL_READ) for d in library_dirs().values()]
    for f in (context_path, index_path):
        if f is not None:
            rules.append((str(f), LL_READ))
    rules.append((str(scratch_dir), LL_ALL))
    return rules


# --- bubblewrap (daemon side) -----------------------------------------------------------


def python_executable() -> str:
    """The real interpreter (not the venv's symlink): the worker runs it with -I -S."""
    return os.path.realpath(sys.executable)


def library_dirs() -> dict[str, str]:
    """Package name -> directory of the packages the worker imports (rlmd, msgspec)."""
    import rlmd

    return {
        "rlmd": os.path.dirname(os.path.realpath(rlmd.__file__)),
        "msgspec": os.path.dirname(os.path.realpath(msgspec.__file__)),
    }


def host_sys_path() -> list[str]:
    """sys.path entries that make rlmd and msgspec importable without bubblewrap."""
    out: list[str] = []
    for d in library_dirs().values():
        parent = os.path.dirname(d)
        if parent not in out:
            out.append(parent)
    return out


#: What every bubblewrap sandbox of rlmd starts with (REPL workers and the improvement
#: cycle's test runs): new namespaces of every kind (no network), dead with the daemon,
#: no capabilities.
BWRAP_ISOLATION = ("--unshare-all", "--die-with-parent", "--cap-drop", "ALL")


def bwrap_argv(
    *,
    bwrap: str,
    context_path: Path | None,
    scratch_dir: Path,
    env: dict[str, str],
    index_path: Path | None = None,
    scratch_bytes: int = 0,
) -> list[str]:
    """The bubblewrap command line that precedes the worker's own argv."""
    argv = [bwrap, *BWRAP_ISOLATION, "--hostname", "rlmd-worker", "--clearenv"]
    # System libraries: merged-/usr distributions have symlinks at the top level.
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for f in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", f, f]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/") and prefix != "/usr":
        argv += ["--ro-bind", prefix, prefix]
    for name, d in library_dirs().items():
        argv += ["--ro-bind", d, f"{SANDBOX_LIB}/{name}"]
    # No writable tmpfs anywhere (its pages would be memory outside RLIMIT_AS): no /tmp
    # (TMPDIR is the scratch directory), and / and /dev are remounted read-only below.
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if scratch_bytes > 0:
        # A tmpfs bounded in size: the worker's writes cannot fill the daemon's disk, and
        # nothing is left on disk when the worker (or the daemon) dies.  Its pages are
        # memory outside RLIMIT_AS, bounded by the size instead.
        argv += ["--size", str(scratch_bytes), "--perms", "0700", "--tmpfs", SANDBOX_SCRATCH]
    else:
        argv += ["--bind", str(scratch_dir), SANDBOX_SCRATCH]
    argv += ["--chdir", SANDBOX_SCRATCH]
    if context_path is not None:
        argv += ["--ro-bind", str(context_path), f"{SANDBOX_CONTEXT_DIR}/context.txt"]
    if index_path is not None:
        argv += ["--ro-bind", str(index_path), f"{SANDBOX_CONTEXT_DIR}/context.idx"]
    for k, v in env.items():
        argv += ["--setenv", k, v]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    return argv


def worker_env(home: str) -> dict[str, str]:
    """The whole environment of a worker: nothing is passed through from the daemon."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONHASHSEED": "0",
    }


# --- probing ----------------------------------------------------------------------------

_SECCOMP_PROBE = """
import sys
sys.path[:0] = {paths!r}
from rlmd.repl.worker_guard import install_seccomp
install_seccomp()
import socket
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
except PermissionError:
    print("ok")
else:
    print("socket still allowed")
"""


def probe_commands() -> tuple[list[str], list[str]]:
    """The two probe commands: bubblewrap running ``true``; a Python installing the filter."""
    import shutil

    bw = shutil.which("bwrap") or "bwrap"
    bwrap_cmd = [bw, "--unshare-all", "--die-with-parent", "--cap-drop", "ALL"]
    bwrap_cmd += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    seccomp_cmd = [
        python_executable(), "-I", "-S", "-c", _SECCOMP_PROBE.format(paths=host_sys_path()),
    ]  # fmt: skip
    return bwrap_cmd, seccomp_cmd


def interpret_probe(
    bwrap_rc: int | None, bwrap_err: str, seccomp_rc: int | None, seccomp_out: str, seccomp_err: str
) -> SandboxProbe:
    """Turn probe exit codes and outputs into a SandboxProbe with reasons."""
    bw_ok = bwrap_rc == 0
    if bwrap_rc is None:
        bw_detail = f"bwrap not runnable: {bwrap_err}"
    elif bw_ok:
        bw_detail = "bwrap --unshare-all works"
    else:
        bw_detail = f"bwrap failed (exit {bwrap_rc}): {bwrap_err.strip()[:300]}"
    why = seccomp_supported()
    sc_ok = why is None and seccomp_rc == 0 and seccomp_out.strip() == "ok"
    if why:
        sc_detail = why
    elif sc_ok:
        sc_detail = "seccomp filter installs and denies socket()"
    else:
        sc_detail = (
            f"seccomp probe failed (exit {seccomp_rc}): {(seccomp_out + seccomp_err).strip()[:300]}"
        )
    return SandboxProbe(
        bwrap=bw_ok,
        seccomp=sc_ok,
        bwrap_detail=bw_detail,
        seccomp_detail=sc_detail,
        landlock_abi=landlock_abi(),
    )


class ProbeCache:
    """Holds the probe of this machine, run once (sync or async, whichever comes first)."""

    def __init__(self) -> None:
        self.probe: SandboxProbe | None = None

    def run_sync(self) -> SandboxProbe:
        """Probe with blocking subprocess calls (for callers outside an event loop)."""
        if self.probe is None:
            import subprocess

            bwrap_cmd, seccomp_cmd = probe_commands()
            try:
                b = subprocess.run(bwrap_cmd, capture_output=True, text=True, timeout=20)
                b_rc, b_err = b.returncode, b.stderr
            except (OSError, subprocess.TimeoutExpired) as exc:
                b_rc, b_err = None, str(exc)
            try:
                s = subprocess.run(
                    seccomp_cmd, capture_output=True, text=True, timeout=20, env=worker_env("/")
                )
                s_rc, s_out, s_err = s.returncode, s.stdout, s.stderr
            except (OSError, subprocess.TimeoutExpired) as exc:
                s_rc, s_out, s_err = None, "", str(exc)
            self.probe = interpret_probe(b_rc, b_err, s_rc, s_out, s_err)
        return self.probe

    async def run_async(self) -> SandboxProbe:
        """Probe without blocking the event loop."""
        if self.probe is None:
            import asyncio

            bwrap_cmd, seccomp_cmd = probe_commands()

            async def run(
                cmd: list[str], env: dict[str, str] | None
            ) -> tuple[int | None, str, str]:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *cmd,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                        env=env,
                    )
                except OSError as exc:
                    return None, "", str(exc)
                try:
                    async with asyncio.timeout(20):
                        out, err = await proc.communicate()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    return None, "", "probe timed out"
                return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

            b_rc, _, b_err = await run(bwrap_cmd, None)
            s_rc, s_out, s_err = await run(seccomp_cmd, worker_env("/"))
            if self.probe is None:
                self.probe = interpret_probe(b_rc, b_err, s_rc, s_out, s_err)
        return self.probe


#: The machine does not change while the daemon runs; the probe is cached per process.
DEFAULT_PROBE = ProbeCache()


def resolve(probe: SandboxProbe, *, bwrap: Mode, seccomp: Mode) -> Protection:
    """Decide which layers to use; SandboxUnavailable when a required one does not work."""
    use_bwrap = bwrap != "off" and probe.bwrap
    use_seccomp = seccomp != "off" and probe.seccomp
    if bwrap == "require" and not probe.bwrap:
        raise SandboxUnavailable(
            f"sandbox.bwrap = 'require' but {probe.bwrap_detail}; install bubblewrap "
            "(and allow user namespaces) or set sandbox.bwrap = 'auto'"
        )
    if seccomp == "require" and not probe.seccomp:
        raise SandboxUnavailable(
            f"sandbox.seccomp = 'require' but {probe.seccomp_detail}; set sandbox.seccomp = 'auto'"
        )
    # Landlock stands in for bubblewrap's file system isolation; it rides on the seccomp
    # setting (both are restrictions the worker puts on itself).
    use_landlock = not use_bwrap and seccomp != "off" and probe.landlock_abi >= 1
    if use_bwrap:
        ll_detail = "not needed: bubblewrap isolates the file system"
    elif seccomp == "off":
        ll_detail = "disabled with sandbox.seccomp = 'off'"
    elif probe.landlock_abi >= 1:
        ll_detail = f"Landlock ABI {probe.landlock_abi}"
    else:
        ll_detail = "the kernel has no Landlock"
    return Protection(
        landlock_scoped=probe.landlock_abi >= LL_SCOPES_ABI,
        privileges_dropped=sys.platform == "linux",
        landlock=use_landlock,
        landlock_detail=ll_detail,
        bwrap=use_bwrap,
        seccomp=use_seccomp,
        rlimits=sys.platform == "linux",
        bwrap_detail=probe.bwrap_detail if bwrap != "off" else "disabled by sandbox.bwrap = 'off'",
        seccomp_detail=(
            probe.seccomp_detail if seccomp != "off" else "disabled by sandbox.seccomp = 'off'"
        ),
    )
