"""The MCP endpoint's request handlers: forward POST, GET and DELETE, rewrite session ids, heal.

A request's life: read and classify the body once; map the client's session id to the upstream's;
forward; if the upstream says the session is gone, heal (single-flight) and replay once; stream the
answer back chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from mcp_heal_proxy import jsonrpc
from mcp_heal_proxy.answers import AnswerTracker
from mcp_heal_proxy.errors import (
    BodyTooLarge,
    InvalidRequest,
    ProxyError,
    TooManyStreams,
    UnknownSession,
    UnsupportedMediaType,
    UpstreamUnavailable,
)
from mcp_heal_proxy.headers import (
    LAST_EVENT_ID,
    MCP_SESSION_ID,
    is_valid_session_id,
    upstream_request_headers,
)
from mcp_heal_proxy.healing import EXPIRY_STATUSES, Healer, is_session_expired
from mcp_heal_proxy.housekeeping import SessionActivity
from mcp_heal_proxy.jsonrpc import PostBody
from mcp_heal_proxy.observability import Metrics, method_label
from mcp_heal_proxy.relay import Relay
from mcp_heal_proxy.sessions import SessionRecord, SessionStore, new_client_session_id
from mcp_heal_proxy.state import record_state_change
from mcp_heal_proxy.upstream import Upstream, read_capped

log = structlog.get_logger("mcp_heal_proxy.proxy")

# Upstream answers to DELETE that mean the session is already gone or cannot be ended: to the
# client, whose session the proxy forgets either way, that is success.
_DELETE_GONE: Final = frozenset({404, 405})
# GET stream answers after which reattaching is pointless: no GET stream, one already open, or
# credentials that no longer work (the stream was opened with a token since refreshed or revoked: the
# client reopens it with its current one once its stream ends).
_GET_REFUSED: Final = frozenset({401, 403, 405, 409})
# Reattaching a client's GET stream after the upstream dropped it: back off, and give up after a while
# so that a client whose upstream is gone for good sees its stream end and can decide for itself.
_REATTACH_DELAYS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 8.0, 8.0, 8.0)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The per-app settings handlers need."""

    max_body_bytes: int
    keepalive_interval: float
    max_sessions: int = 10_000
    max_streams_per_session: int = 256


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
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


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

    # --- POST -------------------------------------------------------------------------------------

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        """Forward a client's JSON-RPC message(s)."""
        body: PostBody | None = None
        started = time.perf_counter()
        outcome = _Outcome()
        try:
            content_type = request.headers.get("Content-Type", "")
            if not content_type.lower().startswith("application/json"):
                raise UnsupportedMediaType("POST body must be application/json")
            body = jsonrpc.parse_post_body(await read_body(request, self._settings.max_body_bytes))
            response = await self._post(request, body, outcome)
        except ProxyError as exc:
            response = error_response(exc, body)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # A failure no branch above foresaw: still answer with the request's id, and say so in the log.
            log.exception("request.unexpected_error", upstream=self._name, error=type(exc).__name__)
            response = error_response(UpstreamUnavailable(f"proxy error: {type(exc).__name__}"), body)
        method = body.method_label if body is not None else "invalid"
        self._finish(method, response.status, started, request, outcome)
        return response

    async def _post(self, request: web.Request, body: PostBody, outcome: _Outcome) -> web.StreamResponse:
        if body.initialize is not None:
            return await self._initialize(request, body)
        client_session_id = request.headers.get(MCP_SESSION_ID)
        if client_session_id is None:
            # No session: a 2026-07-28 stateless request, or a mistake the upstream will explain.
            upstream = await self._send("POST", upstream_request_headers(request.headers, None), body.raw)
            self._refuse_garbage(upstream, body)
            return await self._relay.relay(request, upstream, None, tracker=self._tracker(upstream, body))
        record = await self._record(client_session_id)
        with self._slots.slot(client_session_id):
            return await self._post_on_session(request, body, record, outcome)

    async def _post_on_session(
        self, request: web.Request, body: PostBody, record: SessionRecord, outcome: _Outcome
    ) -> web.StreamResponse:
        client_session_id = record.client_session_id
        upstream = await self._send("POST", self._headers(request, record), body.raw)
        expired, prefetched = await self._check_expiry(upstream)
        if not expired:
            self._refuse_garbage(upstream, body)
            if upstream.status < 300:
                await self._remember_state(record, body)
            return await self._relay.relay(
                request, upstream, client_session_id, prefetched, tracker=self._tracker(upstream, body)
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
        return await self._relay.relay(request, upstream, client_session_id, tracker=self._tracker(upstream, body))

    async def _initialize(self, request: web.Request, body: PostBody) -> web.StreamResponse:
        """Forward an initialize without any session id; map the session the upstream opens."""
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
            return await self._relay.relay(request, upstream, None)
        if not is_valid_session_id(upstream_session_id):
            upstream.release()
            raise UpstreamUnavailable("upstream MCP server sent a malformed session id")
        record = SessionRecord(
            client_session_id=new_client_session_id(),
            upstream_session_id=upstream_session_id,
            initialize_params=dict(init.params or {}),
            upstream=self._name,
        )
        try:
            # Stored before the client sees the id, so no request can arrive for an unknown id.
            await self._store.put(record)
        except BaseException:
            upstream.release()
            raise
        tracker = AnswerTracker((init.id,), upstream.headers.get("Content-Type", ""))
        response = await self._relay.relay(request, upstream, record.client_session_id, tracker=tracker)
        version = tracker.protocol_version(init.id)
        if version is not None:
            await self._store.put(replace(record, protocol_version=version, upstream_protocol_version=version))
        return response

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
        return AnswerTracker(body.request_ids, content_type)

    async def _remember_state(self, record: SessionRecord, body: PostBody) -> None:
        updated = record_state_change(record, body)
        if updated is not record:
            await self._store.put(updated)

    def end_server_streams(self) -> None:
        """Shutdown: end GET streams cleanly now (see Relay.end_server_streams)."""
        self._relay.end_server_streams()

    # --- GET and DELETE ---------------------------------------------------------------------------

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        """Open the server-to-client SSE stream of a session, and keep it open across heals."""
        started = time.perf_counter()
        try:
            record = await self._record(self._required_session_id(request))
            with self._slots.slot(record.client_session_id):
                return await self._get_on_session(request, record, started)
        except ProxyError as exc:
            refused = error_response(exc, None)
            self._finish("GET", refused.status, started, request, _Outcome())
            return refused

    async def _get_on_session(self, request: web.Request, record: SessionRecord, started: float) -> web.StreamResponse:
        outcome = _Outcome()
        try:
            upstream = await self._send("GET", self._headers(request, record), stream=True)
            expired, prefetched = await self._check_expiry(upstream)
            if expired:
                record = await self._healer.heal(record, request.headers, reason=f"http_{upstream.status}")
                outcome.healed = True
                upstream = await self._send("GET", self._headers(request, record, fresh_stream=True), stream=True)
                prefetched = b""
            # Only an open stream is kept open across heals; a refusal (405, 409, ...) is passed on as is.
            live = record
            reattach = (lambda: self._reattach(request, live)) if upstream.status == 200 else None
            response: web.StreamResponse = await self._relay.relay(
                request, upstream, record.client_session_id, prefetched, reattach=reattach
            )
        except ProxyError as exc:
            response = error_response(exc, None)
        self._finish("GET", response.status, started, request, outcome)
        return response

    async def _reattach(self, request: web.Request, stale: SessionRecord) -> aiohttp.ClientResponse | None:
        """The upstream dropped a GET stream the client still holds: open a new one, healing if need be."""
        for delay in _REATTACH_DELAYS:
            record = await self._store.get(stale.client_session_id)
            if record is None:
                return None  # the client ended its session meanwhile
            try:
                upstream = await self._send("GET", self._headers(request, record, fresh_stream=True), stream=True)
                expired, _ = await self._check_expiry(upstream)
                if expired:
                    record = await self._healer.heal(record, request.headers, reason="get_stream_lost")
                    upstream = await self._send("GET", self._headers(request, record, fresh_stream=True), stream=True)
            except ProxyError as exc:
                log.info("stream.reattach_retry", upstream=self._name, error=exc.message, delay_s=delay)
                await asyncio.sleep(delay)
                continue
            if upstream.status == 200:
                log.info("stream.reattached", upstream=self._name, client_session=record.client_session_id[:8])
                return upstream
            upstream.release()
            if upstream.status in _GET_REFUSED:
                return None
            await asyncio.sleep(delay)
        return None

    async def handle_delete(self, request: web.Request) -> web.StreamResponse:
        """End a session: tell the upstream, forget the mapping."""
        started = time.perf_counter()
        try:
            client_session_id = self._required_session_id(request)
            record = await self._record(client_session_id)
        except ProxyError as exc:
            refused = error_response(exc, None)
            self._finish("DELETE", refused.status, started, request, _Outcome())
            return refused
        status: int | None = None
        try:
            upstream = await self._send("DELETE", self._headers(request, record))
            status = upstream.status
            upstream.release()
        except ProxyError as exc:
            log.warning(
                "session.delete_upstream_failed",
                upstream=self._name,
                client_session=client_session_id[:8],
                error=exc.message,
            )
        finally:
            await self._store.delete(client_session_id)
        response = web.Response(status=200 if status is None or status in _DELETE_GONE else status)
        self._finish("DELETE", response.status, started, request, _Outcome())
        return response

    # --- shared pieces ----------------------------------------------------------------------------

    def _finish(
        self,
        method: str,
        status: int,
        started: float,
        request: web.Request,
        outcome: _Outcome,
    ) -> None:
        """Count and log one answered request."""
        label = method_label(method)
        self._metrics.requests.labels(self._name, label, str(status)).inc()
        session = request.headers.get(MCP_SESSION_ID)
        log.info(
            "request",
            upstream=self._name,
            client_session=session[:8] if session else None,
            method=label,
            status=status,
            healed=outcome.healed,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
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
        self._metrics.upstream_latency.labels(self._name).observe(time.perf_counter() - started)
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
        challenge = upstream.headers.get("WWW-Authenticate")
        if is_session_expired(
            upstream.status, body, sent_session_id=True, heal_on=self._config.heal_on, www_authenticate=challenge
        ):
            upstream.release()
            return True, b""
        return False, body


class _Outcome:
    """What happened to a request on its way, for the request log."""

    __slots__ = ("healed",)

    def __init__(self) -> None:
        self.healed = False


class _NotReplayed(ProxyError):
    """The replay policy forbids replaying this request on the new session."""

    http_status = 200
    code = -32004
