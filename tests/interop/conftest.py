"""Fixtures of the interop suite: the pinned npm packages, server-everything as a restartable upstream,
and the proxy as its own process (the real ``mcp-heal-proxy serve``), so that it can be restarted too.

The npm packages are installed by ``tests/interop/install.sh`` (run by ``.ci/run``) into
``.cache/interop/node_modules``. Without them the suite skips, except in CI (``CI=true``), where a
missing install is a failure. Every process binds 127.0.0.1 on a free port and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

from mcp_heal_proxy.config import DEFAULT_UPSTREAM_CLIENT
from tests.conftest import TEST_CLIENT, ServerProcess, free_port, wait_until

HERE = Path(__file__).parent
REPO = HERE.parent.parent
NODE_MODULES = Path(os.environ.get("INTEROP_NODE_MODULES", REPO / ".cache" / "interop" / "node_modules"))
CODEX_BINARY = NODE_MODULES / "@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/codex/codex"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_URL_LINE = re.compile(r'url = "(http://[^"]+)"')


def missing_prerequisite(reason: str) -> NoReturn:
    """Skip the test on a developer machine without the installs; fail it in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the interop suite must run; see .ci/run)")
    pytest.skip(f"{reason}; run tests/interop/install.sh to enable the interop suite")


@dataclass(frozen=True)
class NodeEnv:
    """Where node and the pinned packages are."""

    node: str
    modules: Path

    def env(self) -> dict[str, str]:
        """Environment for a node script of this suite."""
        return {**os.environ, "INTEROP_NODE_MODULES": str(self.modules)}


@pytest.fixture(scope="session")
def node_env() -> NodeEnv:
    """node and the npm install, or skip (fail in CI) with the reason."""
    node = shutil.which("node")
    if node is None:
        missing_prerequisite("node is not on PATH")
    if not (NODE_MODULES / "@modelcontextprotocol" / "sdk").is_dir():
        missing_prerequisite(f"npm packages not installed in {NODE_MODULES}")
    return NodeEnv(node=node, modules=NODE_MODULES)


async def port_open(port: int) -> bool:
    """Does something accept TCP connections on 127.0.0.1:port?"""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def stop_process(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Send ``sig`` to the process by its PID and reap it (SIGKILL if it lingers)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()


class EverythingServer:
    """``@modelcontextprotocol/server-everything streamableHttp`` on 127.0.0.1, restartable."""

    def __init__(self, node: NodeEnv, log_path: Path) -> None:
        self.node = node
        self.port = free_port()
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self) -> None:
        """Start the server and wait until it listens."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.node.node,
                str(HERE / "everything_server.mjs"),
                str(self.port),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.node.env(),
            )
        await wait_until(self._listening, READY_TIMEOUT, "server-everything ready")

    async def _listening(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(f"server-everything exited with {self.process.returncode}; see {self.log_path}")
        return await port_open(self.port)

    async def stop(self) -> None:
        """Kill it (SIGKILL: every session dies at once, as in a crash)."""
        if self.process is not None:
            await stop_process(self.process, signal.SIGKILL)
            self.process = None

    async def restart(self) -> None:
        """A restart or deploy: the process dies with its sessions, a new one takes the port."""
        await self.stop()
        await self.start()


@pytest.fixture
async def everything(node_env: NodeEnv, tmp_path: Path) -> AsyncIterator[EverythingServer]:
    """server-everything as the upstream."""
    server = EverythingServer(node_env, tmp_path / "server-everything.log")
    await server.start()
    yield server
    await server.stop()


class TtlServer(ServerProcess):
    """tests/interop/ttl_server.py: the Python SDK server with a short idle TTL and no GET stream."""

    name = "TTL server"

    def __init__(self, log_path: Path, idle_timeout: float, *, json_response: bool = False) -> None:
        super().__init__(log_path=log_path)
        self.idle_timeout = idle_timeout
        self.json_response = json_response

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "tests.interop.ttl_server", "--port", str(self.port)]
        command += ["--idle-timeout", str(self.idle_timeout)]
        if self.json_response:
            command.append("--json")
        return command

    async def wait_for_expiry(self, count: int = 1) -> None:
        """Wait until the server has expired ``count`` idle sessions (bounded: a few TTLs)."""

        async def expired() -> bool:
            so_far: int = (await self.stats()).get("idle_expired", 0)
            return so_far >= count

        await wait_until(expired, self.idle_timeout * 5 + 5, f"{count} idle session expiry")


@pytest.fixture
async def ttl_server(tmp_path: Path) -> AsyncIterator[TtlServer]:
    """A Python SDK server whose sessions expire after 1 s idle."""
    server = TtlServer(tmp_path / "ttl-server.log", idle_timeout=1.0)
    await server.start()
    yield server
    await server.stop()


class ProxyProcess:
    """``mcp-heal-proxy serve`` in its own process, on a fixed free port so a restart keeps the URL."""

    def __init__(self, upstream_url: str, log_dir: Path, *, memory_state: bool = False) -> None:
        self.upstream_url = upstream_url
        # A private session store that outlives a restart of this proxy (never the user's default one),
        # or none at all.
        self.state = ":memory:" if memory_state else str(log_dir / "sessions.sqlite3")
        self.port = free_port()
        self.stdout_path = log_dir / "proxy.stdout"
        self.log_path = log_dir / "proxy.log"
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> None:
        """Start the proxy and wait for the URL it prints."""
        upstream = ["--upstream", self.upstream_url]
        if TEST_CLIENT != DEFAULT_UPSTREAM_CLIENT:
            # MCP_HEAL_PROXY_TEST_CLIENT names the other client: the same upstream at /mcp from a
            # config file (the client key exists only there).
            config = self.stdout_path.with_name("proxy.toml")
            config.write_text(
                f"[upstreams.interop]\nurl = {json.dumps(self.upstream_url)}\n"
                f'path = "/mcp"\nclient = {json.dumps(TEST_CLIENT)}\n'
            )
            upstream = ["--config", str(config)]
        command = [
            sys.executable,
            "-m",
            "mcp_heal_proxy",
            "serve",
            *upstream,
            "--port",
            str(self.port),
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--state",
            self.state,
        ]
        self.stdout_path.write_bytes(b"")
        with self.stdout_path.open("ab") as out, self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(*command, stdout=out, stderr=log, cwd=REPO)
        await wait_until(self._printed_url, READY_TIMEOUT, "proxy ready")

    async def _printed_url(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(f"proxy exited with {self.process.returncode}; see {self.log_path}")
        match = _URL_LINE.search(self.stdout_path.read_text())
        if match is None:
            return False
        self.url = match.group(1)
        return True

    async def stop(self) -> None:
        """Stop it as an operator would (SIGTERM)."""
        if self.process is not None:
            await stop_process(self.process, signal.SIGTERM)
            self.process = None

    async def restart(self) -> None:
        """A crash and a restart on the same port with the same session store: SIGKILL, then start.

        SIGKILL, not SIGTERM: a crash is the harder case; the session store must survive it without any
        shutdown work.
        """
        if self.process is not None:
            await stop_process(self.process, signal.SIGKILL)
            self.process = None
        await self.start()

    def log(self) -> str:
        """What the proxy logged so far (for assertion messages)."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, object]]:
        """The proxy's JSON log records whose event is ``name``."""
        found: list[dict[str, object]] = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == name:
                    found.append(record)
        return found

    def heal_reasons(self) -> list[str]:
        """Why the proxy healed, per successful heal, from its log ("http_404", "http_400", ...)."""
        heals = self.events("session.healed") + [
            record for record in self.events("session.heal") if record.get("outcome") == "healed"
        ]
        return [str(record.get("reason")) for record in heals]

    def healed_on(self, expiry: str) -> bool:
        """Did the proxy heal, and only for ``expiry`` (e.g. "http_400") or a lost upstream GET stream?

        After an upstream restart two things race: the client's next POST meets the expiry answer, and
        the proxy's reattach of the GET stream meets it too ("get_stream_lost", healed only when the same
        expiry rule matches). Either may heal first.
        """
        reasons = set(self.heal_reasons())
        return bool(reasons) and reasons <= {expiry, "get_stream_lost"}


class ProxyFactory(Protocol):
    """Starts a proxy process in front of ``upstream_url``; ``memory_state`` keeps its sessions in memory."""

    async def __call__(self, upstream_url: str, *, memory_state: bool = False) -> ProxyProcess: ...


@pytest.fixture
async def proxy_process(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start proxy processes; stops every one it started."""
    started: list[ProxyProcess] = []

    async def start(upstream_url: str, *, memory_state: bool = False) -> ProxyProcess:
        log_dir = tmp_path / f"proxy-{len(started)}"
        log_dir.mkdir()
        proxy = ProxyProcess(upstream_url, log_dir, memory_state=memory_state)
        started.append(proxy)
        await proxy.start()
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
def codex_binary(node_env: NodeEnv) -> Path:
    """The Codex 0.105.0 binary from the pinned npm package."""
    if not CODEX_BINARY.is_file():
        missing_prerequisite(f"Codex binary missing at {CODEX_BINARY} (only linux-x64 is pinned)")
    return CODEX_BINARY
