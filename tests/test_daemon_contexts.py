"""Contexts through the daemon: put/list/peek/search/drop, restarts and crashes."""

from __future__ import annotations

import hashlib
import signal
import threading
import time

import pytest

from rlmd.client import RpcError


def test_context_lifecycle_over_socket(daemon, tmp_path):
    text = "alpha line\nbéta — ünïcode 🎉 line\ngamma TODO: fix me\n"
    r = daemon.call("context/put", {"name": "notes", "text": text})
    assert (r["chars"], r["lines"], r["bytes"]) == (len(text), 3, len(text.encode()))
    assert r["tokens_est"] > 0
    [info] = daemon.call("context/list")
    assert info["name"] == "notes" and info["created"] and info["updated"]
    assert (
        daemon.call("context/peek", {"name": "notes", "start": 11, "end": 30})["text"]
        == text[11:30]
    )
    [m] = daemon.call("context/search", {"name": "notes", "pattern": r"TODO: (\w+)"})["matches"]
    assert m["line"] == 3 and text[m["start"] : m["end"]] == m["text"] == "TODO: fix"
    # append
    r = daemon.call("context/put", {"name": "notes", "text": "delta\n", "append": True})
    assert r["chars"] == len(text) + 6
    # a directory, by path, with a .gitignore
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "a.py").write_text("def f():\n    return 1  # TODO: a\n")
    (proj / "build.log").write_text("noise\n")
    (proj / ".gitignore").write_text("*.log\n")
    (proj / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    r = daemon.call("context/put", {"name": "proj", "path": str(proj)})
    assert r["files"] >= 1
    assert any("blob.bin" in s["path"] for s in r["skipped"])
    hits = daemon.call("context/search", {"name": "proj", "pattern": "TODO"})["matches"]
    assert len(hits) == 1
    assert (
        "noise"
        not in daemon.call("context/peek", {"name": "proj", "start": 0, "end": 10_000})["text"]
    )
    assert daemon.call("context/drop", {"name": "proj"}) == {"dropped": True}
    assert daemon.call("context/drop", {"name": "proj"}) == {"dropped": False}


def test_bad_context_input_is_explained(daemon):
    with daemon.client() as c:
        with pytest.raises(RpcError) as ei:
            c.call("context/put", {"name": "x"})
        assert "exactly one of" in ei.value.message
        c.call("context/put", {"name": "x", "text": "abc"})
        with pytest.raises(RpcError) as ei:
            c.call("context/search", {"name": "x", "pattern": "("})
        assert ei.value.kind == "invalid_pattern"
        with pytest.raises(RpcError) as ei:
            c.call("context/put", {"name": "y", "path": "/nonexistent/file"})
        assert "/nonexistent/file" in ei.value.message
        with pytest.raises(RpcError) as ei:
            c.call("context/put", {"name": "", "text": "a"})
        assert ei.value.kind == "invalid_name"


def test_contexts_survive_restart(daemon):
    daemon.call("context/put", {"name": "keep", "text": "persist me\n" * 1000})
    before = daemon.call("context/list")
    daemon.restart()
    after = daemon.call("context/list")
    assert before == after
    assert (
        daemon.call("context/peek", {"name": "keep", "start": 0, "end": 10})["text"] == "persist me"
    )


def test_daemon_killed_during_put_leaves_old_or_new(daemon, tmp_path):
    old = "old version\n" * 1000
    daemon.call("context/put", {"name": "big", "text": old})
    big = tmp_path / "big.txt"
    line = "new content line with some words in it\n"
    with open(big, "w") as f:
        for _ in range(4_000_000):  # ~160 MB: slow enough to be killed mid-write
            f.write(line)
    new_hash = hashlib.sha256(big.read_bytes()).hexdigest()

    def put() -> None:
        try:
            daemon.call("context/put", {"name": "big", "path": str(big)})
        except (OSError, ConnectionError, RpcError):
            pass

    t = threading.Thread(target=put)
    t.start()
    time.sleep(0.4)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    t.join(30)
    daemon.start()
    [info] = daemon.call("context/list")
    # The version is the SHA-256 of the stored text: whole old or whole new, nothing torn.
    assert info["version"] in (hashlib.sha256(old.encode()).hexdigest(), new_hash)
    head = daemon.call("context/peek", {"name": "big", "start": 0, "end": 20})["text"]
    assert head in (old[:20], line[:20])
    # state/tmp (the REPL scratch root, claimed at startup) and contexts/.search-tmp (the
    # search index builds' workspace, emptied at startup; the restart may be building the
    # big context's index there now) are directories the daemon keeps.
    keep = {daemon.state_dir / "tmp", daemon.state_dir / "contexts" / ".search-tmp"}
    leftovers = [
        p for p in daemon.state_dir.rglob("*") if "tmp" in p.name.lower() and p not in keep
    ]
    assert leftovers == []
