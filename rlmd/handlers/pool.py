"""``pool/status``: the providers and their load."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ..jobs import Notifier
from ..protocol.jsonrpc import FREE, Method, NoParams, Request

if TYPE_CHECKING:
    from ..app import App
    from ..pool.pool import Pool, ProviderStatus


def status(
    pool: Pool | None, conn: Notifier, req: Request, p: NoParams
) -> dict[str, list[ProviderStatus]]:
    return {"providers": pool.status() if pool is not None else []}


def routes(app: App) -> dict[str, Method]:
    return {"pool/status": Method.of(partial(status, app.models.pool), ordering=FREE)}
