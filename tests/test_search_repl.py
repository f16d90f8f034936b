"""search()/grep() in real REPL workers, over a str context and over the mapped view;
the view asks the daemon side (rlmd.search.handlers.handle_call over a real store)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from rlmd.config import LimitsConfig, SandboxConfig
from rlmd.repl.session import ReplSession
from rlmd.search import ranked
from rlmd.search.handlers import handle_call
from rlmd.store import ContextStore

TEXT = (
    "===== notes/a.md =====\nfirst line\nthe launch code is 7781-zulu\n\n"
    "===== notes/b.md =====\ncafé menu\nnothing here\n\n"
)


class StoreCalls:
    """A real on_call: the REPL's search calls answered from a real store."""

    def __init__(self, store: ContextStore | None, name: str | None) -> None:
        self.store, self.name = store, name
        self.calls: list[tuple[str, dict]] = []

    async def __call__(self, fn: str, args: dict) -> Any:
        self.calls.append((fn, args))
        if self.store is None:
            raise ValueError(f"unknown REPL call {fn!r}")
        return await asyncio.to_thread(handle_call, self.store, self.name, fn, args)


async def _session(tmp_path: Path, on_call: StoreCalls, threshold: int, path: Path) -> ReplSession:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return await ReplSession.start(
        context_path=path,
        limits=LimitsConfig(),
        sandbox=SandboxConfig(),
        scratch_dir=scratch,
        on_call=on_call,
        str_threshold_bytes=threshold,
    )


async def _run(tmp_path: Path, on_call: StoreCalls, threshold: int, path: Path, code: str) -> str:
    """What ``code`` prints in a fresh worker over ``path``; a REPL error fails the test."""
    s = await _session(tmp_path, on_call, threshold, path)
    try:
        r = await s.execute(code, timeout_s=30)
    finally:
        await s.close()
    assert r.error is None, r.error
    return r.output


CODE = """
import json
hits = search("what is the launch code?", k=2)
g = grep(r"caf")
print(json.dumps([dict(h) for h in hits] + [dict(x) for x in g]))
print(hits[0].where(), hits[0].line)
print(g)
"""


async def test_search_and_grep_in_a_worker_over_a_str(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    calls = StoreCalls(None, None)
    rows = (await _run(tmp_path, calls, 1 << 30, p, CODE)).splitlines()
    hits = json.loads(rows[0])
    assert hits[0]["text"] == "the launch code is 7781-zulu"
    assert (hits[0]["file"], hits[0]["file_line"], hits[0]["line"]) == ("notes/a.md", 2, 3)
    assert TEXT[hits[0]["start"] : hits[0]["end"]] == hits[0]["text"]
    assert hits[-1]["text"] == "café menu" and hits[-1]["file_line"] == 1
    assert rows[1] == "notes/a.md:2 3"
    assert rows[2].startswith("[notes/b.md:1 @") and rows[2].endswith("] café menu")
    assert calls.calls == []  # a str context is searched in the worker


async def test_a_mapped_context_asks_the_daemon_and_falls_back_to_a_scan(tmp_path: Path) -> None:
    store = ContextStore(tmp_path / "ctx")
    store.put_text("c", TEXT)
    path = store.text_path("c")
    for calls in (StoreCalls(store, "c"), StoreCalls(None, None)):
        out = await _run(tmp_path, calls, 0, path, CODE)  # threshold 0: the mmap view
        hits = json.loads(out.splitlines()[0])
        expect = ranked(TEXT, "what is the launch code?", k=2)
        assert [h["start"] for h in hits[: len(expect)]] == [h.start for h in expect]
        assert hits[0]["file"] == "notes/a.md" and hits[0]["file_line"] == 2
        assert calls.calls == [("search", {"query": "what is the launch code?", "k": 2})]


OUTLINE_TEXT = (
    "===== src/été.py =====\n"
    "class Menu:\n    def dish(self):\n        pass\n    def café(self):\n        pass\n"
    "===== src/util.py =====\n"
    "def helper():\n    pass\n"
    "===== .ci/check.py =====\n"
    "def lint():\n    pass\n"
)
OUTLINE_CODE = """
import json
print(json.dumps([dict(d) for d in outline()]))
print(outline("util.py"))
print(outline("./.ci/check.py"))
try:
    outline(3)
except TypeError as e:
    print("refused:", e)
"""


async def test_outline_in_a_worker_over_the_mapped_view_and_a_str(tmp_path: Path) -> None:
    store = ContextStore(tmp_path / "ctx")
    store.put_text("c", OUTLINE_TEXT)
    for threshold in (0, 1 << 30):  # the mmap view, then a str
        out = await _run(
            tmp_path, StoreCalls(None, None), threshold, store.text_path("c"), OUTLINE_CODE
        )
        rows = out.splitlines()
        defs = json.loads(rows[0])
        assert [(d["kind"], d["name"], d["file"], d["file_line"]) for d in defs] == [
            ("class", "Menu", "src/été.py", 1),
            ("def", "dish", "src/été.py", 2),
            ("def", "café", "src/été.py", 4),
            ("def", "helper", "src/util.py", 1),
            ("def", "lint", ".ci/check.py", 1),
        ]
        assert defs[0]["methods"] == 2
        assert OUTLINE_TEXT[defs[2]["start"] : defs[2]["end"]] == "    def café(self):"
        assert rows[1].startswith("[src/util.py:1 @") and rows[1].endswith("] def helper")
        assert rows[2].startswith("[.ci/check.py:1 @") and rows[2].endswith("] def lint")
        assert rows[3] == "refused: outline: file must be a str, got int"
