"""Search index candidates side by side: build time (and its ratio to a put), size, memory,
word lookup time, on one generated haystack (``bench_search.generate``).

    python bench/bench_index_build.py [--size 256M] [--only numpy,fts5,...]
                                      [--extra-path DIR] [--doc docs/benchmarks.md]

What each candidate builds is what the daemon needs (``rlmd/search/index.py``): for each
word, the blocks (~64 KiB of whole lines, ``ranked.block_ends``) that hold it.  The put
is ``ContextStore.put_path`` (what ``context/put`` by path runs), timed in the same run.
Each build runs in its own process, one at a time; its peak RSS is the largest process of
that build (``wait4``).  The lookup is the median over five query words of "blocks
holding this word" once built.

Candidates: ``numpy`` (ours, 1 and 2 worker processes); ``fts5`` (the previous index: a
contentless ``detail=none`` SQLite FTS5 table, one row per block, then ``optimize``);
``fts5-tuned`` (the same with automerge off, a large ``crisismerge``, 8 KiB pages, a big
cache and no ``optimize``); ``fts5-1m`` (rows of 1 MiB, so 16x fewer, coarser units);
``tantivy`` (``index_option="basic"``: which documents hold a word; 1 and 2 writer
threads, 200 MB heap); ``bm25s`` (its own tokenizer, one document per block).  tantivy
and bm25s are not dependencies: install them into a directory and pass it as
``--extra-path`` (appended to ``sys.path``, after the venv's own packages).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import generate
from bench_store import parse_size

from rlmd.bench.doc import machine, update_doc

WORDS = ["zephyr", "aurora", "special", "magic", "number"]
CANDIDATES = [
    "numpy",
    "numpy-2w",
    "fts5",
    "fts5-tuned",
    "fts5-1m",
    "tantivy",
    "tantivy-2t",
    "bm25s",
]


def _blocks(buf, size: int):
    from rlmd.search.ranked import block_ends

    s = 0
    for e in block_ends(buf):
        yield buf[s:e]
        s = e


def _fts5(text: Path, out: Path, variant: str) -> object:
    import mmap
    import sqlite3

    with open(text, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    db = sqlite3.connect(out)
    db.execute("pragma journal_mode=off")
    db.execute("pragma synchronous=off")
    if variant == "fts5-tuned":
        db.execute("pragma cache_size=-262144")
        db.execute("pragma page_size=8192")
    db.execute(
        "create virtual table p using fts5(t, tokenize='ascii', content='', "
        "columnsize=0, detail=none)"
    )
    db.execute("create virtual table v using fts5vocab(p, row)")
    if variant == "fts5-tuned":
        db.execute("insert into p(p, rank) values ('automerge', 0)")
        db.execute("insert into p(p, rank) values ('crisismerge', 2000)")
        db.execute("insert into p(p, rank) values ('pgsz', 8000)")
    if variant == "fts5-1m":
        from rlmd.search.ranked import block_ends

        def rows():
            s, i = 0, 0
            for e in block_ends(buf):
                if e - s >= 1 << 20 or e == len(buf):
                    i += 1
                    yield i, buf[s:e].decode("utf-8", "replace")
                    s = e
    else:

        def rows():
            for i, b in enumerate(_blocks(buf, len(buf)), 1):
                yield i, b.decode("utf-8", "replace")

    db.executemany("insert into p(rowid, t) values (?, ?)", rows())
    db.commit()
    if variant != "fts5-tuned":
        db.execute("insert into p(p) values ('optimize')")
        db.commit()

    def lookup(w: str) -> int:
        q = '"' + w + '"'
        return len(db.execute("select rowid from p where p match ?", (q,)).fetchall())

    return lookup


def _numpy(text: Path, out: Path, workers: int) -> object:
    from rlmd.search.index import SearchIndex, build

    build(text, out, workers=workers)
    index = SearchIndex(out, text.stat().st_size)
    return lambda w: len(index.blocks_with(w.encode()))


def _tantivy(text: Path, out: Path, threads: int) -> object:
    import mmap

    import tantivy

    out.mkdir()
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("t", stored=False, index_option="basic")
    index = tantivy.Index(sb.build(), path=str(out))
    with open(text, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    w = index.writer(heap_size=200_000_000, num_threads=threads)
    for b in _blocks(buf, len(buf)):
        w.add_document(tantivy.Document(t=b.decode("utf-8", "replace")))
    w.commit()
    w.wait_merging_threads()
    index.reload()
    searcher = index.searcher()

    def lookup(word: str) -> int:
        return searcher.search(index.parse_query(word, ["t"]), 1_000_000).count

    return lookup


def _bm25s(text: Path, out: Path) -> object:
    import mmap

    import bm25s

    with open(text, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    docs = [b.decode("utf-8", "replace") for b in _blocks(buf, len(buf))]
    tokens = bm25s.tokenize(docs, stopwords=None, show_progress=False)
    del docs
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    retriever.save(str(out))

    def lookup(word: str) -> int:
        q = bm25s.tokenize([word], stopwords=None, show_progress=False)
        res, _ = retriever.retrieve(q, k=10, show_progress=False)
        return len(res[0])

    return lookup


def one(name: str, text: Path, out: Path) -> dict:
    """Build candidate ``name`` (in this process) and time its lookups."""
    t = time.perf_counter()
    if name.startswith("numpy"):
        lookup = _numpy(text, out, 2 if name == "numpy-2w" else 1)
    elif name.startswith("fts5"):
        lookup = _fts5(text, out, name)
    elif name.startswith("tantivy"):
        lookup = _tantivy(text, out, 2 if name == "tantivy-2t" else 1)
    elif name == "bm25s":
        lookup = _bm25s(text, out)
    else:
        raise SystemExit(f"unknown candidate {name!r}")
    build_s = time.perf_counter() - t
    lat, found = [], []
    for w in WORDS:
        t = time.perf_counter()
        found.append(lookup(w))
        lat.append(time.perf_counter() - t)
    size = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
    return {"build_s": build_s, "bytes": size, "lookup_s": statistics.median(lat),
            "found": found}  # fmt: skip


def _versions(extra: list[str]) -> str:
    import sqlite3
    from importlib.metadata import PackageNotFoundError, version

    out = [f"SQLite {sqlite3.sqlite_version}"]
    for pkg in ("numpy", "tantivy", "bm25s"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} not installed")
    if extra:
        out.append("tantivy and bm25s from a scratch directory (`--extra-path`), not dependencies")
    return ", ".join(out)


def run(size_label: str, only: list[str], extra: list[str]) -> str:
    size = parse_size(size_label)
    with tempfile.TemporaryDirectory(prefix="rlmd-bib-", dir="/tmp") as tmp:
        root = Path(tmp)
        src = root / "haystack.txt"
        nbytes = generate(src, size)
        from rlmd.store import ContextStore

        store = ContextStore(root / "store", search_index_min_bytes=None)
        t = time.perf_counter()
        store.put_path("h", src)
        put_s = time.perf_counter() - t
        store.close()
        text = next((root / "store").glob("*/*.txt"))
        src.unlink()
        rows = []
        for name in only:
            out = root / f"idx-{name}"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:2])}
            argv = [sys.executable, __file__, "--one", name, str(text), str(out)]
            argv += [a for p in extra for a in ("--extra-path", p)]
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE)
            raw = proc.stdout.read() if proc.stdout else b""
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                rows.append(f"| {name} | failed (status {status}) | | | | | |")
                continue
            r = json.loads(raw)
            rows.append(
                f"| {name} | {r['build_s']:.1f} s | {nbytes / r['build_s'] / 1e6:.0f} MB/s "
                f"| {r['build_s'] / put_s:.1f}x | {r['bytes'] / 2**20:.0f} MiB "
                f"| {usage.ru_maxrss / 1024:.0f} MiB | {r['lookup_s'] * 1000:.2f} ms |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
            subprocess.run(["rm", "-rf", str(out)], check=False)
    return "\n".join(
        [
            f"Text: {nbytes / 2**20:,.0f} MiB generated haystack (`--size {size_label}`), "
            f"put by path {put_s:.2f} s ({nbytes / put_s / 1e6:.0f} MB/s); "
            f"machine: {machine()}.",
            "",
            "| candidate | build | speed | build / put | index | peak RSS | word lookup |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"Versions: {_versions(extra)}. Peak RSS: the build's largest process, pages of "
            "the text it mapped included. The put is `ContextStore.put_path` in this process "
            "(through the daemon's socket it takes longer; see search-1G).",
        ]
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256M")
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--extra-path", action="append", default=[])
    ap.add_argument("--one", nargs=3, metavar=("NAME", "TEXT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--doc", type=Path, help="write the report into this Markdown file")
    a = ap.parse_args()
    sys.path.extend(a.extra_path)
    if a.one:
        print(json.dumps(one(a.one[0], Path(a.one[1]), Path(a.one[2]))))
        raise SystemExit(0)
    report = run(a.size, a.only.split(","), a.extra_path)
    print(report)
    if a.doc:
        cmd = f"python bench/bench_index_build.py --size {a.size} --only {a.only}"
        update_doc(a.doc, f"search-index-candidates-{a.size}", report, cmd)
