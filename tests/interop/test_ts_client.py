"""TypeScript SDK client (StreamableHTTPClientTransport) -> proxy -> Python SDK server / server-everything.

One client session, an upstream restart between two tool calls: the Python SDK server answering in SSE
and in JSON (404 on the dead session), and server-everything (400). The direct connection (no proxy)
must fail on the second call, or the test proves nothing.
"""

from __future__ import annotations

import pytest

from tests.conftest import UpstreamProcess
from tests.interop.clients import run_ts_client
from tests.interop.conftest import EverythingServer, NodeEnv, ProxyFactory

pytestmark = pytest.mark.interop


async def test_ts_client_survives_upstream_restart_through_proxy(
    node_env: NodeEnv, upstream: UpstreamProcess, proxy_process: ProxyFactory
) -> None:
    proxy = await proxy_process(upstream.url)
    run = await run_ts_client(node_env, proxy.url, upstream.restart)
    assert run.text("first") == "before", run
    assert run.text("second") == "after", (run, proxy.log())
    assert run.steps["first"]["session"] == run.steps["second"]["session"], "the client kept one session id"
    assert run.returncode == 0, run
    stats = await upstream.stats()
    assert stats["initialize"] == 1, "the restarted upstream was re-initialized exactly once"
    # The upstream counts every tools/call POST it receives: the stale one it refused (404) and the replay.
    assert stats["tools_call"] == 2, "one refused call on the dead session, then exactly one replay"


async def test_ts_client_fails_after_upstream_restart_without_proxy(
    node_env: NodeEnv, upstream: UpstreamProcess
) -> None:
    run = await run_ts_client(node_env, upstream.url, upstream.restart)
    assert run.text("first") == "before", run
    assert run.text("second") is None, run
    error = run.error("second")
    assert error is not None, run
    assert "Session not found" in error, run
    assert run.returncode == 1, run


async def test_ts_client_survives_server_everything_restart_through_proxy(
    node_env: NodeEnv, everything: EverythingServer, proxy_process: ProxyFactory
) -> None:
    proxy = await proxy_process(everything.url)
    run = await run_ts_client(node_env, proxy.url, everything.restart, argument="message")
    assert run.text("first") == "Echo: before", run
    assert run.text("second") == "Echo: after", (run, proxy.log())
    assert run.returncode == 0, run
    assert proxy.healed_on("http_400"), proxy.log()


async def test_ts_client_fails_after_server_everything_restart_without_proxy(
    node_env: NodeEnv, everything: EverythingServer
) -> None:
    run = await run_ts_client(node_env, everything.url, everything.restart, argument="message")
    assert run.text("first") == "Echo: before", run
    error = run.error("second")
    assert error is not None, run
    assert "No valid session ID provided" in error, run
    assert run.returncode == 1, run
