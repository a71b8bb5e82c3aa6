"""How SSE answers are written to the client: as few writes as the arrival of the upstream's bytes allows,
and never a header held back while the upstream is still working on its first event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import aiohttp
import pytest
from aiohttp import http_writer, web

from mcp_heal_proxy.front import http1
from tests.conftest import ProxyFactory, raw_initialize, session_headers
from tests.fake_upstream import FakeUpstream


def call(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": "echo"}}


def sse(*messages: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(message)}\n\n".encode() for message in messages)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, bytes]]:
    """Every write aiohttp's HTTP writer, or the proxy's own server, hands to a transport in this process:
    (transport, bytes).

    The proxy and the fake upstream both run here; a test tells them apart by the transport."""
    seen: list[tuple[object, bytes]] = []
    write, writelines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

    def counting_write(self: http_writer.StreamWriter, chunk: Any) -> None:
        seen.append((self.transport, bytes(chunk)))
        write(self, chunk)

    def counting_writelines(self: http_writer.StreamWriter, chunks: Iterable[Any]) -> None:
        chunks = list(chunks)
        seen.append((self.transport, b"".join(bytes(chunk) for chunk in chunks)))
        writelines(self, chunks)

    monkeypatch.setattr(http_writer.StreamWriter, "_write", counting_write)
    monkeypatch.setattr(http_writer.StreamWriter, "_writelines", counting_writelines)
    # And every write of the proxy's own HTTP/1.1 server (front/http1.py), which answers the proxy's POSTs.
    fast_write, fast_send = http1.FastConnection.write, http1.FastConnection.send

    def counting_fast_write(self: http1.FastConnection, data: bytes) -> None:
        seen.append((self._transport, data))
        fast_write(self, data)

    async def counting_fast_send(self: http1.FastConnection, data: bytes) -> None:
        seen.append((self._transport, data))
        await fast_send(self, data)

    monkeypatch.setattr(http1.FastConnection, "write", counting_fast_write)
    monkeypatch.setattr(http1.FastConnection, "send", counting_fast_send)
    return seen


def writes_to_client(writes: list[tuple[object, bytes]], session_id: str) -> list[bytes]:
    """The writes on the connection whose answer carried the client's session id (the proxy's; the
    client's request carries it too, but is no answer)."""
    marker = f"Mcp-Session-Id: {session_id}".encode()
    transports = {id(transport) for transport, data in writes if data.startswith(b"HTTP/1.1 ") and marker in data}
    assert len(transports) == 1, "the proxy's answer was not seen"
    return [data for transport, data in writes if id(transport) in transports]


@pytest.mark.parametrize("http_server", ["fast", "aiohttp"])
async def test_a_complete_sse_answer_goes_to_the_client_in_one_write(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    writes: list[tuple[object, bytes]],
    http_server: str,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, http_server=http_server)
    session_id = await raw_initialize(http, proxy.url)
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    body = sse(progress, {"jsonrpc": "2.0", "id": 41, "result": {"content": []}})

    async def whole_sse_answer(request: web.Request, _: Any) -> web.StreamResponse | None:
        # One write upstream: headers and the whole stream (aiohttp sends a Response's in one).
        return web.Response(body=body, content_type="text/event-stream")

    upstream.on_request = whole_sse_answer
    writes.clear()
    async with http.post(proxy.url, json=call(41), headers=session_headers(session_id)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        assert await response.read() == body
    # Headers, events and the end of the chunked body together: before, three writes (headers at
    # prepare, the events, the terminating chunk).
    sent = writes_to_client(writes, session_id)
    assert len(sent) == 1
    assert sent[0].endswith(b"\r\n0\r\n\r\n")


async def test_an_sse_answer_whose_first_event_is_slow_gets_its_headers_at_once(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Headers wait for the first bytes only when those are already there: a client must not time out
    waiting for the headers of a long tool call."""
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    release = asyncio.Event()

    async def slow_first_event(request: web.Request, body: Any) -> web.StreamResponse | None:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # aiohttp writes the headers here
        await release.wait()
        await response.write_eof(sse({"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}}))
        return response

    upstream.on_request = slow_first_event
    async with asyncio.timeout(5):
        response = await http.post(proxy.url, json=call(42), headers=session_headers(session_id))
    try:
        assert response.status == 200
        assert not release.is_set()  # the headers came while the upstream still held its event
        release.set()
        assert json.loads((await response.text()).removeprefix("data: "))["id"] == 42
    finally:
        release.set()
        response.release()


async def test_sse_events_arriving_apart_are_relayed_whole_and_in_order(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The last event, arriving with the end of the stream, is written with the end of the answer."""
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    first_seen = asyncio.Event()
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}

    async def two_parts(request: web.Request, body: Any) -> web.StreamResponse | None:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(progress))
        await first_seen.wait()
        await response.write_eof(sse({"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}}))
        return response

    upstream.on_request = two_parts
    async with http.post(proxy.url, json=call(43), headers=session_headers(session_id)) as response:
        async with asyncio.timeout(5):
            assert await response.content.readuntil(b"\n\n") == sse(progress)  # before the rest exists
        first_seen.set()
        rest = await response.read()
    assert json.loads(rest.removeprefix(b"data: "))["id"] == 43


async def test_a_json_answer_larger_than_the_upstream_clients_read_buffer_is_relayed_whole(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Between the lean client's high-water mark (256 KiB) and the whole-answer limit (1 MiB): read whole,
    which must not leave the upstream connection paused with the body half read."""
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    text = "x" * 600_000

    async def large(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"text": text}})

    upstream.on_request = large
    async with (
        asyncio.timeout(10),
        http.post(proxy.url, json=call(3), headers=session_headers(session_id)) as response,
    ):
        assert response.status == 200
        answer = await response.json()
    assert answer["result"]["text"] == text


async def test_an_sse_answer_carries_one_x_accel_buffering_whatever_the_upstream_sent(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def buffered_sse(request: web.Request, body: Any) -> web.StreamResponse | None:
        answer = sse({"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}})
        return web.Response(body=answer, content_type="text/event-stream", headers={"X-Accel-Buffering": "yes"})

    upstream.on_request = buffered_sse
    async with http.post(proxy.url, json=call(44), headers=session_headers(session_id)) as response:
        assert response.status == 200
        assert response.headers.getall("X-Accel-Buffering") == ["no"]
        await response.read()
