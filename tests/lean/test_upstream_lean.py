"""The lean upstream client (upstream/lean.py) against real local servers: aiohttp ones, and raw sockets
for the answers aiohttp would not write (close-delimited bodies, bodies cut short, garbage).

Every test runs on asyncio's loop and on uvloop (the CLI's), whose transports differ in timing (see
tests/lean/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from mcp_heal_proxy.upstream.client import Upstream, read_capped
from mcp_heal_proxy.upstream.lean import HIGH_WATER, BadResponse, ConnectFailed, Disconnected, LeanPool
from tests.conftest import free_port, wait_until

AiohttpServer = Callable[..., Awaitable[TestServer]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., LeanPool]]:
    made: list[LeanPool] = []

    def make(url: str, *, size: int = 10, connect_timeout: float = 5.0) -> LeanPool:
        pool = LeanPool(url, size=size, connect_timeout=connect_timeout)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()
    await asyncio.sleep(0.01)  # transports finish closing


async def serve(aiohttp_server: AiohttpServer, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
    app = web.Application()
    app.router.add_route("*", "/mcp", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/mcp"))


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[str]:
    """A TCP server that answers with whatever bytes ``handler`` writes."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.close()
        await server.wait_closed()


async def test_keep_alive_connection_is_reused(aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]) -> None:
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        assert request.headers["Host"] == f"127.0.0.1:{request.url.port}"
        return web.json_response({"echo": (await request.read()).decode()}, headers={"X-Twice": "a"})

    pool = pools(await serve(aiohttp_server, handler))
    for n in range(3):
        response = await pool.request("POST", {"Content-Type": "application/json"}, b'"%d"' % n, read_timeout=5)
        assert response.status == 200
        assert response.reason == "OK"
        assert response.headers["x-twice"] == "a"  # case-insensitive
        assert response.content_length == len(await response.content.read()) > 0
        response.release()
    assert len(set(peers)) == 1
    assert pool.open_connections == 1


async def test_chunked_body(aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for n in range(50):
            await response.write(b"chunk %d;" % n)
        await response.write_eof()
        return response

    pool = pools(await serve(aiohttp_server, handler))
    response = await pool.request("GET", {}, None, read_timeout=5)
    assert response.content_length is None
    assert "chunked" in response.headers["Transfer-Encoding"]
    chunks = [chunk async for chunk in response.content.iter_any()]
    assert b"".join(chunks) == b"".join(b"chunk %d;" % n for n in range(50))
    response.release()
    # A chunked body that ended properly leaves the connection reusable.
    again = await pool.request("GET", {}, None, read_timeout=5)
    assert len(await again.content.read()) > 0
    assert pool.open_connections == 1


async def test_read_nowait_and_at_eof_say_what_already_arrived(pools: Callable[..., LeanPool]) -> None:
    """As aiohttp's StreamReader: read_nowait takes what is buffered without waiting, at_eof says the body
    ended and was read whole."""
    second_part = asyncio.Event()

    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await second_part.wait()
        writer.write(b"world")
        await writer.drain()

    async with raw_server(handler) as url:
        pool = pools(url)
        response = await pool.request("GET", {}, None, read_timeout=5)
        body = response.content
        taken: list[bytes] = []

        def take() -> bool:
            taken.append(body.read_nowait())
            return bool(b"".join(taken))

        await wait_until(take, 5, "hello arrived")
        assert b"".join(taken) == b"hello"
        assert body.read_nowait() == b""  # taken, and nothing more yet
        assert not body.at_eof()
        second_part.set()
        taken.clear()
        await wait_until(take, 5, "world arrived")
        assert b"".join(taken) == b"world"
        assert body.at_eof()  # the body ended with it (Content-Length), and all of it was read
        assert await body.readany() == b""
        response.release()


async def test_body_delimited_by_close(pools: Callable[..., LeanPool]) -> None:
    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")

    async with raw_server(handler) as url:
        pool = pools(url)
        response = await pool.request("GET", {}, None, read_timeout=5)
        assert await response.content.read() == b"hello world"
        response.release()
        await asyncio.sleep(0.01)
        assert pool.open_connections == 0  # never pooled: its end was the close


async def test_server_closing_mid_body_is_a_payload_error(pools: Callable[..., LeanPool]) -> None:
    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")

    async with raw_server(handler) as url:
        pool = pools(url)
        response = await pool.request("POST", {}, b"{}", read_timeout=5)
        assert response.content_length == 100
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.read()
        response.release()
        # What the proxy's callers see: read_capped maps it to the project's own error.
        again = await pool.request("POST", {}, b"{}", read_timeout=5)
        with pytest.raises(UpstreamUnavailable):
            await read_capped(cast(aiohttp.ClientResponse, again))
        again.release()


async def test_truncated_chunked_body_is_a_payload_error(pools: Callable[..., LeanPool]) -> None:
    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async with raw_server(handler) as url:
        pool = pools(url)
        response = await pool.request("GET", {}, None, read_timeout=5)
        assert await response.content.readany() == b"hello"  # what arrived is delivered first
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.readany()
        response.release()


async def test_closed_before_answering_is_disconnected(pools: Callable[..., LeanPool]) -> None:
    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None

    async with raw_server(handler) as url:
        with pytest.raises(Disconnected) as caught:
            await pools(url).request("GET", {}, None, read_timeout=5)
        assert isinstance(caught.value, aiohttp.ServerDisconnectedError)


async def test_garbage_is_a_bad_response(pools: Callable[..., LeanPool]) -> None:
    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"<html>this is not HTTP</html>\r\n\r\n")

    async with raw_server(handler) as url:
        with pytest.raises(BadResponse) as caught:
            await pools(url).request("GET", {}, None, read_timeout=5)
        assert isinstance(caught.value, aiohttp.ClientError)


async def test_no_body_statuses_and_informational(pools: Callable[..., LeanPool]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        await asyncio.sleep(0.1)

    async with raw_server(handler) as url:
        pool = pools(url)
        first = await pool.request("POST", {}, b"{}", read_timeout=5)
        assert (first.status, first.headers["X-A"]) == (204, "1")
        assert await first.content.read() == b""
        first.release()
        second = await pool.request("POST", {}, b"{}", read_timeout=5)
        assert second.status == 202
        assert await second.content.readany() == b""
        assert pool.open_connections == 1


async def test_flow_control_never_buffers_a_whole_stream(
    aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]
) -> None:
    event = b"event: message\ndata: " + b"x" * 1000 + b"\n\n"
    count = 20_000  # ~20 MB
    sent = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(count // 100):
            await response.write(event * 100)
            sent += 100
        await response.write_eof()
        return response

    pool = pools(await serve(aiohttp_server, handler))
    response = await pool.request("GET", {}, None, read_timeout=None)
    await asyncio.sleep(0.5)  # a slow consumer: the server keeps writing meanwhile
    buffered = response.content._size
    assert buffered <= HIGH_WATER + 512 * 1024, buffered  # at most one socket read past the mark
    assert sent < count  # the server is held back by the socket buffers, not absorbed by ours
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
    assert total == len(event) * count
    response.release()
    assert pool.open_connections == 1  # read to the end: pooled


async def test_head_timeout(aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]) -> None:
    async def handler(_: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    pool = pools(await serve(aiohttp_server, handler))
    with pytest.raises(aiohttp.ServerTimeoutError):
        await pool.request("POST", {}, b"{}", read_timeout=0.2)
    await asyncio.sleep(0.01)
    assert pool.open_connections == 0  # the late answer must not reach the next request


async def test_body_read_timeout_counts_socket_silence(
    aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await asyncio.sleep(10)
        return response

    pool = pools(await serve(aiohttp_server, handler))
    response = await pool.request("POST", {}, b"{}", read_timeout=0.4)
    assert await response.content.readany() == b"data: 1\n\n"
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def read_with_ticks() -> None:
        while True:
            # The SSE keep-alive tick cancels reads more often than the read timeout: the silence
            # still counts from the last byte received, not from the last read.
            tick = asyncio.timeout(0.1)
            try:
                async with tick:
                    await response.content.readany()
            except TimeoutError:
                if not tick.expired():
                    raise  # the read timeout, not the tick (as Relay._pump_sse tells them apart)

    with pytest.raises(TimeoutError):  # ServerTimeoutError is also a TimeoutError
        await read_with_ticks()
    assert 0.3 < loop.time() - started < 1.5
    response.release()


async def test_cancelled_read_keeps_the_stream(aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.3)
        await response.write(b"data: late\n\n")
        await response.write_eof()
        return response

    pool = pools(await serve(aiohttp_server, handler))
    response = await pool.request("GET", {}, None, read_timeout=None)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await response.content.readany()
    assert await response.content.read() == b"data: late\n\n"


async def test_cancelling_a_reader_closes_the_connection(
    aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]
) -> None:
    """A handler cancelled mid-body (its client left) releases in ``finally``: the upstream sees it."""
    disconnected = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: tick\n\n")
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            disconnected.set()
            raise

    pool = pools(await serve(aiohttp_server, handler))
    reading = asyncio.Event()

    async def relay() -> None:
        response = await pool.request("GET", {}, None, read_timeout=None)
        try:
            async for _ in response.content.iter_any():
                reading.set()
        finally:
            response.release()

    async with asyncio.TaskGroup() as group:
        task = group.create_task(relay())
        await asyncio.wait_for(reading.wait(), 5)
        task.cancel()
    await asyncio.wait_for(disconnected.wait(), 5)
    assert pool.open_connections == 0


async def test_cancelling_the_wait_for_the_head_closes_the_connection(
    aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]
) -> None:
    disconnected = asyncio.Event()

    async def handler(_: web.Request) -> web.Response:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            disconnected.set()
            raise
        return web.Response()

    pool = pools(await serve(aiohttp_server, handler))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await pool.request("POST", {}, b"{}", read_timeout=None)
    await asyncio.wait_for(disconnected.wait(), 5)
    assert pool.open_connections == 0


async def test_close_wakes_a_waiting_reader(aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(10)
        return response

    pool = pools(await serve(aiohttp_server, handler))
    response = await pool.request("GET", {}, None, read_timeout=None)
    reader = asyncio.get_running_loop().create_task(response.content.readany())
    await asyncio.sleep(0.05)
    response.close()  # what shutdown does to open GET streams
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(reader, 5)


async def test_pool_limit(aiohttp_server: AiohttpServer, pools: Callable[..., LeanPool]) -> None:
    gate = asyncio.Event()
    in_flight = 0
    most = 0

    async def handler(_: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await gate.wait()
        in_flight -= 1
        return web.Response(text="ok")

    pool = pools(await serve(aiohttp_server, handler), size=2)

    async def call() -> bytes:
        response = await pool.request("GET", {}, None, read_timeout=5)
        try:
            return await response.content.read()
        finally:
            response.release()

    async with asyncio.TaskGroup() as group:
        calls = [group.create_task(call()) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert pool.open_connections == 2
        assert in_flight == 2
        gate.set()
    assert [c.result() for c in calls] == [b"ok"] * 5
    assert most == 2
    assert pool.open_connections <= 2


async def test_refused_connection(pools: Callable[..., LeanPool]) -> None:
    pool = pools(f"http://127.0.0.1:{free_port()}/mcp")
    with pytest.raises(ConnectFailed) as caught:
        await pool.request("GET", {}, None, read_timeout=5)
    assert isinstance(caught.value, aiohttp.ClientOSError)
    assert pool.open_connections == 0


def test_header_injection_is_refused() -> None:
    pool = LeanPool("http://127.0.0.1:1/mcp", size=1, connect_timeout=1)
    with pytest.raises(ValueError, match="line break"):
        pool.encode("POST", {"X-A": "1\r\nX-Evil: 2"}, b"{}")
    head = pool.encode("POST", {"Accept": "application/json"}, b"{}")
    assert head == b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:1\r\nAccept: application/json\r\nContent-Length: 2\r\n\r\n{}"


# --- through Upstream.send, as the proxy uses it --------------------------------------------------------


def lean_upstream(config: UpstreamConfig) -> Upstream:
    """An Upstream on the lean client."""
    assert config.client == "lean"
    return Upstream(config)


async def test_upstream_send_retries_refused_then_gives_up() -> None:
    upstream = lean_upstream(
        UpstreamConfig(url=f"http://127.0.0.1:{free_port()}/mcp", client="lean", connect_retry=0.2)
    )
    try:
        with pytest.raises(UpstreamUnavailable, match=r"^cannot reach the upstream MCP server: connection refused"):
            await upstream.send("POST", {}, b"{}")
    finally:
        await upstream.close()


async def test_upstream_send_maps_a_timeout(aiohttp_server: AiohttpServer) -> None:
    async def handler(_: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    url = await serve(aiohttp_server, handler)
    upstream = lean_upstream(UpstreamConfig(url=url, client="lean", read_timeout=0.2))
    try:
        with pytest.raises(UpstreamTimeout):
            await upstream.send("POST", {}, b"{}")
    finally:
        await upstream.close()


async def test_upstream_send_resends_a_get_over_a_stale_connection(pools: Callable[..., LeanPool]) -> None:
    """A pooled connection the upstream closed just before reuse: GET is resent, not failed."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        if served == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read(1)  # the next request arrives on this connection: drop it unanswered
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nagain")

    async with raw_server(handler) as url:
        upstream = lean_upstream(UpstreamConfig(url=url, client="lean"))
        try:
            first = await upstream.send("GET", {}, resendable=True)
            assert await first.content.read() == b"ok"
            first.release()
            second = await upstream.send("GET", {}, resendable=True)
            assert await second.content.read() == b"again"
            second.release()
        finally:
            await upstream.close()


async def test_https_upstream_with_certificate_verification(
    tmp_path: Path, pools: Callable[..., LeanPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remote MCP servers are https: the lean client verifies the certificate and the host name."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"secure": request.secure, "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/mcp", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        # Without trusting the test's own certificate authority, the handshake must fail.
        untrusted = pools(f"https://127.0.0.1:{port}/mcp", connect_timeout=5)
        with pytest.raises(aiohttp.ClientError):
            await untrusted.request("POST", {}, b"x", read_timeout=5)
        # Trusting it (as a system CA bundle would), the request goes through, encrypted.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusted = pools(f"https://127.0.0.1:{port}/mcp", connect_timeout=5)
        for body in (b"one", b"two"):
            response = await trusted.request("POST", {"Content-Type": "text/plain"}, body, read_timeout=5)
            assert response.status == 200
            assert await response.content.read() == b'{"secure": true, "body": "%s"}' % body
            response.release()
        assert trusted.open_connections == 1, "the TLS connection is kept alive and reused"
    finally:
        await runner.cleanup()


async def test_idle_connections_past_their_lifetime_are_not_reused(aiohttp_server: AiohttpServer) -> None:
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    pool = LeanPool(await serve(aiohttp_server, handler), size=4, connect_timeout=5, idle_lifetime=0.05)
    try:
        for _ in range(2):
            response = await pool.request("GET", {}, None, read_timeout=5)
            assert await response.content.read() == b"ok"
            response.release()
            await asyncio.sleep(0.1)  # idle for longer than the lifetime: that is what is tested
        assert len(set(peers)) == 2, "the second request opened a new connection"
    finally:
        await pool.close()
