"""Anthropic's Messages API: ``/v1/messages`` with its event stream.

``base_url`` is the server root (``https://api.anthropic.com``).  The key goes in the
``x-api-key`` header with ``anthropic-version``; the system messages go in the top-level
``system`` field; ``max_tokens`` is required (request, else config, else 4096).  The
stream is ``message_start`` (input tokens), ``content_block_delta``/``text_delta`` (text),
``message_delta`` (output tokens), ``ping`` (ignored), ``error`` (an error even after
HTTP 200; ``overloaded_error`` and ``api_error`` are retryable) and ``message_stop``.
Anthropic has no embeddings API.  Health is ``GET /v1/models`` (free, checks the key).
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from rlmd.providers.base import ChatRequest
from rlmd.providers.http import (
    HttpProvider,
    ServerError,
    StreamSink,
    drop_none,
    parse_json,
    sse_events,
)

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_RETRYABLE_ERRORS = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}


class AnthropicProvider(HttpProvider):
    """The Anthropic API (or a server speaking it)."""

    kind: ClassVar[str] = "anthropic"
    _chat_path: ClassVar[str] = "/v1/messages"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The API's paths carry the version; a base_url ending in /v1 is the same server.
        self._base = self._base.removesuffix("/v1")

    def _auth_headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def _chat_body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        system = "\n\n".join(m.content for m in req.messages if m.role == "system")
        return drop_none(
            {
                "model": req.model,
                "max_tokens": req.max_tokens or self.config.max_tokens or DEFAULT_MAX_TOKENS,
                "system": system or None,
                "messages": [
                    {"role": m.role, "content": m.content}
                    for m in req.messages
                    if m.role != "system"
                ],
                "temperature": req.temperature,
                "stop_sequences": list(req.stop) or None,
                "stream": stream,
            }
        )

    async def _read_stream(self, resp: httpx.Response, sink: StreamSink) -> None:
        finished = False
        async for event, data in sse_events(resp, self.lines(resp)):
            obj = parse_json(data, f"{event} event")
            if not isinstance(obj, dict):
                continue
            kind = obj.get("type", event)
            if kind == "error" or event == "error":
                raise _error(obj)
            if kind == "message_start":
                usage = (obj.get("message") or {}).get("usage") or {}
                # Its output_tokens is a placeholder; the real count comes in message_delta.
                sink.usage(input=usage.get("input_tokens"))
            elif kind == "content_block_delta":
                delta = obj.get("delta") or {}
                if delta.get("type") == "text_delta":
                    sink.text(delta.get("text") or "")
                elif delta.get("type") == "thinking_delta":
                    sink.alive()
            elif kind == "message_delta":
                usage = obj.get("usage") or {}
                sink.usage(usage.get("input_tokens"), usage.get("output_tokens"))
            elif kind == "message_stop":
                finished = True
        if not finished:
            raise ServerError("stream ended before message_stop")

    def _read_full(self, data: Any, sink: StreamSink) -> None:
        if not isinstance(data, dict):
            raise ServerError(f"unexpected answer {str(data)[:200]!r}")
        if data.get("type") == "error":
            raise _error(data)
        usage = data.get("usage") or {}  # usage first: on_delta may stop the call
        sink.usage(usage.get("input_tokens"), usage.get("output_tokens"))
        for block in data.get("content") or ():
            if isinstance(block, dict) and block.get("type") == "text":
                sink.text(block.get("text") or "")

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Anthropic has no embeddings: always a (non-retryable) ProviderError."""
        raise self.error(
            "Anthropic has no embeddings API; set models.embed to a model of an ollama or "
            "openai provider"
        )

    async def health(self) -> bool:
        """True when ``GET /v1/models`` answers (the key is accepted)."""
        return await self.get_ok("/v1/models")


def _error(obj: dict[str, Any]) -> ServerError:
    err = obj.get("error") or {}
    kind = err.get("type", "error") if isinstance(err, dict) else "error"
    message = err.get("message", "") if isinstance(err, dict) else str(err)
    return ServerError(f"{kind}: {message}", retryable=kind in _RETRYABLE_ERRORS)
