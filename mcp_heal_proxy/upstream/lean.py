"""A lean HTTP/1.1 client for one upstream: a keep-alive pool on ``asyncio.Protocol``, parsed by llhttp.

``Upstream.send`` uses it instead of aiohttp's ``ClientSession`` when an upstream sets
``client = "lean"``. It does the one thing the proxy needs, no more: send a request to one origin in a
single ``transport.write`` (head and body), and hand back the response once its head arrived, with a
body reader that pauses the socket when the consumer falls behind (an SSE stream is never buffered
whole). No redirects, cookies, compression, auth from the URL, or HEAD requests. Through an outbound
proxy, each connection is a CONNECT tunnel opened once (upstream/proxy.py), then used exactly as a
direct one: requests cost the same, and without a proxy nothing about proxies is on their path.

Errors. Opening a connection fails with ``ConnectFailed`` (nothing was sent, so ``Upstream.send``
retries it like aiohttp's ``ClientConnectorError``), ``ConnectTimeout``, or ``HandshakeFailed`` (the handshake
failed: a certificate refused, or one the server wants; also when the server refuses the handshake only
as it reads the request, as TLS 1.3 servers do for a missing client certificate); a connection that breaks
before the response head fails with ``Disconnected`` (an ``aiohttp.ServerDisconnectedError``); a head
that is not HTTP fails with ``BadResponse``. Body reads raise aiohttp's own classes: a timeout is an
``aiohttp.ServerTimeoutError`` (also a ``TimeoutError``), a broken body an ``aiohttp.ClientPayloadError``,
a closed response an ``aiohttp.ClientConnectionError``. So every ``except aiohttp.ClientError`` /
``except (TimeoutError, aiohttp.ServerTimeoutError)`` written for aiohttp's responses still applies.

A connection goes back to the pool only when its response ended as HTTP framed it (Content-Length,
chunked, or no body) and both sides allow keep-alive; otherwise it is closed. Releasing or closing a
response whose body is unread closes its connection. A cancelled read leaves the response readable (the
proxy's keep-alive tick cancels reads on purpose); a cancelled wait for the head closes the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Final, cast
from urllib.parse import urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.upstream.proxy import ProxyRoute, open_tunnel
from mcp_heal_proxy.upstream.tls import HandshakeFailed, client_context, is_refusal

# Buffered body bytes above which the socket stops being read, and below which it resumes.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
# Idle pooled connections older than this are closed instead of reused: servers close idle keep-alive
# connections after a few seconds (uvicorn after 5), and a request sent on one they just closed is lost.
# The default suits such servers; an upstream behind nginx (75 s) can set keepalive_idle higher and save
# a TLS handshake per call spaced further apart.
IDLE_LIFETIME: Final = 4.0
# Statuses that never have a body (RFC 9110 section 6.4.1).
_NO_BODY: Final = frozenset({204, 304})


class ConnectFailed(aiohttp.ClientOSError):
    """No connection could be opened (refused, unreachable, unknown host): nothing was sent."""


class ConnectTimeout(aiohttp.ServerTimeoutError):
    """Opening a connection took longer than the connect timeout."""


class PoolTimeout(aiohttp.ConnectionTimeoutError):
    """Every connection stayed busy for longer than the acquire timeout (nothing was sent)."""


class Disconnected(aiohttp.ServerDisconnectedError):
    """The connection closed or broke before the response head was complete."""


class BadResponse(aiohttp.ClientPayloadError):
    """The upstream's bytes are not an HTTP/1.x response."""


class LeanBody:
    """A response body as it arrives: ``readany``, ``read``, ``read_nowait``, ``at_eof`` and ``iter_any``
    like aiohttp's StreamReader."""

    __slots__ = ("_chunks", "_conn", "_eof", "_exc", "_last_data", "_loop", "_read_timeout", "_size", "_waiter")

    def __init__(self, conn: _Connection, read_timeout: float | None, loop: asyncio.AbstractEventLoop) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The connection while the body is still arriving; None once it ended (or broke).
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self._loop = loop
        # The read timeout counts silence on the socket, not time between reads: a read cancelled by
        # the caller's own timer (the SSE keep-alive tick) must not restart it.
        self._last_data = loop.time()

    @property
    def done(self) -> bool:
        """Whether no more bytes will arrive (the body ended, broke, or was given up)."""
        return self._eof or self._exc is not None

    # --- fed by the connection --------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._last_data = self._loop.time()
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._conn = None
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self._exc = exc
        self._conn = None
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        """What the next read raises (as aiohttp's ``StreamReader.set_exception``); the connection stays
        with the body, for the response's ``close`` that follows."""
        if self.done:
            return
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self) -> None:
        conn = self._conn
        self._fail(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
        if conn is not None:
            conn.close()

    # --- read by the consumer ---------------------------------------------------------------------

    def _take(self, limit: int) -> bytes:
        chunks = self._chunks
        if limit < 0 or self._size <= limit:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
        else:
            parts: list[bytes] = []
            wanted = limit
            while wanted:
                chunk = chunks[0]
                if len(chunk) <= wanted:
                    parts.append(chunks.popleft())
                    wanted -= len(chunk)
                else:
                    parts.append(chunk[:wanted])
                    chunks[0] = chunk[wanted:]
                    wanted = 0
            data = b"".join(parts)
        self._size -= len(data)
        conn = self._conn
        if conn is not None and conn.paused and self._size < LOW_WATER:
            conn.resume_reading()
        return data

    async def _wait(self) -> None:
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timeout = self._read_timeout
        timer = loop.call_at(self._last_data + timeout, self._timed_out) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def readany(self) -> bytes:
        """Whatever arrived (waiting for something), or ``b""`` at the end of the body."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        return self._take(-1)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes as soon as some arrived; with ``n < 0``, the whole rest of the body."""
        if n >= 0:
            while not self._chunks:
                if self._exc is not None:
                    raise self._exc
                if self._eof or n == 0:
                    return b""
                await self._wait()
            return self._take(n)
        while not self.done:
            # The whole body is wanted: reading must not stay paused at the high-water mark, where nothing
            # is taken (and so nothing resumes it) until the body is done.
            conn = self._conn
            if conn is not None and conn.paused:
                conn.resume_reading()
            await self._wait()
        if self._exc is not None:
            raise self._exc
        return self._take(-1)

    def read_nowait(self) -> bytes:
        """Whatever arrived and was not read yet, without waiting (``b""`` if nothing; unlike aiohttp's,
        a broken body is not raised here but by the next read)."""
        if not self._chunks:
            return b""
        return self._take(-1)

    def at_eof(self) -> bool:
        """Whether the body ended and everything in it was read (as aiohttp's ``StreamReader.at_eof``)."""
        return self._eof and not self._chunks

    def iter_any(self) -> _ChunkIterator:
        """``async for chunk in body.iter_any()``: chunks as they arrive, until the end."""
        return _ChunkIterator(self)


class _ChunkIterator:
    __slots__ = ("_body",)

    def __init__(self, body: LeanBody) -> None:
        self._body = body

    def __aiter__(self) -> _ChunkIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._body.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk


class LeanResponse:
    """The part of ``aiohttp.ClientResponse`` the proxy uses."""

    __slots__ = ("content", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: CIMultiDictProxy[str], content: LeanBody) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    @property
    def closed(self) -> bool:
        """Whether no more of the body will arrive (ended, broken, or closed)."""
        return self.content.done

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        """Done with this response: an unfinished body closes its connection (a finished one is pooled)."""
        self.close()

    def close(self) -> None:
        """Stop now: a reader still waiting gets ``aiohttp.ClientConnectionError``."""
        body = self.content
        conn = body._conn
        if conn is None:
            return
        body._fail(aiohttp.ClientConnectionError("Connection closed"))
        conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its response parsed by llhttp."""

    def __init__(self, pool: LeanPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self._busy = False
        self._head: asyncio.Future[LeanResponse] | None = None
        self._read_timeout: float | None = None
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._informational = False
        self._framed = False
        self._keep_alive = False
        self._body: LeanBody | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            # Bytes nobody asked for (or after a response ended): this connection cannot be trusted.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(BadResponse(f"invalid HTTP response from the upstream: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost finishes the response

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if not self._busy:
            return
        self._busy = False
        head = self._head
        if head is not None and not head.done():
            if is_refusal(exc):
                # A TLS 1.3 server checks the client's certificate after the client's side of the
                # handshake is done: its refusal arrives as the answer to the request.
                failure: Exception = HandshakeFailed(f"TLS with the upstream failed: {exc}")
                failure.__cause__ = exc
            else:
                failure = Disconnected("upstream closed the connection before answering")
            head.set_exception(failure)
            return
        body = self._body
        if body is None or body.done:
            return
        if exc is None and not self._framed:
            body._feed_eof()  # a body delimited by the connection's close
        else:
            body._fail(aiohttp.ClientPayloadError("Response payload is not completed"))

    def pause_writing(self) -> None:  # request bodies are small: nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head is None and not self._informational:
            raise BadResponse("upstream sent a second response to one request")
        self._reason = b""
        self._raw_headers = []

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._informational = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        self._framed = (
            "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "") or status in _NO_BODY
        )
        self._keep_alive = self._parser.should_keep_alive()
        body = LeanBody(self, self._read_timeout, self._pool.loop)
        self._body = body
        head = self._head
        self._head = None
        if head is not None and not head.done():
            head.set_result(LeanResponse(status, self._reason.decode("utf-8", "surrogateescape"), headers, body))

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body._feed(data)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        body = self._body
        self._body = None
        self._busy = False
        if body is not None:
            body._feed_eof()
        if self._keep_alive and not self.closed:
            if self.paused:
                self.resume_reading()
            self._pool._put_back(self)
        else:
            self.close()

    # --- used by the pool and the body ------------------------------------------------------------

    async def request(self, head: bytes, read_timeout: float | None) -> LeanResponse:
        """Send one request and wait for its response head (at most ``read_timeout`` of silence)."""
        assert self.transport is not None
        loop = self._pool.loop
        waiter: asyncio.Future[LeanResponse] = loop.create_future()
        self._head = waiter
        self._busy = True
        self._read_timeout = read_timeout
        self._informational = False
        self.transport.write(head)
        timer = loop.call_later(read_timeout, self._head_timed_out, waiter) if read_timeout is not None else None
        try:
            return await waiter
        except BaseException:
            # Cancelled or failed while the answer may still come: nobody can use this connection now.
            self.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _head_timed_out(self, waiter: asyncio.Future[LeanResponse]) -> None:
        if not waiter.done():
            waiter.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))

    def _broken(self, exc: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self._body is not None:
            self._body._fail(exc)
        self.close()

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection (a response still arriving on it ends broken, see connection_lost)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._forget()

    def _forget(self) -> None:
        if not self.closed:
            self.closed = True
            self._pool._gone(self)


class LeanPool:
    """Keep-alive connections to one upstream URL, at most ``size`` open at a time."""

    def __init__(
        self,
        url: str,
        *,
        size: int,
        connect_timeout: float | None,
        idle_lifetime: float = IDLE_LIFETIME,
        acquire_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        proxy: ProxyRoute | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {mask_url(url)!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("the lean client does not take credentials from the URL: use headers")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        if parts.port is not None and parts.port != (443 if self._https else 80):
            host = f"{host}:{parts.port}"
        self._host_header = host
        self._line_rest = ""
        self.retarget(url)
        self._size = size
        self._connect_timeout = connect_timeout
        # How long a request may wait for a free connection when all ``size`` are busy; None waits on.
        self._acquire_timeout = acquire_timeout
        self._idle_lifetime = idle_lifetime
        # The system's trust unless the upstream's settings give a context (its ca_file, client_cert).
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl_context if ssl_context is not None else client_context(None, None, None)
        # Connections go through this proxy's CONNECT tunnels (only opening one differs).
        self._proxy = proxy
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def retarget(self, url: str) -> None:
        """Send later requests to another path and query of the same origin (a permanent redirect)."""
        self._line_rest = self._line_rest_for(url)

    def _line_rest_for(self, url: str) -> str:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return f" {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the pool's connections live on (the first one it was used from)."""
        assert self._loop is not None
        return self._loop

    @property
    def open_connections(self) -> int:
        """Connections open or opening (idle ones included)."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(1 for conn in self._idle if not conn.closed)

    def encode(self, method: str, headers: Mapping[str, str], body: bytes | None, url: str | None = None) -> bytes:
        """The request as bytes: request line, Host, the given headers, Content-Length, body. ``url``, of
        the same origin, names another path for this request only (a temporary redirect)."""
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # One check for the whole block: every line ends in exactly one CRLF, nothing else breaks it.
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a request header contains a line break")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines += f"Content-Length: {len(body) if body is not None else 0}\r\n"
        # surrogateescape: the server side decoded header bytes that are not UTF-8 (latin-1 from Node's
        # fetch) to surrogates; this gives the upstream the very bytes the client sent.
        line_rest = self._line_rest if url is None else self._line_rest_for(url)
        head = f"{method}{line_rest}{lines}\r\n".encode("utf-8", "surrogateescape")
        return head + body if body else head

    async def request(
        self,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        read_timeout: float | None,
        url: str | None = None,
    ) -> LeanResponse:
        """Send a request (to ``url`` of the same origin for this request only, if given); return its
        response once the head arrived. The caller releases it."""
        head = self.encode(method, headers, body, url)
        conn = await self._acquire()
        return await conn.request(head, read_timeout)

    async def _acquire(self) -> _Connection:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        # Only the wait for a busy pool counts against the acquire timeout (a connect has its own).
        deadline = None if self._acquire_timeout is None else self._loop.time() + self._acquire_timeout
        while True:
            if self._closed:
                raise aiohttp.ClientConnectionError("the upstream client is closed")
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if conn.closed:
                    continue
                if now - conn.idle_since > self._idle_lifetime:
                    conn.close()
                    continue
                return conn
            if self._open < self._size:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise PoolTimeout(f"no free connection among {self._size} within {self._acquire_timeout:g} s") from None
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn this waiter was given on to the next one
                raise

    async def _connect(self) -> _Connection:
        if self._proxy is not None:
            return await self._connect_through(self._proxy)
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"connecting to {self._host}:{self._port} timed out") from exc
        except (ssl.SSLError, ssl.CertificateError) as exc:
            # Before OSError: ssl.SSLError is one, but no retry can make a certificate trusted. A
            # handshake the server merely cut off (a restart) is a failed connect, retried as one.
            if is_refusal(exc):
                raise HandshakeFailed(f"TLS handshake with {self._host}:{self._port} failed: {exc}") from exc
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port}: TLS handshake cut off") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        # uvloop calls connection_made soon after, not before, create_connection returns.
        conn.transport = transport
        return conn

    async def _connect_through(self, proxy: ProxyRoute) -> _Connection:
        """A connection through the proxy's tunnel: TLS inside it for https, checked against the upstream's
        host name. The proxy's own failures raise upstream/proxy.py's classes."""
        conn = _Connection(self)
        raw: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                raw = await open_tunnel(self.loop, proxy, self._host, self._port)
                if self._ssl is None:
                    raw.set_protocol(conn)
                    conn.connection_made(raw)
                    return conn
                transport = await self.loop.start_tls(raw, conn, self._ssl, server_hostname=self._host)
        except TimeoutError as exc:
            if raw is not None:
                raw.close()
            raise ConnectTimeout(
                f"connecting to {self._host}:{self._port} through the outbound proxy {proxy.shown} timed out"
            ) from exc
        except (ssl.SSLError, ssl.CertificateError) as exc:
            if raw is not None:
                raw.close()
            if is_refusal(exc):
                raise HandshakeFailed(f"TLS handshake with {self._host}:{self._port} failed: {exc}") from exc
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port}: TLS handshake cut off") from exc
        except aiohttp.ClientError:  # the proxy's own failures, named by open_tunnel
            raise
        except OSError as exc:
            if raw is not None:
                raw.close()
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port} through {proxy.shown}: {exc}") from exc
        except BaseException:
            if raw is not None:
                raw.close()
            raise
        # start_tls does not call connection_made on the protocol it hands the TLS transport to.
        assert transport is not None
        conn.connection_made(transport)
        return conn

    def _put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake_one()

    def _gone(self, conn: _Connection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close idle connections now, and busy ones as their responses end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        # Let the transports finish closing before the loop may stop.
        await asyncio.sleep(0)
