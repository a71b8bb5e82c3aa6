"""The TypeScript SDK's example server as an https upstream (Node's https server with a certificate of the
test CA, tests/interop/ts_https_server.mjs), reached through a real outbound proxy (tinyproxy): a tool
call survives the server's restart with either upstream client, every connection a CONNECT tunnel with
TLS inside it checked against the test CA.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp.types import TextContent
from structlog.testing import capture_logs

from tests.conftest import CertAuthority, ProxyFactory, free_port, mcp_session, wait_until
from tests.interop.conftest import HERE, READY_TIMEOUT, NodeEnv, port_open, stop_process
from tests.outbound_proxy import TinyProxy, tinyproxy

__all__ = ["tinyproxy"]  # the fixture

pytestmark = pytest.mark.interop


class TsHttpsServer:
    """simpleStreamableHttp.js over https on 127.0.0.1, restartable (its sessions die with it)."""

    def __init__(self, node: NodeEnv, cert: Path, key: Path, log_path: Path) -> None:
        self.node = node
        self.port = free_port()
        self.cert = cert
        self.key = key
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mcp"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.node.node, str(HERE / "ts_https_server.mjs"), str(self.port), str(self.cert), str(self.key),
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=self.node.env(),
            )  # fmt: skip
        await wait_until(self._listening, READY_TIMEOUT, "the TypeScript SDK's https server ready")

    async def _listening(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(
                f"the TypeScript SDK's server exited with {self.process.returncode}; see {self.log_path}"
            )
        return await port_open(self.port)

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process, signal.SIGKILL)
            self.process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture
async def ts_https(node_env: NodeEnv, test_ca: CertAuthority, tmp_path: Path) -> AsyncIterator[TsHttpsServer]:
    certificate = test_ca.ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "ts-server.pem", tmp_path / "ts-server.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    server = TsHttpsServer(node_env, cert, key, tmp_path / "ts-https-server.log")
    await server.start()
    yield server
    await server.stop()


def greeting(result: object) -> str:
    content = getattr(result, "content", None)
    assert content, result
    first = content[0]
    assert isinstance(first, TextContent)
    return first.text


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
async def test_the_typescript_sdk_server_over_https_heals_across_a_restart_through_the_proxy(
    client: str,
    ts_https: TsHttpsServer,
    test_ca: CertAuthority,
    tinyproxy: TinyProxy,
    start_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    proxy = await start_proxy(ts_https.url, client=client, ca_file=str(test_ca.pem), proxy=tinyproxy.url)
    with capture_logs() as logs:
        async with asyncio.timeout(60), mcp_session(proxy.url) as session:
            assert greeting(await session.call_tool("greet", {"name": "before"})) == "Hello, before!"
            tunnels = tinyproxy.connects_to(ts_https.port)
            assert tunnels >= 1, tinyproxy.requests()
            await ts_https.restart()
            assert greeting(await session.call_tool("greet", {"name": "after"})) == "Hello, after!"
    healed = [entry for entry in logs if entry["event"] == "session.healed"]
    assert len(healed) == 1, logs
    assert tinyproxy.connects_to(ts_https.port) > tunnels, "the heal's connections went through the proxy"
    assert all(line.startswith("CONNECT ") for line in tinyproxy.requests()), tinyproxy.requests()
