"""Message framing on the socket, without I/O.

Two framings share one socket, chosen per connection by its first non-whitespace byte:
``{`` or ``[`` selects newline-delimited JSON (what ``socat`` scripts send), anything else
selects ``Content-Length: N\\r\\n\\r\\n<body>`` (what Emacs' jsonrpc.el sends).  The daemon
answers in the framing the connection used.

The decoder never holds more than the frame limit: an oversize Content-Length is refused
from its header, before the body is read, and an over-long NDJSON line as soon as the
buffer passes the limit without a newline.
"""

from __future__ import annotations

from enum import Enum


class Framing(Enum):
    NDJSON = "ndjson"
    CONTENT_LENGTH = "content-length"


class FrameError(Exception):
    """The byte stream cannot be framed; the connection must be answered and closed."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


_WS = b" \t\r\n"
_HEADER_END = b"\r\n\r\n"
# A header block longer than this is garbage, not a header.
_MAX_HEADER = 8192


class FrameDecoder:
    """Feed bytes with :meth:`feed`; it returns the complete message bodies so far."""

    __slots__ = ("_buf", "_need", "framing", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.framing: Framing | None = None
        self._buf = bytearray()
        self._need = -1  # Content-Length body size we are waiting for, -1: reading headers

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every complete message body (may be empty)."""
        buf = self._buf
        # Bytes already buffered hold no newline (every line was taken out), so only the
        # new bytes are searched: receiving one long line stays linear in its size.
        scan_from = len(buf)
        buf += data
        if self.framing is None:
            stripped = buf.lstrip(_WS)
            if not stripped:
                buf.clear()
                return []
            self.framing = Framing.NDJSON if stripped[0] in b"{[" else Framing.CONTENT_LENGTH
        if self.framing is Framing.NDJSON:
            return self._feed_ndjson(scan_from)
        return self._feed_content_length()

    def pending(self) -> int:
        """Bytes buffered but not yet a whole message."""
        return len(self._buf)

    def _too_large(self, size: int | None) -> FrameError:
        what = f"message of {size} bytes is" if size is not None else "message is"
        return FrameError(
            f"{what} larger than the frame limit of {self.max_frame} bytes "
            "(no newline within the limit); send smaller messages, or put large text by path "
            "(context/put {name, path})",
            kind="frame_too_large",
        )

    def _feed_ndjson(self, scan_from: int) -> list[bytes]:
        buf = self._buf
        out: list[bytes] = []
        pos = 0  # start of the current line; consumed bytes are deleted once at the end
        nl = buf.find(b"\n", scan_from)
        while nl >= 0:
            if nl - pos > self.max_frame:
                raise self._too_large(nl - pos)
            line = bytes(buf[pos:nl])
            if line.strip(_WS):
                out.append(line)
            pos = nl + 1
            nl = buf.find(b"\n", pos)
        if pos:
            del buf[:pos]
        if len(buf) > self.max_frame:
            raise self._too_large(None)
        return out

    def _feed_content_length(self) -> list[bytes]:
        buf = self._buf
        out: list[bytes] = []
        pos = 0  # consumed up to here; deleted once at the end (del per message is quadratic)
        n = len(buf)
        try:
            while True:
                if self._need < 0:
                    # Skip blank lines between messages (some clients send a stray CRLF).
                    while pos < n and buf[pos] in _WS:
                        pos += 1
                    end = buf.find(_HEADER_END, pos)
                    if end < 0:
                        if n - pos > _MAX_HEADER:
                            raise FrameError(
                                "expected 'Content-Length: N' headers followed by a blank line; "
                                "got something else (send newline-delimited JSON starting with "
                                "'{' or '[', or Content-Length framing)",
                                kind="bad_framing",
                            )
                        return out
                    self._need = self._parse_headers(bytes(buf[pos:end]))
                    pos = end + len(_HEADER_END)
                if n - pos < self._need:
                    return out
                out.append(bytes(buf[pos : pos + self._need]))
                pos += self._need
                self._need = -1
        finally:
            if pos:
                del buf[:pos]

    def _parse_headers(self, block: bytes) -> int:
        length = None
        for line in block.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                raise FrameError(
                    f"malformed header line {line[:80]!r}; expected 'Content-Length: N'",
                    kind="bad_framing",
                )
            if name.strip().lower() == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    length = -1
                if length < 0:
                    raise FrameError(
                        f"Content-Length must be a non-negative integer, got {value.strip()[:40]!r}",
                        kind="bad_framing",
                    )
        if length is None:
            raise FrameError("missing Content-Length header", kind="bad_framing")
        if length > self.max_frame:
            raise FrameError(
                f"Content-Length {length} is larger than the frame limit of {self.max_frame} "
                "bytes; put large text by path (context/put {name, path})",
                kind="frame_too_large",
            )
        return length


def encode_frame(framing: Framing | None, body: bytes) -> bytes:
    """Frame one message body for sending in the connection's framing."""
    if framing is Framing.CONTENT_LENGTH:
        return b"Content-Length: %d\r\n\r\n" % len(body) + body
    return body + b"\n"
