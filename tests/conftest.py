"""Shared fixtures: the official MCP SDK server as a restartable upstream process, the proxy in-process,
and the official SDK client.

Every service binds 127.0.0.1 on a free port and is stopped by its PID when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mcp_heal_proxy.config import DEFAULT_UPSTREAM_CLIENT, single_upstream
from mcp_heal_proxy.front.app import FAST_PATH_KEY, STORE_KEY, build_app
from mcp_heal_proxy.front.http1 import FastSite
from mcp_heal_proxy.store.records import SessionRecord
from tests.fake_upstream import FakeUpstream

HERE = Path(__file__).parent
REPO_ROOT = HERE.parent
READY_TIMEOUT = 20.0
# How often a test server is started before its start fails (see ServerProcess.start).
START_ATTEMPTS = 3
# The upstream HTTP client of every proxy the tests start: the default (lean), or with
# MCP_HEAL_PROXY_TEST_CLIENT=aiohttp the whole suite on the aiohttp fallback.
TEST_CLIENT = os.environ.get("MCP_HEAL_PROXY_TEST_CLIENT", DEFAULT_UPSTREAM_CLIENT)


@pytest.fixture(scope="session", autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Proxies started by tests (and their subprocesses) keep their default store out of the real home."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``check`` (plain or async) until it is true, failing the test after ``timeout`` seconds."""

    async def holds() -> bool:
        result = check()
        return await result if inspect.isawaitable(result) else result

    try:
        async with asyncio.timeout(timeout):
            while not await holds():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not reached within {timeout} s") from None


class _ExitedEarly(Exception):
    """A test server's process ended before it answered (its exit status): e.g. its port was taken."""


class ServerProcess:
    """A test server (a script of tests/) in its own process on a free 127.0.0.1 port, ready once its
    ``/stats`` answers, stopped by its PID. Subclasses say how to start it (``command``), and may keep its
    output in a file (``log_path``; by default it is discarded)."""

    name = "server"

    def __init__(self, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        # Once it served (a start is then a restart), or when a test chose it, the port stays.
        self.port_fixed = port is not None
        # How the tests' own requests (/stats, /release) check the server's certificate (https servers).
        self.client_ssl: ssl.SSLContext | bool = True

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return f"{self.origin}/mcp"

    def command(self) -> list[str]:
        """The command line that starts the server on ``self.port``."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start the server and wait until it answers.

        The port was free when chosen, not reserved: on a machine where other test runs (and their
        clients' outgoing connections) take ports too, another process can take it before this server
        binds it. Then this server exits (address in use) and is started again, on a new free port the
        first time, on the same one for a restart (the proxy in front knows that one), with backoff.
        """
        for attempt in range(1, START_ATTEMPTS + 1):
            self.process = self._spawn()
            try:
                await wait_until(self._answers, READY_TIMEOUT, f"{self.name} ready")
            except _ExitedEarly as exited:
                self.process = None
                if attempt == START_ATTEMPTS:
                    where = f"; see {self.log_path}" if self.log_path is not None else ""
                    raise RuntimeError(
                        f"{self.name} exited with {exited} {attempt} times (port {self.port}){where}"
                    ) from None
                if not self.port_fixed:
                    self.port = free_port()
                await asyncio.sleep(0.2 * attempt)
                continue
            except BaseException:
                await self.stop()
                raise
            self.port_fixed = True
            return

    def _spawn(self) -> subprocess.Popen[bytes]:
        """The process, from the repository root (``python -m tests...`` commands), its output in the log file
        when there is one."""
        if self.log_path is None:
            return subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT)
        with self.log_path.open("ab") as log:
            return subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    async def _answers(self) -> bool:
        """Ready once this process answers: not merely something on its port (another process that took
        the port first answers /stats too, while this one fails to bind and exits)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise _ExitedEarly(self.process.returncode)
        try:
            stats = await self.stats()
        except (aiohttp.ClientError, OSError):
            return False
        return stats.get("pid") == self.process.pid

    async def stop(self) -> None:
        """Stop the server by its PID (SIGKILL: every session dies at once, as in a crash)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)
        self.process = None

    async def restart(self) -> None:
        """A restart or deploy: the process dies with its sessions, a new one takes the port."""
        await self.stop()
        await self.start()

    async def stats(self) -> dict[str, Any]:
        """What the server counted since it started (each server's ``/stats``)."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.origin}/stats", timeout=aiohttp.ClientTimeout(total=2), ssl=self.client_ssl) as response,
        ):
            data: dict[str, Any] = await response.json()
            return data


class UpstreamProcess(ServerProcess):
    """The official Python SDK MCP server (tests/upstream_server.py) in its own process."""

    name = "upstream server"

    def __init__(
        self,
        *,
        json_response: bool,
        idle_timeout: float | None = None,
        resumable: bool = False,
        close_connections: bool = False,
    ) -> None:
        super().__init__()
        self.json_response = json_response
        self.idle_timeout = idle_timeout
        self.resumable = resumable
        self.close_connections = close_connections

    def command(self) -> list[str]:
        command = [sys.executable, str(HERE / "upstream_server.py"), "--port", str(self.port)]
        if self.json_response:
            command.append("--json")
        if self.idle_timeout is not None:
            command += ["--idle-timeout", str(self.idle_timeout)]
        if self.resumable:
            command.append("--resumable")
        if self.close_connections:
            command.append("--close-connections")
        return command

    async def release(self, step: int) -> None:
        """Let the upstream's gated_steps tool go past ``step``."""
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.origin}/release?step={step}", ssl=self.client_ssl) as response,
        ):
            assert response.status == 200

    async def forget_sessions(self) -> list[str]:
        """A failover: the upstream forgets every session (later requests on them answer 404) while the
        streams already open on them stay open. The ids it forgot."""
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.origin}/forget", ssl=self.client_ssl) as response,
        ):
            assert response.status == 200
            forgotten: list[str] = (await response.json())["forgotten"]
            return forgotten

    async def live_sessions(self) -> list[str]:
        """Session ids the upstream still holds."""
        sessions: list[str] = (await self.stats())["live_sessions"]
        return sessions


class ModernUpstreamProcess(ServerProcess):
    """A 2026-07-28-only server (tests/modern_upstream.py: the SDK server behind a guard that refuses
    handshake-era requests as the spec says a modern-only server does) in its own process."""

    name = "modern-only upstream server"

    def __init__(self, *, json_response: bool = False, legacy_only: bool = False, bearer: str | None = None) -> None:
        super().__init__()
        self.json_response = json_response
        # The same server speaking only the handshake era (a plain 400 to a 2026-07-28 request).
        self.legacy_only = legacy_only
        # A bearer token every MCP request must carry (else 401 with a challenge).
        self.bearer = bearer

    def command(self) -> list[str]:
        command = [sys.executable, str(HERE / "modern_upstream.py"), "--port", str(self.port)]
        if self.json_response:
            command.append("--json")
        if self.legacy_only:
            command.append("--legacy-only")
        if self.bearer is not None:
            command += ["--bearer", self.bearer]
        return command


@pytest.fixture
async def modern_upstream() -> AsyncIterator[ModernUpstreamProcess]:
    """The modern-only server (SSE answers where the SDK streams)."""
    server = ModernUpstreamProcess()
    await server.start()
    yield server
    await server.stop()


class HttpsUpstreamProcess(UpstreamProcess):
    """The SDK server under uvicorn serving https with a certificate from a test CA (see ``test_ca``).
    ``client_ca`` makes it require a client certificate issued by that CA; ``client_ssl`` is how the
    tests' own requests (/stats) check its certificate."""

    name = "https upstream server"

    def __init__(
        self,
        certificate: trustme.LeafCert,
        directory: Path,
        *,
        json_response: bool = False,
        client_ca: Path | None = None,
        client_ssl: ssl.SSLContext | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(json_response=json_response)
        if port is not None:
            self.port = port  # the same address as a server before it (a restart with a new certificate)
            self.port_fixed = True
        self.certfile = directory / f"server-{self.port}.pem"
        self.keyfile = directory / f"server-{self.port}.key"
        certificate.cert_chain_pems[0].write_to_path(str(self.certfile))
        for pem in certificate.cert_chain_pems[1:]:
            pem.write_to_path(str(self.certfile), append=True)
        certificate.private_key_pem.write_to_path(str(self.keyfile))
        self.client_ca = client_ca
        if client_ssl is not None:
            self.client_ssl = client_ssl

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [*super().command(), "--certfile", str(self.certfile), "--keyfile", str(self.keyfile)]
        if self.client_ca is not None:
            command += ["--client-ca", str(self.client_ca)]
        return command


@dataclass(frozen=True)
class CertAuthority:
    """A certificate authority made for the test run (trustme), and its certificate as a PEM file."""

    ca: trustme.CA
    pem: Path
    directory: Path

    def trusting_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (the tests' own requests to its servers)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    directory = tmp_path_factory.mktemp("test-ca")
    ca = trustme.CA(organization_name="mcp-heal-proxy tests")
    pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return CertAuthority(ca, pem, directory)


@pytest.fixture
async def https_upstream(test_ca: CertAuthority) -> AsyncIterator[HttpsUpstreamProcess]:
    """The SDK server (SSE answers) over https, its certificate for 127.0.0.1 issued by ``test_ca``."""
    server = HttpsUpstreamProcess(
        test_ca.ca.issue_cert("127.0.0.1"), test_ca.directory, client_ssl=test_ca.trusting_context()
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(params=["sse", "json"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamProcess]:
    """The SDK server, once in SSE-answer mode and once in JSON-answer mode."""
    server = UpstreamProcess(json_response=request.param == "json")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def sse_upstream() -> AsyncIterator[UpstreamProcess]:
    """The SDK server in its default SSE-answer mode only."""
    server = UpstreamProcess(json_response=False)
    await server.start()
    yield server
    await server.stop()


@dataclass(frozen=True)
class RunningProxy:
    """A proxy started by a test: its client-facing URL and its app (to look at its session store)."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop it (a restart: start another on its port). The fixture leaves a stopped runner alone."""
        if self.runner.server is not None:
            await self.runner.cleanup()

    async def record(self, client_session_id: str) -> SessionRecord | None:
        """The proxy's record for a client session id."""
        return await self.app[STORE_KEY].get(client_session_id)


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def fake(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeUpstream, str]:
    """The fault-injecting fake upstream (tests/fake_upstream.py) and its MCP URL."""
    upstream = FakeUpstream()
    server = await aiohttp_server(upstream.app())
    return upstream, str(server.make_url("/mcp"))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for raw Streamable HTTP requests, every call bounded in time."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    """Start the proxy in this process in front of an upstream URL."""
    runners: list[web.AppRunner] = []

    async def start(upstream_url: str, *, port: int = 0, otel: Any = None, **upstream_options: Any) -> RunningProxy:
        upstream_options.setdefault("client", TEST_CLIENT)
        config = single_upstream(upstream_url, **upstream_options)
        app = build_app(config, otel)  # otel: a test's OpenTelemetry hooks (tests/test_otel.py)
        # As serve() runs it: handlers cancelled when the client leaves, the proxy's own HTTP/1.1 server
        # in front of aiohttp's (aiohttp's alone with http_server="aiohttp").
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        runners.append(runner)
        site: web.BaseSite = (
            FastSite(runner, "127.0.0.1", port, app[FAST_PATH_KEY])
            if config.http_server == "fast"
            else web.TCPSite(runner, "127.0.0.1", port)
        )
        await site.start()
        return RunningProxy(f"http://127.0.0.1:{runner.addresses[0][1]}/mcp", app, runner)

    yield start
    for runner in runners:
        if runner.server is not None:
            await runner.cleanup()


async def start_serve(*args: str, stderr: int = asyncio.subprocess.DEVNULL) -> tuple[asyncio.subprocess.Process, str]:
    """``python -m mcp_heal_proxy serve ARGS`` in a subprocess, and the client URL its banner prints (the
    process is killed if none comes within 20 s). The caller stops it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_heal_proxy", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO_ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    match = None
    try:
        async with asyncio.timeout(20):
            while match is None:
                line = await process.stdout.readline()
                if not line:
                    break
                match = re.search(rb'url = "([^"]+)"', line)
        assert match is not None, "the proxy printed no URL"
    except BaseException:
        process.kill()  # never leave a proxy running behind a failed test
        await process.wait()
        raise
    return process, match.group(1).decode()


@contextlib.asynccontextmanager
async def mcp_session(url: str, **callbacks: Any) -> AsyncIterator[ClientSession]:
    """The official SDK client, initialized, on ``url`` (``callbacks``: ClientSession's, e.g. message_handler)."""
    async with (
        streamable_http_client(url) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream, **callbacks) as session,
    ):
        await session.initialize()
        yield session


MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INITIALIZE_PARAMS = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "raw-test-client", "version": "1"},
}


async def raw_initialize(http: aiohttp.ClientSession, url: str) -> str:
    """Initialize by hand (no SDK) and complete the handshake; return the session id the client got."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 200, await response.text()
        session_id = response.headers["Mcp-Session-Id"]
        await response.read()
    headers = {**MCP_HEADERS, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"}
    async with http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers) as r:
        assert r.status == 202, await r.text()
    return session_id


def session_headers(session_id: str) -> dict[str, str]:
    """Headers of a request on an initialized session."""
    return {**MCP_HEADERS, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"}


def echo_call(request_id: int | str, text: str = "hi") -> dict[str, Any]:
    """A tools/call of the echo tool (every test upstream has one)."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }


async def post_on_session(
    http: aiohttp.ClientSession, url: str, session_id: str, body: object
) -> tuple[int, dict[str, str], Any]:
    """POST a message on a session: the status, the headers and the JSON answer (None without a body)."""
    async with http.post(url, data=json.dumps(body), headers=session_headers(session_id)) as response:
        raw = await response.read()
        return response.status, dict(response.headers), json.loads(raw) if raw else None
