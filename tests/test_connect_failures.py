"""Connect failures are classified once, whichever upstream client: a refused connection and a connect
that times out (an unreachable host) are both retried within connect_retry (nothing was sent), then
answered alike by both clients (502 refused, 504 timed out); only a full pool is 503."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.conftest import MCP_HEADERS, ProxyFactory, free_port


@pytest.fixture(params=["lean", "aiohttp"])
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def unreachable() -> Iterator[int]:
    """A port whose connects time out, as an unreachable host's do: a listener that never accepts, its
    backlog full, so the kernel drops further connection attempts unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        with pytest.raises(TimeoutError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def initialize(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object], float]:
    body = {"jsonrpc": "2.0", "id": 3, "method": "initialize", "params": {}}
    started = time.monotonic()
    async with http.post(url, json=body, headers=MCP_HEADERS) as response:
        return response.status, await response.json(), time.monotonic() - started


async def test_a_connect_that_times_out_is_retried_within_connect_retry_then_504(
    unreachable: int, start_proxy: ProxyFactory, http: aiohttp.ClientSession, client: str
) -> None:
    proxy = await start_proxy(
        f"http://127.0.0.1:{unreachable}/mcp", client=client, connect_timeout=0.2, connect_retry=1.0
    )
    status, answer, took = await initialize(http, proxy.url)
    assert (status, answer["id"]) == (504, 3)
    assert answer["error"] == {
        "code": -32002,
        "message": "cannot reach the upstream MCP server: no connection within connect_timeout (0.2 s)",
    }
    # Before: one attempt, answered at once after connect_timeout (504 from one client, 503 from the other).
    assert 2 * 0.2 < took < 5.0, "connect attempts were retried within connect_retry, and no longer"


async def test_a_refused_connection_is_answered_alike_by_both_clients(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession, client: str
) -> None:
    proxy = await start_proxy(f"http://127.0.0.1:{free_port()}/mcp", client=client, connect_retry=0.3)
    status, answer, _ = await initialize(http, proxy.url)
    assert (status, answer["id"]) == (502, 3)
    assert answer["error"] == {
        "code": -32002,
        "message": "cannot reach the upstream MCP server: connection refused: nothing listens at that address",
    }
