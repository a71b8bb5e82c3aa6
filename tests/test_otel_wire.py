"""OpenTelemetry on the real wire: ``serve`` with ``otel = true`` exports over OTLP/HTTP (protobuf) to a
receiver this test runs on 127.0.0.1, which decodes what arrives with the ``opentelemetry-proto`` package.
A healed call arrives with the same structure as in-process (tests/test_otel.py), and SIGTERM with a call
in flight loses no span: the batch processor's delay is set beyond the test, so only the shutdown's flush
can have sent them."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider

from tests.conftest import (
    UpstreamProcess,
    mcp_session,
    raw_initialize,
    session_headers,
    start_serve,
    wait_until,
)

CALL_TIMEOUT = 20.0
BRIDGE = str(Path(sys.executable).parent / "mcp-heal-proxy")


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


class Receiver:
    """An OTLP/HTTP receiver: /v1/traces and /v1/metrics, protobuf, gzip or not."""

    def __init__(self) -> None:
        # (resource attributes, span) as they arrived.
        self.spans: list[tuple[dict[str, Any], Span]] = []
        self.metric_names: set[str] = set()
        self.exports = 0

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        body = await request.read()
        return gzip.decompress(body) if request.headers.get("Content-Encoding") == "gzip" else body

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await self._body(request))
        for resource_spans in message.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((resource, span) for span in scope_spans.spans)
        self.exports += 1
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def metrics(self, request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest()
        message.ParseFromString(await self._body(request))
        for resource_metrics in message.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.metric_names.update(metric.name for metric in scope_metrics.metrics)
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        app.router.add_post("/v1/metrics", self.metrics)
        return app

    def named(self, name: str, kind: int) -> list[Span]:
        return [span for _, span in self.spans if span.name == name and span.kind == kind]

    def children(self, parent: Span) -> list[Span]:
        found = [span for _, span in self.spans if span.parent_span_id == parent.span_id]
        return sorted(found, key=lambda span: span.start_time_unix_nano)


async def test_serve_exports_a_healed_call_over_otlp_and_sigterm_loses_no_span(
    sse_upstream: UpstreamProcess,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = Receiver()
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    monkeypatch.setenv("MCP_HEAL_PROXY_OTEL", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "heal-proxy-under-test")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    # Nothing is exported on a timer during the test: what arrives, the stop's flush sent.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    process, url = await start_serve("--upstream", sse_upstream.url, "--port", "0", "--state", ":memory:")
    try:
        async with mcp_session(url) as session:
            async with asyncio.timeout(CALL_TIMEOUT):
                await session.call_tool("echo", {"text": "before"})
            # Forgotten, not restarted: a restart also breaks the server stream, whose reattach may heal first.
            assert len(await sse_upstream.forget_sessions()) == 1
            client_tracer = TracerProvider().get_tracer("the client")
            with client_tracer.start_as_current_span("the client's call") as client_span:
                async with asyncio.timeout(CALL_TIMEOUT):
                    await session.call_tool("echo", {"text": "after"})
        assert receiver.exports == 0, "the batch processor exported before the stop"

        # A call in flight when SIGTERM comes: it finishes within the grace, and its span is exported.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)) as http:
            session_id = await raw_initialize(http, url)
            calls = (await sse_upstream.stats())["tools_call"]
            call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "gated_steps", "arguments": {"steps": 1}}}  # fmt: skip
            async with http.post(url, json=call, headers=session_headers(session_id)) as response:
                assert response.status == 200

                async def arrived() -> bool:
                    return bool((await sse_upstream.stats())["tools_call"] > calls)

                await wait_until(arrived, 10, "the gated call upstream")
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)  # the proxy is stopping with the call in flight
                await sse_upstream.release(1)
                answer = await response.text()
            assert "done after 1 steps" in answer
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # The healed call: the same structure as in-process.
    resources = {tuple(sorted(resource.items())) for resource, _ in receiver.spans}
    assert all(dict(resource)["service.name"] == "heal-proxy-under-test" for resource in resources)
    client_span_id = client_span.get_span_context().span_id.to_bytes(8, "big")
    client_trace_id = client_span.get_span_context().trace_id.to_bytes(16, "big")
    (served,) = [
        s for s in receiver.named("tools/call echo", Span.SPAN_KIND_SERVER) if s.parent_span_id == client_span_id
    ]
    assert served.trace_id == client_trace_id
    attributes = attributes_of(served.attributes)
    assert attributes["mcp.method.name"] == "tools/call"
    assert attributes["gen_ai.tool.name"] == "echo"
    assert attributes["network.transport"] == "tcp"
    assert attributes["http.response.status_code"] == 200
    expired, heal = receiver.children(served)
    assert (expired.name, expired.kind) == ("tools/call echo", Span.SPAN_KIND_CLIENT)
    assert attributes_of(expired.attributes)["error.type"] == "404"
    assert (heal.name, heal.kind) == ("heal", Span.SPAN_KIND_INTERNAL)
    heal_attributes = attributes_of(heal.attributes)
    assert heal_attributes["mcp_heal_proxy.heal.reason"] == "http_404"
    assert heal_attributes["mcp_heal_proxy.heal.outcome"] == "healed"
    assert [s.name for s in receiver.children(heal)] == [
        "initialize",
        "notifications/initialized",
        "tools/call echo",
    ]
    assert attributes_of(receiver.children(heal)[-1].attributes)["mcp_heal_proxy.replay"] is True
    # The call in flight at SIGTERM: its SERVER span and its exchange arrived, whole.
    (in_flight,) = receiver.named("tools/call gated_steps", Span.SPAN_KIND_SERVER)
    assert attributes_of(in_flight.attributes)["http.response.status_code"] == 200
    assert in_flight.end_time_unix_nano > in_flight.start_time_unix_nano
    assert [s.name for s in receiver.children(in_flight)] == ["tools/call gated_steps"]
    # Metrics went the same way at the stop.
    assert {"mcp.server.operation.duration", "mcp.client.operation.duration", "mcp_heal_proxy.heals"} <= (
        receiver.metric_names
    )


async def test_the_stdio_bridge_exports_its_spans_over_otlp_when_its_client_leaves(
    sse_upstream: UpstreamProcess, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """The bridge as an SDK client launches it (``--set otel=true``, the OTEL_* variables in the environment
    the client gives it): the client's session ends, the bridge exits, and its spans have arrived."""
    receiver = Receiver()
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    environment = {
        **get_default_environment(),
        "OTEL_EXPORTER_OTLP_ENDPOINT": str(server.make_url("")).rstrip("/"),
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "OTEL_METRICS_EXPORTER": "none",
        # The code under test, when it is not the installed one (a checkout on PYTHONPATH).
        **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
    }
    params = StdioServerParameters(
        command=BRIDGE, args=["stdio", "--upstream", sse_upstream.url, "--set", "otel=true"], env=environment
    )
    client_tracer = TracerProvider().get_tracer("the client")
    async with stdio_client(params) as (read_stream, write_stream), ClientSession(read_stream, write_stream) as session:
        async with asyncio.timeout(CALL_TIMEOUT):
            await session.initialize()
        with client_tracer.start_as_current_span("the client's call") as client_span:
            async with asyncio.timeout(CALL_TIMEOUT):
                await session.call_tool("echo", {"text": "hi"})

    async def exported() -> bool:
        return bool(receiver.named("tools/call echo", Span.SPAN_KIND_SERVER))

    # The SDK client waits a moment for the bridge to exit after closing its stdin; the export is its last act.
    await wait_until(exported, 10, "the bridge's spans at the receiver")
    (served,) = receiver.named("tools/call echo", Span.SPAN_KIND_SERVER)
    assert served.parent_span_id == client_span.get_span_context().span_id.to_bytes(8, "big")
    attributes = attributes_of(served.attributes)
    assert attributes["network.transport"] == "pipe"
    assert attributes["mcp.session.id"]
    assert [s.name for s in receiver.children(served)] == ["tools/call echo"]
    assert {dict(resource)["service.name"] for resource, _ in receiver.spans} == {"mcp-heal-proxy"}
