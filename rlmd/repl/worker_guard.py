"""What a REPL worker does to itself before it runs model code (this runs in the worker).

In order, from :func:`rlmd.repl.worker.main`: drop every capability and set
``no_new_privs`` (:func:`drop_privileges`, every mode), lower its resource limits
(:func:`apply_rlimits`), confine itself with Landlock (:func:`apply_landlock`: the file
system when bubblewrap is not used; signal and abstract-socket scopes in every mode where
the kernel has them), then install its seccomp filter (:func:`install_seccomp`).  The
daemon side (probing, choosing the layers, the bubblewrap command line) is
:mod:`rlmd.repl.daemon_sandbox`.

Imported by the worker: standard library only (ctypes), no asyncio, no msgspec.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import struct
import sys

# --- resource limits (called in the worker) ---------------------------------------------


def apply_rlimits(*, memory_bytes: int, cpu_s: int, open_files: int, file_size_bytes: int) -> None:
    """Lower soft and hard limits of the calling process; 0 leaves a limit unchanged."""
    pairs: list[tuple[int, int]] = [(resource.RLIMIT_CORE, 0)]
    if memory_bytes > 0:
        pairs.append((resource.RLIMIT_AS, memory_bytes))
    if cpu_s > 0:
        pairs.append((resource.RLIMIT_CPU, cpu_s))
    if open_files > 0:
        pairs.append((resource.RLIMIT_NOFILE, open_files))
    if file_size_bytes > 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        pairs.append((resource.RLIMIT_FSIZE, file_size_bytes))
    for which, value in pairs:
        _soft, hard = resource.getrlimit(which)
        # CPU: SIGXCPU at the soft limit (a clear death), SIGKILL 2 s later if caught.
        new_hard = value + 2 if which == resource.RLIMIT_CPU else value
        if hard != resource.RLIM_INFINITY:
            value, new_hard = min(value, hard), min(new_hard, hard)
        resource.setrlimit(which, (value, new_hard))


# --- seccomp (called in the worker) -----------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_AARCH64 = 0xC00000B7
_X32_SYSCALL_BIT = 0x40000000
_CLONE_THREAD = 0x00010000

_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06

# Syscall numbers per architecture: (seccomp syscall, clone, clone3, denied with EPERM).
_DENY_NAMES = (
    "socket socketpair fork vfork execve execveat ptrace process_vm_readv process_vm_writev "
    "pidfd_getfd pidfd_open kcmp io_uring_setup io_uring_enter io_uring_register unshare "
    "setns mount umount2 pivot_root chroot bpf perf_event_open userfaultfd keyctl add_key "
    "request_key setrlimit personality tkill pidfd_send_signal"
).split()
# Calls that send a signal to the process named by args[0]: allowed only to itself.
_SIGNAL_NAMES = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
# fcntl commands that make the kernel signal another process later (SIGIO or any signal
# chosen with F_SETSIG, sent to the owner on I/O): F_SETOWN, F_SETSIG, F_SETOWN_EX.
_FCNTL_DENIED = (8, 10, 15)
# ioctl requests with the same effect: FIOSETOWN, SIOCSPGRP; and TIOCSPGRP / TIOCSTI
# (a terminal's foreground group, injected input), which no worker needs.
_IOCTL_DENIED = (0x8901, 0x8902, 0x5410, 0x5412)
_SYSCALLS = {
    "x86_64": {
        "seccomp": 317,
        "fcntl": 72,
        "ioctl": 16,
        "clone": 56,
        "clone3": 435,
        "socket": 41,
        "socketpair": 53,
        "fork": 57,
        "vfork": 58,
        "execve": 59,
        "execveat": 322,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "pidfd_getfd": 438,
        "pidfd_open": 434,
        "kcmp": 312,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "unshare": 272,
        "setns": 308,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "bpf": 321,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "setrlimit": 160,
        "prlimit64": 302,
        "personality": 135,
        "kill": 62,
        "tkill": 200,
        "tgkill": 234,
        "rt_sigqueueinfo": 129,
        "rt_tgsigqueueinfo": 297,
        "pidfd_send_signal": 424,
    },
    "aarch64": {
        "seccomp": 277,
        "fcntl": 25,
        "ioctl": 29,
        "clone": 220,
        "clone3": 435,
        "socket": 198,
        "socketpair": 199,
        "execve": 221,
        "execveat": 281,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "pidfd_getfd": 438,
        "pidfd_open": 434,
        "kcmp": 272,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "unshare": 97,
        "setns": 268,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "bpf": 280,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "setrlimit": 164,
        "prlimit64": 261,
        "personality": 92,
        "kill": 129,
        "tkill": 130,
        "tgkill": 131,
        "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240,
        "pidfd_send_signal": 424,
    },
}
_AUDIT_ARCH = {"x86_64": _AUDIT_ARCH_X86_64, "aarch64": _AUDIT_ARCH_AARCH64}


def seccomp_supported() -> str | None:
    """None when this architecture has a filter; otherwise why not."""
    if sys.platform != "linux":
        return f"seccomp is Linux-only (platform {sys.platform})"
    if os.uname().machine not in _SYSCALLS:
        return f"no seccomp filter for architecture {os.uname().machine}"
    return None


def build_filter(machine: str, own_pid: int | None = None) -> bytes:
    """The BPF program (array of ``struct sock_filter``) for ``machine``.

    ``own_pid`` (default: the caller's pid) is the only process the filtered process may
    signal (``kill``/``tgkill``/``rt_(tg)sigqueueinfo`` with another target get EPERM;
    ``kill(0, ...)``, its own process group, stays allowed).
    """
    nrs = _SYSCALLS[machine]
    pid = os.getpid() if own_pid is None else own_pid
    # A tiny assembler: jump targets are labels, resolved to forward offsets at the end.
    prog: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}

    def ins(code: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        prog.append((code, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(prog)

    ins(_BPF_LD_W_ABS, 4)  # seccomp_data.arch
    ins(_BPF_JEQ_K, _AUDIT_ARCH[machine], jt=1)
    ins(_BPF_RET_K, _SECCOMP_RET_KILL_PROCESS)
    ins(_BPF_LD_W_ABS, 0)  # seccomp_data.nr
    if machine == "x86_64":
        ins(_BPF_JGE_K, _X32_SYSCALL_BIT, jt="eperm")
    ins(_BPF_JEQ_K, nrs["clone"], jt="clone")
    ins(_BPF_JEQ_K, nrs["clone3"], jt="enosys")
    ins(_BPF_JEQ_K, nrs["prlimit64"], jt="prlimit64")
    ins(_BPF_JEQ_K, nrs["fcntl"], jt="fcntl")
    ins(_BPF_JEQ_K, nrs["ioctl"], jt="ioctl")
    for name in _SIGNAL_NAMES:
        ins(_BPF_JEQ_K, nrs[name], jt="self_target")
    for nr in sorted({nrs[n] for n in _DENY_NAMES if n in nrs}):
        ins(_BPF_JEQ_K, nr, jt="eperm")
    ins(_BPF_RET_K, _SECCOMP_RET_ALLOW)
    # clone: a thread (CLONE_THREAD in the flags, low word of args[0]) is fine, a new
    # process is not.
    label("clone")
    ins(_BPF_LD_W_ABS, 16)
    ins(_BPF_JSET_K, _CLONE_THREAD, jt="allow", jf="eperm")
    # prlimit64 reads limits (getrlimit uses it) but must not set them: args[2] == NULL.
    label("prlimit64")
    ins(_BPF_LD_W_ABS, 32)
    ins(_BPF_JEQ_K, 0, jf="eperm")
    ins(_BPF_LD_W_ABS, 36)
    ins(_BPF_JEQ_K, 0, jt="allow", jf="eperm")
    # fcntl / ioctl: the command (args[1]) is an unsigned int for the kernel, so its low
    # word decides; the commands that name a signal's target are refused.
    label("fcntl")
    ins(_BPF_LD_W_ABS, 24)
    for cmd in _FCNTL_DENIED:
        ins(_BPF_JEQ_K, cmd, jt="eperm")
    ins(_BPF_RET_K, _SECCOMP_RET_ALLOW)
    label("ioctl")
    ins(_BPF_LD_W_ABS, 24)
    for cmd in _IOCTL_DENIED:
        ins(_BPF_JEQ_K, cmd, jt="eperm")
    ins(_BPF_RET_K, _SECCOMP_RET_ALLOW)
    # Signals only to itself (args[0] is the target pid / thread group, an int).
    label("self_target")
    ins(_BPF_LD_W_ABS, 16)
    ins(_BPF_JEQ_K, pid, jt="allow")
    ins(_BPF_JEQ_K, 0, jt="allow", jf="eperm")
    label("allow")
    ins(_BPF_RET_K, _SECCOMP_RET_ALLOW)
    label("eperm")
    ins(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EPERM)
    label("enosys")
    ins(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.ENOSYS)

    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt_off = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf_off = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt_off < 256 and 0 <= jf_off < 256):
            raise ValueError(f"seccomp program: jump out of range at instruction {i}")
        out.append(struct.pack("=HBBI", code, jt_off, jf_off, k))
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp() -> None:
    """Install the filter on the calling process (all threads); raises OSError on failure."""
    why = seccomp_supported()
    if why:
        raise OSError(errno.ENOSYS, why)
    machine = os.uname().machine
    code = build_filter(machine)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    set_no_new_privs()
    seccomp_set_mode_filter, seccomp_filter_flag_tsync = 1, 1
    rc = libc.syscall(
        ctypes.c_long(_SYSCALLS[machine]["seccomp"]),
        ctypes.c_uint(seccomp_set_mode_filter),
        ctypes.c_uint(seccomp_filter_flag_tsync),
        ctypes.byref(prog),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")


# --- privileges (called in the worker, first thing, in every mode) --------------------

_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: SECBIT_NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE and their locks:
#: uid 0 gains nothing from exec, a setuid call or the ambient set, ever again.
_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80


def set_no_new_privs() -> None:
    """``prctl(PR_SET_NO_NEW_PRIVS, 1)``: exec can never grant privileges (setuid, file caps)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def drop_privileges() -> None:
    """Give up every capability for good and set ``no_new_privs``; raises OSError if any
    capability is left.

    A daemon run as root would otherwise hand its workers CAP_SYS_TIME, CAP_MKNOD,
    CAP_SYS_ADMIN ... (bubblewrap drops them with ``--cap-drop ALL``; the other modes
    relied on nothing).  Order matters: the bounding set and the securebits need
    CAP_SETPCAP, so they go before the effective and permitted sets are emptied.  A
    process without CAP_SETPCAP (a daemon not run as root) cannot shrink its bounding
    set; with no_new_privs and empty permitted and ambient sets it can never use it.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    have_setpcap = _cap_set("CapEff") >> 8 & 1  # CAP_SETPCAP is capability 8
    if have_setpcap:
        libc.prctl(_PR_SET_SECUREBITS, _SECUREBITS, 0, 0, 0)  # best effort (locked already?)
        for cap in range(last + 1):
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before 4.3
    header = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two struct __user_cap_data_struct, all zero
    hbuf = ctypes.create_string_buffer(header, len(header))
    dbuf = ctypes.create_string_buffer(data, len(data))
    if libc.capset(hbuf, dbuf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    set_no_new_privs()
    left = {k: _cap_set(k) for k in ("CapEff", "CapPrm", "CapInh", "CapAmb")}
    if any(left.values()):
        raise OSError(errno.EPERM, f"capabilities left after dropping: {left}")


def _cap_set(field: str) -> int:
    """A capability set of this process from /proc/self/status (0 if unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


# --- Landlock (called in the worker when bubblewrap is not used) -------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444  # same numbers on x86_64 and aarch64
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1, 2, 4, 8
_LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 14, 1 << 15
#: Rights that make sense on a regular file (the rest only on directories).
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV
LL_READ = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
LL_ALL = (1 << 16) - 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when there is none (in-process, restricts nothing)."""
    if sys.platform != "linux":
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create_ruleset_version = 1
        abi = libc.syscall(
            ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
            ctypes.c_uint(create_ruleset_version),
        )  # fmt: skip
    except OSError:
        return 0
    return max(int(abi), 0)


#: Landlock scopes (ABI >= 6): no signal to, and no abstract Unix socket of, a process
#: outside the worker's own Landlock domain (the daemon, every other process).
LL_SCOPE_ABSTRACT_UNIX = 1
LL_SCOPE_SIGNAL = 2
LL_SCOPES_ABI = 6


def apply_landlock(rules: list[tuple[str, int]], *, scoped: int = 0) -> None:
    """Allow the calling thread (and threads and children it creates later) only ``rules``.

    ``rules`` are (path, rights) pairs, rights being ``LL_READ`` or ``LL_ALL``; every other
    file system access is denied (reading, writing, listing, creating, removing).  Paths
    that do not exist are skipped.  An empty ``rules`` leaves the file system alone and
    only applies ``scoped`` (``LL_SCOPE_*`` bits, which need ABI 6).  Raises OSError when
    the kernel refuses.
    """
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.ENOSYS, "the kernel has no Landlock")
    if scoped and abi < LL_SCOPES_ABI:
        raise OSError(errno.EOPNOTSUPP, f"Landlock ABI {abi} has no scopes (needs 6)")
    handled = 0
    if rules:
        handled = (1 << 13) - 1
        if abi >= 2:
            handled |= 1 << 13  # REFER
        if abi >= 3:
            handled |= _LL_TRUNCATE
        if abi >= 5:
            handled |= _LL_IOCTL_DEV
    if not handled and not scoped:
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> int:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net (ABI 4), scoped
    # (ABI 6); the shortest size that carries what is set.
    packed = struct.pack("<QQQ", handled, 0, scoped) if scoped else struct.pack("<Q", handled)
    attr = ctypes.create_string_buffer(packed, len(packed))
    ruleset = check(
        libc.syscall(
            ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
            attr,
            ctypes.c_size_t(len(packed)),
            ctypes.c_uint(0),
        ),
        "landlock_create_ruleset",
    )
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                allowed = rights & handled
                if not _is_dir_fd(fd):
                    allowed &= _LL_FILE_RIGHTS
                beneath = ctypes.create_string_buffer(struct.pack("<Qi", allowed, fd), 12)
                check(
                    libc.syscall(
                        ctypes.c_long(_SYS_LANDLOCK_ADD_RULE),
                        ctypes.c_int(ruleset),
                        ctypes.c_int(1),
                        beneath,
                        ctypes.c_uint(0),
                    ),
                    f"landlock_add_rule({path})",
                )
            finally:
                os.close(fd)
        set_no_new_privs()
        check(
            libc.syscall(
                ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint(0)
            ),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset)


def _is_dir_fd(fd: int) -> bool:
    import stat

    return stat.S_ISDIR(os.fstat(fd).st_mode)
