"""The upstream MCP server as the proxy sees it: pooled HTTP clients, errors in MCP terms.

Everything that talks to the upstream goes through ``Upstream.send`` so that transport failures become
``UpstreamUnavailable`` / ``UpstreamTimeout`` / ``UpstreamBusy`` in one place. The client is the
upstream's own ``LeanPool`` (upstream/lean.py), or with ``client = "aiohttp"`` aiohttp's
``ClientSession``, whose responses have the same surface and raise the same exception classes mid-body.

Two pools per upstream, so that long-lived streams never starve requests: GET streams (one per
connected client, open for hours) take connections from a pool of their own (``max_streams``), and
requests (POST, DELETE) from ``pool_size``. Waiting for a free connection is bounded by
``connect_timeout``; a request that gets none in time fails with a JSON-RPC error, never a hang.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, Protocol, cast
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog

from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.errors import (
    InvalidRequest,
    UpstreamBusy,
    UpstreamProxyRefused,
    UpstreamTimeout,
    UpstreamTLSFailed,
    UpstreamUnavailable,
    answer_broken,
    unreachable,
)
from mcp_heal_proxy.upstream.proxy import (
    ProxyCouldNotConnect,
    ProxyRoute,
    ProxyUnreachable,
    TunnelConnector,
    proxy_failure,
    proxy_for,
)
from mcp_heal_proxy.upstream.tls import tls_context, tls_failure

if TYPE_CHECKING:
    from mcp_heal_proxy.auth.managed import Transmit
    from mcp_heal_proxy.upstream.lean import LeanPool

log = structlog.get_logger("mcp_heal_proxy.upstream.client")

# Error and initialize bodies are read whole to be inspected; nothing legitimate is larger.
INSPECT_LIMIT: Final = 256 * 1024
# Backoff between connection attempts while the upstream refuses connections (see connect_retry).
_FIRST_RETRY_DELAY: Final = 0.05
_MAX_RETRY_DELAY: Final = 1.0
# Redirects of the upstream URL followed in a row before giving up (a loop, or a long chain).
_MAX_REDIRECTS: Final = 5
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
# Only a permanent redirect moves the upstream for later requests; 302, 303 and 307 (a maintenance
# page, a load balancer draining) are followed for the one request that got them.
_PERMANENT: Final = frozenset({301, 308})
# Answers of a remembered target to a request without a session (nothing that could have expired) that
# mean it no longer serves MCP: the proxy goes back to the configured URL.
_GONE: Final = frozenset({404, 410})
# Headers of a request body, dropped when a 303 turns the request into a GET.
_BODY_HEADERS: Final = frozenset({"content-type", "content-length", "content-encoding"})


# When the current task's last attempt to send upstream started: the upstream's latency is timed from
# there, not from the first attempt (connect retries while the upstream restarts are not its latency).
# Per task, so concurrent requests never see each other's.
_ATTEMPT_STARTED: ContextVar[float] = ContextVar("upstream_attempt_started", default=0.0)


def attempt_started() -> float:
    """``time.perf_counter()`` at the start of this task's last attempt to send upstream (0.0 before any)."""
    return _ATTEMPT_STARTED.get()


# Headers with credentials chosen again: what a request waiting to be retried sends next (the token
# chosen before the wait may have expired meanwhile). Called with ``final`` False, it may answer None:
# no usable credentials yet (the authorization server is unreachable too, often the same process as
# the restarting upstream), wait a little longer; with ``final`` True it answers or raises.
Reauthorize = Callable[[bool], Awaitable[Mapping[str, str] | None]]


class AuthHook(Protocol):
    """Credentials the proxy itself holds for the upstream (auth/managed.py): wraps each request.

    It calls ``transmit`` with ``reauthorize=``, which the transport calls before each retry.
    """

    async def send(
        self, transmit: Transmit, method: str, headers: Mapping[str, str], body: bytes | None, **options: Any
    ) -> aiohttp.ClientResponse: ...

    async def close(self) -> None:
        """Stop what the hook runs in the background (a refresh)."""


class Upstream:
    """Sends requests to one upstream over its own pooled connections."""

    __slots__ = (
        "_aiohttp_requests",
        "_aiohttp_streams",
        "_auth",
        "_connect_failed",
        "_connect_timeouts",
        "_injected",
        "_injected_names",
        "_lean_requests",
        "_lean_streams",
        "_pool_timeout",
        "_post_timeout",
        "_proxy",
        "_ssl",
        "_stream_timeout",
        "_url",
        "config",
        "on_lasting_failure",
    )

    def __init__(
        self, config: UpstreamConfig, *, strip_client_authorization: bool = False, auth: AuthHook | None = None
    ) -> None:
        self.config = config
        self._auth = auth
        # The URL requests go to: the configured one, or where the upstream redirected it (same origin).
        self._url = config.url
        # Told the cause of a failure no retry can mend, a failed TLS handshake or the outbound proxy's
        # refusal (the status page shows it as the upstream's last failure).
        self.on_lasting_failure: Callable[[str], None] | None = None
        # The outbound proxy every request of this upstream goes through, or None (upstream/proxy.py):
        # chosen once, as redirects stay on the upstream's origin. config.py checked the variables.
        self._proxy: ProxyRoute | None = proxy_for(config.url, config.proxy)
        # One TLS context for every connection of this upstream, both clients (and its OAuth requests,
        # through tls_context): the system's CAs plus ca_file, and the client certificate if any. Not
        # made for an http upstream (redirects stay on its origin): loading the system's CAs takes
        # ~40 ms, which a stdio bridge would pay at every launch.
        self._ssl = tls_context(config) if urlsplit(config.url).scheme == "https" else None
        # ``connect`` bounds the wait for a pooled connection plus the connect itself.
        self._post_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout,
            sock_connect=config.connect_timeout,
            sock_read=config.stream_idle_timeout,
        )
        # Configured headers (e.g. a bearer token from the environment) replace the client's own; the
        # client's Authorization is the proxy's own inbound token when one is set, never the upstream's.
        self._injected = dict(config.headers)
        # A managed login's hook puts its own Authorization in place of the client's (auth/managed.py).
        stripped = {"authorization"} if strip_client_authorization and auth is None else set()
        self._injected_names = frozenset(name.lower() for name in config.headers) | stripped
        self._lean_requests: LeanPool | None = None
        self._lean_streams: LeanPool | None = None
        self._aiohttp_requests: aiohttp.ClientSession | None = None
        self._aiohttp_streams: aiohttp.ClientSession | None = None
        # Failures to open a connection: nothing was sent, so they are always retried. The same three
        # outcomes with either client: refused (502 once connect_retry is over), the connect timed out
        # (an unreachable host: retried alike, 504 once connect_retry is over), no free pooled
        # connection in time (503, not retried: the upstream is busy, not gone).
        self._connect_failed: tuple[type[Exception], ...] = (aiohttp.ClientConnectorError,)
        # aiohttp raises ConnectionTimeoutError for both a connect that timed out and a wait for a pooled
        # connection (see _pool_full); the lean pool has a class for each.
        self._connect_timeouts: tuple[type[Exception], ...] = (aiohttp.ConnectionTimeoutError,)
        self._pool_timeout: type[Exception] | None = None
        if config.client == "lean":
            from mcp_heal_proxy.upstream.lean import ConnectFailed, ConnectTimeout, LeanPool, PoolTimeout

            self._lean_requests, self._lean_streams = (
                LeanPool(
                    config.url,
                    size=size,
                    connect_timeout=config.connect_timeout,
                    idle_lifetime=config.keepalive_idle,
                    acquire_timeout=config.connect_timeout,
                    ssl_context=self._ssl,
                    proxy=self._proxy,
                )
                for size in (config.pool_size, config.max_streams)
            )
            self._connect_failed = (aiohttp.ClientConnectorError, ConnectFailed)
            self._connect_timeouts = (ConnectTimeout, PoolTimeout)
            self._pool_timeout = PoolTimeout
        if self._proxy is not None:
            # The proxy not answering, or unable to reach the upstream: nothing reached the upstream.
            self._connect_failed += (ProxyUnreachable, ProxyCouldNotConnect)

    def _aiohttp(self, stream: bool) -> aiohttp.ClientSession:
        """aiohttp's client for requests or for streams, made on first use (it needs the running loop)."""
        session = self._aiohttp_streams if stream else self._aiohttp_requests
        if session is None:
            limit = self.config.max_streams if stream else self.config.pool_size
            tls = self._ssl if self._ssl is not None else True
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=limit, ssl=tls)
                if self._proxy is None
                else TunnelConnector(self._proxy, limit=limit, ssl=tls),
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
                # The proxy is not a browser: cookies pass through as headers, never stored or merged.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            if stream:
                self._aiohttp_streams = session
            else:
                self._aiohttp_requests = session
        return session

    def connections_in_use(self) -> int:
        """Connections busy with a request or a stream right now (idle pooled ones not counted)."""
        busy = 0
        for pool in (self._lean_requests, self._lean_streams):
            if pool is not None:
                busy += pool.open_connections - pool.idle_connections
        for session in (self._aiohttp_requests, self._aiohttp_streams):
            if session is not None and session.connector is not None:
                busy += len(session.connector._acquired)
        return busy

    async def close(self) -> None:
        """Close this upstream's connections (and stop its auth hook's background work)."""
        if self._auth is not None:
            await self._auth.close()
        for pool in (self._lean_requests, self._lean_streams):
            if pool is not None:
                await pool.close()
        for session in (self._aiohttp_requests, self._aiohttp_streams):
            if session is not None:
                await session.close()

    async def send(
        self,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        stream: bool = False,
        resendable: bool = False,
        patient: bool = True,
        read_timeout: float | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request and return the response once its headers arrived; the caller releases it.

        ``stream`` takes the connection from the streams' pool (a GET stream). Refused connections are
        retried for ``connect_retry`` seconds when ``patient`` (nothing was sent); a connection that
        breaks before any answer (a pooled keep-alive the restarting upstream just closed) is retried
        only when ``resendable``: the proxy's own handshake, GET and DELETE, which cannot run a tool
        twice. ``read_timeout`` overrides the upstream's for this request. Same-origin redirects of the
        upstream URL are followed (the client never sees the upstream's ``Location``): a permanent one
        (301, 308) is remembered for later requests, a temporary one (302, 307; 303 as a GET without the
        body) is followed for this request only. A remembered target that stops serving (unreachable
        before anything was sent, or 404/410 to a request without a session) is forgotten, and the
        request goes to the configured URL instead.
        With an auth hook, the hook adds the credentials and may send once more.
        """
        if self._auth is not None:
            return await self._auth.send(
                self._transmit,
                method,
                headers,
                body,
                stream=stream,
                resendable=resendable,
                patient=patient,
                read_timeout=read_timeout,
            )
        return await self._transmit(
            method, headers, body, stream=stream, resendable=resendable, patient=patient, read_timeout=read_timeout
        )

    async def _transmit(
        self,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        stream: bool,
        resendable: bool,
        patient: bool,
        read_timeout: float | None,
        reauthorize: Reauthorize | None = None,
    ) -> aiohttp.ClientResponse:
        headers = self._outgoing(headers)
        url = self._url
        fell_back = False
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                response = await self._send_patiently(
                    method, headers, body, stream, resendable, patient, read_timeout, url, reauthorize
                )
            except UpstreamUnavailable as exc:
                # Resent elsewhere only when nothing reached the upstream (or resending is harmless).
                nothing_sent = resendable or isinstance(exc.__cause__, self._connect_failed)
                if fell_back or not nothing_sent or not self._fall_back(url, exc.message):
                    raise
                url, fell_back = self._url, True
                continue
            if (
                response.status in _GONE
                and not fell_back
                and not any(name.lower() == "mcp-session-id" for name in headers)
                and self._fall_back(url, f"it answered {response.status}")
            ):
                response.release()
                url, fell_back = self._url, True
                continue
            if response.status not in _REDIRECTS:
                return response
            url, method, body, headers = self._follow(response, url, method, body, headers)
        raise UpstreamUnavailable(f"upstream MCP server redirected more than {_MAX_REDIRECTS} times in a row")

    def _outgoing(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The headers with the configured ones in place of the client's."""
        if self._injected_names:
            return {k: v for k, v in headers.items() if k.lower() not in self._injected_names} | self._injected
        return headers

    def _follow(
        self, response: aiohttp.ClientResponse, url: str, method: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[str, str, bytes | None, Mapping[str, str]]:
        """Where a same-origin redirect sends this request (its target, method, body and headers), after
        remembering it if it is permanent; a redirect to another origin is refused with an error."""
        location = response.headers.get("Location")
        response.release()
        target = urljoin(url, location) if location else None
        here, there = urlsplit(url), urlsplit(target or "")
        if target is None or (here.scheme, here.netloc) != (there.scheme, there.netloc):
            # Another origin: the user should configure it (a token for one host must not travel to another).
            log.warning(
                "upstream.redirect_refused",
                upstream=self.config.name,
                status=response.status,
                to=mask_url(target) if target else None,
            )
            raise UpstreamUnavailable(
                f"upstream MCP server answered {response.status} with a redirect to another origin; "
                "set the upstream URL to the address it names (see the proxy's log)"
            )
        if response.status in _PERMANENT:
            log.warning(
                "upstream.redirected",
                upstream=self.config.name,
                status=response.status,
                to=mask_url(target),
                hint="requests now go there; set it as the upstream URL to save the redirect",
            )
            self._retarget(target)
        else:
            log.info(
                "upstream.redirect_followed", upstream=self.config.name, status=response.status, to=mask_url(target)
            )
        if response.status == 303 and method != "GET":
            # See Other: the answer is fetched with a GET; the body was delivered already, never sent again.
            method, body = "GET", None
            headers = {name: value for name, value in headers.items() if name.lower() not in _BODY_HEADERS}
        return target, method, body, headers

    def _fall_back(self, url: str, why: str) -> bool:
        """A remembered redirect target that stopped serving: go back to the configured URL (and say so).
        False when ``url`` is not a remembered target (nothing to fall back from)."""
        if url != self._url or url == self.config.url:
            return False
        log.warning(
            "upstream.redirect_forgotten",
            upstream=self.config.name,
            remembered=mask_url(url),
            configured=mask_url(self.config.url),
            reason=why,
            hint="requests go to the configured URL again",
        )
        self._retarget(self.config.url)
        return True

    def _retarget(self, url: str) -> None:
        self._url = url
        for pool in (self._lean_requests, self._lean_streams):
            if pool is not None:
                pool.retarget(url)

    async def _send_patiently(
        self,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None,
        stream: bool,
        resendable: bool,
        patient: bool,
        read_timeout: float | None,
        url: str,
        reauthorize: Reauthorize | None = None,
    ) -> aiohttp.ClientResponse:
        timeout = self._stream_timeout if stream else self._post_timeout
        if read_timeout is not None:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=timeout.connect, sock_connect=timeout.sock_connect, sock_read=read_timeout
            )
        give_up = time.monotonic() + (self.config.connect_retry if patient else 0.0)
        # Made on the first retry only: nearly every request succeeds at once (hot path).
        backoff: Backoff | None = None
        lean = self._lean_streams if stream else self._lean_requests
        while True:
            _ATTEMPT_STARTED.set(time.perf_counter())
            try:
                try:
                    if lean is not None:
                        # LeanResponse has the part of ClientResponse the callers use (status, reason,
                        # headers, content_length, content.readany/read/iter_any, release, close).
                        response = await lean.request(
                            method, headers, body, read_timeout=timeout.sock_read, url=None if url == self._url else url
                        )
                        return cast("aiohttp.ClientResponse", response)
                    return await self._aiohttp(stream).request(
                        method, url, headers=headers, data=body, timeout=timeout, allow_redirects=False
                    )
                except aiohttp.ClientError as exc:
                    # A failed TLS handshake or the proxy's refusal is answered at once (a ProxyError,
                    # which the clauses below let through): no retry makes a refused certificate trusted.
                    failure = self._lasting_failure(exc, url)
                    if failure is not None:
                        raise failure from exc
                    raise
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A refused connection carried nothing, so trying again cannot run anything twice; a
                # restart or deploy usually refuses connections for a moment only.
                connect_failed = isinstance(exc, self._connect_failed)
                if backoff is None:
                    backoff = Backoff(first=_FIRST_RETRY_DELAY, maximum=_MAX_RETRY_DELAY)
                delay = backoff.next_delay()
                if not (connect_failed or resendable) or time.monotonic() + delay > give_up:
                    raise unreachable(exc) from exc
                await asyncio.sleep(delay)
                if reauthorize is not None:
                    # The wait (a restart) can outlast the access token chosen before it.
                    headers = await self._reauthorized(reauthorize, backoff, give_up)
            except self._connect_timeouts as exc:
                if self._pool_full(exc, stream):
                    raise UpstreamBusy(self._busy_message(stream)) from exc
                # The connect itself timed out (an unreachable host): nothing was sent, so it is a connect
                # failure like a refused one, and retried alike.
                if backoff is None:
                    backoff = Backoff(first=_FIRST_RETRY_DELAY, maximum=_MAX_RETRY_DELAY)
                delay = backoff.next_delay()
                if time.monotonic() + delay > give_up:
                    raise UpstreamTimeout(
                        "cannot reach the upstream MCP server: no connection within connect_timeout "
                        f"({self.config.connect_timeout:g} s)",
                        failure="timeout",
                    ) from exc
                await asyncio.sleep(delay)
                if reauthorize is not None:
                    # The wait (a restart) can outlast the access token chosen before it.
                    headers = await self._reauthorized(reauthorize, backoff, give_up)
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                raise UpstreamTimeout("upstream MCP server did not answer in time", failure="timeout") from exc
            except aiohttp.ClientError as exc:
                raise unreachable(exc) from exc
            except ValueError as exc:
                # A header the client sent that cannot travel (a line break): the request's own fault.
                raise InvalidRequest(f"request cannot be forwarded: {exc}") from exc

    def _lasting_failure(self, exc: aiohttp.ClientError, url: str) -> UpstreamUnavailable | None:
        """The client's error for a failure no retry can mend (a refused certificate or handshake, the
        proxy's 407 or 403), logged and told to the status page; None for any other failure."""
        parts = urlsplit(url)
        why = tls_failure(exc, parts.hostname or "")
        failure: UpstreamUnavailable
        if why is not None:
            # The host only: a URL's query may carry a key.
            log.warning("upstream.tls_failed", upstream=self.config.name, host=parts.netloc, error=why)
            failure = UpstreamTLSFailed(f"cannot reach the upstream MCP server: {why}", failure="tls")
        else:
            why = proxy_failure(exc)
            if why is None:
                return None
            log.warning("upstream.proxy_refused", upstream=self.config.name, host=parts.netloc, error=why)
            failure = UpstreamProxyRefused(f"cannot reach the upstream MCP server: {why}", failure="proxy")
        if self.on_lasting_failure is not None:
            self.on_lasting_failure(failure.message)
        return failure

    def _pool_full(self, exc: Exception, stream: bool) -> bool:
        """Whether a connect timeout was the wait for a pooled connection (every one busy), not the connect."""
        if self._pool_timeout is not None:
            return isinstance(exc, self._pool_timeout)
        connector = self._aiohttp(stream).connector
        # The request's own connection attempt is no longer counted once it failed: the others fill
        # the pool only when none was free for it.
        return connector is not None and 0 < connector.limit <= len(connector._acquired)

    async def _reauthorized(self, reauthorize: Reauthorize, backoff: Backoff, give_up: float) -> Mapping[str, str]:
        """The headers of the next attempt, with credentials chosen now; waits (as for a refused
        connection, until ``give_up``) while there are none to be had."""
        while True:
            delay = backoff.next_delay()
            headers = await reauthorize(time.monotonic() + delay > give_up)
            if headers is not None:
                return self._outgoing(headers)
            await asyncio.sleep(delay)

    def _busy_message(self, stream: bool) -> str:
        pool, size = ("max_streams", self.config.max_streams) if stream else ("pool_size", self.config.pool_size)
        return (
            f"no connection to the upstream MCP server within {self.config.connect_timeout:g} s "
            f"(all {pool} = {size} in use, or the upstream is not accepting connections); try again"
        )


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
        raise answer_broken(exc) from exc
    return b"".join(chunks)
