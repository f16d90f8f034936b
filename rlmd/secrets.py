"""The secrets the daemon holds, and masking them in every text that leaves it.

The daemon holds API keys (the values of each provider's ``api_key_env``) and may pass
other secret-looking variables to command providers (``env = [...]`` names containing
KEY, TOKEN, SECRET or PASS).  A model server can echo a key back in its answer; the pool
runs every answer through a :class:`Redactor` (whole texts, streamed deltas, error
messages, cache hits), so that events, results, traces, cache rows and REPL workers all
see ``[redacted]`` instead.

Streams need care: a key may arrive split over two deltas.  :meth:`Redactor.stream`
holds back the shortest tail that could still be the start of a secret (never more
than the longest secret minus one character), and :meth:`StreamRedaction.flush` sends
it when the stream ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from rlmd.providers.base import OnDelta

MASK = "[redacted]"
# Shorter values are not keys (and masking them would damage ordinary text).
MIN_SECRET_CHARS = 8
# Variables of a command provider's ``env`` list whose values are treated as secrets.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS", re.I)


class Redactor:
    """Masks a fixed set of secrets.  ``repr`` never shows them."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is masked whole.
        self._secrets = sorted(
            {s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True
        )
        self.longest = len(self._secrets[0]) if self._secrets else 0

    @classmethod
    def from_config(cls, config: Any, env: Mapping[str, str]) -> Redactor:
        """The values of every provider's ``api_key_env`` (and of secret-looking names in
        a provider's ``env`` list) that are set in ``env``."""
        names: list[str] = []
        for p in getattr(config, "providers", ()):
            if getattr(p, "api_key_env", None):
                names.append(p.api_key_env)
            names += [n for n in getattr(p, "env", None) or () if _SECRET_NAME.search(n)]
        return cls(v.strip() for n in names if (v := env.get(n)))

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __repr__(self) -> str:
        return f"<Redactor of {len(self._secrets)} secret(s)>"

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``[redacted]``."""
        for s in self._secrets:
            if s in text:
                text = text.replace(s, MASK)
        return text

    def held_tail(self, text: str) -> int:
        """How many trailing characters of ``text`` could begin a secret."""
        best = 0
        for s in self._secrets:
            # Only tails longer than the best so far matter; the longest is len(s) - 1.
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def stream(self, on_delta: OnDelta) -> StreamRedaction:
        """A delta callback for ``on_delta`` that masks secrets split across pieces."""
        return StreamRedaction(self, on_delta)


class StreamRedaction:
    """Feeds redacted pieces to a delta callback, holding back a possible secret start."""

    def __init__(self, redactor: Redactor, on_delta: OnDelta) -> None:
        self._r = redactor
        self._on_delta = on_delta
        self._held = ""

    def __call__(self, piece: str) -> bool | None:
        text = self._r.redact(self._held + piece)
        keep = self._r.held_tail(text)
        out, self._held = (text[:-keep], text[-keep:]) if keep else (text, "")
        if not out:
            return None
        return self._on_delta(out)

    def flush(self) -> bool | None:
        """The stream ended: deliver what was held back."""
        held, self._held = self._held, ""
        return self._on_delta(held) if held else None
