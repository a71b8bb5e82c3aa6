"""OpenTelemetry traces and metrics with the MCP semantic conventions (the ``otel`` extra).

Imported only when ``[server] otel = true``: with it off, nothing here (and nothing of OpenTelemetry)
is imported, and the fronts and the engine each pay one ``is None`` check per request. Everything else
is configured the OpenTelemetry way, by the standard ``OTEL_*`` environment variables (endpoint,
service name, sampler, batch processor, metric interval), read by the SDK itself.

What is traced (open-telemetry/semantic-conventions-genai, docs/gen-ai/mcp.md):

* a SERVER span for each MCP request or notification a client sends, on either front, named
  ``{mcp.method.name} {target}`` (the tool or prompt name), parented on the client's
  ``params._meta.traceparent``, else on the HTTP ``traceparent`` header, else a new trace (a header
  context that is not the parent is linked, as the conventions ask);
* a CLIENT span for each exchange with the upstream under it (``server.address``, ``server.port``),
  open until the client's request ends when its answer streams;
* a heal as an INTERNAL span under the request that met the dead session, with the re-initialize,
  the handshake, each state re-application and the replay as its children;
* a CLIENT span for each attach and reattach of a session's server stream (GET), not one per event.

Never recorded: tool arguments and results (the conventions' opt-in attributes stay off), header
values, tokens, query values of URLs; the upstream's own session ids stay out too.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Counter, Histogram, MeterProvider
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider

from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.observability import KNOWN_METHODS
from mcp_heal_proxy.wire.jsonrpc import Kind, Message, PostBody

log = structlog.get_logger("mcp_heal_proxy.otel")

SCOPE: Final = "mcp_heal_proxy"
# The conventions' ExplicitBucketBoundaries for every MCP duration histogram.
DURATION_BUCKETS: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Client-chosen strings (methods, tool and prompt names) are cut to this length in names and attributes.
MAX_NAME: Final = 128
# Methods whose params name a resource (mcp.resource.uri).
_RESOURCE_METHODS: Final = frozenset(
    {"resources/read", "resources/subscribe", "resources/unsubscribe", "notifications/resources/updated"}
)
# A metric's method label: the well-known methods as they are, anything a client invents as _OTHER, so that
# clients cannot grow the series.
_METRIC_METHODS: Final = KNOWN_METHODS - {"response", "batch", "GET", "DELETE"}
_OTHER: Final = "_OTHER"
# The W3C Trace Context and Baggage keys SEP-414 reserves in params._meta (and the HTTP headers of the
# same names).
_CONTEXT_KEYS: Final = ("traceparent", "tracestate", "baggage")

# The request being served in this task (the fronts set it; the engine's exchanges attach to it).
_REQUEST: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("mcp_heal_proxy_request", default=None)
# The attach span of the server stream followed in this task (reattaches are its children). Left set: the
# task is the stream's (a GET handler, the bridge's stream follower) and ends with it.
_STREAM: contextvars.ContextVar[Context | None] = contextvars.ContextVar("mcp_heal_proxy_stream", default=None)


def _cut(value: str) -> str:
    return value if len(value) <= MAX_NAME else value[:MAX_NAME]


def _error_type(exc: BaseException) -> str:
    """``error.type`` of an exception: the JSON-RPC error code of an error the proxy answers, else the
    class name (low cardinality, as the conventions ask)."""
    if isinstance(exc, ProxyError):
        return str(exc.code)
    return type(exc).__qualname__


class Peer:
    """``server.address`` and ``server.port`` of one upstream (from its URL: never its userinfo or query)."""

    __slots__ = ("attributes", "name")

    def __init__(self, name: str, url: str) -> None:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.name = name
        self.attributes: dict[str, str | int] = {"server.address": parts.hostname or "", "server.port": port}


def traced_session_id(client_session_id: str) -> str:
    """What spans record as ``mcp.session.id``: never the client's whole session id, which works as a
    credential for the session (whoever has it can send on it through the proxy, with the proxy's managed
    login) and does not belong in a telemetry backend. A sealed id (engine/sealing.py) gives its nonce, the
    32 hex digits it starts with, unique per session and the prefix that logs, ``sessions`` and the status
    page show; a random id (initialize params too large to seal) gives a digest of itself instead."""
    nonce, dot, _ = client_session_id.partition(".")
    if dot:
        return nonce
    return "sha256:" + hashlib.sha256(client_session_id.encode()).hexdigest()[:32]


def message_attributes(message: Message) -> tuple[str, dict[str, Any]]:
    """A message's span name and its attributes per the conventions (never its arguments)."""
    method = _cut(message.method or "response")
    attributes: dict[str, Any] = {"mcp.method.name": method}
    if message.kind is Kind.REQUEST and message.id is not None:
        attributes["jsonrpc.request.id"] = str(message.id)
    params = message.params
    target = None
    if params is not None:
        if method == "tools/call":
            name = params.get("name")
            if isinstance(name, str):
                target = attributes["gen_ai.tool.name"] = _cut(name)
            attributes["gen_ai.operation.name"] = "execute_tool"
        elif method == "prompts/get":
            name = params.get("name")
            if isinstance(name, str):
                target = attributes["gen_ai.prompt.name"] = _cut(name)
        elif method in _RESOURCE_METHODS:
            uri = params.get("uri")
            if isinstance(uri, str):
                # A resource URI may carry credentials or query values: shown masked, as in logs.
                attributes["mcp.resource.uri"] = mask_url(uri)
    return (f"{method} {target}" if target else method), attributes


def _metric_attributes(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    chosen = {key: attributes[key] for key in keys if key in attributes}
    if chosen.get("mcp.method.name") not in _METRIC_METHODS:
        chosen["mcp.method.name"] = _OTHER
    return chosen


_SERVER_METRIC_KEYS: Final = (
    "mcp.method.name",
    "error.type",
    "gen_ai.tool.name",
    "gen_ai.prompt.name",
    "gen_ai.operation.name",
    "rpc.response.status_code",
    "mcp.protocol.version",
    "network.transport",
    "network.protocol.name",
)
_CLIENT_METRIC_KEYS: Final = (*_SERVER_METRIC_KEYS, "server.address", "server.port")


def _parent(message: Message | None, headers: Mapping[str, str] | None) -> tuple[Context, list[Link]]:
    """The parent of a SERVER span: the context in the message's ``params._meta``, else the HTTP headers',
    else none (a new trace). A header context beside a ``_meta`` one is linked (the transport's context)."""
    from_headers = None
    if headers is not None and headers.get("traceparent") is not None:
        candidate = propagate.extract(headers)
        if trace.get_current_span(candidate).get_span_context().is_valid:
            from_headers = candidate
    meta = message.params.get("_meta") if message is not None and message.params is not None else None
    if isinstance(meta, dict) and isinstance(meta.get("traceparent"), str):
        from_meta = propagate.extract(meta)
        meta_span = trace.get_current_span(from_meta).get_span_context()
        if meta_span.is_valid:
            links = []
            if from_headers is not None:
                header_span = trace.get_current_span(from_headers).get_span_context()
                if header_span.span_id != meta_span.span_id:
                    links.append(Link(header_span))
            return from_meta, links
    # An empty context, not None: without a parent the span starts a new trace, whatever is current.
    return (from_headers if from_headers is not None else Context()), []


class Telemetry:
    """The proxy's tracer and meter, and the hooks the fronts and the engine call."""

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        *,
        transport: str = "tcp",
        propagate_proxy: bool = False,
        owned: bool = False,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.tracer = tracer_provider.get_tracer(SCOPE)
        meter = meter_provider.get_meter(SCOPE)
        # "tcp" for the HTTP front, "pipe" for the stdio bridge (network.transport).
        self.transport = transport
        self._base: dict[str, Any] = {"network.transport": transport}
        if transport == "tcp":
            self._base["network.protocol.name"] = "http"
        # The proxy's own span context goes upstream in params._meta (otel_propagate = "proxy").
        self.propagate_proxy = propagate_proxy
        self._owned = owned
        self.server_duration: Histogram = meter.create_histogram(
            "mcp.server.operation.duration",
            unit="s",
            description="MCP request or notification duration as observed on the receiver from the time it was "
            "received until the result or ack is sent.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.client_duration: Histogram = meter.create_histogram(
            "mcp.client.operation.duration",
            unit="s",
            description="The duration of the MCP request or notification as observed on the sender from the time "
            "it was sent until the response or ack is received.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.session_duration: Histogram = meter.create_histogram(
            "mcp.server.session.duration",
            unit="s",
            description="The duration of the MCP session as observed on the MCP server.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.heals: Counter = meter.create_counter(
            "mcp_heal_proxy.heals",
            unit="{heal}",
            description="Upstream session re-initializations, by upstream, reason and outcome.",
        )
        self.heal_duration: Histogram = meter.create_histogram(
            "mcp_heal_proxy.heal.duration",
            unit="s",
            description="Time to re-initialize an expired upstream session, by upstream, reason and outcome.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    @staticmethod
    def peer(name: str, url: str) -> Peer:
        """The attributes of one upstream, made once per engine."""
        return Peer(name, url)

    # --- the fronts ---------------------------------------------------------------------------------

    def server_request(
        self,
        body: PostBody,
        headers: Mapping[str, str] | None,
        *,
        session_id: str | None,
        protocol_version: str | None,
    ) -> RequestTrace | None:
        """Start the SERVER span(s) of a client's POST body or stdio line and make the first current (the
        caller ends it with ``RequestTrace.end``, and leaves the context with ``RequestTrace.leave`` in the
        same task). None for a body of responses only: no request or notification to trace."""
        messages = [m for m in body.messages if m.method is not None]
        if not messages:
            return None
        return RequestTrace(self, messages, headers, session_id, protocol_version)

    def stream_context(self, headers: Mapping[str, str]) -> contextvars.Token[Context]:
        """Make the HTTP ``traceparent`` of a client's GET the parent of its stream spans; a token for
        ``leave``."""
        parent, _ = _parent(None, headers)
        return otel_context.attach(parent)

    @staticmethod
    def leave(token: contextvars.Token[Context]) -> None:
        """Undo ``stream_context``."""
        otel_context.detach(token)

    @staticmethod
    def note_error(exc: ProxyError) -> None:
        """An error the proxy answered for the request being served in this task (stdio bridge)."""
        request = _REQUEST.get()
        if request is not None:
            request.fail(exc)

    @staticmethod
    def set_session(session_id: str, protocol_version: str | None) -> None:
        """The session an initialize opened, for the request being served in this task."""
        request = _REQUEST.get()
        if request is not None:
            request.set_session(session_id, protocol_version)

    # --- the engine ---------------------------------------------------------------------------------

    def exchange(self, body: PostBody, peer: Peer, *, replay: bool = False) -> ClientExchange:
        """A CLIENT span for one POST to the upstream, under what is current (the request, or a heal)."""
        message = body.messages[0]
        name, attributes = message_attributes(message)
        if body.is_batch:
            name = attributes["mcp.method.name"] = "batch"
        attributes.update(self._base)
        attributes.update(peer.attributes)
        if replay:
            attributes["mcp_heal_proxy.replay"] = True
        return ClientExchange(self, name, attributes, hold=True)

    def step(self, method: str, request_id: str | None, peer: Peer) -> ClientExchange:
        """A CLIENT span for one request of a heal (re-initialize, handshake, a state re-application)."""
        attributes: dict[str, Any] = {"mcp.method.name": method, **self._base, **peer.attributes}
        if request_id is not None:
            attributes["jsonrpc.request.id"] = request_id
        return ClientExchange(self, method, attributes, hold=False)

    def stream(self, kind: str, peer: Peer, session_id: str, *, generation: int) -> ClientExchange:
        """A CLIENT span for one attach (``kind`` "attach") or reattach of a session's server stream (GET),
        ended when the upstream answers. Reattaches are children of the stream's attach."""
        attributes: dict[str, Any] = {
            "http.request.method": "GET",
            "mcp.session.id": traced_session_id(session_id),
            "mcp_heal_proxy.stream": kind,
            "mcp_heal_proxy.generation": generation,
            **self._base,
            **peer.attributes,
        }
        parent = _STREAM.get() if kind == "reattach" else None
        exchange = ClientExchange(self, f"GET stream {kind}", attributes, hold=False, parent=parent)
        if kind == "attach":
            _STREAM.set(trace.set_span_in_context(exchange.span))
        return exchange

    def heal(self, peer: Peer, session_id: str, reason: str, generation: int) -> HealTrace:
        """An INTERNAL span for a heal, current until ``HealTrace.close`` (the healer's steps and the replay
        are its children)."""
        return HealTrace(self, peer, session_id, reason, generation)

    def heal_reported(self, upstream: str, reason: str, outcome: str, duration: float) -> None:
        """A heal ended (the healer reports every one once): the heal counter and duration."""
        attributes = {
            "mcp_heal_proxy.upstream": upstream,
            "mcp_heal_proxy.heal.reason": reason,
            "mcp_heal_proxy.heal.outcome": outcome,
        }
        self.heals.add(1, attributes)
        self.heal_duration.record(duration, attributes)

    def session_ended(self, created_at: float, protocol_version: str | None, *, error_type: str | None = None) -> None:
        """A client session ended (DELETE, the bridge's client left, the proxy forgot it)."""
        attributes = dict(self._base)
        if protocol_version is not None:
            attributes["mcp.protocol.version"] = protocol_version
        if error_type is not None:
            attributes["error.type"] = error_type
        self.session_duration.record(max(0.0, time.time() - created_at), attributes)

    # --- the end ------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Export what is pending and stop (blocking: run it off the event loop). Only providers this object
        made itself are shut down; a caller's own stay the caller's."""
        if not self._owned:
            return
        for provider in (self._tracer_provider, self._meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                shutdown()


class RequestTrace:
    """The SERVER span(s) of one client POST or stdio line, current while it is served."""

    __slots__ = (
        "_attributes",
        "_ended",
        "_error",
        "_held",
        "_request_token",
        "_spans",
        "_started",
        "_telemetry",
        "_token",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        messages: list[Message],
        headers: Mapping[str, str] | None,
        session_id: str | None,
        protocol_version: str | None,
    ) -> None:
        self._telemetry = telemetry
        self._started = time.perf_counter()
        self._spans: list[Span] = []
        self._attributes: list[dict[str, Any]] = []
        self._held: list[ClientExchange] = []
        self._error: ProxyError | None = None
        self._ended = False
        parent_span: Span | None = None
        for message in messages:
            name, attributes = message_attributes(message)
            attributes.update(telemetry._base)
            if session_id is not None:
                attributes["mcp.session.id"] = traced_session_id(session_id)
            version = protocol_version
            if version is None and message.method == "initialize" and message.params is not None:
                requested = message.params.get("protocolVersion")
                version = requested if isinstance(requested, str) else None
            if version is not None:
                attributes["mcp.protocol.version"] = version
            if parent_span is None:
                parent, links = _parent(message, headers)
            else:
                # The other messages of a batch: under the first.
                parent, links = trace.set_span_in_context(parent_span), []
            span = telemetry.tracer.start_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes, links=links
            )
            parent_span = parent_span or span
            self._spans.append(span)
            self._attributes.append(attributes)
        assert parent_span is not None
        self._token = otel_context.attach(trace.set_span_in_context(parent_span))
        self._request_token = _REQUEST.set(self)

    def leave(self) -> None:
        """No longer current in this task (what the request still writes is its own)."""
        _REQUEST.reset(self._request_token)
        otel_context.detach(self._token)

    def set_session(self, session_id: str, protocol_version: str | None) -> None:
        traced = traced_session_id(session_id)
        for span, attributes in zip(self._spans, self._attributes, strict=True):
            span.set_attribute("mcp.session.id", traced)
            attributes["mcp.session.id"] = traced
            if protocol_version is not None:
                span.set_attribute("mcp.protocol.version", protocol_version)
                attributes["mcp.protocol.version"] = protocol_version

    def fail(self, exc: ProxyError) -> None:
        """The proxy answered this error (the first one counts)."""
        if self._error is None:
            self._error = exc

    def hold(self, exchange: ClientExchange) -> None:
        """An upstream exchange whose answer is relayed as part of this request: ended with it."""
        if self._ended:
            exchange.end()
        else:
            self._held.append(exchange)

    def end(
        self,
        *,
        status: int | None = None,
        error: ProxyError | None = None,
        upstream_broke: bool = False,
    ) -> None:
        """End the spans: ``status`` the HTTP status the client got (None over stdio), ``error`` the error the
        proxy answered. Status ERROR with ``error.type`` (the JSON-RPC error code, else the HTTP status) when
        the request failed, as the conventions ask."""
        if self._ended:
            return
        self._ended = True
        error = error or self._error
        error_type = code = description = None
        if error is not None:
            error_type = code = str(error.code)
            description = error.message
        elif upstream_broke:
            error_type, description = "upstream_broke", "upstream MCP server broke its answer after it started"
        elif status is not None and status >= 400:
            # 499: the client left before any answer started. A client that stops reading once its
            # response came (SDK clients close SSE answers then) did not fail.
            error_type = str(status)
        for exchange in self._held:
            exchange.end(error_type=error_type if upstream_broke else None)
        self._held.clear()
        duration = time.perf_counter() - self._started
        telemetry = self._telemetry
        for span, attributes in zip(self._spans, self._attributes, strict=True):
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error_type is not None:
                attributes["error.type"] = error_type
                span.set_attribute("error.type", error_type)
                if code is not None:
                    attributes["rpc.response.status_code"] = code
                    span.set_attribute("rpc.response.status_code", code)
                span.set_status(Status(StatusCode.ERROR, description))
            span.end()
            telemetry.server_duration.record(duration, _metric_attributes(attributes, _SERVER_METRIC_KEYS))


class ClientExchange:
    """A CLIENT span for one request to the upstream."""

    __slots__ = ("_attributes", "_ended", "_hold", "_started", "_telemetry", "span")

    def __init__(
        self,
        telemetry: Telemetry,
        name: str,
        attributes: dict[str, Any],
        *,
        hold: bool,
        parent: Context | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._attributes = attributes
        self._hold = hold
        self._ended = False
        self._started = time.perf_counter()
        self.span = telemetry.tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, attributes=attributes)

    def outgoing(self, body: PostBody, headers: MutableMapping[str, str]) -> bytes:
        """The bytes to send: the client's, untouched, unless the proxy's own context goes upstream
        (otel_propagate = "proxy"): then it is written into each message's ``params._meta`` (and the HTTP
        ``traceparent`` header), replacing the client's."""
        if not self._telemetry.propagate_proxy:
            return body.raw
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        for name in [name for name in headers if name.lower() in _CONTEXT_KEYS]:
            del headers[name]
        headers.update(carrier)
        return with_meta(body.raw, carrier)

    def answered(self, status: int) -> None:
        """The upstream answered with ``status``: an error, an ack (202) or a refusal ends the exchange now;
        an answer being relayed ends with the client's request (or now, outside of one)."""
        if status >= 400:
            self.end(error_type=str(status))
            return
        self.span.set_attribute("http.response.status_code", status)
        request = _REQUEST.get() if self._hold and status == 200 else None
        if request is None:
            self.end()
        else:
            request.hold(self)

    def failed(self, exc: BaseException) -> None:
        """Nothing answered (refused, timed out, cancelled)."""
        self.end(error_type=_error_type(exc), description=str(getattr(exc, "message", "")) or None)

    def end(self, *, error_type: str | None = None, description: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        span = self.span
        if error_type is not None:
            self._attributes["error.type"] = error_type
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, description))
        span.end()
        if "mcp.method.name" in self._attributes:
            self._telemetry.client_duration.record(
                time.perf_counter() - self._started, _metric_attributes(self._attributes, _CLIENT_METRIC_KEYS)
            )


class HealTrace:
    """A heal's span, current (in this task, and in the heal task it starts) until ``close``."""

    __slots__ = ("_outcome", "_token", "span")

    def __init__(self, telemetry: Telemetry, peer: Peer, session_id: str, reason: str, generation: int) -> None:
        attributes: dict[str, Any] = {
            "mcp_heal_proxy.heal.reason": reason,
            "mcp_heal_proxy.heal.generation": generation,
            "mcp_heal_proxy.upstream": peer.name,
            "mcp.session.id": traced_session_id(session_id),
            **peer.attributes,
        }
        self.span = telemetry.tracer.start_span("heal", kind=SpanKind.INTERNAL, attributes=attributes)
        self._outcome: str | None = None
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def healed(self, new_generation: int) -> None:
        self._outcome = "healed"
        self.span.set_attribute("mcp_heal_proxy.heal.outcome", "healed")
        self.span.set_attribute("mcp_heal_proxy.heal.new_generation", new_generation)

    def failed(self, exc: BaseException) -> None:
        """The heal (not the replay after it) failed."""
        if self._outcome is not None:
            return
        self._outcome = "failed"
        error_type = _error_type(exc)
        self.span.set_attribute("mcp_heal_proxy.heal.outcome", "failed")
        self.span.set_attribute("error.type", error_type)
        self.span.set_status(Status(StatusCode.ERROR, getattr(exc, "message", None) or error_type))

    def close(self) -> None:
        """End the span (after the replay went out) and leave its context."""
        otel_context.detach(self._token)
        self.span.end()


def with_meta(raw: bytes, carrier: Mapping[str, str]) -> bytes:
    """``raw`` with ``carrier``'s keys in each request's and notification's ``params._meta`` (replacing
    any trace context there). Only for otel_propagate = "proxy": by default bodies go upstream as sent."""
    payload = json.loads(raw)
    for message in payload if isinstance(payload, list) else [payload]:
        if not isinstance(message, dict) or not isinstance(message.get("method"), str):
            continue
        params = message.setdefault("params", {})
        if not isinstance(params, dict):
            continue  # positional params have no _meta
        meta = params.get("_meta")
        meta = dict(meta) if isinstance(meta, dict) else {}
        for key in _CONTEXT_KEYS:
            meta.pop(key, None)
        meta.update(carrier)
        params["_meta"] = meta
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def from_environment(*, transport: str, propagate_proxy: bool) -> Telemetry:
    """The SDK's providers as the ``OTEL_*`` variables configure them: OTLP over HTTP/protobuf to
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default http://localhost:4318), a batch span processor
    (``OTEL_BSP_*``), the sampler of ``OTEL_TRACES_SAMPLER``, metrics every
    ``OTEL_METRIC_EXPORT_INTERVAL`` ms; ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` may be
    ``otlp`` (default), ``console`` or ``none``. ``service.name`` is mcp-heal-proxy unless
    ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` names another."""
    from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    from mcp_heal_proxy import __version__

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol.strip() != "http/protobuf":
        log.warning("otel.protocol_not_supported", protocol=protocol, hint="the proxy exports http/protobuf")
    defaults: dict[str, str] = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        defaults["service.name"] = "mcp-heal-proxy"
    resource = Resource.create(defaults)
    # Shut down by the proxy (Telemetry.shutdown, once its calls ended), not by an atexit hook of the SDK's:
    # the flush is part of the stop, bounded by it, and seen to happen.
    tracer_provider = SDKTracerProvider(resource=resource, shutdown_on_exit=False)
    span_exporter: SpanExporter | None = None
    traces = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if traces == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    elif traces == "console":
        span_exporter = ConsoleSpanExporter(out=sys.stderr)  # stdout is the stdio bridge's protocol channel
    elif traces != "none":
        log.warning(
            "otel.exporter_not_supported", variable="OTEL_TRACES_EXPORTER", value=traces, hint="otlp, console or none"
        )
    if span_exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    readers: list[MetricReader] = []
    metric_exporter: MetricExporter | None = None
    metrics = os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower()
    if metrics == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        metric_exporter = OTLPMetricExporter()
    elif metrics == "console":
        metric_exporter = ConsoleMetricExporter(out=sys.stderr)
    elif metrics != "none":
        log.warning(
            "otel.exporter_not_supported", variable="OTEL_METRICS_EXPORTER", value=metrics, hint="otlp, console or none"
        )
    if metric_exporter is not None:
        readers.append(PeriodicExportingMetricReader(metric_exporter))
    meter_provider = SDKMeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
    return Telemetry(tracer_provider, meter_provider, transport=transport, propagate_proxy=propagate_proxy, owned=True)
