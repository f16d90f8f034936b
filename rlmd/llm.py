"""``llm/query``: one sub-model call for a client (the MCP server's llm_subquery).

The call goes through the pool like an ``llm_query`` of a query, so it is cached (exact
cache, temperature 0), spread over the servers that serve the model, and accounted.
"""

from __future__ import annotations

from typing import Any

from rlmd.protocol.errors import MODEL_ERROR, UNAVAILABLE, AppError
from rlmd.protocol.schema import LlmQueryParams
from rlmd.providers.base import ChatRequest, Message, ProviderError


async def llm_query(pool: Any, conn: Any, req: Any, p: LlmQueryParams) -> dict[str, Any]:
    """``llm/query {prompt, model?}`` → ``{text, model, provider, tokens, cost, cached}``."""
    if pool is None:
        raise AppError(
            "unavailable",
            "no model is available: configure [[providers]] in the config",
            code=UNAVAILABLE,
        )
    model = p.model or pool.model_for("sub")
    try:
        r = await pool.chat(ChatRequest(model=model, messages=(Message("user", p.prompt),)))
    except ProviderError as exc:  # NoProviderError included: it names the model
        raise AppError("model_error", str(exc), code=MODEL_ERROR, model=model) from None
    return {
        "text": r.text,
        "model": r.model or model,
        "provider": r.provider,
        "tokens": {"input": r.usage.input, "output": r.usage.output},
        "cost": r.cost,
        "cached": r.cached,
    }
