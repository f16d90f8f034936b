"""The ``rlm bench`` runner: resume bookkeeping, reports, perf scripts, and end to end
through a real daemon whose models are a scripted loopback server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from rlmd.bench import BenchError, make_tasks
from rlmd.bench.report import Result, markdown, plot, summarize, summarize_kinds
from rlmd.bench.runner import (
    BenchOptions,
    Progress,
    append_result,
    check_settings,
    latest_by_key,
    load_results,
    main,
    parse_options,
    pending,
    run_perf,
    write_outputs,
)
from rlmd.bench.scoring import score


def _result(task_id: str, method: str, score: float, length: int = 8192, **kw) -> Result:
    return Result(
        task_id=task_id,
        suite=kw.pop("suite", "sniah"),
        method=method,
        length_tokens=length,
        score=score,
        **kw,
    )


# ---------------------------------------------------------------- resume bookkeeping


def test_results_file_survives_a_torn_last_line_and_resume_skips_done(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    append_result(path, _result("t0", "rlm", 1.0))
    append_result(path, _result("t0", "base", 0.0, error="boom", error_kind="timeout"))
    # A run killed mid-write leaves half a line.
    with open(path, "ab") as f:
        f.write(b'{"task_id": "t1", "suite": "sni')
    assert [r.task_id for r in load_results(path)] == ["t0", "t0"]
    # The next append starts on a fresh line, so both it and the old lines stay readable.
    append_result(path, _result("t1", "rlm", 0.5))
    got = load_results(path)
    assert [(r.task_id, r.method) for r in got] == [("t0", "rlm"), ("t0", "base"), ("t1", "rlm")]

    task = next(iter(make_tasks("sniah", [8192], 1)))
    done = latest_by_key([_result(task.id, "rlm", 1.0), _result(task.id, "base", 0.0, error="x")])
    methods = ["base", "rlm", "rlm-nosub"]
    assert pending(task, methods, done, retry_errors=False) == ["rlm-nosub"]
    assert pending(task, methods, done, retry_errors=True) == ["base", "rlm-nosub"]


def test_a_later_result_for_the_same_task_and_method_wins(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    append_result(path, _result("t0", "base", 0.0, error="timeout"))
    append_result(path, _result("t0", "base", 1.0))
    latest = latest_by_key(load_results(path))
    assert latest[("t0", "base")].score == 1.0 and latest[("t0", "base")].error is None


def test_resuming_with_other_answer_settings_is_refused(tmp_path: Path):
    opts = parse_options(["--out", str(tmp_path), "--timeout", "60"])
    check_settings(opts)
    check_settings(opts)  # the same settings resume fine
    other = parse_options(["--out", str(tmp_path), "--timeout", "90", "--root-model", "m"])
    with pytest.raises(BenchError, match=r"timeout_s: 60\.0 then, 90\.0 now; root_model"):
        check_settings(other)


# ---------------------------------------------------------------- options


def test_options_defaults_and_errors(tmp_path: Path, capsys):
    o = parse_options(["--suite", "sniah,oolong", "--lengths", "8k,1m", "--n", "3", "--seed", "4"])
    assert o.suites == ["sniah", "oolong"] and o.lengths == [8192, 1 << 20]
    assert o.methods == ["base", "rlm", "rlm-nosub"] and o.n == 3
    assert o.out == Path("bench-results/sniah+oolong-s4")
    assert main(["--suite", "nope"]) == 2
    assert "unknown suite nope; choose from sniah" in capsys.readouterr().err
    assert main(["--methods", "rlm,magic"]) == 2
    assert "unknown method magic" in capsys.readouterr().err
    assert main(["--lengths", "lots"]) == 2
    assert "bad context length 'lots'" in capsys.readouterr().err


def test_no_daemon_is_a_clear_error(tmp_path: Path, capsys):
    sock = tmp_path / "none.sock"
    rc = main(
        ["--socket", str(sock), "--out", str(tmp_path / "out"), "--n", "1", "--lengths", "8k"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"no daemon answers on {sock}" in err and "start it with `rlmd`" in err


def test_export_writes_tasks_and_shared_contexts_without_a_daemon(tmp_path: Path):
    out = tmp_path / "exp"
    argv = ["--suite", "oolong,sniah", "--lengths", "8k", "--n", "5", "--export", str(out)]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and "context" not in rows[0]
    expected = {t.id: t for s in ("oolong", "sniah") for t in make_tasks(s, [8192], 5)}
    for row in rows:
        task = expected[row["id"]]
        assert row["gold"] == task.gold and row["question"] == task.question
        assert (out / row["context_file"]).read_text() == task.context
    # Five oolong questions share two windows.
    assert len({r["context_file"] for r in rows if r["suite"] == "oolong"}) == 2


# ---------------------------------------------------------------- report


def _sample_results() -> list[Result]:
    rs = []
    for length in (8192, 65536):
        for i in range(4):
            rs.append(
                _result(
                    f"a{length}-{i}",
                    "base",
                    1.0 if length == 8192 else 0.0,
                    length,
                    tokens_in=length,
                    cost=0.001,
                )
            )
            rs.append(
                _result(
                    f"a{length}-{i}",
                    "rlm",
                    1.0 if i < 3 else 0.5,
                    length,
                    tokens_in=2000 + i,
                    tokens_out=100,
                    sub_calls=i,
                    wall_s=float(i),
                )
            )
    rs.append(_result("p0", "rlm", 0.8, suite="pairs"))
    return rs  # fmt: skip


def test_summary_means_medians_and_markdown_table():
    rows = summarize(_sample_results())
    by = {(r.suite, r.method, r.length_tokens): r for r in rows}
    rlm = by[("sniah", "rlm", 65536)]
    assert rlm.n == 4 and rlm.score.mean == pytest.approx(0.875) and rlm.score.median == 1.0
    assert rlm.sub_calls.mean == 1.5 and rlm.tokens_in.median == 2001.5
    assert by[("sniah", "base", 65536)].score.mean == 0.0
    md = markdown(rows, {"command": "rlm bench --suite sniah", "seed": 0})
    assert "## sniah" in md and "## pairs" in md and "Mean F1" in md
    # The Table-1 row for rlm: 8k then 64k.
    assert re.search(r"^\| rlm \| 0\.875 \(4\) \| 0\.875 \(4\) \|$", md, re.M)
    assert re.search(r"^\| base \| 1\.000 \(4\) \| 0\.000 \(4\) \|$", md, re.M)
    sniah = md.split("## sniah", 1)[1]
    assert sniah.index("| base |") < sniah.index("| rlm |")
    assert "by kind of question" not in md  # no kinds recorded


def test_report_breaks_scores_down_by_question_kind():
    rs = [
        _result("o1", "rlm", 1.0, suite="oolong", task_kind="count"),
        _result("o2", "rlm", 0.5, suite="oolong", task_kind="count"),
        _result("o3", "rlm", 0.0, suite="oolong", task_kind="most"),
        _result("o1", "base", 0.25, suite="oolong", task_kind="count"),
    ]
    kinds = summarize_kinds(rs)
    md = markdown(summarize(rs), {}, kinds=kinds)
    assert "| method | count | most |" in md
    assert "| rlm | 0.750 (2) | 0.000 (1) |" in md
    assert "| base | 0.250 (1) | – |" in md


def test_plot_writes_a_png_or_says_why_not(tmp_path: Path):
    files, note = plot(summarize(_sample_results()), tmp_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert files == [] and "matplotlib is not installed" in note
        return
    assert note is None
    assert sorted(p.name for p in files) == ["accuracy-pairs.png", "accuracy-sniah.png"]
    for p in files:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_write_outputs_uses_only_this_runs_cells(tmp_path: Path):
    path = tmp_path / "results.jsonl"
    for r in _sample_results():
        append_result(path, r)
    append_result(path, _result("x", "rlm-nosub", 1.0))  # a method this run did not ask for
    opts = BenchOptions(suites=["sniah"], lengths=[8192, 65536], n=4, methods=["base", "rlm"],
                        out=tmp_path)  # fmt: skip
    out_json, report, _, _ = write_outputs(opts, path, {"seed": 0}, None)
    data = json.loads(out_json.read_text())
    assert {r["method"] for r in data["results"]} == {"base", "rlm"}
    assert {r["suite"] for r in data["summary"]} == {"sniah"}
    assert len(data["results"]) == 16
    assert "rlm-nosub" not in report.read_text()


# ---------------------------------------------------------------- perf scripts


def test_perf_scripts_are_imported_by_path_and_failures_are_reported(tmp_path: Path, capsys):
    (tmp_path / "bench_a.py").write_text(
        "def run(quick=False):\n    return f'# A\\n| x | quick={quick} |'\n"
    )
    (tmp_path / "bench_c.py").write_text("def run(sizes):\n    return 'never'\n")
    (tmp_path / "bench_b.py").write_text("def run():\n    raise RuntimeError('no GPU')\n")
    (tmp_path / "helper.py").write_text("raise SystemExit('must not be imported')\n")
    import sys

    md = run_perf(tmp_path, True, Progress(0, sys.stderr))
    assert "## bench_a" in md and "| x | quick=True |" in md
    assert "## bench_b" in md and "RuntimeError: no GPU" in md
    assert "\n## A\n" in md  # the script's own heading is nested under its section
    assert "run() of bench_c.py needs arguments (sizes); give them defaults" in md
    assert "helper" not in md
    out = tmp_path / "out"
    rc = main(["--suite", "perf", "--perf-dir", str(tmp_path), "--out", str(out)])
    assert rc == 0
    assert "| x | quick=False |" in (out / "report.md").read_text()
    assert (out / "perf.md").exists()
    assert msgspec.json.decode((out / "results.json").read_bytes())["perf"].startswith("# perf")


# ---------------------------------------------------------------- end to end

_NEEDLE_Q = re.compile(r"special magic (\w+) for ([\w-]+) mentioned")


def _responder(call):
    """A scripted model that solves S-NIAH: with code in the REPL loop, by reading in base.

    The RLM root gets a ```repl block that searches ``context``; a prompt that carries the
    text itself (base mode) is answered from what it can see, so a needle cut off by
    truncation is missed, as a real model would miss it.
    """
    from rlmd.testing.scripted_server import ScriptedReply

    text = "\n".join(m.content for m in call.messages)
    q = _NEEDLE_Q.search(text)
    if not q:
        return ScriptedReply(text="FINAL(Answer: 3)", delay_s=0.1)
    key = q.group(2)
    if "repl" in call.system.lower():
        code = (
            "import re\n"
            f'm = re.search(r"for {key} is: (\\S+?)\\. ", context)\n'
            'FINAL(m.group(1) if m else "none")\n'
        )
        return ScriptedReply(text=f"```repl\n{code}```\n", delay_s=0.1)
    m = re.search(rf"for {re.escape(key)} is: (\S+?)\. ", text)
    return ScriptedReply(text=m.group(1) if m else "I could not find it.", delay_s=0.1)


@pytest.fixture
def scripted_daemon(make_daemon):
    from rlmd.testing.scripted_server import ScriptedServer

    with ScriptedServer([], responder=_responder) as srv:
        config = (
            "[[providers]]\n"
            'name = "scripted"\nkind = "openai"\n'
            f'base_url = "{srv.url}/v1"\n'
            'models = ["scripted-7b"]\ncapacity = 2\n'
            '[models]\nroot = "scripted-7b"\nsub = "scripted-7b"\n'
        )
        yield make_daemon(config), srv


def test_end_to_end_through_the_daemon_with_resume(scripted_daemon, tmp_path: Path, capsys):
    daemon, srv = scripted_daemon
    out = tmp_path / "out"
    argv = ["--socket", str(daemon.socket), "--out", str(out), "--suite", "sniah,oolong",
            "--lengths", "8k,16k", "--n", "2", "--methods", "rlm", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[8/8] oolong 16k rlm" in err and f"report:  {out / 'report.md'}" in err
    results = load_results(out / "results.jsonl")
    assert len(results) == 8 and not [r for r in results if r.error]
    for r in results:
        assert r.tokens_in > 0 and r.iterations >= 1 and r.root_model == "scripted-7b"
        if r.suite == "sniah":
            assert r.score == 1.0, r  # the scripted REPL code finds every needle
        else:
            assert r.answer == "Answer: 3"
            assert r.score == score(r.scorer, r.answer, r.gold) < 1.0
    calls = len(srv.calls)
    assert calls == 8
    # Contexts were dropped after use.
    assert not [c for c in daemon.call("context/list") if c["name"].startswith("bench-")]

    # A rerun resumes: nothing left to do, no model call made, the report is rewritten.
    (out / "report.md").unlink()
    assert main(argv) == 0
    assert len(srv.calls) == calls and len(load_results(out / "results.jsonl")) == 8
    report = (out / "report.md").read_text()
    assert re.search(r"^\| rlm \| 1\.000 \(2\) \| 1\.000 \(2\) \|$", report, re.M)
    assert "## oolong" in report

    # An interrupted run (the last two results lost) redoes exactly those two.
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:-2]))
    assert main(argv) == 0
    assert len(srv.calls) == calls + 2
    again = load_results(out / "results.jsonl")
    assert [(r.task_id, r.method) for r in again] == [(r.task_id, r.method) for r in results]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {(s["suite"], s["length_tokens"]) for s in summary} == {
        (s, n) for s in ("sniah", "oolong") for n in (8192, 16384)
    }


def test_parallel_run_overlaps_queries_and_shares_windows(scripted_daemon, tmp_path: Path):
    daemon, srv = scripted_daemon
    out = tmp_path / "out"
    argv = ["--socket", str(daemon.socket), "--out", str(out), "--suite", "oolong,sniah",
            "--lengths", "8k", "--n", "6", "--methods", "rlm", "--parallel", "3"]  # fmt: skip
    assert main(argv) == 0
    results = load_results(out / "results.jsonl")
    assert len(results) == 12 and not [r for r in results if r.error]
    assert sorted(r.task_id for r in results) == sorted(
        t.id for s in ("oolong", "sniah") for t in make_tasks(s, [8192], 6)
    )
    assert all(r.score == 1.0 for r in results if r.suite == "sniah")
    assert srv.max_concurrent >= 2
    # Every context (two shared OOLONG windows, six haystacks) was dropped after use.
    assert not [c for c in daemon.call("context/list") if c["name"].startswith("bench-")]


def test_methods_compared_on_the_same_tasks(scripted_daemon, tmp_path: Path):
    daemon, srv = scripted_daemon
    out = tmp_path / "out"
    argv = ["--socket", str(daemon.socket), "--out", str(out), "--suite", "sniah",
            "--lengths", "8k,64k", "--n", "3", "--methods", "base,rlm,rlm-nosub",
            "--base-window", "32768", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    results = load_results(out / "results.jsonl")
    assert len(results) == 18 and not [r for r in results if r.error]
    by = {(r.task_id, r.method): r for r in results}
    tasks = list(make_tasks("sniah", [8192, 65536], 3))
    for t in tasks:
        # The scripted REPL code finds every needle, with or without sub-calls.
        assert by[(t.id, "rlm")].score == by[(t.id, "rlm-nosub")].score == 1.0
        assert by[(t.id, "rlm-nosub")].sub_calls == 0
        base = by[(t.id, "base")]
        assert base.iterations <= 1 and base.sub_calls == 0
        if t.length_tokens == 8192 or t.meta["depth"] == 0.0:
            assert base.score == 1.0, t.id  # the needle is inside the window
        elif t.meta["depth"] >= 0.7:
            assert base.score == 0.0, t.id  # cut off with the rest of the text
    # base puts the text itself in the prompt: one call per task, no REPL.
    base_calls = [c for c in srv.calls if "repl" not in c.system.lower()]
    assert len(base_calls) == 6
    assert all("special magic" in c.last_user for c in base_calls)
    assert max(len(c.last_user) for c in base_calls) < 32768 * 4
    report = (out / "report.md").read_text()
    assert re.search(r"^\| rlm-nosub \| 1\.000 \(3\) \| 1\.000 \(3\) \|$", report, re.M)
    assert re.search(r"^\| base \| 1\.000 \(3\) \| 0\.\d+ \(3\) \|$", report, re.M)
