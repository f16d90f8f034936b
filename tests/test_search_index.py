"""The per-context search index: built after a put, used once ready, the same top hits as a
scan, rebuilt when damaged; and a real daemon keeps answering while it builds."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from rlmd.search.ranked import BLOCK_MODE_BYTES, ranked_scan
from rlmd.store import ContextStore

QUERY = "What is the special magic number for zephyr-aurora?"


def haystack(seed: int, nbytes: int, depth: float) -> tuple[str, str]:
    """~nbytes of lines of random words (a large vocabulary, some common query words in
    the filler too) with the needle at ``depth``; (text, needle)."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choices("abcdefghijklmnoprstuvwy", k=rng.randint(3, 9))) for _ in range(40000)
    ]
    vocab += ["number", "special", "the", "for", "is", "magic"] * 20
    rows, size = [], 0
    while size < nbytes:
        row = " ".join(rng.choices(vocab, k=rng.randint(5, 16)))
        rows.append(row)
        size += len(row) + 1
    needle = f"The special magic number for zephyr-aurora is {rng.randint(10**6, 10**7)}."
    rows.insert(int(depth * len(rows)), needle)
    rows.insert(int(0.6 * len(rows)), "===== docs/b.txt =====")  # laid out as a directory
    return "===== a.txt =====\n" + "\n".join(rows) + "\n", needle


def wait_for(pred, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.mark.parametrize(("seed", "depth"), [(1, 0.1), (2, 0.5), (3, 0.93)])
def test_index_is_built_after_put_and_answers_like_a_scan(
    tmp_path: Path, seed: int, depth: float
) -> None:
    text, needle = haystack(seed, BLOCK_MODE_BYTES + 500_000, depth)
    store = ContextStore(tmp_path / "c", search_index_min_bytes=1)
    try:
        store.put_text("h", text)
        wait_for(lambda: store.info("h").search_index == "ready")
        hits, indexed = store.search_ranked_ex("h", QUERY, 5)
        assert indexed and hits[0].text == needle
        assert text[hits[0].start : hits[0].end] == needle
        assert hits[0].line == text[: hits[0].start].count("\n") + 1
        head = text.rfind("\n===== ", 0, hits[0].start)
        assert hits[0].file == ("a.txt" if head < 0 else "docs/b.txt")
        assert hits[0].file_line == hits[0].line - (
            text[: head + 1].count("\n") + 1 if head >= 0 else 1
        )
        scan = ranked_scan(store._get("h").locate(), QUERY, 5)
        assert hits[0] == scan[0]
        assert hits == scan or all(h.score <= scan[0].score for h in hits[1:])
        for q in ["zephyr-aurora", "special number", "vlakqz"]:
            a, ok = store.search_ranked_ex("h", q, 3)
            assert ok and a[:1] == ranked_scan(store._get("h").locate(), q, 3)[:1]
    finally:
        store.close()


def test_a_damaged_index_is_rebuilt_and_search_scans_meanwhile(tmp_path: Path) -> None:
    text, needle = haystack(4, BLOCK_MODE_BYTES + 200_000, 0.7)
    store = ContextStore(tmp_path / "c", search_index_min_bytes=1)
    store.put_text("h", text)
    wait_for(lambda: store.info("h").search_index == "ready")
    store.close()
    (six,) = (tmp_path / "c").glob("*/*.sidx")
    good_size = six.stat().st_size
    six.write_bytes(b"this is not a search index" * 100)
    store = ContextStore(tmp_path / "c", search_index_min_bytes=1)  # no cached handle
    try:
        hits, indexed = store.search_ranked_ex("h", QUERY, 3)
        assert not indexed and hits[0].text == needle  # scanned, and a rebuild is queued
        wait_for(lambda: store.info("h").search_index == "ready")
        hits2, indexed = store.search_ranked_ex("h", QUERY, 3)
        assert indexed and hits2[0] == hits[0]
        assert six.stat().st_size == good_size
    finally:
        store.close()


def test_small_contexts_get_no_index(tmp_path: Path) -> None:
    store = ContextStore(tmp_path / "c", search_index_min_bytes=1)
    store.put_text("s", "small text\n" * 1000)
    assert store.info("s").search_index is None
    assert store.search_ranked_ex("s", "small", 1)[1] is False
    assert not list((tmp_path / "c").glob("*/*.sidx"))


def test_the_daemon_answers_pings_while_an_index_builds(make_daemon, tmp_path: Path) -> None:
    d = make_daemon("[search]\nindex_min_mb = 1\n")
    text, needle = haystack(5, 3 * BLOCK_MODE_BYTES, 0.4)
    p = tmp_path / "big.txt"
    p.write_text(text)
    d.call("context/put", {"name": "big", "path": str(p)})
    worst, during = 0.0, 0
    with d.client() as c:
        while True:
            t0 = time.monotonic()
            assert c.call("daemon/ping") == "pong"
            worst = max(worst, time.monotonic() - t0)
            state = c.call("context/info", {"name": "big"})["search_index"]
            if state != "building":
                break
            during += 1
    assert state == "ready" and during > 0
    assert worst < 0.5, worst  # the build runs in a child process
    r = d.call("context/search", {"name": "big", "mode": "ranked", "query": QUERY, "k": 3})
    assert r["indexed"] and r["matches"][0]["text"] == needle
