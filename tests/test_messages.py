"""Messages in words a user understands: no class names of the proxy's internals or its libraries
(ConnectFailed, ClientConnectorError, ClientPayloadError) in client-facing errors or logs, and no
warning for a heal that succeeded."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import UpstreamProcess, echo_call
from tests.fake_upstream import FakeUpstream
from tests.test_stdio import INITIALIZE, INITIALIZED, initialized, ping, raw_bridge

# An exception class's name as Python spells them (CamelCase ending in Error, or a known few).
CLASS_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)+(?:Error|Failed|Timeout|Exception)\b|ConnectFailed")


def no_class_names(text: str) -> None:
    assert not CLASS_NAME.search(text), text


async def test_over_stdio_a_healed_upstream_restart_writes_no_warning(sse_upstream: UpstreamProcess) -> None:
    async with raw_bridge(sse_upstream.url) as bridge:  # the default level: warning
        await initialized(bridge)
        await bridge.send(ping(2))
        assert (await bridge.receive())["id"] == 2
        # The bridge's GET stream is open (the server's own messages); the restart breaks it and the
        # session both, and the next request heals them.
        await asyncio.sleep(0.5)
        await sse_upstream.restart()
        await bridge.send(ping(3))
        assert await bridge.receive() == {"jsonrpc": "2.0", "id": 3, "result": {}}
        await asyncio.sleep(0.5)  # the GET stream's reattach after the heal
        assert bridge.process.stdin is not None
        bridge.process.stdin.close()
        assert await bridge.wait() == 0
        logged = await bridge.stderr()
    warnings = [json.loads(line) for line in logged.splitlines() if '"level": "warning"' in line]
    assert warnings == [], "a heal that succeeded is no warning"


async def test_over_stdio_a_json_answer_broken_mid_body_is_said_in_words(fake: tuple[FakeUpstream, str]) -> None:
    upstream, url = fake

    async def half_then_die(request: web.Request, payload: Any) -> web.StreamResponse | None:
        if payload.get("method") != "tools/call":
            return None
        body = json.dumps({"jsonrpc": "2.0", "id": payload["id"], "result": {"x": "y" * 4096}}).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def no_server_stream(request: web.Request, body: Any) -> web.StreamResponse | None:
        return web.Response(status=405)

    upstream.on_request = half_then_die
    upstream.on_get = no_server_stream
    async with raw_bridge(url) as bridge:
        await bridge.send(INITIALIZE)
        assert (await bridge.receive())["id"] == 1
        await bridge.send(INITIALIZED)
        await bridge.send(echo_call(5))
        error = await bridge.receive()
    assert error.get("id") == 5, error
    assert error["error"]["message"] == "upstream MCP server broke its answer: answer cut off before its end"


async def test_an_unreachable_upstream_is_said_in_words_to_the_client(
    start_proxy: Any, http: aiohttp.ClientSession
) -> None:
    from tests.conftest import MCP_HEADERS, free_port

    for client in ("lean", "aiohttp"):
        proxy = await start_proxy(f"http://127.0.0.1:{free_port()}/mcp", connect_retry=0.0, client=client)
        body = {"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {}}
        async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
            answer = await response.json()
        message = answer["error"]["message"]
        assert message == "cannot reach the upstream MCP server: connection refused: nothing listens at that address"
        no_class_names(message)
