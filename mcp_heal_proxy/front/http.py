"""The HTTP front: aiohttp handlers for one upstream's MCP endpoint (POST, GET, DELETE).

A request's life here: read and classify the body once, find the client's session, hand the message
to the session engine (engine/session.py: upstream side, expiry, heal, replay), and relay the answer back chunk
by chunk as it arrives (front/relay.py). Every request is logged and counted once, from a ``finally``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Counter

from mcp_heal_proxy.bridge import http as bridged
from mcp_heal_proxy.bridge.core import BridgedOpen, is_bridged
from mcp_heal_proxy.engine.answers import AnswerStream
from mcp_heal_proxy.engine.housekeeping import SessionActivity
from mcp_heal_proxy.engine.session import DELETE_GONE, SessionEngine
from mcp_heal_proxy.errors import (
    InvalidRequest,
    ProxyError,
    TooManyStreams,
    UnsupportedMediaType,
    UpstreamUnavailable,
    unexpected_failure,
)
from mcp_heal_proxy.front.exchange import AiohttpExchange, Exchange
from mcp_heal_proxy.front.relay import Outcome, PendingResume, Relay, answer_unresumable
from mcp_heal_proxy.observability import Metrics, method_label
from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.wire import jsonrpc
from mcp_heal_proxy.wire.headers import LAST_EVENT_ID, MCP_PROTOCOL_VERSION, MCP_SESSION_ID
from mcp_heal_proxy.wire.jsonrpc import Kind, PostBody

if TYPE_CHECKING:
    from mcp_heal_proxy.otel import RequestTrace, Telemetry

log = structlog.get_logger("mcp_heal_proxy.front.http")

# What the request log says of a client that hung up before any answer started (as nginx does).
CLIENT_LEFT_STATUS: Final = 499


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The per-app settings handlers need."""

    max_body_bytes: int
    keepalive_interval: float
    max_sessions: int = 10_000
    max_streams_per_session: int = 32
    stream_slot_wait: float = 60.0


@dataclass(slots=True)
class _SessionSlots:
    """One session's slots: how many are held, and who waits for one (first come, first served)."""

    held: int = 0
    waiting: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class StreamSlots:
    """Bounds the requests each session has in flight, so that one client cannot take the upstream's
    pool; a request over the bound waits for a slot, in arrival order, for at most ``wait`` seconds
    (a transparent proxy must not refuse what the server would serve). A session holding a slot is in
    use (``activity``: never idle-expired, evicted last)."""

    __slots__ = ("_activity", "_limit", "_sessions", "_wait")

    def __init__(self, limit: int, activity: SessionActivity, wait: float = 60.0) -> None:
        self._limit = limit
        self._activity = activity
        self._wait = wait
        self._sessions: dict[str, _SessionSlots] = {}

    def slot(self, client_session_id: str) -> _Slot:
        """Hold one of the session's slots for the duration of a request (``async with``), waiting for
        one if need be; gives whether it waited."""
        return _Slot(self, client_session_id)

    async def _wait_for(self, client_session_id: str, slots: _SessionSlots) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slots.waiting.append(waiter)
        try:
            async with asyncio.timeout(self._wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release(client_session_id, slots)  # handed a slot as the wait ended: pass it on
            else:
                waiter.cancel()
                slots.waiting.remove(waiter)
                if not slots.held and not slots.waiting:
                    del self._sessions[client_session_id]
            if isinstance(exc, TimeoutError):
                raise TooManyStreams(
                    f"this session has {self._limit} requests in flight (max_streams_per_session) and none "
                    f"ended within stream_slot_wait ({self._wait:g} s)"
                ) from None
            raise

    def waiting(self, client_session_id: str) -> int:
        """How many requests of the session wait for a slot."""
        slots = self._sessions.get(client_session_id)
        return sum(not waiter.done() for waiter in slots.waiting) if slots is not None else 0

    def _release(self, client_session_id: str, slots: _SessionSlots) -> None:
        """Hand the slot to the first waiter still waiting, or give it back."""
        while slots.waiting:
            waiter = slots.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        slots.held -= 1
        if not slots.held:
            del self._sessions[client_session_id]


class _Slot:
    """One request's hold on a slot of its session (a class, not a generator: it is on every request)."""

    __slots__ = ("_client_session_id", "_owner", "_slots")

    def __init__(self, owner: StreamSlots, client_session_id: str) -> None:
        self._owner = owner
        self._client_session_id = client_session_id
        self._slots: _SessionSlots | None = None

    async def __aenter__(self) -> bool:
        owner, cid = self._owner, self._client_session_id
        slots = owner._sessions.get(cid)
        if slots is None:
            slots = owner._sessions[cid] = _SessionSlots()
        waited = slots.held >= owner._limit or bool(slots.waiting)
        if waited:
            await owner._wait_for(cid, slots)
        else:
            slots.held += 1
        self._slots = slots
        owner._activity.begin_use(cid)
        return waited

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._slots is not None
        self._owner._activity.end_use(self._client_session_id)
        self._owner._release(self._client_session_id, self._slots)


_JSON: Final = (("Content-Type", "application/json"),)


async def answer_error(exchange: Exchange, exc: ProxyError, body: PostBody | None) -> None:
    """The one place that turns a ProxyError into an HTTP answer with a JSON-RPC error body."""
    if body is not None:
        request_ids = body.request_ids or (None,)
        payload = jsonrpc.error_body(request_ids, exc.code, exc.message, is_batch=body.is_batch)
    else:
        payload = jsonrpc.error_body((exc.request_id,), exc.code, exc.message, is_batch=False)
    await exchange.answer(exc.http_status, payload, _JSON)


class Proxy:
    """The HTTP front of one upstream's MCP endpoint: aiohttp handlers over the session engine."""

    def __init__(self, engine: SessionEngine, metrics: Metrics, settings: ProxySettings) -> None:
        self._engine = engine
        self._slots = StreamSlots(settings.max_streams_per_session, engine.activity, settings.stream_slot_wait)
        self._relay = Relay(engine.name, settings.keepalive_interval, metrics.open_streams)
        self._upstream = engine.upstream
        self._name = engine.name
        self._metrics = metrics
        self._settings = settings
        # OpenTelemetry (mcp_heal_proxy/otel.py), None when off: one check per request.
        self._otel = metrics.otel
        # The request counter's children bound once per (method label, status), as they occur: labels()
        # takes a lock and builds a key on every call.
        self._request_counts: dict[tuple[str, int], Counter] = {}
        # Calls being answered (POST, DELETE; GET streams are ended at shutdown on their own), so that a
        # stop can say how many it waits for, and a second Ctrl-C can end them.
        self._calls: set[asyncio.Task[object]] = set()
        self._stopping = False

    # --- aiohttp's handlers -----------------------------------------------------------------------

    async def post(self, request: web.Request) -> web.StreamResponse:
        """POST as an aiohttp handler (the proxy's own server calls ``handle_post`` directly)."""
        exchange = AiohttpExchange(request)
        await self.handle_post(exchange)
        return _answered(exchange)

    async def get(self, request: web.Request) -> web.StreamResponse:
        """GET as an aiohttp handler."""
        exchange = AiohttpExchange(request)
        await self.handle_get(exchange)
        return _answered(exchange)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        """DELETE as an aiohttp handler."""
        exchange = AiohttpExchange(request)
        await self.handle_delete(exchange)
        return _answered(exchange)

    # --- POST -------------------------------------------------------------------------------------

    async def handle_post(self, exchange: Exchange) -> None:
        """Forward a client's JSON-RPC message(s)."""
        await self._handle(exchange, None, lambda outcome: self._read_and_post(exchange, outcome))

    async def _handle(self, exchange: Exchange, method: str | None, work: Callable[[Outcome], Awaitable[None]]) -> None:
        """One request, start to end: its failures answered as JSON-RPC errors, and the request logged and
        counted once, in a ``finally``: a client that hangs up cancels the handler, and its request is still
        recorded with the status it got (499 when it left before any answer). ``method`` names it in the log,
        or (None) the method of its POST body once parsed."""
        started = time.perf_counter()
        outcome = RequestOutcome()
        task = asyncio.current_task() if method != "GET" else None
        if task is not None:
            self._calls.add(task)
        try:
            await self._answer_errors(exchange, work(outcome), outcome)
        except asyncio.CancelledError:
            if self._stopping:
                outcome.ended_by_proxy = True  # the stop's grace ran out, or a second Ctrl-C
            else:
                outcome.client_left = True  # the client hung up
            raise
        finally:
            if task is not None:
                self._calls.discard(task)
            if method is None:
                method = outcome.body.method_label if outcome.body is not None else "invalid"
            self._finish(method, _status(outcome, exchange), started, exchange, outcome)

    async def _read_and_post(self, exchange: Exchange, outcome: Outcome) -> None:
        content_type = exchange.headers.get("Content-Type", "")
        if not content_type.lower().startswith("application/json"):
            raise UnsupportedMediaType("POST body must be application/json")
        outcome.body = jsonrpc.parse_post_body(await exchange.read_body(self._settings.max_body_bytes))
        if self._otel is None:
            await self._post(exchange, outcome.body, outcome)
        else:
            await self._traced_post(self._otel, exchange, outcome.body, outcome)

    async def _traced_post(self, otel: Telemetry, exchange: Exchange, body: PostBody, outcome: Outcome) -> None:
        """``_post`` under the SERVER span of its message(s), ended by ``_finish`` with the status the client got."""
        headers = exchange.headers
        traced = otel.server_request(
            body,
            headers,
            session_id=headers.get(MCP_SESSION_ID),
            protocol_version=headers.get(MCP_PROTOCOL_VERSION),
        )
        if traced is None:
            await self._post(exchange, body, outcome)
            return
        if isinstance(outcome, RequestOutcome):
            outcome.trace = traced
        try:
            await self._post(exchange, body, outcome)
        finally:
            traced.leave()

    async def _answer_errors(self, exchange: Exchange, handling: Awaitable[None], outcome: RequestOutcome) -> None:
        """Run a handler; turn its failures into a JSON-RPC error with the request's id (unless an answer
        already started: a second response is never sent)."""
        try:
            await handling
        except ProxyError as exc:
            if outcome.status is not None:
                raise
            outcome.error = exc
            await answer_error(exchange, exc, outcome.body)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if outcome.status is not None:
                raise
            # A failure no branch foresaw: still answer with the request's id, and say so in the log.
            log.exception("request.unexpected_error", upstream=self._name)
            outcome.error = unexpected_failure(exc)
            await answer_error(exchange, outcome.error, outcome.body)

    async def _post(self, exchange: Exchange, body: PostBody, outcome: Outcome) -> None:
        engine = self._engine
        headers = exchange.headers
        if body.initialize is not None:
            opened = await engine.bridge.open(headers, body)
            if isinstance(opened, BridgedOpen):  # a modern-only upstream: the proxy holds the session
                await bridged.answer_initialize(exchange, opened, outcome)
                return
            cid = opened.record.client_session_id if opened.record is not None else None
            await self._relay.relay(exchange, opened.answer, cid, outcome)
            return
        client_session_id = headers.get(MCP_SESSION_ID)
        if client_session_id is None:
            await self._relay.relay(exchange, await engine.post_without_session(headers, body), None, outcome)
            return
        record = await engine.session(client_session_id)
        if is_bridged(record) and not body.is_batch and body.messages[0].kind is not Kind.REQUEST:
            # The client's answer to the proxy's own input request (or a notification): taken here, never
            # sent upstream, so it takes no stream slot (the slots may all be the GET and the waiting call).
            await bridged.post(engine.bridge, exchange, record, body, outcome, self._settings.keepalive_interval)
            return
        async with self._slots.slot(client_session_id) as waited:
            if waited:
                # Read again: a request that waited runs on the session as it is now (healed meanwhile,
                # say), not on the dead upstream session it would have found when it arrived.
                record = await engine.session(client_session_id)
            if is_bridged(record):
                idle = self._settings.keepalive_interval
                await bridged.post(engine.bridge, exchange, record, body, outcome, idle)
                return
            sent = await engine.post(headers, body, record)
            outcome.healed = sent.healed
            if sent.answer is not None and sent.answer.status == 400 and engine.bridge.era.may_bridge:
                # Refused unrun: the upstream may have turned 2026-07-28-only under the session.
                adopted = await engine.bridge.adopt(headers, sent.record, sent.answer)
                if not isinstance(adopted, AnswerStream):
                    await bridged.post(
                        engine.bridge, exchange, adopted, body, outcome, self._settings.keepalive_interval
                    )
                    return
                sent.answer = adopted
            if sent.answer is None:
                await exchange.answer(202, b"")
                return
            await self._relay.relay(
                exchange, sent.answer, client_session_id, outcome, generation=sent.record.generation
            )

    def slots_waiting(self, client_session_id: str) -> int:
        """How many requests of a session wait for one of its stream slots."""
        return self._slots.waiting(client_session_id)

    @property
    def calls_in_flight(self) -> int:
        """Calls (POST, DELETE) being answered now."""
        return len(self._calls)

    def end_calls(self) -> None:
        """Stop now (a second Ctrl-C): end every call still being answered."""
        self._stopping = True
        for task in list(self._calls):
            task.cancel()

    def end_server_streams(self) -> None:
        """Shutdown: end GET streams cleanly now (see Relay.end_server_streams), and close the streams
        opened early that no GET took. Calls still running from here on are ended by the proxy, not left
        by their clients."""
        self._stopping = True
        self._relay.end_server_streams()
        self._engine.end_early_streams()
        self._engine.bridge.close_streams()

    # --- GET and DELETE ---------------------------------------------------------------------------

    async def handle_get(self, exchange: Exchange) -> None:
        """Open the server-to-client SSE stream of a session and keep it open across heals, or resume
        an answer stream (``Last-Event-ID``)."""
        await self._handle(exchange, "GET", lambda outcome: self._get(exchange, outcome))

    async def _get(self, exchange: Exchange, outcome: Outcome) -> None:
        if self._otel is not None:
            # The client's HTTP traceparent, if any, is the parent of the stream's attach spans.
            token = self._otel.stream_context(exchange.headers)
            try:
                await self._get_stream(exchange, outcome)
            finally:
                self._otel.leave(token)
            return
        await self._get_stream(exchange, outcome)

    async def _get_stream(self, exchange: Exchange, outcome: Outcome) -> None:
        engine = self._engine
        headers = exchange.headers
        client_session_id = self._required_session_id(exchange)
        record = await engine.session(client_session_id)
        async with self._slots.slot(client_session_id) as waited:
            if waited:
                record = await engine.session(client_session_id)  # as it is now (see _post)
            if is_bridged(record):
                await bridged.get(engine.bridge, exchange, record, outcome, self._settings.keepalive_interval)
                return
            last_event_id = headers.get(LAST_EVENT_ID)
            if last_event_id is not None:
                pending = self._relay.take_resume(record.client_session_id, last_event_id)
                if pending is not None:
                    await self._resume(exchange, record, pending, outcome)
                    return
            sent = await engine.open_stream(headers, record)
            outcome.healed = sent.healed
            assert sent.answer is not None
            # Only an open stream is kept open across heals; a refusal (405, 409, ...) is passed on as is.
            live = sent.record
            reattach = (
                (lambda event_id: engine.reattach(headers, live, event_id)) if sent.answer.status == 200 else None
            )
            await self._relay.relay(exchange, sent.answer, record.client_session_id, outcome, reattach=reattach)

    async def _resume(
        self, exchange: Exchange, record: SessionRecord, pending: PendingResume, outcome: Outcome
    ) -> None:
        """A client resumes an answer stream that ended before its answer. Asked of the same upstream
        session, with the event id; when the upstream cannot honour it (its session ended, it is down),
        the client gets an error for each request it waits for at once. Never a fresh stream: that would
        never carry the answer, and would take the session's one GET stream from the client."""
        cid = record.client_session_id
        answer = await self._engine.resume(exchange.headers, record, pending.generation, pending.request_ids)
        if answer is None:
            await answer_unresumable(exchange, cid, pending.request_ids, outcome)
            return
        await self._relay.relay(exchange, answer, cid, outcome, generation=record.generation)

    async def handle_delete(self, exchange: Exchange) -> None:
        """End a session: tell the upstream (once, promptly: the client is on its way out), forget it."""
        await self._handle(exchange, "DELETE", lambda _: self._delete(exchange))

    async def _delete(self, exchange: Exchange) -> None:
        record = await self._engine.session(self._required_session_id(exchange))
        if is_bridged(record):
            await bridged.delete(self._engine.bridge, exchange, record)
            return
        status = await self._engine.end(exchange.headers, record)
        if status < 300 or status in DELETE_GONE:
            await exchange.answer(200, b"")
            return
        # Refused (401, 403, ...): the client hears it, with the upstream's status and a JSON-RPC body.
        payload = jsonrpc.error_body(
            (None,), UpstreamUnavailable.code, f"upstream MCP server answered {status} to DELETE", is_batch=False
        )
        await exchange.answer(status, payload, _JSON)

    # --- shared pieces ----------------------------------------------------------------------------

    def _finish(self, method: str, status: int, started: float, exchange: Exchange, outcome: Outcome) -> None:
        """Count and log one request (called once per request, from a finally)."""
        label = method_label(method)
        # Bounded: method labels are a fixed set, statuses HTTP's three digits.
        counter = self._request_counts.get((label, status))
        if counter is None:
            counter = self._request_counts[(label, status)] = self._metrics.requests.labels(
                self._name, label, str(status)
            )
        counter.inc()
        session = exchange.headers.get(MCP_SESSION_ID)
        duration = time.perf_counter() - started
        tool = outcome.body.tool_name if outcome.body is not None else None
        error = outcome.error if isinstance(outcome, RequestOutcome) else None
        if self._otel is not None and isinstance(outcome, RequestOutcome) and outcome.trace is not None:
            outcome.trace.end(status=status, error=error, upstream_broke=outcome.upstream_broke)
        # What the upstream did, for the status page: an answer (its status, its latency), a failure the
        # proxy answered for it (in words), or nothing (a request the proxy refused, one the client left
        # before any answer, or one the proxy's stop ended before any answer).
        ended_unanswered = outcome.ended_by_proxy and outcome.status is None
        answered = error is None and status != CLIENT_LEFT_STATUS and not ended_unanswered
        failure = error.message if error is not None and error.about_upstream else None
        if outcome.upstream_broke:
            failure = "upstream MCP server broke its answer after it started"
        self._metrics.events.request(
            self._name, method, tool, status, duration, outcome.healed, session, answered=answered, failure=failure
        )
        if error is None and failure is None:
            # The hot path: every answered request logs this line.
            log.info(
                "request",
                upstream=self._name,
                client_session=session[:8] if session else None,
                method=label,
                status=status,
                healed=outcome.healed,
                client_left=outcome.client_left,
                upstream_broke=outcome.upstream_broke,
                ended_by_proxy=outcome.ended_by_proxy,
                duration_ms=round(duration * 1000, 3),
            )
            return
        # An error the proxy answered about the upstream is a warning with its words (a broken answer was
        # one already: upstream.stream_broken); a request the proxy refused stays info.
        (log.warning if error is not None and error.about_upstream else log.info)(
            "request",
            upstream=self._name,
            client_session=session[:8] if session else None,
            method=label,
            status=status,
            healed=outcome.healed,
            client_left=outcome.client_left,
            upstream_broke=outcome.upstream_broke,
            ended_by_proxy=outcome.ended_by_proxy,
            duration_ms=round(duration * 1000, 3),
            error=error.message if error is not None else failure,
            failure=error.failure if error is not None else "broken",
        )

    @staticmethod
    def _required_session_id(exchange: Exchange) -> str:
        client_session_id = exchange.headers.get(MCP_SESSION_ID)
        if client_session_id is None:
            raise InvalidRequest(f"{exchange.method} needs an {MCP_SESSION_ID} header")
        return client_session_id


def _answered(exchange: AiohttpExchange) -> web.StreamResponse:
    """The response an aiohttp handler returns: every handled request has an answer by then."""
    assert exchange.response is not None, "a handled request without an answer"
    return exchange.response


class RequestOutcome(Outcome):
    """The relay's Outcome plus the error the proxy answered with, if it answered one (for the status
    page and the request log: what happened, and whether the upstream was the one that failed)."""

    __slots__ = ("error", "trace")

    def __init__(self) -> None:
        super().__init__()
        self.error: ProxyError | None = None
        # The request's SERVER span(s), with OpenTelemetry on.
        self.trace: RequestTrace | None = None


def _status(outcome: Outcome, exchange: Exchange) -> int:
    """The status the client got: the one sent, the one about to be sent, 503 when the proxy's stop ended
    it before any answer started, 499 when the client left first (as nginx logs it), else 500 (what
    aiohttp answers a handler that failed)."""
    if outcome.status is not None:
        return outcome.status
    if exchange.status is not None:
        return exchange.status
    if outcome.ended_by_proxy:
        return 503  # the proxy stopped before any answer started
    return CLIENT_LEFT_STATUS if outcome.client_left else 500
