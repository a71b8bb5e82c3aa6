"""What the status page and the request log say about an upstream: what happened when nothing answered
(refused, DNS, TLS), latencies of answers only, and health from what the upstream did, not from requests
the proxy refused on its own."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.conftest import INITIALIZE_PARAMS, MCP_HEADERS, ProxyFactory, UpstreamProcess, free_port

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}


async def upstream_health(http: aiohttp.ClientSession, proxy_url: str) -> dict[str, Any]:
    async with http.get(proxy_url.removesuffix("/mcp") + "/_proxy/api/upstreams") as response:
        assert response.status == 200
        (health,) = (await response.json())["upstreams"]
        return dict(health)


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("refused", "connection refused: nothing listens at that address"),
        ("dns", "host name not found in DNS"),
        # The TLS failure goes on with its cause and fix (tests/test_tls.py checks those).
        ("tls", "TLS handshake with the upstream failed ("),
    ],
)
async def test_an_upstream_nothing_answered_for_is_said_as_it_happened(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession, where: str, said: str
) -> None:
    url = {
        "refused": f"http://127.0.0.1:{free_port()}/mcp",
        "dns": "http://mcp.upstream.invalid/mcp",
        # The SDK server speaks plain HTTP: a TLS handshake with it fails.
        "tls": sse_upstream.url.replace("http://", "https://"),
    }[where]
    proxy = await start_proxy(url, connect_retry=0.5)
    with capture_logs() as logs:
        async with http.post(proxy.url, json=INITIALIZE, headers=MCP_HEADERS) as response:
            assert response.status == 502
            message = (await response.json())["error"]["message"]
    assert message.startswith(f"cannot reach the upstream MCP server: {said}")
    health = await upstream_health(http, proxy.url)
    assert health["last_failure"]["why"] == f"{message} (initialize)", "not 'answered HTTP 502': nothing answered"
    assert health["last_failure"]["status"] is None
    assert health["last_success"] is None
    assert health["latency"] == {"window": 0}, "the connect retries are no upstream latency"
    (logged,) = [entry for entry in logs if entry["event"] == "request"]
    assert logged["log_level"] == "warning"
    assert (logged["status"], logged["error"], logged["failure"]) == (502, message, where)


async def test_requests_the_proxy_refuses_say_nothing_about_the_upstreams_health(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    # A GET without a session and a POST that is not JSON never reach the upstream.
    async with http.get(proxy.url, headers={"Accept": "text/event-stream"}) as response:
        assert response.status == 400
    async with http.post(proxy.url, data=b"not json", headers=MCP_HEADERS) as response:
        assert response.status in (400, 415)
    health = await upstream_health(http, proxy.url)
    assert (health["last_success"], health["last_failure"], health["latency"]) == (None, None, {"window": 0})
    # An answer of the upstream's counts: its success and its latency.
    async with http.post(proxy.url, json=INITIALIZE, headers=MCP_HEADERS) as response:
        assert response.status == 200
        await response.read()
    health = await upstream_health(http, proxy.url)
    assert health["last_success"] is not None
    assert health["latency"]["window"] == 1


# How long the upstream stays away in the next test: the fault, not a wait for a condition.
DOWNTIME = 1.5


async def test_connect_retries_before_an_answer_are_not_the_upstreams_latency(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url, connect_retry=30.0)
    await sse_upstream.stop()

    async def initialize() -> int:
        async with http.post(proxy.url, json=INITIALIZE, headers=MCP_HEADERS) as response:
            await response.read()
            return response.status

    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        call = group.create_task(initialize())
        await asyncio.sleep(DOWNTIME)  # the proxy keeps knocking meanwhile
        await sse_upstream.start()
    assert call.result() == 200
    async with http.get(proxy.url.removesuffix("/mcp") + "/metrics") as response:
        metrics = await response.text()
    (total,) = re.findall(r'^mcp_heal_proxy_upstream_latency_seconds_sum\{upstream="default"\} (\S+)$', metrics, re.M)
    (count,) = re.findall(r'^mcp_heal_proxy_upstream_latency_seconds_count\{upstream="default"\} (\S+)$', metrics, re.M)
    assert float(count) == 1
    assert float(total) < DOWNTIME, f"{total} s: the time spent knocking was counted as the upstream's"
