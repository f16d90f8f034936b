"""Types shared by every model provider, the pool, the cache and the engine.

A provider speaks one wire format (Ollama, OpenAI-compatible, Anthropic, embedded).  The
pool chooses a provider for each call; the engine only ever talks to the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import msgspec

Role = Literal["system", "user", "assistant"]


class Message(msgspec.Struct, frozen=True):
    role: Role
    content: str


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One chat call.  ``model`` is the role-free model name as providers list it."""

    model: str
    messages: tuple[Message, ...]
    temperature: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()


class Usage(msgspec.Struct):
    input: int = 0
    output: int = 0


class ChatResult(msgspec.Struct, kw_only=True):
    """What a call produced, with the accounting the pool and engine need."""

    text: str
    model: str
    provider: str = ""
    usage: Usage = msgspec.field(default_factory=Usage)
    usage_estimated: bool = False  # True when the server reported no usage (stopped early)
    stopped: bool = False  # the caller asked to stop the stream (on_delta returned True)
    ttft_s: float = 0.0
    elapsed_s: float = 0.0
    cost: float = 0.0  # dollars: API price plus energy estimate
    energy_wh: float = 0.0
    cached: bool = False
    speculative: bool = False


# Called with each piece of streamed text; returning True asks the provider to stop the
# generation now (the engine does this when a ```repl block closes).
OnDelta = Callable[[str], bool | None]


class ProviderError(Exception):
    """A call failed.  ``retryable`` says whether another attempt (maybe elsewhere) may work.

    ``streamed`` is True when text had already reached the caller: such a call is never
    retried, so that the user never sees a duplicated answer.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
        streamed: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.streamed = streamed
        self.status = status


class Provider(Protocol):
    """A model server of one wire format.  Implementations live beside this module."""

    name: str

    async def chat(self, req: ChatRequest, on_delta: OnDelta | None = None) -> ChatResult:
        """Run one chat call, streaming text to ``on_delta``; raise ProviderError."""
        ...

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Embed texts; raise ProviderError."""
        ...

    async def health(self) -> bool:
        """True when the server answers its health probe."""
        ...

    async def aclose(self) -> None: ...


def estimate_tokens(text: str) -> int:
    """A rough token count (about 4 characters a token) for when a server reports none."""
    return max(1, len(text) // 4) if text else 0
