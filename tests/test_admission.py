"""Query admission: at most N queries run, M wait (with a ``queued`` event), the rest are
refused with -32008; ping is answered throughout.  Against the real daemon."""

from __future__ import annotations

import threading
import time

from rlmd.client import RpcError
from rlmd.testing.scripted_server import Rule, ScriptedReply, ScriptedServer

LIMITS = "[limits]\nmax_concurrent_queries = 2\nmax_queued_queries = 1\n"


class Asker(threading.Thread):
    """Runs one query/run on its own connection, keeping its events."""

    def __init__(self, d, job: str) -> None:
        super().__init__(daemon=True)
        self.d, self.job = d, job
        self.events: list[dict] = []
        self.queued = threading.Event()
        self.result: object = None

    def on_event(self, ev: dict) -> None:
        self.events.append(ev)
        if ev.get("kind") == "queued":
            self.queued.set()

    def run(self) -> None:
        try:
            with self.d.client(timeout=60) as c:
                self.result = c.call(
                    "query/run",
                    {"query": f"hold {self.job}", "job": self.job},
                    on_event=self.on_event,
                )
        except RpcError as exc:
            self.result = exc


def _wait(pred, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_queries_admitted_queued_and_refused(make_daemon, scripted_config):
    rules = [Rule(pattern="", reply=ScriptedReply(hang=True))]
    with ScriptedServer(rules, models=["root", "sub"]) as srv:
        d = make_daemon(scripted_config(srv.url, LIMITS, capacity=8))
        a, b = Asker(d, "a"), Asker(d, "b")
        a.start()
        b.start()
        _wait(lambda: srv.in_flight == 2, "two queries calling the model")
        c = Asker(d, "c")
        c.start()
        assert c.queued.wait(30), "the third query got no queued event"
        [ev] = [e for e in c.events if e["kind"] == "queued"]
        assert ev["position"] == 1 and ev["limit"] == 2 and ev["job"] == "c"
        # The queue (1) is full: the fourth is refused at once, saying why.
        e = Asker(d, "e")
        e.start()
        e.join(30)
        assert isinstance(e.result, RpcError), e.result
        assert e.result.code == -32008 and e.result.kind == "busy"
        assert "max_concurrent_queries" in e.result.message
        assert e.events[-1]["kind"] == "error"
        st = d.call("daemon/status")
        assert (st["queries_running"], st["queries_queued"]) == (2, 1)
        assert d.call("daemon/ping") == "pong"
        assert srv.in_flight == 2  # the queued one has not called the model
        # Cancelling a running query hands its slot to the queued one.
        assert d.call("query/cancel", {"job": "a"}) == {"cancelled": True}
        a.join(30)
        assert isinstance(a.result, RpcError) and a.result.kind == "cancelled"
        _wait(lambda: len([x for x in srv.calls if "hold c" in x.last_user]) == 1, "c to start")
        # A cancelled waiter leaves the queue: fill it again and cancel it.
        f = Asker(d, "f")
        f.start()
        assert f.queued.wait(30)
        assert d.call("query/cancel", {"job": "f"}) == {"cancelled": True}
        f.join(30)
        assert isinstance(f.result, RpcError) and f.result.kind == "cancelled"
        assert d.call("daemon/status")["queries_queued"] == 0
        for job in ("b", "c"):
            d.call("query/cancel", {"job": job})
        b.join(30)
        c.join(30)
        assert d.call("daemon/status")["queries_running"] == 0
