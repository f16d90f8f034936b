"""Ollama's native API: ``/api/chat`` (NDJSON stream), ``/api/embed``, health from ``/``.

Ollama answers HTTP 200 and then may report a failure as an ``{"error": ...}`` line in the
middle of the stream (the model runner crashed, out of memory); that is an error here,
not the end of a short answer.  ``keep_alive`` and ``options`` (``num_ctx`` above all:
Ollama's default context is small and silently truncates long prompts) come from the
provider's config; the request's temperature, max_tokens and stop sequences override
the options of the same meaning.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from rlmd.providers.base import ChatRequest
from rlmd.providers.http import HttpProvider, ServerError, StreamSink, drop_none, parse_json

# Texts per /api/embed request: large batches are split so one request stays bounded.
EMBED_BATCH = 256


class OllamaProvider(HttpProvider):
    """One Ollama server; ``base_url`` is its root (``http://host:11434``)."""

    kind: ClassVar[str] = "ollama"
    _chat_path: ClassVar[str] = "/api/chat"
    _sse: ClassVar[bool] = False

    def _options(self, req: ChatRequest | None = None) -> dict[str, Any]:
        opts: dict[str, Any] = dict(self.config.options)
        if req is not None:
            opts["temperature"] = req.temperature
            max_tokens = req.max_tokens or self.config.max_tokens
            if max_tokens:
                opts["num_predict"] = max_tokens
            if req.stop:
                opts["stop"] = list(req.stop)
        return opts

    def _chat_body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        return drop_none(
            {
                "model": req.model,
                "messages": [{"role": m.role, "content": m.content} for m in req.messages],
                "stream": stream,
                "options": self._options(req),
                "keep_alive": self.config.keep_alive,
            }
        )

    async def _read_stream(self, resp: httpx.Response, sink: StreamSink) -> None:
        done = False
        async for line in self.lines(resp):
            # Lines after the final one are ignored, but read: the connection is then
            # reusable (closing a half-read response would drop it).
            if line.strip() and not done:
                done = self._read_obj(parse_json(line, "stream line"), sink)
        if not done:
            raise ServerError("stream ended without its final 'done' line")

    def _read_full(self, data: Any, sink: StreamSink) -> None:
        self._read_obj(data, sink)

    @staticmethod
    def _read_obj(obj: Any, sink: StreamSink) -> bool:
        """Feed one answer object to the sink; True when it is the final one."""
        if not isinstance(obj, dict):
            raise ServerError(f"unexpected stream line {str(obj)[:200]!r}")
        if "error" in obj:
            raise ServerError(str(obj["error"]))
        done = bool(obj.get("done"))
        if done:  # usage first: on_delta may stop the call at the text below
            sink.usage(obj.get("prompt_eval_count"), obj.get("eval_count"))
        msg = obj.get("message")
        if isinstance(msg, dict):
            sink.text(msg.get("content") or "")
        return done

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Vectors for ``texts`` from ``/api/embed``, in order."""
        out: list[list[float]] = []
        for i in range(0, len(texts), EMBED_BATCH):
            batch = texts[i : i + EMBED_BATCH]
            body = drop_none(
                {
                    "model": model,
                    "input": batch,
                    "keep_alive": self.config.keep_alive,
                    "options": self._options() or None,
                }
            )
            data = await self.request_json("POST", "/api/embed", body)
            vecs = data.get("embeddings") if isinstance(data, dict) else None
            if not isinstance(vecs, list) or len(vecs) != len(batch):
                raise self.error(
                    f"POST /api/embed: expected {len(batch)} embeddings, got "
                    f"{len(vecs) if isinstance(vecs, list) else 'none'}"
                )
            out.extend(vecs)
        return out

    async def health(self) -> bool:
        """True when ``GET /`` and ``GET /api/ps`` both answer."""
        return await self.get_ok("/") and await self.get_ok("/api/ps")
