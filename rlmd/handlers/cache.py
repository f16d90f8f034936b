"""``cache/*``: statistics and clearing of the model-call cache (absent when disabled)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ..jobs import Notifier
from ..protocol.jsonrpc import FREE, Method, NoParams, Request

if TYPE_CHECKING:
    from ..app import App
    from ..cache import CacheService, CacheStatsResult


async def stats(
    cache: CacheService | None, conn: Notifier, req: Request, p: NoParams
) -> CacheStatsResult | dict[str, bool]:
    if cache is None:
        return {"enabled": False}
    return await cache.stats()


async def clear(
    cache: CacheService | None, conn: Notifier, req: Request, p: NoParams
) -> dict[str, int]:
    if cache is None:
        return {"deleted": 0}
    return await cache.clear()


def routes(app: App) -> dict[str, Method]:
    return {
        "cache/stats": Method.of(partial(stats, app.models.cache), ordering=FREE),
        "cache/clear": Method.of(partial(clear, app.models.cache)),
    }
