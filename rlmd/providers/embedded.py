"""The embedded default model: llama.cpp's server (from xllamacpp) in a child process.

With no providers configured, the daemon serves a small model itself so that a first
query works with no setup.  Each distinct model (``EmbeddedConfig.root_model`` /
``sub_model``) gets one llama.cpp server, listening on 127.0.0.1 at an ephemeral port,
with ``parallel`` slots of ``ctx_size`` tokens each and prompt caching on.  The daemon
talks to it with the OpenAI-compatible client of :mod:`rlmd.providers.openai`.

Why a child process rather than xllamacpp's server in the daemon's own process: creating
``xllamacpp.Server`` holds the GIL for the whole model load (measured: a Python thread
ticking every 10 ms stalled for 12 s), which would freeze the daemon's event loop even
from a worker thread.  A child also keeps a llama.cpp crash from taking the daemon down,
and gives memory back when it exits.  The child exits when its stdin closes (the
provider closes it, or the daemon dies) and, on Linux, when the daemon dies abruptly
(``PR_SET_PDEATHSIG``).

Nothing starts at construction.  The first call (or :meth:`EmbeddedProvider.start`)
joins the model file if needed (:func:`rlmd.providers.weights.ensure_model`, in a thread) and
starts the child; calls wait for it.  Errors that reinstalling fixes (the ``local`` extra
missing, a corrupt chunk package) are reported on every call without retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec

from rlmd.config import EmbeddedConfig, ProviderConfig
from rlmd.proc import die_with_parent, drain_stream, stop_process
from rlmd.providers.base import ChatRequest, ChatResult, OnDelta, ProviderError
from rlmd.providers.openai import OpenAIProvider
from rlmd.providers.weights import (
    INSTALL_HINT,
    MODELS,
    EmbeddedUnavailable,
    ModelIntegrityError,
    ModelSpec,
    Progress,
    ensure_model,
    find_parts,
    model_spec,
    stderr_progress,
)

log = logging.getLogger(__name__)

# Loading a 1 GB model on 2 busy cores took up to 15 s; allow for slow disks and a
# first-time join of the model file.
LOAD_TIMEOUT_S = 600.0
# Prompt processing runs at ~75 tokens/s on 2 cores, so a 16k-token prompt takes minutes
# before the first token: the usual 120 s first-token timeout would cut it off.
FIRST_TOKEN_TIMEOUT_S = 900.0
TOTAL_TIMEOUT_S = 3600.0
# Host-memory cache of evicted slot states (llama.cpp's default is 8 GiB).
CACHE_RAM_MIB = 1024
_STDERR_LINES = 40

State = Literal["idle", "loading", "ready", "failed", "closed"]


class _ChildSpec(msgspec.Struct, kw_only=True):
    """What the child needs to start its llama.cpp server (passed as JSON on argv)."""

    model_path: str
    alias: str
    ctx_size: int
    parallel: int
    threads: int
    cache_ram_mib: int


class ModelStatus(msgspec.Struct, kw_only=True):
    """One embedded model as ``daemon/status`` may show it."""

    name: str
    state: State
    address: str = ""
    error: str = ""


class EmbeddedStatus(msgspec.Struct, kw_only=True):
    name: str
    models: list[ModelStatus]
    parallel: int
    ctx_size: int
    threads: int


class _LlamaCppClient(OpenAIProvider):
    """The OpenAI-compatible client, asking llama.cpp to keep and reuse the prompt's KV cache."""

    kind: ClassVar[str] = "embedded"
    # Measured: llama.cpp's server closes a kept-alive connection after a streamed answer
    # at its own pace, and about one call in ten that reused it got "Server disconnected
    # without sending a response".  A loopback connect costs a fraction of a millisecond.
    _keepalive: ClassVar[bool] = False

    def _chat_body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        body = super()._chat_body(req, stream)
        # On by default in this llama.cpp, but explicit: the RLM loop resends a growing
        # conversation every turn, and the slot keeping its prefix is what makes that cheap.
        body["cache_prompt"] = True
        return body


class _Child:
    """One running llama.cpp server process and the client that talks to it."""

    def __init__(self, model: str, proc: asyncio.subprocess.Process, address: str) -> None:
        self.model = model
        self.proc = proc
        self.address = address
        self.client: _LlamaCppClient | None = None

    @property
    def alive(self) -> bool:
        """False as soon as the process has exited, even before asyncio has reaped it.

        asyncio sets ``returncode`` only when its child watcher gets round to it; a call
        made in between would go to a dead server.  ``WNOWAIT`` looks without reaping.
        """
        if self.proc.returncode is not None:
            return False
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.proc.pid, flags) is None
        except ChildProcessError:  # reaped already, returncode about to be set
            return False


def embedded_provider_config(config: EmbeddedConfig, name: str = "embedded") -> ProviderConfig:
    """The pool's view of the embedded provider: its models, capacity (slots) and timeouts."""
    return ProviderConfig(
        name=name,
        kind="embedded",
        models=_served_models(config, None),
        capacity=max(1, config.parallel),
        priority=0,
        # The server is on loopback but shares the CPU with its own inference: under load
        # its HTTP thread answers health probes slowly, which is not a failure.
        connect_timeout_s=30.0,
        first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S,
        total_timeout_s=TOTAL_TIMEOUT_S,
    )


def _served_models(config: EmbeddedConfig, provider_config: ProviderConfig | None) -> list[str]:
    if provider_config is not None and provider_config.models:
        names = list(provider_config.models)
    else:
        names = [config.root_model, config.sub_model]
    return list(dict.fromkeys(n for n in names if n))


def _threads(config: EmbeddedConfig) -> int:
    if config.threads > 0:
        return config.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class EmbeddedProvider:
    """The daemon's own model server (see the module docstring); a Provider.

    ``provider_config`` is the ``[[providers]]`` entry of kind ``embedded`` when the user
    wrote one (its ``models`` override root/sub, its timeouts apply); else the defaults of
    :func:`embedded_provider_config`.  ``registry`` and ``search_path`` let tests serve
    other models; ``progress`` reports the one-time join of a model file (default: a line
    on stderr every 10%).
    """

    kind: ClassVar[str] = "embedded"

    def __init__(
        self,
        config: EmbeddedConfig,
        *,
        name: str = "embedded",
        provider_config: ProviderConfig | None = None,
        progress: Progress | None = None,
        registry: Mapping[str, ModelSpec] = MODELS,
        search_path: Sequence[str] | None = None,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        cache_ram_mib: int = CACHE_RAM_MIB,
    ) -> None:
        if config.parallel < 1:
            raise ValueError("[embedded] parallel must be >= 1")
        if config.ctx_size < 256:
            raise ValueError("[embedded] ctx_size must be at least 256 tokens")
        self.name = provider_config.name if provider_config is not None else name
        self.config = config
        self.models = _served_models(config, provider_config)
        if not self.models:
            raise ValueError("[embedded] root_model and sub_model are empty")
        self._specs = {m: model_spec(m, registry) for m in self.models}  # unknown: error now
        self._registry = registry
        self._search_path = list(search_path) if search_path is not None else None
        self._progress = progress
        self._load_timeout_s = load_timeout_s
        self._cache_ram_mib = cache_ram_mib
        self._pcfg = provider_config or embedded_provider_config(config, self.name)
        self._model_dir = Path(config.model_dir).expanduser() if config.model_dir else None
        self._loads: dict[str, asyncio.Task[_Child]] = {}
        self._failed: dict[str, str] = {}  # model -> permanent error (reinstall fixes it)
        self._stderr: dict[str, deque[str]] = {m: deque(maxlen=_STDERR_LINES) for m in self.models}
        self._drains: set[asyncio.Task[None]] = set()
        self._preflight: str | None = None  # "" ok, else why the model cannot run
        self._closed = False

    @property
    def provider_config(self) -> ProviderConfig:
        """The config the pool needs for this provider (``Pool(extra_configs=...)``)."""
        return self._pcfg

    @property
    def capacity(self) -> int:
        return max(1, self.config.parallel)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Begin loading every model in the background (calls would start them anyway)."""
        for model in self.models:
            self._load_task(model)

    async def wait_ready(self, model: str | None = None) -> None:
        """Wait until ``model`` (default: all) is served; raise ProviderError if it cannot be."""
        for m in [model] if model else self.models:
            await self._child_for(m)

    async def aclose(self) -> None:
        """Stop loading, stop every child (stdin EOF, then SIGTERM, then SIGKILL)."""
        self._closed = True
        tasks = list(self._loads.values())
        self._loads.clear()
        children: list[_Child] = []
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                children.append(t.result())
            else:
                t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for child in children:
            await self._stop_child(child)
        for d in list(self._drains):
            d.cancel()
        for d in list(self._drains):
            with contextlib.suppress(BaseException):
                await d

    # -- Provider protocol -----------------------------------------------------------

    async def chat(self, req: ChatRequest, on_delta: OnDelta | None = None) -> ChatResult:
        """One chat call on the model's llama.cpp server (started first if needed)."""
        child = await self._child_for(req.model)
        assert child.client is not None
        try:
            return await child.client.chat(req, on_delta)
        except ProviderError as exc:
            if not child.alive:
                tail = self._tail(child.model)
                log.error("embedded llama.cpp server for %s died: %s", child.model, tail)
                self._forget(child)
                raise ProviderError(
                    f"embedded provider {self.name!r}: the llama.cpp server for {child.model!r} "
                    f"stopped (exit status {child.proc.returncode}); it restarts on the next "
                    f"call. Its last output: {tail}",
                    retryable=not exc.streamed,
                    streamed=exc.streamed,
                ) from None
            raise

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """The embedded chat models serve no embeddings (llama.cpp answers 501 for them)."""
        raise ProviderError(
            f"embedded provider {self.name!r} serves no embedding model; configure a provider "
            "that serves one (e.g. Ollama with nomic-embed-text) and set [models] embed",
            retryable=False,
        )

    async def health(self) -> bool:
        """True when every model is served or can be started (the extra is installed)."""
        if self._closed or self._failed:
            return False
        for model in self.models:
            task = self._loads.get(model)
            if task is None:
                if not await self._preflight_ok():
                    return False
            elif task.done():
                if task.cancelled() or task.exception() is not None:
                    return False
                child = task.result()
                if not child.alive or child.client is None or not await child.client.health():
                    return False
            # Loading: calls wait for it, so the provider counts as able to serve.
        return True

    # -- status ----------------------------------------------------------------------

    def status(self) -> EmbeddedStatus:
        """Each model's state (idle, loading, ready, failed, closed), address or error."""
        out = []
        for model in self.models:
            task = self._loads.get(model)
            if self._closed:
                out.append(ModelStatus(name=model, state="closed"))
            elif model in self._failed:
                out.append(ModelStatus(name=model, state="failed", error=self._failed[model]))
            elif task is None:
                err = self._preflight or ""
                out.append(ModelStatus(name=model, state="failed" if err else "idle", error=err))
            elif not task.done():
                out.append(ModelStatus(name=model, state="loading"))
            elif task.cancelled() or task.exception() is not None:
                err = "cancelled" if task.cancelled() else str(task.exception())
                out.append(ModelStatus(name=model, state="failed", error=err))
            else:
                child = task.result()
                state: State = "ready" if child.alive else "failed"
                out.append(ModelStatus(name=model, state=state, address=child.address))
        return EmbeddedStatus(
            name=self.name,
            models=out,
            parallel=self.config.parallel,
            ctx_size=self.config.ctx_size,
            threads=_threads(self.config),
        )

    def describe(self) -> str:
        """One line for ``daemon/status``: what the embedded model is doing."""
        parts = []
        for m in self.status().models:
            detail = f" at {m.address}" if m.address else ""
            if m.error:
                detail = f": {m.error}"
            parts.append(f"{m.name} {m.state}{detail}")
        return (
            f"embedded ({self.config.parallel} slots x {self.config.ctx_size} tokens, "
            f"{_threads(self.config)} threads): " + "; ".join(parts)
        )

    # -- internals -------------------------------------------------------------------

    def _error(self, what: str, *, retryable: bool = False) -> ProviderError:
        return ProviderError(f"embedded provider {self.name!r}: {what}", retryable=retryable)

    async def _child_for(self, model: str) -> _Child:
        if self._closed:
            raise self._error("closed")
        if model not in self._specs:
            raise self._error(
                f"model {model!r} is not served here; it serves {', '.join(self.models)}"
            )
        if model in self._failed:
            raise self._error(self._failed[model])
        task = self._load_task(model)
        try:
            # Shielded: a caller that gives up must not abort a load others wait for.
            return await asyncio.shield(task)
        except (EmbeddedUnavailable, ModelIntegrityError) as exc:
            self._failed[model] = str(exc)
            raise self._error(str(exc)) from None
        except ProviderError:
            raise
        except asyncio.CancelledError:
            if task.cancelled():  # the load was stopped (aclose), not this caller
                what = "closed" if self._closed else f"loading {model!r} was cancelled"
                raise self._error(what, retryable=not self._closed) from None
            raise
        except Exception as exc:
            log.exception("embedded model %s failed to start", model)
            raise self._error(f"cannot start {model!r}: {exc}") from None

    def _load_task(self, model: str) -> asyncio.Task[_Child]:
        task = self._loads.get(model)
        if task is not None and task.done():
            failed = task.cancelled() or task.exception() is not None
            if failed or not task.result().alive:
                task = None  # try again: a crash or a timeout may not repeat
        if task is None:
            task = asyncio.create_task(self._load(model), name=f"rlmd-embedded-load-{model}")
            # Failures are reported to the callers awaiting it; keep asyncio from
            # warning about an exception nobody retrieved when nobody was waiting.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._loads[model] = task
        return task

    def _forget(self, child: _Child) -> None:
        task = self._loads.get(child.model)
        if task is not None and task.done() and not task.cancelled():
            if task.exception() is None and task.result() is child:
                del self._loads[child.model]

    async def _preflight_ok(self) -> bool:
        if self._preflight is None:
            self._preflight = await asyncio.to_thread(self._check_installed)
        return not self._preflight

    def _check_installed(self) -> str:
        try:
            if importlib.util.find_spec("xllamacpp") is None:
                raise EmbeddedUnavailable(
                    "the llama.cpp runtime for the embedded model (xllamacpp) is not "
                    "installed. " + INSTALL_HINT
                )
            for spec in self._specs.values():
                find_parts(spec, self._search_path)
        except EmbeddedUnavailable as exc:
            return str(exc)
        return ""

    async def _load(self, model: str) -> _Child:
        spec = self._specs[model]
        if importlib.util.find_spec("xllamacpp") is None:
            raise EmbeddedUnavailable(
                "the llama.cpp runtime for the embedded model (xllamacpp) is not installed. "
                + INSTALL_HINT
            )
        progress = self._progress or stderr_progress(model)
        path = await asyncio.to_thread(
            ensure_model,
            model,
            self._model_dir,
            progress,
            registry=self._registry,
            search_path=self._search_path,
        )
        child_spec = _ChildSpec(
            model_path=str(path),
            alias=spec.name,
            ctx_size=self.config.ctx_size,
            parallel=self.config.parallel,
            threads=_threads(self.config),
            cache_ram_mib=self._cache_ram_mib,
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rlmd.providers.embedded",
            "--serve",
            msgspec.json.encode(child_spec).decode(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(),
            # Its own session: a Ctrl-C meant for the daemon is the daemon's to handle.
            start_new_session=True,
        )
        tail = self._stderr[model]
        tail.clear()
        drain = asyncio.create_task(
            _drain(proc.stderr, tail, model), name=f"rlmd-embedded-log-{model}"
        )
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(self._load_timeout_s):
                line = await proc.stdout.readline()
            info = json.loads(line) if line.strip() else {}
            address = info.get("address") if isinstance(info, dict) else None
            if not address:
                await asyncio.wait_for(proc.wait(), 5.0)
                reason = info.get("error") if isinstance(info, dict) else None
                raise RuntimeError(
                    f"the llama.cpp server exited while loading {path.name} "
                    f"(status {proc.returncode}): {reason or self._tail(model)}"
                )
            if not str(address).startswith("http://127.0.0.1:"):
                raise RuntimeError(f"the llama.cpp server listens on {address!r}, not loopback")
        except BaseException as exc:
            await stop_process(proc)
            if isinstance(exc, TimeoutError):
                raise RuntimeError(
                    f"the llama.cpp server did not load {path.name} within "
                    f"{self._load_timeout_s:g}s; its last output: {self._tail(model)}"
                ) from None
            raise
        child = _Child(model, proc, str(address))
        child.client = _LlamaCppClient(self._client_config(model), base_url=address + "/v1")
        log.info("embedded model %s ready at %s", model, address)
        return child

    def _client_config(self, model: str) -> ProviderConfig:
        p = self._pcfg
        return ProviderConfig(
            name=self.name,
            kind="openai",
            base_url="http://127.0.0.1",  # replaced by the child's address
            models=[model],
            capacity=self.capacity,
            max_tokens=p.max_tokens,
            connect_timeout_s=p.connect_timeout_s,
            first_token_timeout_s=p.first_token_timeout_s,
            total_timeout_s=p.total_timeout_s,
        )

    def _tail(self, model: str) -> str:
        lines = list(self._stderr.get(model, ()))[-5:]
        return " | ".join(lines) if lines else "(no output)"

    async def _stop_child(self, child: _Child) -> None:
        if child.client is not None:
            await child.client.aclose()
        await stop_process(child.proc)


async def _drain(stream: asyncio.StreamReader | None, tail: deque[str], model: str) -> None:
    """Keep the child's stderr flowing (a full pipe would block it); remember the end."""

    def keep(line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            tail.append(text)
            log.debug("llama.cpp[%s]: %s", model, text)

    await drain_stream(stream, keep, by_line=True)


def _child_env() -> dict[str, str]:
    """A minimal environment: nothing of the daemon's (no API keys) beyond what Python needs."""
    env = {k: v for k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR") if (v := os.environ.get(k))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


# -- the child process ---------------------------------------------------------------


def serve_child(spec: _ChildSpec) -> int:
    """Run in the child: start the llama.cpp server, print its address, live until stdin EOF."""
    die_with_parent(signal.SIGTERM)  # exits at once if the daemon is already gone
    try:
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = spec.model_path
        params.model_alias = {spec.alias}
        # Not unified: each slot owns ctx_size tokens, so one long conversation cannot
        # starve the other slots of KV cache.
        params.n_ctx = spec.ctx_size * spec.parallel
        params.n_parallel = spec.parallel
        params.kv_unified = False
        params.cpuparams.n_threads = spec.threads
        params.cpuparams_batch.n_threads = spec.threads
        params.hostnames = ["127.0.0.1"]
        params.port = 0
        params.cache_prompt = True
        params.cache_ram_mib = spec.cache_ram_mib
        params.endpoint_slots = True
        params.ui = False
        server = xlc.Server(params)
        address = server.listening_address
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"address": address}), flush=True)
    with contextlib.suppress(Exception):
        sys.stdin.buffer.read()  # until EOF: the provider closed it, or the daemon died
    # Skip the server's teardown: the process ends and the OS frees everything at once.
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--serve":
        print("usage: python -m rlmd.providers.embedded --serve SPEC_JSON", file=sys.stderr)
        return 2
    return serve_child(msgspec.json.decode(args[1], type=_ChildSpec))


if __name__ == "__main__":
    sys.exit(main())
