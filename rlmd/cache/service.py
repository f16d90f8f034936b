"""The cache service: the exact call cache, the semantic tier and prefetch, as the daemon
and the engine use them.

:class:`CacheService` is what the daemon builds once (``CacheService.open``) and hands to
the pool (``Pool(..., cache=service.exact)``), the engine and the ``cache/*`` methods:

* ``exact`` (:class:`ExactCache`): the pool's ``CallCache``; ``<state_dir>/cache/calls.sqlite``;
* ``semantic`` (:class:`SemanticCache` or None): whole-query answers by question
  similarity, on the same context version and models only;
* :meth:`CacheService.prefetcher`: a per-query :class:`Prefetcher` (speculation);
* :meth:`CacheService.stats` / :meth:`CacheService.clear`: ``cache/stats``, ``cache/clear``.

See docs/cache.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from rlmd.cache.embedder import LexicalEmbedder
from rlmd.cache.exact import CacheError, CacheStats, ExactCache
from rlmd.cache.prefetch import Prefetcher, SpeculationStats, sub_request
from rlmd.cache.semantic import DEFAULT_THRESHOLD, Hit, SemanticAnswer, SemanticCache
from rlmd.config import Config, ConfigError

log = logging.getLogger(__name__)

# For a configured embedding model through the pool (a model this project has not measured).
NEURAL_THRESHOLD = 0.9


class ContextVersions(Protocol):
    """What the service needs of the context store (``rlmd.store.store.ContextStore``)."""

    def version(self, name: str) -> str: ...
    def text_path(self, name: str) -> Path: ...


class CacheStatsResult(msgspec.Struct, kw_only=True):
    """``cache/stats`` result."""

    enabled: bool
    exact: CacheStats | None
    semantic: bool
    semantic_threshold: float | None
    embed_model: str
    speculation: bool
    speculation_totals: SpeculationStats


def text_version(text: str) -> str:
    """The version of an inline text: SHA-256 of its UTF-8, as the store computes it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def semantic_model_key(root_model: str, sub_model: str) -> str:
    """The models an answer depends on, as one key of the semantic tier."""
    return f"{root_model}|{sub_model}"


def _builtin_embedder(choice: str) -> tuple[Any, float]:
    """The in-process embedder ``[cache] embedder`` asks for, and its measured threshold.

    ``auto`` takes MiniLM when its weights are installed, else the lexical embedder;
    ``minilm`` without the weights is a configuration error that says how to install them.
    """
    if choice != "lexical":
        from rlmd.cache.minilm import THRESHOLD, MiniLMEmbedder, MiniLMUnavailable

        try:
            return MiniLMEmbedder(), THRESHOLD
        except MiniLMUnavailable as exc:
            if choice == "minilm":
                raise ConfigError(f'[cache] embedder = "minilm": {exc}') from None
            log.info("semantic cache: lexical embedder (%s)", exc)
    return LexicalEmbedder(), DEFAULT_THRESHOLD


class CacheService:
    """The daemon's caches, built from ``[cache]`` and ``[models] embed``."""

    def __init__(
        self,
        config: Config,
        exact: ExactCache | None,
        semantic: SemanticCache | None,
        *,
        versions: ContextVersions | None = None,
    ) -> None:
        self._config = config
        self.exact = exact
        self.semantic = semantic
        self._versions = versions
        self.speculation_totals = SpeculationStats()
        self._pool: Any = None

    @classmethod
    def open(
        cls, config: Config, state_dir: Path, *, versions: ContextVersions | None = None
    ) -> CacheService:
        """Open ``<state_dir>/cache/calls.sqlite`` (nothing when ``[cache] enabled = false``).

        ``versions`` (the context store) gives a stored context's version; without it,
        whole-query answers on stored contexts are not cached (inline texts still are).

        The semantic tier embeds with ``[models] embed`` through the pool once
        :meth:`attach_pool` is called; without an embed model it uses the in-process
        embedder ``[cache] embedder`` names (see :func:`_builtin_embedder`).
        """
        c = config.cache
        if not c.enabled:
            return cls(config, None, None, versions=versions)
        exact = ExactCache.open(
            Path(state_dir) / "cache" / "calls.sqlite",
            max_bytes=c.max_bytes,
            page_cache_bytes=c.db_cache_bytes,
        )
        service = cls(config, exact, None, versions=versions)
        if c.semantic:
            embed_model = config.models.embed
            # ``semantic_threshold`` unset: the value measured for the built-in embedder
            # in use, or a conservative one for a model this project has not measured.
            threshold = c.semantic_threshold
            if embed_model:
                service.semantic = SemanticCache(
                    exact.db,
                    service._pool_embed,
                    embed_model=embed_model,
                    threshold=threshold if threshold is not None else NEURAL_THRESHOLD,
                    index_bytes=c.semantic_index_bytes,
                )
            else:
                embedder, measured = _builtin_embedder(c.embedder)
                service.semantic = SemanticCache(
                    exact.db,
                    embedder,
                    embed_model=embedder.name,
                    threshold=threshold if threshold is not None else measured,
                    index_bytes=c.semantic_index_bytes,
                )
        return service

    def attach_pool(self, pool: Any) -> None:
        """Give the service the pool (built after it, since the pool takes ``exact``)."""
        self._pool = pool

    async def _pool_embed(self, texts: list[str]) -> list[list[float]]:
        if self._pool is None:
            raise CacheError("the semantic cache has no pool to embed with yet")
        return await self._pool.embed(texts, self._config.models.embed)

    def stored_version(self, name: str, context_path: Path | None) -> str:
        """The store's version of context ``name`` if ``context_path`` (the file the query
        pinned) is still its current text, else "" (changed or dropped meanwhile: an
        answer on the old text must not be filed under the new version).  Blocking: call
        it in a thread."""
        if self._versions is None:
            return ""
        try:
            version = self._versions.version(name)
            current = self._versions.text_path(name)
        except Exception as exc:  # StoreError: dropped, damaged; no caching then
            log.debug("no version for context %r: %r", name, exc)
            return ""
        if context_path is not None and Path(current) != Path(context_path):
            return ""
        return version

    # ------------------------------------------------------------------ per query

    def prefetcher(
        self,
        pool: Any,
        *,
        text_path: Path | None,
        enabled: bool = True,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> Prefetcher:
        """A :class:`Prefetcher` for one query (off unless ``[cache] speculation``, the
        exact cache, and a context file are all there)."""
        on = enabled and self._config.cache.speculation and self.exact is not None
        return Prefetcher(pool, self.exact, text_path=text_path, enabled=on, on_event=on_event)

    def add_speculation(self, stats: SpeculationStats) -> None:
        """Add one query's speculation to the daemon's totals (for ``cache/stats``)."""
        t = self.speculation_totals
        for field in msgspec.structs.fields(SpeculationStats):
            setattr(t, field.name, getattr(t, field.name) + getattr(stats, field.name))

    async def lookup_answer(
        self, question: str, context_version: str, root_model: str, sub_model: str
    ) -> Hit | None:
        """A semantic hit for a whole query, or None (tier off, no context, no match)."""
        if self.semantic is None or not context_version:
            return None
        return await self.semantic.lookup(
            question, context_version, semantic_model_key(root_model, sub_model)
        )

    async def store_answer(
        self,
        question: str,
        context_version: str,
        root_model: str,
        sub_model: str,
        answer: SemanticAnswer,
    ) -> None:
        """Remember a finished query's answer; failures are logged, never raised."""
        if self.semantic is None or not context_version:
            return
        try:
            await self.semantic.store(
                question, context_version, semantic_model_key(root_model, sub_model), answer
            )
        except Exception as exc:
            log.warning("semantic cache store failed: %r", exc)

    # ------------------------------------------------------------------ methods

    async def stats(self) -> CacheStatsResult:
        """``cache/stats``."""
        c = self._config.cache
        return CacheStatsResult(
            enabled=self.exact is not None,
            exact=await self.exact.stats() if self.exact is not None else None,
            semantic=self.semantic is not None,
            semantic_threshold=self.semantic.threshold if self.semantic is not None else None,
            embed_model=self.semantic.embed_model if self.semantic is not None else "",
            speculation=c.speculation and self.exact is not None,
            speculation_totals=self.speculation_totals,
        )

    async def clear(self) -> dict[str, int]:
        """``cache/clear``: delete every stored answer; returns ``{"deleted": n}``."""
        if self.exact is None:
            return {"deleted": 0}
        n = await self.exact.clear()
        if self.semantic is not None:
            await self.exact.db.run(self.semantic.forget_sync)
        return {"deleted": n}

    async def aclose(self) -> None:
        if self.exact is not None:
            await self.exact.aclose()


class QueryCaching:
    """One query's use of the caches: what the engine calls (see docs/cache.md).

    ``async with`` it around the loop: inside, exact-cache lookups are bypassed when the
    query's ``options.cache`` is false, and speculation runs when allowed.  Then:
    :meth:`cached_answer` before the loop, :meth:`remember` after it,
    :meth:`before_sub_calls` before sub-calls and :meth:`after_batch` after a batch.
    """

    def __init__(
        self,
        service: CacheService | None,
        pool: Any,
        *,
        question: str,
        context_path: Path | None,
        root_model: str,
        version: str | None = None,
        text: str | None = None,
        context_name: str | None = None,
        sub_model: str,
        use_cache: bool = True,
        speculation: bool = True,
        emit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.service = service
        self.question = question
        # The context's version, found on first use (in a thread: hashing an inline text
        # or reading the store's metadata must not block the event loop).
        self.version = version
        self._text = text
        self._context_name = context_name
        self._context_path = context_path
        self.root_model = root_model
        self.sub_model = sub_model
        self.use_cache = use_cache
        self._emit = emit
        self._stack = contextlib.ExitStack()
        self.prefetch: Prefetcher | None = None
        if service is not None and service.exact is not None:
            self.prefetch = service.prefetcher(
                pool, text_path=context_path, enabled=speculation, on_event=emit
            )

    @classmethod
    def for_query(
        cls,
        service: CacheService | None,
        pool: Any,
        *,
        params: Any,
        context_path: Path | None,
        root_model: str,
        sub_model: str,
        emit: Callable[[dict[str, Any]], None] | None = None,
    ) -> QueryCaching:
        """Build from ``QueryParams`` (``options.cache`` / ``options.speculation``: None or
        True use the daemon's settings, False turns them off for this query)."""
        opts = params.options
        return cls(
            service,
            pool,
            question=params.query,
            text=params.text,
            context_name=params.context,
            context_path=context_path,
            root_model=root_model,
            sub_model=sub_model,
            use_cache=getattr(opts, "cache", None) is not False,
            speculation=getattr(opts, "speculation", None) is not False,
            emit=emit,
        )

    async def __aenter__(self) -> QueryCaching:
        if self.service is not None and self.service.exact is not None and not self.use_cache:
            self._stack.enter_context(self.service.exact.bypass())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.prefetch is not None:
                await self.prefetch.aclose()
                if self.service is not None:
                    self.service.add_speculation(self.prefetch.stats)
        finally:
            self._stack.close()

    async def context_version(self) -> str:
        """The query's context version: the hash of an inline text, the store's version of
        a stored context (see :meth:`CacheService.stored_version`), or "" (none)."""
        if self.version is None:
            if self._text is not None:
                self.version = await asyncio.to_thread(text_version, self._text)
            elif self._context_name is not None and self.service is not None:
                self.version = await asyncio.to_thread(
                    self.service.stored_version, self._context_name, self._context_path
                )
            else:
                self.version = ""
        return self.version

    async def cached_answer(self) -> str | None:
        """The semantic tier's answer for this question on this text, or None."""
        if self.service is None or not self.use_cache:
            return None
        hit = await self.service.lookup_answer(
            self.question, await self.context_version(), self.root_model, self.sub_model
        )
        if hit is None:
            return None
        if self._emit is not None:
            self._emit(
                {
                    "kind": "cache",
                    "tier": "semantic",
                    "question": hit.question,
                    "similarity": hit.similarity,
                    "saved_cost": hit.answer.cost,
                    "saved_tokens": {
                        "input": hit.answer.tokens_in,
                        "output": hit.answer.tokens_out,
                    },
                }
            )
        return hit.answer.answer

    async def remember(
        self,
        answer: str,
        *,
        finish: str,
        job: str,
        tokens_in: int,
        tokens_out: int,
        cost: float,
        elapsed_s: float,
    ) -> None:
        """Store a query's answer for the semantic tier (only answers the model gave as
        FINAL: a best-effort answer at the iteration limit is not worth repeating)."""
        if self.service is None or finish != "final":
            return
        await self.service.store_answer(
            self.question,
            await self.context_version(),
            self.root_model,
            self.sub_model,
            SemanticAnswer(
                answer=answer,
                job=job,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                cost=cost,
                elapsed_s=elapsed_s,
            ),
        )

    def before_sub_calls(self, prompts: list[str], model: str) -> None:
        """Real sub-calls are about to run: count prefetch hits, drop duplicates."""
        if self.prefetch is not None:
            for p in prompts:
                self.prefetch.claim(sub_request(p, model))

    async def after_batch(self, prompts: list[str], model: str) -> None:
        """A batch over the query's own context finished: prefetch what comes next."""
        if self.prefetch is not None:
            try:
                await self.prefetch.observe_batch(prompts, model)
            except Exception as exc:  # speculation must never fail a query
                log.warning("prefetch failed: %r", exc)
