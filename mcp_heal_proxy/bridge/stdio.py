"""Bridged sessions over the stdio front: each message bridge/core.py yields is one line on stdout."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from mcp_heal_proxy.bridge.core import Bridge, BridgeGone, UpstreamChallenge
from mcp_heal_proxy.bridge.wire import error_message
from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.wire.jsonrpc import CANCELLED, Kind, PostBody

# Writes one JSON-RPC message as one line.
WriteMessage = Callable[[dict[str, Any]], Awaitable[None]]
# Over stdio nobody needs keep-alives: the ticks only let a waiting call look around.
_IDLE: Final = 30.0


async def post(
    bridge: Bridge, headers: Mapping[str, str], record: SessionRecord, body: PostBody, write: WriteMessage
) -> None:
    """A line on a bridged session: an answer to one of the proxy's input requests, a notification (taken:
    a 2026-07-28 server has no use for them), or a request, whose messages are written as they come."""
    first = body.messages[0]
    if first.kind is Kind.RESPONSE:
        bridge.take(record, body)
        return
    if first.kind is not Kind.REQUEST:
        if first.method == CANCELLED:
            bridge.cancel(record, first.params)
        return
    messages = bridge.call(headers, record, first, _IDLE)
    async with contextlib.aclosing(messages):
        try:
            async for message in messages:
                if message is not None:
                    await write(message)
        except UpstreamChallenge as challenge:
            # No OAuth flow over stdio: the client learns why (the bridge's managed login is the fix).
            await write(error_message(first.id, challenge.code, challenge.message))
        except BridgeGone as gone:
            # The client cannot initialize again over stdio: the proxy does, at its next request.
            await bridge.unbridge(record)
            why = (
                f"upstream MCP server no longer answers as a 2026-07-28 server ({gone.what}); the proxy "
                "initializes the session upstream again at the next request"
            )
            await write(error_message(first.id, gone.code, why))


async def follow(bridge: Bridge, headers: Mapping[str, str], record: SessionRecord, write: WriteMessage) -> None:
    """The bridged session's server notifications (list changes, updated resources), as lines."""
    messages = bridge.listen(headers, record, _IDLE)
    async with contextlib.aclosing(messages):
        async for message in messages:
            if message is not None:
                await write(message)
