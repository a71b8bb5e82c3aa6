"""TypeScript SDK client with an OAuth authProvider -> proxy (``serve``, its own process) -> the SDK
server behind its own authorization server (tests/oauth_server.py), lenient and strict audience.

The client logs in headlessly, calls a tool, the upstream restarts (sessions die, tokens survive) and
the short-lived access token expires; the next call on the same session needs a token refresh and a
heal. Counterparts: the same client through a proxy without pass-through fails to log in, and a strict
upstream refuses the tokens when the proxy only rewrites metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProxyFactory as InProcessProxyFactory
from tests.conftest import wait_until
from tests.interop.conftest import HERE, NodeEnv, ProxyFactory
from tests.oauth_clients import OAuthUpstream
from tests.oauth_server import EXPIRY_LEEWAY

pytestmark = pytest.mark.interop

TOKEN_LIFETIME = 2.0
CLIENT_TIMEOUT = 60.0


@dataclass(frozen=True)
class OAuthRun:
    returncode: int
    steps: dict[str, dict[str, Any]]
    stderr: str


async def run_ts_oauth_client(
    node_env: NodeEnv,
    url: str,
    between_calls: Callable[[], Awaitable[None]],
    authorize: Callable[[str], Awaitable[str]] | None = None,
) -> OAuthRun:
    """Run tests/interop/ts_oauth_client.mjs against ``url``. ``authorize``: a browser that signs in
    at the authorization URL and returns the address it ended on (else the script follows redirects)."""
    env = node_env.env()
    if authorize is not None:
        env["TS_OAUTH_BROWSER"] = "stdin"
    process = await asyncio.create_subprocess_exec(
        node_env.node,
        str(HERE / "ts_oauth_client.mjs"),
        url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    steps: dict[str, dict[str, Any]] = {}
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT):
            while line := await process.stdout.readline():
                record = json.loads(line)
                steps[record["step"]] = record
                if record["step"] == "authorize" and authorize is not None:
                    process.stdin.write((await authorize(record["url"])).encode() + b"\n")
                    await process.stdin.drain()
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
    return OAuthRun(returncode, steps, stderr)


@pytest.fixture
async def oauth_upstream(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[OAuthUpstream]]]:
    started: list[OAuthUpstream] = []

    async def start(*options: str) -> OAuthUpstream:
        server = OAuthUpstream(tmp_path, *options)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def restart_and_expire(upstream: OAuthUpstream) -> Callable[[], Awaitable[None]]:
    """Between the calls: the upstream restarts, then the access token runs out."""

    async def between() -> None:
        expires = time.time() + TOKEN_LIFETIME + EXPIRY_LEEWAY + 1.5  # the server rounds expiry up to a second
        await upstream.restart()
        await wait_until(lambda: time.time() > expires, TOKEN_LIFETIME + 8, "access token expired")

    return between


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
async def test_ts_client_logs_in_through_proxy_and_keeps_its_session_across_restart_and_refresh(
    node_env: NodeEnv,
    oauth_upstream: Callable[..., Awaitable[OAuthUpstream]],
    proxy_process: ProxyFactory,
    strict: bool,
) -> None:
    options = ["--token-lifetime", str(TOKEN_LIFETIME)] + (["--strict-audience"] if strict else [])
    upstream = await oauth_upstream(*options)
    proxy = await proxy_process(upstream.url)
    run = await run_ts_oauth_client(node_env, proxy.url, restart_and_expire(upstream))
    assert run.steps.get("first", {}).get("text"), (run, proxy.log())
    assert run.steps.get("second", {}).get("text") == "after", (run, proxy.log())
    assert run.steps["first"]["session"] == run.steps["second"]["session"], "the client kept one session id"
    assert run.steps["auth"]["logins"] == 1, run
    assert run.steps["auth"]["tokens_saved"] >= 2, "a refresh happened during the run"
    assert run.returncode == 0, run
    stats = await upstream.stats()
    assert stats["refreshes"] >= 1
    assert stats["initialize"] == 1, "one re-initialize on the restarted upstream, with the client's token"
    assert stats["initialize_tokens"][0] is not None
    assert set(stats["token_resources"]) == {upstream.url}
    # Every token the upstream issued (its state file keeps them) stayed out of the proxy's log.
    issued = json.loads(await asyncio.to_thread(upstream.state_file.read_text))
    tokens = [*issued["access"], *issued["refresh"]]
    assert len(tokens) >= 2
    log = proxy.log()
    assert "session.healed" in log
    for token in tokens:
        assert token not in log


async def test_ts_client_cannot_log_in_through_a_proxy_without_pass_through(
    node_env: NodeEnv, oauth_upstream: Callable[..., Awaitable[OAuthUpstream]], start_proxy: InProcessProxyFactory
) -> None:
    upstream = await oauth_upstream()
    proxy = await start_proxy(upstream.url, oauth_pass_through="off")

    async def nothing() -> None:
        return None

    run = await run_ts_oauth_client(node_env, proxy.url, nothing)
    assert "first" not in run.steps, run
    assert run.returncode == 1, run
    assert "setup" in run.steps, run


async def test_ts_client_tokens_are_refused_by_a_strict_upstream_when_only_metadata_is_rewritten(
    node_env: NodeEnv, oauth_upstream: Callable[..., Awaitable[OAuthUpstream]], start_proxy: InProcessProxyFactory
) -> None:
    upstream = await oauth_upstream("--strict-audience")
    proxy = await start_proxy(upstream.url, oauth_pass_through="metadata")

    async def nothing() -> None:
        return None

    run = await run_ts_oauth_client(node_env, proxy.url, nothing)
    assert "first" not in run.steps, run
    assert run.returncode == 1, run
    assert (await upstream.stats())["tools_call"] == 0
