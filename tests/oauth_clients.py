"""Headless OAuth for the tests: the OAuth upstream process, and the Python SDK client logging in.

``OAuthUpstream`` runs tests/oauth_server.py in its own process; its state file keeps issued tokens
valid across a restart. ``oauth_mcp_session`` is the SDK's ``OAuthClientProvider`` whose redirect
handler follows the authorization URL with an HTTP client (every hop, without a browser) until it
reaches the client's own redirect URI, then feeds code and state to the callback handler.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import httpx2
from mcp.client.auth import OAuthClientProvider
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from tests.conftest import ServerProcess

HERE = Path(__file__).parent
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never dialed: the test reads the code off the redirect
MAX_HOPS = 5


class OAuthUpstream(ServerProcess):
    """tests/oauth_server.py in its own process on a free port; issued tokens survive a restart (its
    state file)."""

    name = "OAuth upstream"

    def __init__(self, state_dir: Path, *options: str, tls: tuple[Path, Path, ssl.SSLContext] | None = None) -> None:
        super().__init__()
        self.options = options
        self.state_file = state_dir / f"oauth-{self.port}.json"
        # https: (certificate file, key file, a context that trusts its CA for the tests' own requests).
        self.tls = tls
        if tls is not None:
            self.options = (*options, "--certfile", str(tls[0]), "--keyfile", str(tls[1]))
            self.client_ssl = tls[2]

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(HERE / "oauth_server.py"),
            "--port",
            str(self.port),
            "--state-file",
            str(self.state_file),
            *self.options,
        ]

    async def post(self, path: str) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.origin}{path}", timeout=aiohttp.ClientTimeout(total=2), ssl=self.client_ssl) as response,
        ):
            assert response.status == 200


class MemoryStorage:
    """The SDK client's token storage, kept where the test can read it (to search logs for the token)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None
        self.seen_access_tokens: list[str] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.seen_access_tokens.append(tokens.access_token)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


async def follow_to_redirect_uri(authorization_url: str, redirect_uri: str, trust: ssl.SSLContext | bool = True) -> str:
    """Follow an authorization URL hop by hop, as a browser would, until it lands on ``redirect_uri``
    (``trust``: the CAs the browser trusts)."""
    url = authorization_url
    connector = aiohttp.TCPConnector(ssl=trust)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=connector) as http:
        for _ in range(MAX_HOPS):
            if url.startswith(redirect_uri):
                return url
            async with http.get(url, allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status not in (302, 303, 307) or location is None:
                    raise AssertionError(f"authorization stopped at {response.status}: {await response.text()}")
                url = urljoin(url, location)
    raise AssertionError("authorization redirected too many times")


class HeadlessLogin:
    """Redirect and callback handlers for OAuthClientProvider, with no browser."""

    def __init__(self, trust: ssl.SSLContext | bool = True) -> None:
        self.callback_url: str | None = None
        self.logins = 0
        self._trust = trust

    async def redirect(self, authorization_url: str) -> None:
        self.logins += 1
        self.callback_url = await follow_to_redirect_uri(authorization_url, REDIRECT_URI, self._trust)

    async def callback(self) -> AuthorizationCodeResult:
        assert self.callback_url is not None
        query = parse_qs(urlsplit(self.callback_url).query)
        if "code" not in query:
            raise AssertionError(f"authorization refused: {query}")
        iss = query.get("iss", [None])[0]
        return AuthorizationCodeResult(code=query["code"][0], state=query.get("state", [None])[0], iss=iss)


def oauth_provider(
    url: str, storage: MemoryStorage, login: HeadlessLogin, token_endpoint_auth_method: str | None = None
) -> OAuthClientProvider:
    metadata = OAuthClientMetadata(
        client_name="heal-proxy-test",
        redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method=token_endpoint_auth_method,  # type: ignore[arg-type]
    )
    return OAuthClientProvider(
        server_url=url,
        client_metadata=metadata,
        storage=storage,
        redirect_handler=login.redirect,
        callback_handler=login.callback,
    )


@contextlib.asynccontextmanager
async def oauth_mcp_session(
    url: str, storage: MemoryStorage, login: HeadlessLogin, *, token_endpoint_auth_method: str | None = None
) -> AsyncIterator[ClientSession]:
    """The SDK client, logged in by OAuth and initialized, on ``url``."""
    auth = oauth_provider(url, storage, login, token_endpoint_auth_method)
    async with (
        httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(15.0)) as http,
        streamable_http_client(url, http_client=http) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream) as session,
    ):
        await session.initialize()
        yield session


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups: the SDK client wraps its failures in them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
