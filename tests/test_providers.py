"""The HTTP providers against the scripted loopback server (real sockets, real formats)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from rlmd.config import ConfigError, ProviderConfig
from rlmd.providers.anthropic import AnthropicProvider
from rlmd.providers.base import ChatRequest, Message, ProviderError
from rlmd.providers.http import HttpProvider, retry_after_seconds, sse_events
from rlmd.providers.ollama import OllamaProvider
from rlmd.providers.openai import OpenAIProvider
from rlmd.providers.registry import build_provider
from rlmd.testing.scripted_server import Rule, ScriptedReply, ScriptedServer, embed_text

KINDS = ["ollama", "openai", "anthropic"]
KEY = "sk-test-SECRET-1234567890"
_CLASSES: dict[str, type[HttpProvider]] = {
    "ollama": OllamaProvider,
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}
_CHAT_PATH = {"ollama": "/api/chat", "openai": "/chat/completions", "anthropic": "/v1/messages"}


def _cfg(kind: str, srv: ScriptedServer, **kw) -> ProviderConfig:
    base = srv.url + "/v1" if kind == "openai" else srv.url
    return ProviderConfig(name=f"p-{kind}", kind=kind, base_url=base, models=["m"], **kw)


MakeProvider = Callable[..., HttpProvider]


@pytest.fixture
async def make(request) -> AsyncIterator[MakeProvider]:
    """``make(kind, srv, api_key=..., stream=..., **config)`` -> a provider, closed after."""
    made: list[HttpProvider] = []

    def _make(
        kind: str, srv: ScriptedServer, *, api_key: str | None = None, stream: bool = True, **kw
    ) -> HttpProvider:
        key = api_key if api_key is not None else (KEY if kind != "ollama" else None)
        p = _CLASSES[kind](_cfg(kind, srv, **kw), api_key=key, stream=stream)
        made.append(p)
        return p

    yield _make
    for p in made:
        await p.aclose()


def _req(text: str = "question", *, system: str | None = None, **kw) -> ChatRequest:
    msgs = [Message("system", system)] if system else []
    return ChatRequest(model="m", messages=(*msgs, Message("user", text)), **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
async def test_chat_text_usage_and_timings(kind: str, stream: bool, make) -> None:
    reply = ScriptedReply(text="The answer is 42.", usage_in=11, usage_out=5, delay_s=0.05)
    with ScriptedServer([Rule(pattern="question", reply=reply)], api_key=KEY) as srv:
        p = make(kind, srv, stream=stream)
        pieces: list[str] = []
        res = await p.chat(_req(system="be brief"), pieces.append)
        assert res.text == "The answer is 42."
        assert (res.usage.input, res.usage.output) == (11, 5)
        assert not res.usage_estimated and not res.stopped
        assert res.provider == f"p-{kind}" and res.model == "m"
        assert 0.05 <= res.ttft_s <= res.elapsed_s < 2
        assert "".join(pieces) == res.text
        assert len(pieces) == (4 if stream else 1)
        call = srv.calls[0]
        assert call.stream is stream
        assert call.system == "be brief" and call.last_user == "question"


async def test_ollama_sends_options_keep_alive_and_limits(make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="ok"))]) as srv:
        p = make("ollama", srv, keep_alive="30m", options={"num_ctx": 32768, "top_k": 20})
        await p.chat(_req(max_tokens=77, stop=("```",), temperature=0.5))
        body = srv.calls[0].body
        assert body["keep_alive"] == "30m"
        assert body["options"] == {
            "num_ctx": 32768,
            "top_k": 20,
            "temperature": 0.5,
            "num_predict": 77,
            "stop": ["```"],
        }
        assert body["stream"] is True


async def test_anthropic_body_system_field_and_required_max_tokens(make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="ok"))]) as srv:
        p = make("anthropic", srv)
        await p.chat(_req(system="sys prompt"))
        body, headers = srv.calls[0].body, srv.calls[0].headers
        assert body["system"] == "sys prompt"
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert body["max_tokens"] == 4096
        assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
        p2 = make("anthropic", srv, max_tokens=123)
        await p2.chat(_req())
        assert srv.calls[1].body["max_tokens"] == 123
        # A base_url ending in /v1 means the same server.
        p3 = AnthropicProvider(_cfg("anthropic", srv), api_key=KEY, base_url=srv.url + "/v1/")
        try:
            assert (await p3.chat(_req())).text == "ok"
        finally:
            await p3.aclose()


async def test_openai_keyless_and_usage_requested(make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="a b c", quirks=True, usage_out=9))]) as srv:
        p = make("openai", srv, api_key="")
        res = await p.chat(_req())
        call = srv.calls[0]
        assert "authorization" not in call.headers
        assert call.body["stream_options"] == {"include_usage": True}
        # keep-alive comments, null and empty choices were in the stream (quirks=True);
        # the usage came on the last chunk.
        assert res.text == "a b c" and res.usage.output == 9 and not res.usage_estimated


async def test_ollama_error_line_with_http_200(make) -> None:
    reply = ScriptedReply(
        text="partial answer here",
        error_mid_stream="runner died: out of memory",
        error_after_chunks=1,
    )
    with ScriptedServer([Rule(reply=reply)]) as srv:
        p = make("ollama", srv)
        got: list[str] = []
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req(), got.append)
        err = ei.value
        assert got == ["partial "]
        assert err.streamed and not err.retryable
        msg = str(err)
        assert "p-ollama" in msg and "/api/chat" in msg and "runner died: out of memory" in msg
        # Nothing reached a caller yet: another server may well answer.
        srv.set_rules(
            [Rule(reply=ScriptedReply(text="x", error_mid_stream="boom", error_after_chunks=0))]
        )
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req())
        assert ei.value.retryable and not ei.value.streamed


async def test_openai_error_event_in_stream(make) -> None:
    reply = ScriptedReply(
        text="a b", error_mid_stream="context length exceeded", error_after_chunks=0
    )
    with ScriptedServer([Rule(reply=reply)]) as srv:
        with pytest.raises(ProviderError, match="context length exceeded"):
            await make("openai", srv).chat(_req())


async def test_anthropic_ping_and_error_events(make) -> None:
    reply = ScriptedReply(text="one two three", quirks=True)  # extra ping mid-stream
    with ScriptedServer(
        [
            Rule(pattern="ok", reply=reply),
            Rule(
                reply=ScriptedReply(text="x y", error_mid_stream="Overloaded", error_after_chunks=1)
            ),
        ],
        api_key=KEY,
    ) as srv:
        p = make("anthropic", srv)
        assert (await p.chat(_req("ok"))).text == "one two three"
        got: list[str] = []
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req("fail"), got.append)
        assert "overloaded_error: Overloaded" in str(ei.value)
        assert ei.value.streamed and not ei.value.retryable and got == ["x "]
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req("fail"))
        assert ei.value.retryable and not ei.value.streamed


@pytest.mark.parametrize("kind", KINDS)
async def test_server_dies_mid_stream(kind: str, make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="a b c d e", die_after_chunks=2))]) as srv:
        p = make(kind, srv)
        got: list[str] = []
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req(), got.append)
        assert got == ["a ", "b "]
        assert ei.value.streamed and not ei.value.retryable
        assert "connection lost" in str(ei.value) and _CHAT_PATH[kind] in str(ei.value)
        # Without a caller watching the stream, the same failure is retryable.
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req())
        assert ei.value.retryable and not ei.value.streamed


@pytest.mark.parametrize("kind", KINDS)
async def test_status_errors_retry_after(kind: str, make) -> None:
    rules = [
        Rule(pattern="rate", reply=ScriptedReply(status=429, retry_after=2, error="slow down")),
        Rule(pattern="crash", reply=ScriptedReply(status=503, error="loading model")),
        Rule(pattern="bad", reply=ScriptedReply(status=400, error="prompt too long")),
    ]
    with ScriptedServer(rules) as srv:
        p = make(kind, srv)
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req("rate"))
        e = ei.value
        assert e.retryable and e.retry_after_s == 2 and e.status == 429 and not e.streamed
        assert "HTTP 429" in str(e) and "slow down" in str(e) and _CHAT_PATH[kind] in str(e)
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req("crash"))
        assert ei.value.retryable and ei.value.status == 503 and "loading model" in str(ei.value)
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req("bad"))
        assert not ei.value.retryable and "prompt too long" in str(ei.value)


@pytest.mark.parametrize("kind", KINDS)
async def test_hang_before_first_token_times_out(kind: str, make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="never", hang=True))]) as srv:
        p = make(kind, srv, first_token_timeout_s=0.3)
        t = time.monotonic()
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req(), lambda s: None)
        took = time.monotonic() - t
        assert 0.3 <= took < 1.5
        assert ei.value.retryable and not ei.value.streamed
        assert "no first token within 0.3s" in str(ei.value)
        # The server notices the client left.
        assert await asyncio.to_thread(srv.wait_idle, 3)
        assert srv.in_flight == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_first_token_timeout_does_not_cut_long_answers(kind: str, make) -> None:
    reply = ScriptedReply(text="a b c d e f", delay_s=0.05, chunk_delay_s=0.15)  # ~0.8 s in all
    with ScriptedServer([Rule(reply=reply)]) as srv:
        p = make(kind, srv, first_token_timeout_s=0.5, total_timeout_s=5)
        res = await p.chat(_req())
        assert res.text == "a b c d e f" and res.elapsed_s > 0.7


async def test_total_timeout_after_first_token(make) -> None:
    reply = ScriptedReply(text="a b c d e f", chunk_delay_s=0.3)
    with ScriptedServer([Rule(reply=reply)]) as srv:
        p = make("openai", srv, first_token_timeout_s=0.5, total_timeout_s=0.7)
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req(), lambda s: None)
        assert ei.value.streamed and not ei.value.retryable
        assert "not finished within 0.7s" in str(ei.value)


@pytest.mark.parametrize("kind", KINDS)
async def test_server_down_then_up(kind: str, make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="ok"))], api_key=KEY) as srv:
        p = make(kind, srv, connect_timeout_s=1)
        assert await p.health()
        srv.down()
        assert not await p.health()
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req())
        assert ei.value.retryable and "cannot connect" in str(ei.value)
        srv.up()
        assert await p.health()
        assert (await p.chat(_req())).text == "ok"


async def test_openai_health_probes_when_server_has_no_health(make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="pong"))], health_endpoint=False) as srv:
        p = make("openai", srv)
        assert await p.health()
        assert srv.calls[-1].body["max_tokens"] == 1
        srv.set_rules([Rule(reply=ScriptedReply(status=500))])
        assert not await p.health()
        assert ("GET", "/health") in srv.requests


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_api_key_sent_but_never_shown(kind: str, make) -> None:
    rules = [Rule(reply=ScriptedReply(status=401, error=f"Incorrect API key provided: {KEY}."))]
    with ScriptedServer(rules) as srv:
        p = make(kind, srv)
        assert KEY not in repr(p) and "p-" + kind in repr(p)
        with pytest.raises(ProviderError) as ei:
            await p.chat(_req())
        sent = srv.calls[0].headers
        assert sent.get("authorization") == f"Bearer {KEY}" or sent.get("x-api-key") == KEY
        assert KEY not in str(ei.value) and KEY not in repr(ei.value)
        assert "Incorrect API key provided: ***" in str(ei.value)
        assert not ei.value.retryable and ei.value.status == 401


@pytest.mark.parametrize("kind", KINDS)
async def test_on_delta_stop_closes_the_stream(kind: str, make) -> None:
    reply = ScriptedReply(text=" ".join(f"w{i}" for i in range(60)), chunk_delay_s=0.1)
    with ScriptedServer([Rule(reply=reply)]) as srv:
        p = make(kind, srv)
        got: list[str] = []

        def on_delta(piece: str) -> bool:
            got.append(piece)
            return len(got) == 2

        res = await p.chat(_req(), on_delta)
        assert res.stopped and res.usage_estimated
        assert res.text == "w0 w1 " and got == ["w0 ", "w1 "]
        assert res.elapsed_s < 1.0  # not the 3 s the whole answer takes
        assert res.usage.output == 1  # estimated from "w0 w1 "
        assert await asyncio.to_thread(srv.wait_idle, 3)
        assert srv.in_flight == 0  # the server saw the stream closed


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_embed(kind: str, make) -> None:
    with ScriptedServer() as srv:
        p = make(kind, srv)
        texts = ["alpha beta", "gamma", "alpha beta"]
        vecs = await p.embed("e", texts)
        assert vecs == [embed_text(t) for t in texts]
        assert srv.embed_calls[0].texts == texts and srv.embed_calls[0].model == "e"


async def test_anthropic_embed_is_a_clear_error(make) -> None:
    with ScriptedServer() as srv:
        with pytest.raises(ProviderError, match="no embeddings API") as ei:
            await make("anthropic", srv).embed("e", ["x"])
        assert not ei.value.retryable


async def test_parallel_calls_share_one_provider(make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="x", delay_s=0.3))]) as srv:
        p = make("openai", srv, capacity=20)
        t = time.monotonic()
        results = await asyncio.gather(*(p.chat(_req(f"q{i}")) for i in range(20)))
        assert [r.text for r in results] == ["x"] * 20
        assert srv.max_concurrent == 20 and time.monotonic() - t < 2


def test_registry_builds_each_kind_and_reads_keys() -> None:
    def cfg(kind: str, **kw) -> ProviderConfig:
        return ProviderConfig(
            name=kind, kind=kind, base_url="http://127.0.0.1:1", models=["m"], **kw
        )

    env = {"MY_KEY": KEY}
    assert isinstance(build_provider(cfg("ollama"), env), OllamaProvider)
    assert isinstance(build_provider(cfg("openai"), env), OpenAIProvider)
    p = build_provider(cfg("anthropic", api_key_env="MY_KEY"), env)
    assert isinstance(p, AnthropicProvider) and KEY not in repr(p)
    with pytest.raises(ConfigError, match="environment variable MISSING_KEY is not set"):
        build_provider(cfg("openai", api_key_env="MISSING_KEY"), env)
    with pytest.raises(ConfigError, match="api_key_env"):
        build_provider(cfg("anthropic"), env)
    emb = ProviderConfig(name="local", kind="embedded")
    with pytest.raises(NotImplementedError, match="embedded_factory"):
        build_provider(emb, env)
    sentinel = object()
    assert build_provider(emb, env, embedded_factory=lambda c: sentinel) is sentinel


async def test_registry_provider_sends_key_from_env() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="ok"))], api_key=KEY) as srv:
        cfg = ProviderConfig(
            name="ds", kind="openai", base_url=srv.url + "/v1", models=["m"], api_key_env="DS_KEY"
        )
        p = build_provider(cfg, {"DS_KEY": KEY})
        try:
            assert (await p.chat(_req())).text == "ok"
        finally:
            await p.aclose()


async def test_sse_parser_comments_multiline_and_llamacpp_error_lines() -> None:
    raw = (
        b": keep-alive\n\n"
        b'event: message_start\ndata: {"a":\ndata: 1}\n\n'
        b"data: x\r\n\r\n"
        b'error: {"code": 500, "message": "slot unavailable"}\n\n'
        b"data: tail"
    )
    resp = httpx.Response(200, content=raw)
    events = [e async for e in sse_events(resp)]
    assert events == [
        ("message_start", '{"a":\n1}'),
        ("message", "x"),
        ("error", '{"code": 500, "message": "slot unavailable"}'),
        ("message", "tail"),
    ]


def test_retry_after_forms() -> None:
    assert retry_after_seconds(httpx.Headers({"Retry-After": "7"})) == 7
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = retry_after_seconds(httpx.Headers({"Retry-After": date}))
    assert got is not None and 25 <= got <= 31
    assert retry_after_seconds(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after_seconds(httpx.Headers()) is None


def test_bad_base_url_is_a_clear_error() -> None:
    cfg = ProviderConfig(name="x", kind="ollama", base_url="localhost:11434", models=["m"])
    with pytest.raises(ConfigError, match="base_url must start with http"):
        build_provider(cfg, {})


async def test_openai_provider_with_explicit_base_url_and_no_key() -> None:
    # How the embedded provider reuses this client for its llama.cpp server.
    with ScriptedServer([Rule(reply=ScriptedReply(text="local"))]) as srv:
        cfg = ProviderConfig(name="local", kind="embedded")
        p = OpenAIProvider(cfg, base_url=srv.url + "/v1")
        try:
            assert await p.health()
            res = await p.chat(_req())
            assert res.text == "local" and res.provider == "local"
            assert "authorization" not in srv.calls[0].headers
        finally:
            await p.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_server_ignoring_stream_flag_still_answers(kind: str, make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="whole answer", no_stream=True))]) as srv:
        got: list[str] = []
        res = await make(kind, srv).chat(_req(), got.append)
        assert srv.calls[0].stream  # the provider asked for a stream...
        assert res.text == "whole answer" and got == ["whole answer"]  # ...and coped


async def test_shared_client_still_sends_each_providers_key() -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="ok"))], api_key=KEY) as srv:
        async with httpx.AsyncClient() as shared:
            a = OpenAIProvider(_cfg("openai", srv), api_key=KEY, client=shared)
            b = AnthropicProvider(_cfg("anthropic", srv), api_key=KEY, client=shared)
            assert (await a.chat(_req())).text == "ok"
            assert (await b.chat(_req())).text == "ok"
            assert await a.health() and await b.health()
            await a.aclose()  # not the provider's client: stays open
            assert not shared.is_closed
        assert srv.calls[0].headers["authorization"] == f"Bearer {KEY}"
        assert "authorization" not in srv.calls[1].headers
        assert srv.calls[1].headers["x-api-key"] == KEY


@pytest.mark.parametrize("kind", KINDS)
async def test_connections_are_reused_and_stopped_streams_dropped(kind: str, make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="a b c d e f"))]) as srv:
        p = make(kind, srv)
        for _ in range(5):
            assert (await p.chat(_req(), lambda s: None)).text == "a b c d e f"
        assert srv.connections == 1
        res = await p.chat(_req(), lambda s: True)  # stop at the first piece
        assert res.stopped and res.text == "a "
        assert (await p.chat(_req())).text == "a b c d e f"
        assert srv.connections == 2  # the stopped stream's connection was closed


@pytest.mark.parametrize("kind", KINDS)
async def test_stop_sequences_reach_the_server(kind: str, make) -> None:
    with ScriptedServer([Rule(reply=ScriptedReply(text="print(1)\n```\nmore text"))]) as srv:
        res = await make(kind, srv).chat(_req(stop=("```", "never")))
        assert srv.calls[0].stop == ["```", "never"]
        assert res.text == "print(1)\n"


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("kind", KINDS)
async def test_line_without_newline_is_bounded(kind: str, make) -> None:
    """A server answering 200 and then bytes with no newline ends the call with a clear
    error once a line passes max_line_bytes (it used to be buffered without limit)."""
    flood = ScriptedReply(flood_bytes=48 * 1024 * 1024)
    with ScriptedServer([Rule(reply=flood)], api_key=KEY) as srv:
        p = make(kind, srv, max_line_bytes=1024 * 1024)
        t0 = time.monotonic()
        with pytest.raises(ProviderError) as info:
            await p.chat(_req())
        took = time.monotonic() - t0
    msg = str(info.value)
    assert f"line over {1024 * 1024} bytes from provider 'p-{kind}'" in msg, msg
    assert "max_line_bytes" in msg and info.value.retryable and not info.value.streamed
    assert took < 10


@pytest.mark.parametrize("kind", KINDS)
async def test_whole_json_body_is_bounded(kind: str, make) -> None:
    flood = ScriptedReply(flood_bytes=16 * 1024 * 1024)
    with ScriptedServer([Rule(reply=flood)], api_key=KEY) as srv:
        p = make(kind, srv, stream=False, max_response_bytes=2 * 1024 * 1024)
        with pytest.raises(ProviderError, match=r"answer over 2097152 bytes from provider"):
            await p.chat(_req())


async def test_stream_total_is_bounded_even_with_short_lines(make) -> None:
    # Many short lines: no line is long, the whole answer is.
    reply = ScriptedReply(text="word " * 50_000)
    with ScriptedServer([Rule(reply=reply)]) as srv:
        p = make("ollama", srv, max_line_bytes=4096, max_response_bytes=1024 * 1024)
        with pytest.raises(ProviderError, match=r"answer over 1048576 bytes"):
            await p.chat(_req())
