"""What the JSON-RPC handlers are given: the daemon's parts, typed, passed in explicitly.

:class:`ModelParts` is what :func:`rlmd.compose.build_models` returns (the model side:
cache, pool, engine, the embedded provider); :class:`App` joins it with the store, the
job registry and the query admission.  Neither holds module-level state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .admission import Admission
from .config import Config
from .jobs import Jobs

if TYPE_CHECKING:  # the concrete parts; imported lazily at runtime by compose.py
    from .cache import CacheService
    from .engine.query import Engine
    from .improve import ImproveService
    from .pool.pool import Pool
    from .providers.embedded import EmbeddedProvider
    from .repl.registry import ReplRegistry
    from .repl.sandbox import Protection
    from .store.store import ContextStore


@dataclass(frozen=True)
class ModelParts:
    """The model side as built from the config; every part may be missing.

    ``engine`` is None when no model is available; ``embedded_note`` then says why (and
    how to fix it), otherwise what the embedded model serves.
    """

    cache: CacheService | None = None
    pool: Pool | None = None
    engine: Engine | None = None
    embedded: EmbeddedProvider | None = None
    embedded_note: str = ""
    protection: Protection | None = None


@dataclass
class App:
    """Everything a handler may use.  ``draining`` is set once SIGTERM arrives."""

    config: Config
    socket_path: Path
    state_dir: Path
    store: ContextStore
    models: ModelParts = field(default_factory=ModelParts)  # the model side, built once
    jobs: Jobs = field(default_factory=Jobs)
    admission: Admission = field(default_factory=Admission)
    # Persistent REPL sessions (repl/*), and the improvement cycle (improve/*; needs a model).
    repl: ReplRegistry | None = None
    improve: ImproveService | None = None
    started: float = field(default_factory=time.monotonic)
    draining: bool = False

    @classmethod
    def assemble(
        cls,
        config: Config,
        socket_path: Path,
        state_dir: Path,
        store: ContextStore,
        models: ModelParts,
    ) -> App:
        """Join the store and the model parts; admission limits come from ``[limits]``."""
        from .improve import ImproveService
        from .repl.registry import ReplRegistry

        lim = config.limits
        return cls(
            config=config,
            socket_path=socket_path,
            state_dir=state_dir,
            store=store,
            models=models,
            admission=Admission(lim.max_concurrent_queries, lim.max_queued_queries),
            repl=ReplRegistry(config=config, store=store, pool=models.pool, state_dir=state_dir),
            improve=None
            if models.engine is None
            else ImproveService(
                config=config,
                engine=models.engine,
                store=store,
                state_dir=state_dir,
                use_bwrap=bool(models.protection and models.protection.bwrap),
            ),
        )
