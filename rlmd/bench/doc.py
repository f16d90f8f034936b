"""Writing a run's report into ``docs/benchmarks.md``, so the document is produced by the
runner (``rlm bench ... --doc docs/benchmarks.md --doc-section NAME``), never by hand.

Each section sits between ``<!-- rlm-bench:NAME:start -->`` and ``<!-- rlm-bench:NAME:end -->``
markers and is replaced whole on the next run; sections of other names are kept.  The
section starts with the machine, the date and the command that reproduces it; plots are
copied next to the document (``img/``) and linked.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from rlmd.atomic import write_atomic


def machine() -> str:
    """One line describing this machine: CPU, cores, memory, OS, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at the end"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}{load}"
    )


def _demote(md: str, levels: int) -> str:
    out, fenced = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def section_text(name: str, report_md: str, command: str, plots: Sequence[Path], doc: Path) -> str:
    """The Markdown of one section, markers included."""
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"<!-- rlm-bench:{name}:start -->",
        f"## {name}",
        "",
        f"- machine: {machine()}",
        f"- date: {when}",
        f"- rerun: `{command}`",
        "",
        _demote(report_md.strip(), 2),
        "",
    ]
    img_dir = doc.parent / "img"
    for p in plots:
        img_dir.mkdir(parents=True, exist_ok=True)
        target = img_dir / f"{name}-{p.name}"
        shutil.copyfile(p, target)
        parts += [f"![{p.stem}](img/{target.name})", ""]
    parts.append(f"<!-- rlm-bench:{name}:end -->")
    return "\n".join(parts)


def update_doc(
    doc: Path, name: str, report_md: str, command: str, plots: Sequence[Path] = ()
) -> None:
    """Replace (or append) section ``name`` of ``doc`` with this run's report."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(
            f"--doc-section must be a simple name (letters, digits, -_.), got {name!r}"
        )
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    new = section_text(name, report_md, command, plots, doc)
    pattern = re.compile(
        rf"<!-- rlm-bench:{re.escape(name)}:start -->.*?<!-- rlm-bench:{re.escape(name)}:end -->",
        re.S,
    )
    if pattern.search(text):
        text = pattern.sub(lambda _m: new, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    write_atomic(doc, text.encode("utf-8"))
