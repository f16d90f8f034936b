"""The semantic tier on real SQLite files; embeddings from the built-in embedder or a real
pool talking to a scripted server's ``/api/embed``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rlmd.cache import CacheService, SemanticAnswer, guard_allows, text_version
from rlmd.cache.embedder import LexicalEmbedder, embed_one
from rlmd.cache.exact import CacheDB
from rlmd.cache.semantic import MAX_QUESTION_CHARS, SemanticCache, features
from rlmd.config import CacheConfig, Config, ModelsConfig, PoolConfig, ProviderConfig
from rlmd.pool import Pool
from rlmd.providers.registry import build_provider
from rlmd.testing.scripted_server import ScriptedServer

V1 = "a" * 64
V2 = "b" * 64
ROOT = "root|sub"


@pytest.fixture
def db(tmp_path) -> Iterator[CacheDB]:
    d = CacheDB(tmp_path / "calls.sqlite")
    d.call(d.conn)
    yield d
    d.close()


def answer(text: str) -> SemanticAnswer:
    return SemanticAnswer(answer=text, job="j1", tokens_in=100, tokens_out=10, cost=0.5)


async def test_paraphrase_hits_on_same_version_only(db) -> None:
    sem = SemanticCache(db, LexicalEmbedder(), embed_model="lex", threshold=0.75)
    await sem.store("How many TODO items are in src/?", V1, ROOT, answer("12"))
    hit = await sem.lookup("how many todo items are in src/", V1, ROOT)
    assert hit is not None and hit.answer.answer == "12" and hit.similarity >= 0.75
    # A changed text (new version), another model, or no version: never a hit.
    assert await sem.lookup("How many TODO items are in src/?", V2, ROOT) is None
    assert await sem.lookup("How many TODO items are in src/?", V1, "other|sub") is None
    assert await sem.lookup("How many TODO items are in src/?", "", ROOT) is None


async def test_long_pasted_questions_are_never_paraphrase_matched(db) -> None:
    """Two pasted documents that differ in one sentence embed almost alike."""
    sem = SemanticCache(db, LexicalEmbedder(), embed_model="lex", threshold=0.75)
    doc = "The service restarts nightly and logs to syslog. " * 100
    assert len(doc) > MAX_QUESTION_CHARS
    await sem.store(doc + "Does it log errors?", V1, ROOT, answer("yes"))
    assert await sem.lookup(doc + "Does it log warnings?", V1, ROOT) is None
    assert await sem.lookup(doc + "Does it log errors?", V1, ROOT) is None  # never stored
    short = "Does the service log errors?"
    await sem.store(short, V1, ROOT, answer("yes"))
    assert (await sem.lookup(short, V1, ROOT)) is not None


async def test_guard_refuses_near_misses_the_cosine_accepts(db) -> None:
    near = [
        ("How many TODO items are in src/?", "How many TODO items are in tests/?"),
        ("Count the errors logged in 2023", "Count the errors logged in 2024"),
        ("List the files that import numpy", "List the files that do not import numpy"),
        ("Which paragraphs mention Alice?", "Which paragraphs mention Bob?"),
        (
            'Count lines containing "connection refused"',
            'Count lines containing "connection reset"',
        ),
        (
            "What is the largest file in the repository?",
            "What is the smallest file in the repository?",
        ),
    ]
    for a, b in near:
        assert not guard_allows(a, b), (a, b)
    low = SemanticCache(db, LexicalEmbedder(), embed_model="lex", threshold=0.3, guard=False)
    guarded = SemanticCache(db, LexicalEmbedder(), embed_model="lex", threshold=0.3)
    for i, (a, _b) in enumerate(near):
        await guarded.store(a, V1, ROOT, answer(f"answer {i}"))
    for i, (_a, b) in enumerate(near):
        # Without the guard the cosine alone would serve the wrong answer ...
        wrong = await low.lookup(b, V1, ROOT)
        assert wrong is not None and wrong.answer.answer == f"answer {i}"
        # ... with it, no hit.
        assert await guarded.lookup(b, V1, ROOT) is None
    stats = db.call(lambda: db.flush_sync() or dict(db.conn().execute("SELECT k, v FROM meta")))
    assert stats["semantic_refused"] == len(near)


def test_features_pick_out_the_specifics() -> None:
    f = features(
        'Which calls to os.system in src/app.py use "rm -rf" since 2023 and not ALLOWED_CMDS?'
    )
    assert "2023" in f.numbers
    assert {"os.system", "src/app.py"} <= f.paths
    assert f.quoted == frozenset({"rm -rf"})
    assert "allowed_cmds" in f.identifiers and f.negations == 1
    assert guard_allows("Find TODO comments", "find todo comments")


async def test_persists_and_reloads_the_matrix(tmp_path) -> None:
    path = tmp_path / "p.sqlite"
    d1 = CacheDB(path)
    sem = SemanticCache(d1, LexicalEmbedder(), embed_model="lex", threshold=0.75)
    for i in range(40):
        await sem.store(f"What happened in incident number {i}?", V1, ROOT, answer(f"a{i}"))
    await d1.aclose()
    d2 = CacheDB(path)
    sem2 = SemanticCache(d2, LexicalEmbedder(), embed_model="lex", threshold=0.75)
    hit = await sem2.lookup("what happened in incident number 17", V1, ROOT)
    # Another embedding model's vectors are another space: not compared.
    other = SemanticCache(d2, LexicalEmbedder(), embed_model="other-embedder", threshold=0.75)
    miss = await other.lookup("What happened in incident number 17?", V1, ROOT)
    await d2.aclose()
    assert hit is not None and hit.answer.answer == "a17" and miss is None


async def test_threshold_must_be_sane(db) -> None:
    with pytest.raises(ValueError, match="semantic_threshold"):
        SemanticCache(db, LexicalEmbedder(), embed_model="lex", threshold=1.5)


def test_lexical_embedder_is_normalised_and_deterministic() -> None:
    a = embed_one("Count the errors in 2023")
    assert abs(float(a @ a) - 1.0) < 1e-5
    assert (a == embed_one("count the ERRORS in 2023!")).all()
    assert float(embed_one("") @ embed_one("")) == pytest.approx(1.0)


async def test_service_embeds_through_the_pool(tmp_path) -> None:
    """``[models] embed`` set: questions are embedded by a real server's /api/embed."""
    with ScriptedServer([], models=["chat", "emb"]) as srv:
        pc = ProviderConfig(name="ol", kind="ollama", base_url=srv.url, models=["chat", "emb"])
        cfg = Config(
            providers=[pc],
            models=ModelsConfig(root="chat", sub="chat", embed="emb"),
            pool=PoolConfig(health_interval_s=30.0),
            cache=CacheConfig(semantic_threshold=0.9),
        )
        svc = CacheService.open(cfg, tmp_path)
        pool = Pool(cfg, [build_provider(pc, {})], cache=svc.exact)
        svc.attach_pool(pool)
        try:
            version = text_version("the context text")
            await svc.store_answer("Count the errors", version, "chat", "chat", answer("3"))
            hit = await svc.lookup_answer("count the errors", version, "chat", "chat")
            changed = await svc.lookup_answer(
                "count the errors", text_version("the context text, edited"), "chat", "chat"
            )
            stats = await svc.stats()
        finally:
            await pool.aclose()
            await svc.aclose()
        assert hit is not None and hit.answer.answer == "3"
        assert changed is None
        assert len(srv.embed_calls) == 3 and srv.embed_calls[0].model == "emb"
        assert stats.embed_model == "emb" and stats.exact is not None
        assert stats.exact.semantic_entries == 1 and stats.exact.semantic_hits == 1


async def test_unreachable_embedder_is_a_miss_not_an_error(db) -> None:
    async def broken(texts: list[str]) -> list[list[float]]:
        raise ConnectionError("embedding server down")

    sem = SemanticCache(db, broken, embed_model="x", threshold=0.75)
    await sem.store("q", V1, ROOT, answer("a"))  # logged, not raised
    assert await sem.lookup("q", V1, ROOT) is None


async def test_query_caching_keys_on_the_stored_version(tmp_path) -> None:
    """What the engine calls: the version is the store's ``version(name)``, used only
    while the pinned file is still the current text (the service gets the store)."""
    from rlmd.cache import QueryCaching
    from rlmd.engine.types import QueryParams
    from rlmd.store.store import ContextStore

    store = ContextStore(tmp_path / "contexts")
    store.put_text("notes", "alpha beta gamma\n" * 100)
    svc = CacheService.open(Config(), tmp_path / "state", versions=store)
    with store.pin("notes") as pinned:
        assert svc.stored_version("notes", pinned.path) == store.version("notes")
        old_path = pinned.path
        store.put_text("notes", "changed meanwhile\n")
        # The query pinned the old text: its answer must not be filed under the new one.
        assert svc.stored_version("notes", old_path) == ""
    assert svc.stored_version("missing", None) == ""
    store.put_text("notes", "alpha beta gamma\n" * 100)
    plain = CacheService.open(Config(), tmp_path / "state2")  # no store: nothing to key on
    assert plain.stored_version("notes", None) == ""
    await plain.aclose()
    events: list[dict] = []

    def caching(question: str, **opts: object) -> QueryCaching:
        with store.pin("notes") as pinned:
            path = pinned.path
        params = QueryParams(query=question, context="notes")
        for k, v in opts.items():
            setattr(params.options, k, v)
        return QueryCaching.for_query(
            svc,
            None,
            params=params,
            context_path=path,
            root_model="r",
            sub_model="s",
            emit=events.append,
        )

    try:
        async with caching("What is the third word?") as qc:
            assert await qc.cached_answer() is None
            await qc.remember(
                "gamma",
                finish="final",
                job="j1",
                tokens_in=9,
                tokens_out=1,
                cost=0.2,
                elapsed_s=1.0,
            )
        async with caching("what is the third word") as qc:
            assert await qc.cached_answer() == "gamma"
        assert events[-1]["kind"] == "cache" and events[-1]["saved_cost"] == 0.2
        store.put_text("notes", "delta epsilon zeta\n" * 100)  # a new version
        async with caching("What is the third word?") as qc:
            assert await qc.cached_answer() is None
    finally:
        await svc.aclose()


async def test_in_memory_index_is_bounded_in_bytes_and_reloads(db) -> None:
    """One query per distinct text used to leave a 16-row matrix per version in memory
    for good (~32 KB each, the soak's ~23 KB/query); the index is now LRU-bounded in bytes
    and an evicted version's questions come back from SQLite on use."""
    bound = 256 * 1024
    sem = SemanticCache(db, LexicalEmbedder(), embed_model="lex", index_bytes=bound)
    versions = [f"{i:064x}" for i in range(300)]
    for i, v in enumerate(versions):
        assert await sem.lookup(f"What does file number {i} say?", v, ROOT) is None
        await sem.store(f"What does file number {i} say?", v, ROOT, answer(str(i)))
    size = await db.run(sem.index_nbytes)
    assert size <= bound, size
    assert len(sem._groups) < len(versions)  # some were dropped...
    hit = await sem.lookup("what does file number 0 say", versions[0], ROOT)
    assert hit is not None and hit.answer.answer == "0"  # ...and reload on use
