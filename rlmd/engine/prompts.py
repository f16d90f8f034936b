"""Everything the engine says to the root model, in one place.

Two system prompts, chosen by model size: small models (about 3B parameters and under,
such as the embedded Qwen2.5-Coder-1.5B) follow the loop only when they are shown one
concrete worked exchange ending in a literal ``FINAL(...)``, and do best with one step per
reply; large models get the full tool description and are told to filter with code first,
keep sub-prompts moderate and not over-call.  The user-turn messages (context description,
code output, nudges) are shared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Variant = Literal["small", "large"]

# "qwen2.5-coder:1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m", "llama3.2:3b", "phi3:3.8b".
_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")
SMALL_MAX_BILLIONS = 3.0
# Small models have small windows (the embedded default: 16k tokens shared by 2 slots):
# their outputs are cut shorter, and the conversation is kept to about 6k tokens.
SMALL_OUTPUT_CHARS = 4_000
SMALL_HISTORY_CHARS = 24_000
# Large models: about 100k tokens of conversation before old outputs are shortened.
LARGE_HISTORY_CHARS = 400_000
# What an old output shrinks to when the conversation is compacted.
COMPACT_OUTPUT_CHARS = 1_200


def variant_for(model: str) -> Variant:
    """``small`` when the model name says it has at most 3B parameters, else ``large``."""
    sizes = [float(m.group(1)) for m in _SIZE.finditer(model)]
    if sizes and max(sizes) <= SMALL_MAX_BILLIONS:
        return "small"
    return "large"


@dataclass(frozen=True)
class ContextDescription:
    """What the root model is told about the context before it looks (never the text)."""

    name: str  # the store's name, or "" for an inline text
    chars: int
    lines: int
    head: str  # its first few lines, already cut short


def describe_text(
    text: str, *, name: str = "", head_lines: int = 5, head_chars: int = 600
) -> ContextDescription:
    """Describe an in-memory text (an inline ``text`` param, a sub-context)."""
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return ContextDescription(
        name=name,
        chars=len(text),
        lines=lines,
        head=cut_head(text[: head_chars * 2], head_lines, head_chars),
    )


def cut_head(text: str, head_lines: int = 5, head_chars: int = 600) -> str:
    """The first ``head_lines`` lines of ``text``, each at most 200 chars, in all ``head_chars``."""
    out = []
    for line in text.splitlines()[:head_lines]:
        out.append(line if len(line) <= 200 else line[:200] + " …")
    head = "\n".join(out)
    return head if len(head) <= head_chars else head[:head_chars] + " …"


# --- system prompts ---------------------------------------------------------------------

_TOOLS = """\
The REPL gives you:
- `context`: the whole text, as a Python string. Slice it, search it with `re`, split it.
  Never print all of it: what you print is shown to you cut to about {output_chars:,} characters.
- `llm_query(prompt, model=None) -> str`: one call to a helper language model. It sees only
  the prompt you give it, so put the piece of text it must read into the prompt.
- `llm_query_batched(prompts, model=None) -> list[str]`: many helper calls run at the same
  time; answers come back in the order of the prompts. Far faster than calling in a loop.
- `rlm_query(prompt, context=None) -> str`: {rlm_query}
- `search(query, k=10)`: the k passages that best match a question or keywords, best first;
  `grep(pattern, max_matches=100)`: every whole line matching a regex. Each hit prints as
  `[file:line @start:end] text` and has `.start`, `.end`, `.line`, `.file`, `.text`.
- `outline(file=None)`: every class and function defined in the code, in order, each with
  `.kind`, `.name`, `.file`, `.line`, `.parent` and, for a class, `.methods` (how many
  functions are defined directly in its body).
- `SHOW_VARS()`: lists the variables you have made.
- `FINAL(answer)` and `FINAL_VAR(name)`: end the work with an answer (see below).
Variables, imports and functions persist from block to block. There is no network and no
shell; the standard library is there."""

_RLM_PLAIN = "the same as `llm_query` here (a plain helper call)."
_RLM_NESTED = (
    "hands a sub-question and its own text (`context`) to a helper that works the way you "
    "do, with its own REPL. Use it for a piece that needs several steps of its own."
)

_LARGE = """\
You answer questions about a text that can be far larger than what you could read in one
go. The text is not in this conversation: it is loaded into a Python REPL as the variable
`context`, and you study it by writing code.

How a turn works: write a short explanation and one code block fenced with ```repl. Stop
writing right after the closing fence. The block runs, and the next message shows you
what it printed. Never guess what code will print; wait for the output.

{tools}

How to work well:
1. Probe before you plan: the length, how the text is laid out, a few sample lines.
2. Filter with code first (regular expressions, `str` methods, counting): code is free and
   exact, model calls are slow and cost money.
3. Use the helper models where meaning matters and code cannot decide: cut the relevant
   part into chunks of at most about {chunk_chars:,} characters, ask one precise question
   per chunk with `llm_query_batched`, and keep the answers in a variable.
4. Do not over-call: one batch over the chunks that matter beats hundreds of tiny calls,
   and never send the whole context when a filtered piece will do.
5. Combine the pieces in code, or with one last `llm_query` over the collected answers.
6. Check what you have, then finish.

Finishing: write, on a line of its own and outside any code block, either
FINAL(your complete answer)
or
FINAL_VAR(variable_name)
to answer with the value of a REPL variable (best for long answers built in code). The
answer is the answer itself, not a description of what you would do.

Example of a full exchange (question: "Which error code appears most often in the log?"):

Assistant:
Let me see the shape of the text first.
```repl
print(len(context))
print(context[:500])
```
User: (output) 2381120 / `2024-05-01 10:00:01 ERROR E1042 disk full` ...

Assistant:
Lines carry codes like E1042; counting them needs no model.
```repl
import re
from collections import Counter
codes = Counter(re.findall(r"\\bE\\d{{4}}\\b", context))
print(codes.most_common(5))
```
User: (output) [('E1042', 318), ('E2001', 97), ...]

Assistant:
FINAL(E1042 is the most frequent error code, with 318 occurrences.)

Example of fan-out (question: "What do the customers complain about?", a long list of reviews):
```repl
reviews = context.split("\\n\\n")
chunks = ["\\n\\n".join(reviews[i:i + 40]) for i in range(0, len(reviews), 40)]
prompts = [f"List the complaints in these reviews, one per line:\\n{{c}}" for c in chunks]
answers = llm_query_batched(prompts)
summary = llm_query("Merge these lists of complaints into the 5 most common ones, "
                    "with rough counts:\\n" + "\\n".join(answers))
print(summary)
```
and once the summary is printed and looks right: FINAL_VAR(summary)
"""

_SMALL = """\
You answer a question about a long text. The text is in a Python REPL, in the variable
`context`. You cannot see it: you read it by writing Python code in a ```repl block.
After each block, stop. You will get what the code printed. Then write the next block.

{tools}

When you know the answer, write it on its own line, outside code, like this:
FINAL(the answer)

Example.
Question: In which city is the meeting?

Assistant:
```repl
print(len(context))
print(grep(r"meeting", 5))
```

User: Output:
2000000
[line 41817 @1254490:1254535] The meeting will be held in Lisbon on Monday.

Assistant:
FINAL(Lisbon)

Example with a helper model, for a question about meaning:
```repl
chunks = [context[i:i + {chunk_chars}] for i in range(0, len(context), {chunk_chars})]
answers = llm_query_batched([f"Does this text mention a cat? Quote it.\\n{{c}}" for c in chunks])
print([a for a in answers if "yes" in a.lower()][:5])
```

Rules:
- One ```repl block per reply, then stop.
- Use search(...), grep(...) or re to find things in the text. Print short results.
- Print the whole line around a match, not only the word you searched: the answer is
  usually next to it.
- If a block found nothing, try other words from the question; do not repeat it.
- Do not invent output. Wait for it.
- FINAL(...) holds the real answer, not a plan.
- If the text does not hold the answer, write FINAL(not found). Never guess a value.
"""


_NOT_FOUND_RULE = (
    "- If the text does not hold the answer, write FINAL(not found). Never guess a value.\n"
)


def system_prompt(
    model: str, *, nested_rlm: bool, output_chars: int, sub_calls: bool = True, qa: bool = True
) -> str:
    """The system prompt for ``model``; ``nested_rlm``: ``rlm_query`` runs a nested loop.

    ``qa=False``: the task is not a question about the text (the improvement cycle asks
    for a diff), so the small prompt's "FINAL(not found)" rule, which the embedded model
    obeyed instead of the goal, is left out.

    ``sub_calls=False`` (the "rlm-nosub" method) says that the sub-model functions are
    switched off, so the model must work with code alone.
    """
    variant = variant_for(model)
    tools = _TOOLS.format(
        output_chars=output_chars, rlm_query=_RLM_NESTED if nested_rlm else _RLM_PLAIN
    )
    if variant == "small":
        text = _SMALL.format(tools=tools, chunk_chars=4000)
        if not qa:
            text = text.replace(_NOT_FOUND_RULE, "")
    else:
        text = _LARGE.format(tools=tools, chunk_chars=50_000)
    return text if sub_calls else text + NO_SUB_CALLS


NO_SUB_CALLS = (
    "\n\nIn this session llm_query, llm_query_batched and rlm_query are switched off "
    "(calling them raises an error). Answer with Python code over `context` alone, then "
    "FINAL(...)."
)

NO_SUB_CALLS_ERROR = "sub-calls are switched off for this query (mode rlm-nosub)"


def base_messages(query: str, text: str, cut: int) -> tuple[str, str]:
    """System and user message of the "base" method: the text itself, then the question.

    ``cut`` is how many characters of the context were left out to fit the window.
    """
    note = (
        f"\n\n[... the last {cut:,} characters of the text were cut to fit the model's window ...]"
        if cut
        else ""
    )
    system = "Answer the question about the text below. Be brief and exact."
    user = f"Text:\n---\n{text}{note}\n---\n\nQuestion: {query}\nAnswer:"
    return system, user


# --- user turns -------------------------------------------------------------------------


def first_message(query: str, context: ContextDescription | None) -> str:
    """The first user message: the context described (never the text) and the question."""
    if context is None or context.chars == 0:
        return (
            "There is no context for this question (`context` is an empty string).\n"
            "Answer it yourself; use a ```repl block only if computing helps. "
            "End with FINAL(your answer).\n\n"
            f"Question: {query}"
        )
    name = f" named {context.name!r}" if context.name else ""
    return (
        f"The context{name} is a string of {context.chars:,} characters in "
        f"{context.lines:,} lines. It begins:\n"
        f"---\n{context.head}\n---\n\n"
        f"Question: {query}\n\n"
        "Start by writing a ```repl block to look at the context."
    )


def output_message(
    output: str, *, error: str | None, timed_out: bool, restarted: bool, cell_timeout_s: float
) -> str:
    """What a block printed, as the next user message (``output`` is already truncated)."""
    parts = ["Output:"]
    parts.append(output if output.strip() else "(the code printed nothing)")
    if error:
        parts.append(f"Error:\n{error}")
    if timed_out:
        parts.append(
            f"The block was stopped after {cell_timeout_s:g} s (the per-block time limit). "
            "Do less per block, e.g. fewer helper calls or a narrower search."
        )
    if restarted:
        parts.append("The REPL was restarted: your variables are gone; `context` is still there.")
    parts.append("Continue with another ```repl block, or answer with FINAL(...) if you know.")
    return "\n".join(parts)


def question_reminder(query: str) -> str:
    """Appended to outputs for small models, which lose track of the question."""
    q = query if len(query) <= 500 else query[:500] + " …"
    return (
        f"The question is: {q}\n"
        "If the output above answers it, write FINAL(the answer) now. "
        "If not, write one new ```repl block."
    )


# A printed line that says a search found nothing (``[] (no hits)``: rlmd.search's HitList).
_EMPTY_RESULTS = {"[]", "()", "{}", "none", "set()", "-1", "[] (no hits)"}


def is_empty_output(text: str) -> bool:
    """What a block printed says it found nothing."""
    shown = text.strip()
    return not shown or any(line.strip().lower() in _EMPTY_RESULTS for line in shown.splitlines())


def repeated_code(first_output: str, query: str = "", earlier: str = "") -> str:
    """Sent instead of running a block the model already ran, unchanged.

    ``earlier``: the last output that did find something.  Trace (1.4M-character needle,
    embedded model): grep printed the needle's line, then the model re-ran a lowercased
    grep that found nothing, turn after turn; it needs the line it already had.
    """
    shown = first_output.strip()
    if is_empty_output(shown):
        if earlier.strip():
            return (
                "You already ran exactly this code; it was not run again. It found nothing:\n"
                f"{shown or '(nothing)'}\n"
                f"An earlier block printed:\n{truncate_head(earlier, 800)}\n"
                "If that answers the question, write FINAL(the answer) now. Otherwise "
                "search for other words."
            )
        # Told "use that output" after an empty search, small models answered from memory;
        # told to search differently, they re-ran the same block.  A concrete block works.
        example = search_example(query)
        return (
            "You already ran exactly this code; it was not run again. It found nothing:\n"
            f"{shown or '(nothing)'}\n"
            "Do not answer from memory. Search differently: another pattern, or a single "
            "distinctive word of the question, printing the lines around it"
            + (f", like this:{example}" if example else ".")
        )
    return (
        "You already ran exactly this code; it was not run again. Its output was:\n"
        f"{shown}\n"
        "Use that output: answer with FINAL(the answer), or write different code."
    )


def truncate_head(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " …"


def repeated_failure(error: str) -> str:
    """Sent instead of re-running the block that just failed, unchanged."""
    return (
        f"This is the same code that just failed with: {error}\n"
        "It was not run again. Fix the code (e.g. add the missing import or variable), "
        "or answer with FINAL(the answer) if you already know it."
    )


NO_CODE_NO_FINAL = (
    "Your reply had no ```repl block and no FINAL(...) line. Either write a ```repl block "
    "to look at the context, or give the answer on a line of its own: FINAL(your answer)"
)


def not_an_answer(reason: str) -> str:
    """Sent once when a FINAL answer does not look like one."""
    return (
        f"That FINAL answer was not accepted: {reason}. Do the work with ```repl blocks if "
        "needed, then give the actual answer: FINAL(the answer itself)"
    )


def search_example(query: str, key: str = "") -> str:
    """A ```repl block that prints the lines holding ``key`` or else the question's most
    distinctive word (its longest), or "" when there is none: small models copy a shown
    block."""
    key = key or max(re.findall(r"[\w-]{4,}", query), key=len, default="")
    if not key:
        return ""
    # (?i): small models lowercase what they search for.
    return f'\n```repl\nprint(grep(r"(?i){re.escape(key)}", 5))\n```'


def unverified_answer(answer: str, missing: list[str], query: str) -> str:
    """Sent once to a small model whose short answer was shown nowhere (likely invented)."""
    words = ", ".join(repr(w) for w in missing[:3])
    example = search_example(query)
    return (
        f"FINAL({answer}) was not accepted yet: no output so far shows {words}. Do not guess. "
        "Search `context` with code for a word of the question and read the lines you find."
        + (f" For example:{example}" if example else "")
    )


def missing_variable(name: str, problem: str) -> str:
    """Sent when FINAL_VAR names a variable that cannot be read."""
    return (
        f"FINAL_VAR({name}) failed: {problem}. Check with SHOW_VARS() in a ```repl block, "
        "or answer with FINAL(the answer)."
    )


LAST_CHANCE = (
    "You have used all your turns; no more code will run. From what you have seen so far, "
    "give your best answer now, on a line of its own: FINAL(your answer)"
)

# When steer.stuck: a block already run sent again and again, or one block with other
# numbers.
STUCK_LAST_CHANCE = (
    "You keep sending the same code; no more code will run. From what you have "
    "seen so far, give your best answer now, on a line of its own: FINAL(your answer)"
)


# --- the context shown whole ("auto" mode on a short context) ----------------------------

_DIRECT = """\
You answer a question about a text. The whole text is in the user's message. It is also
in a Python REPL as the variable `context`, for exact work such as counting or computing:
a ```repl block runs Python there and you get what it printed (then write the answer).

Answer from the text. When you know the answer, write it on a line of its own:
FINAL(the answer)
Quote values exactly as the text writes them. If the text does not hold the answer,
write FINAL(not found). Never guess a value."""


def direct_system_prompt(sub_calls: bool = True) -> str:
    """The system prompt when the whole context is in the first message (any model size:
    reading is what every model does well)."""
    tools = (
        "\n`llm_query(prompt)` calls a helper model on a piece of text you give it."
        if sub_calls
        else ""
    )
    return _DIRECT + tools


def direct_first_message(
    query: str, text: str, context: ContextDescription, evidence: str = ""
) -> str:
    """The first user message with the context itself, then the question."""
    name = f" {context.name!r}" if context.name else ""
    return (
        f"The context{name} ({context.chars:,} characters, {context.lines:,} lines), in full:\n"
        f"<<<\n{text}\n>>>\n\n" + (evidence + "\n\n" if evidence else "") + f"Question: {query}\n"
        "Answer with FINAL(...) now if the text answers it."
    )


OUTPUTS_TURN_SYSTEM = """\
You answer a question from what a program printed while it searched a text. Write the
answer on a line of its own: FINAL(the answer)
Quote values exactly as printed."""
OUTPUTS_TURN_NOT_FOUND = " If the output does not answer it, write FINAL(not found)."

# What the last-chance fallback shows of the outputs, newest first kept.
OUTPUTS_TURN_CHARS = 6000


def outputs_turn_message(query: str, printed: list[str]) -> str:
    """The question and the blocks' outputs (the newest that fit ``OUTPUTS_TURN_CHARS``)."""
    kept: list[str] = []
    room = OUTPUTS_TURN_CHARS
    for out in reversed(printed):
        piece = truncate_head(out, room)
        kept.insert(0, piece)
        room -= len(piece)
        if room <= 200:
            break
    body = "\n---\n".join(kept)
    return f"What the program printed:\n{body}\n\nThe question is: {query}"


EVIDENCE_TURN_SYSTEM = """\
You answer a question from passages a search found in a longer text. If the passages
answer it, write the answer on a line of its own: FINAL(the answer)
Quote values exactly as the passages write them. If they do not answer it, or you are not
sure, write only the word READ and the whole text will be shown to you."""

# The same turn before the REPL loop, when code found the evidence exactly (the lines that
# define the asked name, the outline's counts).
EVIDENCE_TURN_SYSTEM_REPL = """\
You answer a question about a text from what a program found in it: passages a search
ranked highest and, for code, the lines defining a name or exact counts of its classes.
If they answer it, write the answer on a line of its own: FINAL(the answer)
Quote names and numbers exactly as written above. If they do not answer it, or you are
not sure, write only the word READ and you will be given a Python REPL over the text."""


def evidence_turn_message(query: str, evidence: str) -> str:
    """The evidence turn's one user message: the passages, then the question."""
    what = "the counts or the passages" if OUTLINE_MARK in evidence else "the passages"
    return f"{evidence}\n\nQuestion: {query}\nFINAL(...) if {what} answer it, else READ."


def evidence_block(passages: list[tuple[str, str]]) -> str:
    """Ranked passages for the question: (location, text) pairs, best first."""
    if not passages:
        return ""
    lines = ["Passages a search for the question ranked highest (location: text):"]
    for i, (where, text) in enumerate(passages, 1):
        lines.append(f"[{i}] {where}: {text}")
    return "\n".join(lines)


OUTLINE_MARK = "counted by outline()"


def outline_block(rows: list[str], heading: str, total: int) -> str:
    """What ``outline()`` says about the classes a question asks about: ``rows`` under
    ``heading``, and how many classes the text has in all."""
    if not rows:
        return ""
    lines = [f"{heading} ({OUTLINE_MARK}; {total:,} classes in the whole text):"]
    lines.extend(f"- {r}" for r in rows)
    return "\n".join(lines)


def with_evidence(first: str, evidence: str) -> str:
    """The rlm first message with the evidence block before the question."""
    if not evidence:
        return first
    head, sep, rest = first.partition("Question: ")
    if not sep:
        return first + "\n\n" + evidence
    # The passages change what to do first: answer from them, or look further with code.
    # With the outline's counts the model is pointed at them by name: told only "if a
    # passage answers it", the embedded model ran search("class") past them (codeqa trace).
    if OUTLINE_MARK in evidence:
        todo = (
            "The counts above are exact: outline() made them from the whole text. If they "
            "answer the question, answer now with FINAL(the answer)."
        )
    else:
        todo = (
            "If a passage above answers it, answer now with FINAL(the answer). Otherwise "
            "write a ```repl block to read the lines around them."
        )
    rest = rest.replace("Start by writing a ```repl block to look at the context.", todo)
    return head + evidence + "\n\n" + sep + rest


def names_absent_note(names: list[str]) -> str:
    """Told up front when none of the question's names occurs anywhere in the text."""
    quoted = ", ".join(repr(n) for n in names)
    return (
        f"Note: a search of the whole text (ignoring case) finds {quoted} nowhere. If the "
        "text does not hold the answer, write FINAL(not found)."
    )


def follow_up_preamble(question: str, answer: str, sources: list[str]) -> str:
    """What a follow-up query is told of the earlier one."""
    src = "".join(f"\n  - {s}" for s in sources[:5])
    return (
        "This question follows an earlier one about the same context.\n"
        f"Earlier question: {question}\n"
        f"Earlier answer: {answer}" + (f"\nIt rests on:{src}" if src else "") + "\n\n"
    )


def not_found_answer(query: str) -> str:
    """The answer when the model's short answer appears nowhere in the context."""
    return "not found: the context does not seem to hold the answer to this question"
