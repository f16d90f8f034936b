"""OpenAI-compatible servers: DeepSeek, vLLM, llama.cpp's server, Ollama's ``/v1``...

``base_url`` ends in ``/v1``; chat is ``/chat/completions`` streamed as server-sent events
(``data:`` lines, ``: keep-alive`` comments, ``data: [DONE]`` at the end), with
``stream_options.include_usage`` so that the last chunk carries the token counts (its
``choices`` is empty; some servers also send ``null`` choices).  Embeddings come from
``/embeddings``.  Health is ``GET /health`` at the server root where the server has one
(vLLM, llama.cpp: 503 while the model loads), else a 1-token chat call.

The API key is optional: local servers (and the embedded llama.cpp server) need none.
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

# Texts per /embeddings request.
EMBED_BATCH = 256


class OpenAIProvider(HttpProvider):
    """One OpenAI-compatible server; ``base_url`` ends in ``/v1`` (any base_url works)."""

    kind: ClassVar[str] = "openai"
    _chat_path: ClassVar[str] = "/chat/completions"
    # Health probe: None until known, then "health" (GET /health works) or "probe".
    _health_mode: str | None = None

    def _chat_body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        return drop_none(
            {
                "model": req.model,
                "messages": [{"role": m.role, "content": m.content} for m in req.messages],
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
                "temperature": req.temperature,
                "max_tokens": req.max_tokens or self.config.max_tokens,
                "stop": list(req.stop) or None,
            }
        )

    async def _read_stream(self, resp: httpx.Response, sink: StreamSink) -> None:
        finished = False
        async for event, data in sse_events(resp, self.lines(resp)):
            if data == "[DONE]":
                finished = True
                continue
            obj = parse_json(data, "stream event")
            if event == "error" or (isinstance(obj, dict) and "error" in obj):
                raise ServerError(_error_message(obj))
            if not isinstance(obj, dict):
                continue
            for choice in obj.get("choices") or ():
                delta = (choice or {}).get("delta") or {}
                if delta.get("reasoning_content") or delta.get("reasoning"):
                    sink.alive()
                sink.text(delta.get("content") or "")
                if choice.get("finish_reason"):
                    finished = True
            usage = obj.get("usage")
            if isinstance(usage, dict):
                sink.usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
        if not finished:
            raise ServerError("stream ended before the answer finished (no [DONE])")

    def _read_full(self, data: Any, sink: StreamSink) -> None:
        if not isinstance(data, dict):
            raise ServerError(f"unexpected answer {str(data)[:200]!r}")
        if "error" in data:
            raise ServerError(_error_message(data))
        choices = data.get("choices") or []
        if not choices:
            raise ServerError("answer has no choices")
        usage = data.get("usage")
        if isinstance(usage, dict):  # usage first: on_delta may stop the call at the text
            sink.usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
        msg = (choices[0] or {}).get("message") or {}
        sink.text(msg.get("content") or "")

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Vectors for ``texts`` from ``/embeddings``, in order."""
        out: list[list[float]] = []
        for i in range(0, len(texts), EMBED_BATCH):
            batch = texts[i : i + EMBED_BATCH]
            data = await self.request_json("POST", "/embeddings", {"model": model, "input": batch})
            items = data.get("data") if isinstance(data, dict) else None
            if not isinstance(items, list) or len(items) != len(batch):
                raise self.error(
                    f"POST /embeddings: expected {len(batch)} embeddings, got "
                    f"{len(items) if isinstance(items, list) else 'none'}"
                )
            items = sorted(items, key=lambda d: d.get("index", 0))
            out.extend(d["embedding"] for d in items)
        return out

    def _root(self) -> str:
        return self._base.removesuffix("/v1")

    async def health(self) -> bool:
        """``GET /health`` at the server root; a 1-token call where there is none."""
        if self._health_mode != "probe":
            try:
                # Streamed and closed unread: only the status matters, the body may be endless.
                async with self._client.stream(
                    "GET",
                    self._root() + "/health",
                    headers=self._headers,
                    timeout=max(self.config.connect_timeout_s, 5.0),
                ) as resp:
                    code = resp.status_code
            except httpx.HTTPError:
                return False
            if 200 <= code < 300:
                self._health_mode = "health"
                return True
            if code not in (404, 405) or self._health_mode == "health":
                return False  # e.g. 503 while a llama.cpp server loads its model
            self._health_mode = "probe"
        return await self.probe()


def _error_message(obj: Any) -> str:
    """The message of an in-stream error object (``{"error": {"message": ...}}``)."""
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message") or err.get("type") or err)
    return str(err)
