r"""A real loopback HTTP model server with scripted answers, for tests and benchmarks.

One HTTP/1.1 server on 127.0.0.1 speaks three wire formats at once, so every provider
(and anything built on them) can be tested against real sockets, real streaming and real
failures without a model:

==========  ==============================================================================
Ollama      ``GET /`` ("Ollama is running"), ``GET /api/ps``, ``GET /api/tags``,
            ``POST /api/chat`` (NDJSON stream unless ``"stream": false``),
            ``POST /api/embed``
OpenAI      ``POST /v1/chat/completions`` (SSE when ``"stream": true``; a usage chunk with
            ``"choices": []`` last when ``stream_options.include_usage``),
            ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``; llama.cpp's
            ``POST /tokenize`` (``{"content": ...}`` -> ``{"tokens": [...]}``, as many
            tokens as ``estimate`` gives) and, with ``n_ctx``, its HTTP 400 for a prompt
            over the window
Anthropic   ``POST /v1/messages`` (SSE when ``"stream": true``: ``message_start``,
            ``content_block_start``, ``ping``, ``content_block_delta``/``text_delta``,
            ``content_block_stop``, ``message_delta`` with usage, ``message_stop``;
            ``max_tokens`` is required as on the real API), ``GET /v1/models``
==========  ==============================================================================

Use in Python (sync or async tests alike; the server runs in its own threads)::

    from rlmd.testing.scripted_server import ScriptedReply, Rule, ScriptedServer

    rules = [
        Rule(pattern=r"capital of France", reply=ScriptedReply(text="Paris.")),
        Rule(pattern=r"flaky", reply=ScriptedReply(status=429, retry_after=2), times=1),
        Rule(pattern="", reply=ScriptedReply(text="default answer")),   # "" matches everything
    ]
    with ScriptedServer(rules) as srv:
        srv.url            # "http://127.0.0.1:PORT" (Ollama and Anthropic base_url)
        srv.url + "/v1"    # the OpenAI-compatible base_url
        ...
        srv.calls          # list[ChatCall], one per chat request, in arrival order
        srv.max_concurrent # most chat requests ever in flight at once
        srv.connections    # TCP connections accepted so far
        srv.down(); srv.up()   # refuse connections (cutting open ones), then serve again

or as a process (Emacs and benchmark tests)::

    python -m rlmd.testing.scripted_server --rules FILE.json [--port 0] [--delay S]
                                           [--models a,b] [--api-key-env VAR]

which prints ``PORT <n>`` as its first stdout line, then serves until SIGTERM/SIGINT.

Rules
-----
Each chat request is matched against the rules in order; the first matching rule wins.
A rule matches when

* ``pattern`` (a Python regex, ``re.search``) is found in the *last user message*
  (``""`` matches everything), and
* ``system_pattern``, if set, is found in the system prompt (for Anthropic: the top-level
  ``system`` field; for the others: the ``system`` messages joined), and
* ``model``, if set, equals the requested model, and
* the rule has been used fewer than ``times`` times (``times`` unset: unlimited); a used-up
  rule is skipped, so the next matching rule answers ("fail once, then succeed").

With ``"expand": true`` the reply text is a ``re`` template over the pattern's match of
the last user message: ``{"pattern": "say (\\w+)", "expand": true, "reply": "\\1!"}``
(JSON) answers "say hello" with "hello!"; in Python:
``Rule(pattern=r"say (\w+)", expand=True, reply=ScriptedReply(text=r"\1!"))``.

A ``responder`` callable (``responder(call: ChatCall) -> ScriptedReply | None``) may be given
instead of or besides rules; it is asked first, and ``None`` falls through to the rules.
It runs in the server's handler threads (concurrently for parallel calls); if it raises,
the call is answered HTTP 400 naming the exception (and the traceback goes to stderr).
When nothing matches, the ``default`` reply answers; without one the server answers
HTTP 400 with an error naming the unmatched message (a test set-up error, not retryable).

The rules file for the CLI is JSON, either a list of rules or an object::

    {
      "models": ["scripted", "qwen2.5-coder:32b"],
      "default": {"text": "I don't know."},
      "rules": [
        {"pattern": "capital of France", "reply": {"text": "Paris.", "chunks": 2}},
        {"pattern": "slow", "reply": {"text": "ok", "delay_s": 1.5}},
        {"pattern": "boom", "reply": {"status": 500}, "times": 1},
        {"pattern": "short", "reply": "a bare string is the reply text"}
      ]
    }

ScriptedReply fields (all optional):

``text``               the answer (default ``""``)
``chunks``             number of streamed pieces; default: one per word (with its spaces)
``delay_s``            sleep before the first token (the response headers go out first)
``chunk_delay_s``      sleep between pieces
``status``             HTTP status; >= 400 answers an error body in the API's format
``error``              message of that error body / of ``error_mid_stream``
``retry_after``        seconds, sent as the ``Retry-After`` header (with 429 or 503)
``die_after_chunks``   close the connection abruptly after N pieces (0: right after the
                       headers); non-streaming: after half of the body
``error_mid_stream``   after the pieces (or after ``error_after_chunks`` pieces) send the
                       API's in-stream error (Ollama ``{"error": ...}`` line with HTTP 200,
                       OpenAI ``data: {"error": {...}}``, Anthropic ``event: error``)
``error_after_chunks`` see above
``hang``               never send the first token; the handler waits until the client goes
                       away (or the server is stopped)
``usage_in``/``usage_out``  reported token counts; default: about 4 characters a token
``flood_bytes``        after the headers (and the stream's prelude) send this many bytes of
                       ``x`` with no newline, then end the answer (a broken or hostile
                       server); non-streaming: a body of that many bytes

Stop sequences sent by the client (Ollama ``options.stop``, OpenAI ``stop``, Anthropic
``stop_sequences``) cut the reply text before the first one, as real servers do.
``no_stream``          answer with one JSON body even when a stream was asked for (as some
                       servers do)
``quirks``             OpenAI streams also carry a ``"choices": null`` chunk and an empty
                       ``"choices": []`` chunk mid-stream (SSE ``: keep-alive`` comments
                       and Anthropic ``ping`` events are always sent)

Embeddings are deterministic: a hashed bag of lower-cased words in 256 dimensions,
normalised, so equal texts give equal vectors and texts sharing words similar ones
(see :func:`embed_text`).

If ``api_key`` is given, OpenAI requests must carry ``Authorization: Bearer KEY`` and
Anthropic requests ``x-api-key: KEY``; others get HTTP 401.  Request headers are kept in
``ChatCall.headers`` either way so tests can check what a client sent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

from rlmd.providers.base import Message

EMBED_DIMS = 256


class ScriptedReply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How the server answers one chat request (see the module docstring)."""

    text: str = ""
    chunks: int | None = None
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    status: int = 200
    error: str = ""
    retry_after: float | None = None
    die_after_chunks: int | None = None
    error_mid_stream: bool | str = False
    error_after_chunks: int | None = None
    hang: bool = False
    usage_in: int | None = None
    usage_out: int | None = None
    quirks: bool = False
    no_stream: bool = False
    flood_bytes: int = 0


class Rule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One scripted answer and the requests it applies to (see the module docstring)."""

    pattern: str = ""
    reply: ScriptedReply = msgspec.field(default_factory=ScriptedReply)
    system_pattern: str | None = None
    model: str | None = None
    times: int | None = None
    expand: bool = False


class ChatCall(msgspec.Struct, kw_only=True):
    """One chat request as the server saw it.

    ``headers`` has lower-cased names; ``t_start``/``t_end`` are ``time.monotonic()``.
    """

    path: str
    model: str
    messages: list[Message]
    stream: bool
    headers: dict[str, str]
    body: dict[str, Any]
    t_start: float
    t_end: float | None = None
    reply: ScriptedReply | None = None

    @property
    def last_user(self) -> str:
        """The last user message (what ``Rule.pattern`` is matched against)."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return ""

    @property
    def prompt_tokens(self) -> int:
        """The messages' tokens by ``estimate``: the reported usage, and what ``n_ctx``
        is held against."""
        return sum(estimate(m.content) for m in self.messages)

    @property
    def system(self) -> str:
        """The system prompt (what ``Rule.system_pattern`` is matched against)."""
        return "\n\n".join(m.content for m in self.messages if m.role == "system")

    @property
    def stop(self) -> list[str]:
        """The stop sequences the client sent (Ollama ``options.stop``, OpenAI ``stop``,
        Anthropic ``stop_sequences``)."""
        opts = self.body.get("options")
        raw = self.body.get("stop_sequences") or self.body.get("stop")
        if raw is None and isinstance(opts, dict):
            raw = opts.get("stop")
        if isinstance(raw, str):
            return [raw]
        return [x for x in raw or () if isinstance(x, str) and x]


class EmbedCall(msgspec.Struct, kw_only=True):
    """One embeddings request."""

    path: str
    model: str
    texts: list[str]
    headers: dict[str, str]


Responder = Callable[[ChatCall], "ScriptedReply | None"]


class _RulesFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    rules: list[Rule] = []
    models: list[str] = []
    default: ScriptedReply | None = None


def load_rules(path: str | os.PathLike[str]) -> tuple[list[Rule], list[str], ScriptedReply | None]:
    """Read a JSON rules file: ``(rules, models, default)``; errors name the file and key."""
    with open(path, "rb") as f:
        raw = json.load(f)
    return parse_rules(raw, source=str(path))


def parse_rules(
    raw: Any, source: str = "<rules>"
) -> tuple[list[Rule], list[str], ScriptedReply | None]:
    """Validate already-parsed JSON rules (a list of rules or an object, see module doc)."""
    if isinstance(raw, list):
        raw = {"rules": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a list of rules or an object with 'rules'")
    for r in raw.get("rules", []):
        if isinstance(r, dict) and isinstance(r.get("reply"), str):
            r["reply"] = {"text": r["reply"]}
    if isinstance(raw.get("default"), str):
        raw["default"] = {"text": raw["default"]}
    try:
        parsed = msgspec.convert(raw, _RulesFile)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{source}: invalid rules: {exc}") from None
    for rule in parsed.rules:
        for pat in (rule.pattern, rule.system_pattern):
            if pat is not None:
                try:
                    re.compile(pat)
                except re.error as exc:
                    raise ValueError(f"{source}: bad regex {pat!r}: {exc}") from None
    return parsed.rules, parsed.models, parsed.default


def embed_text(text: str, dims: int = EMBED_DIMS) -> list[float]:
    """Deterministic unit vector: hashed bag of lower-cased words with signs."""
    vec = [0.0] * dims
    for word in re.findall(r"\w+", text.lower()):
        h = hashlib.blake2b(word.encode(), digest_size=8).digest()
        idx = int.from_bytes(h[:4], "little") % dims
        vec[idx] += 1.0 if h[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec))
    if norm == 0.0:
        # An empty text still gets a unit vector so cosine similarity stays defined.
        vec[0] = 1.0
        return vec
    return [v / norm for v in vec]


def estimate(text: str) -> int:
    """About 4 characters a token, as the default reported usage."""
    return max(1, len(text) // 4) if text else 0


def split_chunks(text: str, chunks: int | None) -> list[str]:
    """Split ``text`` into pieces: one per word by default, else ``chunks`` near-equal ones."""
    if not text:
        return []
    if chunks is None:
        return re.findall(r"\s*\S+\s*|\s+", text) or [text]
    n = max(1, min(chunks, len(text)))
    size, extra = divmod(len(text), n)
    out, pos = [], 0
    for i in range(n):
        end = pos + size + (1 if i < extra else 0)
        out.append(text[pos:end])
        pos = end
    return out


class _ClientGone(Exception):
    """The client closed the connection (or the server is going down)."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], owner: ScriptedServer) -> None:
        self.owner = owner
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is routine here (stopped streams, timeouts).
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class ScriptedServer:
    """The loopback server.  Start with ``start()`` or ``with``; stop with ``close()``."""

    def __init__(
        self,
        rules: list[Rule] | None = None,
        *,
        responder: Responder | None = None,
        default: ScriptedReply | None = None,
        models: list[str] | None = None,
        api_key: str | None = None,
        delay_s: float = 0.0,
        port: int = 0,
        health_endpoint: bool = True,
        n_ctx: int | None = None,
    ) -> None:
        """``health_endpoint=False`` answers ``GET /health`` with 404, as servers without
        one (DeepSeek, OpenAI) do.  ``n_ctx`` refuses a chat whose messages come to more
        tokens (by ``estimate``) as llama.cpp's server does."""
        self.n_ctx = n_ctx
        self.health_endpoint = health_endpoint
        self._rules = list(rules or [])
        self._used = [0] * len(self._rules)
        self.responder = responder
        self.default = default
        self.models = list(models or ["scripted"])
        self.api_key = api_key
        self.delay_s = delay_s
        self.port = port
        self.calls: list[ChatCall] = []
        self.embed_calls: list[EmbedCall] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.in_flight = 0
        self.max_concurrent = 0
        self.connections = 0  # TCP connections accepted (keep-alive reuse shows here)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; the OpenAI base_url is this plus ``/v1``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedServer:
        """Bind (an ephemeral port unless one was given) and serve in a background thread."""
        self.up()
        return self

    def up(self) -> None:
        """Serve (again) on the same port."""
        if self._httpd is not None:
            return
        self._stopping = threading.Event()
        httpd = _HTTPServer(("127.0.0.1", self.port), self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"scripted-server-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def down(self) -> None:
        """Stop serving: new connections are refused and open ones are cut."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        """Stop the server for good."""
        self.down()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ScriptedServer:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- scripting -------------------------------------------------------------------

    def set_rules(self, rules: list[Rule]) -> None:
        """Replace the rules (and their use counts)."""
        with self._lock:
            self._rules = list(rules)
            self._used = [0] * len(self._rules)

    def add_rule(self, rule: Rule) -> None:
        """Append a rule (it matches after the existing ones)."""
        with self._lock:
            self._rules.append(rule)
            self._used.append(0)

    def reset_calls(self) -> None:
        """Forget recorded calls and the concurrency high-water mark."""
        with self._lock:
            self.calls.clear()
            self.embed_calls.clear()
            self.requests.clear()
            self.max_concurrent = self.in_flight

    def choose(self, call: ChatCall) -> ScriptedReply | None:
        """The reply for ``call``: the responder's, else the first matching rule's."""
        if self.responder is not None:
            reply = self.responder(call)
            if reply is not None:
                return reply
        user, system = call.last_user, call.system
        with self._lock:
            for i, rule in enumerate(self._rules):
                if rule.times is not None and self._used[i] >= rule.times:
                    continue
                if rule.model is not None and rule.model != call.model:
                    continue
                if rule.system_pattern is not None and not re.search(rule.system_pattern, system):
                    continue
                match = re.search(rule.pattern, user)
                if match is None:
                    continue
                self._used[i] += 1
                if rule.expand:
                    return msgspec.structs.replace(rule.reply, text=match.expand(rule.reply.text))
                return rule.reply
        return self.default

    # -- bookkeeping used by the handler ---------------------------------------------

    def _enter(self, call: ChatCall) -> None:
        with self._lock:
            self.calls.append(call)
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)

    def _leave(self, call: ChatCall) -> None:
        with self._lock:
            call.t_end = time.monotonic()
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until no chat request is in flight (the handlers saw their clients
        leave); False on timeout.  From async code: ``await asyncio.to_thread(...)``."""
        with self._idle:
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to (without) its first stop sequence, as real servers answer."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _messages_openai(body: dict[str, Any]) -> list[Message]:
    out = []
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            out.append(Message(role=m.get("role", "user"), content=_as_text(m.get("content"))))
    return out


def _as_text(content: Any) -> str:
    """Message content as text: a string, or a list of text blocks (OpenAI/Anthropic)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return "" if content is None else str(content)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    # Small writes must leave at once: streaming tests measure time to first token.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read server.calls, not a log

    @property
    def owner(self) -> ScriptedServer:
        return self.server.owner

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)
            self.owner.connections += 1

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # -- routing ---------------------------------------------------------------------

    def do_GET(self) -> None:
        self._record()
        path = self.path.split("?", 1)[0]
        models = self.owner.models
        if path == "/":
            self._send_raw(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/health" and self.owner.health_endpoint:
            self._send_json(200, {"status": "ok"})
        elif path in ("/api/tags", "/api/ps"):
            self._send_json(
                200,
                {"models": [{"name": m, "model": m, "size": 0, "digest": ""} for m in models]},
            )
        elif path == "/v1/models":
            data = [
                {
                    "id": m,
                    "object": "model",
                    "type": "model",
                    "owned_by": "scripted",
                    "display_name": m,
                    "created": 0,
                    "created_at": "1970-01-01T00:00:00Z",
                }
                for m in models
            ]
            self._send_json(200, {"object": "list", "data": data, "has_more": False})
        else:
            self._send_json(404, {"error": f"no such path: GET {path}"})

    def do_POST(self) -> None:
        self._record()
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_json()
        except ValueError as exc:
            self._send_json(400, {"error": str(exc)})
            return
        if path == "/api/chat":
            self._chat("ollama", body, stream=body.get("stream", True) is not False)
        elif path == "/v1/chat/completions":
            if self._auth_ok("openai"):
                self._chat("openai", body, stream=bool(body.get("stream")))
        elif path == "/v1/messages":
            if self._auth_ok("anthropic"):
                if not isinstance(body.get("max_tokens"), int):
                    self._send_error("anthropic", 400, "max_tokens: Field required")
                    return
                self._chat("anthropic", body, stream=bool(body.get("stream")))
        elif path in ("/api/embed", "/v1/embeddings"):
            if path == "/api/embed" or self._auth_ok("openai"):
                self._embed(path, body)
        elif path == "/tokenize":
            self._send_json(200, {"tokens": list(range(estimate(str(body.get("content", "")))))})
        else:
            self._send_json(404, {"error": f"no such path: POST {path}"})

    # -- helpers -----------------------------------------------------------------------

    def _record(self) -> None:
        with self.owner._lock:
            self.owner.requests.append((self.command, self.path))

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ValueError("request body needs a Content-Length")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        return body

    def _auth_ok(self, api: str) -> bool:
        key = self.owner.api_key
        if key is None:
            return True
        if api == "anthropic":
            ok = self.headers.get("x-api-key") == key
        else:
            ok = self.headers.get("Authorization") == f"Bearer {key}"
        if not ok:
            self._send_error(api, 401, "invalid api key")
        return ok

    def _send_raw(
        self, status: int, data: bytes, ctype: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(obj).encode(), "application/json", extra)

    @staticmethod
    def _error_body(api: str, status: int, message: str) -> dict[str, Any]:
        if api == "ollama":
            return {"error": message}
        if api == "anthropic":
            kind = {
                400: "invalid_request_error",
                401: "authentication_error",
                429: "rate_limit_error",
                529: "overloaded_error",
            }.get(status, "api_error")
            return {"type": "error", "error": {"type": kind, "message": message}}
        kind = "rate_limit_error" if status == 429 else "server_error"
        return {"error": {"message": message, "type": kind, "code": status}}

    def _send_error(
        self, api: str, status: int, message: str, retry_after: float | None = None
    ) -> None:
        extra = {}
        if retry_after is not None:
            extra["Retry-After"] = f"{retry_after:g}"
        self._send_json(status, self._error_body(api, status, message), extra)

    def _start_stream(self, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _write_chunk(self, data: bytes) -> None:
        if self.owner._stopping.is_set():
            raise _ClientGone
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            raise _ClientGone from None

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            raise _ClientGone from None

    def _die(self) -> None:
        """Cut the connection without finishing the response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
        return False

    def _sleep(self, seconds: float) -> None:
        """Sleep, but give up as soon as the client leaves or the server goes down."""
        end = time.monotonic() + seconds
        while True:
            if self.owner._stopping.is_set() or self._client_gone():
                raise _ClientGone
            left = end - time.monotonic()
            if left <= 0:
                return
            self.owner._stopping.wait(min(left, 0.02))

    def _hang(self) -> None:
        self._sleep(math.inf)

    # -- chat ----------------------------------------------------------------------------

    def _chat(self, api: str, body: dict[str, Any], *, stream: bool) -> None:
        messages = _messages_openai(body)
        if api == "anthropic" and body.get("system"):
            messages.insert(0, Message(role="system", content=_as_text(body["system"])))
        call = ChatCall(
            path=self.path,
            model=str(body.get("model", "")),
            messages=messages,
            stream=stream,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            t_start=time.monotonic(),
        )
        self.owner._enter(call)
        try:
            n_ctx, n_prompt = self.owner.n_ctx, call.prompt_tokens
            if n_ctx is not None and n_prompt > n_ctx:
                message = (
                    f"request ({n_prompt} tokens) exceeds the available context size "
                    f"({n_ctx} tokens), try increasing it"
                )
                error = {"code": 400, "message": message, "type": "exceed_context_size_error"}
                self._send_json(
                    400, {"error": error | {"n_prompt_tokens": n_prompt, "n_ctx": n_ctx}}
                )
                return
            try:
                reply = self.owner.choose(call)
            except Exception as exc:
                # A broken responder is a test bug: say so plainly (HTTP 400 is not
                # retried) instead of cutting the connection.
                traceback.print_exc()
                self._send_error(
                    api, 400, f"scripted server: responder raised {type(exc).__name__}: {exc}"
                )
                return
            call.reply = reply
            if reply is None:
                self._send_error(
                    api,
                    400,
                    f"scripted server: no rule matched the last user message "
                    f"{call.last_user[:200]!r} (model {call.model!r})",
                )
                return
            try:
                self._answer(api, call, reply, stream)
            except _ClientGone:
                self.close_connection = True
        finally:
            self.owner._leave(call)

    def _answer(self, api: str, call: ChatCall, reply: ScriptedReply, stream: bool) -> None:
        if reply.status >= 400:
            self._sleep(reply.delay_s + self.owner.delay_s)
            msg = reply.error or f"scripted error (HTTP {reply.status})"
            self._send_error(api, reply.status, msg, reply.retry_after)
            return
        usage_in = reply.usage_in
        if usage_in is None:
            usage_in = call.prompt_tokens
        text = _cut_at_stop(reply.text, call.stop)
        usage_out = reply.usage_out if reply.usage_out is not None else estimate(text)
        pieces = split_chunks(text, reply.chunks)
        err_msg = (
            reply.error_mid_stream
            if isinstance(reply.error_mid_stream, str)
            else (reply.error or "scripted error mid-stream")
        )
        fmt = _FORMATS[api](call, usage_in, usage_out)
        if reply.flood_bytes:
            self._flood(fmt, reply.flood_bytes, stream=stream and not reply.no_stream)
            return
        if not stream or reply.no_stream:
            if reply.hang:
                self._hang()
            self._sleep(reply.delay_s + self.owner.delay_s)
            if reply.error_mid_stream:
                self._send_json(200, fmt.error(err_msg))
                return
            data = json.dumps(fmt.full(text)).encode()
            if reply.die_after_chunks is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self._die()
                return
            self._send_raw(200, data, "application/json")
            return

        self._start_stream(fmt.content_type)
        for frame in fmt.prelude():
            self._write_chunk(frame)
        if reply.hang:
            self._hang()
        self._sleep(reply.delay_s + self.owner.delay_s)
        error_at = reply.error_after_chunks if reply.error_after_chunks is not None else len(pieces)
        for i, piece in enumerate(pieces):
            if reply.die_after_chunks is not None and i >= reply.die_after_chunks:
                self._die()
                return
            if reply.error_mid_stream and i >= error_at:
                break
            if i:
                self._sleep(reply.chunk_delay_s)
            self._write_chunk(fmt.delta(piece))
            if reply.quirks and i == 0:
                for frame in fmt.quirks():
                    self._write_chunk(frame)
        else:
            if reply.die_after_chunks is not None and reply.die_after_chunks <= len(pieces):
                self._die()
                return
        if reply.error_mid_stream:
            self._write_chunk(fmt.stream_error(err_msg))
            self._end_stream()
            return
        for frame in fmt.finish():
            self._write_chunk(frame)
        self._end_stream()

    def _flood(self, fmt: _Format, n: int, *, stream: bool) -> None:
        """``n`` bytes of ``x`` and no newline, as fast as the client reads them."""
        block = b"x" * (256 * 1024)
        if stream:
            self._start_stream(fmt.content_type)
            for frame in fmt.prelude():
                self._write_chunk(frame)
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(n))
            self.end_headers()
        left = n
        while left > 0:
            piece = block[: min(left, len(block))]
            left -= len(piece)
            if stream:
                self._write_chunk(piece)
            else:
                try:
                    self.wfile.write(piece)
                except OSError:
                    raise _ClientGone from None
        if stream:
            self._end_stream()

    # -- embeddings ------------------------------------------------------------------

    def _embed(self, path: str, body: dict[str, Any]) -> None:
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else list(inp or [])
        if not all(isinstance(t, str) for t in texts):
            self._send_json(400, {"error": "input must be a string or a list of strings"})
            return
        model = str(body.get("model", ""))
        with self.owner._lock:
            self.owner.embed_calls.append(
                EmbedCall(
                    path=path,
                    model=model,
                    texts=texts,
                    headers={k.lower(): v for k, v in self.headers.items()},
                )
            )
        vectors = [embed_text(t) for t in texts]
        if path == "/api/embed":
            self._send_json(200, {"model": model, "embeddings": vectors})
        else:
            tokens = sum(estimate(t) for t in texts)
            self._send_json(
                200,
                {
                    "object": "list",
                    "model": model,
                    "data": [
                        {"object": "embedding", "index": i, "embedding": v}
                        for i, v in enumerate(vectors)
                    ],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )


# -- wire formats -----------------------------------------------------------------------


class _Format:
    content_type = "application/json"

    def __init__(self, call: ChatCall, usage_in: int, usage_out: int) -> None:
        self.call = call
        self.usage_in = usage_in
        self.usage_out = usage_out
        self.id = uuid.uuid4().hex[:12]

    def prelude(self) -> Iterator[bytes]:
        return iter(())

    def quirks(self) -> Iterator[bytes]:
        return iter(())

    def full(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, piece: str) -> bytes:
        raise NotImplementedError

    def stream_error(self, message: str) -> bytes:
        raise NotImplementedError

    def finish(self) -> Iterator[bytes]:
        raise NotImplementedError


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj).encode() + b"\n\n"


class _Ollama(_Format):
    content_type = "application/x-ndjson"

    def _base(self) -> dict[str, Any]:
        return {"model": self.call.model, "created_at": "2026-01-01T00:00:00Z"}

    def full(self, text: str) -> dict[str, Any]:
        return {
            **self._base(),
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1_000_000,
            "prompt_eval_count": self.usage_in,
            "eval_count": self.usage_out,
        }

    def error(self, message: str) -> dict[str, Any]:
        return {"error": message}

    def delta(self, piece: str) -> bytes:
        return _line(
            {**self._base(), "message": {"role": "assistant", "content": piece}, "done": False}
        )

    def stream_error(self, message: str) -> bytes:
        return _line({"error": message})

    def finish(self) -> Iterator[bytes]:
        yield _line(self.full(""))


class _OpenAI(_Format):
    content_type = "text/event-stream"

    def __init__(self, call: ChatCall, usage_in: int, usage_out: int) -> None:
        super().__init__(call, usage_in, usage_out)
        opts = call.body.get("stream_options") or {}
        self.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.usage_in,
            "completion_tokens": self.usage_out,
            "total_tokens": self.usage_in + self.usage_out,
        }

    def _chunk(self, choices: Any, **extra: Any) -> bytes:
        obj: dict[str, Any] = {
            "id": f"chatcmpl-{self.id}",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.call.model,
            "choices": choices,
        }
        if self.include_usage:
            obj["usage"] = None
        obj.update(extra)
        return _sse(obj)

    def full(self, text: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.id}",
            "object": "chat.completion",
            "created": 0,
            "model": self.call.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(),
        }

    def error(self, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "server_error"}}

    def prelude(self) -> Iterator[bytes]:
        yield b": keep-alive\n\n"
        yield self._chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )

    def quirks(self) -> Iterator[bytes]:
        yield b": keep-alive\n\n"
        yield self._chunk(None)
        yield self._chunk([])

    def delta(self, piece: str) -> bytes:
        return self._chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])

    def stream_error(self, message: str) -> bytes:
        return _sse(self.error(message))

    def finish(self) -> Iterator[bytes]:
        yield self._chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if self.include_usage:
            yield self._chunk([], usage=self._usage())
        yield b"data: [DONE]\n\n"


class _Anthropic(_Format):
    content_type = "text/event-stream"

    def full(self, text: str) -> dict[str, Any]:
        return {
            "id": f"msg_{self.id}",
            "type": "message",
            "role": "assistant",
            "model": self.call.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": self.usage_in, "output_tokens": self.usage_out},
        }

    def error(self, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": "overloaded_error", "message": message}}

    def prelude(self) -> Iterator[bytes]:
        msg = self.full("")
        msg["content"] = []
        msg["stop_reason"] = None
        msg["usage"] = {"input_tokens": self.usage_in, "output_tokens": 1}
        yield _sse({"type": "message_start", "message": msg}, "message_start")
        yield _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        )
        yield _sse({"type": "ping"}, "ping")

    def quirks(self) -> Iterator[bytes]:
        yield _sse({"type": "ping"}, "ping")

    def delta(self, piece: str) -> bytes:
        return _sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
            "content_block_delta",
        )

    def stream_error(self, message: str) -> bytes:
        return _sse(self.error(message), "error")

    def finish(self) -> Iterator[bytes]:
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": self.usage_out},
            },
            "message_delta",
        )
        yield _sse({"type": "message_stop"}, "message_stop")


_FORMATS: dict[str, type[_Format]] = {"ollama": _Ollama, "openai": _OpenAI, "anthropic": _Anthropic}


# -- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the server as a process; prints ``PORT <n>`` first, serves until signalled."""
    ap = argparse.ArgumentParser(
        prog="python -m rlmd.testing.scripted_server",
        description="Loopback model server with scripted answers (Ollama, OpenAI, Anthropic).",
    )
    ap.add_argument("--rules", help="JSON rules file (see the module docstring)")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    ap.add_argument("--delay", type=float, default=0.0, help="extra seconds before each answer")
    ap.add_argument("--models", default="", help="comma-separated model names to list")
    ap.add_argument(
        "--api-key-env", default=None, help="require the key held in this environment variable"
    )
    args = ap.parse_args(argv)
    rules: list[Rule] = []
    models: list[str] = []
    default: ScriptedReply | None = None
    if args.rules:
        try:
            rules, models, default = load_rules(args.rules)
        except (OSError, ValueError) as exc:
            print(f"scripted_server: {exc}", file=sys.stderr)
            return 2
    if args.models:
        models = [m for m in args.models.split(",") if m]
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(
                f"scripted_server: environment variable {args.api_key_env} is not set",
                file=sys.stderr,
            )
            return 2
    srv = ScriptedServer(
        rules,
        default=default,
        models=models or None,
        api_key=api_key,
        delay_s=args.delay,
        port=args.port,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    srv.start()
    print(f"PORT {srv.port}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
