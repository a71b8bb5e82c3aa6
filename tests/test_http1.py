"""The proxy's own HTTP/1.1 server (front/http1.py): what it answers itself, what it hands to aiohttp, and that a
connection stays correct across both (raw sockets, so that the bytes on the wire are what is tested).

Which server answered is visible on the wire: aiohttp's answers carry its ``Server`` header, the proxy's
own server sends none.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import inspect
import json
import socket
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from aiohttp import web

from mcp_heal_proxy.front import http1
from mcp_heal_proxy.front.http import Proxy
from tests.conftest import INITIALIZE_PARAMS, ProxyFactory, UpstreamProcess, start_serve, wait_until
from tests.fake_upstream import FakeUpstream

TIMEOUT = 10.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def by_aiohttp(self) -> bool:
        return "server" in self.headers

    def json(self) -> Any:
        text = self.body.decode()
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
            return json.loads(data[-1])
        return json.loads(text)


@dataclass
class _Parsing:
    answers: list[Answer] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self.parser.get_status_code(), self.headers, b"".join(self.body)))
        self.headers, self.body = {}, []


class RawClient:
    """One client connection, written and read as bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._parsing = _Parsing()
        self._parsing.parser = httptools.HttpResponseParser(self._parsing)

    @classmethod
    async def connect(cls, url: str, receive_buffer: int | None = None) -> RawClient:
        port = int(url.split(":")[2].split("/")[0])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answers(self, count: int) -> list[Answer]:
        """Read until ``count`` answers (in all) arrived."""
        async with asyncio.timeout(TIMEOUT):
            while len(self._parsing.answers) < count:
                data = await self.reader.read(65536)
                assert data, f"connection closed after {len(self._parsing.answers)} answers"
                self._parsing.parser.feed_data(data)
        return self._parsing.answers[:count]

    async def closed(self) -> bool:
        """True when the server closes the connection (without sending anything more)."""
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read(65536) == b""

    def close(self) -> None:
        self.writer.close()


def post(body: object, session_id: str | None = None, extra: str = "", path: str = "/mcp") -> bytes:
    payload = json.dumps(body).encode()
    session = f"Mcp-Session-Id: {session_id}\r\nMCP-Protocol-Version: 2025-11-25\r\n" if session_id else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\n{session}{extra}Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def initialize(request_id: int = 1) -> bytes:
    return post({"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": INITIALIZE_PARAMS})


def call_echo(session_id: str, request_id: int, text: str) -> bytes:
    params = {"name": "echo", "arguments": {"text": text}}
    return post({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}, session_id)


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def open_session(client: RawClient, done: int = 0) -> str:
    """initialize + notifications/initialized on this connection; ``done``: answers read on it before."""
    client.send(initialize())
    (answer,) = (await client.answers(done + 1))[done:]
    assert answer.status == 200, answer.body
    session_id = answer.headers["mcp-session-id"]
    client.send(post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session_id))
    (initialized,) = (await client.answers(done + 2))[done + 1 :]
    assert initialized.status == 202
    return session_id


async def test_posts_are_answered_by_the_proxys_own_server(
    upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(upstream.url)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    client.send(call_echo(session_id, 2, "fast"))
    answers = await client.answers(3)
    assert not any(answer.by_aiohttp for answer in answers)
    assert answers[2].json()["result"]["content"][0]["text"] == "fast"
    client.close()


async def test_a_connection_goes_to_aiohttp_at_its_first_other_request_and_stays_correct(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    client.send(HEALTHZ)
    client.send(call_echo(session_id, 2, "after the handover"))
    answers = await client.answers(4)
    assert answers[2].status == 200
    assert answers[2].by_aiohttp
    assert json.loads(answers[2].body) == {"status": "ok"}
    assert answers[3].by_aiohttp
    assert answers[3].json()["result"]["content"][0]["text"] == "after the handover"
    client.close()


async def test_pipelined_requests_are_answered_in_order_across_the_handover(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    # Three calls, a request for aiohttp and a fourth call, in one write.
    client.send(
        call_echo(session_id, 10, "a")
        + call_echo(session_id, 11, "b")
        + call_echo(session_id, 12, "c")
        + HEALTHZ
        + call_echo(session_id, 13, "d")
    )
    answers = (await client.answers(7))[2:]
    assert [answer.by_aiohttp for answer in answers] == [False, False, False, True, True]
    texts = [answers[i].json()["result"]["content"][0]["text"] for i in (0, 1, 2, 4)]
    assert texts == ["a", "b", "c", "d"]
    assert [answers[i].json()["id"] for i in (0, 1, 2, 4)] == [10, 11, 12, 13]
    client.close()


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ("Origin: http://localhost:3000\r\n", "a browser's request gets CORS"),
        ("Expect: 100-continue\r\n", "an expectation is answered first"),
    ],
)
async def test_requests_only_aiohttp_answers_alike_go_there(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, extra: str, why: str
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    client.send(_with_header(initialize(), extra))
    answers = await client.answers(2 if "Expect" in extra else 1)
    if "Expect" in extra:
        assert answers[0].status == 100  # aiohttp's interim answer, before the body is read
    answer = answers[-1]
    assert answer.status == 200, why
    assert answer.by_aiohttp, why
    assert "mcp-session-id" in answer.headers
    if "Origin" in extra:
        assert answer.headers["access-control-allow-origin"] == "http://localhost:3000"
    client.close()


def _with_header(request: bytes, header: str) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\n" + header.encode()[:-2] + b"\r\n\r\n" + body


async def test_a_chunked_body_goes_to_aiohttp_and_is_answered(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    payload = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}).encode()
    half = len(payload) // 2
    chunks = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (half, payload[:half], len(payload) - half, payload[half:])
    client.send(
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    )
    (answer,) = await client.answers(1)
    assert answer.status == 200
    assert answer.by_aiohttp
    assert answer.json()["result"]["protocolVersion"]
    client.close()


async def test_a_malformed_request_gets_aiohttps_400_and_the_proxy_keeps_serving(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    client.send(b"POST /mcp HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
    (bad,) = (await client.answers(3))[2:]
    assert bad.status == 400
    assert bad.by_aiohttp
    client.close()
    fresh = await RawClient.connect(proxy.url)
    fresh.send(call_echo(session_id, 3, "still serving"))
    (answer,) = await fresh.answers(1)
    assert answer.json()["result"]["content"][0]["text"] == "still serving"
    fresh.close()


async def test_connection_close_is_honoured_and_what_follows_is_not_answered(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    client.send(_with_header(initialize(), "Connection: close\r\n") + initialize(2))
    (answer,) = await client.answers(1)
    assert answer.status == 200
    assert answer.headers["connection"] == "close"
    assert not answer.by_aiohttp
    assert await client.closed()
    client.close()


async def test_a_body_over_the_limit_is_refused_with_the_json_rpc_error(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url, max_body_bytes=1024)
    client = await RawClient.connect(proxy.url)
    client.send(call_echo("0" * 32, 7, "x" * 2000))
    (answer,) = await client.answers(1)
    assert answer.status == 413
    assert json.loads(answer.body)["error"]["message"] == "request body over the 1024-byte limit"
    client.close()


async def test_an_idle_keep_alive_connection_is_closed(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http1, "KEEPALIVE_TIMEOUT", 0.3)
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    await open_session(client)
    assert await client.closed()
    client.close()


async def test_a_client_that_leaves_mid_answer_cancels_its_request(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    # The upstream's gated tool blocks until released: the answer is still running when the client leaves.
    params = {"name": "gated_steps", "arguments": {"steps": 1}}
    client.send(post({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params}, session_id))

    def handlers() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() if "FastConnection._run" in repr(task.get_coro())]

    await wait_until(lambda: bool(handlers()), TIMEOUT, "the call being answered")
    running = handlers()
    client.writer.transport.abort()
    await wait_until(lambda: all(task.done() for task in running), TIMEOUT, "the handler cancelled")
    assert all(task.cancelled() for task in running)


async def test_an_upstream_204_reaches_the_client_without_a_body_and_the_connection_stays_usable(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)

    async def no_content(request: web.Request, body: Any) -> web.StreamResponse | None:
        return web.Response(status=204) if body.get("method") == "notifications/cancelled" else None

    upstream.on_request = no_content
    cancelled = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 99}}
    client.send(post(cancelled, session_id) + HEALTHZ)
    answers = (await client.answers(4))[2:]
    assert answers[0].status == 204
    assert "transfer-encoding" not in answers[0].headers
    assert "content-length" not in answers[0].headers
    assert answers[0].body == b""
    assert answers[1].status == 200  # the next answer on the same connection is read intact
    client.close()


async def test_a_client_that_lowercases_header_names_still_heals(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    """Codex (hyper) sends "content-type"; the heal's re-initialize sets "Content-Type". Header names keep
    aiohttp's canonical spelling on this server too, so the upstream gets one Content-Type, not two (the
    TypeScript SDK server answers two with 415)."""
    upstream, url = fake
    proxy = await start_proxy(url)
    content_types: list[list[str]] = []

    async def count_content_types(request: web.Request, _: Any) -> web.StreamResponse | None:
        content_types.append(request.headers.getall("Content-Type"))
        return None

    upstream.on_reinitialize = count_content_types
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    upstream.forget_all()
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo"}}
    client.send(post(call, session_id).replace(b"Content-Type:", b"content-type:").replace(b"Accept:", b"accept:"))
    (answer,) = (await client.answers(3))[2:]
    assert answer.status == 200, answer.body
    assert answer.json()["id"] == 3
    assert content_types == [["application/json"]]
    client.close()


@pytest.mark.parametrize(("http_server", "by_aiohttp"), [("fast", False), ("aiohttp", True)])
async def test_serve_takes_connections_with_the_configured_http_server(
    sse_upstream: UpstreamProcess, http_server: str, by_aiohttp: bool
) -> None:
    """`serve` starts the proxy's own server by default; http_server = "aiohttp" is the way back."""
    process, url = await start_serve(
        "--upstream", sse_upstream.url, "--port", "0", "--state", ":memory:", "--set", f"http_server={http_server}"
    )
    try:
        client = await RawClient.connect(url)
        client.send(initialize())
        (answer,) = await client.answers(1)
        assert answer.status == 200
        assert answer.by_aiohttp is by_aiohttp
        client.close()
    finally:
        process.terminate()
        async with asyncio.timeout(20):
            await process.wait()


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (_with_header(initialize(), f"X-Big: {'a' * 8191}\r\n"), "a header value over aiohttp's 8190 bytes"),
        (_with_header(initialize(), f"X-{'a' * 8189}: 1\r\n"), "a header name over aiohttp's 8190 bytes"),
        (_with_header(initialize(), "".join(f"X-H{i}: 1\r\n" for i in range(130))), "over aiohttp's 128 headers"),
        (initialize().replace(b"POST /mcp ", b"POST /mcp?" + b"a" * 8190 + b" ", 1), "a URL over 8190 bytes"),
        (_with_header(initialize(), "Content-Type: application/json\r\n"), "a second Content-Type"),
        (_with_header(initialize(), "Host: 127.0.0.1\r\n"), "a second Host"),
        (initialize().replace(b"Host: 127.0.0.1\r\n", b""), "no Host in an HTTP/1.1 request"),
        (_with_header(initialize(), "Sec-WebSocket-Key1: 1\r\n"), "a header aiohttp refuses outright"),
    ],
)
async def test_a_head_aiohttp_refuses_is_refused_by_the_proxy_not_sent_upstream(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, request_bytes: bytes, why: str
) -> None:
    """aiohttp's limits on a request's head hold on this server too: such a request is aiohttp's to refuse
    (the fake upstream, an aiohttp server itself, would refuse it as well, but not every upstream does)."""
    upstream, url = fake
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.url)
    client.send(request_bytes)
    (answer,) = await client.answers(1)
    assert answer.status == 400, why
    assert answer.by_aiohttp, why
    assert upstream.seen == [], why
    client.close()


async def test_a_head_that_never_ends_is_refused_instead_of_buffered_without_limit(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    _, url = fake
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.url)
    client.send(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: " + b"a" * 200_000)
    (answer,) = await client.answers(1)
    assert answer.status == 400
    assert await client.closed()
    client.close()


def test_an_idle_connection_is_kept_as_long_as_aiohttp_keeps_one() -> None:
    from aiohttp.web import RequestHandler

    default = inspect.signature(RequestHandler.__init__).parameters["keepalive_timeout"].default
    assert default == http1.KEEPALIVE_TIMEOUT


async def test_stray_line_breaks_before_a_request_do_not_shift_the_handover(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    """llhttp skips any CR and LF before a request line; the bytes handed to aiohttp must start where the
    next request starts all the same."""
    _, url = fake
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.url)
    client.send(b"\n\r\n\r\n" + initialize() + HEALTHZ)
    answers = await client.answers(2)
    assert answers[0].status == 200
    assert not answers[0].by_aiohttp
    assert answers[1].status == 200
    assert json.loads(answers[1].body) == {"status": "ok"}
    client.close()


async def test_the_first_authorization_header_is_the_one_checked_as_aiohttp_checks_it(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, token="right")
    client = await RawClient.connect(proxy.url)
    client.send(_with_header(initialize(), "Authorization: Bearer wrong\r\nAuthorization: Bearer right\r\n"))
    (answer,) = await client.answers(1)
    assert answer.status == 401
    assert upstream.seen == []
    client.send(_with_header(initialize(2), "Authorization: Bearer right\r\nAuthorization: Bearer wrong\r\n"))
    (_, accepted) = await client.answers(2)
    assert accepted.status == 200
    client.close()


async def test_whitespace_after_a_header_value_is_dropped_as_aiohttp_drops_it(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    _, url = fake
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    client.send(call_echo(session_id, 3, "x").replace(session_id.encode(), session_id.encode() + b" \t", 1))
    (answer,) = (await client.answers(3))[2:]
    assert answer.status == 200, answer.body
    assert not answer.by_aiohttp
    assert answer.json()["id"] == 3
    client.close()


async def test_a_client_that_reads_no_answers_holds_up_its_next_requests_not_the_proxys_memory(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As aiohttp's server, which drains after each answer: while the client has not read an answer, the
    next pipelined request waits, instead of its answer piling up in the proxy's write buffer."""
    upstream, url = fake
    proxy = await start_proxy(url)
    text = "x" * 100_000

    async def large(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"text": text}})

    connections: list[http1.FastConnection] = []
    started_unread: list[int] = []  # write buffer sizes when a request started while the client was not reading
    made, answer = http1.FastConnection.connection_made, http1.FastConnection._answer

    def recording_made(self: http1.FastConnection, transport: Any) -> None:
        connections.append(self)
        # Small socket buffers: the client's unread answers fill them after a few answers.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        made(self, transport)

    def recording_answer(self: http1.FastConnection, exchange: http1.FastExchange) -> None:
        if self._writable is not None:
            assert self._transport is not None
            started_unread.append(self._transport.get_write_buffer_size())
        answer(self, exchange)

    monkeypatch.setattr(http1.FastConnection, "connection_made", recording_made)
    monkeypatch.setattr(http1.FastConnection, "_answer", recording_answer)
    client = await RawClient.connect(proxy.url, receive_buffer=16384)
    session_id = await open_session(client)
    upstream.on_request = large
    calls = 12
    client.send(b"".join(call_echo(session_id, 10 + i, "") for i in range(calls)))
    await wait_until(lambda: any(c._writable is not None for c in connections), TIMEOUT, "the proxy's writes paused")
    answers = (await client.answers(2 + calls))[2:]
    assert [answer.json()["id"] for answer in answers] == [10 + i for i in range(calls)]
    assert started_unread == []
    client.close()


async def test_a_connection_told_to_close_does_not_hand_a_waiting_request_to_aiohttp(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app stops (aiohttp's server calls close() on every connection): the request being answered
    finishes, and the request that waited behind it for aiohttp is not served, as aiohttp serves no
    pipelined request once closing."""
    upstream, url = fake
    proxy = await start_proxy(url)
    connections: list[http1.FastConnection] = []
    made = http1.FastConnection.connection_made

    def recording_made(self: http1.FastConnection, transport: Any) -> None:
        connections.append(self)
        made(self, transport)

    monkeypatch.setattr(http1.FastConnection, "connection_made", recording_made)
    client = await RawClient.connect(proxy.url)
    session_id = await open_session(client)
    gate = asyncio.Event()

    async def gated(request: web.Request, body: Any) -> web.StreamResponse | None:
        await gate.wait()
        return None

    upstream.on_request = gated
    client.send(call_echo(session_id, 3, "last") + HEALTHZ)
    (connection,) = connections
    await wait_until(lambda: connection._handover is not None, TIMEOUT, "the request for aiohttp waiting")
    connection.close()
    gate.set()
    (answer,) = (await client.answers(3))[2:]
    assert answer.json()["result"]["echo"]["arguments"]["text"] == "last"
    assert await client.closed()
    client.close()


class _StubTransport:
    """Just what FastConnection uses of a transport; delivers data only while reading is not paused."""

    def __init__(self, *, honours_pause: bool = True) -> None:
        self.honours_pause = honours_pause
        self.protocol: Any = None
        self.written = bytearray()
        self.paused = False
        self.closed = False
        self.pending: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        asyncio.get_running_loop().call_soon(self.deliver)  # as a real transport: on a later turn of the loop

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def feed(self, data: bytes) -> None:
        self.pending.append(data)
        self.deliver()

    def deliver(self) -> None:
        while self.pending and not (self.paused and self.honours_pause) and not self.closed:
            self.protocol.data_received(self.pending.pop(0))


class _StubHandler:
    """aiohttp's RequestHandler as the handover sees it: what it was given."""

    def __init__(self) -> None:
        self.received = bytearray()

    def connection_made(self, transport: Any) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.received += data


class _StubServer:
    def __init__(self) -> None:
        self.handlers: list[_StubHandler] = []

    def connection_made(self, handler: Any, transport: Any) -> None:
        pass

    def connection_lost(self, handler: Any, exc: Any) -> None:
        pass

    def __call__(self) -> _StubHandler:
        self.handlers.append(_StubHandler())
        return self.handlers[-1]


class _EchoProxy:
    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def handle_post(self, exchange: http1.FastExchange) -> None:
        await self.gate.wait()
        await exchange.answer(200, exchange.body)


def _raw_post(body: bytes) -> bytes:
    return b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


@pytest.mark.parametrize("answers_at_once", [True, False], ids=["answered-at-once", "answered-after-all-reads"])
@pytest.mark.parametrize("honours_pause", [True, False], ids=["paused", "data-after-pause"])
async def test_the_bytes_handed_to_aiohttp_are_exact_however_the_stream_is_split(
    honours_pause: bool, answers_at_once: bool
) -> None:
    """Every split of a pipelined stream into reads (a head split inside CRLF CRLF, a body apart from its
    head, leading line breaks, the handover request's head in pieces), with the proxy's requests answered
    at once or still in flight while the rest arrives: the proxy answers its requests in order and aiohttp
    gets exactly the bytes from its request's first one; also when bytes still arrive after reading
    paused."""
    to_aiohttp = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + _raw_post(b"after")
    stream = b"\r\n" + _raw_post(b"one") + b"\n\r\n\r\n" + _raw_post(b"two\r\n\r\nthree") + to_aiohttp
    splits = [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    splits.append([stream[i : i + 1] for i in range(len(stream))])
    for reads in splits:
        proxy = _EchoProxy()
        if answers_at_once:
            proxy.gate.set()
        fast = http1.FastPath({"/mcp": proxy}, token=None, max_body_bytes=1024, oauth=None)  # type: ignore[dict-item]
        server = _StubServer()
        transport = _StubTransport(honours_pause=honours_pause)
        connection = http1.FastConnection(fast, server)  # type: ignore[arg-type]
        transport.protocol = connection
        connection.connection_made(transport)  # type: ignore[arg-type]
        for data in reads:
            transport.feed(data)
            for _ in range(5):
                await asyncio.sleep(0)
        proxy.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        await wait_until(functools.partial(bool, server.handlers), TIMEOUT, "the handover")
        answers = _Parsing()
        answers.parser = httptools.HttpResponseParser(answers)
        answers.parser.feed_data(bytes(transport.written))
        split = [len(data) for data in reads[:3]]
        assert [answer.body for answer in answers.answers] == [b"one", b"two\r\n\r\nthree"], split
        (handler,) = server.handlers
        assert bytes(handler.received) == to_aiohttp, split
        connection.connection_lost(None)


async def test_an_unforeseen_handler_error_gets_aiohttps_500_which_closes_the_connection(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = fake
    proxy = await start_proxy(url)

    async def broken(self: Any, exchange: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Proxy, "handle_post", broken)
    client = await RawClient.connect(proxy.url)
    client.send(initialize())
    (answer,) = await client.answers(1)
    assert answer.status == 500
    assert answer.headers["connection"] == "close"
    assert answer.body == b"500 Internal Server Error\n\nServer got itself in trouble"
    assert await client.closed()
    client.close()


async def test_a_client_reading_a_large_sse_answer_slowly_holds_the_relay_back_not_the_proxys_memory(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    message = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x" * 100_000}}
    event = b"data: %b\n\n" % json.dumps(message).encode()
    events = 30

    async def large_stream(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(events):
            await response.write(event)
        await response.write(b"data: %b\n\n" % json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": {}}).encode())
        return response

    connections: list[http1.FastConnection] = []
    buffered: list[int] = []  # the proxy's write buffer after each part of the answer it sent
    made, send = http1.FastConnection.connection_made, http1.FastConnection.send

    def recording_made(self: http1.FastConnection, transport: Any) -> None:
        connections.append(self)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        made(self, transport)

    async def recording_send(self: http1.FastConnection, data: bytes) -> None:
        await send(self, data)
        assert self._transport is not None
        buffered.append(self._transport.get_write_buffer_size())

    monkeypatch.setattr(http1.FastConnection, "connection_made", recording_made)
    monkeypatch.setattr(http1.FastConnection, "send", recording_send)
    client = await RawClient.connect(proxy.url, receive_buffer=16384)
    session_id = await open_session(client)
    upstream.on_request = large_stream
    client.send(call_echo(session_id, 3, ""))
    await wait_until(lambda: any(c._writable is not None for c in connections), TIMEOUT, "the proxy's writes paused")
    (answer,) = (await client.answers(3))[2:]
    assert answer.body.count(b"notifications/message") == events
    assert answer.json()["id"] == 3
    assert max(buffered) < events * len(event) // 4
    client.close()


async def test_a_gzipped_request_body_is_decoded_and_sent_upstream_plain(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    """aiohttp decodes a compressed body; the upstream gets the plain body without the client's coding."""
    proxy = await start_proxy(sse_upstream.url)
    client = await RawClient.connect(proxy.url)
    plain = initialize()
    head, _, body = plain.partition(b"\r\n\r\n")
    packed = gzip.compress(body)
    head = head.replace(f"Content-Length: {len(body)}".encode(), f"Content-Length: {len(packed)}".encode())
    client.send(head + b"\r\nContent-Encoding: gzip\r\n\r\n" + packed)
    (answer,) = await client.answers(1)
    assert answer.status == 200, answer.body
    assert answer.json()["result"]["protocolVersion"]
    client.close()
