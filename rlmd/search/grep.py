"""Regex search that answers with whole lines and their locations.

A pattern that means the same on UTF-8 bytes (see ``rlmd/utf8_regex.py``) runs on the
bytes directly (no copy of a mapped text); any other is run on the ``str`` (the REPL view
decodes itself once for that).  One hit per line: a line with several matches is given
once; a match spanning lines gives all of them as one hit.

This module runs in REPL workers too: standard library and msgspec only.
"""

from __future__ import annotations

import re
from typing import Any

from rlmd.search.hit import Hit
from rlmd.search.locate import Locator
from rlmd.utf8_regex import runs_on_utf8_bytes

MAX_GREP = 10_000


def compile_pattern(pattern: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise TypeError(
            f"grep: pattern must be a str (a Python regex), got {type(pattern).__name__}"
        )
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise ValueError(
            f"bad regular expression {pattern!r:.200}: {e} (Python `re` syntax)"
        ) from None


def grep(text: Any, pattern: str, max_matches: int = 100) -> list[Hit]:
    """Every line of ``text`` (a ``str`` or the REPL's context view) where the Python
    regex ``pattern`` matches, in order, at most ``max_matches`` (capped at 10,000)."""
    if isinstance(max_matches, bool) or not isinstance(max_matches, int) or max_matches < 1:
        raise ValueError(f"max_matches must be a positive integer; got {max_matches!r}")
    max_matches = min(max_matches, MAX_GREP)
    rx = compile_pattern(pattern)
    loc = text if isinstance(text, Locator) else Locator(text)
    src = loc.src
    out: list[Hit] = []
    if pattern.isascii() and (src.ascii or runs_on_utf8_bytes(pattern)):
        brx = re.compile(pattern.encode("ascii"), rx.flags & ~re.UNICODE)
        buf, n, pos = src.buf, src.nbytes, 0
        while len(out) < max_matches and pos <= n:
            m = brx.search(buf, pos)
            if m is None or (m.start() >= n and n > 0):
                break
            ls, _ = loc.line_bounds(m.start())
            _, le = loc.line_bounds(max(m.start(), m.end() - 1))
            out.append(loc.hit_bytes(ls, le))
            pos = le + 1
        return out
    s = src.text()
    n, pos = len(s), 0
    while len(out) < max_matches and pos <= n:
        ms = rx.search(s, pos)
        if ms is None or (ms.start() >= n and n > 0):
            break
        cs = s.rfind("\n", 0, ms.start()) + 1
        ce = s.find("\n", max(ms.start(), ms.end() - 1))
        ce = n if ce < 0 else ce
        hit = loc.hit_bytes(src.to_byte(cs), src.to_byte(ce))
        out.append(hit)
        pos = ce + 1
    return out
