"""The MCP endpoint's request handlers: forward POST, GET and DELETE, rewrite session ids, heal.

A request's life: read and classify the body once; map the client's session id to the upstream's;
forward; if the upstream says the session is gone, heal (single-flight) and replay once; stream the
answer back chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Counter

from mcp_heal_proxy import jsonrpc
from mcp_heal_proxy.answers import AnswerTracker
from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.content_coding import decoded
from mcp_heal_proxy.errors import (
    BodyTooLarge,
    InvalidRequest,
    ProxyError,
    TooManyStreams,
    UnknownSession,
    UnsupportedMediaType,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcp_heal_proxy.headers import (
    CONTENT_ENCODING,
    LAST_EVENT_ID,
    MCP_SESSION_ID,
    is_valid_session_id,
    upstream_request_headers,
)
from mcp_heal_proxy.healing import EXPIRY_STATUSES, Healer, is_session_expired
from mcp_heal_proxy.housekeeping import SessionActivity
from mcp_heal_proxy.jsonrpc import PostBody, RequestId
from mcp_heal_proxy.observability import Metrics, method_label
from mcp_heal_proxy.relay import Outcome, PendingResume, Relay, answer_unresumable
from mcp_heal_proxy.sessions import SessionRecord, SessionStore, new_client_session_id
from mcp_heal_proxy.state import record_state_change
from mcp_heal_proxy.upstream import INSPECT_LIMIT, Upstream, read_capped

log = structlog.get_logger("mcp_heal_proxy.proxy")

# Upstream answers to DELETE that mean the session is already gone or cannot be ended: to the
# client, whose session the proxy forgets either way, that is success.
_DELETE_GONE: Final = frozenset({404, 405})
# GET stream answers after which reattaching is pointless: no GET stream, or one already open.
_GET_REFUSED: Final = frozenset({405, 409})
# Reattaching a client's GET stream when opening a new one fails: back off, and give up after a while
# so that a client whose upstream is gone for good sees its stream end and can decide for itself.
_REATTACH_ATTEMPTS: Final = 10
_REATTACH_RETRY_FIRST: Final = 0.1
_REATTACH_RETRY_MAX: Final = 8.0
# A state change (subscription, log level) racing heals: applied to the newest record, a few times at most.
_STATE_WRITE_ATTEMPTS: Final = 3
# What the request log says of a client that hung up before any answer started (as nginx does).
CLIENT_LEFT_STATUS: Final = 499


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The per-app settings handlers need."""

    max_body_bytes: int
    keepalive_interval: float
    max_sessions: int = 10_000
    max_streams_per_session: int = 32


class StreamSlots:
    """Counts the requests each session has in flight, to bound what one client can hold open."""

    __slots__ = ("_in_use", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_use: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, client_session_id: str) -> Iterator[None]:
        """Hold one of the session's slots for the duration of a request."""
        held = self._in_use.get(client_session_id, 0)
        if held >= self._limit:
            raise TooManyStreams(f"this session already has {held} requests in flight")
        self._in_use[client_session_id] = held + 1
        try:
            yield
        finally:
            left = self._in_use[client_session_id] - 1
            if left:
                self._in_use[client_session_id] = left
            else:
                del self._in_use[client_session_id]


def error_response(exc: ProxyError, body: PostBody | None) -> web.Response:
    """The one place that turns a ProxyError into an HTTP answer with a JSON-RPC error body."""
    if body is not None:
        request_ids = body.request_ids or (None,)
        payload = jsonrpc.error_body(request_ids, exc.code, exc.message, is_batch=body.is_batch)
    else:
        payload = jsonrpc.error_body((exc.request_id,), exc.code, exc.message, is_batch=False)
    return web.Response(status=exc.http_status, body=payload, content_type="application/json")


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read the request body, refusing more than ``limit`` bytes without reading them all."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    content = request.content
    # readany, not iter_any: the same reads without an iterator and its frames (a body usually arrives
    # in one piece, with the headers).
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body over the {limit}-byte limit")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Proxy:
    """Handlers for one upstream's MCP endpoint."""

    def __init__(
        self,
        upstream: Upstream,
        store: SessionStore,
        healer: Healer,
        metrics: Metrics,
        settings: ProxySettings,
        activity: SessionActivity,
    ) -> None:
        self._activity = activity
        self._slots = StreamSlots(settings.max_streams_per_session)
        self._relay = Relay(upstream.config.name, settings.keepalive_interval, metrics.open_streams)
        self._upstream = upstream
        self._config = upstream.config
        self._name = upstream.config.name
        self._store = store
        self._healer = healer
        self._metrics = metrics
        self._settings = settings
        # Metric children bound once (labels() takes a lock and builds a key on every call): the
        # latency histogram per upstream, the request counter per (method label, status) as they occur.
        self._upstream_latency = metrics.upstream_latency.labels(self._name)
        self._request_counts: dict[tuple[str, int], Counter] = {}

    # --- POST -------------------------------------------------------------------------------------

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        """Forward a client's JSON-RPC message(s)."""
        started = time.perf_counter()
        outcome = Outcome()
        response: web.StreamResponse | None = None
        try:
            response = await self._answer_errors(self._read_and_post(request, outcome), outcome)
            return response
        except asyncio.CancelledError:
            outcome.client_left = True  # the client hung up (or shutdown ended the request)
            raise
        finally:
            # In a finally: a client that hangs up cancels this handler, and its request is still
            # logged and counted, once, with the status it got (499 when it left before any answer).
            method = outcome.body.method_label if outcome.body is not None else "invalid"
            self._finish(method, _status(outcome, response), started, request, outcome)

    async def _read_and_post(self, request: web.Request, outcome: Outcome) -> web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        if not content_type.lower().startswith("application/json"):
            raise UnsupportedMediaType("POST body must be application/json")
        outcome.body = jsonrpc.parse_post_body(await read_body(request, self._settings.max_body_bytes))
        return await self._post(request, outcome.body, outcome)

    async def _answer_errors(self, handling: Awaitable[web.StreamResponse], outcome: Outcome) -> web.StreamResponse:
        """Run a handler; turn its failures into a JSON-RPC error with the request's id (unless an answer
        already started: a second response is never sent)."""
        try:
            return await handling
        except ProxyError as exc:
            if outcome.status is not None:
                raise
            return error_response(exc, outcome.body)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if outcome.status is not None:
                raise
            # A failure no branch foresaw: still answer with the request's id, and say so in the log.
            log.exception("request.unexpected_error", upstream=self._name, error=type(exc).__name__)
            return error_response(UpstreamUnavailable(f"proxy error: {type(exc).__name__}"), outcome.body)

    async def _post(self, request: web.Request, body: PostBody, outcome: Outcome) -> web.StreamResponse:
        if body.initialize is not None:
            return await self._initialize(request, body, outcome)
        client_session_id = request.headers.get(MCP_SESSION_ID)
        if client_session_id is None:
            # No session: a 2026-07-28 stateless request, or a mistake the upstream will explain.
            upstream = await self._send("POST", upstream_request_headers(request.headers, None), body.raw)
            self._refuse_garbage(upstream, body)
            return await self._relay.relay(request, upstream, None, outcome, tracker=self._tracker(upstream, body))
        record = await self._record(client_session_id)
        with self._slots.slot(client_session_id):
            return await self._post_on_session(request, body, record, outcome)

    async def _post_on_session(
        self, request: web.Request, body: PostBody, record: SessionRecord, outcome: Outcome
    ) -> web.StreamResponse:
        client_session_id = record.client_session_id
        upstream = await self._send("POST", self._headers(request, record), body.raw)
        expired, prefetched = await self._check_expiry(upstream)
        if not expired:
            self._refuse_garbage(upstream, body)
            if upstream.status < 300:
                await self._remember_state(record, body)
            return await self._relay.relay(
                request,
                upstream,
                client_session_id,
                outcome,
                prefetched,
                tracker=self._tracker(upstream, body),
                generation=record.generation,
            )
        if body.belongs_to_dead_session:
            # Answers and cancellations for requests of the dead session: nobody is waiting for them.
            return web.Response(status=202)
        record = await self._healer.heal(record, request.headers, reason=f"http_{upstream.status}")
        outcome.healed = True
        refused = [m.method for m in body.messages if m.method is not None and not self._config.replays(m.method)]
        if refused:
            raise _NotReplayed(f"upstream session expired; the proxy opened a new one but does not replay {refused[0]}")
        upstream = await self._send("POST", self._headers(request, record), body.raw)
        self._refuse_garbage(upstream, body)
        if upstream.status < 300:
            await self._remember_state(record, body)
        return await self._relay.relay(
            request,
            upstream,
            client_session_id,
            outcome,
            tracker=self._tracker(upstream, body),
            generation=record.generation,
        )

    async def _initialize(self, request: web.Request, body: PostBody, outcome: Outcome) -> web.StreamResponse:
        """Forward an initialize without any session id; map the session the upstream opens.

        The record, negotiated protocol version included, is stored before the client sees a byte of
        the answer: a client that reads its session id and hangs up at once must not leave a record
        without its version (every later heal would then misreport a version change).
        """
        init = body.initialize
        assert init is not None
        excess = len(self._store) - self._settings.max_sessions + 1
        if excess > 0:
            evicted = await self._store.evict_oldest(excess)
            log.info("session.evicted", upstream=self._name, count=evicted, max_sessions=self._settings.max_sessions)
        upstream = await self._send("POST", upstream_request_headers(request.headers, None), body.raw)
        self._refuse_garbage(upstream, body)
        upstream_session_id = upstream.headers.get(MCP_SESSION_ID)
        if upstream.status != 200 or not upstream_session_id:
            # A refused initialize, or a server without sessions: nothing to map.
            return await self._relay.relay(request, upstream, None, outcome)
        if not is_valid_session_id(upstream_session_id):
            upstream.release()
            raise UpstreamUnavailable("upstream MCP server sent a malformed session id")
        tracker = AnswerTracker(
            (init.id,), upstream.headers.get("Content-Type", ""), upstream.headers.get(CONTENT_ENCODING)
        )
        try:
            # The initialize answer is one small message: read up to it (bounded), then store, then relay.
            prefetched = await self._read_until_answered(upstream, tracker, init.id)
            version = tracker.protocol_version(init.id)
            record = SessionRecord(
                client_session_id=new_client_session_id(),
                upstream_session_id=upstream_session_id,
                initialize_params=dict(init.params or {}),
                upstream=self._name,
                protocol_version=version,
                upstream_protocol_version=version,
            )
            # Stored before the client sees the id, so no request can arrive for an unknown id.
            await self._store.create(record)
        except BaseException:
            upstream.release()
            # The upstream session was opened for nobody: end it rather than leave it to its idle timeout.
            await self._end_upstream_session(request.headers, upstream_session_id, reason="not_stored")
            raise
        return await self._relay.relay(request, upstream, record.client_session_id, outcome, prefetched)

    @staticmethod
    async def _read_until_answered(
        upstream: aiohttp.ClientResponse, tracker: AnswerTracker, request_id: RequestId
    ) -> bytes:
        """Read an answer until the response to ``request_id`` went by (at most INSPECT_LIMIT bytes)."""
        chunks: list[bytes] = []
        size = 0
        try:
            while size < INSPECT_LIMIT:
                chunk = await upstream.content.readany()
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                tracker.feed(chunk)
                if tracker.protocol_version(request_id) is not None:
                    break
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("upstream MCP server stopped answering the initialize") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream MCP server broke the initialize answer: {type(exc).__name__}") from exc
        return b"".join(chunks)

    async def _end_upstream_session(
        self, client_headers: Mapping[str, str], upstream_session_id: str, reason: str
    ) -> None:
        """Best effort, bounded: DELETE an upstream session that no client session points to."""
        headers = upstream_request_headers(client_headers, upstream_session_id)
        try:
            async with asyncio.timeout(self._config.connect_timeout):
                response = await self._upstream.send("DELETE", headers, patient=False)
                response.release()
        except (ProxyError, TimeoutError):
            log.info("session.orphan_left_upstream", upstream=self._name, reason=reason)

    @staticmethod
    def _refuse_garbage(upstream: aiohttp.ClientResponse, body: PostBody) -> None:
        """A success answer to requests must be JSON or SSE; anything else (an HTML page from a captive
        portal or a misrouted load balancer) becomes a JSON-RPC error instead of confusing the client."""
        if not body.request_ids or not 200 <= upstream.status < 300 or upstream.status == 202:
            return
        content_type = upstream.headers.get("Content-Type", "")
        if content_type.startswith(("application/json", "text/event-stream")):
            return
        upstream.release()
        raise UpstreamUnavailable(
            f"upstream MCP server answered {upstream.status} with {content_type or 'no content type'}"
        )

    @staticmethod
    def _tracker(upstream: aiohttp.ClientResponse, body: PostBody) -> AnswerTracker | None:
        """Track responses on SSE answers to requests, to finish a broken stream with errors."""
        content_type = upstream.headers.get("Content-Type", "")
        if not body.request_ids or not content_type.startswith("text/event-stream"):
            return None
        return AnswerTracker(body.request_ids, content_type, upstream.headers.get(CONTENT_ENCODING))

    async def _remember_state(self, record: SessionRecord, body: PostBody) -> None:
        """Record state the client set (subscriptions, log level), on top of whatever the store holds now:
        a heal may have moved the session to a newer generation while this request was answered."""
        for _ in range(_STATE_WRITE_ATTEMPTS):
            updated = record_state_change(record, body)
            if updated is record:
                return
            current = await self._store.put(updated)
            if current is None or current.generation == updated.generation:
                return  # written, or the session is gone
            record = current  # refused as stale: apply the change to the newer record instead
        log.warning("session.state_not_recorded", upstream=self._name, client_session=record.client_session_id[:8])

    def end_server_streams(self) -> None:
        """Shutdown: end GET streams cleanly now (see Relay.end_server_streams)."""
        self._relay.end_server_streams()

    # --- GET and DELETE ---------------------------------------------------------------------------

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        """Open the server-to-client SSE stream of a session and keep it open across heals, or resume
        an answer stream (``Last-Event-ID``)."""
        started = time.perf_counter()
        outcome = Outcome()
        response: web.StreamResponse | None = None
        try:
            response = await self._answer_errors(self._get(request, outcome), outcome)
            return response
        except asyncio.CancelledError:
            outcome.client_left = True  # the client hung up (or shutdown ended the request)
            raise
        finally:
            self._finish("GET", _status(outcome, response), started, request, outcome)

    async def _get(self, request: web.Request, outcome: Outcome) -> web.StreamResponse:
        record = await self._record(self._required_session_id(request))
        with self._slots.slot(record.client_session_id):
            last_event_id = request.headers.get(LAST_EVENT_ID)
            if last_event_id is not None:
                pending = self._relay.take_resume(record.client_session_id, last_event_id)
                if pending is not None:
                    return await self._resume(request, record, pending, outcome)
            upstream = await self._send("GET", self._headers(request, record), stream=True)
            expired, prefetched = await self._check_expiry(upstream)
            if expired:
                record = await self._healer.heal(record, request.headers, reason=f"http_{upstream.status}")
                outcome.healed = True
                upstream = await self._send("GET", self._headers(request, record, fresh_stream=True), stream=True)
                prefetched = b""
            # Only an open stream is kept open across heals; a refusal (405, 409, ...) is passed on as is.
            live = record
            reattach = (lambda event_id: self._reattach(request, live, event_id)) if upstream.status == 200 else None
            return await self._relay.relay(
                request, upstream, record.client_session_id, outcome, prefetched, reattach=reattach
            )

    async def _resume(
        self, request: web.Request, record: SessionRecord, pending: PendingResume, outcome: Outcome
    ) -> web.StreamResponse:
        """A client resumes an answer stream that ended before its answer. Asked of the same upstream
        session, with the event id; when the upstream cannot honour it (its session ended, it is down),
        the client gets an error for each request it waits for at once. Never a fresh stream: that would
        never carry the answer, and would take the session's one GET stream from the client."""
        cid = record.client_session_id
        if record.generation == pending.generation:
            try:
                upstream = await self._send("GET", self._headers(request, record), stream=True)
            except ProxyError as exc:
                log.info("stream.resume_failed", upstream=self._name, client_session=cid[:8], error=exc.message)
            else:
                content_type = upstream.headers.get("Content-Type", "")
                if upstream.status == 200 and content_type.startswith("text/event-stream"):
                    tracker = AnswerTracker(pending.request_ids, content_type, upstream.headers.get(CONTENT_ENCODING))
                    return await self._relay.relay(
                        request, upstream, cid, outcome, tracker=tracker, generation=record.generation
                    )
                log.info("stream.resume_refused", upstream=self._name, client_session=cid[:8], status=upstream.status)
                upstream.release()
        return await answer_unresumable(request, cid, pending.request_ids, outcome)

    async def _reattach(
        self, request: web.Request, stale: SessionRecord, last_event_id: str | None
    ) -> aiohttp.ClientResponse | None:
        """The upstream ended a GET stream the client still holds: open a new one, healing if need be.

        On the same upstream session the stream resumes after ``last_event_id`` (nothing the server sent
        meanwhile is lost); after a heal it starts fresh (event ids of a dead session mean nothing).
        """
        backoff = Backoff(first=_REATTACH_RETRY_FIRST, maximum=_REATTACH_RETRY_MAX)
        for _ in range(_REATTACH_ATTEMPTS):
            record = await self._store.get(stale.client_session_id)
            if record is None:
                return None  # the client ended its session meanwhile
            resume = last_event_id is not None and record.generation == stale.generation
            headers = self._headers(request, record, fresh_stream=True)
            if resume:
                assert last_event_id is not None
                headers[LAST_EVENT_ID] = last_event_id
            try:
                upstream = await self._send("GET", headers, stream=True)
                expired, _ = await self._check_expiry(upstream)
                if expired:
                    record = await self._healer.heal(record, request.headers, reason="get_stream_lost")
                    upstream = await self._send("GET", self._headers(request, record, fresh_stream=True), stream=True)
            except ProxyError as exc:
                delay = backoff.next_delay()
                log.info("stream.reattach_retry", upstream=self._name, error=exc.message, delay_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            if upstream.status == 200:
                log.info("stream.reattached", upstream=self._name, client_session=record.client_session_id[:8])
                return upstream
            upstream.release()
            if upstream.status in _GET_REFUSED:
                return None
            await asyncio.sleep(backoff.next_delay())
        return None

    async def handle_delete(self, request: web.Request) -> web.StreamResponse:
        """End a session: tell the upstream (once, promptly: the client is on its way out), forget it."""
        started = time.perf_counter()
        outcome = Outcome()
        response: web.StreamResponse | None = None
        try:
            response = await self._answer_errors(self._delete(request), outcome)
            return response
        except asyncio.CancelledError:
            outcome.client_left = True  # the client hung up (or shutdown ended the request)
            raise
        finally:
            self._finish("DELETE", _status(outcome, response), started, request, outcome)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        client_session_id = self._required_session_id(request)
        record = await self._record(client_session_id)
        failure: ProxyError | None = None
        status = 200
        try:
            # No connect_retry and a short read bound: nothing a client does on its way out may hang.
            upstream = await self._upstream.send(
                "DELETE", self._headers(request, record), patient=False, read_timeout=self._config.connect_timeout
            )
            status = upstream.status
            upstream.release()
        except ProxyError as exc:
            failure = exc
        finally:
            # The client is done with its session whatever the upstream says.
            await self._store.delete(client_session_id)
        if failure is not None:
            log.warning(
                "session.delete_upstream_failed",
                upstream=self._name,
                client_session=client_session_id[:8],
                error=failure.message,
            )
            raise type(failure)(f"the proxy forgot the session but could not end it upstream: {failure.message}")
        if status < 300 or status in _DELETE_GONE:
            return web.Response(status=200)
        # Refused (401, 403, ...): the client hears it, with the upstream's status and a JSON-RPC body.
        payload = jsonrpc.error_body(
            (None,), UpstreamUnavailable.code, f"upstream MCP server answered {status} to DELETE", is_batch=False
        )
        return web.Response(status=status, body=payload, content_type="application/json")

    # --- shared pieces ----------------------------------------------------------------------------

    def _finish(self, method: str, status: int, started: float, request: web.Request, outcome: Outcome) -> None:
        """Count and log one request (called once per request, from a finally)."""
        label = method_label(method)
        # Bounded: method labels are a fixed set, statuses HTTP's three digits.
        counter = self._request_counts.get((label, status))
        if counter is None:
            counter = self._request_counts[(label, status)] = self._metrics.requests.labels(
                self._name, label, str(status)
            )
        counter.inc()
        session = request.headers.get(MCP_SESSION_ID)
        duration = time.perf_counter() - started
        tool = outcome.body.tool_name if outcome.body is not None else None
        self._metrics.events.request(self._name, method, tool, status, duration, outcome.healed, session)
        log.info(
            "request",
            upstream=self._name,
            client_session=session[:8] if session else None,
            method=label,
            status=status,
            healed=outcome.healed,
            client_left=outcome.client_left,
            duration_ms=round(duration * 1000, 3),
        )

    def _headers(self, request: web.Request, record: SessionRecord, *, fresh_stream: bool = False) -> dict[str, str]:
        """Headers for the upstream on this record's session (a new stream drops stale event ids)."""
        headers = upstream_request_headers(
            request.headers, record.upstream_session_id, drop=(LAST_EVENT_ID,) if fresh_stream else ()
        )
        version = record.version_to_send
        if version is not None:
            # A heal negotiated another version than the client's: speak the upstream's.
            headers = {k: v for k, v in headers.items() if k.lower() != "mcp-protocol-version"}
            headers["MCP-Protocol-Version"] = version
        return headers

    async def _send(
        self, method: str, headers: dict[str, str], body: bytes | None = None, *, stream: bool = False
    ) -> aiohttp.ClientResponse:
        started = time.perf_counter()
        # GET and DELETE cannot run a tool: they may be resent over a connection that broke unanswered.
        response = await self._upstream.send(method, headers, body, stream=stream, resendable=method != "POST")
        self._upstream_latency.observe(time.perf_counter() - started)
        return response

    @staticmethod
    def _required_session_id(request: web.Request) -> str:
        client_session_id = request.headers.get(MCP_SESSION_ID)
        if client_session_id is None:
            raise InvalidRequest(f"{request.method} needs an {MCP_SESSION_ID} header")
        return client_session_id

    async def _record(self, client_session_id: str) -> SessionRecord:
        if not is_valid_session_id(client_session_id):
            raise InvalidRequest(f"{MCP_SESSION_ID} must be 1 to 128 visible ASCII characters")
        record = await self._store.get(client_session_id)
        if record is None or record.upstream != self._name:
            raise UnknownSession("Session not found")
        self._activity.mark(client_session_id)
        return record

    async def _check_expiry(self, upstream: aiohttp.ClientResponse) -> tuple[bool, bytes]:
        """Read the body of a possible expiry answer; say whether it is one.

        Returns the bytes read, so that an answer that is not an expiry is still relayed whole.
        """
        if upstream.status not in EXPIRY_STATUSES:
            return False, b""
        try:
            body = await read_capped(upstream)
        except BaseException:
            upstream.release()
            raise
        readable = decoded(body, upstream.headers.get(CONTENT_ENCODING))
        if is_session_expired(upstream.status, readable, sent_session_id=True, heal_on=self._config.heal_on):
            upstream.release()
            return True, b""
        return False, body


def _status(outcome: Outcome, response: web.StreamResponse | None) -> int:
    """The status the client got: the one sent, the one about to be sent, 499 when it left before any
    answer started (as nginx logs it), else 500 (what aiohttp answers a handler that failed)."""
    if outcome.status is not None:
        return outcome.status
    if response is not None:
        return response.status
    return CLIENT_LEFT_STATUS if outcome.client_left else 500


class _NotReplayed(ProxyError):
    """The replay policy forbids replaying this request on the new session."""

    http_status = 200
    code = -32004
