"""The MCP endpoint's request handlers: forward POST, GET and DELETE, rewrite session ids, heal.

A request's life: read and classify the body once; map the client's session id to the upstream's;
forward; if the upstream says the session is gone, heal (single-flight) and replay once; stream the
answer back chunk by chunk as it arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from mcp_heal_proxy import jsonrpc
from mcp_heal_proxy.errors import (
    BodyTooLarge,
    InvalidRequest,
    ProxyError,
    UnknownSession,
    UnsupportedMediaType,
)
from mcp_heal_proxy.headers import (
    LAST_EVENT_ID,
    MCP_SESSION_ID,
    client_response_headers,
    upstream_request_headers,
)
from mcp_heal_proxy.healing import EXPIRY_STATUSES, Healer, is_session_expired
from mcp_heal_proxy.initialize import InitializeAnswerWatcher
from mcp_heal_proxy.jsonrpc import PostBody
from mcp_heal_proxy.sessions import SessionRecord, SessionStore, new_client_session_id
from mcp_heal_proxy.upstream import Upstream, read_capped

log = structlog.get_logger("mcp_heal_proxy.proxy")

# Upstream answers to DELETE that mean the session is already gone or cannot be ended: to the
# client, whose session the proxy forgets either way, that is success.
_DELETE_GONE: Final = frozenset({404, 405})


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

    def __init__(self, upstream: Upstream, store: SessionStore, healer: Healer, max_body_bytes: int) -> None:
        self._upstream = upstream
        self._store = store
        self._healer = healer
        self._max_body_bytes = max_body_bytes

    # --- POST -------------------------------------------------------------------------------------

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        """Forward a client's JSON-RPC message(s)."""
        body: PostBody | None = None
        started = time.perf_counter()
        try:
            content_type = request.headers.get("Content-Type", "")
            if not content_type.lower().startswith("application/json"):
                raise UnsupportedMediaType("POST body must be application/json")
            body = jsonrpc.parse_post_body(await read_body(request, self._max_body_bytes))
            response = await self._post(request, body)
        except ProxyError as exc:
            response = error_response(exc, body)
        log.debug(
            "request",
            method=body.method_label if body is not None else None,
            status=response.status,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return response

    async def _post(self, request: web.Request, body: PostBody) -> web.StreamResponse:
        if body.initialize is not None:
            return await self._initialize(request, body)
        client_session_id = request.headers.get(MCP_SESSION_ID)
        if client_session_id is None:
            # No session: a 2026-07-28 stateless request, or a mistake the upstream will explain.
            headers = upstream_request_headers(request.headers, None)
            upstream = await self._upstream.send("POST", headers, body.raw)
            return await self._relay(request, upstream, None)
        record = await self._record(client_session_id)
        upstream = await self._upstream.send(
            "POST", upstream_request_headers(request.headers, record.upstream_session_id), body.raw
        )
        expired, prefetched = await self._check_expiry(upstream)
        if not expired:
            return await self._relay(request, upstream, client_session_id, prefetched)
        if body.belongs_to_dead_session:
            # Answers and cancellations for requests of the dead session: nobody is waiting for them.
            return web.Response(status=202)
        record = await self._healer.heal(record, request.headers, reason=f"http_{upstream.status}")
        upstream = await self._upstream.send(
            "POST", upstream_request_headers(request.headers, record.upstream_session_id), body.raw
        )
        return await self._relay(request, upstream, client_session_id)

    async def _initialize(self, request: web.Request, body: PostBody) -> web.StreamResponse:
        """Forward an initialize without any session id; map the session the upstream opens."""
        init = body.initialize
        assert init is not None
        upstream = await self._upstream.send("POST", upstream_request_headers(request.headers, None), body.raw)
        upstream_session_id = upstream.headers.get(MCP_SESSION_ID)
        if upstream.status != 200 or not upstream_session_id:
            # A refused initialize, or a server without sessions: nothing to map.
            return await self._relay(request, upstream, None)
        record = SessionRecord(
            client_session_id=new_client_session_id(),
            upstream_session_id=upstream_session_id,
            initialize_params=dict(init.params or {}),
        )
        try:
            # Stored before the client sees the id, so no request can arrive for an unknown id.
            await self._store.put(record)
        except BaseException:
            upstream.release()
            raise
        watcher = InitializeAnswerWatcher(init.id, upstream.headers.get("Content-Type", ""))
        response = await self._relay(request, upstream, record.client_session_id, observe=watcher.feed)
        if watcher.protocol_version is not None:
            await self._store.put(replace(record, protocol_version=watcher.protocol_version))
        return response

    # --- GET and DELETE ---------------------------------------------------------------------------

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        """Open the server-to-client SSE stream of a session."""
        try:
            record = await self._record(self._required_session_id(request))
            upstream = await self._upstream.send(
                "GET", upstream_request_headers(request.headers, record.upstream_session_id), stream=True
            )
            expired, prefetched = await self._check_expiry(upstream)
            if expired:
                record = await self._healer.heal(record, request.headers, reason=f"http_{upstream.status}")
                # Event ids of the dead session mean nothing to the new one.
                headers = upstream_request_headers(request.headers, record.upstream_session_id, drop=(LAST_EVENT_ID,))
                upstream = await self._upstream.send("GET", headers, stream=True)
                prefetched = b""
            return await self._relay(request, upstream, record.client_session_id, prefetched)
        except ProxyError as exc:
            return error_response(exc, None)

    async def handle_delete(self, request: web.Request) -> web.StreamResponse:
        """End a session: tell the upstream, forget the mapping."""
        try:
            client_session_id = self._required_session_id(request)
            record = await self._record(client_session_id)
        except ProxyError as exc:
            return error_response(exc, None)
        status: int | None = None
        try:
            upstream = await self._upstream.send(
                "DELETE", upstream_request_headers(request.headers, record.upstream_session_id)
            )
            status = upstream.status
            upstream.release()
        except ProxyError as exc:
            log.warning("session.delete_upstream_failed", client_session=client_session_id[:8], error=exc.message)
        finally:
            await self._store.delete(client_session_id)
        if status is None or status in _DELETE_GONE:
            return web.Response(status=200)
        return web.Response(status=status)

    # --- shared pieces ----------------------------------------------------------------------------

    @staticmethod
    def _required_session_id(request: web.Request) -> str:
        client_session_id = request.headers.get(MCP_SESSION_ID)
        if client_session_id is None:
            raise InvalidRequest(f"{request.method} needs an {MCP_SESSION_ID} header")
        return client_session_id

    async def _record(self, client_session_id: str) -> SessionRecord:
        record = await self._store.get(client_session_id)
        if record is None:
            raise UnknownSession("Session not found")
        return record

    @staticmethod
    async def _check_expiry(upstream: aiohttp.ClientResponse) -> tuple[bool, bytes]:
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
        if is_session_expired(upstream.status, body, sent_session_id=True):
            upstream.release()
            return True, b""
        return False, body

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        client_session_id: str | None,
        prefetched: bytes = b"",
        *,
        observe: Callable[[bytes], None] | None = None,
    ) -> web.StreamResponse:
        """Stream an upstream answer to the client as it arrives, with the client's session id."""
        try:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers, client_session_id),
            )
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                # Tell any buffering proxy in front of us (nginx) to pass events through at once.
                response.headers["X-Accel-Buffering"] = "no"
            await response.prepare(request)
            if prefetched:
                await response.write(prefetched)
                if observe is not None:
                    observe(prefetched)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    if observe is not None:
                        observe(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The upstream broke the answer after it started; headers are gone, so end the stream.
                log.warning("upstream.stream_broken", error=type(exc).__name__)
            await response.write_eof()
            return response
        finally:
            upstream.release()
