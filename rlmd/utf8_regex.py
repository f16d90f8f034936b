"""When a ``str`` regex can run unchanged on the UTF-8 bytes of a text.

The context store's search and the REPL's ``context`` view both keep texts as mapped
UTF-8.  Decoding a gigabyte to search it costs seconds and its size in memory; running the
pattern compiled for bytes costs neither.  That is exact only when every character the
pattern can match is ASCII: ASCII literals and ranges, no ``.``, no negated sets,
``\\w``-style classes and ``\\b`` only under ``(?a)``, no case folding without ``(?a)``.
Such a match never starts or ends inside a multi-byte character.

The check walks the parse tree of ``re``'s private parser (stable since 3.11) and says
False whenever it is unsure, so the caller takes the slower ``str`` path.
"""

from __future__ import annotations

import re
from re import _constants as sre_c
from re import _parser as sre_parse

__all__ = ["runs_on_utf8_bytes"]

_SAFE_AT = {
    sre_c.AT_BEGINNING,
    sre_c.AT_BEGINNING_LINE,
    sre_c.AT_BEGINNING_STRING,
    sre_c.AT_END,
    sre_c.AT_END_LINE,
    sre_c.AT_END_STRING,
}
_POSITIVE_CATEGORIES = {sre_c.CATEGORY_DIGIT, sre_c.CATEGORY_WORD, sre_c.CATEGORY_SPACE}


def runs_on_utf8_bytes(pattern: str, flags: int = 0, *, allow_empty: bool = True) -> bool:
    """True if ``pattern`` (with ``flags``) finds the same matches on UTF-8 bytes as on
    the decoded text, because every character it can match is ASCII.

    ``allow_empty=False`` also refuses patterns that can match the empty string: such a
    match can fall between the bytes of one character, and a caller that cannot drop
    those (as the store's scanner does) must search the ``str``.
    """
    if not pattern.isascii():
        return False
    try:
        parsed = sre_parse.parse(pattern, flags)
        all_flags = parsed.state.flags
        ascii_flag = bool(all_flags & re.ASCII)
        if all_flags & re.IGNORECASE and not ascii_flag:
            return False  # Unicode case folding: 'k' matches KELVIN SIGN, 's' LONG S
        if not allow_empty and parsed.getwidth()[0] == 0:
            return False
        return _safe(parsed, ascii_flag)
    except Exception:  # a bad pattern, or any surprise in the private parser
        return False


def _safe(sub, ascii_flag: bool) -> bool:
    for op, av in sub:
        if op is sre_c.LITERAL:
            if av >= 0x80:
                return False
        elif op is sre_c.IN:
            for iop, iav in av:
                if iop is sre_c.LITERAL and iav < 0x80:
                    continue
                if iop is sre_c.RANGE and iav[1] < 0x80:
                    continue
                if iop is sre_c.CATEGORY and ascii_flag and iav in _POSITIVE_CATEGORIES:
                    continue
                return False  # NEGATE, non-ASCII members, Unicode classes
        elif op is sre_c.AT:
            if av not in _SAFE_AT and not ascii_flag:
                return False  # \b, \B depend on Unicode word characters
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
            if not _safe(av[2], ascii_flag):
                return False
        elif op is sre_c.SUBPATTERN:
            _group, add_flags, del_flags, p = av
            if add_flags or del_flags or not _safe(p, ascii_flag):
                return False
        elif op is sre_c.BRANCH:
            if not all(_safe(p, ascii_flag) for p in av[1]):
                return False
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            if not _safe(av[1], ascii_flag):
                return False
        elif op is sre_c.ATOMIC_GROUP:
            if not _safe(av, ascii_flag):
                return False
        elif op is sre_c.GROUPREF_EXISTS:
            _group, yes, no = av
            if not _safe(yes, ascii_flag) or (no is not None and not _safe(no, ascii_flag)):
                return False
        elif op is sre_c.GROUPREF:
            continue  # repeats a group that itself matched only ASCII
        else:
            return False  # ANY, NOT_LITERAL, anything unknown
    return True
