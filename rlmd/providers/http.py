"""Shared httpx plumbing of the HTTP providers (Ollama, OpenAI-compatible, Anthropic).

:class:`HttpProvider` runs one chat call as its wire format needs it and turns every way it
can fail into a :class:`~rlmd.providers.base.ProviderError` that says what failed and
where.  Subclasses only say how to build the request body and how to read the answer:

* ``_chat_path`` and ``_chat_body(req, stream)``;
* ``_read_stream(resp, sink)``: read the streamed answer, calling ``sink.text(piece)``,
  ``sink.usage(...)`` and raising :class:`ServerError` for in-stream errors;
* ``_read_full(data, sink)``: the same for a non-streamed JSON answer.

Timeouts are split as a streaming client needs them: ``connect_timeout_s`` bounds the TCP
connect; ``first_token_timeout_s`` bounds everything up to the first piece of text (a
server that accepts the request and then hangs fails after it, retryably); and
``total_timeout_s`` bounds the whole call.

Memory is bounded per call: a stream line longer than ``max_line_bytes`` (a server that
answers 200 and then sends bytes with no newline) or a body longer than
``max_response_bytes`` ends the call with a ProviderError saying so (see
:func:`bounded_lines` and :func:`read_bounded`); error bodies are read only as far as a
message needs.

API keys live only in the httpx client's default headers: never in URLs, messages or
``repr``; any error text a server sends back is scrubbed of the key before it is raised.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import httpx

from rlmd.config import ProviderConfig
from rlmd.providers.base import (
    ChatRequest,
    ChatResult,
    Message,
    OnDelta,
    ProviderError,
    Usage,
    estimate_tokens,
)

# Longest piece of a server's error body quoted in an error message.
_ERROR_TEXT_MAX = 500
# Bytes of an error body read at most (the message is in the first few hundred).
_ERROR_BODY_MAX = 64 * 1024


class ServerError(Exception):
    """An error the server reported inside an otherwise successful (HTTP 200) answer."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ResponseTooLarge(ServerError):
    """A line or a whole body went past its configured bound."""


class _Stop(Exception):
    """The caller's on_delta asked to stop the generation."""


class StreamSink:
    """Collects the pieces of one answer; subclasses' readers feed it."""

    def __init__(self, on_delta: OnDelta | None, t0: float, on_first: Any) -> None:
        self._on_delta = on_delta
        self._t0 = t0
        self._on_first = on_first
        self.parts: list[str] = []
        self.ttft_s: float | None = None
        self.started = False  # first text (or reasoning) arrived: generation under way
        self.streamed = False  # text has reached on_delta
        self.usage_in: int | None = None
        self.usage_out: int | None = None

    def text(self, piece: str) -> None:
        """One piece of answer text; raises _Stop when the caller wants no more."""
        if not piece:
            return
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self._t0
            if not self.started:
                self.started = True
                self._on_first()
        self.parts.append(piece)
        if self._on_delta is not None:
            self.streamed = True
            if self._on_delta(piece):
                raise _Stop

    def alive(self) -> None:
        """The server produced something other than answer text (reasoning, a ping after
        the first token): the first-token deadline no longer applies."""
        if not self.started:
            self.started = True
            self._on_first()

    def usage(self, input: int | None = None, output: int | None = None) -> None:
        """Token counts as the server reports them (either may come separately)."""
        if input is not None:
            self.usage_in = int(input)
        if output is not None:
            self.usage_out = int(output)


def _too_long_line(max_line: int, who: str) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"line over {max_line} bytes from {who}; the server sent that much without a "
        "newline (a broken or hostile server); raise the provider's max_line_bytes if "
        "its lines are really that long"
    )


def _too_long_body(max_total: int, who: str) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"answer over {max_total} bytes from {who}; raise the provider's "
        "max_response_bytes if its answers are really that long"
    )


async def bounded_lines(
    resp: httpx.Response, *, max_line: int, max_total: int, who: str
) -> AsyncIterator[str]:
    """The lines of a streamed body (``\n`` or ``\r\n`` ends one), decoded as UTF-8.

    Unlike ``aiter_lines`` this holds at most ``max_line`` bytes of an unfinished line
    and reads at most ``max_total`` bytes in all, raising :class:`ResponseTooLarge`
    naming ``who`` past either.  Only the new bytes are searched for the newline, so a
    long line costs linear time.
    """
    buf = bytearray()
    total = 0
    async for chunk in resp.aiter_bytes():
        total += len(chunk)
        if total > max_total:
            raise _too_long_body(max_total, who)
        scan = len(buf)
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", scan)
            if nl < 0:
                break
            if nl - start > max_line:
                raise _too_long_line(max_line, who)
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            yield buf[start:end].decode("utf-8", "replace")
            start = scan = nl + 1
        if start:
            del buf[:start]
        if len(buf) > max_line:
            raise _too_long_line(max_line, who)
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", "replace")


async def read_bounded(resp: httpx.Response, *, max_total: int, who: str) -> bytes:
    """The whole body, or :class:`ResponseTooLarge` once it passes ``max_total`` bytes."""
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        if len(out) > max_total:
            raise _too_long_body(max_total, who)
    return bytes(out)


async def read_head(resp: httpx.Response, limit: int = _ERROR_BODY_MAX) -> bytes:
    """At most ``limit`` bytes of the body (an error message), the rest left unread."""
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out[:limit])


async def sse_events(
    resp: httpx.Response, lines: AsyncIterator[str] | None = None
) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events of a streamed response as ``(event, data)``.

    Comment lines (``: keep-alive``) are skipped; multi-line data is joined with
    newlines; an event without an ``event:`` field is ``"message"``.  ``lines`` is the
    bounded line reader (:meth:`HttpProvider.lines`); without it, ``aiter_lines``.
    """
    event, data = "", []
    size = 0
    async for line in lines if lines is not None else resp.aiter_lines():
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data, size = "", [], 0
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            # Many short data lines make one event: bound the event as a line is bounded.
            size += len(value)
            if lines is not None and size > _MAX_EVENT_CHARS:
                raise ResponseTooLarge(
                    f"one server-sent event is over {_MAX_EVENT_CHARS} characters"
                )
        if field == "event":
            event = value
        elif field == "error":
            # llama.cpp's server reports a failure as a bare ``error: {...}`` line.
            yield "error", value
            event, data, size = "", [], 0
        elif field == "data":
            data.append(value)
    if data:
        yield event or "message", "\n".join(data)


# One SSE event's data, joined from its lines (each line is bounded by max_line_bytes).
_MAX_EVENT_CHARS = 16 * 1024 * 1024


def parse_json(raw: str | bytes, what: str) -> Any:
    """JSON or a ServerError naming what could not be parsed."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = raw if isinstance(raw, str) else raw[:200].decode("utf-8", "replace")
        raise ServerError(f"{what} is not JSON: {text[:200]!r}") from None


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``, in seconds."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_text(body: bytes) -> str:
    """The human part of an error body: ``error.message``, ``error``, or the raw text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:_ERROR_TEXT_MAX]
    if isinstance(data, dict):
        err = data.get("error", data.get("message"))
        if isinstance(err, dict):
            err = err.get("message") or err.get("type") or err
        if isinstance(err, str):
            return err[:_ERROR_TEXT_MAX]
    return text[:_ERROR_TEXT_MAX]


class HttpProvider:
    """Base of the HTTP providers: client, timeouts, error mapping, the chat driver."""

    kind: ClassVar[str] = "http"
    _chat_path: ClassVar[str] = ""
    _sse: ClassVar[bool] = True  # the stream is server-sent events (else NDJSON)
    # Reuse idle connections; a server that drops them unpredictably turns this off.
    _keepalive: ClassVar[bool] = True

    def __init__(
        self,
        cfg: ProviderConfig,
        *,
        api_key: str | None = None,
        client: httpx.AsyncClient | None = None,
        stream: bool = True,
        base_url: str | None = None,
    ) -> None:
        """Paths are appended to ``base_url`` (default ``cfg.base_url``; the embedded
        provider passes its llama.cpp server's address).  ``stream=False`` asks for whole
        answers (for servers that cannot stream; the first-token timeout then covers the
        whole generation).  ``client`` lets a caller share or tune the httpx client; it
        is then the caller's to close."""
        self.name = cfg.name
        self.config = cfg
        self.stream = stream
        self._api_key = api_key or None
        self._base = (base_url if base_url is not None else cfg.base_url).rstrip("/")
        if not self._base.startswith(("http://", "https://")):
            raise ValueError(
                f"provider {cfg.name!r}: base_url must start with http:// or https://, "
                f"got {self._base!r}"
            )
        # Sent with each request (not as client defaults) so that a caller's shared
        # client never carries this provider's key to another server.
        self._headers = self._auth_headers(api_key)
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=cfg.connect_timeout_s, read=None, write=cfg.connect_timeout_s, pool=None
            ),
            # The pool limits calls per provider by capacity; keep enough warm connections
            # for that and never make a call queue for a socket here.
            limits=httpx.Limits(
                max_connections=None,
                max_keepalive_connections=max(8, cfg.capacity * 2) if self._keepalive else 0,
            ),
        )
        self._owns_client = client is None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._base}>"

    # -- for subclasses ----------------------------------------------------------------

    def _auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _chat_body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        raise NotImplementedError

    async def _read_stream(self, resp: httpx.Response, sink: StreamSink) -> None:
        raise NotImplementedError

    def _read_full(self, data: Any, sink: StreamSink) -> None:
        raise NotImplementedError

    def _whole_json(self, resp: httpx.Response) -> bool:
        """True when a server asked to stream answered one JSON body instead (some
        OpenAI-compatible servers ignore ``stream``); SSE formats then read it whole."""
        ctype = resp.headers.get("content-type", "")
        return self._sse and ctype.startswith("application/json")

    # -- helpers -----------------------------------------------------------------------

    def url(self, path: str) -> str:
        """The full URL of an API path."""
        return self._base + path

    def lines(self, resp: httpx.Response) -> AsyncIterator[str]:
        """The bounded lines of a streamed answer (see :func:`bounded_lines`)."""
        return bounded_lines(
            resp,
            max_line=self.config.max_line_bytes,
            max_total=self.config.max_response_bytes,
            who=f"provider {self.name!r}",
        )

    async def read_body(self, resp: httpx.Response) -> bytes:
        """A whole (non-streamed) answer body, bounded by ``max_response_bytes``."""
        return await read_bounded(
            resp, max_total=self.config.max_response_bytes, who=f"provider {self.name!r}"
        )

    def redact(self, text: str) -> str:
        """``text`` with the API key (if any) masked."""
        if self._api_key and self._api_key in text:
            return text.replace(self._api_key, "***")
        return text

    def error(
        self,
        what: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
        streamed: bool = False,
        status: int | None = None,
    ) -> ProviderError:
        """A ProviderError whose message starts with the provider's name and kind."""
        return ProviderError(
            self.redact(f"{self.kind} provider {self.name!r}: {what}"),
            retryable=retryable,
            retry_after_s=retry_after_s,
            streamed=streamed,
            status=status,
        )

    async def status_error(
        self, method: str, path: str, resp: httpx.Response, *, streamed: bool = False
    ) -> ProviderError:
        """The error for an HTTP error status (429, 5xx and 408 are retryable)."""
        body = await read_head(resp)
        code = resp.status_code
        retryable = code in (408, 425, 429) or code >= 500
        return self.error(
            f"{method} {path} -> HTTP {code}: {error_text(body) or resp.reason_phrase}",
            retryable=retryable and not streamed,
            retry_after_s=retry_after_seconds(resp.headers) if retryable else None,
            streamed=streamed,
            status=code,
        )

    async def request_json(
        self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None
    ) -> Any:
        """One non-streamed request; the JSON answer or a ProviderError."""
        timeout_s = timeout_s or self.config.total_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client.stream(
                    method, self.url(path), json=body, headers=self._headers
                ) as resp:
                    if resp.status_code >= 400:
                        raise await self.status_error(method, path, resp)
                    raw = await self.read_body(resp)
                return parse_json(raw, f"answer of {method} {path}")
        except TimeoutError:
            raise self.error(
                f"{method} {path}: no answer within {timeout_s:g}s", retryable=True
            ) from None
        except httpx.RequestError as exc:
            raise self._transport_error(method, path, exc, streamed=False) from None
        except ServerError as exc:
            raise self.error(f"{method} {path}: {exc}", retryable=exc.retryable) from None

    def _transport_error(
        self, method: str, path: str, exc: httpx.RequestError, *, streamed: bool
    ) -> ProviderError:
        if isinstance(exc, httpx.ConnectTimeout):
            what = f"cannot connect to {self._base} within {self.config.connect_timeout_s:g}s"
        elif isinstance(exc, httpx.ConnectError):
            what = f"cannot connect to {self._base} ({exc or 'connection refused'})"
        elif isinstance(exc, httpx.TransportError):
            what = f"connection lost ({type(exc).__name__}: {exc or 'no detail'})"
        else:  # undecodable body, redirect loop...
            what = f"bad answer ({type(exc).__name__}: {exc or 'no detail'})"
        return self.error(f"{method} {path}: {what}", retryable=not streamed, streamed=streamed)

    # -- the chat driver -------------------------------------------------------------

    async def chat(self, req: ChatRequest, on_delta: OnDelta | None = None) -> ChatResult:
        """Run one chat call, streaming pieces of text to ``on_delta``.

        ``on_delta`` returning True closes the stream at once; the result then has
        ``stopped=True``.  Raises ProviderError (see rlmd.providers.base).
        """
        cfg = self.config
        path = self._chat_path
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        total_deadline = loop.time() + cfg.total_timeout_s
        first_deadline = min(loop.time() + cfg.first_token_timeout_s, total_deadline)
        scope: asyncio.Timeout | None = None

        def on_first() -> None:
            if scope is not None:
                scope.reschedule(total_deadline)

        sink = StreamSink(on_delta, t0, on_first)
        body = self._chat_body(req, self.stream)
        stopped = False
        try:
            async with asyncio.timeout_at(first_deadline) as scope:
                async with self._client.stream(
                    "POST", self.url(path), json=body, headers=self._headers
                ) as resp:
                    if resp.status_code >= 400:
                        raise await self.status_error("POST", path, resp)
                    if self.stream and not self._whole_json(resp):
                        await self._read_stream(resp, sink)
                    else:
                        raw = await self.read_body(resp)
                        self._read_full(parse_json(raw, f"answer of POST {path}"), sink)
                        on_first()
        except _Stop:
            stopped = True
        except TimeoutError:
            if not sink.started:
                raise self.error(
                    f"POST {path}: no first token within {cfg.first_token_timeout_s:g}s",
                    retryable=True,
                ) from None
            raise self.error(
                f"POST {path}: answer not finished within {cfg.total_timeout_s:g}s",
                streamed=sink.streamed,
            ) from None
        except httpx.RequestError as exc:
            raise self._transport_error("POST", path, exc, streamed=sink.streamed) from None
        except ServerError as exc:
            raise self.error(
                f"POST {path}: server error: {exc}",
                retryable=exc.retryable and not sink.streamed,
                streamed=sink.streamed,
            ) from None
        return self._result(req, sink, t0, stopped)

    def _result(self, req: ChatRequest, sink: StreamSink, t0: float, stopped: bool) -> ChatResult:
        text = "".join(sink.parts)
        estimated = sink.usage_in is None or sink.usage_out is None
        usage = Usage(
            input=sink.usage_in
            if sink.usage_in is not None
            else sum(estimate_tokens(m.content) for m in req.messages),
            output=sink.usage_out if sink.usage_out is not None else estimate_tokens(text),
        )
        elapsed = time.monotonic() - t0
        return ChatResult(
            text=text,
            model=req.model,
            provider=self.name,
            usage=usage,
            usage_estimated=estimated,
            stopped=stopped,
            ttft_s=sink.ttft_s if sink.ttft_s is not None else elapsed,
            elapsed_s=elapsed,
        )

    async def probe(self, model: str | None = None) -> bool:
        """A 1-token chat call: True when the server answers it."""
        models = self.config.models
        if model is None and not models:
            return False
        req = ChatRequest(
            model=model or models[0],
            messages=(Message(role="user", content="ping"),),
            max_tokens=1,
        )
        try:
            # A health check must not wait as long as a real call may.
            async with asyncio.timeout(min(self.config.first_token_timeout_s, 30.0)):
                await self.chat(req)
        except (ProviderError, TimeoutError):
            return False
        return True

    async def get_ok(self, path: str) -> bool:
        """True when ``GET path`` answers 2xx within the connect timeout (or 5 s)."""
        timeout = max(self.config.connect_timeout_s, 5.0)
        return await self.status_ok(self.url(path), wait_s=timeout)

    async def status_ok(self, url: str, *, wait_s: float) -> bool:
        """True when ``GET url`` answers 2xx; the body is never read (it may be endless)."""
        try:
            async with asyncio.timeout(wait_s):
                async with self._client.stream("GET", url, headers=self._headers) as resp:
                    return resp.is_success
        except (TimeoutError, httpx.HTTPError):
            return False

    async def aclose(self) -> None:
        """Close the connection pool (if this provider made it)."""
        if self._owns_client:
            await self._client.aclose()


def drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` without the keys whose value is None (servers reject explicit nulls)."""
    return {k: v for k, v in d.items() if v is not None}
