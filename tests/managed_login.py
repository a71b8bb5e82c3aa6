"""Drive ``mcp-heal-proxy login --no-browser`` and ``serve`` as a user would, headless (test helper).

The user's browser is played by an HTTP client: it opens the printed authorization URL, and the
auto-approving authorization server redirects it to the login's loopback callback.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = (sys.executable, "-m", "mcp_heal_proxy")
_URL_LINE = re.compile(r"^https?://\S*code_challenge=\S*$")
_SERVE_URL = re.compile(r'url = "(http://[^"]+)"')


@dataclass
class LoginResult:
    returncode: int
    stdout: str
    stderr: str
    # The authorization URL the login printed, None when it printed none.
    url: str | None
    # The status the loopback callback answered the browser with.
    callback_status: int | None = None


def child_env(state_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the CLI processes: this checkout first, a private state directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["XDG_STATE_HOME"] = str(state_home)
    env.update(extra or {})
    return env


async def follow_authorization(url: str, trust: ssl.SSLContext | bool = True) -> int:
    """What the browser does: open the authorization URL and follow its redirect to the loopback callback
    (``trust``: the CAs the browser trusts)."""
    connector = aiohttp.TCPConnector(ssl=trust)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20), connector=connector) as http:
        async with http.get(url, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status not in (301, 302, 303, 307, 308) or location is None:
                raise AssertionError(f"the authorization endpoint answered {response.status} without a redirect")
        if not location.startswith("http://127.0.0.1:"):
            raise AssertionError(f"the authorization server redirected to {location}, not the loopback callback")
        async with http.get(location) as response:
            await response.read()
            return response.status


async def login(
    config: Path,
    name: str,
    env: Mapping[str, str],
    *,
    command: Sequence[str] = CLI,
    follow: bool = True,
    timeout: float = 30.0,
    trust: ssl.SSLContext | bool = True,
    visit: Callable[[str], Awaitable[int]] | None = None,
) -> LoginResult:
    """Run ``login NAME --no-browser``; follow the URL it prints (with ``visit``, a browser that signs in
    and returns the callback's status, when the authorization server has pages); wait for it to exit."""
    process = await asyncio.create_subprocess_exec(
        *command,
        "login",
        name,
        "--config",
        str(config),
        "--no-browser",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    printed: list[str] = []
    url: str | None = None
    status: int | None = None
    try:
        async with asyncio.timeout(timeout):
            while url is None:
                line = await process.stdout.readline()
                if not line:
                    break
                printed.append(line.decode())
                if _URL_LINE.match(line.decode().strip()):
                    url = line.decode().strip()
            if url is not None and follow:
                status = await (visit(url) if visit is not None else follow_authorization(url, trust))
            rest, errors = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return LoginResult(process.returncode, "".join(printed) + rest.decode(), errors.decode(), url, status)


@dataclass
class Serving:
    process: asyncio.subprocess.Process
    url: str
    # Reads the proxy's log as it comes, so that a full pipe never blocks the proxy.
    log_reader: asyncio.Task[bytes]

    async def stop(self) -> str:
        """Stop the proxy (by its PID) and return what it logged."""
        if self.process.returncode is None:
            self.process.terminate()
        try:
            async with asyncio.timeout(15):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        async with asyncio.timeout(5):
            return (await self.log_reader).decode()


async def _read_all(stream: asyncio.StreamReader) -> bytes:
    return await stream.read()


async def serve(config: Path, env: Mapping[str, str], *extra: str) -> Serving:
    """Start ``serve --config FILE --port 0`` and wait for the URL it prints."""
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    log_reader = asyncio.get_running_loop().create_task(_read_all(process.stderr))
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise AssertionError("serve exited before printing its URL: " + (await log_reader).decode())
                match = _SERVE_URL.search(line)
                if match:
                    return Serving(process, match.group(1), log_reader)
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        log_reader.cancel()
        raise
