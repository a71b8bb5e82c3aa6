"""The processes a benchmark run starts: upstreams, nginx, the proxy. All on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_tool(name: str) -> str | None:
    """A tool on PATH, or in the sbin directories a non-root PATH often lacks (nginx lives in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


def wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``url`` answers at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


class Service:
    """One child process; ``stop`` signals its PID and waits."""

    name = "service"

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def _process(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, f"{self.name} was not started"
        return self.process

    def _ready(self, wait: Callable[[], None]) -> None:
        """Wait for readiness; a child that never gets ready is stopped, not leaked."""
        try:
            wait()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class BenchUpstream(Service):
    """bench/upstream.py: the fast minimal MCP server."""

    name = "bench upstream"

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        super().__init__()
        # (certificate, key): serve https (bench/tls.py measures the hot path over TLS).
        self.tls = tls

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, log: Path) -> BenchUpstream:
        self.port = free_port()
        https = ["--certfile", str(self.tls[0]), "--keyfile", str(self.tls[1])] if self.tls else []
        with log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.upstream", "--port", str(self.port), *https],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self._ready(lambda: wait_port(self.port, self._process(), self.name))
        return self


class SdkUpstream(Service):
    """tests/upstream_server.py: the official MCP Python SDK server, JSON answers."""

    name = "SDK upstream"

    def start(self, log: Path) -> SdkUpstream:
        self.port = free_port()
        script = REPO / "tests" / "upstream_server.py"
        with log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(script), "--port", str(self.port), "--json"],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self._ready(lambda: wait_http(f"{self.base}/stats", self._process(), self.name))
        return self


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream mcp_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mcp_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


class Nginx(Service):
    """nginx ``proxy_pass`` with buffering off and upstream keep-alive, one worker, in the foreground."""

    name = "nginx"

    def start(self, nginx: str, upstream_port: int, tmp: Path) -> Nginx:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=self.port, upstream_port=upstream_port))
        command = [nginx, "-p", str(tmp), "-c", str(conf)]
        # -e (nginx >= 1.19.5) keeps the startup error log out of /var/log, which may not be writable.
        if _nginx_supports_e(nginx):
            command[1:1] = ["-e", str(tmp / "error.log")]
        with (tmp / "stderr.log").open("ab") as err:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        self._ready(lambda: wait_port(self.port, self._process(), self.name))
        return self


def _nginx_supports_e(nginx: str) -> bool:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return match is not None and tuple(int(part) for part in match.groups()) >= (1, 19, 5)


class HealProxy(Service):
    """mcp-heal-proxy through its CLI (``python -m mcp_heal_proxy serve --port 0``)."""

    name = "mcp-heal-proxy"

    def start(
        self,
        upstream_url: str,
        log: Path,
        *,
        state: str,
        workdir: Path,
        max_sessions: int = 10_000,
        client: str = "lean",
        log_level: str = "info",
        src: Path = REPO,
        env: Mapping[str, str] | None = None,
        upstream_keys: dict[str, str] | None = None,
    ) -> HealProxy:
        """Start with a generated config: ``state`` is ":memory:", a SQLite path, or a redis:// URL;
        ``client`` is the upstream HTTP client ("aiohttp" or "lean"); ``src`` is the source tree whose
        mcp_heal_proxy runs (another checkout, to compare two versions with one harness); ``env``, variables
        set for it (OpenTelemetry's, say) on top of this process's; ``upstream_keys``, more keys of the upstream's
        table (ca_file, proxy)."""
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "proxy.toml"
        config.write_text(
            "[server]\n"
            'host = "127.0.0.1"\n'
            "port = 0\n"
            f"state = {json.dumps(state)}\n"
            f"max_sessions = {max_sessions}\n"
            "[upstreams.bench]\n"
            f"url = {json.dumps(upstream_url)}\n"
            'path = "/mcp"\n'
            f"client = {json.dumps(client)}\n"
            + "".join(f"{key} = {json.dumps(value)}\n" for key, value in (upstream_keys or {}).items())
        )
        with log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mcp_heal_proxy", "serve", "--config", str(config), "--log-level", log_level],
                # python -m puts the working directory first on the import path: src's package runs.
                cwd=src,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **env} if env is not None else None,
            )
        self._ready(self._read_port)
        return self

    def _read_port(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"{self.name} exited with status {self.process.wait()} before printing its URL")
            match = re.search(r'url = "http://127\.0\.0\.1:(\d+)/mcp"', line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError(f"{self.name} printed no URL within {READY_TIMEOUT} s")
        wait_port(self.port, self._process(), self.name)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")


class Redis(Service):
    """redis-server on loopback for the store write figure: no snapshots, no append-only file."""

    name = "redis-server"

    def start(self, redis: str, tmp: Path) -> Redis:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        command = [redis, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", ""]
        command += ["--appendonly", "no", "--daemonize", "no"]
        with (tmp / "redis.log").open("ab") as err:
            self.process = subprocess.Popen(command, stdout=err, stderr=err)
        self._ready(lambda: wait_port(self.port, self._process(), self.name))
        return self

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"
