"""The upstream's answer to one request, as every front consumes it: framed once, classified once, and
ended with an explicit outcome.

An ``AnswerStream`` wraps one upstream response. Fronts read it piece by piece (``next``): each piece is
the bytes exactly as the upstream sent them (the HTTP front forwards those untouched) and the SSE events
they completed, framed by the one parser (wire/sse.py, the WHATWG rules, whatever the chunking). Each
event is classified once, lazily: a response to request id N, a notification, or a server-to-client
request. When the body stops, ``ending`` says how: it ended as the upstream framed it (``COMPLETE``), or
the upstream broke it (``BROKEN``: connection lost, framing error, read timeout), or the proxy ended a
server stream a heal left on a dead session (``SUPERSEDED``, see engine/streams.py). ``unanswered`` then names
the requests of the POST whose response never came, and ``between_events`` whether the stream stopped
between events. The fronts decide only what to write about it: errors with the ids, a resume, an abort.

Nothing here guesses: event boundaries come from the parser, "answered" from the parsed message's
``id`` and ``result``/``error``, and a body is read until its end, never by one ``read()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any, Final

import aiohttp

from mcp_heal_proxy.errors import AnswerTooLarge, UpstreamTimeout, UpstreamUnavailable, connection_failure
from mcp_heal_proxy.wire.content_coding import decoder_for
from mcp_heal_proxy.wire.headers import CONTENT_ENCODING
from mcp_heal_proxy.wire.jsonrpc import RequestId
from mcp_heal_proxy.wire.sse import Event, Oversized, SSEParser

_NOT_JSON: Final = object()


class StreamSuperseded(aiohttp.ClientConnectionError):
    """What the reader of a server stream meets when the proxy ended it because a heal moved its session on
    (a ClientConnectionError, so that code written for a closed response still applies)."""


def supersede(response: aiohttp.ClientResponse) -> None:
    """End a server stream whose session a heal moved on from: its reader stops at once, ``SUPERSEDED``.
    The exception goes in before the close, which would otherwise wake the reader with its own."""
    response.content.set_exception(StreamSuperseded("a heal moved the session on to a new upstream session"))
    response.close()


class Ending(Enum):
    """How an answer stopped."""

    OPEN = "open"  # still being read
    COMPLETE = "complete"  # the body ended as the upstream framed it
    BROKEN = "broken"  # the upstream broke it: connection lost, framing error, read timeout
    CLIENT_LEFT = "client_left"  # the front gave it up because its client left
    SUPERSEDED = "superseded"  # a server stream the proxy ended: a heal moved its session on


def answered_ids(payload: Any) -> tuple[RequestId, ...]:
    """The request ids a JSON-RPC message (or a 2025-03-26 batch) answers. A response is an object with
    ``result`` or ``error`` and no ``method``; its ``id`` says what it answers. A request, a notification
    (server-to-client ones included) or anything else answers nothing."""
    if isinstance(payload, list):
        return tuple(request_id for item in payload for request_id in answered_ids(item))
    if not isinstance(payload, dict) or isinstance(payload.get("method"), str):
        return ()
    if "result" not in payload and "error" not in payload:
        return ()
    request_id = payload.get("id")
    if request_id is None or (isinstance(request_id, str | int) and not isinstance(request_id, bool)):
        return (request_id,)
    return ()


def _may_answer(data: str) -> bool:
    """Whether an event's JSON can be a response at all, without parsing it: a response has a ``result``
    or ``error`` member, whose name is in the text as such unless written with escapes. Only rules
    parsing out (for notifications, which are most events); whether it answers is decided by the parse."""
    return '"result"' in data or '"error"' in data or "\\u" in data


class AnswerEvent:
    """One SSE event of an answer; its JSON is parsed at most once, when first asked for."""

    __slots__ = ("_payload", "event")

    def __init__(self, event: Event) -> None:
        self.event = event
        self._payload: Any = None

    @property
    def payload(self) -> Any:
        """The event's JSON, or None when its data is not JSON (a priming event, garbage)."""
        if self._payload is None:
            try:
                self._payload = json.loads(self.event.data) if self.event.data else _NOT_JSON
            except (ValueError, RecursionError):
                self._payload = _NOT_JSON
        return None if self._payload is _NOT_JSON else self._payload

    @property
    def answers(self) -> tuple[RequestId, ...]:
        """The request ids this event answers."""
        return answered_ids(self.payload)


class Piece:
    """A part of the body as it arrived: its bytes untouched, the events it completed, and whether the
    body ended with it."""

    __slots__ = ("data", "events", "last")

    def __init__(self, data: bytes, events: list[AnswerEvent], last: bool) -> None:
        self.data = data
        self.events = events
        self.last = last


# ``next`` returns this after ``idle`` seconds without a byte (the moment for a keep-alive).
IDLE: Final = Piece(b"", [], False)


class AnswerStream:
    """One upstream answer, read by one front."""

    __slots__ = (
        "_answers",
        "_decode",
        "_keep_answers",
        "_parser",
        "_prefetched",
        "_request_ids",
        "_waiting",
        "content_length",
        "ending",
        "failure",
        "headers",
        "is_sse",
        "oversized",
        "reason",
        "response",
        "status",
    )

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        request_ids: Iterable[RequestId] = (),
        prefetched: bytes = b"",
        *,
        keep_answers: bool = False,
        parser: SSEParser | None = None,
    ) -> None:
        self.response = response
        self.status = response.status
        self.reason: str | None = response.reason
        self.headers = response.headers
        self.is_sse = response.headers.get("Content-Type", "").startswith("text/event-stream")
        self.content_length = response.content_length
        # An answer compressed against the proxy's wish is forwarded as it is, and read decoded.
        self._decode = decoder_for(response.headers.get(CONTENT_ENCODING))
        # A GET stream reattached upstream continues the client's one stream: it keeps its parser, which
        # then knows what the client's own parser has seen (event ids, a half event).
        self._parser = (parser or SSEParser()) if self.is_sse else None
        self._request_ids = tuple(request_ids)
        # The ids still waiting for their response: events are classified only while some are.
        self._waiting = set(self._request_ids)
        self._keep_answers = keep_answers
        self._answers: dict[RequestId, Mapping[str, Any]] = {}
        self._prefetched = prefetched
        self.ending = Ending.OPEN
        # Why the upstream broke the answer, in words for the log (None unless BROKEN).
        self.failure: str | None = None
        # Events dropped for being over ``max_event_chars`` (whatever they said is unknown).
        self.oversized = 0

    # --- reading --------------------------------------------------------------------------------------

    async def next(self, idle: float | None = None) -> Piece | None:
        """The next piece of the body (waiting for it); ``IDLE`` after ``idle`` seconds without one; None
        once the body stopped (``ending`` says how)."""
        if self._prefetched:
            chunk, self._prefetched = self._prefetched, b""
            return self._piece(chunk)
        if self.ending is not Ending.OPEN:
            return None
        content = self.response.content
        try:
            if idle is None:
                chunk = await content.readany()
            else:
                tick = asyncio.timeout(idle)
                try:
                    async with tick:
                        chunk = await content.readany()
                except TimeoutError:
                    if tick.expired():
                        return IDLE
                    raise  # the upstream read timeout, not the caller's tick
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._broke(exc)
            return None
        if not chunk:
            self.ending = Ending.COMPLETE
            return None
        return self._piece(chunk)

    def arrived(self) -> Piece | None:
        """What of the body is already here, without waiting (None if nothing): lets a front send the
        first bytes, and the end when the answer is already whole, with the response head."""
        chunk, self._prefetched = self._prefetched, b""
        if self.ending is Ending.OPEN:
            # A broken body is seen by the next read.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                chunk += self.response.content.read_nowait()
        return self._piece(chunk) if chunk else None

    async def read_whole(self, limit: int, *, track: bool = True) -> bytes:
        """The rest of the body, read until its end (raw, as the upstream sent it); AnswerTooLarge beyond
        ``limit`` bytes (given up unread), UpstreamUnavailable/UpstreamTimeout if the upstream breaks it.
        A JSON body is classified (``unanswered``) unless ``track`` is False: the HTTP front relays a
        whole JSON answer as it is and has no use for its ids."""
        if self.content_length is not None and self.content_length > limit:
            self.close()
            raise AnswerTooLarge(_too_large(limit))
        if self.content_length is not None and self.ending is Ending.OPEN and not self.is_sse:
            # Hot path (every JSON answer of known length): read() without a size reads until the body's
            # end, in one call, and fails if the upstream breaks it short of its length.
            try:
                rest = await self.response.content.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._broke(exc)
                raise self._broken_error() from exc
            self.ending = Ending.COMPLETE
            body, self._prefetched = self._prefetched + rest, b""
            if track:
                self._note_json(body)
            return body
        chunks: list[bytes] = []
        size = 0
        while (piece := await self.next()) is not None:
            size += len(piece.data)
            if size > limit:
                self.close()
                raise AnswerTooLarge(_too_large(limit))
            chunks.append(piece.data)
        self._raise_if_broken()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if track and not self.is_sse:
            self._note_json(body)
        return body

    async def read_until_answered(self, limit: int) -> bytes:
        """Read until every tracked request has its response, or the body ends (raw bytes read, for the
        front to send on); at most about ``limit`` bytes. For the small answers the proxy must see
        before the client does: an initialize (its negotiated version), a heal's re-initialize."""
        if not self.is_sse:
            return await self.read_whole(limit)
        chunks: list[bytes] = []
        size = 0
        while self._waiting and size < limit:
            piece = await self.next()
            if piece is None:
                break
            chunks.append(piece.data)
            size += len(piece.data)
        self._raise_if_broken()
        return b"".join(chunks)

    def decoded(self, raw: bytes) -> bytes:
        """A whole body read with ``read_whole`` as the proxy should read it (content coding undone)."""
        return raw if self._decode is None else self._decode(raw)

    def bound_events(self, max_event_chars: int) -> None:
        """Drop, as they come, SSE events larger than this (counted in ``oversized``): for a front that
        holds each message whole. Set before reading."""
        if self._parser is not None:
            self._parser.limit = max_event_chars

    # --- what it said ---------------------------------------------------------------------------------

    @property
    def unanswered(self) -> tuple[RequestId, ...]:
        """The tracked requests whose response has not come (yet)."""
        return tuple(request_id for request_id in self._request_ids if request_id in self._waiting)

    def answer(self, request_id: RequestId) -> Mapping[str, Any] | None:
        """The response to ``request_id``, if it came (kept only with ``keep_answers``)."""
        return self._answers.get(request_id)

    @property
    def between_events(self) -> bool:
        """Whether the SSE bytes so far end between events (always True for a JSON body)."""
        return self._parser is None or self._parser.between_events

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event that set one: where a resume with Last-Event-ID starts."""
        return self._parser.last_event_id if self._parser is not None else None

    @property
    def resumable(self) -> bool:
        """Whether a client could resume this SSE answer by GET with Last-Event-ID: it stopped between
        events, and the upstream numbered them."""
        return self.is_sse and self.between_events and self.last_event_id is not None

    @property
    def parser(self) -> SSEParser | None:
        """The SSE parser (None for a JSON body), for a stream that continues this one."""
        return self._parser

    @property
    def reconnection_time(self) -> int | None:
        """The last ``retry:`` of an SSE stream, in milliseconds."""
        return self._parser.reconnection_time if self._parser is not None else None

    def abandon_event(self) -> bytes:
        """Bytes that make the client drop the SSE event the stream stopped in the middle of (b"" between
        events); see SSEParser.abandon_event."""
        return self._parser.abandon_event() if self._parser is not None else b""

    # --- the end --------------------------------------------------------------------------------------

    def release(self) -> None:
        """Hand the upstream connection back (closed, if the body was not read to its end)."""
        self.response.release()

    def close(self) -> None:
        """Give the answer up: the upstream connection is closed, never reused mid-body."""
        if self.ending is Ending.OPEN:
            self.ending = Ending.CLIENT_LEFT
        self.response.close()

    # --- inside ---------------------------------------------------------------------------------------

    def _piece(self, chunk: bytes) -> Piece:
        events: list[AnswerEvent] = []
        parser = self._parser
        if parser is not None:
            text = chunk if self._decode is None else self._decode(chunk)
            for item in parser.feed(text):
                if isinstance(item, Event):
                    event = AnswerEvent(item)
                    events.append(event)
                    if self._waiting and _may_answer(item.data):
                        self._note(event.answers, event.payload)
                elif isinstance(item, Oversized):
                    self.oversized += 1
        last = self.ending is Ending.OPEN and not self._prefetched and self.response.content.at_eof()
        if last:
            self.ending = Ending.COMPLETE
        return Piece(chunk, events, last)

    def _note(self, answered: tuple[RequestId, ...], payload: Any) -> None:
        for request_id in answered:
            if request_id in self._waiting:
                self._waiting.discard(request_id)
                if self._keep_answers:
                    for message in payload if isinstance(payload, list) else [payload]:
                        if isinstance(message, dict) and message.get("id") == request_id:
                            self._answers[request_id] = message

    def _note_json(self, body: bytes) -> None:
        if not self._waiting:
            return
        try:
            payload = json.loads(self.decoded(body))
        except (ValueError, RecursionError):
            return
        self._note(answered_ids(payload), payload)

    def _broke(self, exc: BaseException) -> None:
        if isinstance(exc, StreamSuperseded):
            self.ending = Ending.SUPERSEDED
            return
        self.ending = Ending.BROKEN
        self.failure = "read timeout" if isinstance(exc, TimeoutError) else connection_failure(exc).words

    def _raise_if_broken(self) -> None:
        if self.ending is Ending.BROKEN:
            raise self._broken_error()

    def _broken_error(self) -> UpstreamUnavailable | UpstreamTimeout:
        if self.failure == "read timeout":
            return UpstreamTimeout("upstream MCP server stopped answering mid-body")
        return UpstreamUnavailable(f"upstream MCP server broke its answer: {self.failure}")


def _too_large(limit: int) -> str:
    return f"upstream MCP server's answer is over the {limit}-byte limit (max_body_bytes); it was not relayed"
