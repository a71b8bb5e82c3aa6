"""TypeScript SDK client (StreamableHTTPClientTransport) -> proxy -> Python SDK server.

One client session, an upstream restart between two tool calls, with the server answering in SSE and
in JSON. The direct connection (no proxy) must fail on the second call, or the test proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import UpstreamProcess
from tests.interop.conftest import HERE, NodeEnv, ProxyFactory

pytestmark = pytest.mark.interop

SCRIPT_TIMEOUT = 60.0


@dataclass(frozen=True)
class ClientRun:
    """What the TS client script reported."""

    returncode: int
    steps: dict[str, dict[str, Any]]
    stderr: str

    def text(self, step: str) -> str | None:
        value = self.steps.get(step, {}).get("text")
        return value if isinstance(value, str) else None

    def error(self, step: str) -> str | None:
        value = self.steps.get(step, {}).get("error")
        return value if isinstance(value, str) else None


async def run_ts_client(node_env: NodeEnv, url: str, between_calls: Callable[[], Awaitable[None]]) -> ClientRun:
    """Run tests/interop/ts_client.mjs against ``url``; ``between_calls`` runs between its two calls."""
    process = await asyncio.create_subprocess_exec(
        node_env.node,
        str(HERE / "ts_client.mjs"),
        url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=node_env.env(),
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    steps: dict[str, dict[str, Any]] = {}
    try:
        async with asyncio.timeout(SCRIPT_TIMEOUT):
            while line := await process.stdout.readline():
                record = json.loads(line)
                steps[record["step"]] = record
                if record["step"] == "ready":
                    await between_calls()
                    process.stdin.write(b"go\n")
                    await process.stdin.drain()
            stderr = (await process.stderr.read()).decode(errors="replace")
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return ClientRun(returncode, steps, stderr)


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
