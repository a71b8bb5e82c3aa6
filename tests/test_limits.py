"""Bounded resources: sessions, streams per session, idle sessions forgotten, store failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mcp_heal_proxy.engine.housekeeping import SessionActivity, flush
from mcp_heal_proxy.errors import StoreUnavailable
from mcp_heal_proxy.front.app import PROXIES_KEY, STORE_KEY
from mcp_heal_proxy.store.records import MemorySessionStore, SessionRecord
from tests.conftest import MCP_HEADERS, ProxyFactory, raw_initialize, session_headers, wait_until
from tests.fake_upstream import FakeUpstream

AiohttpServer = Callable[..., Any]


async def call(http: aiohttp.ClientSession, url: str, session_id: str, request_id: int = 1) -> tuple[int, Any]:
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {}}
    async with http.post(url, json=body, headers=session_headers(session_id)) as response:
        return response.status, await response.json()


async def test_beyond_max_sessions_the_least_recently_used_is_forgotten(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = fake
    proxy = await start_proxy(url, max_sessions=3)
    sessions = []
    for _ in range(3):
        sessions.append(await raw_initialize(http, proxy.url))
        await asyncio.sleep(0.01)  # distinct creation times: this test is about their order
    newest = await raw_initialize(http, proxy.url)
    assert await proxy.record(sessions[0]) is None
    assert [await proxy.record(s) is not None for s in (*sessions[1:], newest)] == [True, True, True]
    status, answer = await call(http, proxy.url, sessions[0], 7)
    assert status == 404
    assert answer["id"] == 7


async def test_a_request_over_the_stream_slots_waits_then_gets_an_error_with_its_id(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, max_streams_per_session=2, stream_slot_wait=0.3)
    session_id = await raw_initialize(http, proxy.url)
    held = asyncio.Event()
    release = asyncio.Event()
    waiting = 0

    async def slow(request: web.Request, body: Any) -> web.StreamResponse | None:
        nonlocal waiting
        if body.get("method") != "tools/call":
            return None
        waiting += 1
        if waiting == 2:
            held.set()
        await release.wait()
        return None

    upstream.on_request = slow
    async with asyncio.TaskGroup() as tasks:
        first = tasks.create_task(call(http, proxy.url, session_id, 1))
        second = tasks.create_task(call(http, proxy.url, session_id, 2))
        async with asyncio.timeout(5):
            await held.wait()
        started = time.monotonic()
        status, answer = await call(http, proxy.url, session_id, 3)
        assert time.monotonic() - started >= 0.3, "it waited stream_slot_wait for a slot"
        assert status == 429
        assert answer["id"] == 3
        assert "stream_slot_wait" in answer["error"]["message"]
        assert upstream.count("tools/call") == 2, "the request that waited in vain never reached the upstream"
        other_session = await raw_initialize(http, proxy.url)  # other sessions are not affected
        assert other_session
        release.set()
    assert first.result()[0] == second.result()[0] == 200
    upstream.on_request = None
    assert (await call(http, proxy.url, session_id, 4))[0] == 200


async def test_requests_over_the_stream_slots_wait_their_turn_in_order(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, max_streams_per_session=1)
    session_id = await raw_initialize(http, proxy.url)
    arrived: list[int] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def first_blocks(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        arrived.append(body["id"])
        if body["id"] == 1:
            first_in.set()
            await release.wait()
        return None

    upstream.on_request = first_blocks
    front = proxy.app[PROXIES_KEY]["/mcp"]
    async with asyncio.TaskGroup() as tasks:
        calls = [tasks.create_task(call(http, proxy.url, session_id, 1))]
        async with asyncio.timeout(5):
            await first_in.wait()
        for request_id in (2, 3, 4):
            calls.append(tasks.create_task(call(http, proxy.url, session_id, request_id)))

            async def queued(expected: int = request_id - 1) -> bool:
                return front.slots_waiting(session_id) == expected

            await wait_until(queued, 5, f"request {request_id} waits for a slot")
        release.set()
    assert [task.result()[0] for task in calls] == [200] * 4
    assert arrived == [1, 2, 3, 4]


async def test_idle_sessions_are_forgotten_by_housekeeping(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = fake
    proxy = await start_proxy(url, session_idle_ttl=0.5)
    idle = await raw_initialize(http, proxy.url)
    busy = await raw_initialize(http, proxy.url)
    deadline = time.monotonic() + 10
    while await proxy.record(idle) is not None:
        assert time.monotonic() < deadline, "the idle session was never forgotten"
        assert (await call(http, proxy.url, busy))[0] == 200  # keeps `busy` in use
        await asyncio.sleep(0.05)
    assert await proxy.record(busy) is not None
    assert (await call(http, proxy.url, idle))[0] == 404


async def test_a_failing_store_gives_503_with_a_jsonrpc_error_and_recovers(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    store = proxy.app[STORE_KEY]
    working_create = store.create
    broken = True

    async def create(record: SessionRecord) -> None:
        if broken:
            raise StoreUnavailable("session store failed: disk full")
        await working_create(record)

    monkeypatch.setattr(store, "create", create)
    body = {"jsonrpc": "2.0", "id": 11, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 503
        answer = await response.json()
        assert answer["id"] == 11
        assert answer["error"]["code"] == -32005
        assert "Mcp-Session-Id" not in response.headers
    # The upstream session opened for a client that never got it is ended, not left to its idle timeout.
    assert len(upstream.sessions) == 0
    assert [seen.method for seen in upstream.seen] == ["POST", "DELETE"]
    broken = False
    assert await raw_initialize(http, proxy.url)


async def test_housekeeping_keeps_marks_when_the_store_fails() -> None:
    store = MemorySessionStore()
    await store.create(SessionRecord("c1", "u1", {}, last_used=0.0))
    activity = SessionActivity()
    activity.mark("c1")

    async def failing_touch(last_used: object) -> None:
        raise StoreUnavailable("down")

    store.touch = failing_touch  # type: ignore[method-assign]
    assert await flush(store, activity, idle_ttl=3600) == 0
    assert "c1" in activity.drain(), "the mark is kept for the next round"
