"""The RLM loop: a root model writes ```repl code over the context until it answers.

``loop.Engine`` runs queries; ``parse`` reads model replies; ``prompts`` holds every text
the model sees; ``trace`` records trajectories; ``types`` has the query Structs and
``EngineError``.  See docs/engine.md.
"""

from rlmd.engine.types import EngineError, QueryOptions, QueryParams, QueryResult, Tokens

__all__ = ["EngineError", "QueryOptions", "QueryParams", "QueryResult", "Tokens"]
