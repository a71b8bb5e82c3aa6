"""The answer path: where every upstream answer starts, ends and breaks (engine/answers.py), and what each
front writes of it.

The framing and the endings are tested without sockets first (a scripted body, as uvicorn drives its
protocol with a mock transport): any split of the same bytes gives the same events and the same ending.
Then each way an answer can stop is driven through the proxy and the stdio bridge by a fault-injecting
upstream, since no real server breaks its answers on cue.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Gauge

from mcp_heal_proxy.engine.answers import IDLE, AnswerStream, Ending
from mcp_heal_proxy.front.relay import Relay
from mcp_heal_proxy.wire.sse import ABANDONED_EVENT, Event, SSEParser
from tests.conftest import ProxyFactory, echo_call, raw_initialize, session_headers, wait_until
from tests.fake_upstream import Behaviour, FakeUpstream
from tests.test_stdio import INITIALIZE, INITIALIZED, bridge_process, ping, raw_bridge

SSE = "text/event-stream"
# A notification whose text holds both words a substring check took for a response.
LOUD_LOG = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "error", "data": "no result"}}


# --- a scripted body, without sockets -------------------------------------------------------------------


class ScriptedBody:
    """A response body that hands out the given chunks, then ends or breaks."""

    def __init__(self, chunks: list[bytes], error: BaseException | None = None) -> None:
        self._chunks = list(chunks)
        self._error = error
        self._done = False

    async def readany(self) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        if self._error is not None:
            raise self._error
        self._done = True
        return b""

    def read_nowait(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""

    def at_eof(self) -> bool:
        return not self._chunks and self._error is None


class ScriptedResponse:
    """The part of an upstream response an AnswerStream reads."""

    def __init__(self, body: ScriptedBody, content_type: str = SSE, content_length: int | None = None) -> None:
        self.status = 200
        self.reason = "OK"
        self.headers = CIMultiDictProxy(CIMultiDict({"Content-Type": content_type}))
        self.content_length = content_length
        self.content = body
        self.released = False

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.released = True


def scripted(
    chunks: list[bytes], request_ids: tuple[int, ...] = (), error: BaseException | None = None
) -> AnswerStream:
    response: Any = ScriptedResponse(ScriptedBody(chunks, error))
    return AnswerStream(response, request_ids)


async def drain(stream: AnswerStream) -> list[Event]:
    events: list[Event] = []
    while (piece := await stream.next()) is not None:
        events.extend(event.event for event in piece.events)
    return events


def sse_message(message: object, event_id: str | None = None, ending: str = "\n\n") -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {json.dumps(message)}{ending}".encode()


def answer_to(request_id: int, **result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


_STREAM = (
    b"\xef\xbb\xbf: hello\r\n\r\n"
    + sse_message(LOUD_LOG, "1", "\r\n\r\n")
    + sse_message({"jsonrpc": "2.0", "method": "elicitation/create", "id": 9, "params": {}}, "2", "\n\r\n")
    + b"retry: 50\rdata: \r\r"
    + sse_message(answer_to(7, text="caf\u00e9 \ud83d\ude00"), "3", "\r\r")
    + b'data: {"jsonrpc":"2.0","id":8,\n'
)


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), broken=st.booleans())
def test_any_split_of_the_same_bytes_gives_the_same_events_and_the_same_ending(cuts: list[int], broken: bool) -> None:
    async def run(chunks: list[bytes]) -> tuple[object, ...]:
        error = aiohttp.ClientPayloadError("cut") if broken else None
        stream = scripted(chunks, (7, 8), error)
        events = await drain(stream)
        return (events, stream.ending, stream.between_events, stream.unanswered, stream.last_event_id)

    whole = asyncio.run(run([_STREAM]))
    assert asyncio.run(run(splits(_STREAM, cuts))) == whole
    events, ending, between, unanswered, last_id = whole
    assert isinstance(events, list)
    assert [event.id for event in events] == ["1", "2", None, "3"]
    assert ending is (Ending.BROKEN if broken else Ending.COMPLETE)
    assert between is False  # the last event has no blank line yet
    assert unanswered == (8,)
    assert last_id == "3"


@pytest.mark.parametrize(
    ("chunks", "error", "ending", "unanswered", "between"),
    [
        ([sse_message(answer_to(1))], None, Ending.COMPLETE, (), True),
        # Defect: a log notification with "error" in it counted as an answer.
        ([sse_message(LOUD_LOG)], None, Ending.COMPLETE, (1,), True),
        ([sse_message(LOUD_LOG)], aiohttp.ClientPayloadError("cut"), Ending.BROKEN, (1,), True),
        # A server-to-client request carries an id and is no answer either.
        (
            [sse_message({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage"})],
            None,
            Ending.COMPLETE,
            (1,),
            True,
        ),
        ([b'data: {"jsonrpc":"2.0","id":1,"res'], aiohttp.ClientPayloadError("cut"), Ending.BROKEN, (1,), False),
        ([sse_message(answer_to(1)), b"data: {"], TimeoutError(), Ending.BROKEN, (), False),
        # The terminating blank line in its own write, and a \n\r\n ending, are both between events.
        ([sse_message(answer_to(1), ending="\n"), b"\n"], None, Ending.COMPLETE, (), True),
        ([sse_message(LOUD_LOG, ending="\n\r\n")], None, Ending.COMPLETE, (1,), True),
        # A batch of responses answers each of its ids.
        ([sse_message([answer_to(1), answer_to(2)])], None, Ending.COMPLETE, (), True),
    ],
    ids=[
        "answered",
        "log-then-end",
        "log-then-break",
        "server-request",
        "broken-mid-event",
        "read-timeout-after-answer",
        "blank-line-later",
        "lf-crlf",
        "batch",
    ],
)
async def test_each_ending_is_told_by_the_parse(
    chunks: list[bytes], error: BaseException | None, ending: Ending, unanswered: tuple[int, ...], between: bool
) -> None:
    stream = scripted(chunks, (1, 2) if chunks[0].startswith(b"data: [") else (1,), error)
    await drain(stream)
    assert stream.ending is ending
    assert stream.unanswered == unanswered
    assert stream.between_events is between
    if ending is Ending.BROKEN:
        assert stream.failure


async def test_silence_is_idle_not_an_ending() -> None:
    class Silent(ScriptedBody):
        async def readany(self) -> bytes:
            await asyncio.Event().wait()
            return b""

    response: Any = ScriptedResponse(Silent([]))
    stream = AnswerStream(response, (1,))
    assert await stream.next(idle=0.01) is IDLE
    assert stream.ending is Ending.OPEN


@pytest.mark.parametrize(
    "cut",
    [
        b"id: 5\n",
        b'id: 5\ndata: {"jsonrpc":"2.0","id":1,"res',
        b'id: 5\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n',
        b"da",
        b"id: 5\ndata: x\r",
    ],
)
def test_an_abandoned_event_reaches_no_reader_and_leaves_its_last_event_id(cut: bytes) -> None:
    relay_side = SSEParser()
    reader = SSEParser()  # what the client's parser has seen: the same bytes
    before = sse_message(LOUD_LOG, "4")
    relay_side.feed(before + cut)
    closing = relay_side.abandon_event()
    dispatched = reader.feed(before + cut + closing)
    assert [item.event for item in dispatched if isinstance(item, Event)] in (["message"], ["message", ABANDONED_EVENT])
    assert reader.last_event_id == "4"
    assert relay_side.between_events
    assert reader.between_events
    # The stream goes on whole after it.
    assert [e.data for e in reader.feed(sse_message(answer_to(1))) if isinstance(e, Event)] == [
        json.dumps(answer_to(1))
    ]


def test_keep_alives_while_waiting_to_reattach_come_one_per_interval_on_uvloop() -> None:
    """uvloop's timers run on a millisecond clock: a deadline read off another clock made the last
    sub-millisecond of the wait write dozens of keep-alives at once."""

    class Counting:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        async def write(self, data: bytes) -> None:
            self.writes.append(data)

    async def wait() -> list[bytes]:
        relay = Relay("t", 1.0, Gauge("open", "open streams", ["upstream"], registry=CollectorRegistry()))
        exchange: Any = Counting()
        for _ in range(3):
            assert await relay._wait_keeping_alive(exchange, 1.0005)
        return list(exchange.writes)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        writes = runner.run(wait())
    assert len(writes) == 3, f"{len(writes)} keep-alives for three waits of 1.0005 s at 1 s each"


# --- through the proxy ----------------------------------------------------------------------------------


async def sse_answer(request: web.Request, *chunks: bytes, pause: float = 0.05) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": SSE})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
        await asyncio.sleep(pause)  # separate writes reach the proxy as separate reads
    return response


async def no_server_stream(request: web.Request, body: Any) -> web.StreamResponse | None:
    """A server that offers no GET stream (405): nothing interleaves with the answers a test reads."""
    return web.Response(status=405)


def log_then(how: str) -> Behaviour:
    """A tools/call answered with a loud log, then a stream that ends or breaks without the response."""

    async def behaviour(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        response = await sse_answer(request, sse_message(LOUD_LOG))
        if how == "breaks":
            abort(request)
        return response

    return behaviour


def abort(request: web.Request) -> None:
    assert request.transport is not None
    request.transport.abort()


@pytest.mark.parametrize("how", ["ends", "breaks"])
async def test_a_call_whose_stream_stops_after_a_loud_log_gets_an_error_with_its_id(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, how: str
) -> None:
    upstream, url = fake

    upstream.on_request = log_then(how)
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    async with http.post(proxy.url, json=echo_call(41), headers=session_headers(session_id)) as response:
        parser = SSEParser()
        events = [e for e in parser.feed(await response.read()) if isinstance(e, Event) and e.event == "message"]
    messages = [json.loads(event.data) for event in events]
    assert messages[0] == LOUD_LOG
    assert messages[-1]["id"] == 41
    assert "error" in messages[-1]


@pytest.mark.parametrize("size", [4096, 2 * 1024 * 1024], ids=["chunked", "over-1MiB-with-length"])
async def test_a_json_answer_the_upstream_breaks_mid_body_never_reaches_the_client_as_whole(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, size: int
) -> None:
    upstream, url = fake
    body = json.dumps(answer_to(42, text="x" * size)).encode()

    async def half_then_die(request: web.Request, payload: Any) -> web.StreamResponse | None:
        if payload.get("method") != "tools/call":
            return None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if size > 1024 * 1024:
            response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)
        abort(request)
        return response

    upstream.on_request = half_then_die
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    async with http.post(proxy.url, json=echo_call(42), headers=session_headers(session_id)) as response:
        assert response.status == 200
        if size > 1024 * 1024:
            assert response.headers["Content-Length"] == str(len(body)), "the upstream's length is kept"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_a_large_json_answer_keeps_its_length_and_arrives_whole(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    body = json.dumps(answer_to(43, text="y" * (3 * 1024 * 1024))).encode()

    async def large(request: web.Request, payload: Any) -> web.StreamResponse | None:
        if payload.get("method") != "tools/call":
            return None
        return web.Response(body=body, content_type="application/json")

    upstream.on_request = large
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    async with http.post(proxy.url, json=echo_call(43), headers=session_headers(session_id)) as response:
        assert response.headers["Content-Length"] == str(len(body))
        assert "Transfer-Encoding" not in response.headers
        assert await response.read() == body


@pytest.mark.parametrize(
    "event",
    [sse_message(LOUD_LOG, ending="\n") + b"\n", sse_message(LOUD_LOG, ending="\n\r\n")],
    ids=["blank-line-in-a-later-write", "lf-crlf"],
)
async def test_silence_after_an_event_gets_keep_alives_however_the_event_ended(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, event: bytes
) -> None:
    upstream, url = fake
    # Where the event's first write ends: its blank line, if any, comes in the next write.
    first = event.rstrip(b"\r\n") + b"\n"

    async def event_then_silence(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        return await sse_answer(request, first, event[len(first) :], pause=2.6)

    upstream.on_request = event_then_silence
    proxy = await start_proxy(url, keepalive_interval=1.0)
    session_id = await raw_initialize(http, proxy.url)
    async with http.post(proxy.url, json=echo_call(44), headers=session_headers(session_id)) as response:
        text = await response.text()
    assert ": keep-alive" in text, text
    # The keep-alives came between events: the client still reads the log and the proxy's error after it.
    messages = [json.loads(e.data) for e in SSEParser().feed(text.encode()) if isinstance(e, Event)]
    assert messages[0] == LOUD_LOG
    assert messages[-1]["id"] == 44


async def test_a_get_stream_ended_after_an_event_split_across_writes_is_reattached(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    gets = 0

    async def split_then_end(request: web.Request, body: Any) -> web.StreamResponse | None:
        nonlocal gets
        gets += 1
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": gets}}
        return await sse_answer(request, sse_message(note, str(gets), ending="\n"), b"\n")

    upstream.on_get = split_then_end
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    headers = {**session_headers(session_id), "Accept": SSE}
    parser = SSEParser()
    seen: list[int] = []
    async with http.get(proxy.url, headers=headers) as response:
        async with asyncio.timeout(10):
            async for chunk in response.content.iter_any():
                seen += [json.loads(e.data)["params"]["n"] for e in parser.feed(chunk) if isinstance(e, Event)]
                if len(seen) >= 2:
                    break
    assert seen[:2] == [1, 2], "the stream went on after the upstream ended it"


async def test_a_get_stream_broken_mid_event_drops_that_event_and_goes_on(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    gets = 0

    async def half_then_whole(request: web.Request, body: Any) -> web.StreamResponse | None:
        nonlocal gets
        gets += 1
        if gets == 1:
            response = await sse_answer(request, sse_message(LOUD_LOG, "a"), b'id: b\ndata: {"jsonrpc":"2.0","me')
            abort(request)
            return response
        assert request.headers.get("Last-Event-ID") == "a", "resumed after the last whole event"
        return await sse_answer(request, sse_message(answer_to(3), "c"))

    upstream.on_get = half_then_whole
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    parser = SSEParser()
    messages: list[Any] = []
    async with http.get(proxy.url, headers={**session_headers(session_id), "Accept": SSE}) as response:
        async with asyncio.timeout(10):
            async for chunk in response.content.iter_any():
                messages += [
                    json.loads(e.data) for e in parser.feed(chunk) if isinstance(e, Event) and e.event == "message"
                ]
                if len(messages) >= 2:
                    break
    assert messages == [LOUD_LOG, answer_to(3)]


# --- through the stdio bridge ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["ends", "breaks"])
async def test_over_stdio_a_call_whose_stream_stops_after_a_loud_log_gets_an_error(
    fake: tuple[FakeUpstream, str], how: str
) -> None:
    upstream, url = fake

    upstream.on_request = log_then(how)
    upstream.on_get = no_server_stream
    async with raw_bridge(url) as bridge:
        await bridge.send(INITIALIZE)
        assert (await bridge.receive())["id"] == 1
        await bridge.send(INITIALIZED)
        await bridge.send(echo_call(5))
        assert await bridge.receive() == LOUD_LOG
        error = await bridge.receive()
        assert error["id"] == 5
        assert "error" in error


async def huge_json(request: web.Request, body: Any) -> web.StreamResponse | None:
    if body.get("method") != "tools/call":
        return None
    return web.json_response(answer_to(body["id"], text="z" * 300_000))


async def huge_event(request: web.Request, body: Any) -> web.StreamResponse | None:
    if body.get("method") != "tools/call":
        return None
    return await sse_answer(request, sse_message(LOUD_LOG), sse_message(answer_to(body["id"], text="z" * 300_000)))


@pytest.mark.parametrize(("answer", "before"), [(huge_json, []), (huge_event, [LOUD_LOG])], ids=["json", "sse"])
async def test_over_stdio_an_answer_over_max_body_bytes_is_an_error_and_the_bridge_goes_on(
    fake: tuple[FakeUpstream, str], tmp_path: Path, answer: Behaviour, before: list[dict[str, Any]]
) -> None:
    upstream, url = fake
    upstream.on_request = answer
    upstream.on_get = no_server_stream
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nmax_body_bytes = 100000\n\n[upstreams.only]\nurl = "{url}"\n')
    async with bridge_process("--config", str(config), "--name", "only") as bridge:
        await bridge.send(INITIALIZE)
        assert (await bridge.receive())["id"] == 1
        await bridge.send(INITIALIZED)
        await bridge.send(echo_call(6))
        assert [await bridge.receive() for _ in before] == before
        error = await bridge.receive()
        assert error["id"] == 6
        assert "100000-byte limit" in error["error"]["message"]
        upstream.on_request = None
        await bridge.send(ping(7))
        assert (await bridge.receive())["id"] == 7


async def test_over_stdio_a_lone_surrogate_escape_is_written_as_valid_json_everywhere(
    fake: tuple[FakeUpstream, str],
) -> None:
    upstream, url = fake
    cut = '{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"cut \\ud83d"}}'
    after = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "after"}}

    async def cut_emoji(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        text = '{"jsonrpc":"2.0","id":' + str(body["id"]) + ',"result":{"text":"cut \\ud83d"}}'
        return web.Response(text=text, content_type="application/json")

    gets = 0

    async def stream_with_cut_emoji(request: web.Request, body: Any) -> web.StreamResponse | None:
        nonlocal gets
        gets += 1
        if gets > 1:
            await asyncio.Event().wait()
        return await sse_answer(request, f"data: {cut}\n\n".encode(), sse_message(after))

    upstream.on_request = cut_emoji
    upstream.on_get = stream_with_cut_emoji
    async with raw_bridge(url) as bridge:
        await bridge.send(INITIALIZE)
        assert (await bridge.receive())["id"] == 1
        await bridge.send(INITIALIZED)
        received = [await bridge.receive(), await bridge.receive()]
        assert received == [json.loads(cut), after], "the server stream survived the cut emoji"
        await bridge.send(echo_call(8))
        answer = await bridge.receive()
        assert answer == {"jsonrpc": "2.0", "id": 8, "result": {"text": "cut \ud83d"}}


async def test_over_stdio_leaving_after_a_heal_ends_the_healed_upstream_session(fake: tuple[FakeUpstream, str]) -> None:
    upstream, url = fake
    upstream.on_get = no_server_stream
    async with raw_bridge(url) as bridge:
        await bridge.send(INITIALIZE)
        assert (await bridge.receive())["id"] == 1
        await bridge.send(INITIALIZED)
        upstream.forget_all()
        await bridge.send(ping(2))
        assert (await bridge.receive())["id"] == 2
        (healed,) = upstream.sessions
        assert bridge.process.stdin is not None
        bridge.process.stdin.close()
        assert await bridge.wait() == 0
    deletes = [seen.headers.get("Mcp-Session-Id") for seen in upstream.seen if seen.method == "DELETE"]
    assert deletes == [healed]
    assert not upstream.sessions


async def test_shutdown_ends_a_get_stream_that_is_retrying_its_reattach(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    gets = 0

    async def one_stream_then_errors(request: web.Request, body: Any) -> web.StreamResponse | None:
        nonlocal gets
        gets += 1
        if gets == 1:
            return await sse_answer(request, sse_message(LOUD_LOG, "1"))
        return web.Response(status=500)  # the reattach retries, with backoff, for tens of seconds

    upstream.on_get = one_stream_then_errors
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    async with http.get(proxy.url, headers={**session_headers(session_id), "Accept": SSE}) as response:
        await wait_until(lambda: gets >= 3, 10, "the reattach retrying")
        await proxy.app.shutdown()
        async with asyncio.timeout(2):
            await response.read()  # ends at once, not after the retries


async def test_a_client_that_hangs_up_as_its_answer_starts_is_recorded_as_having_left() -> None:
    from mcp_heal_proxy.front.relay import Outcome

    class HungUp:
        async def start(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionResetError("the client closed the connection")

    relay = Relay("t", 1.0, Gauge("open", "open streams", ["upstream"], registry=CollectorRegistry()))
    outcome = Outcome()
    response: Any = ScriptedResponse(ScriptedBody([sse_message(answer_to(1))]))
    exchange: Any = HungUp()
    await relay.relay(exchange, AnswerStream(response, (1,)), "cid", outcome)
    assert outcome.client_left
    assert outcome.status is None
    assert response.released
