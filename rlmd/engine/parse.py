"""Reading what the root model wrote: ```repl blocks, FINAL answers, plans, long outputs.

Everything here is pure and tolerant, because models are sloppy in predictable ways:
they fence code as ```python instead of ```repl, put ``FINAL(...)`` inside a code fence,
write multi-line answers with parentheses inside, quote the answer, hand ``FINAL_VAR`` a
tuple, or "answer" with a plan ("I will first...").  ``StreamCutter`` does the same
reading incrementally on a streamed reply, so the engine can stop the generation the
moment a runnable block closes.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Literal

# Fence languages whose blocks run.  ```repl is the convention; small models often write
# ```python for the same thing, and running it is better than a wasted turn.
RUNNABLE = frozenset({"repl", "python", "py", "python3"})
# A bare ``` fence runs only when its code calls the REPL: a codeqa trace at 32k sent
# ```\nprint(grep(r"__new__", 5))\n``` twice, was told it wrote no code, and the second copy
# was taken as the answer.  Bare fences of other text stay prose.
_REPL_CALL = re.compile(
    r"\b(?:context|search|grep|llm_query(?:_batched)?|rlm_query|FINAL_VAR|SHOW_VARS)\b"
)

_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,})[ \t]*([A-Za-z0-9_+-]*)[^`\n]*$")
_FENCE_CLOSE = re.compile(r"^[ \t]*(`{3,})[ \t]*$")
# FINAL at the start of a line, maybe behind markdown emphasis or a quote marker.
# ``Final(4458732)`` ended a small model's loop in the absent bench (issue 10) without
# being read as an answer: the word's case is not the model's contract to keep.
_FINAL_START = re.compile(
    r"^[ \t>*_#-]*(?:\*\*)?(FINAL_VAR|FINAL|Final_var|Final|final_var|final)[ \t]*\(",
    re.MULTILINE,
)
_FINAL_ANYWHERE = re.compile(r"\b(FINAL_VAR|FINAL)[ \t]*\(")

FinalKind = Literal["answer", "var", "expr"]


@dataclass(frozen=True)
class Final:
    """A finish the model asked for.

    ``answer``: ``value`` is the answer text.  ``var``: ``value`` names a REPL variable.
    ``expr``: ``value`` is a Python expression (``FINAL_VAR((a, b))``) to evaluate in the REPL.
    """

    kind: FinalKind
    value: str


@dataclass
class ParsedReply:
    """One root reply taken apart."""

    blocks: list[str] = field(default_factory=list)  # code to run, in order
    final: Final | None = None  # a FINAL outside the code that runs
    prose: str = ""  # the text outside runnable blocks


@dataclass
class _Block:
    lang: str
    code: str
    start: int  # offset of the opening fence line
    end: int  # offset just past the closing fence line (or the text's end)


def _split_blocks(text: str) -> list[_Block]:
    """Fenced blocks of ``text`` in order; an unclosed block runs to the end of the text."""
    blocks: list[_Block] = []
    pos = 0
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE_OPEN.match(line.rstrip("\r\n"))
        if not m:
            pos += len(line)
            i += 1
            continue
        ticks, lang = m.group(1), m.group(2).lower()
        start = pos
        pos += len(line)
        i += 1
        body: list[str] = []
        while i < len(lines):
            inner = lines[i]
            close = _FENCE_CLOSE.match(inner.rstrip("\r\n"))
            pos += len(inner)
            i += 1
            if close and len(close.group(1)) >= len(ticks):
                break
            body.append(inner)
        blocks.append(_Block(lang=lang, code="".join(body), start=start, end=pos))
    return blocks


def parse_reply(text: str) -> ParsedReply:
    """Split a root reply into the blocks to run, a FINAL outside them, and the prose.

    ```repl blocks run; ```python blocks run only when the reply has no ```repl block (a
    model that uses both is illustrating with one of them).  A runnable block that is not
    valid Python but holds a ``FINAL(...)`` line is taken as that FINAL: models put their
    final answer in a fence.  A bare ``` fence runs when nothing else would and its code
    calls the REPL (``context``, ``search``, ``grep``, ``llm_query`` ...).  Other fences
    (```text, other bare ```) are prose, so a FINAL in them counts.
    """
    all_blocks = _split_blocks(text)
    has_repl = any(b.lang == "repl" for b in all_blocks)
    run_langs = {"repl"} if has_repl else RUNNABLE
    if not any(b.lang in RUNNABLE for b in all_blocks):
        all_blocks = [
            _Block("repl", b.code, b.start, b.end)
            if b.lang == "" and _REPL_CALL.search(b.code) and _is_python(b.code)
            else b
            for b in all_blocks
        ]
    reply = ParsedReply()
    prose_parts: list[str] = []
    pos = 0
    fenced_final: Final | None = None
    for b in all_blocks:
        if b.lang not in run_langs:
            continue
        prose_parts.append(text[pos : b.start])
        pos = b.end
        if not b.code.strip():
            continue
        if not _is_python(b.code):
            f = find_final(b.code)
            if f is not None:
                fenced_final = fenced_final or f
                continue
        reply.blocks.append(b.code)
    prose_parts.append(text[pos:])
    reply.prose = "".join(prose_parts)
    reply.final = find_final(reply.prose) or fenced_final
    return reply


def sole_final(code: str) -> Final | None:
    """The FINAL of a block that is nothing but one ``FINAL(...)`` call, read as text.

    ``FINAL(It is 7 (seven))`` is valid Python that fails when run; when such a block
    fails, this is what the model meant.
    """
    stripped = code.strip()
    if not stripped.startswith(("FINAL(", "FINAL_VAR(")) or not stripped.endswith(")"):
        return None
    f = find_final(stripped)
    if f is None or len(f.value) + len("FINAL_VAR()") < len(stripped) - 2:
        return None  # more than the one call
    return f


def _is_python(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def find_final(text: str, *, anywhere: bool = False) -> Final | None:
    """The first ``FINAL(...)``/``FINAL_VAR(...)`` that starts a line of ``text``, or None.

    ``anywhere``: also one inside a line (for the last answer at max_iterations, where
    "From what I saw: FINAL(5)" should count).
    """
    m = (_FINAL_ANYWHERE if anywhere else _FINAL_START).search(text)
    if m is None:
        return None
    inner = _call_argument(text, m.end())
    if m.group(1).upper() == "FINAL":
        return Final("answer", _unquote(inner.strip()))
    return _final_var(inner)


def _call_argument(text: str, open_end: int) -> str:
    """The text between the ``(`` ending at ``open_end`` and its closing ``)``.

    Answers are prose, so their parentheses may be unbalanced ("1) foo").  Balanced
    matching is tried first; when the balanced close is followed on its line by more text
    that itself ends in ``)``, the whole line was the call.  With no balanced close the
    argument runs to the last ``)`` (or to the end, for a reply cut short).
    """
    depth = 1
    i = open_end
    n = len(text)
    while i < n:
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                line_end = text.find("\n", i)
                line_end = n if line_end < 0 else line_end
                rest = text[i + 1 : line_end].rstrip()
                if rest.endswith(")"):
                    return text[open_end : i + 1 + len(rest) - 1]
                return text[open_end:i]
        i += 1
    last = text.rfind(")", open_end)
    return text[open_end:last] if last >= 0 else text[open_end:]


def _unquote(answer: str) -> str:
    """A quoted answer (a Python string literal, as models often write) becomes its text."""
    if len(answer) >= 2 and answer[0] in "\"'" and answer[-1] == answer[0]:
        try:
            value = ast.literal_eval(answer)
        except (SyntaxError, ValueError):
            return answer[1:-1]  # "It's" in single quotes: not a literal, still quoted
        if isinstance(value, str):
            return value
    return answer


def _final_var(arg: str) -> Final | None:
    name = _unquote(arg.strip()).strip()
    if not name:
        return None
    if name.isidentifier():
        return Final("var", name)
    try:
        ast.parse(name, mode="eval")
    except (SyntaxError, ValueError):
        return Final("answer", name)  # FINAL_VAR(some prose): the prose is the answer
    return Final("expr", name)


# --- answers that are not answers -------------------------------------------------------

_PLAN = re.compile(
    r"^\s*(?:I will|I'll|I am going to|I'm going to|Let me|Let's|Let us|First,? (?:I|we|let)|"
    r"To (?:answer|find|solve|do|determine) (?:this|that|the)|Next,? (?:I|we)|Step 1|"
    r"My plan|The plan|I need to|I should|We need to|We will|We'll)\b",
    re.IGNORECASE,
)
_PLACEHOLDERS = frozenset(
    {
        "",
        "answer",
        "the answer",
        "your answer",
        "your_answer",
        "final answer",
        "final_answer",
        "<answer>",
        "...",
        "result",
        "variable_name",
        "var_name",
        "none",
        "todo",
        "tbd",
    }
)


def non_answer_reason(answer: str) -> str | None:
    """Why ``answer`` looks like no answer at all (empty, placeholder, plan), or None."""
    a = answer.strip()
    if a.lower().strip(" .`'\"") in _PLACEHOLDERS:
        return "it is empty or a placeholder" if a else "it is empty"
    if _PLAN.match(a):
        return "it describes what you plan to do instead of giving the answer"
    return None


_WORD = re.compile(r"\w+")
# Longer answers are composed (summaries, explanations): their words need not have been
# printed anywhere, so only short, fact-like answers are checked.
EVIDENCE_MAX_WORDS = 8


def unsupported_words(answer: str, seen: list[str]) -> list[str]:
    """The words of a short ``answer`` that appear in none of the ``seen`` texts.

    Small models sometimes end with an invented fact right after output that did not
    show it.  An answer of at most :data:`EVIDENCE_MAX_WORDS` words whose words all
    occur in what the model was shown (outputs, the question, the context's head) is
    supported; a longer one is not checked (empty list).
    """
    words = [w.lower() for w in _WORD.findall(answer)]
    if not words or len(words) > EVIDENCE_MAX_WORDS:
        return []
    known: set[str] = set()
    for text in seen:
        known.update(w.lower() for w in _WORD.findall(text))
    return list(dict.fromkeys(w for w in words if w not in known))


# --- output going back to the model -----------------------------------------------------


def truncate_output(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, keeping its head and tail, with a note."""
    if limit <= 0 or len(text) <= limit:
        return text
    cut = len(text) - limit
    note = (
        f"\n\n[... {cut:,} of {len(text):,} characters cut here: "
        "print less, e.g. slices, counts or a summary ...]\n\n"
    )
    head = limit * 2 // 3
    tail = limit - head
    return text[:head] + note + text[len(text) - tail :]


# --- incremental reading of a streamed reply --------------------------------------------


class StreamCutter:
    """Watches a streamed root reply and says where to stop it.

    ``feed(delta)`` returns the part of ``delta`` to keep and whether to stop: the reply
    is cut just after the closing fence of the first runnable block (a model that writes
    on after a block invents the block's output), or after a complete ``FINAL(...)`` line
    outside code.  ``text`` is everything kept so far.
    """

    def __init__(self, *, stop_at_block: bool = True, stop_at_final: bool = True) -> None:
        self.text = ""
        self.stopped = False
        self._stop_at_block = stop_at_block
        self._stop_at_final = stop_at_final
        self._line_start = 0  # offset in ``text`` where the current line begins
        self._fence: tuple[str, str] | None = None  # (ticks, lang) of the open block
        self._final_at: int | None = None  # offset of a FINAL line being written

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take one streamed piece; return (the kept part of it, stop now)."""
        if self.stopped:
            return "", True
        base = len(self.text)
        self.text += delta
        while True:
            nl = self.text.find("\n", self._line_start)
            if nl < 0:
                break
            cut = self._complete_line(self._line_start, nl)
            self._line_start = nl + 1
            if cut is not None:
                self.stopped = True
                self.text = self.text[:cut]
                return self.text[base:], True
        return delta, False

    def _complete_line(self, start: int, end: int) -> int | None:
        """Handle the line text[start:end]; return a cut offset to stop there."""
        line = self.text[start:end].rstrip("\r")
        if self._fence is not None:
            close = _FENCE_CLOSE.match(line)
            if close and len(close.group(1)) >= len(self._fence[0]):
                lang = self._fence[1]
                self._fence = None
                if self._stop_at_block and lang in RUNNABLE:
                    return end
            return None
        m = _FENCE_OPEN.match(line)
        if m:
            self._fence = (m.group(1), m.group(2).lower())
            self._final_at = None
            return None
        if not self._stop_at_final:
            return None
        if self._final_at is None and _FINAL_START.match(line):
            self._final_at = start
        # Stop only when the call closes at a line end: prose answers may hold a ")" early.
        if (
            self._final_at is not None
            and line.rstrip().endswith(")")
            and _balanced_call(self.text[self._final_at : end])
        ):
            return end
        return None


def _balanced_call(text: str) -> bool:
    """True when the first ``(`` in ``text`` has its matching ``)``."""
    open_at = text.find("(")
    if open_at < 0:
        return False
    depth = 0
    for c in text[open_at:]:
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return True
    return False
