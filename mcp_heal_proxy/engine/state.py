"""Session state a client builds up that a new upstream session must be given again after a heal.

MCP sessions carry two kinds of client-set state: resource subscriptions and the logging level. The
proxy records them as the client sets them and re-applies them on a new upstream session before the
replay (PROTOCOL.md, step 4). Everything else a stateful server kept is lost with its session; that is
why replay is a per-upstream policy.
"""

from __future__ import annotations

from dataclasses import replace

from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.wire.jsonrpc import Kind, PostBody

SUBSCRIBE = "resources/subscribe"
UNSUBSCRIBE = "resources/unsubscribe"
SET_LEVEL = "logging/setLevel"
_STATEFUL = frozenset({SUBSCRIBE, UNSUBSCRIBE, SET_LEVEL})


def record_state_change(record: SessionRecord, body: PostBody) -> SessionRecord:
    """The record after the upstream accepted this body; the same object when nothing changed."""
    updated = record
    for message in body.messages:
        if message.kind is not Kind.REQUEST or message.method not in _STATEFUL or message.params is None:
            continue
        if message.method == SET_LEVEL:
            level = message.params.get("level")
            if isinstance(level, str):
                updated = replace(updated, log_level=level)
            continue
        uri = message.params.get("uri")
        if not isinstance(uri, str):
            continue
        if message.method == SUBSCRIBE:
            updated = replace(updated, subscriptions=updated.subscriptions | {uri})
        else:
            updated = replace(updated, subscriptions=updated.subscriptions - {uri})
    return updated


def state_requests(record: SessionRecord) -> list[tuple[str, dict[str, str]]]:
    """The (method, params) requests that rebuild the record's state on a new upstream session."""
    requests: list[tuple[str, dict[str, str]]] = [(SUBSCRIBE, {"uri": uri}) for uri in sorted(record.subscriptions)]
    if record.log_level is not None:
        requests.append((SET_LEVEL, {"level": record.log_level}))
    return requests
