"""Writing upstream answers to the client: whole JSON answers in one write, SSE streams as they arrive.

A ``Relay`` belongs to one upstream's handlers. It fills silent SSE streams with keep-alive comments,
ends a stream the upstream broke with a JSON-RPC error for every request still unanswered, keeps a GET
stream open across a heal by reattaching upstream, and ends GET streams cleanly at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Gauge

from mcp_heal_proxy import jsonrpc
from mcp_heal_proxy.answers import AnswerTracker
from mcp_heal_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from mcp_heal_proxy.headers import client_response_headers
from mcp_heal_proxy.sse import Event, encode_comment, encode_event

log = structlog.get_logger("mcp_heal_proxy.relay")

_KEEPALIVE: Final = encode_comment("keep-alive")
# Non-SSE answers up to this size are relayed whole (one write); larger ones stream chunk by chunk.
WHOLE_ANSWER_LIMIT: Final = 1024 * 1024
_EVENT_ENDS: Final = (b"\n\n", b"\r\n\r\n", b"\r\r")
_BROKEN: Final = "upstream MCP server broke the stream before answering; the request was not replayed (it may have run)"

Reattach = Callable[[], Awaitable[aiohttp.ClientResponse | None]]


class Relay:
    """Relays one upstream's answers to clients."""

    def __init__(self, upstream_name: str, keepalive_interval: float, open_streams: Gauge) -> None:
        self._name = upstream_name
        self._keepalive_interval = keepalive_interval
        self._open_streams = open_streams
        # Open GET streams' upstream responses, so that shutdown can end them cleanly.
        self._server_streams: set[aiohttp.ClientResponse] = set()
        self._closing = False

    def end_server_streams(self) -> None:
        """Shutdown: end every GET stream cleanly now, so clients reconnect to the next proxy.

        GET streams carry server-initiated messages and never finish by themselves; POST answers (tool
        calls in flight) are left to finish within the shutdown grace period.
        """
        self._closing = True
        for upstream in list(self._server_streams):
            upstream.close()

    async def relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        client_session_id: str | None,
        prefetched: bytes = b"",
        *,
        tracker: AnswerTracker | None = None,
        reattach: Reattach | None = None,
    ) -> web.StreamResponse:
        """Send an upstream answer to the client as it arrives, with the client's session id.

        ``tracker`` watches the answer for responses: if the upstream breaks the stream first, each
        unanswered request gets a JSON-RPC error event (it is not replayed: the tool may have run).
        ``reattach`` opens a new upstream stream when a GET stream ends while the client still listens.
        """
        observe = tracker.feed if tracker is not None else None
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        length = upstream.content_length
        if not is_sse and length is not None and length <= WHOLE_ANSWER_LIMIT:
            # A JSON answer of known length is one message, not a stream: send headers and body in one
            # write. Streaming it cost a write per chunk plus chunked framing (a quarter of the time).
            return await self._relay_whole(upstream, client_session_id, prefetched, observe)
        streams = self._open_streams.labels(self._name)
        try:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers, client_session_id),
            )
            if is_sse:
                # Tell any buffering proxy in front of us (nginx) to pass events through at once.
                response.headers["X-Accel-Buffering"] = "no"
            await response.prepare(request)
            if prefetched:
                await response.write(prefetched)
                if observe is not None:
                    observe(prefetched)
            streams.inc()
            if reattach is not None:
                self._server_streams.add(upstream)
            try:
                while True:
                    if is_sse:
                        between_events = await self._pump_sse(upstream, response, observe)
                    else:
                        between_events = await self._pump(upstream, response, observe)
                    if (
                        is_sse
                        and tracker is not None
                        and (not between_events or not tracker.resumable)
                        and tracker.may_be_unanswered()
                    ):
                        # Broken mid-event, or closed without the answer by a server the client cannot
                        # resume from (no event ids): the client would wait forever.
                        await self._finish_broken_stream(response, tracker)
                    if reattach is None or not between_events or self._closing:
                        break
                    self._server_streams.discard(upstream)
                    upstream.release()
                    next_upstream = await reattach()
                    if next_upstream is None:
                        break
                    upstream = next_upstream
                    self._server_streams.add(upstream)
            finally:
                streams.dec()
                self._server_streams.discard(upstream)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    async def _relay_whole(
        self,
        upstream: aiohttp.ClientResponse,
        client_session_id: str | None,
        prefetched: bytes,
        observe: Callable[[bytes], None] | None,
    ) -> web.Response:
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
        return web.Response(
            status=upstream.status,
            reason=upstream.reason,
            headers=client_response_headers(upstream.headers, client_session_id),
            body=body,
        )

    async def _finish_broken_stream(self, response: web.StreamResponse, tracker: AnswerTracker) -> None:
        """End a stream the upstream broke with an error event for every request still unanswered."""
        unanswered = tracker.unanswered()
        if not unanswered:
            return
        log.warning("upstream.stream_broken_before_answer", upstream=self._name, unanswered=len(unanswered))
        # A blank line first ends any half-written event, so the errors parse as events of their own.
        errors = b"\n\n" + b"".join(
            encode_event(Event(data=json.dumps(jsonrpc.error_object(request_id, UpstreamUnavailable.code, _BROKEN))))
            for request_id in unanswered
        )
        with contextlib.suppress(ConnectionError):  # the client may have left too
            await response.write(errors)

    async def _pump(
        self, upstream: aiohttp.ClientResponse, response: web.StreamResponse, observe: Callable[[bytes], None] | None
    ) -> bool:
        """Copy a non-SSE body; True if it ended cleanly."""
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                if observe is not None:
                    observe(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream.stream_broken", upstream=self._name, error=type(exc).__name__)
            return False
        return True

    async def _pump_sse(
        self, upstream: aiohttp.ClientResponse, response: web.StreamResponse, observe: Callable[[bytes], None] | None
    ) -> bool:
        """Copy an SSE body, filling silences with keep-alive comments; True if it ended between events."""
        content = upstream.content
        interval = self._keepalive_interval
        at_boundary = True
        try:
            while True:
                idle = asyncio.timeout(interval)
                try:
                    async with idle:
                        chunk = await content.readany()
                except TimeoutError:
                    if not idle.expired():
                        raise  # the upstream read timeout, not our keep-alive tick
                    if at_boundary:
                        # Only between events: a comment inside an event would corrupt it.
                        await response.write(_KEEPALIVE)
                    continue
                if not chunk:
                    return at_boundary
                await response.write(chunk)
                at_boundary = chunk.endswith(_EVENT_ENDS)
                if observe is not None:
                    observe(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not self._closing:
                log.warning("upstream.stream_broken", upstream=self._name, error=type(exc).__name__)
            return at_boundary
