"""The repository as the cycle sees it: a fingerprint, disposable copies, applying a diff.

The user's working tree, index, HEAD and branches are only ever *read* here until
``apply_diff(repo, ...)`` runs at approval; proposals are tried in a copy outside the
repository (not a ``git worktree``, which would add an entry under ``.git``), built from
the files git tracks plus the untracked ones it does not ignore, as they are on disk, so
the tests see the same tree the analysis read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import msgspec


class WorkspaceError(Exception):
    """A git or file operation on the repository failed; ``message`` says which and why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _git(repo: Path, *args: str, input: bytes | None = None, check: bool = True) -> bytes:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "LANG": "C",
        "GIT_TERMINAL_PROMPT": "0",
        # A copy under /tmp must never be taken for part of an enclosing repository.
        "GIT_CEILING_DIRECTORIES": str(repo.parent),
    }
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=input,
        capture_output=True,
        env=env,
        timeout=120,
    )
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise WorkspaceError(f"git {args[0]} failed in {repo}: {err}")
    return proc.stdout


def repo_root(path: str | Path) -> Path:
    """The top of the git repository holding ``path``; refuses a path outside any."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise WorkspaceError(f"{str(p)!r} is not a directory; give the repository's path")
    try:
        out = _git(p, "rev-parse", "--show-toplevel")
    except WorkspaceError:
        raise WorkspaceError(
            f"{str(p)!r} is not inside a git repository; the cycle needs one (git init, commit)"
        ) from None
    return Path(out.decode().strip())


def _files(repo: Path) -> list[str]:
    out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return sorted({f for f in out.decode(errors="surrogateescape").split("\0") if f})


class Fingerprint(msgspec.Struct, frozen=True):
    """What the tree looked like: HEAD, the branch, and a hash of every visible file."""

    head: str
    branch: str
    files: dict[str, str]

    def changes(self, other: Fingerprint) -> list[str]:
        """What differs from ``other``, as short sentences (empty: the same tree)."""
        out: list[str] = []
        if self.head != other.head:
            out.append(f"HEAD moved from {self.head[:12]} to {other.head[:12]}")
        if self.branch != other.branch:
            out.append(f"the branch changed from {self.branch!r} to {other.branch!r}")
        for path in sorted(self.files.keys() | other.files.keys()):
            a, b = self.files.get(path), other.files.get(path)
            if a == b:
                continue
            if a is None:
                out.append(f"{path} appeared")
            elif b is None:
                out.append(f"{path} was removed")
            else:
                out.append(f"{path} changed")
        return out


def _hash_file(p: Path) -> str:
    if p.is_symlink():
        return "link:" + os.readlink(p)
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        return "missing"
    return h.hexdigest()


def fingerprint(repo: Path) -> Fingerprint:
    """The tree's fingerprint (blocking: call it in a thread)."""
    head = _git(repo, "rev-parse", "--verify", "-q", "HEAD", check=False).decode().strip()
    branch = _git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False).decode().strip()
    return Fingerprint(
        head=head, branch=branch, files={f: _hash_file(repo / f) for f in _files(repo)}
    )


def make_copy(repo: Path, dest: Path) -> Path:
    """Copy the visible files of ``repo`` into the new directory ``dest`` (blocking)."""
    dest.mkdir(parents=True)
    for rel in _files(repo):
        src = repo / rel
        if not (src.is_file() or src.is_symlink()):
            continue  # deleted in the working tree, or a submodule
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest


def apply_diff(tree: Path, diff: str, *, check_only: bool = False) -> None:
    """Apply ``diff`` to the files of ``tree`` (working tree only: never the index, never a
    commit).  Raises ``WorkspaceError`` with git's reason when it does not apply."""
    args = ["apply", "--whitespace=nowarn", "--recount"]
    if check_only:
        args.append("--check")
    try:
        _git(tree, *args, "-", input=diff.encode())
    except WorkspaceError as exc:
        raise WorkspaceError(
            exc.message.replace("git apply failed", "the diff does not apply")
        ) from None


def remove_tree(path: Path) -> None:
    """Remove a disposable copy; never fails (a leftover copy is reported by its caller)."""
    shutil.rmtree(path, ignore_errors=True)
