"""``kind = "command"`` providers: a real daemon whose model is a script run as a program."""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import pytest

from rlmd.client import RpcError
from rlmd.config import ConfigError, ProviderConfig, parse_config
from rlmd.providers.base import ChatRequest, Message
from rlmd.providers.command import CommandProvider, render_conversation

REPO = Path(__file__).resolve().parents[1]

# The script's behaviour is chosen by the model name (RLMD_MODEL), so one provider
# serves every case.  It records what it received in LOG/<pid>.json.
SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    log, model = sys.argv[1], os.environ.get("RLMD_MODEL", "")
    stdin = sys.stdin.read()
    rec = {"argv": sys.argv[2:], "stdin": stdin, "model": model, "env": dict(os.environ)}
    running = os.path.join(log, "running")
    os.makedirs(running, exist_ok=True)
    mine = os.path.join(running, str(os.getpid()))
    open(mine, "w").close()
    try:
        if model == "count":
            # Wait (up to 3 s) for a second one to run, then note how many ran at once.
            deadline = time.time() + 3
            while len(os.listdir(running)) < 2 and time.time() < deadline:
                time.sleep(0.02)
            seen = len(os.listdir(running))
            time.sleep(0.3)
            rec["seen"] = max(seen, len(os.listdir(running)))
        with open(os.path.join(log, f"{os.getpid()}.json"), "w") as f:
            json.dump(rec, f)
        if model == "fail":
            sys.stderr.write("boom: bad credentials " + os.environ.get("RLMD_TEST_PASS", "") + "\\n")
            sys.exit(3)
        if model == "hang":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
            with open(os.path.join(log, "hang.pids"), "w") as f:
                f.write(f"{os.getpid()} {child.pid}")
            time.sleep(300)
        if model == "root":
            print("FINAL(from the command)")
        else:
            for word in ("answer", "to:", stdin.strip()):
                sys.stdout.write(word + " ")
                sys.stdout.flush()
    finally:
        os.unlink(mine)
    """
)


@pytest.fixture
def scripted(make_daemon, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    script = tmp_path / "model.py"
    script.write_text(SCRIPT)
    cfg = f"""
[[providers]]
name = "cli"
kind = "command"
command = [{json.dumps(sys.executable)}, {json.dumps(str(script))}, {json.dumps(str(log))}, "--flag", "two words"]
models = ["echo", "count", "fail", "hang", "root"]
capacity = 2
timeout_s = 4
env = ["RLMD_TEST_PASS", "PATH"]

[models]
root = "root"
sub = "echo"

[pool]
retries = 1
backoff_base_s = 0.01

[cache]
enabled = false
"""
    env = {"RLMD_TEST_PASS": "passed-value-123", "RLMD_TEST_SECRET": "must-not-leak"}
    return make_daemon(cfg, env=env), log


def records(log: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log.glob("*.json"))]


def test_argv_stdin_model_and_env_arrive_as_configured(scripted):
    d, log = scripted
    r = d.call("llm/query", {"prompt": "what is up?"})
    assert r["text"].split() == ["answer", "to:", "what", "is", "up?"]
    assert r["provider"] == "cli" and r["model"] == "echo"
    (rec,) = records(log)
    assert rec["argv"] == ["--flag", "two words"]  # one argument, no shell splitting
    assert rec["stdin"] == "what is up?" and rec["model"] == "echo"
    assert rec["env"]["RLMD_TEST_PASS"] == "passed-value-123"
    assert rec["env"]["RLMD_MODEL"] == "echo"
    assert "RLMD_TEST_SECRET" not in rec["env"] and "HOME" not in rec["env"]


def test_a_command_as_the_root_model_gets_the_rendered_conversation(scripted):
    d, log = scripted
    d.call("context/put", {"name": "doc", "text": "some text"})
    res = d.call("query/run", {"query": "What does it say?", "context": "doc", "job": "c1"})
    assert res["answer"] == "from the command"
    (rec,) = records(log)
    assert rec["model"] == "root"
    # The system prompt first, then the turns with their speakers.
    assert not rec["stdin"].startswith("User:")
    assert "\n\nUser:\n" in rec["stdin"] and "What does it say?" in rec["stdin"]


def test_capacity_bounds_the_processes(scripted):
    d, log = scripted
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            d.call("llm/query", {"prompt": f"question {i}", "model": "count"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    seen = [r["seen"] for r in records(log)]
    assert len(seen) == 6
    assert max(seen) == 2, seen  # two at once happened, three never did


def test_a_failing_program_is_a_clear_error_without_secrets(scripted):
    d, _log = scripted
    with pytest.raises(RpcError) as ei:
        d.call("llm/query", {"prompt": "x", "model": "fail"})
    msg = ei.value.message
    assert ei.value.kind == "model_error"
    assert "exited with status 3" in msg and "boom: bad credentials" in msg
    assert "passed-value-123" not in msg and "[redacted]" in msg
    assert d.call("daemon/ping") == "pong"
    assert d.call("llm/query", {"prompt": "still there"})["text"].startswith("answer")


def test_a_hanging_program_is_killed_with_its_children(scripted):
    d, log = scripted
    t0 = time.monotonic()
    with pytest.raises(RpcError) as ei:
        d.call("llm/query", {"prompt": "x", "model": "hang"})
    assert time.monotonic() - t0 < 30
    assert "within 4 s" in ei.value.message and "killed" in ei.value.message
    pids = [int(p) for p in (log / "hang.pids").read_text().split()]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "the program or its child outlived the timeout"
    assert d.call("daemon/ping") == "pong"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by a parent that is gone) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_render_conversation():
    one = ChatRequest(model="m", messages=(Message("user", "hi"),))
    assert render_conversation(one) == "hi"
    many = ChatRequest(
        model="m",
        messages=(
            Message("system", "Be brief."),
            Message("user", "Q1"),
            Message("assistant", "A1"),
            Message("user", "Q2"),
        ),
    )
    assert render_conversation(many) == "Be brief.\n\nUser:\nQ1\n\nAssistant:\nA1\n\nUser:\nQ2\n"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ('command = "claude -p"', "command"),
        ("command = []", "non-empty argv"),
        ('command = ["claude", ""]', "non-empty argv"),
        ('command = ["claude"]\napi_key_env = "K"', "api_key_env"),
        ('command = ["claude"]\nenv = ["A=B"]', "NAMES"),
        ('command = ["claude"]\ntimeout_s = 0', "timeout_s"),
    ],
)
def test_bad_command_configs_are_explained(extra, needle):
    text = f'[[providers]]\nname = "c"\nkind = "command"\nmodels = ["m"]\n{extra}\n'
    with pytest.raises(ConfigError) as ei:
        parse_config(tomllib.loads(text), "x.toml")
    assert needle in str(ei.value)


def test_command_keys_belong_to_command_providers():
    text = '[[providers]]\nname = "o"\nkind = "ollama"\nbase_url = "http://x"\nmodels = ["m"]\ncommand = ["a"]\n'
    with pytest.raises(ConfigError, match="kind"):
        parse_config(tomllib.loads(text), "x.toml")


def test_the_example_config_shows_command_providers():
    text = (REPO / "config" / "example.toml").read_text()
    blocks = re.findall(r"^# \[\[providers\]\]\n(?:^# .*\n)+", text, re.M)
    programs = set()
    for block in blocks:
        body = "\n".join(line[2:] for line in block.splitlines())
        cfg = parse_config(tomllib.loads(body), "example.toml")
        (p,) = cfg.providers
        assert p.kind == "command" and p.command and p.models
        programs.add(p.command[0])
    assert programs >= {"claude", "opencode", "ollama", "llm"}
    for field in ("command", "env", "timeout_s"):
        assert f"# {field} =" in text


async def test_a_stop_from_on_delta_kills_the_program(tmp_path):
    """The engine stops the root at a closed ```repl block: the program must not run on."""
    script = tmp_path / "talk.py"
    script.write_text(
        "import sys, time\nsys.stdin.read()\nprint('first piece', flush=True)\ntime.sleep(300)\n"
    )
    cfg = ProviderConfig(
        name="t", kind="command", command=[sys.executable, str(script)], models=["m"]
    )
    provider = CommandProvider(cfg, {"PATH": os.environ["PATH"]})
    got: list[str] = []
    t0 = time.monotonic()
    res = await provider.chat(
        ChatRequest(model="m", messages=(Message("user", "go"),)),
        on_delta=lambda piece: got.append(piece) or True,
    )
    assert res.stopped and res.text == "first piece\n" and got == ["first piece\n"]
    assert time.monotonic() - t0 < 30


def test_a_missing_program_is_a_config_error():
    cfg = ProviderConfig(name="t", kind="command", command=["no-such-program-xyz"], models=["m"])
    with pytest.raises(ConfigError, match="not found"):
        CommandProvider(cfg, {"PATH": "/usr/bin:/bin"})
