"""A fresh install answers a real query with no configuration: the daemon (default config,
no providers) serves the embedded Qwen2.5-Coder-1.5B on llama.cpp, and the RLM loop
drives it over a context too large to read whole."""

from __future__ import annotations

import random
import string

import pytest


@pytest.mark.embedded
def test_fresh_daemon_answers_with_the_embedded_model(make_daemon):
    d = make_daemon("[limits]\nmax_iterations = 8\ncell_timeout_s = 30\n")
    st = d.call("daemon/status")
    [prov] = st["providers"]
    assert prov["kind"] == "embedded" and "idle" in st["embedded"]  # nothing loaded yet
    rnd = random.Random(1)
    lines = [
        " ".join("".join(rnd.choices(string.ascii_lowercase, k=6)) for _ in range(10))
        for _ in range(20_000)
    ]
    lines[13_579] = "The secret password is TANGERINE-7."
    info = d.call("context/put", {"name": "hay", "text": "\n".join(lines)})
    assert info["chars"] > 1_000_000
    events: list[dict] = []
    with d.client(timeout=900) as c:
        res = c.call(
            "query/run",
            {"query": "What is the secret password?", "context": "hay", "job": "real"},
            on_event=events.append,
        )
    trace = d.call("query/trace", {"job": "real"})["records"]
    assert "TANGERINE-7" in res["answer"], trace
    assert res["root_model"] == "qwen2.5-coder-1.5b"
    assert res["tokens"]["input"] > 0 and res["iterations"] >= 1
    kinds = [e["kind"] for e in events]
    assert "code" in kinds and "root_delta" in kinds  # it looked with code and streamed
    assert kinds[-1] == "final"
    assert "ready" in d.call("daemon/status")["embedded"]
    # The cold model's load was announced before the first token (issue 12, bug 11).
    phases = [e.get("phase") for e in events if e["kind"] == "phase"]
    assert phases[0] == "loading_model" and "prompt" in phases


@pytest.mark.embedded
def test_embedded_model_finds_a_long_context_needle_with_its_source(make_daemon):
    """About 400k characters (100k tokens, six windows of the model): the answer is right,
    and its source is the needle's line, found in the context by the engine."""
    d = make_daemon("[limits]\nmax_iterations = 8\ncell_timeout_s = 30\n")
    rnd = random.Random(7)
    words = ["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor"]
    lines = [" ".join(rnd.choices(words, k=9)) + f" {i}." for i in range(8_000)]
    depth = 5_555
    lines[depth] = "The access code for the north vault is OKAPI-3141."
    d.call("context/put", {"name": "vault", "text": "\n".join(lines)})
    with d.client(timeout=1200) as c:
        res = c.call(
            "query/run",
            {
                "query": "What is the access code for the north vault?",
                "context": "vault",
                "job": "vault",
            },
        )
    trace = d.call("query/trace", {"job": "vault"})["records"]
    assert "OKAPI-3141" in res["answer"], trace
    assert res["start"] == "rlm"  # far too long to show whole
    assert res["supported"] is True
    assert any(s["line"] == depth + 1 and "OKAPI-3141" in s["text"] for s in res["sources"])
