"""``kind = "command"``: a command-line program as a model (``claude -p``, ``opencode
run``, ``ollama run``, ``llm``, a script).

One call is one process: the conversation, rendered as plain text, goes to its stdin;
what it writes to stdout is the answer, streamed to ``on_delta`` as it arrives.  The
model name is in ``RLMD_MODEL``.  The argv is run directly (never through a shell), and
the child's environment holds only the variables the config names in ``env`` (nothing
else of the daemon's, so no API key the config did not mean to give it).

A non-zero exit or a timeout is a :class:`ProviderError` that quotes the end of the
program's stderr, with the values of the passed variables blanked out.  A timeout, a
cancelled call and a stop asked by ``on_delta`` kill the child's whole process group.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Mapping

from rlmd.config import ConfigError, ProviderConfig
from rlmd.providers.base import (
    ChatRequest,
    ChatResult,
    OnDelta,
    ProviderError,
    Usage,
    estimate_tokens,
)

#: How much of the program's stderr an error quotes (its end).
STDERR_TAIL_CHARS = 2000
_READ_CHUNK = 65536
_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}
#: Variables whose values are not secrets: kept readable in error messages.
_PLAIN = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "SHELL", "TERM", "TMPDIR", "TZ"})


def _plain(name: str) -> bool:
    return name in _PLAIN or name.startswith(("LC_", "XDG_"))


def render_conversation(req: ChatRequest) -> str:
    """The conversation as plain text: the system prompt, then the turns.

    A lone user message goes as it is (what ``llm`` or ``ollama run`` expect as a
    prompt); longer conversations name each turn's speaker.
    """
    msgs = list(req.messages)
    system = [m.content for m in msgs if m.role == "system"]
    turns = [m for m in msgs if m.role != "system"]
    if not system and len(turns) == 1 and turns[0].role == "user":
        return turns[0].content
    parts = [*system]
    parts += [f"{_ROLE_NAMES[m.role]}:\n{m.content}" for m in turns]
    return "\n\n".join(parts) + "\n"


class CommandProvider:
    """Runs ``cfg.command`` once per chat call (the pool bounds them to ``capacity``)."""

    def __init__(self, cfg: ProviderConfig, env: Mapping[str, str]) -> None:
        self.name = cfg.name
        self.cfg = cfg
        exe = shutil.which(cfg.command[0], path=env.get("PATH", os.defpath))
        if exe is None:
            raise ConfigError(
                f"provider {cfg.name!r}: program {cfg.command[0]!r} not found "
                "(give its absolute path in `command`, or put it on the daemon's PATH)"
            )
        self._argv = [exe, *cfg.command[1:]]
        # Read once, at startup, like api_key_env: the child gets these and nothing else.
        self._env = {n: env[n] for n in cfg.env if n in env}
        self._secrets = sorted(
            (v for n, v in self._env.items() if len(v) >= 6 and not _plain(n)), key=len
        )[::-1]
        # Also bounded here, so a direct caller (not the pool) cannot overrun it either.
        self._slots = asyncio.Semaphore(cfg.capacity)

    async def chat(self, req: ChatRequest, on_delta: OnDelta | None = None) -> ChatResult:
        async with self._slots:
            return await self._run(req, on_delta)

    async def _run(self, req: ChatRequest, on_delta: OnDelta | None) -> ChatResult:
        prompt = render_conversation(req)
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**self._env, "RLMD_MODEL": req.model},
                start_new_session=True,  # its own process group: a timeout kills it all
            )
        except OSError as exc:
            raise ProviderError(
                f"provider {self.name!r}: cannot run {self._argv[0]}: {exc.strerror}"
            ) from None
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        pieces: list[str] = []
        tail = bytearray()
        stopped = False
        ttft = 0.0

        async def feed() -> None:
            with contextlib.suppress(ConnectionError):  # it may exit without reading all
                proc.stdin.write(prompt.encode("utf-8"))
                await proc.stdin.drain()
                proc.stdin.close()

        async def errors() -> None:
            while chunk := await proc.stderr.read(_READ_CHUNK):
                tail.extend(chunk)
                del tail[: max(0, len(tail) - 4 * STDERR_TAIL_CHARS)]

        async def answer() -> None:
            nonlocal stopped, ttft
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            while chunk := await proc.stdout.read(_READ_CHUNK):
                text = decoder.decode(chunk)
                if not text:
                    continue
                if not pieces:
                    ttft = time.monotonic() - t0
                pieces.append(text)
                if on_delta is not None and on_delta(text):
                    stopped = True
                    _kill_group(proc)  # the caller has what it wants; stderr then ends too
                    return
            if rest := decoder.decode(b"", final=True):
                pieces.append(rest)
                if on_delta is not None:
                    on_delta(rest)

        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(feed())
                    tg.create_task(errors())
                    tg.create_task(answer())
                rc = await proc.wait()
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            raise ProviderError(
                f"provider {self.name!r}: {self._argv[0]} gave no complete answer within "
                f"{self.cfg.timeout_s:g} s (timeout_s) and was killed{self._tail(tail)}",
                streamed=bool(pieces),
            ) from None
        except BaseException:
            _kill_group(proc)  # cancelled (the query was): never leave the program running
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        if rc != 0 and not stopped:
            raise ProviderError(
                f"provider {self.name!r}: {self._argv[0]} exited with status {rc}"
                f"{self._tail(tail)}",
                streamed=bool(pieces),
            )
        text = "".join(pieces)
        return ChatResult(
            text=text,
            model=req.model,
            provider=self.name,
            # A program reports no usage: estimated, like a stopped stream's.
            usage=Usage(input=estimate_tokens(prompt), output=estimate_tokens(text)),
            usage_estimated=True,
            stopped=stopped,
            ttft_s=ttft,
            elapsed_s=time.monotonic() - t0,
        )

    def _tail(self, raw: bytearray) -> str:
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return " (it wrote nothing to stderr)"
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        if len(text) > STDERR_TAIL_CHARS:
            text = "…" + text[-STDERR_TAIL_CHARS:]
        return f"; its stderr ends with:\n{text}"

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        raise ProviderError(f"provider {self.name!r}: command providers do not embed")

    async def health(self) -> bool:
        """The program is still there and executable (running it costs a model call)."""
        return await asyncio.to_thread(os.access, self._argv[0], os.X_OK)

    async def aclose(self) -> None:
        pass


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
