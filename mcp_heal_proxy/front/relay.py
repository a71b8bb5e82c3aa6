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
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import aiohttp
import structlog
from prometheus_client import Gauge

from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.engine.answers import AnswerTracker
from mcp_heal_proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from mcp_heal_proxy.front.exchange import Exchange
from mcp_heal_proxy.wire import jsonrpc
from mcp_heal_proxy.wire.headers import client_response_headers
from mcp_heal_proxy.wire.jsonrpc import PostBody, RequestId
from mcp_heal_proxy.wire.sse import Event, SSEParser, encode_comment, encode_event

log = structlog.get_logger("mcp_heal_proxy.front.relay")

_KEEPALIVE: Final = encode_comment("keep-alive")
# Non-SSE answers up to this size are relayed whole (one write); larger ones stream chunk by chunk.
WHOLE_ANSWER_LIMIT: Final = 1024 * 1024
_EVENT_ENDS: Final = (b"\n\n", b"\r\n\r\n", b"\r\r")
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
Reattach = Callable[[str | None], Awaitable[aiohttp.ClientResponse | None]]


class ClientLeft(Exception):
    """The client closed its connection while its answer was being written."""


class Outcome:
    """What happened to one request on its way, for the request log: filled in as it happens, so that a
    handler cancelled by the client's hang-up still logs what the client got."""

    __slots__ = ("body", "client_left", "healed", "status")

    def __init__(self) -> None:
        # The POST body once parsed (its method names the request in the log; its ids go into errors).
        self.body: PostBody | None = None
        self.healed = False
        self.client_left = False
        # The status the client was sent, once a response started (None before).
        self.status: int | None = None


class PendingResume:
    """Requests still unanswered when an upstream ended a resumable SSE answer between events."""

    __slots__ = ("generation", "request_ids")

    def __init__(self, generation: int, request_ids: tuple[RequestId, ...]) -> None:
        self.generation = generation
        self.request_ids = request_ids


def _arrived(upstream: aiohttp.ClientResponse) -> bytes:
    """What of the body already arrived, without waiting; a broken body is left for the next read."""
    try:
        return upstream.content.read_nowait()
    except (aiohttp.ClientError, TimeoutError):
        return b""


async def _send(exchange: Exchange, data: bytes) -> None:
    """Write to the client; its hang-up is ClientLeft, never taken for an upstream failure."""
    try:
        await exchange.write(data)
    except ConnectionError as exc:
        raise ClientLeft from exc


def error_events(request_ids: Iterable[RequestId], message: str) -> bytes:
    """SSE events carrying a JSON-RPC error for each request id (a leading blank line ends any half event)."""
    return b"\n\n" + b"".join(
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
        upstream: aiohttp.ClientResponse,
        client_session_id: str | None,
        outcome: Outcome,
        prefetched: bytes = b"",
        *,
        tracker: AnswerTracker | None = None,
        generation: int = 0,
        reattach: Reattach | None = None,
    ) -> None:
        """Send an upstream answer to the client as it arrives, with the client's session id.

        ``tracker`` watches the answer for responses: if the upstream breaks the stream first, each
        unanswered request gets a JSON-RPC error event (it is not replayed: the tool may have run), or,
        when the client can resume the stream (event ids, ended between events), the requests are
        remembered for that resume (``take_resume``). ``reattach`` opens a new upstream stream when a
        GET stream ends while the client still listens.
        """
        observe = tracker.feed if tracker is not None else None
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        length = upstream.content_length
        if not is_sse and length is not None and length <= WHOLE_ANSWER_LIMIT:
            # A JSON answer of known length is one message, not a stream: send headers and body in one
            # write. Streaming it cost a write per chunk plus chunked framing (a quarter of the time).
            await self._relay_whole(exchange, upstream, client_session_id, prefetched, observe)
            return
        streams = self._open_streams
        # An SSE answer's events that already arrived go out with the headers (and, when the answer is
        # complete, with its end): one write instead of three.
        first = _arrived(upstream) if is_sse and reattach is None and not prefetched else b""
        tail = b""
        try:
            headers = client_response_headers(upstream.headers, client_session_id)
            if is_sse:
                # Tell any buffering proxy in front of us (nginx) to pass events through at once: ours, once,
                # whatever the upstream said.
                headers = [(name, value) for name, value in headers if name.lower() != "x-accel-buffering"]
                headers.append(("X-Accel-Buffering", "no"))
            # Headers wait for the first write only when it follows at once: a client waiting for a slow
            # first event gets the headers as soon as the upstream sent them.
            await exchange.start(upstream.status, upstream.reason, headers, hold=bool(first or prefetched))
            outcome.status = upstream.status
            streams.inc()
            try:
                if prefetched:
                    await _send(exchange, prefetched)
                    if observe is not None:
                        observe(prefetched)
                if reattach is not None:
                    await self._relay_server_stream(exchange, upstream, reattach)
                else:
                    tail = await self._relay_answer(
                        exchange, upstream, is_sse, tracker, client_session_id, generation, first
                    )
            except ClientLeft:
                outcome.client_left = True
                return
            finally:
                streams.dec()
            try:
                await exchange.end(tail)
            except ConnectionError:
                outcome.client_left = True
        finally:
            upstream.release()

    async def _relay_answer(
        self,
        exchange: Exchange,
        upstream: aiohttp.ClientResponse,
        is_sse: bool,
        tracker: AnswerTracker | None,
        client_session_id: str | None,
        generation: int,
        first: bytes = b"",
    ) -> bytes:
        """The answer to a POST (or a resumed one): forwarded until it ends, then errors for what it lost.

        Returns the bytes the answer ended with when they are still to be written: the caller writes
        them with the end of the response."""
        observe = tracker.feed if tracker is not None else None
        if not is_sse:
            await self._pump(upstream, exchange, observe)
            return b""
        held: list[bytes] = []
        between_events = await self._pump_sse(upstream, exchange, observe, first, held)
        tail = b"".join(held)
        if tracker is None or not tracker.may_be_unanswered():
            return tail
        if tail:
            await _send(exchange, tail)
        last_event_id = tracker.last_event_id
        if between_events and last_event_id is not None and client_session_id is not None:
            # The client can resume this stream by GET with Last-Event-ID (the spec's way to finish an
            # answer after the stream closed early): remember what it waits for, in case the upstream
            # cannot honour the resume.
            unanswered = tracker.unanswered()
            if unanswered:
                self._remember_resume(client_session_id, last_event_id, PendingResume(generation, tuple(unanswered)))
            return b""
        # Broken mid-event, or closed without the answer by a server the client cannot resume from (no
        # event ids): the client would wait forever.
        await self.finish_unanswered(exchange, tracker.unanswered(), _BROKEN)
        return b""

    async def _relay_server_stream(
        self, exchange: Exchange, upstream: aiohttp.ClientResponse, reattach: Reattach
    ) -> None:
        """A GET stream: forwarded, and reattached upstream whenever the upstream ends it while the client
        still listens (after a heal, or a server that closes streams on purpose), with backoff."""
        backoff = Backoff(first=_REATTACH_FIRST, maximum=_REATTACH_MAX)
        self._server_streams.add(upstream)
        try:
            while True:
                opened = time.monotonic()
                watch = SSEParser()
                between_events = await self._pump_sse(upstream, exchange, watch.feed)
                if not between_events or self._closing.is_set():
                    return
                self._server_streams.discard(upstream)
                upstream.release()
                if time.monotonic() - opened >= _STREAM_LIVED:
                    backoff.reset()
                retry = watch.reconnection_time
                delay = backoff.next_delay(at_least=retry / 1000 if retry is not None else 0.0)
                log.info("stream.reattach_wait", upstream=self._name, delay_s=round(delay, 3), retry_ms=retry)
                if not await self._wait_keeping_alive(exchange, delay):
                    return  # shutting down
                try:
                    next_upstream = await reattach(watch.last_event_id)
                except ProxyError as exc:
                    # The stream already started: end it (the client reconnects), never answer twice.
                    log.warning("stream.reattach_failed", upstream=self._name, error=exc.message)
                    return
                if next_upstream is None:
                    return
                upstream = next_upstream
                self._server_streams.add(upstream)
        finally:
            self._server_streams.discard(upstream)
            upstream.release()

    async def _wait_keeping_alive(self, exchange: Exchange, delay: float) -> bool:
        """Wait ``delay`` seconds, keeping the client's stream alive; False if shutdown began meanwhile."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(min(left, self._keepalive_interval)):
                    await self._closing.wait()
                return False
            except TimeoutError:
                if deadline - time.monotonic() > 0:
                    await _send(exchange, _KEEPALIVE)
        return not self._closing.is_set()

    async def _relay_whole(
        self,
        exchange: Exchange,
        upstream: aiohttp.ClientResponse,
        client_session_id: str | None,
        prefetched: bytes,
        observe: Callable[[bytes], None] | None,
    ) -> None:
        """Relay a complete answer of known, bounded length as one response."""
        try:
            body = prefetched + await upstream.content.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("upstream MCP server stopped answering mid-body") from exc
        except aiohttp.ClientError as exc:
            # Nothing was sent to the client yet, so it still gets a proper error with its request's id.
            raise UpstreamUnavailable(f"upstream MCP server broke its answer: {type(exc).__name__}") from exc
        finally:
            upstream.release()
        if observe is not None:
            observe(body)
        await exchange.answer(
            upstream.status, body, client_response_headers(upstream.headers, client_session_id), upstream.reason
        )

    async def finish_unanswered(self, exchange: Exchange, unanswered: list[RequestId], why: str) -> None:
        """End a stream with an error event for every request still unanswered."""
        if not unanswered:
            return
        log.warning("upstream.stream_broken_before_answer", upstream=self._name, unanswered=len(unanswered))
        await _send(exchange, error_events(unanswered, why))

    async def _pump(
        self, upstream: aiohttp.ClientResponse, exchange: Exchange, observe: Callable[[bytes], None] | None
    ) -> bool:
        """Copy a non-SSE body; True if it ended cleanly."""
        content = upstream.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("upstream.stream_broken", upstream=self._name, error=type(exc).__name__)
                return False
            if not chunk:
                return True
            await _send(exchange, chunk)
            if observe is not None:
                observe(chunk)

    async def _pump_sse(
        self,
        upstream: aiohttp.ClientResponse,
        exchange: Exchange,
        observe: Callable[[bytes], object] | None,
        first: bytes = b"",
        held: list[bytes] | None = None,
    ) -> bool:
        """Copy an SSE body, filling silences with keep-alive comments; True if it ended between events.

        ``first`` is what was already taken from the body. With ``held``, the chunk after which the body
        has ended is put there instead of written (the caller writes it with the response's end).
        Only the upstream read is guarded here: a failed write to the client raises ClientLeft.
        """
        content = upstream.content
        interval = self._keepalive_interval
        at_boundary = True
        chunk = first
        while True:
            if not chunk:
                idle = asyncio.timeout(interval)
                try:
                    async with idle:
                        chunk = await content.readany()
                except TimeoutError:
                    if not idle.expired():
                        self._log_broken("ReadTimeout")  # the upstream read timeout, not our keep-alive tick
                        return at_boundary
                    if at_boundary:
                        # Only between events: a comment inside an event would corrupt it.
                        await _send(exchange, _KEEPALIVE)
                    continue
                except aiohttp.ClientError as exc:
                    self._log_broken(type(exc).__name__)
                    return at_boundary
                if not chunk:
                    return at_boundary
            at_boundary = chunk.endswith(_EVENT_ENDS)
            if held is not None and content.at_eof():
                held.append(chunk)
                if observe is not None:
                    observe(chunk)
                return at_boundary
            await _send(exchange, chunk)
            if observe is not None:
                observe(chunk)
            chunk = b""

    def _log_broken(self, error: str) -> None:
        if not self._closing.is_set():
            log.warning("upstream.stream_broken", upstream=self._name, error=error)


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
