"""Code questions over a real code base: the local Python standard library.

The context is stdlib source files, each after a header line ``# ==== FILE: json/decoder.py
====``, concatenated (in a seed-dependent order) up to the target length; only whole
files are included.  Answers are computed exactly from the files' ASTs:

- ``where``: which file defines the function X (a name defined exactly once);
- ``callers``: how many function/method definitions contain a call to X (``X(...)`` or
  ``obj.X(...)``; a call inside a nested function counts for every enclosing definition);
- ``most_methods``: which class has the most methods (a unique maximum);
- ``classes_in``: how many classes file F defines (at any nesting level).

The corpus is ``sysconfig.get_paths()["stdlib"]`` (without site-packages), so tasks depend
on the Python version; the runner records it.
"""

from __future__ import annotations

import ast
import random
import sysconfig
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec

from rlmd.bench import CHARS_PER_TOKEN, BenchError, Task, format_length

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_FMT_NUM = "Give your final answer in the form 'Answer: <number>'."
_FMT_FILE = "Give your final answer in the form 'Answer: <file path as in the FILE header>'."
_FMT_NAME = "Give your final answer in the form 'Answer: <class name>'."


class FileFacts(msgspec.Struct):
    """What the questions need to know about one source file."""

    path: str
    defs: list[str]  # every function/method name defined, with repeats
    callers: dict[str, int]  # name -> number of definitions containing a call to it
    classes: dict[str, int]  # class name -> number of methods (direct children)
    n_classes: int


def file_header(rel: str) -> str:
    """The line that starts each file in the context."""
    return f"# ==== FILE: {rel} ====\n"


def stdlib_root() -> Path:
    """The standard library directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(root: Path) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of the ``.py`` files under ``root``, sorted, no tests."""
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        try:
            out.append((rel.as_posix(), p.stat().st_size))
        except OSError:
            continue
    return sorted(out)


def _called_name(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return None


def analyse(rel: str, source: str) -> FileFacts | None:
    """The facts of one file, or None when it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    defs: list[str] = []
    callers: Counter[str] = Counter()
    classes: dict[str, int] = {}
    n_classes = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            defs.append(node.name)
            called = {
                name
                for sub in ast.walk(node)
                if isinstance(sub, ast.Call) and (name := _called_name(sub)) is not None
            }
            callers.update(called)
        elif isinstance(node, ast.ClassDef):
            n_classes += 1
            methods = sum(isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef) for b in node.body)
            # Same-named classes in one file: keep the larger count (the question only
            # uses names that are unique across the context anyway).
            classes[node.name] = max(methods, classes.get(node.name, 0))
    return FileFacts(
        path=rel, defs=defs, callers=dict(callers), classes=classes, n_classes=n_classes
    )


class Corpus(msgspec.Struct):
    """A concatenation of whole files and the facts of each."""

    text: str
    files: list[FileFacts]


def build_corpus(
    rng: random.Random, root: Path, target_chars: int, sources: list[tuple[str, int]]
) -> Corpus:
    """Whole files of ``sources`` in a seed-dependent order until ``target_chars``."""
    if not sources:
        raise BenchError(f"no Python sources under {root}: codeqa needs the stdlib sources")
    rels = list(sources)
    rng.shuffle(rels)
    parts: list[str] = []
    files: list[FileFacts] = []
    used = 0
    for rel, size in rels:
        # Bytes bound chars from above, so a file too big in bytes is skipped unread.
        if used + size > target_chars:
            continue
        try:
            src = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunk = file_header(rel) + src + ("" if src.endswith("\n") else "\n")
        if used + len(chunk) > target_chars:
            continue  # a smaller file may still fit
        facts = analyse(rel, src)
        if facts is None:
            continue
        parts.append(chunk)
        files.append(facts)
        used += len(chunk)
        if target_chars - used < 200:
            break
    return Corpus(text="".join(parts), files=files)


def _where(rng: random.Random, c: Corpus) -> tuple[str, str | int, str] | None:
    defs = Counter(d for f in c.files for d in f.defs)
    # Names defined exactly once in the context, long enough not to be generic.
    cands = [(d, f.path) for f in c.files for d in f.defs if defs[d] == 1 and len(d) >= 6]
    if not cands:
        return None
    name, path = rng.choice(sorted(cands))
    return f"Which file defines the function or method `{name}`? {_FMT_FILE}", path, "codeqa:path"


def _callers(rng: random.Random, c: Corpus) -> tuple[str, str | int, str] | None:
    total: Counter[str] = Counter()
    for f in c.files:
        total.update(f.callers)
    cands = sorted(n for n, k in total.items() if 2 <= k <= 40 and len(n) >= 5)
    if not cands:
        return None
    name = rng.choice(cands)
    q = (
        f"How many function or method definitions in the code above contain at least one "
        f"call to a function or method named `{name}` (called as `{name}(...)` or "
        f"`<expr>.{name}(...)`)? A call inside a nested function counts for the nested "
        f"function and for every function enclosing it. {_FMT_NUM}"
    )
    return q, total[name], "codeqa:numeric"


def _most_methods(rng: random.Random, c: Corpus) -> tuple[str, str | int, str] | None:
    names = Counter(n for f in c.files for n in f.classes)
    counts = [(m, n) for f in c.files for n, m in f.classes.items() if names[n] == 1]
    if len(counts) < 2:
        return None
    counts.sort(reverse=True)
    if counts[0][0] == counts[1][0]:
        return None
    q = (
        "Which class defined in the code above has the most methods (functions defined "
        f"directly in its class body)? {_FMT_NAME}"
    )
    return q, counts[0][1], "codeqa:name"


def _classes_in(rng: random.Random, c: Corpus) -> tuple[str, str | int, str] | None:
    cands = sorted(f.path for f in c.files if f.n_classes >= 1)
    if not cands:
        return None
    path = rng.choice(cands)
    n = next(f.n_classes for f in c.files if f.path == path)
    q = f"How many classes (at any nesting level) does the file {path} define? {_FMT_NUM}"
    return q, n, "codeqa:numeric"


_MAKERS = {
    "where": _where,
    "callers": _callers,
    "most_methods": _most_methods,
    "classes_in": _classes_in,
}


def tasks(lengths: list[int], n: int, seed: int, root: Path | None = None) -> Iterator[Task]:
    """``n`` questions per length; each task has its own corpus (its own file order)."""
    src_root = root or stdlib_root()
    sources = list_sources(src_root)
    kinds = list(_MAKERS)
    for length in lengths:
        for i in range(n):
            rng = random.Random(f"codeqa:{seed}:{length}:{i}")
            corpus = build_corpus(rng, src_root, length * CHARS_PER_TOKEN, sources)
            tid = f"codeqa-{format_length(length)}-s{seed}-{i}"
            for k in range(len(kinds)):
                kind = kinds[(i + k) % len(kinds)]
                got = _MAKERS[kind](rng, corpus)
                if got is not None:
                    break
            else:
                raise BenchError(f"{tid}: no codeqa question fits this corpus")
            q, gold, scorer = got
            yield Task(
                id=tid,
                suite="codeqa",
                length_tokens=length,
                context_key=tid,
                context=corpus.text,
                question=q,
                gold=gold,
                scorer=scorer,
                meta={"task": kind, "files": [f.path for f in corpus.files]},
            )
