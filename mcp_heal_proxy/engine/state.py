"""Session state a client builds up that a new upstream session must be given again after a heal.

MCP sessions carry two kinds of client-set state: resource subscriptions and the logging level. The
proxy records them as the client sets them and re-applies them on a new upstream session before the
replay (PROTOCOL.md, step 4). Everything else a stateful server kept is lost with its session; that is
why replay is a per-upstream policy.

The merge rule lives here, once: a ``StateChange`` is what one accepted body changes, and it is applied
by the store to the session's *current* record (``SessionStore.apply``), never to the record the request
read when it started. So two changes in flight at once both survive (two subscribes, a subscribe and a
setLevel), whatever order their answers come in, and a heal that lands meanwhile keeps them too: a state
change touches only the state fields, a heal only the upstream session fields (they commute).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, replace

from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.wire.jsonrpc import Kind, PostBody, RequestId

SUBSCRIBE = "resources/subscribe"
UNSUBSCRIBE = "resources/unsubscribe"
SET_LEVEL = "logging/setLevel"
_STATEFUL = frozenset({SUBSCRIBE, UNSUBSCRIBE, SET_LEVEL})


@dataclass(frozen=True, slots=True)
class StateChange:
    """The state changes of one body, in the order its requests came: (method, uri or level) steps.

    Called on a record, it returns the record with the changes applied, or the same object when they
    change nothing (the store then writes nothing).
    """

    steps: tuple[tuple[str, str], ...]

    def __call__(self, record: SessionRecord) -> SessionRecord:
        subscriptions = record.subscriptions
        level = record.log_level
        for method, value in self.steps:
            if method == SET_LEVEL:
                level = value
            elif method == SUBSCRIBE:
                subscriptions = subscriptions | {value}
            else:
                subscriptions = subscriptions - {value}
        if subscriptions == record.subscriptions and level == record.log_level:
            return record
        return replace(record, subscriptions=subscriptions, log_level=level)


def state_request_ids(body: PostBody) -> tuple[RequestId, ...]:
    """Ids of the body's requests that change session state (whose answers decide what is remembered)."""
    return tuple(
        message.id
        for message in body.messages
        if message.kind is Kind.REQUEST and message.method in _STATEFUL and message.params is not None
    )


def state_change(body: PostBody, succeeded: Container[RequestId] | None = None) -> StateChange | None:
    """What this body changes in the session's state; None if nothing. With ``succeeded``, only the
    requests answered with a result count: a change the upstream refused (a JSON-RPC error, even inside
    HTTP 200) is not the client's state, and must not be re-sent at every heal."""
    steps: list[tuple[str, str]] = []
    for message in body.messages:
        if message.kind is not Kind.REQUEST or message.method not in _STATEFUL or message.params is None:
            continue
        if succeeded is not None and message.id not in succeeded:
            continue
        value = message.params.get("level" if message.method == SET_LEVEL else "uri")
        if isinstance(value, str):
            steps.append((message.method, value))
    return StateChange(tuple(steps)) if steps else None


def record_state_change(record: SessionRecord, body: PostBody) -> SessionRecord:
    """The record after the upstream accepted this body; the same object when nothing changed."""
    change = state_change(body)
    return change(record) if change is not None else record


def state_requests(record: SessionRecord) -> list[tuple[str, dict[str, str]]]:
    """The (method, params) requests that rebuild the record's state on a new upstream session."""
    requests: list[tuple[str, dict[str, str]]] = [(SUBSCRIBE, {"uri": uri}) for uri in sorted(record.subscriptions)]
    if record.log_level is not None:
        requests.append((SET_LEVEL, {"level": record.log_level}))
    return requests
