"""OpenTelemetry with the MCP semantic conventions (mcp_heal_proxy/otel.py): the official SDK client through
the proxy (both fronts) to the official SDK server, a heal on the way, spans caught by the SDK's in-memory
exporter; and off means off (nothing of OpenTelemetry imported)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import anyio
import mcp_types
import pytest
from aiohttp import web
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.shared.message import SessionMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mcp_heal_proxy.config import ConfigError, bridge_server_options, build_config, single_upstream
from mcp_heal_proxy.front.stdio import Bridge, open_engine
from mcp_heal_proxy.otel import Telemetry, traced_session_id, with_meta
from tests.conftest import (
    REPO_ROOT,
    TEST_CLIENT,
    ProxyFactory,
    UpstreamProcess,
    echo_call,
    mcp_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream

CALL_TIMEOUT = 20.0
BRIDGE_COMMAND = (sys.executable, "-m", "mcp_heal_proxy", "stdio", "--upstream", "http://127.0.0.1:9/mcp")


class Caught:
    """The proxy's OpenTelemetry hooks over the SDK's in-memory span exporter and metric reader."""

    def __init__(self, *, transport: str = "tcp", propagate_proxy: bool = False) -> None:
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.telemetry = Telemetry(
            tracer_provider,
            MeterProvider(metric_readers=[self.metrics]),
            transport=transport,
            propagate_proxy=propagate_proxy,
        )

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.spans.get_finished_spans()

    def metric_points(self) -> dict[str, list[Any]]:
        data = self.metrics.get_metrics_data()
        points: dict[str, list[Any]] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    """The spans whose parent is ``parent``, in the order they started."""
    found = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
    return sorted(found, key=lambda s: s.start_time or 0)


def one(spans: Sequence[ReadableSpan], **where: Any) -> ReadableSpan:
    """The one span with these properties (name, kind)."""
    found = [s for s in spans if all(getattr(s, key) == value for key, value in where.items())]
    assert len(found) == 1, f"{where}: {[(s.name, s.kind) for s in found]} among {[s.name for s in spans]}"
    return found[0]


async def echo(session: ClientSession, text: str) -> None:
    async with asyncio.timeout(CALL_TIMEOUT):
        result = await session.call_tool("echo", {"text": text})
    assert not result.is_error, result


async def healed_call_under_a_client_span(session: ClientSession, upstream: UpstreamProcess) -> tuple[int, int]:
    """Subscribe to a resource (state a heal re-applies), have the upstream forget the session, call the tool
    under a span of the client's own: the client's trace id and span id (what the SDK client put in
    params._meta).

    Forgotten, not restarted: a restart also breaks the session's server stream, whose reattach may heal
    first (reason get_stream_lost), and the call then finds the new session. Forgotten, the call alone
    meets the 404, and the stream on the forgotten session stays open until the heal ends it."""
    # The SDK warns that 2026-07-28 removes subscriptions: the sessions here are 2025-11-25 ones.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        async with asyncio.timeout(CALL_TIMEOUT):
            await session.subscribe_resource("test://otel/watched")
    await echo(session, "before")
    assert len(await upstream.forget_sessions()) == 1
    client_tracer = TracerProvider().get_tracer("the client")
    with client_tracer.start_as_current_span("the client's call") as client_span:
        await echo(session, "after")
    context = client_span.get_span_context()
    return context.trace_id, context.span_id


def check_healed_trace(spans: Sequence[ReadableSpan], trace_id: int, client_span_id: int, transport: str) -> None:
    """The structure of a healed tools/call: the SERVER span under the client's span; under it the CLIENT
    span the upstream answered 404 and the heal; under the heal its steps and the replay."""
    server = one(spans, name="tools/call echo", kind=SpanKind.SERVER, parent=_parent_of(spans, client_span_id))
    assert server.context.trace_id == trace_id
    attributes = dict(server.attributes or {})
    assert attributes["mcp.method.name"] == "tools/call"
    assert attributes["gen_ai.tool.name"] == "echo"
    assert attributes["gen_ai.operation.name"] == "execute_tool"
    assert attributes["network.transport"] == transport
    assert attributes["mcp.protocol.version"]
    # The sealed id's nonce (32 hex digits), never the whole id: that works as a credential for the session.
    assert re.fullmatch("[0-9a-f]{32}", str(attributes["mcp.session.id"]))
    assert "jsonrpc.request.id" in attributes
    assert server.status.status_code is StatusCode.UNSET
    # No tool arguments or results, anywhere.
    for span in spans:
        assert "before" not in json.dumps(dict(span.attributes or {}))
        assert "after" not in json.dumps(dict(span.attributes or {}))
        assert "gen_ai.tool.call.arguments" not in (span.attributes or {})
    under_server = children(spans, server)
    assert [(s.name, s.kind) for s in under_server] == [
        ("tools/call echo", SpanKind.CLIENT),
        ("heal", SpanKind.INTERNAL),
    ]
    expired, heal = under_server
    assert expired.attributes is not None
    assert expired.attributes["error.type"] == "404"
    assert expired.attributes["server.address"] == "127.0.0.1"
    assert isinstance(expired.attributes["server.port"], int)
    assert heal.attributes is not None
    assert heal.attributes["mcp_heal_proxy.heal.reason"] == "http_404"
    assert heal.attributes["mcp_heal_proxy.heal.outcome"] == "healed"
    assert heal.attributes["mcp_heal_proxy.heal.generation"] == 0
    assert heal.attributes["mcp_heal_proxy.heal.new_generation"] == 1
    steps = children(spans, heal)
    assert [s.name for s in steps] == [
        "initialize",
        "notifications/initialized",
        "resources/subscribe",
        "tools/call echo",
    ]
    assert all(s.kind is SpanKind.CLIENT for s in steps)
    replay = steps[-1]
    assert replay.attributes is not None
    assert replay.attributes["mcp_heal_proxy.replay"] is True
    assert replay.attributes["gen_ai.tool.name"] == "echo"
    # Every span of the call is in the client's trace.
    for span in (expired, heal, *steps):
        assert span.context.trace_id == trace_id


def _parent_of(spans: Sequence[ReadableSpan], span_id: int) -> Any:
    """The parent (a SpanContext) a span under ``span_id`` has (matched by id, as it came over the wire)."""
    for span in spans:
        if span.parent is not None and span.parent.span_id == span_id:
            return span.parent
    raise AssertionError(f"no span has the client's span {span_id:x} as its parent: {[s.name for s in spans]}")


def check_metrics(caught: Caught) -> None:
    points = caught.metric_points()
    server_methods = {p.attributes["mcp.method.name"] for p in points["mcp.server.operation.duration"]}
    assert {"initialize", "tools/call", "resources/subscribe"} <= server_methods
    client = points["mcp.client.operation.duration"]
    assert any(p.attributes.get("error.type") == "404" for p in client)
    assert all(p.attributes["server.address"] == "127.0.0.1" for p in client)
    heals = points["mcp_heal_proxy.heals"]
    assert [
        (p.attributes["mcp_heal_proxy.heal.reason"], p.attributes["mcp_heal_proxy.heal.outcome"], p.value)
        for p in heals
    ] == [("http_404", "healed", 1)]
    assert points["mcp_heal_proxy.heal.duration"][0].count == 1
    # Metrics never carry per-session or per-request values.
    for name in ("mcp.server.operation.duration", "mcp.client.operation.duration"):
        for point in points[name]:
            assert "mcp.session.id" not in point.attributes
            assert "jsonrpc.request.id" not in point.attributes


async def test_a_healed_call_through_the_http_front_is_one_trace_under_the_clients_span(
    upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    caught = Caught()
    proxy = await start_proxy(upstream.url, otel=caught.telemetry)
    async with mcp_session(proxy.url) as session:
        trace_id, span_id = await healed_call_under_a_client_span(session, upstream)

        def reattached() -> bool:
            return any(s.name == "GET stream reattach" for s in caught.finished())

        # The heal ended the server stream left on the forgotten session; the proxy reattaches it on the new
        # one (after a short backoff).
        await wait_until(reattached, 10, "the server stream reattached")
    spans = caught.finished()
    check_healed_trace(spans, trace_id, span_id, "tcp")
    server = one(spans, name="tools/call echo", kind=SpanKind.SERVER, parent=_parent_of(spans, span_id))
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["network.protocol.name"] == "http"
    # The session's server stream: a span per attach (not per event), none per keep-alive.
    attaches = [s for s in spans if s.name.startswith("GET stream")]
    assert attaches
    assert all(s.kind is SpanKind.CLIENT for s in attaches)
    # The heal ended the stream: reattached, under the stream's attach.
    reattaches = [s for s in attaches if s.name == "GET stream reattach"]
    attach_ids = {s.context.span_id for s in attaches if s.name == "GET stream attach"}
    assert all(s.parent is not None and s.parent.span_id in attach_ids for s in reattaches)
    check_metrics(caught)
    # The client's DELETE ended the session: its duration.
    await asyncio.sleep(0)
    assert caught.metric_points()["mcp.server.session.duration"]


@contextlib.asynccontextmanager
async def bridged_in_process(url: str, telemetry: Telemetry) -> AsyncIterator[ClientSession]:
    """The SDK client on the stdio bridge, both in this process: the client's messages go to the bridge as
    the lines it would read on stdin, the bridge's lines come back as the client's messages."""
    engine, resources = await open_engine(single_upstream(url, client=TEST_CLIENT).upstreams[0], otel=telemetry)
    lines: asyncio.Queue[bytes] = asyncio.Queue()
    to_client, from_bridge = anyio.create_memory_object_stream[SessionMessage | Exception](100)
    to_bridge, from_client = anyio.create_memory_object_stream[SessionMessage](100)

    async def stdin(_: int) -> bytes:
        return await lines.get()

    async def stdout(line: bytes) -> None:
        for piece in line.splitlines():
            await to_client.send(SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(piece, by_name=False)))

    async def pump() -> None:
        async for message in from_client:
            lines.put_nowait(message.message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n")
        lines.put_nowait(b"")  # the client closed its end: stdin's end

    bridge = Bridge(engine, stdout, max_line_bytes=4 * 1024 * 1024)
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(bridge.run(stdin, stop))
            pumping = tasks.create_task(pump())
            try:
                async with ClientSession(from_bridge, to_bridge) as session:
                    async with asyncio.timeout(CALL_TIMEOUT):
                        await session.initialize()
                    yield session
            finally:
                await to_bridge.aclose()
                async with asyncio.timeout(CALL_TIMEOUT):
                    await pumping
                    await running
    finally:
        for stream in (to_client, from_bridge, to_bridge, from_client):
            await stream.aclose()
        await resources.aclose()


async def test_a_healed_call_through_the_stdio_bridge_is_one_trace_under_the_clients_span(
    upstream: UpstreamProcess,
) -> None:
    caught = Caught(transport="pipe")
    async with bridged_in_process(upstream.url, caught.telemetry) as session:
        trace_id, span_id = await healed_call_under_a_client_span(session, upstream)
    spans = caught.finished()
    check_healed_trace(spans, trace_id, span_id, "pipe")
    server = one(spans, name="tools/call echo", kind=SpanKind.SERVER, parent=_parent_of(spans, span_id))
    assert server.attributes is not None
    assert "network.protocol.name" not in server.attributes
    check_metrics(caught)
    # The bridge ended the session when its client left.
    assert caught.metric_points()["mcp.server.session.duration"]


async def test_the_upstream_gets_the_clients_bytes_unless_the_proxy_is_to_propagate_its_own(
    upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    """By default the body goes upstream byte for byte (the client's traceparent in it); with
    otel_propagate = "proxy" the proxy's CLIENT span context replaces it in params._meta."""
    body = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},"_meta":{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","progressToken":3}}}'
    rewritten = json.loads(with_meta(body, {"traceparent": "00-11111111111111111111111111111111-2222222222222222-01"}))
    assert rewritten["params"]["_meta"] == {
        "progressToken": 3,
        "traceparent": "00-11111111111111111111111111111111-2222222222222222-01",
    }
    assert rewritten["params"]["arguments"] == {"text": "x"}
    notification = json.loads(
        with_meta(b'{"jsonrpc":"2.0","method":"notifications/initialized"}', {"traceparent": "t"})
    )
    assert notification["params"] == {"_meta": {"traceparent": "t"}}

    for propagate_proxy in (False, True):
        caught = Caught(propagate_proxy=propagate_proxy)
        proxy = await start_proxy(upstream.url, otel=caught.telemetry)
        async with mcp_session(proxy.url) as session:
            client_tracer = TracerProvider().get_tracer("the client")
            with client_tracer.start_as_current_span("the client's call"):
                await echo(session, "hi")
        spans = caught.finished()
        exchange = one(spans, name="tools/call echo", kind=SpanKind.CLIENT)
        server = one(spans, name="tools/call echo", kind=SpanKind.SERVER)
        assert exchange.parent is not None
        assert exchange.parent.span_id == server.context.span_id
        # The upstream fixture records the traceparent each tools/call came with.
        seen = (await upstream.stats())["traceparents"]
        assert server.parent is not None
        expected_span = exchange.context.span_id if propagate_proxy else server.parent.span_id
        assert seen[-1].split("-")[2] == f"{expected_span:016x}"


def test_otel_switched_on_without_the_extra_is_one_line_and_exit_2(tmp_path: Any) -> None:
    """A package named opentelemetry that cannot be imported stands in for the extra not installed."""
    shadow = tmp_path / "opentelemetry"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = subprocess.run(
        [sys.executable, "-m", "mcp_heal_proxy", "serve", "--upstream", "http://127.0.0.1:9/mcp", "--set", "otel=true"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": f"{tmp_path}:{REPO_ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "mcp-heal-proxy: error: --set otel needs the OpenTelemetry packages: pip install 'mcp-heal-proxy[otel]'"
    ]


def test_the_switch_is_a_server_key_an_environment_variable_and_a_setting() -> None:
    flags = {"upstream": "http://127.0.0.1:9/mcp", "state": ":memory:"}
    assert build_config(config_file=None, flags=flags, environ={}).otel is False
    assert build_config(config_file=None, flags=flags, environ={"MCP_HEAL_PROXY_OTEL": "true"}).otel is True
    config = build_config(config_file=None, flags=flags, environ={}, settings=["otel=1", "otel_propagate=proxy"])
    assert (config.otel, config.otel_propagate) == (True, "proxy")
    with pytest.raises(ConfigError, match="MCP_HEAL_PROXY_OTEL must be true or false, not 'maybe'"):
        build_config(config_file=None, flags=flags, environ={"MCP_HEAL_PROXY_OTEL": "maybe"})


OFF_MEANS_OFF = textwrap.dedent(
    """
    import asyncio, json, sys
    import aiohttp
    from aiohttp import web
    from mcp_heal_proxy.config import single_upstream
    from mcp_heal_proxy.front.app import build_app
    from mcp_heal_proxy.observability import configure_logging

    HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}

    async def main(upstream_url: str) -> None:
        configure_logging("json", "error")  # stdout carries this script's two lines only
        app = build_app(single_upstream(upstream_url, state=":memory:"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/mcp"
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=init, headers=HEADERS) as r:
                sid = r.headers["Mcp-Session-Id"]
                await r.read()
            headers = {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
            async with http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers) as r:
                await r.read()
            print("ready", flush=True)
            sys.stdin.readline()  # the test restarts the upstream: the next call heals
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
            async with http.post(url, json=call, headers=headers) as r:
                text = await r.text()
            async with http.delete(url, headers=headers) as r:
                await r.read()
        await runner.cleanup()
        healed = "x" in text
        print(json.dumps({"healed": healed, "otel_imported": any(m.split(".")[0] == "opentelemetry" for m in sys.modules)}), flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_off_means_off_nothing_of_opentelemetry_is_imported(upstream: UpstreamProcess) -> None:
    """A full request and a heal with otel off, in a process of its own (the SDK client in this one imports
    opentelemetry itself), leave no opentelemetry module loaded."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OFF_MEANS_OFF, upstream.url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert (await process.stdout.readline()).strip() == b"ready"
            await upstream.restart()
            process.stdin.write(b"go\n")
            await process.stdin.drain()
            result = json.loads(await process.stdout.readline())
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert result == {"healed": True, "otel_imported": False}
    assert (await upstream.stats())["initialize"] == 1, "the call healed"


def test_the_console_exporter_never_writes_to_the_bridges_stdout(tmp_path: Any) -> None:
    """OTEL_TRACES_EXPORTER=console writes spans to stderr: stdout is the stdio bridge's protocol channel."""
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    result = subprocess.run(
        [*BRIDGE_COMMAND, "--set", "otel=true", "--set", "connect_retry=0"],
        input=json.dumps(initialize) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MCP_HEAL_PROXY_"))},
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_METRICS_EXPORTER": "none",
            "HOME": str(tmp_path),
        },
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1], "stdout: one JSON-RPC answer, nothing else"
    assert '"name": "initialize"' in result.stderr, "the span went to stderr"


async def test_an_error_the_proxy_answers_is_on_the_span_and_the_header_context_is_linked(
    upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A request on a session the proxy does not know: status ERROR, error.type and rpc.response.status_code
    the JSON-RPC code it answered. Its parent is the params._meta context; the HTTP header's is a link."""
    caught = Caught()
    proxy = await start_proxy(upstream.url, otel=caught.telemetry)
    meta_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    header_parent = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    call = echo_call(3)
    call["params"]["_meta"] = {"traceparent": meta_parent}
    headers = {**session_headers("no-such-session"), "traceparent": header_parent}
    async with http.post(proxy.url, data=json.dumps(call), headers=headers) as response:
        answer = await response.json()
    assert response.status == 404
    (span,) = caught.finished()
    assert (span.name, span.kind) == ("tools/call echo", SpanKind.SERVER)
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    assert [link.context.span_id for link in span.links] == [0x00F067AA0BA902B7]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == answer["error"]["message"]
    assert span.attributes is not None
    assert span.attributes["error.type"] == str(answer["error"]["code"])
    assert span.attributes["rpc.response.status_code"] == str(answer["error"]["code"])
    assert span.attributes["http.response.status_code"] == 404


async def test_a_failed_heal_is_an_error_span_with_its_outcome_and_the_request_fails_with_it(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The upstream forgot the session and refuses the re-initialize (fault injection): the heal span says
    failed, with the error, and the request's SERVER span carries the JSON-RPC error the client got."""
    upstream, url = fake
    caught = Caught()
    proxy = await start_proxy(url, otel=caught.telemetry, connect_retry=0)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    upstream.on_reinitialize = answer_500
    async with http.post(proxy.url, data=json.dumps(echo_call(5)), headers=session_headers(session_id)) as response:
        answer = await response.json()
    assert "error" in answer
    spans = caught.finished()
    server = one(spans, name="tools/call echo", kind=SpanKind.SERVER)
    heal = one(spans, name="heal", kind=SpanKind.INTERNAL)
    # The session's nonce names it on every span; the whole id, a credential for the session, on none.
    nonce = session_id.partition(".")[0]
    assert len(nonce) == 32
    assert server.attributes is not None
    assert server.attributes["mcp.session.id"] == nonce
    assert heal.attributes is not None
    assert heal.attributes["mcp.session.id"] == nonce
    assert all(session_id not in json.dumps(dict(span.attributes or {})) for span in spans)
    assert heal.parent is not None
    assert heal.parent.span_id == server.context.span_id
    assert heal.attributes is not None
    assert heal.attributes["mcp_heal_proxy.heal.outcome"] == "failed"
    assert heal.attributes["error.type"] == str(answer["error"]["code"])
    assert heal.status.status_code is StatusCode.ERROR
    (reinitialize,) = children(spans, heal)
    assert reinitialize.name == "initialize"
    assert reinitialize.attributes is not None
    assert reinitialize.attributes["error.type"] == "500"
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["rpc.response.status_code"] == str(answer["error"]["code"])
    points = caught.metric_points()["mcp_heal_proxy.heals"]
    assert [(p.attributes["mcp_heal_proxy.heal.outcome"], p.value) for p in points] == [("failed", 1)]


async def answer_500(request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
    return web.json_response({"error": "down for maintenance"}, status=500)


def test_the_bridge_takes_the_switch_from_its_config_file_the_environment_and_set(tmp_path: Any) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\notel = true\n[upstreams.one]\nurl = "http://127.0.0.1:9/mcp"\n')
    assert bridge_server_options(["read_timeout=5"], {}, str(config)) == (["read_timeout=5"], {"otel": True})
    environ = {"MCP_HEAL_PROXY_OTEL_PROPAGATE": "proxy"}
    rest, options = bridge_server_options(["otel=false", "client=lean"], environ, None)
    assert (rest, options) == (["client=lean"], {"otel": False, "otel_propagate": "proxy"})
    with pytest.raises(ConfigError, match="--set otel_propagate must be one of"):
        bridge_server_options(["otel_propagate=server"], {}, None)


def test_a_random_session_id_is_traced_as_a_digest_of_itself() -> None:
    """A session whose initialize params were too large to seal has a random id, itself the credential: its
    spans carry a digest, stable per session, never the id."""
    random_id = "0123456789abcdef0123456789abcdef"
    traced = traced_session_id(random_id)
    assert traced.startswith("sha256:")
    assert random_id not in traced
    assert traced == traced_session_id(random_id) != traced_session_id(random_id[::-1])
    assert traced_session_id("f" * 32 + ".payload.tag") == "f" * 32
