"""The cycle: Analysis -> Improvement -> Testing -> Iteration, stopping at a person's gate.

Each round reads the repository (or its ``paths``) as a directory context, asks the root
model for a unified diff with the goal as the question, refuses a diff that escapes the
repository, applies it in a disposable copy, and runs the test (and benchmark) command
there under the REPL workers' protection.  A failing round goes back to the model as the
next round's evidence; a passing one waits at the gate (``awaiting_approval``).  Only
``approve`` — a client's ``improve/approve`` call — writes to the repository, and only to
its working tree: nothing is staged, committed or pushed.  Nothing the model writes can
reach ``approve``: the model's only output is the answer text this module parses.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from rlmd.config import Config
from rlmd.engine.types import EngineError, QueryOptions, QueryParams, QueryResult
from rlmd.improve.patch import PatchError, extract_diff, touched_paths
from rlmd.improve.records import (
    Bench,
    CycleBrief,
    CycleRecord,
    Decision,
    Records,
    Round,
    valid_job_id,
)
from rlmd.improve.runner import CommandResult, run_command
from rlmd.improve.workspace import (
    WorkspaceError,
    apply_diff,
    fingerprint,
    make_copy,
    remove_tree,
    repo_root,
)
from rlmd.protocol.errors import BAD_INPUT, NOT_FOUND, AppError

Emit = Callable[[dict[str, Any]], None]
# Engine error kinds that end one round (the model can do better next round); any other
# (no model, bad params) ends the cycle at once.
_ROUND_ERRORS = {"max_iterations", "max_sub_calls", "timeout", "max_cost"}
MAX_ROUNDS_CAP = 10
# A lookup's "no answer" (what the QA system prompts ask for), where a diff was wanted.
_NOT_FOUND = re.compile(r"\s*(?:not found|no idea|unknown|n/?a)\W*\s*$", re.I)


class QueryEngine(Protocol):
    async def run(
        self, params: QueryParams, job: str, emit: Emit, *, system: str | None = None
    ) -> QueryResult: ...


#: The analysis' system prompt when the files are shown whole.  The engine's own is for
#: questions about a text ("FINAL(not found)" when the text has no answer), and the
#: embedded 1.5B model answered exactly that to a goal, round after round.
SYSTEM = """\
You change code. The user's message holds files of a git repository (each introduced by
a line `===== path =====`) and a goal. They are also in a Python REPL as the variable
`context`; a ```repl block runs Python there and you get what it printed.

Write the change the goal asks for as a unified diff in git format, paths relative to
the repository root, hunks with exact context lines copied from the file, and finish
with a line of its own: FINAL(```diff ... ```). There is always an answer: the diff."""


class ContextPutter(Protocol):
    def put_path(self, name: str, path: str, **kw: Any) -> Any: ...
    def drop(self, name: str) -> bool: ...


class ImproveStartParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``improve/start`` params."""

    repo: str
    goal: str
    test_command: str | None = None
    bench_command: str | None = None
    max_rounds: int | None = None
    paths: list[str] | None = None
    job: str | None = None
    options: QueryOptions = msgspec.field(default_factory=QueryOptions)


class ImproveJobParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: str


class ImproveRejectParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: str
    feedback: str | None = None


class TestsBrief(msgspec.Struct, kw_only=True):
    passed: bool
    output: str
    elapsed_s: float
    exit_code: int | None = None
    timed_out: bool = False
    protection: str = ""


class DecisionPoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What ``improve/start`` and ``improve/reject`` answer at the gate."""

    job: str
    state: str  # awaiting_approval | failed | rejected
    round: int
    diff: str = ""
    files: list[str] = []
    tests: TestsBrief | None = None
    bench: Bench | None = None
    summary: str = ""
    repo: str = ""


def improve_error(kind: str, message: str, code: int = BAD_INPUT) -> AppError:
    return AppError(kind, message, code=code)


def _tests_brief(r: CommandResult | None) -> TestsBrief | None:
    if r is None:
        return None
    return TestsBrief(
        passed=r.passed,
        output=r.output,
        elapsed_s=r.elapsed_s,
        exit_code=r.exit_code,
        timed_out=r.timed_out,
        protection=r.protection,
    )


def build_question(rec: CycleRecord, evidence: str) -> str:
    """The analysis question for the next round: the goal, the diff format, the evidence."""
    n = len(rec.rounds) + 1
    parts = [
        "Improve the git repository held in `context` (its files joined, each introduced "
        "by a line `===== path =====`).",
        f"Goal: {rec.goal}",
        # The daemon's system prompts are written for questions about a text and say to
        # answer FINAL(not found) when the text holds no answer; a small model takes that
        # for this task too (seen dogfooding with the embedded 1.5B model), so say that
        # here the answer is written, not looked up.
        "This is a writing task, not a lookup: the code to change is in `context`, so "
        "there is always an answer, the diff you write. Never answer FINAL(not found).",
        "Propose ONE change as a unified diff in git format with paths relative to the "
        "repository root (`diff --git a/PATH b/PATH`, `--- a/PATH`, `+++ b/PATH`, then "
        "`@@ -l,n +l,n @@` hunks with exact context lines). Build it in the REPL as a string "
        "and finish with FINAL_VAR(name), or finish with FINAL holding a ```diff block. "
        "Never touch .git or anything outside the repository.",
        f"This is round {n} of at most {rec.max_rounds}.",
    ]
    if rec.test_command:
        parts.append(f"The change is tested with: {rec.test_command}")
    if evidence:
        parts.append(evidence)
    return "\n\n".join(parts)


def _summary(rnd: Round) -> str:
    files = ", ".join(rnd.files) or "no files"
    if rnd.problem:
        return f"round {rnd.round}: {rnd.problem.splitlines()[0][:300]}"
    t = rnd.tests
    tests = (
        "no test command"
        if t is None
        else (f"tests passed in {t.elapsed_s:.1f} s" if t.passed else "tests failed")
    )
    return f"round {rnd.round}: changes {files}; {tests}"


class _Cycle:
    """A cycle the daemon is working on or holding at the gate."""

    def __init__(self, rec: CycleRecord, options: QueryOptions) -> None:
        self.rec = rec
        self.options = options
        self.lock = asyncio.Lock()


class ImproveService:
    """``improve/*``: runs cycles, keeps them at the gate, applies on approval only."""

    def __init__(
        self,
        *,
        config: Config,
        engine: QueryEngine,
        store: ContextPutter,
        state_dir: Path,
        use_bwrap: bool,
    ) -> None:
        self._config = config
        self._engine = engine
        self._store = store
        self._state_dir = state_dir
        self._use_bwrap = use_bwrap
        self._records = Records(state_dir)
        self._cycles: dict[str, _Cycle] = {}
        self._scratch = state_dir / "tmp"
        # Copies of a daemon that died: nobody else uses this state dir (the daemon's lock).
        for stale in self._scratch.glob("improve-*") if self._scratch.is_dir() else []:
            remove_tree(stale)

    # -- the methods --------------------------------------------------------------------

    async def start(self, p: ImproveStartParams, job: str, emit: Emit) -> DecisionPoint:
        """Run rounds until one passes (the gate) or they are used up (``failed``)."""
        cfg = self._config.improve
        if not p.goal.strip():
            raise improve_error("bad_params", "goal must not be empty: say what to improve")
        if not valid_job_id(job):
            raise improve_error("bad_params", "job ids are 1-128 letters, digits or ._:-")
        if job in self._cycles or await asyncio.to_thread(self._records.exists, job):
            raise improve_error("job_exists", f"a cycle named {job!r} exists; choose another id")
        rounds = p.max_rounds if p.max_rounds is not None else cfg.max_rounds
        if not 1 <= rounds <= MAX_ROUNDS_CAP:
            raise improve_error("bad_params", f"max_rounds must be 1..{MAX_ROUNDS_CAP}")
        try:
            repo = await asyncio.to_thread(repo_root, p.repo)
        except WorkspaceError as exc:
            raise improve_error("bad_params", exc.message) from None
        now = time.time()
        rec = CycleRecord(
            job=job,
            repo=str(repo),
            goal=p.goal,
            test_command=p.test_command,
            bench_command=p.bench_command,
            max_rounds=rounds,
            paths=list(p.paths or []),
            created=now,
            updated=now,
            state="running",
        )
        cyc = _Cycle(rec, p.options)
        self._cycles[job] = cyc
        async with cyc.lock:
            await self._save(rec)
            return await self._run_rounds(cyc, emit, evidence="")

    async def approve(self, job: str) -> dict[str, Any]:
        """Apply the waiting proposal to the working tree, if the tree is as it was."""
        cyc = await self._get(job)
        if cyc.lock.locked():
            raise improve_error("busy", f"cycle {job!r} is still working; wait for its gate")
        async with cyc.lock:
            rec = cyc.rec
            if rec.state != "awaiting_approval":
                raise improve_error(
                    "wrong_state",
                    f"cycle {job!r} is {rec.state}; only a proposal awaiting approval can be applied",
                )
            rnd = rec.rounds[-1]
            repo = Path(rec.repo)
            now_fp = await asyncio.to_thread(fingerprint, repo)
            changes = rec.fingerprint.changes(now_fp) if rec.fingerprint else []
            if changes:
                shown = "; ".join(changes[:10]) + (
                    f"; and {len(changes) - 10} more" if len(changes) > 10 else ""
                )
                raise improve_error(
                    "tree_changed",
                    f"the repository changed under the proposal ({shown}); nothing was applied. "
                    "Undo those changes and approve again, or reject and start a new cycle.",
                )
            try:
                await asyncio.to_thread(apply_diff, repo, rnd.diff, check_only=True)
                await asyncio.to_thread(apply_diff, repo, rnd.diff)
            except WorkspaceError as exc:
                raise improve_error("apply_failed", exc.message) from None
            rec.state = "applied"
            rec.decisions.append(
                Decision(state="applied", at=time.time(), round=rnd.round, files=rnd.files)
            )
            await self._save(rec)
            self._cycles.pop(job, None)
            return {"state": "applied", "job": job, "files": rnd.files}

    async def reject(self, job: str, feedback: str | None, emit: Emit) -> DecisionPoint:
        """Reject the waiting proposal; with feedback and rounds left, run the next round."""
        cyc = await self._get(job)
        if cyc.lock.locked():
            raise improve_error("busy", f"cycle {job!r} is still working; wait for its gate")
        async with cyc.lock:
            rec = cyc.rec
            if rec.state not in ("awaiting_approval", "failed"):
                raise improve_error(
                    "wrong_state", f"cycle {job!r} is {rec.state}; nothing to reject"
                )
            last = rec.rounds[-1] if rec.rounds else None
            fb = (feedback or "").strip()
            if last is not None:
                last.feedback = fb
            rec.decisions.append(
                Decision(state="rejected", at=time.time(), round=len(rec.rounds), feedback=fb)
            )
            if fb and len(rec.rounds) < rec.max_rounds and rec.state == "awaiting_approval":
                evidence = (
                    "A reviewer rejected the previous proposal with this feedback:\n"
                    f"{fb}\n\nThe rejected diff was:\n```diff\n{last.diff if last else ''}```"
                )
                rec.state = "running"
                await self._save(rec)
                return await self._run_rounds(cyc, emit, evidence=evidence)
            rec.state = "rejected"
            await self._save(rec)
            self._cycles.pop(job, None)
            return DecisionPoint(job=job, state="rejected", round=len(rec.rounds), repo=rec.repo)

    async def list(self) -> list[CycleBrief]:
        return await asyncio.to_thread(self._records.briefs)

    async def show(self, job: str) -> CycleRecord:
        cyc = self._cycles.get(job)
        if cyc is not None:
            return cyc.rec
        rec = await asyncio.to_thread(self._records.load, job)
        if rec is None:
            raise improve_error(
                "not_found", f"no improvement cycle {job!r} (improve/list shows them)", NOT_FOUND
            )
        return rec

    # -- rounds -------------------------------------------------------------------------

    async def _run_rounds(self, cyc: _Cycle, emit: Emit, *, evidence: str) -> DecisionPoint:
        rec = cyc.rec
        try:
            while len(rec.rounds) < rec.max_rounds:
                rnd = await self._one_round(cyc, emit, evidence)
                rnd.summary = _summary(rnd)
                rec.rounds.append(rnd)
                if not rnd.problem:
                    rec.state = "awaiting_approval"
                    await self._save(rec)
                    emit({"kind": "phase", "phase": "awaiting_approval", "round": rnd.round})
                    return self._point(rec)
                await self._save(rec)
                evidence = (
                    f"Round {rnd.round} failed. {rnd.problem}\n\n"
                    + (f"Its diff was:\n```diff\n{rnd.diff}```\n\n" if rnd.diff else "")
                    + "Propose a corrected diff against the repository as it is in `context`."
                )
            rec.state = "failed"
            await self._save(rec)
            return self._point(rec)
        except BaseException:
            if rec.state == "running":
                rec.state = "failed"
                rec.rounds.append(
                    Round(
                        round=len(rec.rounds) + 1,
                        started=time.time(),
                        problem="stopped: the cycle was cancelled or hit an error",
                    )
                )
                await asyncio.shield(self._save(rec))
            raise

    async def _one_round(self, cyc: _Cycle, emit: Emit, evidence: str) -> Round:
        rec = cyc.rec
        n = len(rec.rounds) + 1
        repo = Path(rec.repo)
        rnd = Round(round=n, started=time.time(), query_job=f"{rec.job}.r{n}")
        emit({"kind": "phase", "phase": "analysis", "round": n})
        rec.fingerprint = await asyncio.to_thread(fingerprint, repo)
        answer = await self._analyse(cyc, rnd, evidence, emit)
        if answer is None:
            return rnd
        rnd.answer = answer
        try:
            rnd.diff = extract_diff(answer)
            rnd.files = touched_paths(repo, rnd.diff)
        except PatchError as exc:
            rnd.problem = f"The proposal was refused: {exc.message}."
            if _NOT_FOUND.match(answer):
                rnd.problem += (
                    f' You answered "{answer.strip()[:40]}", but nothing has to be found here: '
                    "write the change the goal asks for, as a diff."
                )
            emit({"kind": "proposal", "round": n, "accepted": False, "reason": exc.message})
            return rnd
        emit(
            {"kind": "proposal", "round": n, "accepted": True, "files": rnd.files, "diff": rnd.diff}
        )
        await self._test(rec, rnd, emit)
        return rnd

    async def _analyse(self, cyc: _Cycle, rnd: Round, evidence: str, emit: Emit) -> str | None:
        rec = cyc.rec
        name = f"_query:improve-{rec.job}-r{rnd.round}"
        kw: dict[str, Any] = {"include": rec.paths} if rec.paths else {}
        try:
            await asyncio.to_thread(self._store.put_path, name, rec.repo, **kw)
        except Exception as exc:
            raise improve_error(
                "bad_params",
                f"cannot read the repository as a context: {getattr(exc, 'message', exc)}",
            ) from None
        options = cyc.options
        if options.cache is None:
            # A cached proposal would repeat a failed one word for word on a retry.
            options = msgspec.structs.replace(options, cache=False)
        params = QueryParams(query=build_question(rec, evidence), context=name, options=options)
        try:
            result = await self._engine.run(params, rnd.query_job, emit, system=SYSTEM)
            return result.answer
        except EngineError as exc:
            if exc.kind not in _ROUND_ERRORS:
                raise
            rnd.problem = f"The analysis stopped ({exc.kind}): {exc.message}."
            if exc.partial:
                try:
                    extract_diff(exc.partial)
                    rnd.problem = ""  # a usable diff came with the stop: test it
                    return exc.partial
                except PatchError:
                    pass
            return None
        finally:
            await asyncio.shield(asyncio.to_thread(self._drop, name))

    async def _test(self, rec: CycleRecord, rnd: Round, emit: Emit) -> None:
        cfg = self._config.improve
        copy = self._scratch / f"improve-{rec.job}-r{rnd.round}-{secrets.token_hex(4)}"
        run = dict(
            state_dir=self._state_dir,
            use_bwrap=self._use_bwrap,
            timeout_s=cfg.test_timeout_s,
            memory_mb=cfg.memory_mb,
            output_bytes=cfg.output_bytes,
        )
        try:
            await asyncio.to_thread(make_copy, Path(rec.repo), copy)
            if rec.bench_command:
                emit({"kind": "phase", "phase": "bench_before", "round": rnd.round})
                rnd.bench = Bench(before=await run_command(rec.bench_command, copy, **run))
            try:
                await asyncio.to_thread(apply_diff, copy, rnd.diff)
            except WorkspaceError as exc:
                rnd.problem = f"The diff does not apply: {exc.message}"
                emit(
                    {
                        "kind": "proposal",
                        "round": rnd.round,
                        "accepted": False,
                        "reason": rnd.problem,
                    }
                )
                return
            emit({"kind": "phase", "phase": "testing", "round": rnd.round})
            if rec.test_command:
                rnd.tests = await run_command(rec.test_command, copy, **run)
                t = rnd.tests
                emit(
                    {
                        "kind": "test",
                        "round": rnd.round,
                        "passed": t.passed,
                        "elapsed_s": t.elapsed_s,
                        "exit_code": t.exit_code,
                        "timed_out": t.timed_out,
                        "output": t.output[-4000:],
                    }
                )
                if not t.passed:
                    why = "ran past its time limit" if t.timed_out else f"exited {t.exit_code}"
                    rnd.problem = (
                        f"The tests failed (`{rec.test_command}` {why}). Their output "
                        f"(the end of it):\n{t.output[-3000:]}"
                    )
            if rec.bench_command and rnd.bench is not None and not rnd.problem:
                emit({"kind": "phase", "phase": "bench_after", "round": rnd.round})
                rnd.bench.after = await run_command(rec.bench_command, copy, **run)
        finally:
            await asyncio.to_thread(remove_tree, copy)
            await asyncio.to_thread(remove_tree, copy.with_name(copy.name + ".tmp"))

    # -- helpers ------------------------------------------------------------------------

    def _point(self, rec: CycleRecord) -> DecisionPoint:
        rnd = rec.rounds[-1]
        return DecisionPoint(
            job=rec.job,
            state=rec.state,
            round=rnd.round,
            diff=rnd.diff,
            files=rnd.files,
            tests=_tests_brief(rnd.tests),
            bench=rnd.bench,
            summary=rnd.summary,
            repo=rec.repo,
        )

    async def _get(self, job: str) -> _Cycle:
        cyc = self._cycles.get(job)
        if cyc is not None:
            return cyc
        rec = await asyncio.to_thread(self._records.load, job)
        if rec is None:
            raise improve_error(
                "not_found", f"no improvement cycle {job!r} (improve/list shows them)", NOT_FOUND
            )
        cyc = _Cycle(rec, QueryOptions())  # held at the gate across a daemon restart
        self._cycles[job] = cyc
        return cyc

    async def _save(self, rec: CycleRecord) -> None:
        await asyncio.to_thread(self._records.save, rec)

    def _drop(self, name: str) -> None:
        try:
            self._store.drop(name)
        except Exception:  # a leftover hidden context is harmless; never mask the round
            pass
