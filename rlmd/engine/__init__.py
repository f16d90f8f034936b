"""The RLM loop: a root model writes ```repl code over the context until it answers.

``query.Engine`` runs queries (``turns`` the root loop, ``subcalls`` the REPL's model
calls, ``budget`` the limits and meter, ``record`` events and trace, ``sizing`` the
size-aware start, ``sources`` where an answer stands, ``steer`` loops that go nowhere,
``small_model`` the small-model policy); ``parse`` reads model replies; ``prompts`` holds
every text the model sees; ``trace`` records trajectories; ``types`` has the query Structs
and ``EngineError``.  See docs/engine.md.
"""

from rlmd.engine.types import EngineError, QueryOptions, QueryParams, QueryResult, Tokens

__all__ = ["EngineError", "QueryOptions", "QueryParams", "QueryResult", "Tokens"]
