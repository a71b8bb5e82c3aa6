"""Healing edge cases and failures, against a fault-injecting fake upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import (
    MCP_HEADERS,
    ProxyFactory,
    echo_call,
    post_on_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream, answer_404, drop_connection, hang_forever

AiohttpServer = Callable[..., Any]


async def test_expired_session_is_reinitialized_with_handshake_then_replayed(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    status, headers, answer = await post_on_session(http, proxy.url, session_id, echo_call(41))
    assert status == 200
    assert answer["id"] == 41
    assert headers["Mcp-Session-Id"] == session_id
    # (The GET stream the proxy opened at the first notifications/initialized aside.)
    posts = [s for s in upstream.seen if s.method == "POST"]
    methods = [s.body.get("method") if isinstance(s.body, dict) else s.method for s in posts]
    # initialize, initialized, the call that found the session dead, re-initialize, initialized, replay
    assert methods == [
        "initialize",
        "notifications/initialized",
        "tools/call",
        "initialize",
        "notifications/initialized",
        "tools/call",
    ]
    reinitialize = posts[3]
    assert "Mcp-Session-Id" not in reinitialize.headers
    assert reinitialize.body["params"]["clientInfo"]["name"] == "raw-test-client"
    assert posts[4].headers["Mcp-Session-Id"] == posts[5].headers["Mcp-Session-Id"] == "upstream-2"


async def test_heal_is_attempted_once_when_the_upstream_refuses_everything(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    upstream.on_reinitialize = answer_404
    status, headers, answer = await post_on_session(http, proxy.url, session_id, echo_call("abc"))
    assert status == 502
    assert answer["id"] == "abc"
    assert "re-initialize" in answer["error"]["message"]
    assert upstream.initializes == 2
    assert "Mcp-Session-Id" not in headers


async def test_upstream_dying_during_heal_gives_a_jsonrpc_error_with_the_request_id(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    upstream.on_reinitialize = drop_connection
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(9))
    assert status == 502
    assert answer == {"jsonrpc": "2.0", "id": 9, "error": {"code": -32002, "message": answer["error"]["message"]}}
    # It was reached (the connection closed under the re-initialize): said so, in words.
    assert answer["error"]["message"] == (
        "upstream MCP server ended the connection before answering: connection closed by the server"
    )


async def test_upstream_hanging_during_heal_gives_a_timeout_error(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, read_timeout=0.3)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    upstream.on_reinitialize = hang_forever
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(10))
    assert status == 504
    assert answer["id"] == 10


async def test_a_heal_the_upstream_never_answers_fails_after_heal_timeout_not_read_timeout(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, heal_timeout=1.0)  # read_timeout stays at its 300 s
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    upstream.on_reinitialize = hang_forever
    started = time.monotonic()
    with capture_logs() as logs:
        status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(12))
    assert 0.9 <= time.monotonic() - started < 5.0
    assert status == 504
    assert (answer["id"], answer["error"]["code"]) == (12, -32002)
    assert answer["error"]["message"].startswith("the heal timed out")
    (failed,) = [entry for entry in logs if entry["event"] == "session.heal_failed"]
    assert failed["error"].startswith("the heal timed out")
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        metrics = await response.text()
    assert 'mcp_heal_proxy_heals_total{outcome="failed",reason="http_404",upstream="default"} 1.0' in metrics


async def test_a_heal_retrying_a_restarting_upstream_stops_at_heal_timeout(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, heal_timeout=1.0, connect_retry=60.0)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    upstream.on_reinitialize = drop_connection  # retried while connect_retry lasts: heal_timeout ends it
    started = time.monotonic()
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(13))
    assert time.monotonic() - started < 5.0
    assert (status, answer["id"]) == (504, 13)
    assert answer["error"]["message"].startswith("the heal timed out")
    assert upstream.initializes > 2, "the heal did retry before giving up"


async def test_a_heal_cut_short_after_the_initialize_ends_the_upstream_session_it_opened(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, heal_timeout=1.0)
    session_id = await raw_initialize(http, proxy.url)

    async def never_complete_the_handshake(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") == "notifications/initialized" and request.headers.get("Mcp-Session-Id") == "upstream-2":
            return await hang_forever(request, body)
        return None

    upstream.on_request = never_complete_the_handshake
    upstream.forget_all()
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(14))
    assert (status, answer["id"]) == (504, 14)
    await wait_until(lambda: "upstream-2" not in upstream.sessions, 5, "the half-opened upstream session was ended")
    (delete,) = [seen for seen in upstream.seen if seen.method == "DELETE"]
    assert delete.headers["Mcp-Session-Id"] == "upstream-2"
    assert delete.headers["MCP-Protocol-Version"] == "2025-11-25"


async def test_replay_that_fails_again_is_passed_through_without_a_second_heal(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()

    async def calls_always_expire(request: web.Request, body: Any) -> web.StreamResponse | None:
        return await answer_404(request, body) if body.get("method") == "tools/call" else None

    upstream.on_request = calls_always_expire
    status, headers, answer = await post_on_session(http, proxy.url, session_id, echo_call(11))
    assert status == 404
    assert answer["error"]["message"] == "Session not found"
    assert upstream.initializes == 2
    assert headers.get("Mcp-Session-Id") == session_id


async def test_answers_and_cancellations_for_a_dead_session_are_dropped_not_replayed(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    sampling_answer = {"jsonrpc": "2.0", "id": 3, "result": {"role": "assistant"}}
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5}}
    for body in (sampling_answer, cancel):
        status, _, answer = await post_on_session(http, proxy.url, session_id, body)
        assert status == 202
        assert answer is None
    assert upstream.initializes == 1


async def test_method_not_found_404_is_not_mistaken_for_expiry(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def method_not_found(request: web.Request, body: Any) -> web.StreamResponse:
        error = {"jsonrpc": "2.0", "id": body["id"], "error": {"code": -32601, "message": "Method not found"}}
        return web.json_response(error, status=404)

    upstream.on_request = method_not_found
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(12))
    assert status == 404
    assert answer["error"]["code"] == -32601
    assert upstream.initializes == 1


async def test_unknown_client_session_id_gets_404_with_the_request_id(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    status, _, answer = await post_on_session(http, proxy.url, "never-issued", echo_call(13))
    assert status == 404
    assert answer["id"] == 13
    assert answer["error"]["message"] == "Session not found"
    assert upstream.seen == []


async def test_client_sees_its_own_session_id_never_the_upstreams(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    assert not session_id.startswith("upstream-")
    assert upstream.seen[1].headers["Mcp-Session-Id"] == "upstream-1"

    async def leaky_error(request: web.Request, body: Any) -> web.StreamResponse:
        # The Python SDK attaches a fresh session id even to its 400 for a request without one.
        return web.json_response({"error": "bad"}, status=400, headers={"Mcp-Session-Id": "upstream-leak"})

    upstream.on_request = leaky_error
    async with http.post(proxy.url, json=echo_call(1), headers=MCP_HEADERS) as response:
        assert response.status == 400
        assert "Mcp-Session-Id" not in response.headers


async def test_headers_pass_through_except_hop_by_hop_and_host(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    headers = {
        **session_headers(session_id),
        "Authorization": "Bearer upstream-token",
        "Last-Event-ID": "41",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "must not pass",
        "Proxy-Authorization": "Basic must-not-pass",
    }
    async with http.post(proxy.url, json=echo_call(1), headers=headers) as response:
        assert response.status == 200
    seen = upstream.seen[-1].headers
    assert seen["Authorization"] == "Bearer upstream-token"
    assert seen["MCP-Protocol-Version"] == "2025-11-25"
    assert seen["Last-Event-ID"] == "41"
    assert seen["Accept"] == "application/json, text/event-stream"
    assert seen["Host"] == url.split("/")[2]
    assert "X-Hop" not in seen
    assert "Proxy-Authorization" not in seen


async def test_delete_ends_the_upstream_session_and_forgets_the_mapping(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    async with http.delete(proxy.url, headers=session_headers(session_id)) as response:
        assert response.status == 200
    assert upstream.seen[-1].method == "DELETE"
    assert upstream.seen[-1].headers["Mcp-Session-Id"] == "upstream-1"
    assert upstream.sessions == set()
    assert await proxy.record(session_id) is None
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(2))
    assert status == 404
    assert answer["error"]["message"] == "Session not found"


async def test_delete_of_an_already_expired_upstream_session_succeeds(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    async with http.delete(proxy.url, headers=session_headers(session_id)) as response:
        assert response.status == 200
    assert await proxy.record(session_id) is None


async def test_get_stream_on_an_expired_session_heals_and_drops_the_stale_event_id(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    headers = {**session_headers(session_id), "Accept": "text/event-stream", "Last-Event-ID": "7"}
    async with http.get(proxy.url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Mcp-Session-Id"] == session_id
        line = await response.content.readline()
        assert line == b"id: 1\n"
    # The first is the stream opened at notifications/initialized, which a resume does not take.
    early, *get_requests = [seen for seen in upstream.seen if seen.method == "GET"]
    assert "Last-Event-ID" not in early.headers
    assert get_requests[0].headers["Last-Event-ID"] == "7"
    assert "Last-Event-ID" not in get_requests[1].headers
    assert get_requests[1].headers["Mcp-Session-Id"] == "upstream-2"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_get_and_delete_without_a_session_are_refused(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, method: str
) -> None:
    _, url = fake
    proxy = await start_proxy(url)
    async with http.request(method, proxy.url, headers=MCP_HEADERS) as response:
        assert response.status == 400
        answer = await response.json()
        assert answer["error"]["code"] == -32600


async def test_unreachable_upstream_gives_502_with_the_request_id(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    from tests.conftest import free_port

    proxy = await start_proxy(f"http://127.0.0.1:{free_port()}/mcp", connect_retry=0.3)
    body = {"jsonrpc": "2.0", "id": 77, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 502
        answer = await response.json()
        assert answer["id"] == 77
        assert answer["error"]["code"] == -32002
        # What happened, in words (not ClientConnectorError or ConnectFailed).
        assert answer["error"]["message"] == (
            "cannot reach the upstream MCP server: connection refused: nothing listens at that address"
        )


async def test_slow_upstream_gives_504_with_the_request_id(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, read_timeout=0.3)
    session_id = await raw_initialize(http, proxy.url)
    upstream.on_request = hang_forever
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(78))
    assert status == 504
    assert answer["id"] == 78


async def test_upstream_dying_mid_sse_answer_ends_the_stream_with_an_error_and_no_replay(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def progress_then_crash(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
        await response.write(f'data: {json.dumps(progress)}\n\ndata: {{"jsonrpc": "2.0", "meth'.encode())
        assert request.transport is not None
        request.transport.abort()  # the upstream process dies mid-event
        return response

    upstream.on_request = progress_then_crash
    async with http.post(proxy.url, json=echo_call(31), headers=session_headers(session_id)) as response:
        assert response.status == 200
        text = await response.text()
    events = [block for block in text.split("\n\n") if block.startswith("data: ")]
    assert json.loads(events[0][6:])["method"] == "notifications/progress"
    error = json.loads(events[-1][6:])
    assert error["id"] == 31
    assert "not replayed" in error["error"]["message"]
    assert upstream.count("tools/call") == 1


async def test_an_sse_answer_that_completes_gets_no_extra_error(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def answer_then_crash(request: web.Request, body: Any) -> web.StreamResponse | None:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        answer = {"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}}
        await response.write(f"id: e1\ndata: {json.dumps(answer)}\n\n".encode())
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.on_request = answer_then_crash
    async with http.post(proxy.url, json=echo_call(32), headers=session_headers(session_id)) as response:
        text = await response.text()
    assert text.count("data: ") == 1
    assert '"result"' in text


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 15\r\n\r\n<html>hi</html>", 502),
        (b"this is not HTTP at all\r\n\r\n", 502),
        (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"jsonrpc"', 502),
    ],
    ids=["html-page", "not-http", "truncated-json"],
)
async def test_garbage_from_the_upstream_becomes_a_jsonrpc_error(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession, reply: bytes, status: int
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        proxy = await start_proxy(f"http://127.0.0.1:{port}/mcp", connect_retry=0)
        body = {"jsonrpc": "2.0", "id": 99, "method": "initialize", "params": {}}
        async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
            assert response.status == status
            answer_body = await response.json()
        assert answer_body["id"] == 99
        assert answer_body["error"]["code"] == -32002
