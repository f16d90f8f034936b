"""Handlers are plain functions: imported and called alone, with real parts, no daemon."""

from __future__ import annotations

import asyncio

import pytest

from rlmd.admission import Admission, QueueFull
from rlmd.app import App, ModelParts
from rlmd.config import Config
from rlmd.handlers import context, daemon, query
from rlmd.handlers.registry import FAMILIES, build_methods
from rlmd.jobs import Jobs
from rlmd.protocol.errors import AppError
from rlmd.protocol.jsonrpc import NoParams, Request
from rlmd.protocol.schema import ContextPeekParams, ContextPutParams, JobParams
from rlmd.store.store import ContextStore

REQ = Request("test", 1, False)


class Inbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def notify(self, method: str, params: object) -> None:
        self.sent.append((method, params))


def test_context_handlers_alone(tmp_path):
    store = ContextStore(tmp_path / "contexts")
    conn = Inbox()
    put = asyncio.run(context.put(store, conn, REQ, ContextPutParams(name="n", text="hello world")))
    assert put.chars == 11
    peek = asyncio.run(context.peek(store, conn, REQ, ContextPeekParams(name="n", start=6)))
    assert peek == {"text": "world"}
    assert [c.name for c in context.list_(store, conn, REQ, NoParams())] == ["n"]
    with pytest.raises(AppError) as ei:
        asyncio.run(context.peek(store, conn, REQ, ContextPeekParams(name="missing")))
    assert ei.value.code == -32001
    assert daemon.ping(conn, REQ, NoParams()) == "pong"


def test_query_cancel_alone():
    jobs = Jobs()
    assert query.cancel(jobs, Inbox(), REQ, JobParams(job="early")) == {"cancelled": False}
    assert jobs.early_cancels() == 1


def test_query_run_without_a_model_says_so(tmp_path):
    app = App.assemble(
        Config(),
        tmp_path / "s.sock",
        tmp_path,
        ContextStore(tmp_path / "contexts"),
        ModelParts(embedded_note="no model here: install one"),
    )
    from rlmd.engine.types import QueryParams

    with pytest.raises(AppError) as ei:
        asyncio.run(query.run(app, Inbox(), REQ, QueryParams(query="q")))
    assert ei.value.kind == "unavailable" and "install one" in ei.value.message
    table = build_methods(app)
    assert {"daemon/ping", "context/put", "query/run", "pool/status", "cache/clear"} <= set(table)
    with pytest.raises(ValueError, match="registered twice"):
        build_methods(app, (*FAMILIES, FAMILIES[0]))


def test_admission_queue_order_and_cancel():
    async def main() -> list[str]:
        adm = Admission(limit=1, max_queued=2)
        order: list[str] = []
        gate = asyncio.Event()

        async def q(name: str) -> None:
            async with adm.slot(lambda pos: order.append(f"{name} queued {pos}")):
                order.append(f"{name} runs")
                await gate.wait()

        t1 = asyncio.create_task(q("a"))
        await asyncio.sleep(0)
        t2 = asyncio.create_task(q("b"))
        t3 = asyncio.create_task(q("c"))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            async with adm.slot():
                pass
        t2.cancel()  # a waiter that goes away leaves the queue
        await asyncio.sleep(0)
        assert adm.waiting == 1
        gate.set()
        await asyncio.gather(t1, t3, return_exceptions=True)
        assert adm.running == 0 and adm.waiting == 0
        return order

    assert asyncio.run(main()) == ["a runs", "b queued 1", "c queued 2", "c runs"]


def test_admission_slot_handed_to_a_cancelled_waiter_is_passed_on():
    async def main() -> list[str]:
        adm = Admission(limit=1, max_queued=2)
        order: list[str] = []
        gate = asyncio.Event()
        tasks: dict[str, asyncio.Task[None]] = {}

        async def first() -> None:
            async with adm.slot():
                order.append("a")
                await gate.wait()
            # In the same step as the release: b holds the slot but has not run yet.
            tasks["b"].cancel()

        async def q(name: str) -> None:
            async with adm.slot():
                order.append(name)

        ta = asyncio.create_task(first())
        await asyncio.sleep(0)
        tasks["b"] = asyncio.create_task(q("b"))
        tc = asyncio.create_task(q("c"))
        await asyncio.sleep(0)
        gate.set()
        # A lost slot would leave c waiting for ever: bound the wait so that it fails.
        await asyncio.wait_for(asyncio.gather(ta, tasks["b"], tc, return_exceptions=True), 10)
        assert adm.running == 0 and adm.waiting == 0
        return order

    assert asyncio.run(main()) == ["a", "c"]
