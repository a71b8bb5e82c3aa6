"""The Python SDK client logs in through the proxy to a second, independent OAuth upstream: the
TypeScript SDK's example server with its demo authorization server on another port (tests/interop/
ts_oauth_server.mjs), lenient (``--oauth``) and strict (``--oauth-strict``: the authorization server
refuses a ``resource`` other than the MCP server's URL, the server tokens issued for another).

Unlike tests/oauth_server.py, the authorization server is on another origin than the MCP server, names
it ``localhost``, issues no refresh tokens and keeps its tokens in memory (a restart forgets them), so
these runs log in and call twice on one session without an expiry in between. Its token endpoint takes
the client secret only in the form (``client_secret_post``); the Python SDK client otherwise picks
``client_secret_basic`` and fails against it directly too, so the client asks for the former.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory, free_port, wait_until
from tests.interop.conftest import HERE, READY_TIMEOUT, NodeEnv, port_open, stop_process
from tests.oauth_clients import HeadlessLogin, MemoryStorage, leaves, oauth_mcp_session

pytestmark = pytest.mark.interop

SCENARIO_TIMEOUT = 60.0
AUTH_METHOD = "client_secret_post"


class TsOAuthServer:
    """The TS SDK example server and its demo authorization server, in one node process."""

    def __init__(self, node: NodeEnv, log_path: Path, *, strict: bool) -> None:
        self.node = node
        self.port = free_port()
        self.auth_port = free_port()
        self.strict = strict
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        # The name the example gives itself in its protected-resource metadata: the proxy, like the
        # SDK clients, accepts metadata only for the URL it was given (RFC 9728 section 3.3).
        return f"http://localhost:{self.port}/mcp"

    async def start(self) -> None:
        flags = ["--oauth-strict"] if self.strict else []
        env = {**self.node.env(), "NODE_OPTIONS": "--dns-result-order=ipv4first"}
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.node.node,
                str(HERE / "ts_oauth_server.mjs"),
                str(self.port),
                str(self.auth_port),
                *flags,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        await wait_until(self._listening, READY_TIMEOUT, "TS SDK example OAuth server ready")

    async def _listening(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(f"TS example server exited with {self.process.returncode}; see {self.log_path}")
        return await port_open(self.port) and await port_open(self.auth_port)

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process, signal.SIGKILL)
            self.process = None


@pytest.fixture(params=[False, True], ids=["lenient", "strict"])
async def ts_oauth_server(
    request: pytest.FixtureRequest, node_env: NodeEnv, tmp_path: Path
) -> AsyncIterator[TsOAuthServer]:
    server = TsOAuthServer(node_env, tmp_path / "ts-oauth-server.log", strict=request.param)
    await server.start()
    yield server
    await server.stop()


async def test_sdk_client_logs_in_through_proxy_to_the_ts_example_server(
    ts_oauth_server: TsOAuthServer, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(ts_oauth_server.url)
    storage, login = MemoryStorage(), HeadlessLogin()
    async with (
        asyncio.timeout(SCENARIO_TIMEOUT),
        oauth_mcp_session(proxy.url, storage, login, token_endpoint_auth_method=AUTH_METHOD) as session,
    ):
        for name in ("first", "second"):
            result = await session.call_tool("greet", {"name": name})
            assert not result.is_error, result
            assert name in result.content[0].text  # type: ignore[union-attr]
    assert login.logins == 1


async def test_strict_ts_example_server_refuses_the_login_when_the_proxy_only_rewrites_metadata(
    node_env: NodeEnv, tmp_path: Path, start_proxy: ProxyFactory
) -> None:
    server = TsOAuthServer(node_env, tmp_path / "ts-oauth-server.log", strict=True)
    await server.start()
    try:
        proxy = await start_proxy(server.url, oauth_pass_through="metadata")
        with pytest.raises(Exception) as failure:  # noqa: PT011 - wrapped in task groups
            async with (
                asyncio.timeout(SCENARIO_TIMEOUT),
                oauth_mcp_session(proxy.url, MemoryStorage(), HeadlessLogin()) as session,
            ):
                await session.call_tool("greet", {"name": "x"})
    finally:
        await server.stop()
    # Its authorization server refuses the code exchange: the resource named the proxy, not the server.
    assert any("Token exchange failed" in str(exc) for exc in leaves(failure.value)), failure.value
