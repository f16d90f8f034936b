"""Building the model side of the daemon from the config: providers, pool, engine.

With no ``[[providers]]`` configured, the embedded default model is the only provider
(its llama.cpp server starts on first use, not at daemon start).  When the embedded
runtime is not installed, the daemon still serves contexts and says how to get a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from .config import ConfigError, ProviderConfig
from .engine.query import Engine
from .engine.sizing import LlamaCppTokenizer
from .pool.pool import Pool
from .providers.base import Provider
from .providers.registry import build_provider
from .repl.session import protection_async

log = logging.getLogger(__name__)


def _embedded_factory(app: Any) -> Any:
    def make(cfg: ProviderConfig) -> Provider:
        from .providers.embedded import EmbeddedProvider

        return EmbeddedProvider(app.config.embedded, name=cfg.name, provider_config=cfg)

    return make


def _embedded_config(app: Any) -> ProviderConfig | None:
    """The provider entry for the embedded model, or None (with a note) when unavailable."""
    emb = app.config.embedded
    if not emb.enabled:
        app.embedded_note = "embedded model disabled ([embedded] enabled = false)"
        return None
    try:
        from .providers.embedded import embedded_provider_config
    except ImportError as exc:
        app.embedded_note = f"embedded model unavailable: {exc}"
        return None
    try:
        return embedded_provider_config(emb)
    except Exception as exc:  # EmbeddedUnavailable says how to install or configure
        app.embedded_note = str(exc)
        return None


async def wire_models(app: Any, stack: contextlib.AsyncExitStack) -> None:
    """Create providers, the pool and the engine on ``app``; register their cleanup."""
    config = app.config
    # The cache first: it outlives the pool on shutdown (the stack closes in reverse).
    from .cache import CacheError, CacheService

    try:
        cache = await asyncio.to_thread(CacheService.open, config, app.state_dir)
    except CacheError as exc:
        log.warning("running without the call cache: %s", exc)
        cache = None
    if cache is not None:
        stack.push_async_callback(cache.aclose)
        app.cache = cache
    # Probed once at startup (two short processes), so status never blocks on it.
    prot = await protection_async(config.sandbox)
    app.protection = lambda: prot
    factory = _embedded_factory(app)
    providers: list[Provider] = []
    extra: dict[str, ProviderConfig] = {}
    try:
        for cfg in config.providers:
            providers.append(build_provider(cfg, os.environ, embedded_factory=factory))
    except Exception:
        for p in providers:
            await p.aclose()
        raise
    if not config.providers:
        cfg = _embedded_config(app)
        if cfg is None:
            log.warning("no model available: %s", app.embedded_note)
            return
        app.embedded = factory(cfg)
        providers.append(app.embedded)
        extra[cfg.name] = cfg
        app.embedded_note = (
            app.embedded_note or f"serving {', '.join(cfg.models)} (starts on first use)"
        )
    try:
        pool = Pool(config, providers, cache=cache.exact if cache else None, extra_configs=extra)
    except ConfigError:
        for p in providers:
            await p.aclose()
        raise
    stack.push_async_callback(pool.aclose)
    await pool.start()
    app.pool = pool
    if cache is not None:
        cache.attach_pool(pool)
    app.engine = Engine(
        config=config,
        pool=pool,
        store=app.store,
        state_dir=app.state_dir,
        cache=cache,
        # The embedded model's llama.cpp counts tokens exactly and tells a cold model.
        tokenizer=LlamaCppTokenizer(app.embedded) if app.embedded is not None else None,
        models=app.embedded,
    )
