"""Reliability under adversarial traffic: pool starvation, reattach storms, resumes, codings, odd header
bytes, huge events, redirects, and writes that race heals and DELETEs. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.shared.exceptions import MCPError
from yarl import URL

from mcp_heal_proxy.config import single_upstream
from mcp_heal_proxy.engine.housekeeping import SessionActivity, run_housekeeping
from mcp_heal_proxy.front.app import build_app
from mcp_heal_proxy.store.records import MemorySessionStore, SessionRecord
from mcp_heal_proxy.wire import sse as sse_module
from mcp_heal_proxy.wire.sse import Event, SSEParser
from tests.conftest import (
    MCP_HEADERS,
    ProxyFactory,
    UpstreamProcess,
    echo_call,
    free_port,
    mcp_session,
    post_on_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream, hang_forever

AiohttpServer = Callable[..., Any]


# --- 1. long-lived streams never starve requests ---------------------------------------------------------


async def test_twice_pool_size_open_get_streams_do_not_starve_a_new_client(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url, pool_size=4, connect_timeout=5.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        streams: list[aiohttp.ClientResponse] = []
        try:
            async with asyncio.timeout(20):
                for _ in range(8):  # 2x pool_size connected clients, each holding its GET stream
                    session_id = await raw_initialize(http, proxy.url)
                    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
                    stream = await http.get(proxy.url, headers=headers)
                    assert stream.status == 200
                    streams.append(stream)
            async with asyncio.timeout(10), mcp_session(proxy.url) as client:
                result = await client.call_tool("echo", {"text": "served"})
                assert result.content[0].text == "served"  # type: ignore[union-attr]
        finally:
            for stream in streams:
                stream.close()


async def test_a_request_that_gets_no_connection_gets_an_error_with_its_id_in_bounded_time(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, pool_size=1, connect_timeout=0.5)
    session_id = await raw_initialize(http, proxy.url)
    upstream.on_request = hang_forever  # the one pooled connection stays busy
    stuck = asyncio.ensure_future(post_on_session(http, proxy.url, session_id, echo_call(1)))  # noqa: TID251 (cancelled below)
    try:
        await wait_until(lambda: upstream.count("tools/call") == 1, 5, "first call reached the upstream")
        started = time.monotonic()
        status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call("second"))
        assert time.monotonic() - started < 3
        assert status == 503
        assert answer["id"] == "second"
        assert "no connection to the upstream" in answer["error"]["message"]
    finally:
        stuck.cancel()


# --- 2. a GET stream the upstream ends at once is not reattached in a tight loop --------------------------


@pytest.mark.parametrize(("retry_ms", "most"), [(None, 6), (1500, 3)])
async def test_streams_ended_at_once_are_reattached_with_backoff_and_the_servers_retry(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    retry_ms: int | None,
    most: int,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def end_at_once(request: web.Request, body: Any) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if retry_ms is not None:
            await response.write(f"id: p\nretry: {retry_ms}\ndata: \n\n".encode())
        return response

    upstream.on_get = end_at_once
    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    async with http.get(proxy.url, headers=headers) as stream:
        assert stream.status == 200
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3):  # one idle client, three seconds
                await stream.content.read()
    gets = [seen for seen in upstream.seen if seen.method == "GET"]
    assert 1 < len(gets) <= most, f"{len(gets)} upstream GETs in 3 s"


# --- 3. a resume for a dead upstream session ends promptly ----------------------------------------------


@pytest.fixture
async def resumable_upstream() -> AsyncIterator[UpstreamProcess]:
    """The SDK server with an event store: its SSE answers carry event ids, and clients resume them."""
    server = UpstreamProcess(json_response=False, resumable=True)
    await server.start()
    yield server
    await server.stop()


async def test_a_call_whose_upstream_dies_mid_answer_fails_promptly_and_the_session_goes_on(
    resumable_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(resumable_upstream.url)
    first_progress = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        first_progress.set()

    async with mcp_session(proxy.url) as client:
        pending = asyncio.ensure_future(  # noqa: TID251 (awaited below)
            client.call_tool("gated_steps", {"steps": 2}, read_timeout_seconds=30, progress_callback=on_progress)
        )
        async with asyncio.timeout(10):
            await first_progress.wait()  # a numbered event went by: the answer stream is resumable
        await resumable_upstream.restart()  # then the upstream dies, its event store with it
        started = time.monotonic()
        async with asyncio.timeout(15):
            result_or_error: object
            try:
                result_or_error = await pending
            except MCPError as exc:
                result_or_error = exc
        assert time.monotonic() - started < 10, "the call waited for the client's own timeout"
        assert isinstance(result_or_error, MCPError) or getattr(result_or_error, "isError", False)
        # The resume never took the session's GET stream: the session goes on, healed.
        async with asyncio.timeout(15):
            result = await client.call_tool("echo", {"text": "after"})
        assert result.content[0].text == "after"  # type: ignore[union-attr]


async def test_a_resume_the_upstream_cannot_honour_is_answered_with_errors_not_a_fresh_stream(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def numbered_then_cut(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'id: e1\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n')
        upstream.forget_all()  # the upstream restarts between events: its stream ends, its sessions die
        return response

    upstream.on_request = numbered_then_cut
    async with http.post(proxy.url, data=json.dumps(echo_call(7)), headers=session_headers(session_id)) as answer:
        assert b"id: e1" in await answer.read()
    upstream.on_request = None
    headers = {**session_headers(session_id), "Accept": "text/event-stream", "Last-Event-ID": "e1"}
    async with asyncio.timeout(5), http.get(proxy.url, headers=headers) as resumed:
        assert resumed.status == 200
        events = SSEParser().feed(await resumed.read())
    errors = [json.loads(item.data) for item in events if isinstance(item, Event)]
    assert [error["id"] for error in errors] == [7]
    assert "lost the stream" in errors[0]["error"]["message"]
    # The first GET is the stream the proxy opened at notifications/initialized, before the call.
    early, *gets = [seen for seen in upstream.seen if seen.method == "GET"]
    assert "Last-Event-ID" not in early.headers
    assert [get.headers.get("Last-Event-ID") for get in gets] == ["e1"], "never a fresh stream without the id"


# --- 4. compressed answers keep their coding --------------------------------------------------------------


async def test_a_gzipped_answer_reaches_the_client_with_its_coding_and_the_proxy_asks_for_identity(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def gzip_anyway(request: web.Request, body: Any) -> web.StreamResponse | None:
        payload = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": {"zipped": True}}).encode()
        return web.Response(
            body=gzip.compress(payload), headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    upstream.on_request = gzip_anyway
    status, _, answer = await post_on_session(
        http, proxy.url, session_id, echo_call(3)
    )  # aiohttp decodes what is declared
    assert status == 200
    assert answer == {"jsonrpc": "2.0", "id": 3, "result": {"zipped": True}}
    assert upstream.seen[-1].headers["Accept-Encoding"] == "identity"


async def test_a_gzipped_expiry_answer_is_read_and_healed(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def gzipped_400_once(request: web.Request, body: Any) -> web.StreamResponse | None:
        if request.headers.get("Mcp-Session-Id") != "upstream-1":
            return None
        text = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"Bad Request: No valid session ID"}}'
        return web.Response(
            status=400,
            body=gzip.compress(text),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    upstream.on_request = gzipped_400_once
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(4))
    assert status == 200
    assert answer["id"] == 4
    assert upstream.initializes == 2


# --- 5. a header byte that is not UTF-8 -----------------------------------------------------------------


async def raw_request(url: str, method: str, headers: dict[str, bytes], body: bytes = b"") -> tuple[int, bytes]:
    """An HTTP/1.1 request with header bytes as given (latin-1, as Node's fetch sends them)."""
    parts = URL(url)
    reader, writer = await asyncio.open_connection(parts.host, parts.port)
    try:
        lines = [f"{method} {parts.path} HTTP/1.1".encode(), f"Host: {parts.host}:{parts.port}".encode()]
        lines += [name.encode() + b": " + value for name, value in headers.items()]
        lines += [f"Content-Length: {len(body)}".encode(), b"Connection: close", b"", b""]
        writer.write(b"\r\n".join(lines) + body)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            # A GET stream stays open: its status is what this test wants.
            rest = b"" if method == "GET" else await reader.read()
    finally:
        writer.close()
    return int(head.split(b" ")[1]), rest


async def test_a_latin1_header_byte_travels_on_post_get_and_delete(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    headers = {k: v.encode() for k, v in session_headers(session_id).items()} | {"X-Client-Title": b"caf\xe9"}
    status, body = await raw_request(proxy.url, "POST", headers, json.dumps(echo_call(5)).encode())
    assert status == 200, body
    upstream.on_get = None
    # With an event id, the GET goes upstream itself (not the stream opened at notifications/initialized).
    status, _ = await raw_request(proxy.url, "GET", headers | {"Accept": b"text/event-stream", "Last-Event-ID": b"0"})
    assert status == 200
    status, _ = await raw_request(proxy.url, "DELETE", headers)
    assert status == 200
    assert upstream.sessions == set(), "the DELETE ended the upstream session"
    seen = [s.headers.get("X-Client-Title") for s in upstream.seen if s.method in ("POST", "GET", "DELETE")][-3:]
    assert len(seen) == 3
    assert all(value is not None for value in seen)


async def test_a_delete_the_upstream_cannot_take_is_reported_promptly_not_as_done(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = FakeUpstream()
    server: TestServer = await aiohttp_server(upstream.app())
    proxy = await start_proxy(str(server.make_url("/mcp")), connect_retry=5.0)
    session_id = await raw_initialize(http, proxy.url)
    await server.close()  # the upstream is down while the client exits
    started = time.monotonic()
    async with http.delete(proxy.url, headers=session_headers(session_id)) as response:
        answer = await response.json()
        assert response.status == 502
    assert time.monotonic() - started < 2, "a client's DELETE on its way out waited out connect_retry"
    assert "could not end it upstream" in answer["error"]["message"]


# --- 6. SSE parsing is linear in its input ---------------------------------------------------------------


class _CountingPattern:
    """Wraps the parser's line-end regex and counts the characters it is asked to scan."""

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern
        self.scanned = 0

    def finditer(self, text: str) -> Any:
        self.scanned += len(text)
        return self.pattern.finditer(text)


def test_one_huge_event_split_in_many_chunks_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingPattern(sse_module._LINE_END)
    monkeypatch.setattr(sse_module, "_LINE_END", counting)
    payload = b"data: " + b"x" * (4 * 1024 * 1024) + b"\n\n"
    parser = SSEParser()
    events: list[Any] = []
    for start in range(0, len(payload), 16 * 1024):
        events += parser.feed(payload[start : start + 16 * 1024])
    assert len(events) == 1
    assert len(events[0].data) == 4 * 1024 * 1024
    assert counting.scanned <= len(payload) + 16, f"scanned {counting.scanned} characters for {len(payload)}"


def test_a_carriage_return_inside_a_chunk_does_not_swallow_the_next_chunks_line_feed() -> None:
    parser = SSEParser()
    out = parser.feed(b"data: x\rdata: y") + parser.feed(b"\n\n")
    assert out == [Event(data="x\ny")]


# --- 7. upstream redirects never reach the client -------------------------------------------------------


async def test_a_same_origin_redirect_of_the_upstream_url_is_followed(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory
) -> None:
    upstream = FakeUpstream()
    app = upstream.app()

    async def slash(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/mcp")

    app.router.add_route("*", "/mcp/", slash)
    server: TestServer = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp/")))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        session_id = await raw_initialize(http, proxy.url)
        async with http.post(
            proxy.url, data=json.dumps(echo_call(8)), headers=session_headers(session_id), allow_redirects=False
        ) as response:
            assert response.status == 200
            assert "Location" not in response.headers
            assert (await response.json())["id"] == 8


async def test_a_redirect_to_another_origin_is_an_error_without_the_location(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    async def elsewhere(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("http://other.invalid/mcp")

    app = web.Application()
    app.router.add_route("*", "/mcp", elsewhere)
    server: TestServer = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")))
    body = {"jsonrpc": "2.0", "id": 9, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS, allow_redirects=False) as response:
        answer = await response.json()
        assert response.status == 502
        assert "Location" not in response.headers
    assert answer["id"] == 9
    assert "other.invalid" not in json.dumps(answer)


# --- 8 and 9. writes that race a heal --------------------------------------------------------------------


@pytest.mark.parametrize("state", ["memory", "sqlite"])
async def test_a_delete_during_a_heal_stays_deleted_and_the_new_upstream_session_is_ended(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Any,
    state: str,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, state=":memory:" if state == "memory" else str(tmp_path / "s.db"))
    session_id = await raw_initialize(http, proxy.url)
    gate = asyncio.Event()

    async def slow_reinitialize(request: web.Request, body: Any) -> web.StreamResponse | None:
        await gate.wait()
        return None

    upstream.on_reinitialize = slow_reinitialize
    upstream.forget_all()
    healing = asyncio.ensure_future(post_on_session(http, proxy.url, session_id, echo_call(10)))  # noqa: TID251 (awaited)
    await wait_until(lambda: upstream.initializes == 2, 5, "the heal's initialize reached the upstream")
    async with http.delete(proxy.url, headers=session_headers(session_id)) as response:
        assert response.status == 200
    gate.set()
    status, _, answer = await healing
    assert status == 404
    assert answer["id"] == 10
    assert await proxy.record(session_id) is None
    status, _, _ = await post_on_session(http, proxy.url, session_id, echo_call(11))
    assert status == 404, "the deleted session answered again"
    await wait_until(lambda: not upstream.sessions, 5, "the heal's upstream session ended")


@pytest.mark.parametrize("state", ["memory", "sqlite"])
async def test_a_state_change_answered_on_the_old_session_does_not_undo_a_heal(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Any,
    state: str,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, state=":memory:" if state == "memory" else str(tmp_path / "s.db"))
    session_id = await raw_initialize(http, proxy.url)
    gate = asyncio.Event()

    async def old_session(request: web.Request, body: Any) -> web.StreamResponse | None:
        if request.headers.get("Mcp-Session-Id") != "upstream-1":
            return None
        if body.get("method") == "logging/setLevel":
            await gate.wait()  # answered late, on the old session, after the heal
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {}})
        return web.json_response({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "x"}}, status=404)

    upstream.on_request = old_session
    set_level = {"jsonrpc": "2.0", "id": 20, "method": "logging/setLevel", "params": {"level": "debug"}}
    late = asyncio.ensure_future(post_on_session(http, proxy.url, session_id, set_level))  # noqa: TID251 (awaited)
    await wait_until(lambda: upstream.count("logging/setLevel") == 1, 5, "setLevel reached the upstream")
    assert (await post_on_session(http, proxy.url, session_id, echo_call(21)))[0] == 200  # heals to upstream-2
    gate.set()
    assert (await late)[0] == 200
    record = await proxy.record(session_id)
    assert record is not None
    assert record.generation == 1
    assert record.upstream_session_id == "upstream-2"
    assert record.log_level == "debug", "the state change was kept, on the newer record"
    assert (await post_on_session(http, proxy.url, session_id, echo_call(22)))[0] == 200
    assert upstream.initializes == 2, "a stale write sent the session back to its dead upstream session"


# --- the client leaving is not the upstream breaking -----------------------------------------------------


async def test_a_client_leaving_a_get_stream_is_not_an_upstream_failure_and_nothing_is_reattached(
    fake: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    # Without handler cancellation, the relay itself must tell the client's hang-up from the upstream's.
    runner = web.AppRunner(build_app(single_upstream(url, state=":memory:")), handler_cancellation=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    proxy_url = f"http://127.0.0.1:{port}/mcp"
    try:
        ended = asyncio.Event()

        async def trickle(request: web.Request, body: Any) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                for index in range(200):
                    await response.write(f"data: {index}\n\n".encode())
                    await asyncio.sleep(0.02)
            finally:
                ended.set()
            return response

        # Set before notifications/initialized: the proxy opens the GET stream upstream then.
        upstream.on_get = trickle
        session_id = await raw_initialize(http, proxy_url)
        headers = {**session_headers(session_id), "Accept": "text/event-stream"}
        async with http.get(proxy_url, headers=headers) as stream:
            assert (await stream.content.readline()).startswith(b"data:")
        async with asyncio.timeout(5):
            await ended.wait()  # the proxy let go of the upstream stream
        await asyncio.sleep(0.6)  # a reattach, if any, would come within its first backoff delay
        assert sum(1 for seen in upstream.seen if seen.method == "GET") == 1
    finally:
        await runner.cleanup()


# --- loops that a zero setting must not turn into busy loops --------------------------------------------


async def test_an_idle_ttl_of_zero_does_not_spin_the_housekeeping_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemorySessionStore()
    rounds = 0
    original = store.forget_idle

    async def counted(unused_since: float) -> list[SessionRecord]:
        nonlocal rounds
        rounds += 1
        return await original(unused_since)

    monkeypatch.setattr(store, "forget_idle", counted)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await run_housekeeping(store, SessionActivity(), 0.0)
    assert rounds <= 3
