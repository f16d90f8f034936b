"""The scripted loopback model server: rules, wire formats, failures, concurrency, CLI."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rlmd.testing.scripted_server import (
    ChatCall,
    Rule,
    ScriptedReply,
    ScriptedServer,
    embed_text,
    parse_rules,
    split_chunks,
)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _ollama_chat(srv: ScriptedServer, text: str, **body) -> str:
    r = httpx.post(
        srv.url + "/api/chat",
        json={"model": "m", "messages": _user(text), "stream": False, **body},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["message"]["content"]


def _sse_events(raw: str) -> list[tuple[str | None, str]]:
    events, event, data = [], None, []
    for line in raw.split("\n"):
        if not line:
            if data:
                events.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


def test_first_matching_rule_wins_and_times_falls_through() -> None:
    rules = [
        Rule(pattern=r"capital", reply=ScriptedReply(text="first"), times=1),
        Rule(pattern=r"capital", reply=ScriptedReply(text="second")),
        Rule(pattern="", reply=ScriptedReply(text="fallback")),
    ]
    with ScriptedServer(rules) as srv:
        assert _ollama_chat(srv, "the capital of France?") == "first"
        assert _ollama_chat(srv, "the capital of France?") == "second"
        assert _ollama_chat(srv, "the capital of Spain?") == "second"
        assert _ollama_chat(srv, "something else") == "fallback"
        assert [c.last_user for c in srv.calls][-1] == "something else"
        assert len(srv.calls) == 4


def test_system_pattern_model_and_responder() -> None:
    rules = [
        Rule(pattern="", system_pattern="pirate", reply=ScriptedReply(text="arr")),
        Rule(pattern="", model="big", reply=ScriptedReply(text="big answer")),
        Rule(pattern="", reply=ScriptedReply(text="plain")),
    ]

    def responder(call: ChatCall) -> ScriptedReply | None:
        if call.last_user.startswith("len:"):
            return ScriptedReply(text=str(len(call.last_user)))
        return None

    with ScriptedServer(rules, responder=responder) as srv:
        msgs = [{"role": "system", "content": "You are a pirate."}, *_user("hello")]
        r = httpx.post(
            srv.url + "/api/chat", json={"model": "m", "messages": msgs, "stream": False}
        )
        assert r.json()["message"]["content"] == "arr"
        # Anthropic's top-level system field is matched too.
        r = httpx.post(
            srv.url + "/v1/messages",
            json={"model": "m", "max_tokens": 10, "system": "pirate ship", "messages": _user("x")},
        )
        assert r.json()["content"][0]["text"] == "arr"
        assert srv.calls[-1].system == "pirate ship"
        assert _ollama_chat(srv, "q", model="big") == "big answer"
        assert _ollama_chat(srv, "q") == "plain"
        assert _ollama_chat(srv, "len:abcd") == "8"


def test_no_rule_matched_is_a_clear_400() -> None:
    with ScriptedServer([Rule(pattern="^only this$", reply=ScriptedReply(text="x"))]) as srv:
        r = httpx.post(
            srv.url + "/api/chat", json={"model": "m", "messages": _user("other"), "stream": False}
        )
        assert r.status_code == 400
        assert "no rule matched" in r.json()["error"] and "'other'" in r.json()["error"]
    with ScriptedServer([], default=ScriptedReply(text="dflt")) as srv:
        assert _ollama_chat(srv, "anything") == "dflt"


def test_ollama_stream_and_usage() -> None:
    with ScriptedServer(
        [Rule(reply=ScriptedReply(text="one two three", usage_in=7, usage_out=3))]
    ) as srv:
        with httpx.stream(
            "POST", srv.url + "/api/chat", json={"model": "m", "messages": _user("q")}
        ) as r:
            lines = [json.loads(x) for x in r.iter_lines() if x]
        assert "".join(x["message"]["content"] for x in lines) == "one two three"
        assert len(lines) == 4 and lines[-1]["done"] is True
        assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (7, 3)
        assert srv.calls[0].stream is True
        assert httpx.get(srv.url + "/").text == "Ollama is running"
        assert httpx.get(srv.url + "/api/ps").json()["models"][0]["name"] == "scripted"


def test_openai_stream_usage_only_when_asked() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="a b", chunks=2))]) as srv:
        body = {"model": "m", "messages": _user("q"), "stream": True}
        raw = httpx.post(srv.url + "/v1/chat/completions", json=body).text
        assert ": keep-alive" in raw
        events = [d for _, d in _sse_events(raw)]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(d) for d in events[:-1]]
        assert not any(c.get("usage") for c in chunks)
        body["stream_options"] = {"include_usage": True}
        events = [
            d for _, d in _sse_events(httpx.post(srv.url + "/v1/chat/completions", json=body).text)
        ]
        last = json.loads(events[-2])
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 1
        text = "".join(
            c["choices"][0]["delta"].get("content", "")
            for c in map(json.loads, events[:-1])
            if c["choices"]
        )
        assert text == "a b"
        full = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": "m", "messages": _user("q")}
        ).json()
        assert full["choices"][0]["message"]["content"] == "a b"
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "scripted"


def test_anthropic_stream_events_and_max_tokens_required() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="hi there", usage_out=5))]) as srv:
        r = httpx.post(
            srv.url + "/v1/messages", json={"model": "m", "messages": _user("q"), "stream": True}
        )
        assert r.status_code == 400 and "max_tokens" in r.text
        r = httpx.post(
            srv.url + "/v1/messages",
            json={"model": "m", "max_tokens": 9, "messages": _user("q"), "stream": True},
        )
        events = _sse_events(r.text)
        kinds = [e for e, _ in events]
        assert kinds[:3] == ["message_start", "content_block_start", "ping"]
        assert kinds[-2:] == ["message_delta", "message_stop"]
        text = "".join(
            json.loads(d)["delta"]["text"] for e, d in events if e == "content_block_delta"
        )
        assert text == "hi there"
        assert json.loads(events[-2][1])["usage"]["output_tokens"] == 5


def test_error_status_and_retry_after() -> None:
    rules = [
        Rule(reply=ScriptedReply(status=429, retry_after=3, error="slow down"), times=1),
        Rule(reply=ScriptedReply(text="ok")),
    ]
    with ScriptedServer(rules) as srv:
        r = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": "m", "messages": _user("q")}
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["message"] == "slow down"
        assert _ollama_chat(srv, "q") == "ok"


def test_error_mid_stream_ollama_line_with_200() -> None:
    reply = ScriptedReply(
        text="a b c", error_mid_stream="model runner crashed", error_after_chunks=1
    )
    with ScriptedServer([Rule(reply=reply)]) as srv:
        with httpx.stream(
            "POST", srv.url + "/api/chat", json={"model": "m", "messages": _user("q")}
        ) as r:
            assert r.status_code == 200
            lines = [json.loads(x) for x in r.iter_lines() if x]
        assert lines[0]["message"]["content"] == "a "
        assert lines[-1] == {"error": "model runner crashed"}


def test_die_after_chunks_cuts_the_stream() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="a b c d", die_after_chunks=2))]) as srv:
        got = []
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream(
                "POST", srv.url + "/api/chat", json={"model": "m", "messages": _user("q")}
            ) as r:
                for line in r.iter_lines():
                    got.append(json.loads(line)["message"]["content"])
        assert got == ["a ", "b "]


def test_hang_ends_when_client_leaves() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="never", hang=True))]) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                srv.url + "/v1/chat/completions",
                json={"model": "m", "messages": _user("q"), "stream": True},
                timeout=httpx.Timeout(5, read=0.3),
            )
        assert srv.wait_idle(3) and srv.calls[0].t_end is not None


def test_down_refuses_and_up_serves_again_on_same_port() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="ok"))]) as srv:
        port = srv.port
        assert _ollama_chat(srv, "q") == "ok"
        srv.down()
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/", timeout=2)
        srv.up()
        assert srv.port == port
        assert _ollama_chat(srv, "q") == "ok"


def test_down_cuts_open_streams() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="a b c", chunk_delay_s=5))]) as srv:
        with httpx.stream(
            "POST", srv.url + "/api/chat", json={"model": "m", "messages": _user("q")}, timeout=10
        ) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["message"]["content"] == "a "
            t = time.monotonic()
            srv.down()
            with pytest.raises(httpx.TransportError):
                list(lines)
            assert time.monotonic() - t < 2


async def test_fifty_parallel_streams_really_overlap() -> None:
    n, delay = 50, 0.4
    with ScriptedServer([Rule(reply=ScriptedReply(text="x y z", delay_s=delay))]) as srv:
        async with httpx.AsyncClient(
            base_url=srv.url, limits=httpx.Limits(max_connections=None), timeout=20
        ) as client:

            async def one(i: int) -> str:
                r = await client.post(
                    "/api/chat", json={"model": "m", "messages": _user(f"q{i}"), "stream": False}
                )
                return r.json()["message"]["content"]

            t0 = time.monotonic()
            out = await asyncio.gather(*(one(i) for i in range(n)))
            took = time.monotonic() - t0
        assert out == ["x y z"] * n
        assert srv.max_concurrent == n
        # Serial service would take n * delay = 20 s.
        assert took < n * delay / 4
        assert srv.wait_idle(3)


def test_embeddings_deterministic_and_similar() -> None:
    with ScriptedServer() as srv:
        texts = [
            "the cat sat on the mat",
            "the cat sat on the mat",
            "a cat on a mat",
            "quantum chromodynamics lecture",
        ]
        o = httpx.post(srv.url + "/api/embed", json={"model": "e", "input": texts}).json()
        v = httpx.post(srv.url + "/v1/embeddings", json={"model": "e", "input": texts}).json()
        vecs = o["embeddings"]
        assert [d["embedding"] for d in v["data"]] == vecs
        assert len(vecs[0]) == 256
        assert math.isclose(sum(x * x for x in vecs[0]), 1.0)

        def cos(a: list[float], b: list[float]) -> float:
            return sum(x * y for x, y in zip(a, b, strict=True))

        assert vecs[0] == vecs[1]
        assert cos(vecs[0], vecs[2]) > 0.3 > abs(cos(vecs[0], vecs[3]))
        assert srv.embed_calls[0].texts == texts
    assert embed_text("") == [1.0] + [0.0] * 255


def test_api_key_required_when_configured() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="ok"))], api_key="sk-test") as srv:
        body = {"model": "m", "messages": _user("q")}
        assert httpx.post(srv.url + "/v1/chat/completions", json=body).status_code == 401
        r = httpx.post(
            srv.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"}
        )
        assert r.status_code == 200
        assert srv.calls[-1].headers["authorization"] == "Bearer sk-test"


def test_split_chunks_and_rules_parsing() -> None:
    assert split_chunks("one two  three", None) == ["one ", "two  ", "three"]
    assert "".join(split_chunks("abcdefg", 3)) == "abcdefg"
    assert len(split_chunks("abcdefg", 3)) == 3
    rules, models, default = parse_rules(
        {
            "models": ["a"],
            "default": "dunno",
            "rules": [{"pattern": "x", "reply": "bare"}, {"reply": {"text": "t"}, "times": 1}],
        }
    )
    assert rules[0].reply.text == "bare" and rules[1].times == 1
    assert models == ["a"] and default is not None and default.text == "dunno"
    with pytest.raises(ValueError, match="bad regex"):
        parse_rules([{"pattern": "("}])
    with pytest.raises(ValueError, match="invalid rules"):
        parse_rules([{"reply": {"txt": "typo"}}])


def test_cli_prints_port_and_serves(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"pattern": "ping", "reply": {"text": "pong"}}]}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlmd.testing.scripted_server",
            "--rules",
            str(rules),
            "--delay",
            "0.3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("PORT ")
        port = int(first.split()[1])
        t = time.monotonic()
        r = httpx.post(
            f"http://127.0.0.1:{port}/api/chat",
            json={"model": "m", "messages": _user("ping"), "stream": False},
        )
        assert r.json()["message"]["content"] == "pong"
        assert time.monotonic() - t >= 0.3  # --delay
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0


def test_cli_bad_rules_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"pattern": "(", "reply": "x"}]')
    p = subprocess.run(
        [sys.executable, "-m", "rlmd.testing.scripted_server", "--rules", str(bad)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert p.returncode == 2 and "bad regex" in p.stderr and str(bad) in p.stderr


def test_expand_fills_the_reply_from_the_match() -> None:
    rule = Rule(pattern=r"say (\w+)", expand=True, reply=ScriptedReply(text=r"\1!"))
    with ScriptedServer([rule]) as srv:
        assert _ollama_chat(srv, "please say hello") == "hello!"
    rules, _, _ = parse_rules([{"pattern": "say (\\w+)", "expand": True, "reply": "\\1!"}])
    assert rules[0].pattern == r"say (\w+)" and rules[0].reply.text == r"\1!"


def test_broken_responder_is_a_clear_400() -> None:
    def responder(call: ChatCall) -> ScriptedReply | None:
        raise KeyError("oops")

    with ScriptedServer(responder=responder) as srv:
        r = httpx.post(
            srv.url + "/api/chat", json={"model": "m", "messages": _user("q"), "stream": False}
        )
        assert r.status_code == 400
        assert r.json()["error"] == "scripted server: responder raised KeyError: 'oops'"
        assert srv.wait_idle(3)
