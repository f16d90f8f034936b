"""The improvement cycle end to end: a real daemon over its socket, the scripted root
model on loopback, and real git repositories in temp dirs.  What matters is the gates:
nothing reaches the repository before ``improve/approve``, and only the working tree then.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlmd.client import RpcError
from rlmd.improve.patch import PatchError, extract_diff, touched_paths
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

ROOT = "root-model"
SUB = "sub-model"
F = "```"
PY = sys.executable

BUGGY = "def add(a, b):\n    return a - b\n"
TEST = "from calc import add\nassert add(2, 3) == 5, 'add(2, 3) != 5'\nprint('ok: add works')\n"

WRONG = """diff --git a/calc.py b/calc.py
--- a/calc.py
+++ b/calc.py
@@ -1,2 +1,2 @@
 def add(a, b):
-    return a - b
+    return a * b
"""
RIGHT = WRONG.replace("a * b", "a + b")


def as_final_var(diff: str) -> str:
    return f"I will propose a patch.\n{F}repl\npatch = {diff!r}\nFINAL_VAR('patch')\n{F}\n"


def as_fenced(diff: str) -> str:
    return f"FINAL(Here is the change:\n{F}diff\n{diff}{F}\n)\n"


class Root:
    """The scripted root model: (regex over the whole conversation, reply), first match."""

    def __init__(self) -> None:
        self.rules: list[tuple[str, str]] = []
        self.seen: list[str] = []

    def __call__(self, call: ChatCall) -> ScriptedReply | None:
        text = "\n".join(m.content for m in call.messages if m.role == "user")
        self.seen.append(call.last_user)
        for pattern, reply in self.rules:
            if re.search(pattern, text, re.S):
                return ScriptedReply(text=reply)
        return ScriptedReply(text="FINAL(no idea)")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    (r / "calc.py").write_text(BUGGY)
    (r / "test_calc.py").write_text(TEST)
    (r / ".gitignore").write_text("__pycache__/\n")
    git(r, "init", "-q", "-b", "main")
    git(r, "-c", "user.email=t@e", "-c", "user.name=t", "add", ".")
    git(r, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "init")
    return r


def state_of(repo: Path) -> tuple[str, str, str, dict[str, bytes]]:
    files = {
        str(p.relative_to(repo)): p.read_bytes()
        for p in repo.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(repo).parts
    }
    return (
        git(repo, "rev-parse", "HEAD"),
        git(repo, "status", "--porcelain", "--ignored"),
        git(repo, "branch", "--list") + git(repo, "worktree", "list", "--porcelain"),
        files,
    )


EXTRA = """
[limits]
cell_timeout_s = 10

[pool]
retries = 1
backoff_base_s = 0.01

[cache]
enabled = false

[improve]
test_timeout_s = {timeout}
"""


@pytest.fixture
def root() -> Root:
    return Root()


@pytest.fixture
def served(make_daemon, scripted_config, root, request):
    timeout = getattr(request, "param", 60)
    with ScriptedServer(responder=root, models=[ROOT, SUB]) as srv:
        d = make_daemon(
            scripted_config(srv.url, EXTRA.format(timeout=timeout), root=ROOT, sub=SUB),
            env={"RLMD_TEST_SECRET": "s3cr3t-value-do-not-leak"},
        )
        yield d


def call(d, method: str, params: dict, events: list | None = None):
    with d.client(timeout=120) as c:
        return c.call(method, params, on_event=events.append if events is not None else None)


def start(d, repo: Path, events: list | None = None, **kw) -> dict:
    params = {"repo": str(repo), "goal": "fix add()", "test_command": f"{PY} test_calc.py", **kw}
    return call(d, "improve/start", params, events)


# ----------------------------------------------------------------------------- the cycle


def test_wrong_patch_then_right_one_reaches_the_gate_at_round_2(served, root, repo):
    root.rules = [(r"Round 1 failed", as_fenced(RIGHT)), (r"round 1 of", as_final_var(WRONG))]
    before = state_of(repo)
    events: list[dict] = []
    res = start(served, repo, events, job="fix-1")
    assert res["state"] == "awaiting_approval" and res["round"] == 2
    assert res["tests"]["passed"] is True and "ok: add works" in res["tests"]["output"]
    assert res["files"] == ["calc.py"] and "a + b" in res["diff"]
    # The failing output of round 1 went back to the model as round 2's evidence.
    assert any("add(2, 3) != 5" in s for s in root.seen)
    kinds = [e["kind"] for e in events]
    assert {"phase", "proposal", "test"} <= set(kinds) and kinds[-1] == "final"
    assert [e["passed"] for e in events if e["kind"] == "test"] == [False, True]
    assert [e["seq"] for e in events] == list(range(len(events)))
    # Nothing touched the repository: contents, status, HEAD, branches, worktrees.
    assert state_of(repo) == before
    assert not list((served.state_dir / "tmp").glob("improve-*"))

    applied = call(served, "improve/approve", {"job": "fix-1"})
    assert applied == {"state": "applied", "job": "fix-1", "files": ["calc.py"]}
    assert (repo / "calc.py").read_text() == BUGGY.replace("a - b", "a + b")
    head, status, branches, _ = state_of(repo)
    assert head == before[0] and branches == before[2]  # nothing committed
    assert status.splitlines() == [" M calc.py"]  # in the working tree only, unstaged
    assert subprocess.run([PY, "test_calc.py"], cwd=repo).returncode == 0

    rec = call(served, "improve/show", {"job": "fix-1"})
    assert rec["state"] == "applied" and len(rec["rounds"]) == 2
    assert (
        rec["rounds"][0]["tests"]["passed"] is False and rec["decisions"][0]["state"] == "applied"
    )
    assert rec["decisions"][0]["at"] > 0
    listed = call(served, "improve/list", {})["cycles"]
    assert [c["job"] for c in listed] == ["fix-1"] and listed[0]["state"] == "applied"
    # Approving twice is refused with a reason.
    with pytest.raises(RpcError) as err:
        call(served, "improve/approve", {"job": "fix-1"})
    assert err.value.kind == "wrong_state"


def test_reject_leaves_no_trace(served, root, repo):
    root.rules = [(r"round 1 of", as_fenced(RIGHT))]
    before = state_of(repo)
    res = start(served, repo, job="r1")
    assert res["state"] == "awaiting_approval" and res["round"] == 1
    out = call(served, "improve/reject", {"job": "r1"})
    assert out["state"] == "rejected"
    assert state_of(repo) == before
    assert not list((served.state_dir / "tmp").glob("improve-*"))
    assert git(repo, "stash", "list") == ""
    rec = call(served, "improve/show", {"job": "r1"})
    assert rec["state"] == "rejected" and rec["decisions"][-1]["state"] == "rejected"
    with pytest.raises(RpcError) as err:
        call(served, "improve/approve", {"job": "r1"})
    assert err.value.kind == "wrong_state"


def test_reject_with_feedback_runs_the_next_round_with_it(served, root, repo):
    root.rules = [
        (r"use a plus sign please", as_fenced(RIGHT)),
        (r"round 1 of", as_fenced(RIGHT.replace("a + b", "b + a"))),
    ]
    res = start(served, repo, job="fb")
    assert res["state"] == "awaiting_approval" and "b + a" in res["diff"]
    events: list[dict] = []
    nxt = call(
        served, "improve/reject", {"job": "fb", "feedback": "use a plus sign please"}, events
    )
    assert nxt["state"] == "awaiting_approval" and nxt["round"] == 2 and "a + b" in nxt["diff"]
    assert any(e["kind"] == "test" for e in events)
    rec = call(served, "improve/show", {"job": "fb"})
    assert rec["rounds"][0]["feedback"] == "use a plus sign please"


def test_a_not_found_answer_is_told_that_a_diff_is_wanted(served, root, repo):
    # Dogfooding with the embedded 1.5B model: the QA system prompt's "FINAL(not found)"
    # rule won over the goal in both rounds.  The question must say it is a writing task,
    # and a "not found" answer must come back saying a diff is wanted, not looked up.
    root.rules = [
        (r"nothing has to be found here", as_fenced(RIGHT)),
        (r"round 1 of", "FINAL(not found)"),
    ]
    res = start(served, repo, job="nf", max_rounds=2)
    assert res["state"] == "awaiting_approval" and res["round"] == 2, res
    assert "Never answer FINAL(not found)" in root.seen[0]
    rec = call(served, "improve/show", {"job": "nf"})
    assert rec["rounds"][0]["answer"] == "not found"
    assert "nothing has to be found here" in rec["rounds"][0]["problem"]


def test_the_analysis_has_a_code_writing_system_prompt_and_skips_the_cache(
    make_daemon, scripted_config, repo
):
    # The QA system prompt ("FINAL(not found)" when the text has no answer) is what the
    # embedded model obeyed instead of the goal; and with the cache on, a retry of the same
    # goal got the same failed answer back without asking the model.
    systems: list[str] = []

    def responder(c: ChatCall) -> ScriptedReply:
        systems.append(next((m.content for m in c.messages if m.role == "system"), ""))
        if "You answer a question about a text" in systems[-1]:
            return ScriptedReply(text="FINAL(not found)")
        return ScriptedReply(text=as_fenced(RIGHT))

    cached = EXTRA.format(timeout=60).replace("[cache]\nenabled = false", "[cache]\nenabled = true")
    with ScriptedServer(responder=responder, models=[ROOT, SUB]) as srv:
        d = make_daemon(scripted_config(srv.url, cached, root=ROOT, sub=SUB))
        for job in ("c1", "c2"):
            res = start(d, repo, job=job, max_rounds=1)
            assert res["state"] == "awaiting_approval", res
            call(d, "improve/reject", {"job": job})
    assert len(systems) == 2 and all("You change code" in s for s in systems), systems


def test_a_small_model_analysing_a_repo_too_big_to_show_is_not_told_not_found(
    make_daemon, scripted_config, repo
):
    # In the paper's start (the files too long to show whole), the small model's system
    # prompt said "If the text does not hold the answer, write FINAL(not found)", which the
    # embedded model obeyed instead of the goal; the question-answering checks must not
    # judge a diff either.
    small = "tiny-coder-1.5b"
    systems: list[str] = []

    def responder(c: ChatCall) -> ScriptedReply:
        systems.append(next((m.content for m in c.messages if m.role == "system"), ""))
        return ScriptedReply(text=as_fenced(RIGHT))

    extra = EXTRA.format(timeout=60) + "\n[engine]\ndirect_fraction = 0.0\n"
    with ScriptedServer(responder=responder, models=[small, SUB]) as srv:
        d = make_daemon(scripted_config(srv.url, extra, root=small, sub=SUB))
        res = start(d, repo, job="big1", max_rounds=1)
        assert res["state"] == "awaiting_approval", res
    assert systems and all("Python REPL" in s for s in systems), systems
    assert not any("not found" in s for s in systems), systems


@pytest.mark.parametrize(
    "bad",
    [
        RIGHT.replace("calc.py", "../outside.py"),
        RIGHT.replace("calc.py", ".git/config"),
        RIGHT.replace("a/calc.py", "/etc/passwd").replace("b/calc.py", "/etc/passwd"),
    ],
    ids=["dotdot", "dotgit", "absolute"],
)
def test_a_patch_that_escapes_the_repo_is_refused(served, root, repo, bad):
    root.rules = [(r"round 1 of", as_fenced(bad))]
    before = state_of(repo)
    events: list[dict] = []
    res = start(served, repo, events, job="esc", max_rounds=1)
    assert res["state"] == "failed" and "refused" in res["summary"]
    refused = [e for e in events if e["kind"] == "proposal"]
    assert refused and refused[0]["accepted"] is False
    assert not any(e["kind"] == "test" for e in events)  # never even tested
    assert state_of(repo) == before
    assert not (repo.parent / "outside.py").exists()


def test_a_symlink_leading_out_is_refused(tmp_path):
    repo = tmp_path / "r"
    (repo / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (repo / "link").symlink_to(outside)
    (repo / "inner").symlink_to(repo / "sub")
    ok = RIGHT.replace("calc.py", "inner/x.py")
    assert touched_paths(repo, ok) == ["inner/x.py"]  # a link that stays inside is fine
    with pytest.raises(PatchError, match="symlink"):
        touched_paths(repo, RIGHT.replace("calc.py", "link/x.py"))
    new_link = (
        "diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+/etc\n"
    )
    with pytest.raises(PatchError, match="symlink"):
        touched_paths(repo, new_link)


def test_extract_diff_finds_fenced_and_bare_diffs_and_says_what_is_missing():
    assert extract_diff(f"text\n{F}diff\n{RIGHT}{F}\nmore") == RIGHT
    assert extract_diff(RIGHT.rstrip("\n")) == RIGHT
    with pytest.raises(PatchError, match="unified diff"):
        extract_diff("I think you should change add to use plus.")


def test_extract_diff_takes_a_bare_fence_without_its_closing_line():
    # The embedded model's first real proposal: a diff in a bare ``` fence; the closing
    # fence went into the patch and `git apply` called it corrupt.
    assert extract_diff(f"{F}\n{RIGHT}{F}") == RIGHT
    assert extract_diff(f"{F}repl\nprint(1)\n{F}\nthen\n{F}\n{RIGHT}{F}\n") == RIGHT


@pytest.mark.parametrize("served", [2], indirect=True)
def test_a_hanging_test_command_is_killed(served, root, repo):
    root.rules = [(r"round 1 of", as_fenced(RIGHT))]
    marker = f"hang-{os.getpid()}-{time.monotonic_ns()}"
    t0 = time.monotonic()
    res = start(served, repo, job="hang", max_rounds=1, test_command=f"sleep 600 # {marker}")
    assert time.monotonic() - t0 < 30
    assert res["state"] == "failed"
    assert res["tests"]["timed_out"] is True and res["tests"]["passed"] is False
    assert "ran past its limit" in res["tests"]["output"]
    time.sleep(0.3)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps, "the hanging test command survived"
    assert not list((served.state_dir / "tmp").glob("improve-*"))


def test_approve_refuses_when_the_tree_changed_under_the_proposal(served, root, repo):
    root.rules = [(r"round 1 of", as_fenced(RIGHT))]
    res = start(served, repo, job="moved")
    assert res["state"] == "awaiting_approval"
    (repo / "test_calc.py").write_text(TEST + "# edited by the user meanwhile\n")
    (repo / "notes.txt").write_text("new")
    with pytest.raises(RpcError) as err:
        call(served, "improve/approve", {"job": "moved"})
    assert err.value.kind == "tree_changed"
    assert "test_calc.py changed" in err.value.message and "notes.txt appeared" in err.value.message
    assert (repo / "calc.py").read_text() == BUGGY  # nothing applied
    # Undoing the change makes the same proposal approvable again.
    (repo / "test_calc.py").write_text(TEST)
    (repo / "notes.txt").unlink()
    assert call(served, "improve/approve", {"job": "moved"})["state"] == "applied"


def test_the_test_command_sees_no_secret_and_no_network(served, root, repo):
    status = served.call("daemon/status")
    if not status["sandbox"].get("bwrap"):
        pytest.skip("bubblewrap does not run here")
    root.rules = [(r"round 1 of", as_fenced(RIGHT))]
    probe = repo / "probe.py"
    probe.write_text(
        "import os, socket\n"
        "print('ENV', sorted(os.environ))\n"
        "print('SECRET' , os.environ.get('RLMD_TEST_SECRET'))\n"
        "s = socket.socket()\n"
        "try:\n    s.connect(('127.0.0.1', 9)); print('NET open')\n"
        "except OSError as e:\n    print('NET blocked', e.errno)\n"
    )
    git(repo, "add", "probe.py")
    git(repo, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "probe")
    res = start(served, repo, job="env", max_rounds=1, test_command=f"{PY} probe.py")
    out = res["tests"]["output"]
    assert "SECRET None" in out and "s3cr3t" not in out
    assert "NET blocked" in out
    assert "bwrap" in res["tests"]["protection"]


def test_cancel_stops_a_cycle_and_removes_its_copy(served, root, repo):
    root.rules = [(r"round 1 of", as_fenced(RIGHT))]
    holder: dict = {}

    def run() -> None:
        try:
            holder["res"] = start(served, repo, job="cx", test_command="sleep 300")
        except RpcError as exc:
            holder["res"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list((served.state_dir / "tmp").glob("improve-*")):
        time.sleep(0.05)
    time.sleep(0.5)
    assert served.call("query/cancel", {"job": "cx"}) == {"cancelled": True}
    t.join(15)
    assert not t.is_alive()
    assert isinstance(holder["res"], RpcError) and holder["res"].kind == "cancelled"
    assert not list((served.state_dir / "tmp").glob("improve-*"))
    assert call(served, "improve/show", {"job": "cx"})["state"] == "failed"


def test_bad_requests_get_clear_errors(served, root, repo, tmp_path):
    plain = tmp_path / "not-a-repo"
    plain.mkdir()
    with pytest.raises(RpcError) as err:
        call(served, "improve/start", {"repo": str(plain), "goal": "x"})
    assert "not inside a git repository" in err.value.message
    with pytest.raises(RpcError) as err:
        call(served, "improve/start", {"repo": str(repo), "goal": "  "})
    assert "goal" in err.value.message
    with pytest.raises(RpcError) as err:
        call(served, "improve/approve", {"job": "nope"})
    assert err.value.kind == "not_found"
    with pytest.raises(RpcError):
        call(served, "improve/start", {"repo": str(repo), "goal": "x", "max_rounds": 99})


# ----------------------------------------------------------------------------- the CLI


def rlm_cli(d, *args: str, input: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "rlmd.cli.main", "--socket", str(d.socket), *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=input,
    )


def test_cli_shows_the_gate_and_applies_only_on_approve(served, root, repo):
    root.rules = [(r"Round 1 failed", as_fenced(RIGHT)), (r"round 1 of", as_fenced(WRONG))]
    test = f"{PY} test_calc.py"
    # Without a terminal it stops at the gate and says how to decide.
    r = rlm_cli(served, "improve", "-g", "fix add()", "--test", test, str(repo))
    assert r.returncode == 0, r.stderr
    assert "+    return a + b" in r.stdout and "tests passed" in r.stdout
    assert "round 1: tests failed" in r.stderr and "awaiting_approval" in r.stderr
    # The analysis query's own phases are named as such, not "round ?".
    assert "round ?" not in r.stderr and "analysis: prompt (" in r.stderr
    job = re.search(r"rlm improve approve (\S+)", r.stderr).group(1)
    assert (repo / "calc.py").read_text() == BUGGY
    log = rlm_cli(served, "improve", "log")
    assert job in log.stdout and "awaiting_approval" in log.stdout
    # Interactive: "r" rejects; nothing applied.
    r2 = rlm_cli(served, "improve", "reject", job)
    assert r2.returncode == 0 and "rejected" in r2.stdout
    assert (repo / "calc.py").read_text() == BUGGY
    # A new cycle, approved at the prompt.
    root.rules = [(r"round 1 of", as_fenced(RIGHT))]
    r3 = rlm_cli(
        served,
        "improve",
        "-g",
        "fix add()",
        "--test",
        test,
        "--interactive",
        str(repo),
        input="a\n",
    )
    assert r3.returncode == 0, r3.stderr
    assert "applied to the working tree (not committed): calc.py" in r3.stdout
    assert (repo / "calc.py").read_text() == BUGGY.replace("a - b", "a + b")


def test_a_test_command_under_tmp_runs(served, root, repo, short_tmp):
    """A CI clone and its virtualenv may live under /tmp: the sandbox must not hide it
    (a tmpfs over /tmp did: "/tmp/…/python: not found")."""
    tool = short_tmp / "tool.sh"
    tool.write_text('#!/bin/sh\necho "tool ran in $(pwd)"; echo tmp=$TMPDIR; touch "$TMPDIR/x"\n')
    tool.chmod(0o755)
    root.rules = [(r"round 1 of", as_fenced(RIGHT))]
    res = start(served, repo, job="undertmp", max_rounds=1, test_command=str(tool))
    assert res["state"] == "awaiting_approval", res["tests"]["output"]
    assert "tool ran in" in res["tests"]["output"]
    assert not list((served.state_dir / "tmp").glob("improve-*"))
