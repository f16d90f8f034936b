"""Scripted models for a ScriptedServer ``responder``: replies chosen by regex.

``ScriptedModels(sub_model="sub")`` answers each chat call from the first rule whose regex
is found in the call's last user message: ``root`` rules for every model but
``sub_model``, ``sub`` rules for that one.  A rule's reply is a ScriptedReply, a string,
or a function ``(match, call) -> ScriptedReply | str``.  No rule matched: None (the
server answers with its own rules, or an error).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from rlmd.client import Client, RpcError
from rlmd.testing.scripted_server import ChatCall, ScriptedReply

Reply = ScriptedReply | str | Callable[[re.Match[str], ChatCall], ScriptedReply | str]


class ScriptedModels:
    """Root and sub-model rules in order (see the module docstring)."""

    def __init__(self, sub_model: str) -> None:
        self.sub_model = sub_model
        self.root: list[tuple[str, Reply]] = []
        self.sub: list[tuple[str, Reply]] = []

    def on_root(self, pattern: str, reply: Reply) -> ScriptedModels:
        self.root.append((pattern, reply))
        return self

    def on_sub(self, pattern: str, reply: Reply) -> ScriptedModels:
        self.sub.append((pattern, reply))
        return self

    def __call__(self, call: ChatCall) -> ScriptedReply | None:
        rules = self.sub if call.model == self.sub_model else self.root
        for pattern, reply in rules:
            m = re.search(pattern, call.last_user, re.S)
            if m:
                if callable(reply):
                    reply = reply(m, call)
                return reply if isinstance(reply, ScriptedReply) else ScriptedReply(text=str(reply))
        return None


class _Daemon(Protocol):
    def client(self) -> Client: ...


def run_query(daemon: _Daemon, params: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """``query/run`` over a fresh connection: (the result, or the RpcError it ended with;
    the events streamed on the way)."""
    events: list[dict[str, Any]] = []
    with daemon.client() as c:
        try:
            return c.call("query/run", params, on_event=events.append), events
        except RpcError as exc:
            return exc, events
