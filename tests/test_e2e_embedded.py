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
