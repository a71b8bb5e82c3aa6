"""A real authorization server for the OAuth tests: panva's oidc-provider (tests/interop/oidc_provider.mjs)
in front of the Python SDK server checking its JWTs strictly (tests/interop/jwt_mcp_server.py), and a
headless browser that completes oidc-provider's login and consent pages with plain form posts.

Both run in their own processes on free 127.0.0.1 ports, stopped by PID. The authorization server
keeps its tokens in memory; the MCP server restarts without it (its sessions die, the tokens it
accepts do not: they are signed JWTs).
"""

from __future__ import annotations

import asyncio
import html
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp

from tests.conftest import READY_TIMEOUT, ServerProcess, free_port, wait_until
from tests.interop.conftest import HERE, NodeEnv, missing_prerequisite, port_open, stop_process

OIDC_PROVIDER = "oidc-provider"
# Access tokens expire this soon (seconds): every scenario outlives a few.
TOKEN_LIFETIME = 2.0
# What the development login page accepts: any login name and any password.
ACCOUNT = "alice"
PASSWORD = "any password"
# Pages a login goes through: authorize, login form, its post, resume, consent form, its post, resume,
# the redirect (a device login adds the code pages): well under this.
MAX_STEPS = 16
_FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.DOTALL | re.IGNORECASE)
_INPUT = re.compile(r"<input\b([^>]*)>", re.IGNORECASE)
_ATTRIBUTE = re.compile(r'([a-zA-Z_:-]+)\s*=\s*"([^"]*)"')


def require_oidc_provider(node_env: NodeEnv) -> None:
    """Skip (fail in CI) when the pinned oidc-provider is not installed."""
    if not (node_env.modules / OIDC_PROVIDER / "package.json").is_file():
        missing_prerequisite(f"{OIDC_PROVIDER} not installed in {node_env.modules}")


class AuthorizationServer:
    """oidc-provider on 127.0.0.1, issuing JWTs for one MCP server URL."""

    def __init__(self, node: NodeEnv, resource: str, log_path: Path, *, token_lifetime: float) -> None:
        self.node = node
        self.port = free_port()
        self.resource = resource
        self.log_path = log_path
        self.token_lifetime = token_lifetime
        self.process: asyncio.subprocess.Process | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.node.node,
                str(HERE / "oidc_provider.mjs"),
                str(self.port),
                self.resource,
                "--token-lifetime",
                str(self.token_lifetime),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.node.env(),
            )
        await wait_until(self._listening, READY_TIMEOUT, "oidc-provider ready")

    async def _listening(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(f"oidc-provider exited with {self.process.returncode}; see {self.log_path}")
        if not await port_open(self.port):
            return False
        try:
            stats = await self.stats()
        except (aiohttp.ClientError, OSError, ValueError):
            return False
        # This process, not another one that took the port first (this one then exits: address in use).
        return bool(stats.get("pid") == self.process.pid)

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process, signal.SIGKILL)
            self.process = None

    async def stats(self) -> dict[str, Any]:
        """What it counted since start: authorizations, grants by grant_type, revocations, ..."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"{self.issuer}/test/stats") as response,
        ):
            data: dict[str, Any] = await response.json()
            return data

    async def grants(self, grant_type: str) -> int:
        count: int = (await self.stats())["grants"].get(grant_type, 0)
        return count


class JwtUpstream(ServerProcess):
    """tests/interop/jwt_mcp_server.py: the SDK server accepting only the authorization server's JWTs
    issued for its own URL (so its port is chosen before the authorization server starts, and kept)."""

    name = "JWT-checking MCP server"

    def __init__(self, port: int, issuer: str, log_path: Path, *options: str) -> None:
        super().__init__(port=port, log_path=log_path)
        self.issuer = issuer
        self.options = options

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "tests.interop.jwt_mcp_server", "--port", str(self.port)]
        return [*command, "--issuer", self.issuer, *self.options]


@dataclass
class OidcUpstream:
    """The pair: oidc-provider and the MCP server whose tokens it issues."""

    authorization_server: AuthorizationServer
    mcp: JwtUpstream

    @property
    def url(self) -> str:
        return self.mcp.url


# --- the headless browser -------------------------------------------------------------------------


def _attributes(tag: str) -> dict[str, str]:
    return {name.lower(): html.unescape(value) for name, value in _ATTRIBUTE.findall(tag)}


def _form(page: str) -> tuple[str, dict[str, str]] | None:
    """The first form of a page: its action and the fields a user would send (login filled in)."""
    match = _FORM.search(page)
    if match is None:
        return None
    action = _attributes(match.group(1)).get("action", "")
    fields: dict[str, str] = {}
    for tag in _INPUT.findall(match.group(2)):
        attributes = _attributes(tag)
        name = attributes.get("name")
        if name is None:
            continue
        if name == "login":
            fields[name] = ACCOUNT
        elif name == "password":
            fields[name] = PASSWORD
        else:
            fields[name] = attributes.get("value", "")
    return action, fields


class Browser:
    """A user at oidc-provider's pages: follows redirects, signs in, consents. Keeps cookies (its
    session at the authorization server) across calls, as a browser does."""

    def __init__(self) -> None:
        # unsafe: cookies for an IP-address host (127.0.0.1), which aiohttp refuses by default.
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=15), cookie_jar=aiohttp.CookieJar(unsafe=True)
        )
        self.pages: list[str] = []

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _walk(self, url: str, stop: str | None) -> tuple[str, int, str]:
        """Follow redirects and submit forms from ``url`` until a URL starting with ``stop`` (not
        requested), or, without ``stop``, a page with no form; (last URL, status, page)."""
        method, data = "GET", None
        for _ in range(MAX_STEPS):
            if stop is not None and url.startswith(stop):
                return url, 0, ""
            async with self._http.request(method, url, data=data, allow_redirects=False) as response:
                page = await response.text()
                status = response.status
                location = response.headers.get("Location")
            self.pages.append(f"{method} {urlsplit(url).path} -> {status}")
            if status in (302, 303, 307) and location is not None:
                url, method, data = urljoin(url, location), "GET", None
                continue
            form = _form(page) if status == 200 else None
            if form is None:
                if stop is None:
                    return url, status, page
                raise AssertionError(f"the login stopped at {status} {url}: {page[:500]}\n{self.pages}")
            action, data = form[0], form[1]
            url, method = urljoin(url, action), "POST"
        raise AssertionError(f"the login took more than {MAX_STEPS} steps: {self.pages}")

    async def authorize(self, url: str, redirect_uri: str) -> str:
        """Open the authorization URL, sign in and consent; the URL the server redirected to at
        ``redirect_uri`` (not opened)."""
        final, _, _ = await self._walk(url, redirect_uri)
        return final

    async def open(self, url: str) -> int:
        """Open a URL (a loopback callback); its status."""
        async with self._http.get(url, allow_redirects=False) as response:
            await response.read()
            return response.status

    async def approve_device(self, verification_uri_complete: str) -> str:
        """Open the device verification URL with its code, confirm, sign in and consent; the last page."""
        _, status, page = await self._walk(verification_uri_complete, None)
        assert status == 200, (status, page[:500], self.pages)
        return page


def redirect_uri_of(authorization_url: str) -> str:
    """The redirect_uri an authorization URL names."""
    return parse_qs(urlsplit(authorization_url).query)["redirect_uri"][0]
