"""The upstream MCP server as the proxy sees it: one pooled HTTP client, errors in MCP terms.

Everything that talks to the upstream goes through ``Upstream.send`` so that transport failures become
``UpstreamUnavailable`` / ``UpstreamTimeout`` in one place. The client is aiohttp's shared
``ClientSession``, or with ``client = "lean"`` the upstream's own ``LeanPool`` (upstream_lean.py), whose
responses have the same surface and raise the same aiohttp exception classes mid-body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol, cast

import aiohttp

from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.errors import UpstreamTimeout, UpstreamUnavailable

if TYPE_CHECKING:
    from mcp_heal_proxy.auth.managed import Transmit
    from mcp_heal_proxy.upstream_lean import LeanPool

# Error and initialize bodies are read whole to be inspected; nothing legitimate is larger.
INSPECT_LIMIT: Final = 256 * 1024
# Backoff between connection attempts while the upstream refuses connections (see connect_retry).
_FIRST_RETRY_DELAY: Final = 0.05
_MAX_RETRY_DELAY: Final = 1.0


class AuthHook(Protocol):
    """Credentials the proxy itself holds for the upstream (auth/managed.py): wraps each request."""

    async def send(
        self,
        transmit: Transmit,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        stream: bool,
        resendable: bool,
    ) -> aiohttp.ClientResponse: ...


class Upstream:
    """Sends requests to one upstream over the app's shared ClientSession."""

    __slots__ = (
        "_auth",
        "_client",
        "_connect_failed",
        "_injected",
        "_injected_names",
        "_lean",
        "_post_timeout",
        "_stream_timeout",
        "config",
    )

    def __init__(
        self,
        config: UpstreamConfig,
        client: aiohttp.ClientSession,
        *,
        strip_client_authorization: bool = False,
        auth: AuthHook | None = None,
    ) -> None:
        self.config = config
        self._auth = auth
        self._client = client
        self._post_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=config.connect_timeout, sock_read=config.stream_idle_timeout
        )
        # Configured headers (e.g. a bearer token from the environment) replace the client's own; the
        # client's Authorization is the proxy's own inbound token when one is set, never the upstream's.
        self._injected = dict(config.headers)
        # A managed login's hook puts its own Authorization in place of the client's (auth/managed.py).
        stripped = {"authorization"} if strip_client_authorization and auth is None else set()
        self._injected_names = frozenset(name.lower() for name in config.headers) | stripped
        self._lean: LeanPool | None = None
        # Failures to open a connection: nothing was sent, so they are always retried.
        self._connect_failed: tuple[type[Exception], ...] = (aiohttp.ClientConnectorError,)
        if config.client == "lean":
            from mcp_heal_proxy.upstream_lean import ConnectFailed, LeanPool

            self._lean = LeanPool(
                config.url,
                size=config.pool_size,
                connect_timeout=config.connect_timeout,
                idle_lifetime=config.keepalive_idle,
            )
            self._connect_failed = (aiohttp.ClientConnectorError, ConnectFailed)

    async def close(self) -> None:
        """Close this upstream's own connections (the lean client's; aiohttp's belong to the app)."""
        if self._lean is not None:
            await self._lean.close()

    async def send(
        self,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        stream: bool = False,
        resendable: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send a request and return the response once its headers arrived; the caller releases it.

        Refused connections are retried for ``connect_retry`` seconds: nothing was sent. A connection
        that breaks before any answer (a pooled keep-alive the restarting upstream just closed) is
        retried only when ``resendable``: the proxy's own handshake, GET and DELETE, which cannot run
        a tool twice. With an auth hook, the hook adds the credentials and may send once more.
        """
        if self._auth is not None:
            return await self._auth.send(self._transmit, method, headers, body, stream=stream, resendable=resendable)
        return await self._transmit(method, headers, body, stream=stream, resendable=resendable)

    async def _transmit(
        self, method: str, headers: Mapping[str, str], body: bytes | None, *, stream: bool, resendable: bool
    ) -> aiohttp.ClientResponse:
        if self._injected_names:
            headers = {k: v for k, v in headers.items() if k.lower() not in self._injected_names} | self._injected
        timeout = self._stream_timeout if stream else self._post_timeout
        give_up = time.monotonic() + self.config.connect_retry
        delay = _FIRST_RETRY_DELAY
        while True:
            try:
                if self._lean is not None:
                    # LeanResponse has the part of ClientResponse the callers use (status, reason,
                    # headers, content_length, content.readany/read/iter_any, release, close).
                    response = await self._lean.request(method, headers, body, read_timeout=timeout.sock_read)
                    return cast("aiohttp.ClientResponse", response)
                return await self._client.request(
                    method, self.config.url, headers=headers, data=body, timeout=timeout, allow_redirects=False
                )
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A refused connection carried nothing, so trying again cannot run anything twice; a
                # restart or deploy usually refuses connections for a moment only.
                retry = isinstance(exc, self._connect_failed) or resendable
                if not retry or time.monotonic() + delay > give_up:
                    raise UpstreamUnavailable(f"upstream MCP server unreachable: {type(exc).__name__}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                raise UpstreamTimeout("upstream MCP server did not answer in time") from exc
            except aiohttp.ClientError as exc:
                raise UpstreamUnavailable(f"upstream MCP server unreachable: {type(exc).__name__}") from exc


async def read_capped(response: aiohttp.ClientResponse, limit: int = INSPECT_LIMIT) -> bytes:
    """Read a response body up to ``limit`` bytes (the rest stays unread)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit:
            chunk = await response.content.read(limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout("upstream MCP server stopped answering mid-body") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"upstream MCP server broke the answer: {type(exc).__name__}") from exc
    return b"".join(chunks)
