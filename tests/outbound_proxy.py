"""A real outbound HTTP proxy for the tests: tinyproxy (Debian's package, installed by .ci/run) on a free
127.0.0.1 port, with its own config file and log in a test's directory, stopped by its PID.

Its log shows every connection it made for a client (``CONNECT host:port`` and absolute-form ``GET
http://...`` requests), so a test can show that the proxy's traffic went through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until

READY_TIMEOUT = 10.0


class TinyProxy:
    """One tinyproxy process; ``user``/``password`` turn on its BasicAuth (407 without them)."""

    def __init__(
        self,
        directory: Path,
        *,
        user: str | None = None,
        password: str | None = None,
        connect_ports: tuple[int, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.user = user
        self.password = password
        # Ports CONNECT may reach (tinyproxy answers 403 for others); none listed: any port.
        self.connect_ports = connect_ports
        self.log = directory / f"tinyproxy-{self.port}.log"
        self.config = directory / f"tinyproxy-{self.port}.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The proxy's URL, with its credentials when it asks for some."""
        if self.user is not None:
            return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            f'LogFile "{self.log}"',
            # Connect: one line per client connection and per request (CONNECT or absolute-form).
            "LogLevel Connect",
            "MaxClients 200",
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
            # No ConnectPort line: CONNECT to any port (the test servers' ports are random).
            *(f"ConnectPort {port}" for port in self.connect_ports),
        ]
        if self.user is not None:
            lines.append(f"BasicAuth {self.user} {self.password}")
        self.config.write_text("\n".join(lines) + "\n")
        binary = shutil.which("tinyproxy")
        assert binary is not None, "tinyproxy is not installed (apt-get install tinyproxy; .ci/run does)"
        self.process = subprocess.Popen(
            [binary, "-d", "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {self.process.returncode}: {self.log_text()}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        try:
            await wait_until(listening, READY_TIMEOUT, "tinyproxy listening")
        except BaseException:
            await self.stop()  # never leave a proxy running behind a failed start
            raise

    async def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 5)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            await asyncio.to_thread(self.process.wait, 5)
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests(self) -> list[str]:
        """The request lines the proxy got, in order: ``CONNECT 127.0.0.1:PORT HTTP/1.1``, ``GET http://...``."""
        return re.findall(r"Request \(file descriptor \d+\): (.*)", self.log_text())

    def connects_to(self, port: int) -> int:
        """How many tunnels were asked for to 127.0.0.1:``port``."""
        return sum(1 for line in self.requests() if line.startswith(f"CONNECT 127.0.0.1:{port} "))


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[TinyProxy]:
    proxy = TinyProxy(tmp_path)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def tinyproxy_with_auth(tmp_path: Path) -> AsyncIterator[TinyProxy]:
    proxy = TinyProxy(tmp_path, user="proxyuser", password="s3cret-proxy-pass")
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
