"""How big a text is for the root model, and whether the whole context fits its window.

A context that fits comfortably (``[engine] direct_fraction`` of the window) is shown
whole in the first message: issue 10 measured the demo (8,337 characters, an eighth of
the embedded model's window) at 17 turns and 156 s when the model had to read it through
300-character slices.  Tokens are counted with the model's own tokenizer where the server
offers one (llama.cpp's ``/tokenize``), else estimated from ``[engine] chars_per_token``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Protocol

import httpx

from rlmd.config import Config
from rlmd.providers.base import ProviderError

DEFAULT_WINDOW = 32_768
# Counting with the server costs a round trip and its CPU; texts far from the line are
# decided by the estimate alone.
COUNT_MARGIN = 1.6
# A cut text is counted again at most this often; each recount aims 2 % under the line.
REFIT_ROUNDS = 3
# A counted prefix this close to the limit is not read again longer.
FULL_ENOUGH = 0.9

# What a server says when a prompt is over its window: (tokens sent, tokens it takes).
_OVERFLOW = (
    # llama.cpp: "request (16865 tokens) exceeds the available context size (16384 tokens)"
    (re.compile(r"\((\d+) tokens\) exceeds the available context size \((\d+) tokens\)"), 1, 2),
    # OpenAI and compatible servers: "maximum context length is 8192 tokens. However, your
    # messages resulted in 9000 tokens"
    (
        re.compile(r"maximum context length is (\d+) tokens.{0,80}?resulted in (\d+) tokens", re.S),
        2,
        1,
    ),
    # Anthropic: "prompt is too long: 210000 tokens > 200000 maximum"
    (re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum"), 1, 2),
)


class Tokenizer(Protocol):
    """Counts tokens with a model's own tokenizer; None when it cannot now.

    ``load``: start a cold model and wait for it, for a caller about to call it anyway."""

    async def count(self, model: str, text: str, *, load: bool = False) -> int | None: ...


class ModelStates(Protocol):
    """The embedded provider's view of its models (``EmbeddedProvider.status()``), and
    its ``wait_ready``, which loads one (raises ProviderError when it cannot)."""

    def status(self) -> object: ...

    async def wait_ready(self, model: str | None = None) -> None: ...


def model_address(states: ModelStates, model: str) -> tuple[str, str]:
    """``(state, address)`` of ``model`` on the embedded provider ("", "" if unknown)."""
    for m in getattr(states.status(), "models", []):
        if getattr(m, "name", None) == model:
            return str(getattr(m, "state", "")), str(getattr(m, "address", ""))
    return "", ""


class LlamaCppTokenizer:
    """``POST /tokenize`` on the embedded model's llama.cpp server, once it is running (a
    cold model is not loaded just to count: the estimate stands in)."""

    def __init__(self, states: ModelStates, *, timeout_s: float = 10.0) -> None:
        self._states = states
        self._timeout_s = timeout_s

    async def count(self, model: str, text: str, *, load: bool = False) -> int | None:
        state, address = model_address(self._states, model)
        if load and state in ("idle", "loading"):
            try:
                await self._states.wait_ready(model)
            except ProviderError:
                return None  # the call that follows says why, better than a count could
            state, address = model_address(self._states, model)
        if state != "ready" or not address:
            return None
        url = address if address.startswith("http") else f"http://{address}"
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s) as client:
                r = await client.post(f"{url}/tokenize", json={"content": text})
                r.raise_for_status()
                tokens = r.json().get("tokens")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None


def window_tokens(config: Config, model: str, override: int | None = None) -> int:
    """The model's window in tokens: the query's ``window_tokens``, the embedded model's
    ``ctx_size`` (per slot) when it serves ``model``, else 32,768."""
    if override:
        return override
    emb = config.embedded
    if not config.providers and model in (emb.root_model, emb.sub_model):
        return emb.ctx_size
    for p in config.providers:
        if p.kind == "embedded" and model in (p.models or [emb.root_model, emb.sub_model]):
            return emb.ctx_size
    return DEFAULT_WINDOW


def estimate_tokens(chars: int, chars_per_token: float) -> int:
    return int(chars / chars_per_token) + 1


async def fits_whole(
    text_chars: int,
    read: Callable[[], Awaitable[str]],
    *,
    model: str,
    window: int,
    fraction: float,
    chars_per_token: float,
    tokenizer: Tokenizer | None,
) -> tuple[bool, int]:
    """Whether a context of ``text_chars`` fits ``fraction`` of ``window``, and its tokens.

    ``read`` is an async callable returning the text (called only when counting helps).
    """
    limit = int(window * fraction)
    est = estimate_tokens(text_chars, chars_per_token)
    if limit <= 0 or text_chars == 0:
        return False, est
    if tokenizer is not None and limit / COUNT_MARGIN <= est <= limit * COUNT_MARGIN:
        text = await read()
        counted = await tokenizer.count(model, text)
        if counted is not None:
            return counted <= limit, counted
    return est <= limit, est


def overflow(message: str) -> tuple[int, int] | None:
    """``(tokens sent, tokens the server takes)`` when ``message`` is a server's
    context-overflow error, else None."""
    for pattern, sent, window in _OVERFLOW:
        m = pattern.search(message)
        if m:
            return int(m.group(sent)), int(m.group(window))
    return None


def refit(text: str, *, tokens: int, limit: int) -> str:
    """``text`` cut in proportion so that ``tokens`` of it become at most ``limit``."""
    if tokens <= limit or not text:
        return text
    return text[: int(len(text) * limit / tokens * 0.98)]


async def cut_to_limit(
    read: Callable[[int], Awaitable[str]],
    *,
    model: str,
    limit: int,
    chars_per_token: float,
    tokenizer: Tokenizer | None,
) -> str:
    """The longest prefix of the text (read with ``read(chars)``) within about ``limit``
    tokens: estimated, then counted with the model's tokenizer where it can count.

    Issue 10's OOLONG run at 32k: a cut at 3 characters a token came to 16,865 tokens,
    over the embedded model's 16,384, and every base query failed with HTTP 400. Its
    codeqa run the other way: Python source runs at 4.7 characters a token, so the same
    estimate showed base 9,919 tokens of a 15,360 budget. A prefix counted well within
    the limit is therefore read again, longer in proportion, and the longest prefix
    counted within the limit is the one returned. A cold model is loaded to count: the
    caller is about to call it (the first base query of a fresh daemon was cut by the
    estimate alone).
    """
    asked = max(0, int(limit * chars_per_token))
    text = await read(asked)
    if tokenizer is None or not text:
        return text
    fitting: str | None = None
    for _ in range(REFIT_ROUNDS):
        counted = await tokenizer.count(model, text, load=True)
        if counted is None:
            break
        if counted > limit:
            text = refit(text, tokens=counted, limit=limit)
            continue
        fitting = text
        # A short read is the whole text; a prefix cut down from an overshoot stays cut.
        if len(text) < asked or counted >= limit * FULL_ENOUGH:
            break
        asked = int(len(text) * limit / counted * 0.98)
        text = await read(asked)
    return text if fitting is None else fitting
