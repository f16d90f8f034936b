"""Benchmark of the context store: put / peek / search on large contexts, time and RSS.

    python bench/bench_store.py [--sizes 100M,1G] [--kinds ascii,utf8] [--dir DIR]

Generates a text file of each size (ASCII, or with accents/emoji/CJK on every line) in a
temporary directory (deleted afterwards), then measures, in this process:
``put_path`` (streamed from the file), ``append`` (copies the old text), reopening the
store, peeks at random offsets, and searches (a rare literal that forces a full scan, a
regex over the whole text, and an early-exit search).  For each operation: wall time,
throughput, the peak resident size above the level before it (VmHWM is reset per
operation through /proc/self/clear_refs), and the resident size after.

``run(sizes) -> str`` returns the Markdown table (the lead's runner calls it).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlmd.store import ContextStore

MiB = 1 << 20
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s: str) -> int:
    """'100M' -> bytes."""
    s = s.strip().upper().removesuffix("B")
    if s and s[-1] in _UNITS:
        return int(float(s[:-1]) * _UNITS[s[-1]])
    return int(s)


def _status(field: str) -> int:
    """A /proc/self/status field in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def generate(path: Path, size: int, kind: str) -> int:
    """Write ~``size`` bytes of text; a NEEDLE line sits at 99 %.  Returns bytes written."""
    rng = random.Random(42)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    if kind == "utf8":
        words += "café naïve façade 😀 日本語 über straße ☕ ελληνικά".split()
    lines = []
    for i in range(20_000):
        n = rng.randint(4, 14)
        lines.append(f"{i:05d} " + " ".join(rng.choice(words) for _ in range(n)) + "\n")
    block = "".join(lines).encode()
    needle_at = int(size * 0.99)
    written = 0
    with open(path, "wb") as f:
        blk = 0
        while written < size:
            head = f"### block {blk} ERROR {blk % 1000}: code{blk}\n".encode()
            if written <= needle_at < written + len(block):
                head += b"NEEDLE-7f3a in the haystack\n"
            data = head + block
            f.write(data)
            written += len(data)
            blk += 1
    return written


def _measure(fn: Callable[[], object]) -> tuple[float, float, float, object]:
    """(seconds, peak RSS rise MiB, RSS after MiB, result)."""
    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    after = _status("VmRSS")
    return dt, max(0, peak - before) / 1024, after / 1024, result


def _human(n: int) -> str:
    for unit, f in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= f:
            return f"{n / f:.0f}{unit}"
    return str(n)


def bench_one(workdir: Path, size: int, kind: str) -> list[list[str]]:
    """All operations on one generated context; rows for the table."""
    src = workdir / f"text-{kind}.txt"
    nbytes = generate(src, size, kind)
    root = workdir / "contexts"
    store = ContextStore(root)
    rows: list[list[str]] = []
    label = f"{_human(size)} {kind}"

    def row(op: str, fn: Callable[[], object], mb: float | None = None) -> object:
        dt, peak, after, result = _measure(fn)
        tput = f"{mb / dt:,.0f}" if mb else ""
        rows.append([label, op, f"{dt:.3f}", tput, f"{peak:,.1f}", f"{after:,.1f}"])
        return result

    mb = nbytes / MiB
    res = row("put_path (file)", lambda: store.put_path("ctx", src), mb)
    chars = res.chars  # type: ignore[attr-defined]
    src.unlink()  # only the store's copy from here on
    row("reopen store + info", lambda: ContextStore(root).info("ctx"))
    rng = random.Random(1)
    offsets = [rng.randrange(chars - 1000) for _ in range(200)]

    def peeks() -> None:
        for o in offsets:
            store.peek("ctx", o, o + 1000)

    dt, peak, after, _ = _measure(peeks)
    rows.append([label, "peek 1000 chars (mean of 200)", f"{dt / 200:.6f}", "",
                 f"{peak:,.1f}", f"{after:,.1f}"])  # fmt: skip
    row("peek 1 MiB chars at 50 %", lambda: store.peek("ctx", chars // 2, chars // 2 + MiB))
    found = row(
        "search literal 'NEEDLE-7f3a' (full scan)", lambda: store.search("ctx", "NEEDLE-7f3a"), mb
    )
    assert len(found) == 1, found  # type: ignore[arg-type]
    row("search r'ERROR 99\\d: code\\d+' (full scan)",
        lambda: store.search("ctx", r"ERROR 99\d: code\d+", 10_000), mb)  # fmt: skip
    row("search r'\\bomega\\b' first 100", lambda: store.search("ctx", r"\bomega\b", 100))
    row("append 1 line (copies the text)", lambda: store.put_text("ctx", "tail\n", append=True), mb)
    row("drop", lambda: store.drop("ctx"))
    shutil.rmtree(root, ignore_errors=True)
    return rows


def run(sizes: list[str] | list[int] = ("100M", "1G"), kinds: list[str] | None = None,
        workdir: str | None = None) -> str:  # fmt: skip
    """Benchmark each size (and kind); return a Markdown table."""
    kinds = kinds or ["ascii", "utf8"]
    header = ["context", "operation", "wall s", "MB/s", "RSS peak rise MiB", "RSS after MiB"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for size in sizes:
        n = parse_size(size) if isinstance(size, str) else size
        for kind in kinds:
            tmp = Path(tempfile.mkdtemp(prefix="rlmd-bench-store-", dir=workdir))
            try:
                for r in bench_one(tmp, n, kind):
                    lines.append("| " + " | ".join(r) + " |")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    note = "" if _reset_peak() else "\n(VmHWM could not be reset: peaks are process-wide)\n"
    return "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100M,1G", help="comma-separated, e.g. 100M,1G")
    ap.add_argument("--kinds", default="ascii,utf8", help="ascii and/or utf8")
    ap.add_argument("--dir", default=None, help="where to put the temporary files")
    args = ap.parse_args(argv)
    print(f"rlmd context store benchmark (python {sys.version.split()[0]}, pid {os.getpid()})\n")
    print(run(args.sizes.split(","), args.kinds.split(","), args.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
