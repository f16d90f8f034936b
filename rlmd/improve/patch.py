"""The proposal: a unified diff in git format, found in the root's answer and checked.

The model is hostile until proven otherwise, so a diff is refused when any path it names
is absolute, climbs out with ``..``, enters ``.git``, passes through a symlink that leads
out of the repository, or would create a symlink (a later patch could write through it).
Whether the hunks apply is ``git apply --check``'s job (``workspace.apply_diff``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

# A ```diff (```patch, ```udiff) fence, or a bare ``` one: small models fence a diff
# without a language, and its closing fence must not end up in the patch.
_FENCED = re.compile(r"^```[ \t]*(?:diff|patch|udiff)?[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_DIFF_START = re.compile(r"^(?:diff --git |--- )", re.M)
_GIT_HEADER = re.compile(r"^diff --git (\S+) (\S+)$", re.M)
_FILE_LINE = re.compile(r"^(?:---|\+\+\+) (\S+)", re.M)
_RENAME = re.compile(r"^(?:rename|copy) (?:from|to) (.+)$", re.M)
_SYMLINK_MODE = re.compile(r"^(?:new file mode|new mode) 120000$", re.M)


class PatchError(Exception):
    """A proposal that is not a usable diff; ``message`` says what and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def extract_diff(answer: str) -> str:
    """The unified diff in ``answer``: the first fenced block (```diff, or bare ```) that
    holds one, or the answer itself.

    Raises ``PatchError`` when there is none, so the next round can say so to the model.
    """
    text = next(
        (m.group(1) for m in _FENCED.finditer(answer) if _DIFF_START.search(m.group(1))),
        answer,
    )
    start = _DIFF_START.search(text)
    if start is None:
        raise PatchError(
            "the answer holds no unified diff: give it in git format "
            "(`diff --git a/PATH b/PATH`, `--- a/PATH`, `+++ b/PATH`, hunks) in a ```diff block "
            "or with FINAL_VAR(name) of a variable holding it"
        )
    diff = text[start.start() :]
    return diff if diff.endswith("\n") else diff + "\n"


def _strip_prefix(raw: str) -> str | None:
    if raw == "/dev/null":
        return None
    if raw.startswith(("a/", "b/")):
        return raw[2:]
    return raw


def _check_one(repo: Path, rel: str) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("~"):
        raise PatchError(
            f"the diff names an absolute path ({rel!r}); use paths relative to the repository root"
        )
    if any(part == ".." for part in p.parts):
        raise PatchError(f"the diff names a path outside the repository ({rel!r})")
    if any(part == ".git" for part in p.parts):
        raise PatchError(f"the diff touches git's own files ({rel!r}); .git is never patched")
    root = repo.resolve()
    cur = repo
    for part in p.parts:
        cur = cur / part
        if cur.is_symlink():
            target = Path(os.path.realpath(cur))
            if target != root and root not in target.parents:
                raise PatchError(
                    f"the diff writes through the symlink {str(PurePosixPath(*p.parts[: p.parts.index(part) + 1]))!r}, "
                    f"which leads outside the repository"
                )


def touched_paths(repo: Path, diff: str) -> list[str]:
    """Every repository-relative path ``diff`` reads or writes, after the safety checks.

    Raises ``PatchError`` for a path that escapes ``repo`` or enters ``.git``, for a new
    symlink, and for a diff that names no file at all.
    """
    if _SYMLINK_MODE.search(diff):
        raise PatchError("the diff creates a symlink; proposals may only change regular files")
    names: list[str] = []
    for a, b in _GIT_HEADER.findall(diff):
        names += [a, b]
    names += _FILE_LINE.findall(diff)
    # rename/copy lines carry bare paths (no a/ b/ prefix).
    bare = [n.strip() for n in _RENAME.findall(diff)]
    paths: list[str] = []
    for rel in [_strip_prefix(raw) for raw in names] + bare:
        if rel is None or rel in paths:
            continue
        _check_one(repo, rel)
        paths.append(rel)
    if not paths:
        raise PatchError("the diff names no file; every hunk needs `--- a/PATH` and `+++ b/PATH`")
    return sorted(paths)
