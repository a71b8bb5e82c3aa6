"""Outbound HTTP proxies: which one a request to the upstream (or its authorization server) goes through,
how the lean client opens a tunnel through it, and what its refusals mean.

Which proxy. The upstream's ``proxy`` key (``[server] proxy`` when the upstream sets none) sends every
request of that upstream through that proxy, its OAuth requests included; ``proxy = ""`` sends them
direct whatever the environment says. With no key, the standard environment decides per request URL:
``https_proxy``/``HTTPS_PROXY`` for https URLs, ``http_proxy``/``HTTP_PROXY`` for http ones (the lower
case name first, as curl reads them), unless ``no_proxy``/``NO_PROXY`` names the host. A proxy URL is
``http://[USER:PASSWORD@]HOST[:PORT]``; the user and password go to the proxy as ``Proxy-Authorization:
Basic`` and are masked (display.mask_url) wherever the URL is shown.

How. The lean client opens every connection with ``CONNECT host:port``, for http upstreams as for https
ones, and then speaks to the upstream through the tunnel (TLS inside it for https, verified against the
upstream's host name): the proxy's refusal, or its failure to reach the upstream (a restart), is then
the answer to the CONNECT, told apart from anything the upstream says, so a restart is retried exactly
as a refused direct connection is (nothing was sent), and a pooled tunnel is reused as a direct
connection is. aiohttp's client (``client = "aiohttp"``) opens its connections the same way
(``TunnelConnector``). The OAuth requests use aiohttp's own proxy support (CONNECT for https,
absolute-form requests for http), which picks the proxy per request URL (NO_PROXY is per host).

Refusals. 407 (credentials wanted or wrong; some proxies answer 401) and 403 (the proxy's policy) to a
CONNECT will be the same on every attempt: ``ProxyRefused``, answered at once. Any other non-2xx answer to a CONNECT means the proxy
could not reach the upstream (502, 503, 504): ``ProxyCouldNotConnect``, retried as a refused connection.
A proxy that cannot be reached is ``ProxyUnreachable``, retried too (it may be restarting).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any, Final

import aiohttp
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from mcp_heal_proxy.upstream.routes import PROXY_VARIABLES, ProxyRoute, proxy_for, refusal_words

__all__ = [
    "ProxyCouldNotConnect",
    "ProxyRefused",
    "ProxyRoute",
    "ProxyUnreachable",
    "TunnelConnector",
    "aiohttp_middlewares",
    "oauth_client",
    "open_tunnel",
    "proxy_failure",
    "proxy_for",
]

# The longest answer head a proxy may send to a CONNECT.
_MAX_HEAD: Final = 64 * 1024
# Answers to a CONNECT that will not change however often it is tried again (some proxies, tinyproxy
# among them, answer wrong credentials with 401 rather than 407).
_LASTING: Final = frozenset({401, 403, 407})


# --- refusals -----------------------------------------------------------------------------------------


class ProxyUnreachable(aiohttp.ClientOSError):
    """No connection to the proxy itself could be opened (refused, unknown host, unreachable)."""


class ProxyCouldNotConnect(aiohttp.ClientOSError):
    """The proxy answered the CONNECT with an error other than 403/407: it could not reach the upstream
    (down, restarting). Nothing reached the upstream, so it is retried as a refused connection."""


class ProxyRefused(aiohttp.ClientConnectionError):
    """The proxy refused the CONNECT for good (407: credentials; 403: its policy). Not an OSError: never
    retried as the network being down is."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def proxy_failure(exc: BaseException) -> str | None:
    """What a lasting refusal by the proxy means (407, 403), in words with the fix; None if ``exc`` is
    not one (both upstream clients open their tunnels with ``open_tunnel``, which raises ``ProxyRefused``)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, ProxyRefused):
            return str(current)
        current = current.__cause__
    return None


# --- the lean client's tunnel -------------------------------------------------------------------------


class _ConnectAnswer(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT (its head; a refusal's body is not wanted)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0:
            if end + 4 < len(self._buffer) and self._buffer[9:10] == b"2":
                # Bytes after a 2xx head would be the upstream's, before anything was asked of it.
                self.head.set_exception(ConnectionError("it sent bytes after its answer"))
                return
            self.head.set_result(bytes(self._buffer[:end]))
        elif len(self._buffer) > _MAX_HEAD:
            self.head.set_exception(ConnectionError("its answer is not HTTP"))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(exc or ConnectionResetError("it closed the connection before answering"))


async def open_tunnel(loop: asyncio.AbstractEventLoop, route: ProxyRoute, host: str, port: int) -> asyncio.Transport:
    """A connection to ``host:port`` through the proxy (plain bytes: the caller starts TLS on it for an
    https upstream, and sets its own protocol). Raises ``ProxyUnreachable``, ``ProxyRefused`` or
    ``ProxyCouldNotConnect``; the caller bounds the time."""
    try:
        transport, answer = await loop.create_connection(lambda: _ConnectAnswer(loop), route.host, route.port)
    except OSError as exc:
        # asyncio says "Connect call failed (...)": the errno's own words say what happened.
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ProxyUnreachable(
            exc.errno, f"cannot connect to the outbound proxy {route.shown} ({route.source}): {reason}"
        ) from exc
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if route.authorization is not None:
        lines += f"Proxy-Authorization: {route.authorization}\r\n"
    try:
        transport.write(f"{lines}\r\n".encode())
        head = await answer.head
    except BaseException as exc:
        transport.close()
        if isinstance(exc, OSError):
            raise ProxyUnreachable(
                exc.errno, f"the outbound proxy {route.shown} failed the CONNECT: {exc.strerror or exc}"
            ) from exc
        raise
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        transport.close()
        raise ProxyUnreachable(None, f"the outbound proxy {route.shown} does not speak HTTP: {status_line[:80]!r}")
    status = int(code)
    if 200 <= status < 300:
        # TCP_NODELAY is set on the socket by the protocol that takes the tunnel over.
        return transport
    transport.close()
    if status in _LASTING:
        raise ProxyRefused(refusal_words(route, status, reason), status)
    raise ProxyCouldNotConnect(
        None, f"the outbound proxy {route.shown} could not reach {authority} ({status} {reason})".rstrip()
    )


# --- aiohttp -----------------------------------------------------------------------------------------


class TunnelConnector(aiohttp.TCPConnector):
    """aiohttp's connector with every connection opened through the proxy's CONNECT tunnel (for http
    upstreams too, as the lean client does), then TLS inside it for https by aiohttp's own code. Leans on
    aiohttp internals (``_create_connection``, ``_factory``, ``_start_tls_connection``) that are stable
    across the 3.x releases the project pins; .ci/run tests them on the lowest."""

    def __init__(self, route: ProxyRoute, **options: Any) -> None:
        super().__init__(**options)
        self._route = route

    async def _create_connection(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> ResponseHandler:
        async with asyncio.timeout(timeout.sock_connect):
            raw = await open_tunnel(self._loop, self._route, req.host, req.port or (443 if req.is_ssl() else 80))
        if req.is_ssl():
            _, protocol = await self._start_tls_connection(raw, req, timeout)
            return protocol
        protocol = self._factory()
        raw.set_protocol(protocol)
        protocol.connection_made(raw)
        return protocol


def oauth_client(tls: ssl.SSLContext, configured: str | None, **options: Any) -> aiohttp.ClientSession:
    """An aiohttp client for the OAuth requests of an upstream with these TLS settings and proxy key:
    each request goes through the proxy ``proxy_for`` picks for its URL. Through a proxy, connections are
    not reused: a proxy may close a client's connection after any answer (tinyproxy does), and a POST to
    a token endpoint cannot be sent again; OAuth requests are few (a login, a refresh an hour)."""
    middlewares = aiohttp_middlewares(configured)
    connector = aiohttp.TCPConnector(ssl=tls, force_close=bool(middlewares))
    return aiohttp.ClientSession(connector=connector, middlewares=middlewares, **options)


def aiohttp_middlewares(configured: str | None) -> tuple[aiohttp.ClientMiddlewareType, ...]:
    """Client middlewares that route an aiohttp session's requests (the OAuth requests: discovery,
    registration, token, revocation) through the proxy ``proxy_for`` picks for each request's URL; none
    when no proxy is configured or in the environment (the session then goes direct as before)."""
    if configured == "" or (configured is None and not any(os.environ.get(name) for name in PROXY_VARIABLES)):
        return ()

    async def route(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        chosen = proxy_for(str(request.url), configured)
        if chosen is not None and request.proxy is None:
            request.update_proxy(URL(chosen.url), None, None)
        return await handler(request)

    return (route,)
