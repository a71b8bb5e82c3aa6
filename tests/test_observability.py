"""Logs and metrics: one event per request and per heal, Prometheus counters, secrets never shown."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
import structlog

from mcp_heal_proxy.observability import IsoTimeStamper, JSONLineRenderer, LineWriter, Redactor, configure_logging
from tests.conftest import (
    MCP_HEADERS,
    ProxyFactory,
    UpstreamProcess,
    mcp_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream, hang_forever

AiohttpServer = Callable[..., Any]
INJECTED_TOKEN = "upstream-secret-token-4711"
CLIENT_TOKEN = "client-bearer-token-0815"


@pytest.fixture
def captured_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Route the proxy's JSON logs into a buffer (restoring the test default afterwards): the pipeline
    the CLI sets up, its line writer included, with the buffer as stderr."""
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    configure_logging("json", "debug", secrets=[INJECTED_TOKEN], cache=False)
    yield buffer
    structlog.reset_defaults()


def events(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


async def test_requests_and_heals_are_logged_and_counted(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    captured_logs: io.StringIO,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
    async with http.post(proxy.url, json=body, headers=session_headers(session_id)) as response:
        assert response.status == 200
    logged = events(captured_logs)
    call = [e for e in logged if e["event"] == "request" and e["method"] == "tools/call"]
    assert len(call) == 1
    assert call[0]["healed"] is True
    assert call[0]["status"] == 200
    assert call[0]["client_session"] == session_id[:8]
    heal = [e for e in logged if e["event"] in ("session.healed", "session.heal_failed")]
    assert [(h["outcome"], h["old_generation"], h["new_generation"]) for h in heal] == [("healed", 0, 1)]

    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        assert response.status == 200
        text = await response.text()
    assert 'mcp_heal_proxy_requests_total{method="tools/call",status="200",upstream="default"} 1.0' in text
    assert 'mcp_heal_proxy_heals_total{outcome="healed",reason="http_404",upstream="default"} 1.0' in text
    assert 'mcp_heal_proxy_heal_duration_seconds_count{upstream="default"} 1.0' in text
    assert "mcp_heal_proxy_open_sessions 1.0" in text
    assert "mcp_heal_proxy_upstream_latency_seconds_bucket" in text


async def test_unknown_methods_share_one_metrics_label(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    for index in range(3):
        body = {"jsonrpc": "2.0", "id": index, "method": f"made/up/{index}"}
        async with http.post(proxy.url, json=body, headers=session_headers(session_id)) as response:
            assert response.status == 200
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        text = await response.text()
    assert 'method="other",status="200",upstream="default"} 3.0' in text
    assert "made/up" not in text


async def test_secrets_never_reach_logs_metrics_or_error_bodies(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    captured_logs: io.StringIO,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, headers={"Authorization": f"Bearer {INJECTED_TOKEN}"})
    session_id = await raw_initialize(http, proxy.url)
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {INJECTED_TOKEN}"
    upstream.forget_all()
    upstream.on_reinitialize = None
    headers = {**session_headers(session_id), "Authorization": f"Bearer {CLIENT_TOKEN}"}
    bodies = []
    for body in ({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, {"broken": True}):
        async with http.post(proxy.url, json=body, headers=headers) as response:
            bodies.append(await response.text())
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        metrics = await response.text()
    structlog.get_logger("test").warning("leak.attempt", detail=f"token is {INJECTED_TOKEN}", authorization="x")
    await asyncio.sleep(0)  # lines logged on the loop are written in its next turn
    output = captured_logs.getvalue() + metrics + "".join(bodies)
    assert INJECTED_TOKEN not in output
    assert CLIENT_TOKEN not in output
    assert "[redacted]" in captured_logs.getvalue()


def test_the_redactor_cleans_nested_values_and_sensitive_keys() -> None:
    redact = Redactor(["sekrit-value"])
    event = {"event": "x", "headers": {"Authorization": "Bearer a", "X": "has sekrit-value inside"}, "token": "t"}
    assert redact(None, "info", event) == {
        "event": "x",
        "headers": {"Authorization": "[redacted]", "X": "has [redacted] inside"},
        "token": "[redacted]",
    }


def test_the_redactor_redacts_sensitive_keys_of_any_value_and_secrets_in_any_string() -> None:
    redact = Redactor(["sekrit-value"])
    event = {
        "token": 4711,
        "Password": None,
        "api_key": True,
        "Authorization": 2.5,
        "status": 200,
        "healed": False,
        "client_session": None,
        "upstream": "sekrit-value",
        "detail": "a sekrit-value, twice: sekrit-value",
        "ids": (1, "sekrit-value"),
    }
    assert redact(None, "info", event) == {
        "token": "[redacted]",
        "Password": "[redacted]",
        "api_key": "[redacted]",
        "Authorization": "[redacted]",
        "status": 200,
        "healed": False,
        "client_session": None,
        "upstream": "[redacted]",
        "detail": "a [redacted], twice: [redacted]",
        "ids": [1, "[redacted]"],
    }


@pytest.mark.parametrize(
    "nanos",
    [
        1_764_475_200_000_000_000,  # a whole second: isoformat writes no fraction
        1_764_475_200_000_001_999,  # one microsecond (the nanoseconds are cut, as datetime.now() does)
        1_764_475_259_999_999_000,  # the last microsecond of a minute
        1_764_475_260_123_456_789,  # the next second: the cached date and time are renewed
    ],
)
def test_the_timestamp_is_what_structlogs_iso_utc_stamper_writes(monkeypatch: pytest.MonkeyPatch, nanos: int) -> None:
    stamper = IsoTimeStamper()
    stamper.now()  # a second cached from the real clock first
    monkeypatch.setattr("mcp_heal_proxy.observability.time.time_ns", lambda: nanos)
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(microseconds=nanos // 1000)
    assert stamper.now() == moment.isoformat().replace("+00:00", "Z")


def test_the_json_line_is_what_structlogs_json_renderer_writes() -> None:
    class Custom:
        def __repr__(self) -> str:
            return "<custom>"

    event = {
        "upstream": "default",
        "client_session": None,
        "method": "tools/call",
        "status": 200,
        "healed": False,
        "duration_ms": 0.123,
        "nested": {"a": [1, 2.5, "ü"]},
        "odd": Custom(),
        "event": "request",
        "level": "info",
    }
    expected = structlog.processors.JSONRenderer()(None, "info", dict(event))
    assert JSONLineRenderer()(None, "info", dict(event)) == expected


class CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_log_lines_of_one_loop_turn_are_written_together_in_order() -> None:
    file = CountingFile()
    writer = LineWriter(file)
    for index in range(5):
        writer.info(f"line {index}")
    assert file.getvalue() == ""  # queued until the loop's next turn
    await asyncio.sleep(0)
    assert file.getvalue() == "".join(f"line {index}\n" for index in range(5))
    assert file.writes == 1
    writer.info("later")
    await asyncio.sleep(0)
    assert file.getvalue().endswith("line 4\nlater\n")
    assert file.writes == 2


def test_a_loop_that_ends_before_writing_its_lines_holds_no_later_line_back() -> None:
    file = CountingFile()
    writer = LineWriter(file)

    async def log_and_end() -> None:
        # Logged by a callback of the loop's last turn: the flush it schedules never runs on this loop.
        asyncio.get_running_loop().call_soon(writer.info, "logged as the loop ends")

    loop = asyncio.new_event_loop()
    loop.run_until_complete(log_and_end())
    loop.close()
    assert file.getvalue() == ""

    async def log_on_the_next_loop() -> None:
        writer.info("next")
        await asyncio.sleep(0)

    asyncio.run(log_on_the_next_loop())
    assert file.getvalue() == "logged as the loop ends\nnext\n"


def test_log_lines_off_the_event_loop_are_written_at_once() -> None:
    file = CountingFile()
    writer = LineWriter(file)
    writer.warning("one")
    writer.error("two")
    assert file.getvalue() == "one\ntwo\n"
    writer.flush()  # nothing left to write
    assert file.writes == 2


async def test_configured_logging_writes_json_lines_with_level_and_timestamp(
    captured_logs: io.StringIO,
) -> None:
    log = structlog.get_logger("test")
    log.info("request", upstream="default", status=200, token="abc")
    log.debug("other", detail=f"sent {INJECTED_TOKEN}")
    await asyncio.sleep(0)
    first, second = events(captured_logs)
    assert list(first) == ["upstream", "status", "token", "event", "level", "timestamp"]
    assert (first["event"], first["level"], first["status"], first["token"]) == ("request", "info", 200, "[redacted]")
    assert datetime.datetime.fromisoformat(first["timestamp"]).tzinfo == datetime.UTC
    assert (second["event"], second["level"], second["detail"]) == ("other", "debug", "sent [redacted]")


def counted(metrics: str, method: str, status: str) -> float:
    """The request counter for one method and status in a /metrics page (0 when absent)."""
    prefix = f'mcp_heal_proxy_requests_total{{method="{method}",status="{status}",upstream="default"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


async def test_sdk_clients_that_hang_up_at_once_are_each_logged_and_counted_once(
    upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession, captured_logs: io.StringIO
) -> None:
    proxy = await start_proxy(upstream.url)
    for index in range(10):
        async with mcp_session(proxy.url) as client:
            await client.call_tool("echo", {"text": f"n{index}"})
    metrics_url = proxy.url.replace("/mcp", "/metrics")

    async def all_counted() -> bool:
        async with http.get(metrics_url) as response:
            text = await response.text()
        return counted(text, "DELETE", "200") == 10

    await wait_until(all_counted, 10, "every session's DELETE counted")
    async with http.get(metrics_url) as response:
        text = await response.text()
    assert counted(text, "initialize", "200") == 10
    assert counted(text, "tools/call", "200") == 10
    requests = [e for e in events(captured_logs) if e["event"] == "request"]
    assert sum(1 for e in requests if e["method"] == "initialize") == 10
    assert all(e["status"] == 200 for e in requests if e["method"] in ("initialize", "tools/call"))
    # The negotiated version is stored with the record, before the client could hang up.
    assert not [e for e in events(captured_logs) if e["event"] == "session.protocol_version_changed"]


async def test_a_client_that_leaves_before_its_answer_is_logged_as_499(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, captured_logs: io.StringIO
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    upstream.on_request = hang_forever
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "echo"}}
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await http.post(proxy.url, json=body, headers=session_headers(session_id))

    def left() -> bool:
        calls = [e for e in events(captured_logs) if e["event"] == "request" and e["method"] == "tools/call"]
        return [(e["status"], e["client_left"]) for e in calls] == [(499, True)]

    await wait_until(left, 5, "the hang-up logged as 499")


async def test_debug_logs_show_the_heals_upstream_exchange_without_secrets(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, captured_logs: io.StringIO
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, headers={"Authorization": f"Bearer {INJECTED_TOKEN}"})
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
    async with http.post(proxy.url, json=body, headers=session_headers(session_id)) as response:
        assert response.status == 200
    steps = {e["event"]: e for e in events(captured_logs) if e["event"].startswith("heal.")}
    assert steps["heal.start"]["generation"] == 0
    assert steps["heal.start"]["reason"] == "http_404"
    assert steps["heal.initialize"]["status"] == 200
    assert steps["heal.initialized"]["status"] == 202
    assert steps["heal.initialized"]["negotiated_version"] == "2025-11-25"
    assert all("duration_ms" in steps[name] for name in ("heal.initialize", "heal.initialized"))
    assert INJECTED_TOKEN not in captured_logs.getvalue()


async def test_requests_the_guards_refuse_are_logged_and_counted(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, captured_logs: io.StringIO
) -> None:
    _, url = fake
    proxy = await start_proxy(url, token=CLIENT_TOKEN)
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 401
    foreign = {**MCP_HEADERS, "Origin": "https://evil.example", "Authorization": f"Bearer {CLIENT_TOKEN}"}
    async with http.post(proxy.url, json=body, headers=foreign) as response:
        assert response.status == 403
    good = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    async with http.get(proxy.url.replace("/mcp", "/metrics"), headers=good) as response:
        text = await response.text()
    assert counted(text, "other", "401") == 1
    assert counted(text, "other", "403") == 1
    refusals = [e for e in events(captured_logs) if e["event"] == "request" and e.get("refused")]
    assert sorted(e["status"] for e in refusals) == [401, 403]
    assert CLIENT_TOKEN not in captured_logs.getvalue()
