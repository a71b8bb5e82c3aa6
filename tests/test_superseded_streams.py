"""A heal ends the server stream it left on the old upstream session (engine/streams.py).

The upstream forgets the session without closing its streams (a failover to a replica that never saw it):
the client's next call meets 404 and heals, while the server stream (GET) stays open on the forgotten
session, silent for good. What the new session sends on its own (here resources/updated, a notification
related to no request) goes to the new session's stream. The official SDK client, through the HTTP front
and through the stdio bridge, to the official SDK server: the heal opens the new session's stream before
the replay, ends the old one, and the client's stream moves to the new one; what the replay sent on it
reaches the client, and so does what the session sends later.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import mcp.types as types
import pytest
from aiohttp import web
from mcp.client.session import ClientSession, IncomingMessage

from mcp_heal_proxy.config import UPSTREAM_CLIENTS
from tests.conftest import (
    ProxyFactory,
    UpstreamProcess,
    echo_call,
    mcp_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream
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

    def clear(self) -> None:
        self.uris.clear()
        self._arrived.clear()


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
    # The call that heals is the one that announces: replayed on the new session, it sends resources/updated
    # on that session's server stream at once. The heal opened that stream before the replay, and the
    # client's stream, moved to it, brings what waited there.
    assert await call(session, "announce", uri=WATCHED) == f"announced {WATCHED}"  # 404, healed, replayed
    assert (await upstream.stats())["initialize"] == 2, "one heal: one re-initialize"
    await updates.wait()
    assert updates.uris == [WATCHED]

    async def moved_on() -> bool:
        now = await listening(upstream)
        return len(now) == 1 and now[0] not in forgotten

    # Without the proxy ending the stream on the forgotten session, the client's stays there.
    await wait_until(moved_on, CALL_TIMEOUT, "the server stream on the healed session")
    updates.clear()
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
    async with mcp_session(proxy.url, message_handler=updates.handler) as session:
        await heal_over_a_forgotten_session(session, sse_upstream, updates)


async def test_the_stdio_bridge_moves_its_server_stream_to_the_healed_session(upstream: UpstreamProcess) -> None:
    updates = Updates()
    async with bridged_session(upstream.url, message_handler=updates.handler) as session:
        await heal_over_a_forgotten_session(session, upstream, updates)


async def test_a_heal_whose_caller_left_still_ends_the_stream_on_the_old_session(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Fault injection: the heal runs in its own task and finishes when the client that asked for it hung
    up in the middle. The heal's task, not the gone caller, ends the old stream, so the client's server
    stream still moves to the new session."""
    upstream, url = fake
    done = asyncio.Event()

    async def open_stream(request: web.Request, _: Any) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n')
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3 * CALL_TIMEOUT):
                await done.wait()  # open (and silent) until the test ends, well past its waits
        return response

    async def slow_reinitialize(_: web.Request, __: Any) -> None:
        await asyncio.sleep(1.0)  # the client hangs up during it
        return None

    upstream.on_get = open_stream
    upstream.on_reinitialize = slow_reinitialize
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    try:
        async with http.get(proxy.url, headers=session_headers(session_id)) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")  # the first event: the stream is open upstream

            def streams_on(upstream_session: str) -> int:
                return sum(
                    1
                    for seen in upstream.seen
                    if seen.method == "GET" and seen.headers.get("Mcp-Session-Id") == upstream_session
                )

            assert streams_on("upstream-1") == 1
            upstream.forget_all()  # the open stream stays open
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await http.post(proxy.url, json=echo_call(2), headers=session_headers(session_id))
            await wait_until(lambda: upstream.initializes == 2, CALL_TIMEOUT, "the heal's re-initialize")
            await wait_until(lambda: streams_on("upstream-2") == 1, CALL_TIMEOUT, "the stream on the healed session")
    finally:
        done.set()
