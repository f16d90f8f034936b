"""Corrupt state (issue 14): damaged contexts are listed with their problem (context/list,
daemon/status), reads answer the ``damaged`` error (-32010) saying what to do, a re-put
repairs, and a garbage or missing char index is rebuilt.  A real daemon over the socket."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rlmd.client import RpcError
from rlmd.protocol.errors import DAMAGED

TEXT = "alpha café\nbeta line two\n" * 50


def ctx_dir(d, name: str) -> Path:
    return d.state_dir / "contexts" / hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def version_file(d, name: str, suffix: str) -> Path:
    (p,) = ctx_dir(d, name).glob(f"*{suffix}")
    return p


def test_missing_text_is_listed_as_damaged_and_a_reput_repairs(daemon) -> None:
    daemon.call("context/put", {"name": "ok", "text": "fine\n"})
    daemon.call("context/put", {"name": "broken", "text": TEXT})
    version_file(daemon, "broken", ".txt").unlink()
    rows = {r["name"]: r for r in daemon.call("context/list")}
    assert "damaged" not in rows["ok"]
    assert "missing" in rows["broken"]["damaged"] and "put it again" in rows["broken"]["damaged"]
    st = daemon.call("daemon/status")
    assert [d["name"] for d in st["damaged_contexts"]] == ["broken"]
    for method, params in [
        ("context/peek", {"name": "broken", "start": 0, "end": 5}),
        ("context/search", {"name": "broken", "pattern": "beta"}),
        ("context/search", {"name": "broken", "mode": "ranked", "query": "beta"}),
    ]:
        with pytest.raises(RpcError) as ei:
            daemon.call(method, params)
        assert ei.value.code == DAMAGED and ei.value.data["kind"] == "damaged"
        assert "is missing" in ei.value.message and "retry" not in ei.value.message
    daemon.call("context/put", {"name": "broken", "text": TEXT})  # the same text again
    assert (
        daemon.call("context/peek", {"name": "broken", "start": 0, "end": 10})["text"] == TEXT[:10]
    )
    assert all("damaged" not in r for r in daemon.call("context/list"))


def test_garbage_metadata_is_listed_with_its_name(daemon) -> None:
    daemon.call("context/put", {"name": "meta-broken", "text": TEXT})
    meta = ctx_dir(daemon, "meta-broken") / "meta.json"
    meta.write_bytes(meta.read_bytes()[:40])  # cut short: not JSON any more
    (row,) = daemon.call("context/list")
    assert row["name"] == "meta-broken" and "unreadable" in row["damaged"]
    daemon.call("context/put", {"name": "meta-broken", "text": "new text\n"})
    (row,) = daemon.call("context/list")
    assert "damaged" not in row and row["chars"] == 9


@pytest.mark.parametrize("how", ["garbage", "missing", "stale"])
def test_a_broken_char_index_is_rebuilt(daemon, how: str) -> None:
    daemon.call("context/put", {"name": "c", "text": TEXT})
    idx = version_file(daemon, "c", ".idx")
    good = idx.read_bytes()
    if how == "garbage":
        idx.write_bytes(b"\x00garbage" * 10)
    elif how == "missing":
        idx.unlink()
    else:
        daemon.call("context/put", {"name": "other", "text": "x" * 10})
        idx.write_bytes(version_file(daemon, "other", ".idx").read_bytes())
    daemon.restart()  # no handle cached: the next read opens the files again
    assert daemon.call("context/peek", {"name": "c", "start": 5, "end": 20})["text"] == TEXT[5:20]
    m = daemon.call("context/search", {"name": "c", "pattern": "two"})["matches"]
    assert m[0]["line"] == 2 and m[0]["start"] == TEXT.index("two")
    assert idx.read_bytes() == good  # saved again, identical to the one the put wrote
