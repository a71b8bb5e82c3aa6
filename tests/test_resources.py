"""Nothing leaks and nothing is lost: client disconnects, crowds on one dead session, shutdown."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from mcp_heal_proxy.front.app import PROXIES_KEY
from tests.conftest import ProxyFactory, UpstreamProcess, raw_initialize, session_headers, wait_until
from tests.fake_upstream import FakeUpstream

AiohttpServer = Callable[..., Any]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_client_disconnects_mid_stream_leak_nothing(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory
) -> None:
    upstream = FakeUpstream()
    active = 0
    started = 0

    async def endless_stream(request: web.Request, body: Any) -> web.StreamResponse | None:
        nonlocal active, started
        if body.get("method") != "tools/call":
            return None
        active += 1
        started += 1
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n')
            await asyncio.Event().wait()  # a tool that never finishes
            return response
        finally:
            active -= 1

    upstream.on_request = endless_stream
    server: TestServer = await aiohttp_server(upstream.app())
    proxy = await start_proxy(str(server.make_url("/mcp")))
    async with aiohttp.ClientSession() as http:
        session_id = await raw_initialize(http, proxy.url)
    parts = urlsplit(proxy.url)
    headers = "".join(f"{k}: {v}\r\n" for k, v in session_headers(session_id).items())
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow"}}'
    request = f"POST /mcp HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def disconnect_mid_stream() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(request)
        await reader.readuntil(b"notifications/progress")
        writer.close()
        await writer.wait_closed()

    async def one_round(count: int) -> None:
        for _ in range(count):
            await disconnect_mid_stream()

    await one_round(20)  # warm up pools and caches before taking the baseline
    await wait_until(lambda: active == 0, 10, "warm-up streams cancelled upstream")
    baseline_tasks = len(asyncio.all_tasks())
    baseline_fds = open_fds()
    async with asyncio.timeout(120):
        await one_round(1000)
    await wait_until(lambda: active == 0, 10, "every upstream request cancelled")
    assert started == 1020
    await wait_until(lambda: len(asyncio.all_tasks()) <= baseline_tasks, 10, "tasks back to baseline")
    await wait_until(lambda: open_fds() <= baseline_fds + 2, 10, "file descriptors back to baseline")
    # Either client keeps at most its idle keep-alive connections; none may stay in use.
    assert proxy.app[PROXIES_KEY]["/mcp"]._upstream.connections_in_use() == 0


async def test_a_hundred_concurrent_requests_on_an_expired_session_cause_one_initialize(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    # One session may hold 32 requests by default; this one is allowed all hundred at once.
    proxy = await start_proxy(sse_upstream.url, max_streams_per_session=100)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        session_id = await raw_initialize(http, proxy.url)
        await sse_upstream.restart()

        async def call(index: int) -> str:
            body = {
                "jsonrpc": "2.0",
                "id": index,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": f"n{index}"}},
            }
            async with http.post(proxy.url, json=body, headers=session_headers(session_id)) as response:
                assert response.status == 200
                return await response.text()

        answers = await asyncio.gather(*(call(index) for index in range(100)))
    assert all(f"n{index}" in answer for index, answer in enumerate(answers))
    stats = await sse_upstream.stats()
    assert stats["initialize"] == 1
    assert stats["tools_call"] == 200  # each call once on the dead session, once replayed
