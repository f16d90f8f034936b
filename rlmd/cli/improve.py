"""``rlm improve``: the improvement cycle from a shell, with the person as the gate.

    rlm improve -g GOAL [--test CMD] [--bench CMD] [--rounds N] [PATH]
    rlm improve log | show JOB | approve JOB | reject JOB [-m FEEDBACK]

The first form runs rounds until a proposal passes its tests (or they are used up), shows
the diff in colour through the pager and the test summary, then asks: approve, reject,
or reject with feedback (which runs the next round).  Nothing is applied without the
answer "approve"; without a terminal (and no ``--interactive``) it only prints the job id
and the commands that decide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rlmd.client import Client, RpcError

ACTIONS = ("log", "show", "approve", "reject")
_COLOURS = {"+": "\x1b[32m", "-": "\x1b[31m", "@": "\x1b[36m", "d": "\x1b[1m"}


def add_parser(sub: Any) -> None:
    """Register ``improve`` on the ``rlm`` parser's subcommands."""
    im = sub.add_parser("improve", help="propose, test and (on your approval) apply a change")
    im.add_argument(
        "args", nargs="*", help="PATH (default .), or log | show JOB | approve JOB | reject JOB"
    )
    im.add_argument("-g", "--goal", help="what to improve")
    im.add_argument("--test", help="test command, run in a disposable copy (e.g. 'pytest -q')")
    im.add_argument("--bench", help="benchmark command, run before and after the patch")
    im.add_argument("--rounds", type=int, help="rounds at most (default: [improve] max_rounds)")
    im.add_argument("--path", action="append", dest="paths", help="only these globs (repeatable)")
    im.add_argument("-m", "--feedback", help="with reject: feedback for the next round")
    im.add_argument("--interactive", action="store_true", help="ask even without a terminal")
    im.add_argument("--no-pager", action="store_true", help="print the diff instead of paging it")


def colour_diff(diff: str) -> str:
    """The diff with ANSI colours, as git shows it."""
    out = []
    for line in diff.splitlines():
        key = "d" if line.startswith("diff --git") else line[:1]
        c = _COLOURS.get(key) if not line.startswith(("+++", "---")) else _COLOURS["d"]
        out.append(f"{c}{line}\x1b[0m" if c else line)
    return "\n".join(out) + "\n"


def _show_diff(diff: str, use_pager: bool) -> None:
    tty = sys.stdout.isatty()
    text = colour_diff(diff) if tty else diff
    pager = os.environ.get("PAGER") or ("less" if shutil.which("less") else "")
    if use_pager and tty and pager:
        env = {**os.environ, "LESS": os.environ.get("LESS", "FRX")}
        subprocess.run(pager, input=text.encode(), shell=True, env=env)
    else:
        sys.stdout.write(text)


def _print_point(point: dict[str, Any], use_pager: bool) -> None:
    state, rnd = point.get("state"), point.get("round")
    if point.get("diff"):
        _show_diff(point["diff"], use_pager)
    t = point.get("tests")
    if t:
        verdict = "passed" if t["passed"] else ("timed out" if t.get("timed_out") else "FAILED")
        tail = "\n".join(t["output"].rstrip().splitlines()[-8:])
        print(f"\ntests {verdict} in {t['elapsed_s']:.1f} s ({t.get('protection', '')})\n{tail}")
    b = point.get("bench")
    if b:
        before = b["before"]["elapsed_s"]
        after = b.get("after", {}) and b["after"]["elapsed_s"]
        print(
            f"bench: {before:.2f} s before, "
            + (f"{after:.2f} s after" if after else "not run after")
        )
    print(
        f"\nrlm improve: {point['job']} round {rnd}: {state} — {point.get('summary', '')}",
        file=sys.stderr,
    )


def _progress(ev: dict[str, Any]) -> None:
    kind = ev.get("kind")
    if kind == "phase" and "round" not in ev:
        # The analysis query's own phases (prompt, generating, searching) carry no round.
        tokens = f" ({ev['tokens']:,} tokens)" if isinstance(ev.get("tokens"), int) else ""
        line = f"analysis: {ev.get('phase')}{tokens}"
    elif kind == "phase":
        line = f"round {ev['round']}: {ev.get('phase')}"
    elif kind == "proposal":
        line = f"round {ev.get('round')}: proposal " + (
            f"touching {', '.join(ev.get('files', []))}"
            if ev.get("accepted")
            else f"refused: {ev.get('reason', '')}"
        )
    elif kind == "test":
        line = f"round {ev.get('round')}: tests {'passed' if ev.get('passed') else 'failed'} ({ev.get('elapsed_s', 0):.1f} s)"
    elif kind == "progress":
        line = f"analysis: iteration {ev.get('iteration')}"
    else:
        return
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[2K⟳ " + line[:160])
        if kind in ("proposal", "test"):
            sys.stderr.write("\n")
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _ask() -> tuple[str, str]:
    while True:
        sys.stderr.write("\n[a]pprove, [r]eject, reject with [f]eedback, [q]uit (decide later)? ")
        sys.stderr.flush()
        ans = sys.stdin.readline()
        if not ans:
            return "quit", ""
        ans = ans.strip().lower()[:1]
        if ans == "a":
            return "approve", ""
        if ans == "r":
            return "reject", ""
        if ans == "f":
            sys.stderr.write("feedback: ")
            sys.stderr.flush()
            return "reject", sys.stdin.readline().strip()
        if ans == "q":
            return "quit", ""


def cmd_improve(c: Client, args: argparse.Namespace) -> int:
    """Run one of the ``rlm improve`` forms; returns the exit status."""
    rest = list(args.args)
    if rest and rest[0] in ACTIONS:
        return _action(c, rest[0], rest[1:], args)
    if not args.goal:
        print("rlm: improve needs -g GOAL (what to improve)", file=sys.stderr)
        return 2
    repo = Path(rest[0] if rest else ".").expanduser().resolve()
    params: dict[str, Any] = {
        "repo": str(repo),
        "goal": args.goal,
        "job": f"improve-{uuid.uuid4().hex[:8]}",
    }
    for key, val in (
        ("test_command", args.test),
        ("bench_command", args.bench),
        ("max_rounds", args.rounds),
        ("paths", args.paths),
    ):
        if val is not None:
            params[key] = val
    t0 = time.monotonic()
    point = c.call("improve/start", params, on_event=_progress)
    print(f"rlm improve: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return _gate(c, point, args)


def _approve(c: Client, job: str) -> int:
    r = c.call("improve/approve", {"job": job})
    print(f"applied to the working tree (not committed): {', '.join(r['files'])}")
    return 0


def _reject(c: Client, job: str, feedback: str) -> dict[str, Any]:
    """Reject ``job``; with feedback (and rounds left) the next round's decision point."""
    params: dict[str, Any] = {"job": job}
    if feedback:
        params["feedback"] = feedback
    return c.call("improve/reject", params, on_event=_progress)


def _gate(c: Client, point: dict[str, Any], args: argparse.Namespace) -> int:
    while True:
        _print_point(point, not args.no_pager)
        job = point["job"]
        if point["state"] != "awaiting_approval":
            return 1 if point["state"] == "failed" else 0
        if not (sys.stdin.isatty() or args.interactive):
            print(
                f"decide with: rlm improve approve {job} | rlm improve reject {job} [-m FEEDBACK]",
                file=sys.stderr,
            )
            return 0
        choice, feedback = _ask()
        if choice == "quit":
            print(f"left at the gate; later: rlm improve approve {job}", file=sys.stderr)
            return 0
        if choice == "approve":
            return _approve(c, job)
        point = _reject(c, job, feedback)
        if point["state"] == "rejected":
            print("rejected; nothing was applied", file=sys.stderr)
            return 0


def _action(c: Client, action: str, rest: list[str], args: argparse.Namespace) -> int:
    if action == "log":
        cycles = c.call("improve/list", {})["cycles"]
        if not cycles:
            print("no improvement cycles yet")
        for cy in cycles:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(cy["created"]))
            print(
                f"{cy['job']:<20} {when}  {cy['state']:<18} {cy['rounds']} round(s)  {cy['goal'][:60]}  ({cy['repo']})"
            )
        return 0
    if not rest:
        print(f"rlm: improve {action} needs a JOB (see rlm improve log)", file=sys.stderr)
        return 2
    job = rest[0]
    if action == "show":
        rec = c.call("improve/show", {"job": job})
        for rnd in rec["rounds"]:
            print(f"--- round {rnd['round']}: {rnd.get('summary', '')}")
        for d in rec["decisions"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["at"]))
            print(
                f"--- {d['state']} at {when}" + (f": {d['feedback']}" if d.get("feedback") else "")
            )
        if rec["rounds"] and rec["rounds"][-1].get("diff"):
            _show_diff(rec["rounds"][-1]["diff"], not args.no_pager)
        return 0
    if action == "approve":
        return _approve(c, job)
    try:
        point = _reject(c, job, args.feedback or "")
    except RpcError as exc:
        print(f"rlm: {exc.message}", file=sys.stderr)
        return 1
    if point["state"] == "rejected":
        print("rejected; nothing was applied")
        return 0
    return _gate(c, point, args)
