"""Known secrets (the API keys the daemon holds) never leave it, even when a model server
echoes one back: unit checks of the redactor, then a real daemon whose provider echoes
its key in root deltas (split across pieces), sub-call answers and the final answer."""

from __future__ import annotations

from pathlib import Path

from rlmd.config import Config, ProviderConfig
from rlmd.secrets import MASK, Redactor
from rlmd.testing.scripted_server import ChatCall, ScriptedReply, ScriptedServer

KEY = "sk-echo-0123456789abcdefSECRET"
ROOT, SUB = "root-model", "sub-model"
F = "```"


def test_redact_whole_and_split_across_deltas() -> None:
    r = Redactor([KEY, "short"])  # "short" is below the minimum length: not a secret
    assert r.redact(f"a {KEY} b short") == f"a {MASK} b short"
    for cut in range(1, len(KEY)):
        got: list[str] = []
        s = r.stream(got.append)
        for piece in ("x" + KEY[:cut], KEY[cut:] + " y", " z"):
            s(piece)
        s.flush()
        assert "".join(got) == f"x{MASK} y z", cut
        assert all(KEY[: len(KEY) // 2] not in g for g in got)
    # Nothing is held back when the tail cannot start a secret.
    got = []
    r.stream(got.append)("plain text")
    assert got == ["plain text"]


def test_from_config_reads_every_key_and_never_shows_one() -> None:
    cfg = Config(
        providers=[
            ProviderConfig(
                name="a", kind="openai", base_url="http://x/v1", models=["m"], api_key_env="K1"
            ),
            ProviderConfig(
                name="b", kind="openai", base_url="http://y/v1", models=["m"], api_key_env="K2"
            ),
        ]
    )
    r = Redactor.from_config(cfg, {"K1": "key-one-123456", "K2": "key-two-654321"})
    assert r.redact("key-one-123456 key-two-654321") == f"{MASK} {MASK}"
    assert "key-" not in repr(r)


def _responder(call: ChatCall) -> ScriptedReply:
    if call.model == SUB:
        return ScriptedReply(text=f"the sub model says {KEY} again", chunks=9)
    if "printed:" in call.last_user:
        return ScriptedReply(text=f"FINAL(the key is {KEY})", chunks=7)
    code = "print('printed:', llm_query('echo your key'))"
    return ScriptedReply(text=f"My key is {KEY}.\n{F}repl\n{code}\n{F}\n", chunks=37)


def test_echoed_key_is_in_no_event_result_trace_cache_or_log(make_daemon) -> None:
    with ScriptedServer(responder=_responder, models=[ROOT, SUB]) as srv:
        config = f"""
[[providers]]
name = "echoer"
kind = "ollama"
base_url = "{srv.url}"
models = ["{ROOT}", "{SUB}"]
capacity = 4
api_key_env = "RLMD_ECHO_KEY"

[models]
root = "{ROOT}"
sub = "{SUB}"
"""
        d = make_daemon(config, env={"RLMD_ECHO_KEY": KEY})
        events: list[dict] = []
        with d.client() as c:
            res = c.call(
                "query/run", {"query": "what is your key?", "job": "echo"}, on_event=events.append
            )
            again = c.call("query/run", {"query": "what is your key?", "job": "echo2"})
        # The server really echoed it (in the root deltas and in the sub-call answer).
        assert any(c.model == SUB for c in srv.calls)
        d.stop()
    assert MASK in res["answer"] and KEY not in str(res), res
    assert KEY not in str(again)
    deltas = "".join(e.get("text", "") for e in events if e["kind"] == "root_delta")
    assert MASK in deltas, deltas
    assert KEY not in str(events)
    assert any(MASK in str(e) for e in events if e["kind"] == "output")  # what the worker saw
    secret = KEY.encode()
    leaked = [p for p in Path(d.state_dir).rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked, leaked  # traces, the cache DB (and its WAL), everything
    assert (Path(d.state_dir) / "cache" / "calls.sqlite").exists()
    assert secret not in d.log.read_bytes()
