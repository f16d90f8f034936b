"""The outline of a code context (rlmd/search/outline.py): classes, functions, method counts."""

from __future__ import annotations

import pytest

from rlmd.search import outline as outline_mod
from rlmd.search.outline import outline

JOINED = (
    "# ==== FILE: pkg/shapes.py ====\n"
    '"""Shapes: a class (via its docstring) that defines nothing."""\n'
    "import math\n"
    "\n"
    "class Shape:\n"
    "    def area(self):\n"
    "        def helper():  # nested: not a method of Shape\n"
    "            return 0\n"
    "        return helper()\n"
    "\n"
    "    @property\n"
    "    def name(self):\n"
    "        return 'shape'\n"
    "\n"
    "    async def draw(self):\n"
    "        pass\n"
    "\n"
    "    class Meta:\n"
    "        def option(self):\n"
    "            pass\n"
    "\n"
    "def top_level():\n"
    "    pass\n"
    "# ==== FILE: pkg/old.py ====\n"
    "class Legacy:\n"
    "    def one(self):\n"
    "        print 'python 2'\n"
    "    def two(self):\n"
    "        pass\n"
    "def after():\n"
    "    pass\n"
)


def test_a_python_file_is_outlined_exactly_by_its_syntax():
    defs = [d for d in outline(JOINED) if d.file == "pkg/shapes.py"]
    got = [(d.kind, d.name, d.file_line, d.depth, d.parent, d.methods) for d in defs]
    assert got == [
        ("class", "Shape", 4, 0, None, 3),  # area, name, draw: not helper, not option
        ("def", "area", 5, 1, "Shape", None),
        ("def", "helper", 6, 2, "area", None),
        ("def", "name", 11, 1, "Shape", None),  # its def line, not the decorator's
        ("def", "draw", 14, 1, "Shape", None),
        ("class", "Meta", 17, 1, "Shape", 1),
        ("def", "option", 18, 2, "Meta", None),
        ("def", "top_level", 21, 0, None, None),
    ]
    shape = defs[0]
    assert JOINED[shape.start : shape.end] == "class Shape:"
    assert shape.line == JOINED[: shape.start].count("\n") + 1


def test_a_file_that_does_not_parse_is_outlined_by_its_lines():
    defs = [d for d in outline(JOINED) if d.file == "pkg/old.py"]
    got = [(d.kind, d.name, d.file_line, d.parent, d.methods) for d in defs]
    assert got == [
        ("class", "Legacy", 1, None, 2),
        ("def", "one", 2, "Legacy", None),
        ("def", "two", 4, "Legacy", None),
        ("def", "after", 6, None, None),
    ]


def test_offsets_are_characters_and_directory_headers_do_not_spoil_the_parse():
    text = (
        "===== café/naïve.py =====\n"
        "s = 'déjà vu'\n"
        "class Été:\n"
        "    def größe(self):\n"
        "        return 1\n"
    )
    [cls, meth] = outline(text)
    assert (cls.name, cls.file, cls.file_line, cls.methods) == ("Été", "café/naïve.py", 2, 1)
    assert text[cls.start : cls.end] == "class Été:"
    assert text[meth.start : meth.end] == "    def größe(self):"


def test_hostile_nesting_falls_back_to_lines_without_crashing():
    text = "x = " + "(" * 5000 + "\nclass Kept:\n    def m(self):\n        pass\n"
    [cls, _] = outline(text)
    assert (cls.name, cls.methods) == ("Kept", 1)


def test_a_text_over_the_limit_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(outline_mod, "MAX_OUTLINE_BYTES", 100)
    with pytest.raises(ValueError, match=r"over the 100 an outline reads; use grep"):
        outline(JOINED)


def test_a_text_without_definitions_has_an_empty_outline():
    assert outline("just prose, with a class of students and a def jam\n") == []


def test_the_store_outlines_a_context_and_refuses_one_over_its_limit(tmp_path):
    from rlmd.store import ContextStore
    from rlmd.store.store import StoreError

    store = ContextStore(tmp_path / "ctx")
    store.put_text("code", JOINED)
    assert [d.name for d in store.outline("code") if d.kind == "class"] == [
        "Shape",
        "Meta",
        "Legacy",
    ]
    with pytest.raises(StoreError, match="over the 100 an outline reads") as e:
        store.outline("code", max_bytes=100)
    assert e.value.kind == "too_large"
