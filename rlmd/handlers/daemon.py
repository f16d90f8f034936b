"""``daemon/*``: liveness and a status summary.  Both answer inline (never queued)."""

from __future__ import annotations

import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from .. import __version__
from ..jobs import Notifier
from ..protocol.jsonrpc import FREE, Method, NoParams, Request
from ..protocol.schema import DaemonStatus, DamagedBrief, ProviderBrief

if TYPE_CHECKING:
    from ..app import App


def ping(conn: Notifier, req: Request, p: NoParams) -> str:
    return "pong"


def status(app: App, conn: Notifier, req: Request, p: NoParams) -> DaemonStatus:
    providers = []
    if app.models.pool is not None:
        providers = [
            ProviderBrief(s.name, s.kind, s.healthy, s.in_flight, s.capacity)
            for s in app.models.pool.status()
        ]
    prot: Any = (
        msgspec.to_builtins(app.models.protection) if app.models.protection is not None else {}
    )
    contexts = app.store.list()
    return DaemonStatus(
        version=__version__,
        pid=os.getpid(),
        uptime_s=round(time.monotonic() - app.started, 3),
        contexts=len(contexts),
        providers=providers,
        socket=str(app.socket_path),
        state_dir=str(app.state_dir),
        jobs=len(app.jobs),
        sandbox=prot,
        embedded=app.models.embedded.describe()
        if app.models.embedded is not None
        else app.models.embedded_note,
        queries_running=app.admission.running,
        queries_queued=app.admission.waiting,
        damaged_contexts=[DamagedBrief(c.name, c.damaged) for c in contexts if c.damaged],
    )


def routes(app: App) -> dict[str, Method]:
    return {
        "daemon/ping": Method.of(ping, ordering=FREE),
        "daemon/status": Method.of(partial(status, app), ordering=FREE),
    }
