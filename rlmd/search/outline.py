"""The outline of a code context: its classes and functions, where they are, what they hold.

Small models write weak counting code: asked which class has the most methods, the embedded
model searched for "class" and named one of the ten classes the search printed (issue 10,
codeqa trace of ``codeqa-32k-s0-2``).  An outline is the structure a developer's tools
(ctags, an editor's imenu) give for free, so the REPL offers it as ``outline()`` and the
engine shows it for questions about classes and methods.

Each file of the text (the parts between its file headers, :mod:`rlmd.search.locate`)
is read as Python with :mod:`ast` when it parses, which is exact; any other part (other
languages, fragments) by its lines: a definer keyword at the start of a line, nested by
indentation.  The text is read whole, so an outline is refused over
:data:`MAX_OUTLINE_BYTES` with an error that says what to do instead.

This module runs in REPL workers too: standard library and msgspec only.
"""

from __future__ import annotations

import ast
import bisect
import itertools
import re
import warnings
from typing import Any

import msgspec

from rlmd.search.locate import Locator

#: Above this many bytes of text an outline is refused: it decodes and parses the text, at
#: about 0.3-1 s a MB here, and a REPL cell has 30 s.
MAX_OUTLINE_BYTES = 16 << 20
#: A file part larger than this is read by its lines, not parsed: an AST is ~10x the text,
#: and ``ast.parse`` holds the GIL for the whole part (the daemon runs outlines in a thread).
MAX_PARSE_BYTES = 1 << 20

# A definition line in any of the common languages; group 1 the indent, 2 the keyword.
_DEF_LINE = re.compile(
    rb"(?m)^([ \t]*)(class|(?:async[ \t]+)?def|function|fn|func|sub)[ \t]+([A-Za-z_$][\w$]*)"
)
_FUNC_KINDS = (ast.FunctionDef, ast.AsyncFunctionDef)


class Definition(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One class or function of the outline (the wire shape too).

    ``start``/``end``: character offsets of its definition line; ``line`` 1-based in the
    text; ``file``/``file_line`` for a text of joined files; ``depth``: 0 at the top of its
    file; ``parent``: the enclosing class or function; ``methods``: for a class, how many
    functions are defined directly in its body."""

    kind: str  # "class" or "def"
    name: str
    start: int
    end: int
    line: int
    file: str | None = None
    file_line: int | None = None
    depth: int = 0
    parent: str | None = None
    methods: int | None = None


def outline(text: Any, max_bytes: int | None = None) -> list[Definition]:
    """Every class and function defined in ``text`` (a ``str``, the REPL's context view
    or a :class:`Locator`), in the order of the text; refused (ValueError) over
    ``max_bytes`` (default :data:`MAX_OUTLINE_BYTES`)."""
    loc = text if isinstance(text, Locator) else Locator(text)
    n = loc.src.nbytes
    limit = MAX_OUTLINE_BYTES if max_bytes is None else max_bytes
    if n > limit:
        raise ValueError(
            f"outline: the text is {n:,} bytes, over the {limit:,} an outline "
            "reads; use grep(r'^\\s*(class|def) ') for the definition lines instead"
        )
    bounds = [h[0] for h in loc.headers()] or [0]
    if bounds[0] != 0:
        bounds.insert(0, 0)
    bounds.append(n)
    out: list[Definition] = []
    for b0, b1 in itertools.pairwise(bounds):
        out.extend(_part(loc, b0, b1))
    return out


def _part(loc: Locator, b0: int, b1: int) -> list[Definition]:
    """The definitions of bytes ``[b0, b1)``: one file part (its header line included)."""
    raw = bytes(loc.src.buf[b0:b1])
    if not _DEF_LINE.search(raw):
        return []
    starts = _line_starts(raw)
    found = _parsed(raw) if len(raw) <= MAX_PARSE_BYTES else None
    if found is None:
        found = _by_lines(raw, starts)
    out = []
    for kind, name, lineno, depth, parent, methods in found:
        s = b0 + starts[min(lineno, len(starts)) - 1]
        e = raw.find(b"\n", s - b0)
        h = loc.hit_bytes(s, b0 + (len(raw) if e < 0 else e))
        out.append(
            Definition(
                kind=kind,
                name=name,
                start=h.start,
                end=h.end,
                line=h.line,
                file=h.file,
                file_line=h.file_line,
                depth=depth,
                parent=parent,
                methods=methods,
            )
        )
    return out


def _line_starts(raw: bytes) -> list[int]:
    starts = [0]
    pos = raw.find(b"\n")
    while pos >= 0:
        starts.append(pos + 1)
        pos = raw.find(b"\n", pos + 1)
    return starts


_Found = tuple[str, str, int, int, "str | None", "int | None"]


def _parsed(raw: bytes) -> list[_Found] | None:
    """The definitions of a part that parses as Python, else None.  A header line before
    the code is a comment in every header style Python accepts; one that is not (``=====
    rel =====``) is blanked so that line numbers still match."""
    first_nl = raw.find(b"\n")
    head = raw[: first_nl if first_nl >= 0 else len(raw)]
    if head.startswith((b"=====", b"==> ")):
        raw = b" " * len(head) + raw[len(head) :]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old code
            tree = ast.parse(raw)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None
    out: list[_Found] = []
    # Explicit stack: deep nesting must not recurse (the text is untrusted).
    stack: list[tuple[ast.AST, int, str | None]] = [(tree, -1, None)]
    while stack:
        node, depth, parent = stack.pop()
        kids = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.ClassDef):
            methods = sum(isinstance(c, _FUNC_KINDS) for c in node.body)
            out.append(("class", node.name, node.lineno, depth, parent, methods))
        elif isinstance(node, _FUNC_KINDS):
            out.append(("def", node.name, node.lineno, depth, parent, None))
        defines = isinstance(node, (ast.ClassDef, *_FUNC_KINDS))
        inner = node.name if defines else parent  # type: ignore[attr-defined]
        d = depth + 1 if defines or depth < 0 else depth
        stack.extend((c, d, inner) for c in reversed(kids))
    # A decorated definition's lineno is its ``def`` line; order them as in the text.
    out.sort(key=lambda f: f[2])
    return out


def _by_lines(raw: bytes, starts: list[int]) -> list[_Found]:
    """Definitions found by their lines: nesting by indentation, a class's methods the
    functions one level inside it.  (Not exact: a string spanning lines can hold a line
    that looks like a definition.)"""
    out: list[list[Any]] = []
    open_: list[tuple[int, int]] = []  # (indent width, index in out) of enclosing defs
    for m in _DEF_LINE.finditer(raw):
        indent = len(m.group(1).expandtabs(8))
        while open_ and open_[-1][0] >= indent:
            open_.pop()
        kind = "class" if m.group(2) == b"class" else "def"
        lineno = _lineno(starts, m.start())
        parent = out[open_[-1][1]][1] if open_ else None
        if kind == "def" and open_ and out[open_[-1][1]][0] == "class":
            out[open_[-1][1]][5] += 1
        out.append(
            [
                kind,
                m.group(3).decode("utf-8", "replace"),
                lineno,
                len(open_),
                parent,
                0 if kind == "class" else None,
            ]
        )
        open_.append((indent, len(out) - 1))
    return [tuple(f) for f in out]  # type: ignore[misc]


def _lineno(starts: list[int], b: int) -> int:
    return bisect.bisect_right(starts, b)
