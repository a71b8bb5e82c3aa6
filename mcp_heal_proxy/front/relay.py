"""Writing upstream answers to the client: whole JSON answers in one write, SSE streams as they arrive.

A ``Relay`` belongs to one upstream's handlers. It fills silent SSE streams with keep-alive comments,
ends a stream the upstream broke with a JSON-RPC error for every request still unanswered, remembers
the requests a client may resume by GET with ``Last-Event-ID``, keeps a GET stream open across a heal
by reattaching upstream (with backoff, never sooner than the server's ``retry:``), and ends GET streams
cleanly at shutdown.

Two failures are kept apart: the upstream breaking its answer (logged, errors sent to the client,
a GET stream reattached) and the client leaving (``ClientLeft``: nothing more is sent, nothing is
reattached, and the request is recorded as the client left it).
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final

import aiohttp
import structlog
from prometheus_client import Gauge

from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.engine.answers import IDLE, AnswerStream, Ending, Piece
from mcp_heal_proxy.errors import ProxyError, UpstreamUnavailable
from mcp_heal_proxy.front.exchange import Exchange
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.wire import jsonrpc
from mcp_heal_proxy.wire.headers import client_response_headers
from mcp_heal_proxy.wire.jsonrpc import PostBody, RequestId
from mcp_heal_proxy.wire.sse import Event, encode_comment, encode_event

log = structlog.get_logger("mcp_heal_proxy.front.relay")

_KEEPALIVE: Final = encode_comment("keep-alive")
# Non-SSE answers up to this size are relayed whole (one write); larger ones stream chunk by chunk.
WHOLE_ANSWER_LIMIT: Final = 1024 * 1024
_BROKEN: Final = "upstream MCP server broke the stream before answering; the request was not replayed (it may have run)"
_NOT_RESUMABLE: Final = (
    "upstream MCP server lost the stream this answer was on (its session ended); "
    "the request was not replayed (it may have run)"
)
# Reattaching a GET stream the upstream ended cleanly: servers may end SSE streams on purpose and expect
# the client to come back after the ``retry:`` they sent. Never sooner than that, and with a growing delay
# when streams keep ending at once; a stream that lived this long resets the delay.
_REATTACH_FIRST: Final = 0.25
_REATTACH_MAX: Final = 30.0
_STREAM_LIVED: Final = 30.0
# Answers a client may still resume by GET with Last-Event-ID, remembered per stream; the oldest go first.
_RESUMES_KEPT: Final = 1024

# Opens a new upstream GET stream (resuming from the event id, if given); None when there is none to open.
Reattach = Callable[[str | None], Coroutine[Any, Any, aiohttp.ClientResponse | None]]


class ClientLeft(Exception):
    """The client closed its connection while its answer was being written."""


class Outcome:
    """What happened to one request on its way, for the request log: filled in as it happens, so that a
    handler cancelled by the client's hang-up still logs what the client got."""

    __slots__ = ("body", "client_left", "ended_by_proxy", "healed", "status", "upstream_broke")

    def __init__(self) -> None:
        # The POST body once parsed (its method names the request in the log; its ids go into errors).
        self.body: PostBody | None = None
        self.healed = False
        self.client_left = False
        # The upstream broke its answer after the client's response started.
        self.upstream_broke = False
        # The proxy's stop ended the request (its grace ran out, or a second Ctrl-C).
        self.ended_by_proxy = False
        # The status the client was sent, once a response started (None before).
        self.status: int | None = None


class PendingResume:
    """Requests still unanswered when an upstream ended a resumable SSE answer between events."""

    __slots__ = ("generation", "request_ids")

    def __init__(self, generation: int, request_ids: tuple[RequestId, ...]) -> None:
        self.generation = generation
        self.request_ids = request_ids


async def _send(exchange: Exchange, data: bytes) -> None:
    """Write to the client; its hang-up is ClientLeft, never taken for an upstream failure."""
    try:
        await exchange.write(data)
    except ConnectionError as exc:
        raise ClientLeft from exc


def error_events(request_ids: Iterable[RequestId], message: str) -> bytes:
    """SSE events carrying a JSON-RPC error for each request id. Written between events only (a half event
    is abandoned first: SSEParser.abandon_event), so they need no blank line before them."""
    return b"".join(
        encode_event(Event(data=json.dumps(jsonrpc.error_object(request_id, UpstreamUnavailable.code, message))))
        for request_id in request_ids
    )


class Relay:
    """Relays one upstream's answers to clients."""

    def __init__(self, upstream_name: str, keepalive_interval: float, open_streams: Gauge) -> None:
        self._name = upstream_name
        # A zero or negative interval would turn the keep-alive tick into a busy loop.
        self._keepalive_interval = max(keepalive_interval, 1.0)
        # The gauge's child for this upstream, bound once (labels() takes a lock on every call).
        self._open_streams = open_streams.labels(upstream_name)
        # Open GET streams' upstream responses, so that shutdown can end them cleanly.
        self._server_streams: set[aiohttp.ClientResponse] = set()
        self._closing = asyncio.Event()
        self._resumes: collections.OrderedDict[tuple[str, str], PendingResume] = collections.OrderedDict()

    def end_server_streams(self) -> None:
        """Shutdown: end every GET stream cleanly now, so clients reconnect to the next proxy.

        GET streams carry server-initiated messages and never finish by themselves; POST answers (tool
        calls in flight) are left to finish within the shutdown grace period.
        """
        self._closing.set()
        for upstream in list(self._server_streams):
            upstream.close()

    def take_resume(self, client_session_id: str, last_event_id: str) -> PendingResume | None:
        """The requests a GET with this Last-Event-ID resumes, if it resumes an answer this relay saw break."""
        return self._resumes.pop((client_session_id, last_event_id), None)

    def _remember_resume(self, client_session_id: str, event_id: str, pending: PendingResume) -> None:
        self._resumes[(client_session_id, event_id)] = pending
        while len(self._resumes) > _RESUMES_KEPT:
            self._resumes.popitem(last=False)

    async def relay(
        self,
        exchange: Exchange,
        stream: AnswerStream,
        client_session_id: str | None,
        outcome: Outcome,
        *,
        generation: int = 0,
        reattach: Reattach | None = None,
    ) -> None:
        """Send an upstream answer to the client as it arrives, with the client's session id.

        For an SSE answer to requests, each request whose response never came gets a JSON-RPC error event
        (it is not replayed: the tool may have run), or, when the client can resume the stream (event
        ids, stopped between events), the requests are remembered for that resume (``take_resume``). A
        JSON answer the upstream breaks after it started is aborted, never ended as if whole.
        ``reattach`` opens a new upstream stream when a GET stream ends while the client still listens.
        """
        try:
            if not stream.is_sse and stream.content_length is not None and stream.content_length <= WHOLE_ANSWER_LIMIT:
                # A JSON answer of known length is one message, not a stream: read it whole, then send
                # headers and body in one write (a quarter of the time of streaming it).
                body = await stream.read_whole(WHOLE_ANSWER_LIMIT, track=False)
                headers = client_response_headers(stream.headers, client_session_id)
                await exchange.answer(stream.status, body, headers, stream.reason)
                return
            headers = client_response_headers(stream.headers, client_session_id)
            if stream.is_sse:
                # Tell any buffering proxy in front of us (nginx) to pass events through at once: ours, once,
                # whatever the upstream said.
                headers = [(name, value) for name, value in headers if name.lower() != "x-accel-buffering"]
                headers.append(("X-Accel-Buffering", "no"))
            # What already arrived goes out with the headers (and, when the answer is whole, with its
            # end): one write instead of three. A client waiting for a slow first event gets the headers
            # as soon as the upstream sent them.
            first = stream.arrived() if reattach is None else None
            length = None if stream.is_sse else stream.content_length
            try:
                await exchange.start(stream.status, stream.reason, headers, hold=first is not None, length=length)
            except ConnectionError:
                # The client hung up as its answer started: it left, nothing went wrong upstream.
                outcome.client_left = True
                stream.close()
                return
            outcome.status = stream.status
            streams = self._open_streams
            streams.inc()
            try:
                if reattach is not None:
                    await self._relay_server_stream(exchange, stream, reattach, outcome)
                else:
                    await self._relay_answer(exchange, stream, client_session_id, generation, first, outcome)
            except ClientLeft:
                outcome.client_left = True
                stream.close()
            finally:
                streams.dec()
        finally:
            stream.release()

    async def _relay_answer(
        self,
        exchange: Exchange,
        stream: AnswerStream,
        client_session_id: str | None,
        generation: int,
        first: Piece | None,
        outcome: Outcome,
    ) -> None:
        """The answer to a POST (or a resumed one): forwarded until it stops, then ended by what the
        stream says of its end."""
        tail = await self._forward(exchange, stream, first)
        if not stream.is_sse:
            if stream.ending is Ending.COMPLETE:
                await _end(exchange, tail)
                return
            self._abort(exchange, stream, outcome)
            return
        owed = stream.unanswered
        if not owed:
            if stream.ending is Ending.COMPLETE or stream.between_events:
                # Every response came; a stream that stopped between events lost nothing the client
                # waits for (MCP clients stop reading once their responses came).
                await _end(exchange, tail)
                return
            self._abort(exchange, stream, outcome)
            return
        # Stopped with requests unanswered: broken, or ended by a server that meant the client to resume.
        if stream.ending is Ending.BROKEN:
            outcome.upstream_broke = True
            self._log_broken(stream)
        last_event_id = stream.last_event_id
        if stream.resumable and last_event_id is not None and client_session_id is not None:
            # The client can resume this stream by GET with Last-Event-ID (the spec's way to finish an
            # answer after the stream closed early): remember what it waits for, in case the upstream
            # cannot honour the resume.
            self._remember_resume(client_session_id, last_event_id, PendingResume(generation, owed))
            await _end(exchange, tail)
            return
        # The client could only wait forever: a JSON-RPC error for each request owed, after dropping the
        # event the stream stopped in the middle of.
        log.warning("upstream.stream_broken_before_answer", upstream=self._name, unanswered=len(owed))
        await _end(exchange, tail + stream.abandon_event() + error_events(owed, _BROKEN))

    async def _relay_server_stream(
        self, exchange: Exchange, stream: AnswerStream, reattach: Reattach, outcome: Outcome
    ) -> None:
        """A GET stream: forwarded, and reattached upstream whenever the upstream ends or breaks it while
        the client still listens (after a heal, or a server that closes streams on purpose), with
        backoff. An event the upstream broke off is dropped (the resume with Last-Event-ID asks the
        server for it again), so that the stream goes on whole."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=_REATTACH_FIRST, maximum=_REATTACH_MAX)
        self._server_streams.add(stream.response)
        try:
            while True:
                opened = loop.time()
                tail = await self._forward(exchange, stream, None)
                await _send(exchange, tail + stream.abandon_event())
                if self._closing.is_set():
                    await _end(exchange)
                    return
                if stream.ending is Ending.BROKEN:
                    self._log_broken(stream)
                self._server_streams.discard(stream.response)
                stream.release()
                if loop.time() - opened >= _STREAM_LIVED:
                    backoff.reset()
                retry = stream.reconnection_time
                delay = backoff.next_delay(at_least=retry / 1000 if retry is not None else 0.0)
                log.info("stream.reattach_wait", upstream=self._name, delay_s=round(delay, 3), retry_ms=retry)
                if not await self._wait_keeping_alive(exchange, delay):
                    await _end(exchange)
                    return  # shutting down
                try:
                    response = await self._unless_closing(reattach(stream.last_event_id))
                except ProxyError as exc:
                    # The stream already started: end it (the client reconnects), never answer twice.
                    log.warning("stream.reattach_failed", upstream=self._name, error=exc.message)
                    response = None
                if response is None:
                    await _end(exchange)
                    return
                stream = AnswerStream(response, parser=stream.parser)
                self._server_streams.add(response)
        finally:
            self._server_streams.discard(stream.response)
            stream.release()

    async def _unless_closing(
        self, opening: Coroutine[Any, Any, aiohttp.ClientResponse | None]
    ) -> aiohttp.ClientResponse | None:
        """Open a stream, unless shutdown begins first (then None): a reattach that retries with backoff
        must not hold shutdown up."""
        owner = TaskOwner()
        task = owner.spawn(opening, name="reattach")
        closing = owner.spawn(self._closing.wait(), name="reattach-closing")
        try:
            await asyncio.wait((task, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            await owner.close()
            if task.done() and not task.cancelled() and task.exception() is None and self._closing.is_set():
                response = task.result()
                if response is not None:
                    response.release()
        if task.cancelled() or self._closing.is_set():
            return None
        return task.result()

    async def _wait_keeping_alive(self, exchange: Exchange, delay: float) -> bool:
        """Wait ``delay`` seconds, keeping the client's stream alive; False if shutdown began meanwhile.

        One clock, the loop's, for the deadline and the timers; a keep-alive only after a full interval
        of waiting, and the last, shorter wait ends the delay whatever the clock then says: the loop's
        coarser timer may wake a hair early, which must not turn into a burst of keep-alives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        interval = self._keepalive_interval
        while (left := deadline - loop.time()) > 0:
            step = min(left, interval)
            try:
                async with asyncio.timeout(step):
                    await self._closing.wait()
                return False
            except TimeoutError:
                pass
            if step < interval:
                break
            await _send(exchange, _KEEPALIVE)
        return not self._closing.is_set()

    async def _forward(self, exchange: Exchange, stream: AnswerStream, first: Piece | None) -> bytes:
        """Copy the body to the client until it stops, filling an SSE stream's silences with keep-alive
        comments (only between events, as the parser says: a comment inside an event would corrupt it).
        Returns the last piece unwritten when the body ended with it (the caller writes it with the end of
        the response); a failed write to the client raises ClientLeft."""
        idle = self._keepalive_interval if stream.is_sse else None
        piece = first
        while True:
            if piece is None:
                piece = await stream.next(idle)
                if piece is None:
                    return b""
                if piece is IDLE:
                    if stream.between_events:
                        await _send(exchange, _KEEPALIVE)
                    piece = None
                    continue
            if piece.last:
                return piece.data
            await _send(exchange, piece.data)
            piece = None

    def _abort(self, exchange: Exchange, stream: AnswerStream, outcome: Outcome) -> None:
        """The upstream broke an answer already under way: cut the client's connection, so that the
        client sees an answer cut short instead of a whole one (as mitmproxy and uvicorn do)."""
        outcome.upstream_broke = True
        self._log_broken(stream)
        exchange.abort()

    def _log_broken(self, stream: AnswerStream) -> None:
        if stream.ending is Ending.BROKEN and not self._closing.is_set():
            log.warning("upstream.stream_broken", upstream=self._name, error=stream.failure)


async def _end(exchange: Exchange, tail: bytes = b"") -> None:
    """End the response; the client's hang-up is ClientLeft."""
    try:
        await exchange.end(tail)
    except ConnectionError as exc:
        raise ClientLeft from exc


async def answer_unresumable(
    exchange: Exchange, client_session_id: str, request_ids: tuple[RequestId, ...], outcome: Outcome
) -> None:
    """Answer a resume the upstream cannot honour: an SSE stream with an error for each request it was
    waiting for, then its end, so that the client stops waiting at once."""
    headers = [
        ("Content-Type", "text/event-stream"),
        ("Cache-Control", "no-cache"),
        ("Mcp-Session-Id", client_session_id),
    ]
    try:
        await exchange.start(200, None, headers, hold=True)
        outcome.status = 200
        await exchange.end(error_events(request_ids, _NOT_RESUMABLE))
    except ConnectionError:
        outcome.client_left = True
