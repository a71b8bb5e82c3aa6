"""A heal ends the server stream it left on the old upstream session (engine/streams.py).

The upstream forgets the session without closing its streams (a failover to a replica that never saw it):
the client's next call meets 404 and heals, while the server stream (GET) stays open on the forgotten
session, silent for good. What the new session sends on its own (here resources/updated, a notification
related to no request) goes to the new session's stream. The official SDK client, through the HTTP front
and through the stdio bridge, to the official SDK server: the proxy ends the old stream and reattaches
on the new session, and the notification reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import mcp.types as types
import pytest
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.streamable_http import streamable_http_client

from mcp_heal_proxy.config import UPSTREAM_CLIENTS
from tests.conftest import ProxyFactory, UpstreamProcess, wait_until
from tests.test_stdio import bridged_session

CALL_TIMEOUT = 20.0
WATCHED = "test://superseded/watched"


class Updates:
    """The resources/updated notifications the client received, and a bounded wait for the next."""

    def __init__(self) -> None:
        self.uris: list[str] = []
        self._arrived = asyncio.Event()

    async def handler(self, message: IncomingMessage) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            self.uris.append(str(message.params.uri))
            self._arrived.set()

    async def wait(self) -> None:
        async with asyncio.timeout(CALL_TIMEOUT):
            await self._arrived.wait()


@contextlib.asynccontextmanager
async def http_session(url: str, **callbacks: Any) -> AsyncIterator[ClientSession]:
    async with (
        streamable_http_client(url) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream, **callbacks) as session,
    ):
        async with asyncio.timeout(CALL_TIMEOUT):
            await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> str:
    async with asyncio.timeout(CALL_TIMEOUT):
        result = await session.call_tool(tool, arguments)
    assert not result.is_error, result
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


async def listening(upstream: UpstreamProcess) -> list[str]:
    """The upstream sessions with a server stream open."""
    sessions: list[str] = (await upstream.stats())["listening"]
    return sessions


async def heal_over_a_forgotten_session(session: ClientSession, upstream: UpstreamProcess, updates: Updates) -> None:
    # The client's server stream is open upstream, on its one session.
    await wait_until(lambda: _one_listening(upstream), CALL_TIMEOUT, "the client's server stream upstream")
    forgotten = await upstream.forget_sessions()
    assert len(forgotten) == 1
    assert await call(session, "echo", text="after") == "after"  # 404, healed, replayed
    assert (await upstream.stats())["initialize"] == 2, "one heal: one re-initialize"

    async def moved_on() -> bool:
        now = await listening(upstream)
        return len(now) == 1 and now[0] not in forgotten

    # Without the proxy ending the stream on the forgotten session, no stream opens on the new one.
    await wait_until(moved_on, CALL_TIMEOUT, "the server stream on the healed session")
    assert await call(session, "announce", uri=WATCHED) == f"announced {WATCHED}"
    await updates.wait()
    assert updates.uris == [WATCHED]


async def _one_listening(upstream: UpstreamProcess) -> bool:
    return len(await listening(upstream)) == 1


@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_the_http_front_moves_the_clients_server_stream_to_the_healed_session(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, client: str
) -> None:
    """Both upstream HTTP clients: each ends a response its own way (engine/answers.py: supersede)."""
    proxy = await start_proxy(sse_upstream.url, client=client)
    updates = Updates()
    async with http_session(proxy.url, message_handler=updates.handler) as session:
        await heal_over_a_forgotten_session(session, sse_upstream, updates)


async def test_the_stdio_bridge_moves_its_server_stream_to_the_healed_session(upstream: UpstreamProcess) -> None:
    updates = Updates()
    async with bridged_session(upstream.url, message_handler=updates.handler) as session:
        await heal_over_a_forgotten_session(session, upstream, updates)
