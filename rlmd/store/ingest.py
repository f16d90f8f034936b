"""Files and directories into one text: tree walk, ``.gitignore`` rules, globs, headers.

A directory becomes one text, its files in sorted order (by path components), each one
introduced by a header line (see :func:`file_header`)::

    ===== src/app.py =====
    <the file's text, ending with a newline>
    <an empty line>

What is left out:

- ``.git/`` directories (always), and paths matched by ``.gitignore`` files (the root's
  and nested ones, plus ``.git/info/exclude``) with git's semantics: ``#`` comments,
  ``!`` negation, a trailing ``/`` for directories only, patterns containing a ``/``
  anchored to their ``.gitignore``'s directory, ``*``/``?``/``[...]`` not crossing ``/``,
  and ``**/``, ``/**``, ``/**/``.  As in git, a file inside an ignored directory cannot
  be re-included.  Ignored paths are counted, not listed.
- paths matched by an ``exclude`` glob (counted), and files matched by none of the
  ``include`` globs when some are given (counted).  Globs use the same syntax on the
  path relative to the root (``/`` separators); a glob without a ``/`` matches the file
  name at any depth (``*.py``), one with a ``/`` the whole relative path
  (``src/**/*.py``).
- files that are binary (a NUL byte in the first 8 KiB), larger than ``max_file_bytes``,
  unreadable, or symlinks leading out of the tree or to directories: listed in
  ``skipped`` with the reason.  Symlinks to files inside the tree are read.

Only the standard library is used.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

BINARY_SNIFF_BYTES = 8192


def file_header(rel: str) -> str:
    """The header line that introduces the file at relative path ``rel``."""
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        rel = repr(rel)  # a newline in a file name must not forge a header
    return f"===== {rel} =====\n"


def is_binary(head: bytes) -> bool:
    """True when the first bytes of a file look binary (contain NUL)."""
    return b"\0" in head[:BINARY_SNIFF_BYTES]


# -- glob / gitignore pattern translation ---------------------------------------------------


def _translate(pat: str) -> str:
    """Regex source for a gitignore-style glob over a ``/``-separated path (no anchors)."""
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*":
            j = i
            while j < n and pat[j] == "*":
                j += 1
            stars = j - i
            at_seg_start = i == 0 or pat[i - 1] == "/"
            at_seg_end = j == n or pat[j] == "/"
            if stars >= 2 and at_seg_start and at_seg_end:
                if j == n:  # trailing "**": everything below
                    out.append(".*")
                    i = j
                else:  # "**/": zero or more directories
                    out.append("(?:.*/)?")
                    i = j + 1
                continue
            out.append("[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pat[j] in "!^":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            while j < n and pat[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append(re.escape(c))
                i += 1
                continue
            body = pat[i + 1 : j]
            neg = body[:1] in ("!", "^")
            if neg:
                body = body[1:]
            body = body.replace("\\", "\\\\").replace("[", "\\[")
            out.append(f"[^/{body}]" if neg else f"[{body}]")
            i = j + 1
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pat[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _parse_gitignore_line(line: str) -> tuple[str, bool, bool] | None:
    """(pattern, negate, dir_only) of one .gitignore line, or None for blanks/comments."""
    line = line.rstrip("\r\n")
    # Trailing spaces are dropped unless escaped with a backslash.
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        stripped += " "
    line = stripped
    if not line or line.startswith("#"):
        return None
    negate = False
    if line.startswith("!"):
        negate, line = True, line[1:]
    elif line.startswith("\\!") or line.startswith("\\#"):
        line = line[1:]
    dir_only = line.endswith("/") and not line.endswith("\\/")
    line = line.rstrip("/") if dir_only else line
    if not line:
        return None
    return line, negate, dir_only


def _compile(pattern: str, *, anchored_if_slash: bool = True) -> re.Pattern[str]:
    """Compile a glob: with a ``/`` (not trailing) it matches the whole relative path,
    without one it matches the last component at any depth."""
    if "/" in pattern and anchored_if_slash:
        src = _translate(pattern.lstrip("/"))
    else:
        src = "(?:.*/)?" + _translate(pattern)
    return re.compile(f"(?s:{src})\\Z")


class GitIgnore:
    """The rules of one ``.gitignore`` file, relative to the directory holding it."""

    def __init__(self, lines: list[str]) -> None:
        self.rules: list[_Rule] = []
        for raw in lines:
            parsed = _parse_gitignore_line(raw)
            if parsed is None:
                continue
            pat, negate, dir_only = parsed
            try:
                rx = _compile(pat)
            except re.error:
                continue  # git ignores patterns it cannot parse; so do we
            self.rules.append(_Rule(rx, negate, dir_only))

    @classmethod
    def read(cls, path: Path) -> GitIgnore | None:
        """Parse a .gitignore file; None when it does not exist or cannot be read."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return cls(text.splitlines())

    def verdict(self, rel: str, is_dir: bool) -> bool | None:
        """True (ignored), False (re-included by ``!``) or None (no rule matches)."""
        result: bool | None = None
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(rel):
                result = not rule.negate
        return result


class Globs:
    """Include/exclude globs matched against ``/``-separated relative paths."""

    def __init__(self, patterns: list[str] | None) -> None:
        self.patterns = list(patterns or [])
        cleaned = [p.removeprefix("./").rstrip("/") for p in self.patterns]
        self._rx = [_compile(p) for p in cleaned if p.strip("/")]

    def __bool__(self) -> bool:
        return bool(self._rx)

    def match(self, rel: str) -> bool:
        """True if any glob matches ``rel``."""
        return any(rx.match(rel) for rx in self._rx)


# -- the walk ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file to ingest: where it is, its relative path (``/``), its size."""

    path: Path
    rel: str
    size: int


@dataclass
class WalkResult:
    """What :func:`walk_tree` found: files in order, and what it left out."""

    files: list[FileEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rel path, reason)
    ignored: int = 0  # by .gitignore or .git/
    excluded: int = 0  # by exclude globs or not matching include globs


def walk_tree(
    root: Path,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    max_file_bytes: int,
) -> WalkResult:
    """List the files under ``root`` to ingest, deterministically ordered.

    Binary files are detected when they are read (see :func:`is_binary`), not here.
    """
    root = root.resolve()
    inc, exc = Globs(include), Globs(exclude)
    res = WalkResult()
    base: list[tuple[str, GitIgnore]] = []
    info_exclude = GitIgnore.read(root / ".git" / "info" / "exclude")
    if info_exclude is not None:
        base.append(("", info_exclude))
    _walk_dir(root, root, "", base, inc, exc, max_file_bytes, res)
    return res


def _ignored(stack: list[tuple[str, GitIgnore]], rel: str, is_dir: bool) -> bool:
    # Deeper .gitignore files override shallower ones; within one, the last rule wins.
    verdict = False
    for prefix, gi in stack:
        sub = rel[len(prefix) :] if prefix else rel
        v = gi.verdict(sub, is_dir)
        if v is not None:
            verdict = v
    return verdict


def _walk_dir(
    root: Path,
    d: Path,
    rel_dir: str,
    stack: list[tuple[str, GitIgnore]],
    inc: Globs,
    exc: Globs,
    max_file_bytes: int,
    res: WalkResult,
) -> None:
    gi = GitIgnore.read(d / ".gitignore")
    if gi is not None and gi.rules:
        stack = [*stack, (rel_dir, gi)]
    try:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        res.skipped.append((rel_dir or ".", f"unreadable directory: {e.strerror}"))
        return
    for entry in entries:
        rel = f"{rel_dir}{entry.name}"
        if entry.name == ".git":
            res.ignored += 1
            continue
        try:
            is_link = entry.is_symlink()
            st = os.stat(entry.path)  # follows links
        except OSError as e:
            reason = "broken symlink" if entry.is_symlink() else f"unreadable: {e.strerror}"
            res.skipped.append((rel, reason))
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if _ignored(stack, rel, is_dir):
            res.ignored += 1
            continue
        if exc and exc.match(rel):
            res.excluded += 1
            continue
        if is_link:
            target = Path(os.path.realpath(entry.path))
            if not target.is_relative_to(root):
                res.skipped.append((rel, "symlink pointing outside the tree"))
                continue
            if is_dir:
                res.skipped.append((rel, "symlink to a directory (not followed)"))
                continue
        if is_dir:
            _walk_dir(root, Path(entry.path), rel + "/", stack, inc, exc, max_file_bytes, res)
            continue
        if not stat.S_ISREG(st.st_mode):
            res.skipped.append((rel, "not a regular file"))
            continue
        if inc and not inc.match(rel):
            res.excluded += 1
            continue
        if st.st_size > max_file_bytes:
            res.skipped.append(
                (rel, f"too large ({st.st_size} bytes > max_file_bytes={max_file_bytes})")
            )
            continue
        res.files.append(FileEntry(Path(entry.path), rel, st.st_size))
