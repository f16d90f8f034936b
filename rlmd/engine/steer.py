"""Loops that go nowhere, seen in traces, and the steer each one gets.

Each rule looks at the block just run (and the loop's earlier blocks) and returns the
text to add to what the model reads next, or None.  One rule per function, each naming
the trace pattern it answers (issue 10); ``steer`` runs them in order, first match wins.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from rlmd.engine import prompts


@dataclass
class LoopMemory:
    """What one loop's blocks did: for the repeated-block rules and the steers."""

    question: str = ""
    # Blocks run without error (normalized code -> what they printed).
    ran: dict[str, str] = field(default_factory=dict)
    # The last block run and the error it ended with (None: it succeeded).
    last: tuple[str, str | None] | None = None
    # Every block run, in order (normalized).
    history: list[str] = field(default_factory=list)
    # What the blocks printed: the evidence a small model's answer is checked against.
    printed: list[str] = field(default_factory=list)
    # What the blocks alone printed, in order.
    outputs: list[str] = field(default_factory=list)
    steered: set[str] = field(default_factory=set)
    # Blocks in a row refused as already run (reset by a block that runs).
    repeats_in_row: int = 0


# Issue 10's codeqa trace: told "already ran, not run again" after its first repeat, the
# embedded model sent the same search 18 more times (20 turns, 182 s) and only the
# last-chance call answered, rightly, from what it had already seen.  After this many
# refusals in a row the loop goes to that call at once.
STUCK_REPEATS = 2


# The codeqa trace of the same round: search("lib2to3/pgen2/tokenize.py", 1), then with 2,
# 3 ... 13 (each printing one more hit, the first always the file's header) until the
# time ran out.  Blocks that differ only in their numbers, this many in a row, are stuck
# too (slice after slice of a text is the same shape: the demo trace's 300-character
# slices).
STUCK_SHAPES = 5
_NUMBER = re.compile(r"\d+")


def same_shape_run(memory: LoopMemory) -> int:
    """How many of the last blocks run differ from each other only in their numbers."""
    if not memory.history:
        return 0
    shape = _NUMBER.sub("N", memory.history[-1])
    n = 0
    for key in reversed(memory.history):
        if _NUMBER.sub("N", key) != shape:
            break
        n += 1
    return n


def stuck(memory: LoopMemory) -> bool:
    """The model keeps sending a block it already ran, though told it was not run again,
    or keeps sending one block with other numbers."""
    return memory.repeats_in_row >= STUCK_REPEATS or same_shape_run(memory) >= STUCK_SHAPES


def normalize(code: str) -> str:
    """Code with blank lines and trailing spaces gone, to spot a block run twice."""
    return "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())


def repeated(memory: LoopMemory, key: str) -> str | None:
    """A block the model already ran: not run again (small models loop on one block)."""
    notice = _repeat_notice(memory, key)
    memory.repeats_in_row = memory.repeats_in_row + 1 if notice is not None else 0
    return notice


def _repeat_notice(memory: LoopMemory, key: str) -> str | None:
    if key in memory.ran:
        found = [p for p in memory.outputs if not prompts.is_empty_output(p)]
        return prompts.repeated_code(memory.ran[key], memory.question, found[-1] if found else "")
    if memory.last is not None and memory.last[0] == key and memory.last[1]:
        # Trace: the same failing block re-sent unchanged, turn after turn.
        return prompts.repeated_failure(memory.last[1])
    return None


_INDEX = re.compile(r"\[\s*-?\d+\s*\]")


def reindexing(memory: LoopMemory, key: str, output: str) -> str | None:
    """Issue 10, the 1M-character needle trace: ``re.findall`` on the question's phrase,
    then every turn ``m[1]``, ``m[2]`` ... until IndexError.  Two blocks in a row that
    differ only in a subscript number."""
    if len(memory.history) < 2:
        return None
    prev = memory.history[-2]
    if prev == key or not _INDEX.search(key):
        return None
    if _INDEX.sub("[N]", prev) != _INDEX.sub("[N]", key):
        return None
    return (
        "You are reading one result item by item. The items are the matched words only, "
        "not the text around them. Print the whole lines that hold the match instead"
        + _example(memory.question)
    )


def _literal_patterns(code: str) -> list[str]:
    """String literals passed as the first argument of re.findall/re.search/re.finditer."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("findall", "finditer", "search")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append(node.args[0].value)
    return out


def bare_matches(memory: LoopMemory, key: str, output: str) -> str | None:
    """Issue 10: findall on a plain phrase printed ``['the phrase', 'the phrase']``: the
    match, not the sentence around it, which holds the answer."""
    pats = [
        p for p in _literal_patterns(key) if re.escape(p) == p.replace(" ", "\\ ") or p.isalnum()
    ]
    if not pats:
        return None
    try:
        shown = ast.literal_eval(output.strip().splitlines()[-1]) if output.strip() else None
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(shown, list) or not shown or not all(isinstance(x, str) for x in shown):
        return None
    if not all(x.lower() == pats[0].lower() for x in shown):
        return None
    return (
        "That printed only the words you searched for, not the text around them. Print "
        "the lines that hold them" + _example(memory.question, pats[0])
    )


_SLICE = re.compile(r"^print\(\s*context\s*\[[^\]]*:[^\]]*\]\s*\)$")


def slice_reading(memory: LoopMemory, key: str, output: str) -> str | None:
    """Issue 10, the demo trace: ``print(context[:4000])``, then 300-character slices one
    by one for 12 turns.  Three slice prints in a row: one search would do."""
    recent = memory.history[-3:]
    if len(recent) < 3 or not all(_SLICE.match(c) for c in recent):
        return None
    return (
        "Reading the text slice by slice is slow. Search it for a word of the question "
        "and print the lines around the hits" + _example(memory.question)
    )


NO_HITS_IN_A_ROW = 3


def no_hits(memory: LoopMemory, key: str, output: str) -> str | None:
    """Issue 10, the absent-fact trace: twenty searches for the asked key, each printing
    ``[]``, then an invented ``Final(4458732)``.  Three searches in a row that found
    nothing: the text may not hold it, and "not found" is an answer."""
    recent = memory.outputs[-NO_HITS_IN_A_ROW:]
    if len(recent) < NO_HITS_IN_A_ROW or not all(prompts.is_empty_output(o) for o in recent):
        return None
    return (
        f"{NO_HITS_IN_A_ROW} searches in a row found nothing. Try one search with a single "
        "distinctive word of the question; if that finds nothing either, the text does "
        "not hold the answer: write FINAL(not found). Never make up a value."
    )


RULES = (reindexing, bare_matches, slice_reading, no_hits)


def steer(memory: LoopMemory, key: str, output: str) -> str | None:
    """The first rule that fires on the block just run (each fires once a loop)."""
    for rule in RULES:
        if rule.__name__ in memory.steered:
            continue
        text = rule(memory, key, output)
        if text is not None:
            memory.steered.add(rule.__name__)
            return text
    return None


def _example(question: str, key: str = "") -> str:
    block = prompts.search_example(question, key)
    return f", like this:{block}" if block else "."
