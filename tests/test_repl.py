"""REPL sessions: persistence, capture, errors, timeouts, model calls, FINAL, the context view.

Every test runs real worker processes under the default protection of this machine
(bubblewrap + seccomp where they work); the escape attempts live in test_repl_escape.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rlmd.config import LimitsConfig, SandboxConfig
from rlmd.repl.ctxview import ContextView, make_re_module
from rlmd.repl.daemon_sandbox import ProbeCache, SandboxProbe, SandboxUnavailable, resolve
from rlmd.repl.session import ExecResult, ReplSession, WorkerError, protection
from rlmd.repl.worker_guard import build_filter


class Handler:
    """A real on_call handler: answers from a script, records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, method: str, params: dict) -> Any:
        self.calls.append((method, params))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if method == "llm_query":
                if params["prompt"] == "explode":
                    raise RuntimeError("provider is down")
                if params["prompt"].startswith("slow"):
                    await asyncio.sleep(0.5)
                return f"answer({params['prompt']},{params['model']})"
            if method == "llm_query_batched":
                # As the engine does: in parallel, answers in prompt order, a failure in
                # its answer's place.
                return list(await asyncio.gather(*(self.one(p) for p in params["prompts"])))
            if method == "rlm_query":
                return f"rlm({params['prompt']},{len(params['context'] or '')})"
            raise AssertionError(method)
        finally:
            self.in_flight -= 1

    async def one(self, prompt: str) -> str:
        # Random delays so that completion order differs from prompt order.
        await asyncio.sleep(random.random() * 0.02)
        if prompt.startswith("bad"):
            return f"[llm_query_batched error: cannot answer {prompt}]"
        return prompt.upper()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return tmp_path, scratch


async def start(
    dirs: tuple[Path, Path],
    text: str | None = "hello world\n",
    handler: Handler | None = None,
    **kw: Any,
) -> ReplSession:
    root, scratch = dirs
    ctx = None
    if text is not None:
        ctx = root / "context.txt"
        ctx.write_bytes(text.encode("utf-8"))
    return await ReplSession.start(
        context_path=ctx,
        limits=kw.pop("limits", LimitsConfig()),
        sandbox=kw.pop("sandbox", SandboxConfig()),
        scratch_dir=scratch,
        on_call=handler or Handler(),
        **kw,
    )


@pytest.fixture
async def repl(dirs: tuple[Path, Path]) -> AsyncIterator[ReplSession]:
    s = await start(dirs)
    yield s
    await s.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_variables_persist_and_output_is_captured_in_order(repl: ReplSession) -> None:
    r = await repl.execute(
        "x = 41\nimport sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')", timeout_s=10
    )
    assert r == ExecResult(output="a\nb\nc\n", elapsed_s=r.elapsed_s)
    r = await repl.execute("x += 1\nx", timeout_s=10)
    assert r.output == "42\n" and r.error is None and not r.restarted
    r = await repl.execute("def f(n):\n    return n * x\nf(2)", timeout_s=10)
    assert r.output == "84\n"
    assert (await repl.execute("print(f(1))", timeout_s=10)).output == "42\n"


async def test_errors_are_tracebacks_of_model_code_only(repl: ReplSession) -> None:
    r = await repl.execute("y = 1\ndef g():\n    return 1 / 0\nprint('before')\ng()", timeout_s=10)
    assert r.output == "before\n"
    assert r.error is not None and "ZeroDivisionError: division by zero" in r.error
    assert 'File "<block 1>", line 3, in g' in r.error and "return 1 / 0" in r.error
    assert "worker.py" not in r.error
    r = await repl.execute("def broken(:\n    pass", timeout_s=10)
    assert r.error is not None and "SyntaxError" in r.error and "worker.py" not in r.error
    r = await repl.execute("raise SystemExit(3)", timeout_s=10)
    assert r.error is not None and "SystemExit" in r.error
    # The worker survived all of it, variables included.
    r = await repl.execute("print(y)", timeout_s=10)
    assert r.output == "1\n" and r.error is None and not r.restarted


async def test_timeout_kills_worker_and_next_block_gets_a_fresh_one(
    dirs: tuple[Path, Path],
) -> None:
    s = await start(dirs)
    try:
        await s.execute("keep = 1", timeout_s=10)
        pid = s.worker_pid
        assert pid is not None and alive(pid)
        t0 = time.monotonic()
        r = await s.execute("print('started')\nwhile True:\n    pass", timeout_s=0.5)
        assert r.timed_out and r.restarted and r.error and "variables were lost" in r.error
        assert r.output == "started\n"  # what it printed before the kill is kept
        assert time.monotonic() - t0 < 5
        assert not alive(pid)
        r = await s.execute("print(keep)", timeout_s=10)
        assert r.error is not None and "NameError" in r.error and not r.restarted
        r = await s.execute("print(context.strip())", timeout_s=10)
        assert r.output == "hello world\n"
        assert s.worker_pid != pid and s.workers_started == 2
    finally:
        await s.close()


async def test_worker_death_is_reported_and_replaced(repl: ReplSession) -> None:
    r = await repl.execute("import os\nos._exit(7)", timeout_s=10)
    assert r.restarted and not r.timed_out
    assert r.error is not None and "exited with status 7" in r.error
    assert (await repl.execute("print(1 + 1)", timeout_s=10)).output == "2\n"


async def test_model_calls_round_trip_through_on_call(dirs: tuple[Path, Path]) -> None:
    h = Handler()
    s = await start(dirs, handler=h)
    try:
        code = (
            "a = llm_query('hi')\n"
            "b = llm_query('hi', model='small')\n"
            "prompts = [f'p{i}' for i in range(40)] + ['bad one', 'last']\n"
            "c = llm_query_batched(prompts)\n"
            "d = rlm_query('sub', context[:5])\n"
            "e = rlm_query('sub2')\n"
            "print(a); print(b); print(c[0], c[39], c[40], c[41], len(c)); print(d); print(e)\n"
            "try:\n    llm_query('explode')\nexcept RuntimeError as exc:\n    print('raised', exc)\n"
        )
        r = await s.execute(code, timeout_s=20)
        assert r.error is None, r.error
        assert r.output.splitlines() == [
            "answer(hi,None)",
            "answer(hi,small)",
            "P0 P39 [llm_query_batched error: cannot answer bad one] LAST 42",
            "rlm(sub,5)",
            "rlm(sub2,0)",
            "raised provider is down",
        ]
        methods = [m for m, _ in h.calls]
        # The batch is one message to the daemon, carrying all 42 prompts in order.
        assert methods == [
            "llm_query",
            "llm_query",
            "llm_query_batched",
            "rlm_query",
            "rlm_query",
            "llm_query",
        ]
        assert (
            h.calls[2][1]["prompts"][:3] == ["p0", "p1", "p2"]
            and len(h.calls[2][1]["prompts"]) == 42
        )
        # The whole batch's order is kept.
        r = await s.execute(
            "print(c == [p.upper() if not p.startswith('bad') else c[40] for p in prompts])",
            timeout_s=10,
        )
        assert r.output == "True\n"
        r = await s.execute("llm_query(['not', 'a', 'str'])", timeout_s=10)
        assert r.error is not None and "llm_query: expected a str, got list" in r.error
    finally:
        await s.close()


async def test_calls_from_threads_are_served_concurrently(dirs: tuple[Path, Path]) -> None:
    h = Handler()
    s = await start(dirs, handler=h)
    try:
        code = (
            "from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(8) as ex:\n"
            "    out = list(ex.map(llm_query, [f'slow{i}' for i in range(8)]))\n"
            "print(out[0], out[7])"
        )
        t0 = time.monotonic()
        r = await s.execute(code, timeout_s=20)
        assert r.error is None, r.error
        assert r.output == "answer(slow0,None) answer(slow7,None)\n"
        # Served one by one they would take 8 x 0.5 s; at once, little more than 0.5 s.
        assert h.max_in_flight >= 4
        assert time.monotonic() - t0 < 3
    finally:
        await s.close()


async def test_final_final_var_and_get_var(repl: ReplSession) -> None:
    r = await repl.execute("FINAL('the answer')", timeout_s=10)
    assert r.final == "the answer"
    r = await repl.execute("print('no final here')", timeout_s=10)
    assert r.final is None
    r = await repl.execute("res = ['a', 'b', {'k': 1}]\nFINAL_VAR('res')", timeout_s=10)
    assert r.final is not None and json.loads(r.final) == ["a", "b", {"k": 1}]
    r = await repl.execute("pair = ('x', 2)\nFINAL_VAR('pair')", timeout_s=10)
    assert json.loads(r.final or "") == ["x", 2]
    r = await repl.execute("FINAL(42)", timeout_s=10)
    assert r.final == "42"
    r = await repl.execute("FINAL_VAR('nope')", timeout_s=10)
    assert r.final is None and r.error is not None and "no variable named 'nope'" in r.error
    # Lower-case spellings (small models write them) work the same.
    r = await repl.execute("final('lower')", timeout_s=10)
    assert r.final == "lower"
    r = await repl.execute("final_var('pair')", timeout_s=10)
    assert json.loads(r.final or "") == ["x", 2]
    assert await repl.get_var("res") == json.dumps(["a", "b", {"k": 1}], indent=2)
    assert await repl.get_var("nope") is None
    assert await repl.get_var("not an identifier") is None
    await repl.execute("s = 'plain text'", timeout_s=10)
    assert await repl.get_var("s") == "plain text"


async def test_show_vars_lists_user_variables(repl: ReplSession) -> None:
    r = await repl.execute(
        "import re\nitems = [1, 2, 3]\nname = 'abc'\n_hidden = 1\nSHOW_VARS()", timeout_s=10
    )
    lines = r.output.splitlines()
    assert "items: list (3 items)" in lines and "name: str (3 chars)" in lines
    assert "context: str (12 chars)" in lines
    assert not any(x.startswith(("_hidden", "re:", "llm_query")) for x in lines)


async def test_huge_output_is_capped_and_the_worker_survives(repl: ReplSession) -> None:
    r = await repl.execute("s = 'x' * 50_000_000\nprint(s)\nprint(s)", timeout_s=30)
    assert len(r.output) < 1_100_000
    assert "[output truncated: " in r.output
    assert (await repl.execute("print(len(s))", timeout_s=10)).output == "50000000\n"


async def test_cancelling_execute_kills_the_worker(dirs: tuple[Path, Path]) -> None:
    s = await start(dirs)
    try:
        pid = s.worker_pid
        assert pid is not None
        task = asyncio.create_task(s.execute("while True:\n    pass", timeout_s=60))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not alive(pid)
        # The session still works afterwards, with a fresh worker.
        assert (await s.execute("print(3)", timeout_s=10)).output == "3\n"
    finally:
        await s.close()


async def test_close_is_idempotent_and_final(dirs: tuple[Path, Path]) -> None:
    s = await start(dirs, text=None)
    assert (await s.execute("print(context)", timeout_s=10)).output == "None\n"
    pid = s.worker_pid
    await s.close()
    await s.close()
    assert pid is not None and not alive(pid)
    with pytest.raises(WorkerError, match="closed"):
        await s.execute("1", timeout_s=1)
    assert await s.get_var("x") is None


async def test_start_errors_are_clear(dirs: tuple[Path, Path]) -> None:
    root, scratch = dirs
    with pytest.raises(WorkerError, match=r"context file .* does not exist"):
        await ReplSession.start(
            context_path=root / "missing.txt", limits=LimitsConfig(), sandbox=SandboxConfig(),
            scratch_dir=scratch, on_call=Handler(),
        )  # fmt: skip
    with pytest.raises(WorkerError, match="scratch directory"):
        await ReplSession.start(
            context_path=None, limits=LimitsConfig(), sandbox=SandboxConfig(),
            scratch_dir=root / "nope", on_call=Handler(),
        )  # fmt: skip


def test_protection_report_and_require() -> None:
    p = protection()
    assert p.rlimits is True
    none = ProbeCache()
    none.probe = SandboxProbe(
        bwrap=False, seccomp=False, bwrap_detail="bwrap: not found", seccomp_detail="x"
    )
    with pytest.raises(
        SandboxUnavailable, match=r"sandbox\.bwrap = 'require' but bwrap: not found"
    ):
        resolve(none.probe, bwrap="require", seccomp="auto")
    got = resolve(none.probe, bwrap="auto", seccomp="auto")
    assert not got.bwrap and not got.seccomp
    assert not protection(SandboxConfig(bwrap="off", seccomp="off")).bwrap
    ll = SandboxProbe(bwrap=True, seccomp=True, bwrap_detail="", seccomp_detail="", landlock_abi=4)
    assert not resolve(ll, bwrap="auto", seccomp="auto").landlock  # bwrap isolates already
    assert resolve(ll, bwrap="off", seccomp="auto").landlock
    assert not resolve(ll, bwrap="off", seccomp="off").landlock
    assert not resolve(ll, bwrap="off", seccomp="auto").landlock_scoped  # ABI 4: no scopes
    scoped = msgspec.structs.replace(ll, landlock_abi=6)
    for bw, sc in (("auto", "auto"), ("off", "auto"), ("off", "off")):  # scopes in every mode
        assert resolve(scoped, bwrap=bw, seccomp=sc).landlock_scoped


def run_bpf(prog: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """A classic-BPF interpreter for the instructions the filter uses."""
    a6 = (*args, 0, 0, 0, 0, 0, 0)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *a6)
    ins = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = ins[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x06:
            return k
        else:
            cond = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            assert jt >= 0 and jf >= 0
            pc += 1 + (jt if cond else jf)


def test_seccomp_filter_decisions() -> None:
    allow, eperm, enosys, kill = 0x7FFF0000, 0x50001, 0x50026, 0x80000000
    for machine, arch, nrs in (
        ("x86_64", 0xC000003E, {"read": 0, "socket": 41, "clone": 56, "clone3": 435, "prlimit64": 302, "fork": 57, "execve": 59, "io_uring_setup": 425, "kill": 62, "tgkill": 234, "fcntl": 72, "ioctl": 16}),
        ("aarch64", 0xC00000B7, {"read": 63, "socket": 198, "clone": 220, "clone3": 435, "prlimit64": 261, "execve": 221, "io_uring_setup": 425, "kill": 129, "tgkill": 131, "fcntl": 25, "ioctl": 29}),
    ):  # fmt: skip
        prog = build_filter(machine, own_pid=4242)
        assert run_bpf(prog, nrs["read"], arch) == allow
        assert run_bpf(prog, nrs["kill"], arch, (4242, 10)) == allow  # itself
        assert run_bpf(prog, nrs["kill"], arch, (0, 10)) == allow  # its own group
        assert run_bpf(prog, nrs["kill"], arch, (1, 9)) == eperm  # anyone else
        assert run_bpf(prog, nrs["kill"], arch, (2**64 - 1, 9)) == eperm  # kill(-1): everyone
        assert run_bpf(prog, nrs["tgkill"], arch, (4242, 4243, 10)) == allow
        assert run_bpf(prog, nrs["tgkill"], arch, (77, 77, 9)) == eperm
        assert run_bpf(prog, nrs["socket"], arch, (2, 1, 0)) == eperm
        assert run_bpf(prog, nrs["execve"], arch) == eperm
        assert run_bpf(prog, nrs["io_uring_setup"], arch) == eperm
        assert run_bpf(prog, nrs["clone"], arch, (0x3D0F00,)) == allow  # pthread_create's flags
        assert run_bpf(prog, nrs["clone"], arch, (0x1200011,)) == eperm  # fork()'s flags
        assert run_bpf(prog, nrs["clone3"], arch) == enosys  # libc falls back to clone
        assert run_bpf(prog, nrs["prlimit64"], arch, (0, 9, 0, 12345)) == allow  # getrlimit
        assert run_bpf(prog, nrs["prlimit64"], arch, (0, 9, 0x7FFF0000, 0)) == eperm
        assert run_bpf(prog, nrs["prlimit64"], arch, (0, 9, 1 << 40, 0)) == eperm
        assert run_bpf(prog, nrs["read"], 0x40000003) == kill  # i386 ABI
        fcntl_nr, ioctl_nr = nrs["fcntl"], nrs["ioctl"]
        for cmd in (8, 10, 15, (1 << 32) | 8):  # F_SETOWN, F_SETSIG, F_SETOWN_EX; high bits
            assert run_bpf(prog, fcntl_nr, arch, (3, cmd, 4242)) == eperm, cmd
        for cmd in (1, 3, 4, 2):  # F_GETFD, F_GETFL, F_SETFL (O_ASYNC alone is harmless)
            assert run_bpf(prog, fcntl_nr, arch, (3, cmd, 0)) == allow, cmd
        for req in (0x8901, 0x8902, 0x5410, 0x5412):  # FIOSETOWN, SIOCSPGRP, TIOCSPGRP, TIOCSTI
            assert run_bpf(prog, ioctl_nr, arch, (3, req, 0)) == eperm, hex(req)
        assert run_bpf(prog, ioctl_nr, arch, (3, 0x5401, 0)) == allow  # TCGETS (isatty)
        if "fork" in nrs:
            assert run_bpf(prog, nrs["fork"], arch) == eperm
            assert run_bpf(prog, 0x40000000 | nrs["read"], arch) == eperm  # x32 ABI


# --- the context view -------------------------------------------------------------------

ASCII_TEXT = (
    "".join(
        f"Line {i}: the quick brown fox {i * 7 % 13} jumps; over\tthe lazy dog.\n"
        for i in range(300)
    )
    + "tail without newline"
)
NON_ASCII_TEXT = (
    "".join(
        f"Zeile {i}: Größe ünd Maß — 日本語 {i % 5} ☃ café\r\nnaïve\u2028x{i}\u0085y\n"
        for i in range(300)
    )
    + "😀 end ∎"
)
TEXTS = {"ascii": ASCII_TEXT, "non_ascii": NON_ASCII_TEXT, "empty": ""}
SLICES = [(0, 10, 1), (5, None, 1), (None, -3, 1), (-50, -10, 1), (3, 400, 7), (None, None, -1),
          (500, 20, -3), (10, 10, 1), (20, 10, 1), (-5, None, 2), (0, 10**9, 1000)]  # fmt: skip
PATTERNS = [r"fox \d+", r"(\w+) (\d)", r"Gr..e", r"[^\s]+;", r"\bthe\b", r"^Line 1\d", r"(?m)^\w+ 1\d",
            r"日本語 (\d)", r"(?i)café", r"ü|ß", r"x\d+", r"e", r"", r"[a-c]+", r"\S+$", r"(?s)dog.\n"]  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_context_view_matches_str(kind: str, tmp_path: Path) -> None:
    text = TEXTS[kind]
    p = tmp_path / "c.txt"
    p.write_bytes(text.encode("utf-8"))
    v = ContextView.open(str(p))
    assert v.is_ascii == text.isascii()
    assert len(v) == len(text) and str(v) == text and v == text and bool(v) == bool(text)
    for a, b, c in SLICES:
        assert v[a:b:c] == text[a:b:c], (a, b, c)
    for i in (0, 1, 17, len(text) - 1, -1, -len(text)):
        if text:
            assert v[i] == text[i]
    with pytest.raises(IndexError):
        v[len(text)]
    assert "".join(v) == text and list(v)[:5] == list(text)[:5]
    for sub in ("the", "ß", "日本語 3", "\n", "missing!", "", "😀"):
        for rng in ((), (10,), (100, 2000), (-500,), (len(text) + 5,)):
            assert v.find(sub, *rng) == text.find(sub, *rng), (sub, rng)
            assert v.rfind(sub, *rng) == text.rfind(sub, *rng), (sub, rng)
            assert v.count(sub, *rng) == text.count(sub, *rng), (sub, rng)
            assert v.startswith(sub, *rng) == text.startswith(sub, *rng), (sub, rng)
            assert v.endswith(sub, *rng) == text.endswith(sub, *rng), (sub, rng)
        assert (sub in v) == (sub in text)
    assert v.startswith(("nope", text[:3])) == text.startswith(("nope", text[:3]))
    for sep in ("\n", ": ", "fox", "ß"):
        assert v.split(sep) == text.split(sep) and v.split(sep, 3) == text.split(sep, 3)
    assert v.split() == text.split()
    assert v.splitlines() == text.splitlines()
    assert v.splitlines(True) == text.splitlines(True)
    assert v + "!" == text + "!" and "!" + v == "!" + text
    assert v.upper() == text.upper() and v.replace("e", "E") == text.replace("e", "E")
    assert v.encode() == text.encode()
    rem = make_re_module()
    for pat in PATTERNS:
        assert rem.findall(pat, v) == re.findall(pat, text), pat
        got = [(m.span(), m.group(), m.groups()) for m in rem.finditer(pat, v)]
        want = [(m.span(), m.group(), m.groups()) for m in re.finditer(pat, text)]
        assert got == want, pat
        gm, wm = rem.search(pat, v), re.search(pat, text)
        assert (gm and (gm.span(), gm.group(0))) == (wm and (wm.span(), wm.group(0))), pat
        assert bool(rem.match(pat, v)) == bool(re.match(pat, text)), pat
        assert rem.split(pat, v, maxsplit=5) == re.split(pat, text, maxsplit=5), pat
        assert rem.sub(pat, "<>", v, count=3) == re.sub(pat, "<>", text, count=3), pat
        cp = rem.compile(pat)
        assert cp.findall(v) == re.compile(pat).findall(text), pat
        m1, m2 = cp.search(v, 100), re.compile(pat).search(text, 100)
        assert (m1 and m1.span()) == (m2 and m2.span()), pat
        assert cp.findall("plain str") == re.findall(pat, "plain str")
    assert rem.findall("the", v, rem.IGNORECASE) == re.findall("the", text, re.IGNORECASE)
    assert rem.findall(r"\d+", "a1b22") == ["1", "22"] and rem.escape("a.b") == r"a\.b"


def test_safe_patterns_run_on_the_mapped_bytes() -> None:
    rem = make_re_module()
    v = ContextView(NON_ASCII_TEXT.encode("utf-8"))
    for pat in (r"x[0-9]+", r"Zeile (1[0-9]+):", r"caf|na[a-z]", r"(?m)^na[a-z]"):
        assert [m.span() for m in rem.finditer(pat, v)] == [
            m.span() for m in re.finditer(pat, NON_ASCII_TEXT)
        ]
    assert not v.materialized
    assert rem.findall(r"\w+ö", v) == re.findall(r"\w+ö", NON_ASCII_TEXT)
    assert v.materialized  # \w on non-ASCII text needs the decoded text
    w = ContextView(ASCII_TEXT.encode())
    assert (
        rem.findall(r"\w+ (\d+)", w) == re.findall(r"\w+ (\d+)", ASCII_TEXT) and not w.materialized
    )


async def test_context_in_worker_is_a_view_above_threshold(dirs: tuple[Path, Path]) -> None:
    s = await start(dirs, text=NON_ASCII_TEXT, str_threshold_bytes=0)
    try:
        code = (
            "import re\n"
            "s = str(context)\n"
            "checks = [type(context).__name__, len(context) == len(s), context[100:200] == s[100:200],\n"
            "  re.findall(r'日本語 (\\d)', context) == re.findall(r'日本語 (\\d)', s),\n"
            "  [m.span() for m in re.finditer(r'\\w+ö', context)] == [m.span() for m in re.finditer(r'\\w+ö', s)],\n"
            "  re.compile('ß').search(context, 50).start() == re.compile('ß').search(s, 50).start(),\n"
            "  context.count('☃') == s.count('☃'), context.splitlines() == s.splitlines()]\n"
            "print(checks)\n"
            "context"
        )
        r = await s.execute(code, timeout_s=30)
        assert r.error is None, r.error
        assert (
            r.output.splitlines()[0] == "['ContextView', True, True, True, True, True, True, True]"
        )
        assert r.output.splitlines()[1].startswith(f"<context: {len(NON_ASCII_TEXT)} characters")
    finally:
        await s.close()
    s = await start(dirs, text=NON_ASCII_TEXT)  # default threshold: a real str
    try:
        r = await s.execute(
            "print(type(context).__name__, context == open('/dev/null').read() or len(context))",
            timeout_s=10,
        )
        assert r.output == f"str {len(NON_ASCII_TEXT)}\n"
    finally:
        await s.close()


def test_context_view_random_offsets_agree_with_str() -> None:
    rng = random.Random(1)
    alphabet = "abc xyz\n\tÅß日😀\r\u2028ERROR123"
    text = "".join(rng.choice(alphabet) for _ in range(100_000))
    v = ContextView(text.encode("utf-8"))
    rem = make_re_module()
    assert len(v) == len(text)
    for _ in range(2000):
        a = rng.randrange(-len(text) - 5, len(text) + 5)
        b = rng.randrange(-len(text) - 5, len(text) + 5)
        step = rng.choice([1, 1, 1, 2, -1, -3, 7])
        assert v[a:b:step] == text[a:b:step], (a, b, step)
        i = abs(a) % len(text)
        sub = text[i : i + rng.randrange(0, 4)]
        assert v.find(sub, a, b) == text.find(sub, a, b), (sub, a, b)
        assert v.rfind(sub, a, b) == text.rfind(sub, a, b), (sub, a, b)
    for pat in ["ERROR[0-9]+", "a|b", "日", "[a-c]+ x", r"\w+", "(?m)^ab"]:
        assert [m.span() for m in rem.finditer(pat, v)] == [
            m.span() for m in re.finditer(pat, text)
        ]


@pytest.mark.parametrize("kind", ["ascii", "non_ascii"])
async def test_store_context_and_its_index_are_used(kind: str, dirs: tuple[Path, Path]) -> None:
    from rlmd.store import ContextStore

    text = TEXTS[kind] * 40  # > one index stride of characters
    root, scratch = dirs
    store = ContextStore(root / "contexts")
    store.put_text("doc", text)
    path = store.text_path("doc")
    index = path.with_suffix(".idx")
    assert index.is_file()
    v = ContextView.open(str(path), str(index))
    # Known from the sidecar without a scan: ASCII-ness, and the checkpoints.
    assert v._ascii is text.isascii() and (v._index is None) == text.isascii()
    assert len(v) == len(text) and v[-5000:-4000] == text[-5000:-4000]
    assert [m.span() for m in make_re_module().finditer("fox [0-9]+|日本語", v)] == [
        m.span() for m in re.finditer("fox [0-9]+|日本語", text)
    ]
    s = await ReplSession.start(
        context_path=path, limits=LimitsConfig(), sandbox=SandboxConfig(), scratch_dir=scratch,
        on_call=Handler(), str_threshold_bytes=0,
    )  # fmt: skip
    try:
        assert s.index_path == index
        r = await s.execute(
            "s = str(context)\n"
            "print(type(context).__name__, len(context) == len(s), context[-5000:-4000] == s[-5000:-4000])",
            timeout_s=30,
        )
        assert r.output == "ContextView True True\n", r
    finally:
        await s.close()


async def test_get_var_of_a_hostile_value_times_out(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlmd.repl.session as session_mod

    monkeypatch.setattr(session_mod, "GET_VAR_TIMEOUT_S", 0.5)
    s = await start(dirs)
    try:
        await s.execute(
            "class Evil:\n    def __str__(self):\n        while True:\n            pass\nv = Evil()",
            timeout_s=10,
        )
        pid = s.worker_pid
        t0 = time.monotonic()
        assert await s.get_var("v") is None
        assert time.monotonic() - t0 < 3
        assert pid is not None and not alive(pid)  # the stuck worker was replaced
        assert (await s.execute("print('next')", timeout_s=10)).output == "next\n"
    finally:
        await s.close()
