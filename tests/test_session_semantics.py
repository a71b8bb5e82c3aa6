"""Full session semantics across a heal: replay policy, re-applied state, protocol versions, batches,
stateless requests, GET streams that stay open, keep-alives. Against the fault-injecting fake upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import (
    MCP_HEADERS,
    ProxyFactory,
    RunningProxy,
    echo_call,
    post_on_session,
    raw_initialize,
    session_headers,
)
from tests.fake_upstream import FakeUpstream, not_found

AiohttpServer = Callable[..., Any]


def request(request_id: int, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def post(http: aiohttp.ClientSession, proxy: RunningProxy, session_id: str, body: object) -> tuple[int, Any]:
    async with http.post(proxy.url, data=json.dumps(body), headers=session_headers(session_id)) as response:
        raw = await response.read()
        if response.content_type != "application/json":
            return response.status, raw
        return response.status, json.loads(raw) if raw else None


def methods_seen(upstream: FakeUpstream) -> list[str]:
    return [
        seen.body.get("method", "response") if isinstance(seen.body, dict) else ("batch" if seen.body else seen.method)
        for seen in upstream.seen
    ]


async def test_replay_none_heals_but_answers_with_an_error_naming_the_expiry(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, replay="none")
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    status, answer = await post(http, proxy, session_id, request(21, "tools/call", name="echo"))
    assert status == 200
    assert answer["id"] == 21
    assert "expired" in answer["error"]["message"]
    assert methods_seen(upstream)[-2:] == ["initialize", "notifications/initialized"]
    # The next request runs on the new session, with no second heal.
    status, answer = await post(http, proxy, session_id, request(22, "tools/call", name="echo"))
    assert status == 200
    assert answer["result"]
    assert upstream.initializes == 2


async def test_replay_list_replays_only_the_listed_methods(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, replay=("tools/list",))
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    status, answer = await post(http, proxy, session_id, request(1, "tools/list"))
    assert status == 200
    assert "result" in answer
    upstream.forget_all()
    status, answer = await post(http, proxy, session_id, request(2, "tools/call", name="echo"))
    assert "error" in answer
    assert upstream.count("tools/call") == 1  # the one that found the session dead, never replayed


async def test_subscriptions_and_log_level_are_reapplied_before_the_replay(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    for body in (
        request(1, "resources/subscribe", uri="file:///kept"),
        request(2, "resources/subscribe", uri="file:///dropped"),
        request(3, "resources/unsubscribe", uri="file:///dropped"),
        request(4, "logging/setLevel", level="debug"),
    ):
        status, _ = await post(http, proxy, session_id, body)
        assert status == 200
    upstream.forget_all()
    seen_before = len(upstream.seen)
    status, answer = await post(http, proxy, session_id, request(5, "tools/call", name="echo"))
    assert status == 200
    assert answer["id"] == 5
    after = upstream.seen[seen_before:]
    assert [s.body["method"] for s in after] == [
        "tools/call",
        "initialize",
        "notifications/initialized",
        "resources/subscribe",
        "logging/setLevel",
        "tools/call",
    ]
    assert after[3].body["params"] == {"uri": "file:///kept"}
    assert after[4].body["params"] == {"level": "debug"}
    assert after[3].headers["Mcp-Session-Id"] == after[5].headers["Mcp-Session-Id"] == "upstream-2"


async def test_a_heal_that_negotiates_another_version_rewrites_the_version_header(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.reinitialize_version = "2025-06-18"
    upstream.forget_all()
    status, _ = await post(http, proxy, session_id, request(1, "tools/call", name="echo"))
    assert status == 200
    replay = upstream.seen[-1]
    assert replay.body["method"] == "tools/call"
    assert replay.headers["MCP-Protocol-Version"] == "2025-06-18"
    record = await proxy.record(session_id)
    assert record is not None
    assert record.protocol_version == "2025-11-25"


@pytest.mark.parametrize(("heal_on", "healed"), [((404, 400), False), ((404, 401), True)])
async def test_401_session_not_found_heals_only_when_configured(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    heal_on: tuple[int, ...],
    healed: bool,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, heal_on=heal_on)
    session_id = await raw_initialize(http, proxy.url)

    async def unauthorized_once(request: web.Request, body: Any) -> web.StreamResponse | None:
        if request.headers.get("Mcp-Session-Id") == "upstream-1":
            return web.Response(status=401, text="Session not found")
        return None

    upstream.on_request = unauthorized_once
    status, _ = await post(http, proxy, session_id, request(1, "tools/call", name="echo"))
    assert (status, upstream.initializes) == ((200, 2) if healed else (401, 1))


async def test_a_batch_on_a_dead_session_is_healed_and_replayed_as_one_unit(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()

    async def batch_answers(request: web.Request, body: Any) -> web.StreamResponse | None:
        if isinstance(body, list):
            if request.headers.get("Mcp-Session-Id") not in upstream.sessions:
                return not_found()
            return web.json_response([{"jsonrpc": "2.0", "id": m["id"], "result": {}} for m in body])
        return None

    upstream.on_request = batch_answers
    status, answer = await post(http, proxy, session_id, [request(1, "tools/list"), request(2, "prompts/list")])
    assert status == 200
    assert [item["id"] for item in answer] == [1, 2]
    assert upstream.initializes == 2
    assert sum(1 for seen in upstream.seen if isinstance(seen.body, list)) == 2


async def test_stateless_requests_pass_straight_through(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)

    async def stateless(request: web.Request, body: Any) -> web.StreamResponse | None:
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"stateless": True}})

    upstream.on_request = stateless
    headers = {**MCP_HEADERS, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}
    async with http.post(proxy.url, json=request(1, "tools/list"), headers=headers) as response:
        assert response.status == 200
        assert (await response.json())["result"] == {"stateless": True}
        assert "Mcp-Session-Id" not in response.headers
    seen = upstream.seen[-1]
    assert "Mcp-Session-Id" not in seen.headers
    assert seen.headers["Mcp-Method"] == "tools/list"
    assert upstream.initializes == 0


async def test_idle_sse_streams_get_keepalive_comments(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, keepalive_interval=0.05)

    async def one_event_then_silence(request: web.Request, body: Any) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'id: 1\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n')
        await asyncio.Event().wait()
        return response

    # Set before notifications/initialized: the proxy opens the GET stream upstream then.
    upstream.on_get = one_event_then_silence
    session_id = await raw_initialize(http, proxy.url)
    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    async with http.get(proxy.url, headers=headers) as response:
        assert response.status == 200
        async with asyncio.timeout(5):
            assert await response.content.readline() == b"id: 1\n"
            assert (
                await response.content.readline()
                == b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n'
            )
            assert await response.content.readline() == b"\n"
            # The upstream stays silent: the proxy fills the silence between events.
            assert await response.content.readline() == b": keep-alive\n"


async def test_a_get_stream_stays_open_across_an_upstream_restart(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    streams = 0

    async def one_event_then_restart(request: web.Request, body: Any) -> web.StreamResponse:
        nonlocal streams
        streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"id: {streams}\ndata: {{}}\n\n".encode())
        if streams == 1:
            upstream.forget_all()  # the upstream restarts: its stream ends and its sessions are gone
            return response
        await asyncio.Event().wait()  # the new stream stays open until the client leaves
        return response

    upstream.on_get = one_event_then_restart
    headers = {**session_headers(session_id), "Accept": "text/event-stream", "Last-Event-ID": "0"}
    async with http.get(proxy.url, headers=headers) as response:
        async with asyncio.timeout(10):
            assert await response.content.readline() == b"id: 1\n"
            await response.content.readline()
            await response.content.readline()
            assert await response.content.readline() == b"id: 2\n"
    early, *gets = [seen for seen in upstream.seen if seen.method == "GET"]
    # The stream opened at notifications/initialized is not the one a resume (Last-Event-ID) asks for.
    assert early.headers["Mcp-Session-Id"] == "upstream-1"
    assert "Last-Event-ID" not in early.headers
    # the first stream, the reattach that finds the session dead, the reattach after the heal
    assert [g.headers["Mcp-Session-Id"] for g in gets] == ["upstream-1", "upstream-1", "upstream-2"]
    # On the same upstream session the reattach resumes after the last event relayed; after the heal
    # the stream starts fresh (event ids of a dead session mean nothing on the new one).
    assert [g.headers.get("Last-Event-ID") for g in gets] == ["0", "1", None]
    assert upstream.initializes == 2


async def test_a_server_request_sent_before_the_clients_get_arrives_still_reaches_it(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A server that asks the client something on the GET stream at the start of a tool call, and drops
    the request while no GET stream is open (the TypeScript SDK's transport does): a client whose GET
    reaches the proxy after its first call (it sends both at once) still gets the request, because the
    proxy opened the stream upstream at notifications/initialized."""
    upstream, url = fake
    proxy = await start_proxy(url)
    streams: list[web.StreamResponse] = []
    dropped: list[Any] = []
    ask = b'data: {"jsonrpc":"2.0","id":"s1","method":"elicitation/create","params":{}}\n\n'

    async def open_stream(request: web.Request, body: Any) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        streams.append(response)
        await asyncio.Event().wait()  # open until the proxy closes it
        return response

    async def call_asks_first(request: web.Request, body: Any) -> web.StreamResponse | None:
        if isinstance(body, dict) and body.get("method") == "tools/call":
            if streams:
                await streams[-1].write(ask)
            else:
                dropped.append(body)
        return None  # then the normal answer

    upstream.on_get = open_stream
    upstream.on_request = call_asks_first
    session_id = await raw_initialize(http, proxy.url)
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(5))
    assert status == 200
    assert answer["id"] == 5
    assert not dropped, "the call reached the server before any GET stream was open"
    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    async with http.get(proxy.url, headers=headers) as response:
        assert response.status == 200
        async with asyncio.timeout(5):
            assert await response.content.readline() == ask.split(b"\n")[0] + b"\n"
    assert len(streams) == 1, "the client's GET took the stream opened at notifications/initialized"


@pytest.mark.parametrize("status", [405, 409])
async def test_a_get_stream_the_upstream_refuses_is_refused_to_the_client_too(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, status: int
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)

    async def refuse(request: web.Request, body: Any) -> web.StreamResponse:
        return web.Response(status=status, text="no GET stream here")

    # Refused from the start: the stream the proxy opens at notifications/initialized too.
    upstream.on_get = refuse
    session_id = await raw_initialize(http, proxy.url)
    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    async with http.get(proxy.url, headers=headers) as response:
        assert response.status == status
        assert response.headers["Mcp-Session-Id"] == session_id
    assert upstream.initializes == 1, "a refused GET stream is not mistaken for an expired session"
