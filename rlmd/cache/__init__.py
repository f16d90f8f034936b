"""Making repeated work free: the exact call cache, the semantic tier and prefetch.

The logic lives in named modules: ``service.py`` (:class:`CacheService`, what the daemon
builds, and :class:`QueryCaching`, one query's use of it), ``exact.py``, ``semantic.py``,
``embedder.py``, ``minilm.py`` and ``prefetch.py``.  This package only re-exports them.
See docs/cache.md.
"""

from rlmd.cache.exact import CacheDB, CacheError, CacheStats, ExactCache, call_key
from rlmd.cache.prefetch import Prefetcher, SpeculationStats
from rlmd.cache.semantic import Hit, SemanticAnswer, SemanticCache, guard_allows
from rlmd.cache.service import (
    CacheService,
    CacheStatsResult,
    ContextVersions,
    QueryCaching,
    semantic_model_key,
    text_version,
)

__all__ = [
    "CacheDB",
    "CacheError",
    "CacheService",
    "CacheStats",
    "CacheStatsResult",
    "ContextVersions",
    "ExactCache",
    "Hit",
    "Prefetcher",
    "QueryCaching",
    "SemanticAnswer",
    "SemanticCache",
    "SpeculationStats",
    "call_key",
    "guard_allows",
    "semantic_model_key",
    "text_version",
]
