"""A writer SIGKILLed mid-put leaves the old context or the new one, never a torn one."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rlmd.store import ContextStore

MB = 1 << 20
BIG_MB = 200
OLD_TEXT = "the old text, é and 😀\n"

CHILD = r"""
import sys
from pathlib import Path
from rlmd.store import ContextStore

root, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3]
# No search index: a build racing the writer's exit left a .sidx beside the text in some
# runs and not others; these tests are about the text's writes.
store = ContextStore(Path(root), search_index_min_bytes=None)
if mode == "text":
    text = ("ünïcödé line of text 😀\n" * 40_000) * int(arg)
    print("go", flush=True)
    store.put_text("big", text)
else:
    print("go", flush=True)
    store.put_path("big", arg, append=(mode == "append"))
print("done", flush=True)
"""


def blake(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 200 MB text file (ASCII body, non-ASCII last line) and its bytes' digest input."""
    path = tmp_path_factory.mktemp("crash") / "big.txt"
    line = b"line of generated text for the crash test, number %08d\n"
    block = b"".join(line % i for i in range(MB // len(line % 0)))
    with open(path, "wb") as f:
        for _ in range(BIG_MB):
            f.write(block)
        f.write("tail: naïve 😀\n".encode())
    return path, path.read_bytes()


def tmp_size(key_dir: Path) -> int:
    """Size of the text temp file being written (0 if none yet)."""
    best = 0
    try:
        for e in os.scandir(key_dir):
            if e.name.startswith(".tmp-") and e.name.endswith(".txt"):
                best = max(best, e.stat().st_size)
    except FileNotFoundError:
        pass
    return best


def renamed_version(key_dir: Path, old_version: str) -> bool:
    """True once a new version file exists (renamed, meta not yet necessarily)."""
    try:
        return any(
            e.name.endswith(".txt") and not e.name.startswith((".", old_version))
            for e in os.scandir(key_dir)
        )
    except FileNotFoundError:
        return False


def run_and_kill(
    root: Path, mode: str, arg: str, when: Callable[[], bool], timeout: float = 60.0
) -> bool:
    """Start a writer, SIGKILL it as soon as ``when()`` holds; True if it was killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), mode, arg],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "go"
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if when():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.0005)
        proc.wait(timeout=timeout)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_store(root: Path, allowed: dict[str, str]) -> str:
    """Reopen the store; the context must be exactly one of ``allowed`` (label -> hash)."""
    store = ContextStore(root, search_index_min_bytes=None)
    version = store.version("big")
    path = store.text_path("big")
    data = path.read_bytes()
    assert blake(data) == version, "text does not match its version: torn write"
    assert version in allowed.values(), "context is neither the old nor the new text"
    info = store.info("big")
    text = data.decode("utf-8")
    assert (info.chars, info.bytes) == (len(text), len(data))
    assert store.peek("big", info.chars - 3, info.chars) == text[-3:]
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == sorted(["meta.json", f"{version}.txt", f"{version}.idx"]), leftovers
    return next(label for label, h in allowed.items() if h == version)


@pytest.mark.parametrize(
    "kill_point",
    ["tmp>=1MB", "tmp>=100MB", "tmp>=190MB", "tmp complete", "version renamed", "no kill"],
)
def test_put_path_killed(tmp_path: Path, big_file: tuple[Path, bytes], kill_point: str) -> None:
    path, content = big_file
    root = tmp_path / "contexts"
    store = ContextStore(root)
    old = store.put_text("big", OLD_TEXT).version
    key_dir = store.text_path("big").parent
    new = blake(content)
    total = len(content)
    conditions: dict[str, Callable[[], bool]] = {
        "tmp>=1MB": lambda: tmp_size(key_dir) >= MB,
        "tmp>=100MB": lambda: tmp_size(key_dir) >= 100 * MB,
        "tmp>=190MB": lambda: tmp_size(key_dir) >= 190 * MB,
        "tmp complete": lambda: tmp_size(key_dir) >= total,
        "version renamed": lambda: renamed_version(key_dir, old),
        "no kill": lambda: False,
    }
    killed = run_and_kill(root, "path", str(path), conditions[kill_point])
    outcome = check_store(root, {"old": old, "new": new})
    if kill_point.startswith("tmp>=") and killed:
        # The temp file was still growing: nothing was committed yet.
        assert outcome == "old"
    if kill_point == "no kill":
        assert not killed and outcome == "new"
    if kill_point.startswith("tmp>=1"):
        assert killed, "the writer finished before the kill point; the test proved nothing"


def test_append_killed(tmp_path: Path, big_file: tuple[Path, bytes]) -> None:
    path, content = big_file
    root = tmp_path / "contexts"
    store = ContextStore(root)
    old = store.put_text("big", OLD_TEXT).version
    key_dir = store.text_path("big").parent
    new = blake(OLD_TEXT.encode() + content)
    assert run_and_kill(root, "append", str(path), lambda: tmp_size(key_dir) >= 50 * MB)
    assert check_store(root, {"old": old, "new": new}) == "old"
    assert not run_and_kill(root, "append", str(path), lambda: False)
    assert check_store(root, {"old": old, "new": new}) == "new"


def test_put_text_killed(tmp_path: Path) -> None:
    root = tmp_path / "contexts"
    store = ContextStore(root)
    old = store.put_text("big", OLD_TEXT).version
    key_dir = store.text_path("big").parent
    reps = 40  # ~48 MB of non-ASCII text: the encoding path
    new = blake((("ünïcödé line of text 😀\n" * 40_000) * reps).encode())
    assert run_and_kill(root, "text", str(reps), lambda: tmp_size(key_dir) >= 20 * MB)
    assert check_store(root, {"old": old, "new": new}) == "old"


APPENDER = r"""
import sys
from pathlib import Path
from rlmd.store import ContextStore

store = ContextStore(Path(sys.argv[1]))
tag = sys.argv[2]
for i in range(25):
    store.put_text("log", f"{tag} {i}\n", append=True)
"""


def test_appends_from_processes_serialize(tmp_path: Path) -> None:
    # Each append reads the old version and commits old+new: without the cross-process
    # lock, concurrent appenders would lose each other's lines.
    root = tmp_path / "contexts"
    ContextStore(root).put_text("log", "start\n")
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(root), tag]) for tag in "abc"]
    for p in procs:
        assert p.wait(timeout=120) == 0
    store = ContextStore(root)
    lines = store.peek("log", 0, 10**6).splitlines()
    assert lines[0] == "start"
    assert sorted(lines[1:]) == sorted(f"{t} {i}" for t in "abc" for i in range(25))
    for t in "abc":  # each process's lines stay in its order
        assert [ln for ln in lines if ln.startswith(t)] == [f"{t} {i}" for i in range(25)]
