"""The evidence block: ranked passages for the question, each cut around what matched.

A passage is a paragraph or a long line; the block shows about
:data:`SNIPPET_CHARS` of each.  Cutting at the passage's head lost the fact: in the
distractor bench (issue 10) the record the search had ranked first ended its 240
characters with "[2019-05-08] Re …", and the model answered from another passage that
showed a whole (wrong) sentence.  So the window is centred on the question's names
(:mod:`rlmd.engine.anchors`) when the passage holds one, else on the densest run of the
question's words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlmd.engine import prompts
from rlmd.engine.anchors import name_pattern, question_names
from rlmd.search.hit import Hit
from rlmd.search.outline import Definition

SNIPPET_CHARS = 240


@dataclass(frozen=True)
class Evidence:
    """The evidence block, and whether code found part of it exactly (the lines defining
    the asked name, the outline's counts) rather than by ranking alone."""

    text: str = ""
    exact: bool = False


_WORD = re.compile(r"[A-Za-z0-9]{3,}")
_STOP = frozenset(
    "the and for with what which that this from are was were have has its does how who "
    "whom when where why text answer only say number".split()
)


def snippet(text: str, question: str, limit: int = SNIPPET_CHARS) -> str:
    """``text`` (whitespace folded) cut to ``limit`` characters around what the question
    asks, with "…" where it was cut."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    centre = _centre(flat, question)
    lo = max(0, min(centre - limit // 3, len(flat) - limit))
    hi = lo + limit
    # Whole words at the cuts.
    if lo > 0:
        sp = flat.find(" ", lo)
        lo = sp + 1 if 0 <= sp < lo + 20 else lo
    if hi < len(flat):
        sp = flat.rfind(" ", hi - 20, hi)
        hi = sp if sp > lo else hi
    return ("… " if lo > 0 else "") + flat[lo:hi] + (" …" if hi < len(flat) else "")


def _centre(flat: str, question: str) -> int:
    for name in question_names(question):
        m = re.search(name_pattern(name), flat)
        if m:
            return m.start()
    words = {w.lower() for w in _WORD.findall(question)} - _STOP
    if not words:
        return 0
    hits = [m.start() for m in _WORD.finditer(flat) if m.group(0).lower() in words]
    if not hits:
        return 0
    # The hit with the most other hits within one window after it.
    best, best_n, j = hits[0], 0, 0
    for i, h in enumerate(hits):
        j = max(j, i)
        while j + 1 < len(hits) and hits[j + 1] - h < SNIPPET_CHARS // 2:
            j += 1
        if j - i + 1 > best_n:
            best, best_n = h, j - i + 1
    return best


# "definitions" is left out: "how many definitions contain a call to `X`" (codeqa's
# callers) asks about the callers, not where X is defined.
_DEFINES = re.compile(r"\b(?:defines?|defined|defining|definition of)\b", re.I)
_COUNTS = re.compile(r"\bhow many\b", re.I)
_QUOTED_NAME = re.compile(r"[`\"“']([A-Za-z_][\w.-]*)[`\"”']")
# Line openings that define a name: Python, JavaScript, Rust, Go, Perl, Emacs Lisp.
_DEFINERS = (
    r"(?:(?:async[ \t]+)?def|class|function|fn|func|sub|defun|defmacro|defvar|defcustom|defconst)"
)


def definition_pattern(question: str) -> str | None:
    """For a question asking where a quoted name is defined, a regex for the lines that
    define it (``def name``, ``class name``, ``(defun name`` …), else None.

    Issue 10's codeqa trace: asked "Which file defines the function or method `__new__`?",
    the ranked search matched the question's other words ("file", "header") and the
    model, shown both a call in hmac.py and ``def __new__`` in _threading_local.py,
    answered with the first it saw."""
    if not _DEFINES.search(question) or _COUNTS.search(question):
        return None
    names = [m.group(1).rsplit(".", 1)[-1] for m in _QUOTED_NAME.finditer(question)]
    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        return None
    alt = "|".join(re.escape(n) for n in names)
    return rf"(?m)^[ \t]*\(?{_DEFINERS}[ \t]+(?:{alt})(?![\w-])"


def with_definitions(definitions: list[Hit], ranked: list[Hit], k: int) -> list[Hit]:
    """The lines defining the question's name first, then the ranked passages, ``k`` in all."""
    taken = {h.line for h in definitions}
    return (definitions + [h for h in ranked if h.line not in taken])[:k]


def evidence_text(hits: list[Hit], question: str) -> str:
    """The evidence block for ``hits`` (best first), or "" for none."""
    passages = []
    for h in hits:
        passages.append((_where(h.file, h.file_line, h.line), snippet(str(h.text), question)))
    return prompts.evidence_block(passages)


# A question about the classes of a code text that counts or compares them.  Calls are left
# out: the outline holds definitions, not calls (codeqa's callers question).
_STRUCTURE = re.compile(r"\b(?:class|classes|methods)\b", re.I)
_COMPARES = re.compile(
    r"\b(?:how many|most|fewest|least|number of|largest|biggest|smallest|list|every|all)\b",
    re.I,
)
_CALLS = re.compile(r"\bcall(?:s|ed|ing)?\b", re.I)
OUTLINE_ROWS = 10
#: The evidence's outline reads contexts up to this size (about a second of the daemon's
#: time here, in a thread); over it, the model can still call ``outline()`` in the REPL.
OUTLINE_EVIDENCE_BYTES = 4 << 20


def asks_structure(question: str) -> bool:
    """The question counts or compares the classes (or their methods) of a code text.

    Issue 10's codeqa trace (``codeqa-32k-s0-2``): asked which class has the most methods,
    the model ran ``search("class", 10)`` and named one of the ten classes it printed; the
    outline's counts answer it without counting code the model cannot write."""
    return (
        bool(_STRUCTURE.search(question) and _COMPARES.search(question))
        and not _CALLS.search(question)
        and definition_pattern(question) is None
    )


def outline_text(defs: list[Definition], question: str, rows: int = OUTLINE_ROWS) -> str:
    """The outline block for a structure question: the classes of each file the question
    names, else the classes with the most methods first; "" when there are no classes."""
    classes = [d for d in defs if d.kind == "class"]
    if not classes:
        return ""
    files = sorted({d.file for d in classes if d.file}, key=len, reverse=True)
    named = [f for f in files if re.search(rf"(?<![\w/.]){re.escape(f)}(?![\w/])", question)]
    if named:
        out = []
        for f in named[:rows]:
            mine = [d for d in classes if d.file == f]
            names = ", ".join(
                f"{d.name} (line {d.file_line}{', in ' + d.parent if d.parent else ''})"
                for d in mine
            )
            out.append(f"{f} defines {len(mine)} classes (at any nesting level): {names}")
        return prompts.outline_block(out, "Classes of the files the question names", len(classes))
    top = sorted(classes, key=lambda d: (-(d.methods or 0), d.line))[:rows]
    out = [f"{d.name} ({_where(d.file, d.file_line, d.line)}): {d.methods} methods" for d in top]
    return prompts.outline_block(out, "Classes with the most methods, most first", len(classes))


def _where(file: str | None, file_line: int | None, line: int) -> str:
    """``file:file_line``; a header line, which has a file but no line in it, its file
    alone; in a text without files, ``line N``."""
    return f"{file}:{file_line}" if file and file_line else (file or f"line {line}")
