"""Making repeated work free: the exact call cache, the semantic tier and prefetch.

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

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from rlmd.cache.embedder import LexicalEmbedder
from rlmd.cache.exact import CacheDB, CacheError, CacheStats, ExactCache, call_key
from rlmd.cache.prefetch import Prefetcher, SpeculationStats
from rlmd.cache.semantic import Hit, SemanticAnswer, SemanticCache, guard_allows
from rlmd.config import Config

__all__ = [
    "CacheDB",
    "CacheError",
    "CacheService",
    "CacheStats",
    "CacheStatsResult",
    "ExactCache",
    "Hit",
    "Prefetcher",
    "SemanticAnswer",
    "SemanticCache",
    "SpeculationStats",
    "call_key",
    "guard_allows",
    "semantic_model_key",
    "text_version",
]

log = logging.getLogger(__name__)


class CacheStatsResult(msgspec.Struct, kw_only=True):
    """``cache/stats`` result."""

    enabled: bool
    exact: CacheStats | None
    semantic: bool
    semantic_threshold: float
    embed_model: str
    speculation: bool
    speculation_totals: SpeculationStats


def text_version(text: str) -> str:
    """The version of an inline text: SHA-256 of its UTF-8, as the store computes it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def semantic_model_key(root_model: str, sub_model: str) -> str:
    """The models an answer depends on, as one key of the semantic tier."""
    return f"{root_model}|{sub_model}"


class CacheService:
    """The daemon's caches, built from ``[cache]`` and ``[models] embed``."""

    def __init__(
        self,
        config: Config,
        exact: ExactCache | None,
        semantic: SemanticCache | None,
    ) -> None:
        self._config = config
        self.exact = exact
        self.semantic = semantic
        self.speculation_totals = SpeculationStats()
        self._pool: Any = None

    @classmethod
    def open(cls, config: Config, state_dir: Path) -> CacheService:
        """Open ``<state_dir>/cache/calls.sqlite`` (nothing when ``[cache] enabled = false``).

        The semantic tier embeds with ``[models] embed`` through the pool once
        :meth:`attach_pool` is called; without an embed model it uses the built-in
        lexical embedder.
        """
        c = config.cache
        if not c.enabled:
            return cls(config, None, None)
        exact = ExactCache.open(Path(state_dir) / "cache" / "calls.sqlite", max_bytes=c.max_bytes)
        service = cls(config, exact, None)
        if c.semantic:
            embed_model = config.models.embed
            if embed_model:
                service.semantic = SemanticCache(
                    exact.db,
                    service._pool_embed,
                    embed_model=embed_model,
                    threshold=c.semantic_threshold,
                )
            else:
                lexical = LexicalEmbedder()
                service.semantic = SemanticCache(
                    exact.db, lexical, embed_model=lexical.name, threshold=c.semantic_threshold
                )
        return service

    def attach_pool(self, pool: Any) -> None:
        """Give the service the pool (built after it, since the pool takes ``exact``)."""
        self._pool = pool

    async def _pool_embed(self, texts: list[str]) -> list[list[float]]:
        if self._pool is None:
            raise CacheError("the semantic cache has no pool to embed with yet")
        return await self._pool.embed(texts, self._config.models.embed)

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
            semantic_threshold=c.semantic_threshold,
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
