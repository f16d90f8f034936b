"""The history of every improvement cycle, one JSON file per cycle under the state dir.

A record holds the goal, each round's proposal, its test and benchmark results, every
decision with its time, and the fingerprint of the tree the current proposal was made
against (so an approval after a daemon restart can still refuse a changed tree).
Records are replaced whole (``write_atomic``): a crash leaves the old one or the new one.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import msgspec

from rlmd.atomic import write_atomic
from rlmd.improve.runner import CommandResult
from rlmd.improve.workspace import Fingerprint

_JOB_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Bench(msgspec.Struct, kw_only=True):
    """The benchmark command run before and after the patch, in the same copy."""

    before: CommandResult
    after: CommandResult | None = None


class Round(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One round: what the model proposed and what testing it showed."""

    round: int
    started: float
    query_job: str = ""  # the analysis query's job id (its trace: `rlm trace ID`)
    answer: str = ""
    diff: str = ""
    files: list[str] = []
    tests: CommandResult | None = None
    bench: Bench | None = None
    problem: str = ""  # why the round did not reach the gate (goes back to the model)
    summary: str = ""
    feedback: str = ""  # what the person said when rejecting it


class Decision(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A person's decision at the gate."""

    state: str  # "applied" | "rejected"
    at: float
    round: int
    feedback: str = ""
    files: list[str] = []


class CycleRecord(msgspec.Struct, kw_only=True):
    """A whole cycle (``improve/show``)."""

    job: str
    repo: str
    goal: str
    test_command: str | None
    bench_command: str | None
    max_rounds: int
    paths: list[str]
    created: float
    updated: float
    state: str  # running | awaiting_approval | failed | applied | rejected
    rounds: list[Round] = []
    decisions: list[Decision] = []
    fingerprint: Fingerprint | None = None


class CycleBrief(msgspec.Struct, kw_only=True):
    """One line of ``improve/list``."""

    job: str
    repo: str
    goal: str
    state: str
    rounds: int
    created: float
    updated: float


def valid_job_id(job: str) -> bool:
    """Job ids name files here: a short id of letters, digits and ``._:-``."""
    return bool(_JOB_RE.match(job)) and job not in {".", ".."}


class Records:
    """Reading and writing cycle records (blocking: call in a thread)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "improve"

    def path(self, job: str) -> Path:
        return self.dir / f"{job}.json"

    def save(self, rec: CycleRecord) -> None:
        rec.updated = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(rec.job), msgspec.json.encode(rec))

    def load(self, job: str) -> CycleRecord | None:
        if not valid_job_id(job):
            return None
        try:
            return msgspec.json.decode(self.path(job).read_bytes(), type=CycleRecord)
        except FileNotFoundError:
            return None

    def exists(self, job: str) -> bool:
        return self.path(job).exists()

    def briefs(self) -> list[CycleBrief]:
        """Every recorded cycle, newest first; unreadable files are skipped."""
        out: list[CycleBrief] = []
        for p in self.dir.glob("*.json") if self.dir.is_dir() else []:
            try:
                r = msgspec.json.decode(p.read_bytes(), type=CycleRecord)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue
            out.append(
                CycleBrief(
                    job=r.job,
                    repo=r.repo,
                    goal=r.goal,
                    state=r.state,
                    rounds=len(r.rounds),
                    created=r.created,
                    updated=r.updated,
                )
            )
        return sorted(out, key=lambda b: b.created, reverse=True)
