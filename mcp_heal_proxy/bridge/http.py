"""Bridged sessions over the HTTP front: the answers of bridge/core.py written to the client.

A request's answer is JSON when the only message is its response, else SSE (notifications, the
proxy's input requests, keep-alives, the response last): a call that turns out to need the client's
input must already be a stream. The GET stream is SSE fed from the upstream's subscriptions/listen.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any, Final

import structlog

from mcp_heal_proxy.bridge.core import Bridge, BridgedOpen, UpstreamChallenge
from mcp_heal_proxy.bridge.wire import error_message
from mcp_heal_proxy.errors import InvalidRequest, ProxyError
from mcp_heal_proxy.front.exchange import Exchange
from mcp_heal_proxy.front.relay import Outcome
from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.wire.headers import MCP_SESSION_ID
from mcp_heal_proxy.wire.jsonrpc import CANCELLED, Kind, PostBody, RequestId
from mcp_heal_proxy.wire.sse import Event, encode_comment, encode_event

log = structlog.get_logger("mcp_heal_proxy.bridge")

_KEEPALIVE: Final = encode_comment("keep-alive")


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _event(message: dict[str, Any]) -> bytes:
    return encode_event(Event(data=json.dumps(message, separators=(",", ":"))))


async def answer_initialize(exchange: Exchange, opened: BridgedOpen, outcome: Outcome) -> None:
    """The proxy's answer to a bridged initialize, with the session id it minted."""
    outcome.status = 200
    headers = [("Content-Type", "application/json"), (MCP_SESSION_ID, opened.record.client_session_id)]
    await exchange.answer(200, _json(opened.answer), headers)


async def post(
    bridge: Bridge, exchange: Exchange, record: SessionRecord, body: PostBody, outcome: Outcome, idle: float
) -> None:
    """A POST on a bridged session: answers to the proxy's input requests, notifications (taken here:
    a 2026-07-28 server has no use for them), or one request."""
    cid = record.client_session_id
    first = body.messages[0]
    if body.is_batch:
        raise InvalidRequest("batches are not bridged to a 2026-07-28 server: send one message per POST")
    if first.kind is not Kind.REQUEST:
        if first.kind is Kind.RESPONSE:
            bridge.take(record, body)
        elif first.method == CANCELLED:
            bridge.cancel(record, first.params)
        outcome.status = 202
        await exchange.answer(202, b"", [(MCP_SESSION_ID, cid)])
        return
    messages = bridge.call(exchange.headers, record, first, idle)
    async with contextlib.aclosing(messages):
        try:
            head = await anext(messages, None)
        except UpstreamChallenge as challenge:
            await _pass_challenge(exchange, challenge, outcome)
            return
        if head is not None and head.get("id") == first.id and ("result" in head or "error" in head):
            outcome.status = 200
            headers = [("Content-Type", "application/json"), (MCP_SESSION_ID, cid)]
            await exchange.answer(200, _json(head), headers)
            return
        await _stream(exchange, cid, head, messages, outcome, first.id)


async def _stream(
    exchange: Exchange,
    cid: str,
    head: dict[str, Any] | None,
    rest: AsyncGenerator[dict[str, Any] | None, None],
    outcome: Outcome,
    request_id: RequestId | None = None,
) -> None:
    """Write the messages as SSE. A request's stream that meets a failure of the proxy's own (the upstream's
    401, its era changed, the store) once its answer started ends with that error as its response: the
    client gets its request's id back, and the stream ends cleanly."""
    headers = [
        ("Content-Type", "text/event-stream"),
        ("Cache-Control", "no-cache"),
        ("X-Accel-Buffering", "no"),
        (MCP_SESSION_ID, cid),
    ]
    try:
        await exchange.start(200, None, headers)
        outcome.status = 200
        await exchange.write(_KEEPALIVE if head is None else _event(head))
        try:
            async for message in rest:
                await exchange.write(_KEEPALIVE if message is None else _event(message))
        except ProxyError as exc:
            if request_id is None:
                raise
            log.warning("bridge.call_failed", client_session=cid[:8], error=exc.message)
            await exchange.write(_event(error_message(request_id, exc.code, exc.message)))
        await exchange.end()
    except ConnectionError:
        outcome.client_left = True


async def _pass_challenge(exchange: Exchange, challenge: UpstreamChallenge, outcome: Outcome) -> None:
    """The upstream's 401/403 as it came (the OAuth pass-through rewrites the challenge on its way out)."""
    keep = ("www-authenticate", "content-type")
    headers = [(name, value) for name, value in challenge.headers.items() if name.lower() in keep]
    outcome.status = challenge.status
    await exchange.answer(challenge.status, challenge.body, headers)


async def get(bridge: Bridge, exchange: Exchange, record: SessionRecord, outcome: Outcome, idle: float) -> None:
    """The bridged session's GET stream."""
    messages = bridge.listen(exchange.headers, record, idle)
    async with contextlib.aclosing(messages):
        await _stream(exchange, record.client_session_id, None, messages, outcome)


async def delete(bridge: Bridge, exchange: Exchange, record: SessionRecord) -> None:
    """DELETE ends the proxy's own session; the upstream has none."""
    await bridge.end(record)
    await exchange.answer(200, b"")
