"""Building the model side of the daemon from the config: providers, pool, engine.

With no ``[[providers]]`` configured, the embedded default model is the only provider
(its llama.cpp server starts on first use, not at daemon start).  When the embedded
runtime is not installed, the daemon still serves contexts and says how to get a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .app import ModelParts
from .config import Config, ConfigError, ProviderConfig
from .engine.query import Engine
from .engine.sizing import LlamaCppTokenizer
from .pool.pool import Pool
from .providers.base import Provider
from .providers.registry import build_provider
from .repl.session import protection_async
from .secrets import Redactor

if TYPE_CHECKING:
    from .cache import CacheService
    from .store.store import ContextStore

log = logging.getLogger(__name__)


def _embedded_factory(config: Config) -> Callable[[ProviderConfig], Provider]:
    def make(cfg: ProviderConfig) -> Provider:
        from .providers.embedded import EmbeddedProvider

        return EmbeddedProvider(config.embedded, name=cfg.name, provider_config=cfg)

    return make


def _embedded_config(config: Config) -> tuple[ProviderConfig | None, str]:
    """The provider entry for the embedded model, or None with a note saying why not."""
    emb = config.embedded
    if not emb.enabled:
        return None, "embedded model disabled ([embedded] enabled = false)"
    try:
        from .providers.embedded import embedded_provider_config
    except ImportError as exc:
        return None, f"embedded model unavailable: {exc}"
    try:
        return embedded_provider_config(emb), ""
    except Exception as exc:  # EmbeddedUnavailable says how to install or configure
        return None, str(exc)


async def build_models(
    config: Config, state_dir: Path, store: ContextStore, stack: contextlib.AsyncExitStack
) -> ModelParts:
    """Create the cache, providers, pool and engine; register their cleanup on ``stack``.

    Parts that are not installed or configured are None in the result (the daemon still
    serves contexts); ``embedded_note`` then says why.
    """
    # The cache first: it outlives the pool on shutdown (the stack closes in reverse).
    from .cache import CacheError, CacheService

    try:
        cache: CacheService | None = await asyncio.to_thread(
            functools.partial(CacheService.open, config, state_dir, versions=store)
        )
    except CacheError as exc:
        log.warning("running without the call cache: %s", exc)
        cache = None
    if cache is not None:
        stack.push_async_callback(cache.aclose)
    # Probed once at startup (two short processes), so status never blocks on it.
    prot = await protection_async(config.sandbox)
    factory = _embedded_factory(config)
    providers: list[Provider] = []
    extra: dict[str, ProviderConfig] = {}
    embedded: Any = None
    note = ""
    try:
        for cfg in config.providers:
            providers.append(build_provider(cfg, os.environ, embedded_factory=factory))
    except Exception:
        for p in providers:
            await p.aclose()
        raise
    if not config.providers:
        emb_cfg, note = _embedded_config(config)
        if emb_cfg is None:
            log.warning("no model available: %s", note)
            return ModelParts(cache=cache, embedded_note=note, protection=prot)
        embedded = factory(emb_cfg)
        providers.append(embedded)
        extra[emb_cfg.name] = emb_cfg
        note = note or f"serving {', '.join(emb_cfg.models)} (starts on first use)"
    try:
        pool = Pool(
            config,
            providers,
            cache=cache.exact if cache else None,
            extra_configs=extra,
            redactor=Redactor.from_config(config, os.environ),
        )
    except ConfigError:
        for p in providers:
            await p.aclose()
        raise
    stack.push_async_callback(pool.aclose)
    await pool.start()
    if cache is not None:
        cache.attach_pool(pool)
    engine = Engine(
        config=config,
        pool=pool,
        store=store,
        state_dir=state_dir,
        cache=cache,
        # The embedded model's llama.cpp counts tokens exactly and tells a cold model.
        tokenizer=LlamaCppTokenizer(embedded) if embedded is not None else None,
        models=embedded,
    )
    return ModelParts(
        cache=cache,
        pool=pool,
        engine=engine,
        embedded=embedded,
        embedded_note=note,
        protection=prot,
    )
