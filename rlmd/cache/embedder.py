"""The built-in embedder of the semantic tier: lexical, numpy only, no model file.

Used when the MiniLM weights (:mod:`rlmd.cache.minilm`) are not installed, and as the
lexical part of the MiniLM blend.  A hashed lexical embedding: word unigrams
(lower-cased, light suffix stemming, stop words down-weighted) and word bigrams, signed
feature hashing into 512 dimensions, L2-normalised.  It recognises a repeated question
asked with different case, punctuation, word order or inflection; it does not know
synonyms; MiniLM or ``[models] embed`` (Ollama ``/api/embed``, OpenAI ``/v1/embeddings``)
do, with better recall.
"""

from __future__ import annotations

import hashlib
import itertools
import re

import numpy as np

DIMS = 512
NAME = "rlmd-lexical-v1"

_WORD = re.compile(r"[a-z0-9_]+(?:[./-][a-z0-9_]+)*")
_STOP = frozenset(
    """a an the of in on at to for from by with and or is are was were be been being do does
    did what which who whom whose how many much please me my i you your we our it its this
    that these those there their them they can could would should will shall may might
    show tell give list find get all any every each some""".split()
)
# Stop words still count a little: "errors in src" vs "errors from src" barely differ.
_STOP_WEIGHT = 0.15
_BIGRAM_WEIGHT = 0.5


def _stem(word: str) -> str:
    """A crude suffix stripper: enough to match plurals and -ing/-ed forms."""
    if len(word) <= 4 or not word.isalpha():
        return word
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "es", "ed", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _bucket(feature: str) -> tuple[int, float]:
    h = hashlib.blake2b(feature.encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little") % DIMS, (1.0 if h[4] & 1 else -1.0)


def embed_one(text: str) -> np.ndarray:
    """The unit vector of one text (float32, ``DIMS`` long)."""
    vec = np.zeros(DIMS, dtype=np.float32)
    words = [_stem(w) for w in _WORD.findall(text.lower())]
    for w in words:
        i, s = _bucket("w:" + w)
        vec[i] += s * (_STOP_WEIGHT if w in _STOP else 1.0)
    content = [w for w in words if w not in _STOP]
    for a, b in itertools.pairwise(content):
        i, s = _bucket(f"b:{a} {b}")
        vec[i] += s * _BIGRAM_WEIGHT
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        vec[0] = 1.0  # an empty text still has a direction, so cosine stays defined
        return vec
    return vec / norm


class LexicalEmbedder:
    """The default embedder (``embed_model`` name :data:`NAME`)."""

    name = NAME

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed texts synchronously (microseconds each)."""
        return [embed_one(t).tolist() for t in texts]

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        # Cheap enough (tens of microseconds a question) to run on the event loop.
        return self.embed(texts)
