"""The embedded default model: real llama.cpp servers answering real questions.

Tests marked ``embedded`` load the real GGUF models (joined once into the shared model
cache dir, ``RLMD_MODEL_DIR`` or ``~/.cache/rlmd/models``, which CI keeps between runs)
and take a minute or two on 2 cores.  The others need no model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rlmd.config import EmbeddedConfig, ProviderConfig
from rlmd.providers.base import ChatRequest, Message, ProviderError
from rlmd.providers.embedded import EmbeddedProvider, embedded_provider_config
from rlmd.providers.weights import MODELS, ModelSpec

PASSAGE = (
    "Harbour log, 1911. The lighthouse at Vardø was kept by Ingrid Solberg, who came "
    "from Tromsø in 1904. She kept fourteen cats and a goat named Bjørn. Supply boats "
    "called every second Thursday."
)


def ask(model: str, question: str, max_tokens: int = 24) -> ChatRequest:
    return ChatRequest(
        model=model,
        messages=(
            Message("system", "Answer from the passage, briefly."),
            Message("user", f"Passage:\n{PASSAGE}\n\nQuestion: {question}"),
        ),
        max_tokens=max_tokens,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def child_pids(provider: EmbeddedProvider) -> list[int]:
    return [t.result().proc.pid for t in provider._loads.values() if t.done()]


# -- no model needed ------------------------------------------------------------------


async def test_missing_extra_is_a_clear_error_and_unhealthy(tmp_path):
    spec = ModelSpec(
        name="absent",
        filename="absent.gguf",
        packages=("rlmd-no-such-chunk-part1",),
        version="1.0",
        size=1,
        sha256="0" * 64,
        roles=("sub",),
    )
    cfg = EmbeddedConfig(root_model="absent", sub_model="absent", model_dir=str(tmp_path))
    p = EmbeddedProvider(cfg, registry={"absent": spec})
    try:
        assert await p.health() is False
        assert "pip install 'rlmd[local]'" in p.describe()
        with pytest.raises(ProviderError) as err:
            await p.chat(ask("absent", "who?"))
        assert not err.value.retryable
        assert "rlmd-no-such-chunk-part1" in str(err.value)
        assert "[[providers]]" in str(err.value)
        assert p.status().models[0].state == "failed"
    finally:
        await p.aclose()


async def test_unknown_model_is_refused_without_loading():
    p = EmbeddedProvider(EmbeddedConfig())
    try:
        with pytest.raises(ProviderError, match=r"serves qwen2\.5-coder-1\.5b") as err:
            await p.chat(ask("llama-70b", "who?"))
        assert not err.value.retryable
        assert p.status().models[0].state == "idle"
    finally:
        await p.aclose()


def test_unknown_configured_model_fails_at_construction():
    with pytest.raises(Exception, match="known embedded models"):
        EmbeddedProvider(EmbeddedConfig(root_model="qwen9-huge"))


def test_provider_config_for_the_pool():
    cfg = EmbeddedConfig(
        root_model="qwen2.5-coder-1.5b", sub_model="qwen2.5-coder-0.5b", parallel=3
    )
    pc = embedded_provider_config(cfg)
    assert pc.kind == "embedded" and pc.capacity == 3
    assert pc.models == ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]
    assert pc.first_token_timeout_s >= 600  # long prompts take minutes on a CPU
    # One model for both roles is served once.
    assert embedded_provider_config(EmbeddedConfig()).models == ["qwen2.5-coder-1.5b"]
    # A [[providers]] entry of kind embedded names the provider and may list models.
    user = ProviderConfig(name="local", kind="embedded", models=["qwen2.5-coder-0.5b"])
    p = EmbeddedProvider(EmbeddedConfig(), provider_config=user)
    assert p.name == "local" and p.models == ["qwen2.5-coder-0.5b"]


# -- real models ----------------------------------------------------------------------


@pytest.mark.embedded
async def test_default_model_answers_from_a_passage_streams_and_stops():
    cfg = EmbeddedConfig()  # the defaults a new user gets
    p = EmbeddedProvider(cfg)
    model = cfg.root_model
    try:
        pieces: list[str] = []
        r = await p.chat(ask(model, "Who kept the lighthouse? Give the full name."), pieces.append)
        assert "Solberg" in r.text
        assert len(pieces) > 1 and "".join(pieces) == r.text
        assert r.provider == "embedded" and r.model == model
        assert r.usage.input > 50 and r.usage.output > 0 and not r.usage_estimated
        assert await p.health() is True
        st = p.status().models[0]
        assert st.state == "ready" and st.address.startswith("http://127.0.0.1:")

        # A second question on the same passage: a different fact, really read.
        r2 = await p.chat(ask(model, "How many cats did she keep? Answer in digits."))
        assert "14" in r2.text or "fourteen" in r2.text.lower()

        # on_delta returning True stops the generation; the server is free right after.
        got: list[str] = []
        r3 = await p.chat(
            ask(model, "Retell the passage in detail.", max_tokens=200),
            lambda s: got.append(s) or len(got) >= 3,
        )
        assert r3.stopped and len(got) == 3
        r4 = await p.chat(ask(model, "Which town did she come from?", max_tokens=12))
        assert "Troms" in r4.text
        pids = child_pids(p)
        assert len(pids) == 1 and alive(pids[0])
    finally:
        await p.aclose()
    assert not any(alive(pid) for pid in pids)
    assert p.status().models[0].state == "closed"
    with pytest.raises(ProviderError, match="closed"):
        await p.chat(ask(model, "who?"))


@pytest.mark.embedded
async def test_crashed_server_restarts_on_next_call():
    model = "qwen2.5-coder-0.5b"
    p = EmbeddedProvider(EmbeddedConfig(root_model=model, sub_model=model, parallel=1))
    try:
        await p.wait_ready()
        (pid,) = child_pids(p)
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not alive(pid):
                break
            await asyncio.sleep(0.05)
        assert await p.health() is False
        r = await p.chat(ask(model, "Who kept the lighthouse?"))
        assert "Solberg" in r.text
        (new_pid,) = child_pids(p)
        assert new_pid != pid
    finally:
        await p.aclose()


@pytest.mark.embedded
def test_server_exits_when_the_daemon_is_killed(tmp_path):
    # A parent that starts the server and is then SIGKILLed (no aclose): the child
    # must not outlive it.
    script = textwrap.dedent(
        """
        import asyncio
        from rlmd.config import EmbeddedConfig
        from rlmd.providers.embedded import EmbeddedProvider
        async def main():
            m = "qwen2.5-coder-0.5b"
            p = EmbeddedProvider(EmbeddedConfig(root_model=m, sub_model=m, parallel=1))
            await p.wait_ready()
            print([t.result().proc.pid for t in p._loads.values()][0], flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        child = int(line)
        assert alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_registry_models_are_known():
    assert set(MODELS) == {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"}
