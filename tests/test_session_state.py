"""Session state and sessions in use, against the official SDK server: state changes in flight together
all survive a heal; sessions in use are never forgotten; requests over a session's stream slots wait
their turn instead of being refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from mcp_heal_proxy.front.app import PROXIES_KEY
from tests.conftest import (
    ProxyFactory,
    RunningProxy,
    UpstreamProcess,
    echo_call,
    raw_initialize,
    session_headers,
    wait_until,
)


def request(request_id: int, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def call(http: aiohttp.ClientSession, url: str, session_id: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST one request on a session: the status and its JSON-RPC answer (from a JSON or an SSE answer)."""
    async with http.post(url, data=json.dumps(body), headers=session_headers(session_id)) as response:
        raw = (await response.read()).decode()
        if response.content_type != "text/event-stream":
            return response.status, json.loads(raw) if raw else None
    for line in raw.splitlines():
        if line.startswith("data:") and line[5:].strip():
            message = json.loads(line[5:])
            if message.get("id") == body["id"]:
                return response.status, message
    return response.status, None


async def test_concurrent_state_changes_all_survive_a_heal(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    session_id = await raw_initialize(http, proxy.url)
    # In flight together (the server takes a moment to answer a subscribe), as clients subscribe at start.
    answers = await asyncio.gather(
        call(http, proxy.url, session_id, request(1, "resources/subscribe", uri="file:///a")),
        call(http, proxy.url, session_id, request(2, "resources/subscribe", uri="file:///b")),
        call(http, proxy.url, session_id, request(3, "logging/setLevel", level="debug")),
    )
    assert [(status, "result" in answer) for status, answer in answers] == [(200, True)] * 3, answers
    await sse_upstream.restart()  # every upstream session dies
    status, answer = await call(http, proxy.url, session_id, echo_call(4, "after"))
    assert status == 200
    assert answer["result"]["content"][0]["text"] == "after"
    stats = await sse_upstream.stats()
    [live] = stats["live_sessions"]
    given = stats["state"][live]
    assert sorted(given["subscriptions"]) == ["file:///a", "file:///b"]
    assert given["level"] == "debug"


async def test_refused_state_changes_are_not_remembered(
    upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(upstream.url)
    session_id = await raw_initialize(http, proxy.url)
    changes = [
        (request(1, "resources/subscribe", uri="file:///a"), "result"),
        (request(2, "resources/subscribe", uri="file:///refused"), "error"),  # the server refuses it
        (request(3, "logging/setLevel", level="debug"), "result"),
        (request(4, "logging/setLevel", level="verbose"), "error"),  # not a level: refused
    ]
    for change, outcome in changes:
        status, answer = await call(http, proxy.url, session_id, change)
        assert (status, outcome in answer) == (200, True), answer
    record = await proxy.record(session_id)
    assert record is not None
    assert (record.subscriptions, record.log_level) == (frozenset({"file:///a"}), "debug")
    await upstream.restart()
    status, answer = await call(http, proxy.url, session_id, echo_call(5, "after"))
    assert (status, answer["result"]["content"][0]["text"]) == (200, "after")
    stats = await upstream.stats()
    [live] = stats["live_sessions"]
    assert stats["state"][live] == {"subscriptions": ["file:///a"], "level": "debug"}


# --- sessions in use ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_stream(http: aiohttp.ClientSession, url: str, session_id: str) -> AsyncIterator[None]:
    """The session's GET stream, open (its headers arrived) until the block ends."""
    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
        assert response.status == 200
        yield


def gated_call(request_id: int) -> dict[str, Any]:
    """A tools/call that runs until the test releases its one step (tests/upstream_server.py)."""
    return request(request_id, "tools/call", name="gated_steps", arguments={"steps": 1})


async def evicted_in_use(http: aiohttp.ClientSession, proxy: RunningProxy) -> float:
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        text = await response.text()
    prefix = 'mcp_heal_proxy_sessions_evicted_in_use_total{upstream="default"} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


async def test_sessions_in_use_are_never_idle_expired(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url, session_idle_ttl=0.5)
    listening = await raw_initialize(http, proxy.url)
    calling = await raw_initialize(http, proxy.url)
    async with open_stream(http, proxy.url, listening), asyncio.TaskGroup() as tasks:
        running = tasks.create_task(call(http, proxy.url, calling, gated_call(1)))
        idle = await raw_initialize(http, proxy.url)  # used last of the three

        async def idle_forgotten() -> bool:
            return await proxy.record(idle) is None

        # The idle session goes first only by its use: the other two were last marked before it.
        await wait_until(idle_forgotten, 10, "the idle session was forgotten")
        assert await proxy.record(listening) is not None, "a session with an open GET stream was forgotten"
        assert await proxy.record(calling) is not None, "a session with a call running was forgotten"
        await sse_upstream.release(1)
        status, answer = await running
        assert status == 200
        assert answer["result"]["content"][0]["text"] == "done after 1 steps"
        assert (await call(http, proxy.url, listening, echo_call(2)))[0] == 200
    assert len(await sse_upstream.live_sessions()) == 2, "only the idle session was ended upstream"


async def test_max_sessions_evicts_a_session_in_use_only_when_every_session_is(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url, max_sessions=2)
    listening = await raw_initialize(http, proxy.url)
    async with open_stream(http, proxy.url, listening):
        idle = await raw_initialize(http, proxy.url)  # newer, but not in use
        third = await raw_initialize(http, proxy.url)
        assert await proxy.record(idle) is None, "the session not in use is evicted first"
        assert await proxy.record(listening) is not None
        assert await evicted_in_use(http, proxy) == 0
        async with open_stream(http, proxy.url, third):
            with capture_logs() as logs:
                await raw_initialize(http, proxy.url)
            assert await proxy.record(listening) is None, "every session in use: the least recently used goes"
            assert await proxy.record(third) is not None
            assert await evicted_in_use(http, proxy) == 1
            assert [entry["count"] for entry in logs if entry["event"] == "session.evicted_in_use"] == [1]


# --- more requests than stream slots ----------------------------------------------------------------


async def test_more_concurrent_calls_than_stream_slots_all_succeed_and_heal_once(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)  # max_streams_per_session: 32
    session_id = await raw_initialize(http, proxy.url)
    calls = 50
    front = proxy.app[PROXIES_KEY]["/mcp"]

    async def over_the_slots_wait() -> bool:
        return front.slots_waiting(session_id) == calls - 32

    for round_ in ("live session", "expired session"):
        if round_ == "expired session":
            await sse_upstream.restart()  # every upstream session dies; the gates close again
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(call(http, proxy.url, session_id, gated_call(n))) for n in range(calls)]
            # All 50 at once: 32 blocked in the tool, 18 waiting for a slot (none refused).
            await wait_until(over_the_slots_wait, 15, "18 calls wait for a slot")
            await sse_upstream.release(1)
        answers = [task.result() for task in running]
        assert [status for status, _ in answers] == [200] * calls, round_
        assert all(answer["result"]["content"][0]["text"] == "done after 1 steps" for _, answer in answers)
    stats = await sse_upstream.stats()
    assert stats["initialize"] == 1, "the restarted upstream was re-initialized once for all 50 calls"
