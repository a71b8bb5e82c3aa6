"""The proxy's own HTTP/1.1 server for its hot path: POSTs to an MCP endpoint. Everything else is aiohttp's.

Why a server of its own: aiohttp's costs about 100 µs of CPU per request on the benchmark machine (its
request and response objects, router, middleware, signals, keep-alive bookkeeping), as much as the whole
fixture upstream; parsing with httptools (llhttp, as the lean upstream client does) and writing each
answer straight to the transport costs about 20 (docs/benchmarks.md, round 3).

It serves a request only when it can serve it exactly as aiohttp would: a POST to an MCP path, HTTP/1.1,
a body of known length within the limit, no ``Origin`` (browser clients get CORS from aiohttp), no
``Expect``, no upgrade, a head aiohttp accepts (within its size limits, with a ``Host``, no header twice
that it allows once), and the proxy's token when one is set. Any other request (the status page,
metrics, OAuth routes, GET streams, DELETE, preflights, refusals, malformed requests) is handed to
aiohttp with its connection: aiohttp gets the request's raw bytes from its first one and keeps the
connection from then on. So only what both servers answer alike ever takes this path.

What aiohttp does for a connection this server keeps too: one request at a time (pipelined ones wait
their turn, and reading pauses when too many wait), the handler cancelled when the client hangs up,
writes that wait while the client reads slowly (and the next request until it read the last answer),
idle keep-alive connections closed after ``KEEPALIVE_TIMEOUT`` (aiohttp's), and a graceful stop with
the rest of the app (it registers its connections with aiohttp's server, whose shutdown waits for them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import hmac
import http
import inspect
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, NoReturn, cast

import httptools
import structlog
from aiohttp import hdrs, web

# aiohttp's set of headers a request may not carry twice. No public name holds it (http_parser's __all__
# leaves it out), and a copy here would drift from the parser that refuses such requests; imported, a
# release that renames it fails at import, loudly, and one that changes it is followed. Guarded by
# tests/test_http1.py::test_a_head_aiohttp_refuses_is_refused_by_the_proxy_not_sent_upstream.
from aiohttp.http_parser import SINGLETON_HEADERS
from aiohttp.web import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy, istr

from mcp_heal_proxy.front.exchange import HeaderPairs

if TYPE_CHECKING:
    from mcp_heal_proxy.auth.standin import OAuthPassThrough
    from mcp_heal_proxy.front.http import Proxy

log = structlog.get_logger("mcp_heal_proxy.front.http1")

# aiohttp's server as the proxy runs it (its defaults): how long an idle keep-alive connection is kept, and
# the limits on a request's head beyond which it refuses the request (400).
_AIOHTTP_DEFAULTS: Final = inspect.signature(RequestHandler).parameters
KEEPALIVE_TIMEOUT: Final[float] = _AIOHTTP_DEFAULTS["keepalive_timeout"].default
_MAX_LINE: Final[int] = _AIOHTTP_DEFAULTS["max_line_size"].default  # the URL
_MAX_FIELD: Final[int] = _AIOHTTP_DEFAULTS["max_field_size"].default  # a header's name and value together
_MAX_HEADERS: Final[int] = _AIOHTTP_DEFAULTS["max_headers"].default
# Headers aiohttp refuses to see twice in a request (Host among them: it is also required, see below).
_SINGLETONS: Final = frozenset(name.encode() for name in SINGLETON_HEADERS) | {b"host"}
# A head still incomplete after this many bytes goes to aiohttp (which refuses it once a line is over its
# limits), instead of growing here without bound.
_MAX_HEAD: Final = 64 * 1024
# Pipelined requests waiting behind the one being answered; beyond this, reading pauses.
MAX_WAITING: Final = 8
_HEAD_END: Final = b"\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_LINE_BREAK: Final = b"\r\n"
# aiohttp's answer to a handler's unforeseen exception (web_protocol.RequestHandler.handle_error).
_INTERNAL_ERROR: Final = b"500 Internal Server Error\n\nServer got itself in trouble"
# Answers that never have a body, nor a Content-Length or chunked framing (RFC 9110 8.6, 9112 6.1).
_NO_BODY: Final = frozenset({204, 304})
# Request headers that send a POST to aiohttp: a browser's (CORS), a body framed by chunks (the raw bytes
# of the next request could not be found again for a handover), an expectation to answer first, one that
# aiohttp refuses outright, a compressed body (aiohttp decodes it).
_AIOHTTP_HEADERS: Final = (b"origin", b"transfer-encoding", b"expect", b"sec-websocket-key1", b"content-encoding")


# Header names as aiohttp's parser gives them: the ones it knows in their canonical spelling ("content-type"
# from a client that lowercases becomes "Content-Type"), others as sent. The proxy's code sets headers by
# their canonical names (e.g. the heal's Content-Type) and relies on that spelling to replace a client's.
_KNOWN_NAMES: Final = {str(name).lower().encode(): name for name in vars(hdrs).values() if isinstance(name, istr)}
# Raw names seen, decoded: clients send the same few on every request (bounded: the client chooses them).
_NAMES_REMEMBERED: Final = 1024
_names: dict[bytes, str] = {}


def _header_name(raw: bytes) -> str:
    name = _names.get(raw)
    if name is None:
        name = _KNOWN_NAMES.get(raw.lower()) or raw.decode("utf-8", "surrogateescape")
        if len(_names) < _NAMES_REMEMBERED:
            _names[raw] = name
    return name


class FastPath:
    """What the server needs of the app: its MCP endpoints, the inbound token, the body limit, and the
    OAuth pass-through (its challenges are rewritten on both servers by the same rule)."""

    def __init__(
        self,
        proxies: Mapping[str, Proxy],
        *,
        token: str | None,
        max_body_bytes: int,
        oauth: OAuthPassThrough | None,
    ) -> None:
        self.proxies = {path.encode(): proxy for path, proxy in proxies.items()}
        self.authorization = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.oauth = oauth


class _ToAiohttp(Exception):
    """Raised in a parser callback: this request is aiohttp's (llhttp stops at once)."""


class _HttpDate:
    """The Date header, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def __call__(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True)
        return self._value


_date = _HttpDate()


def _reason(status: int, reason: str | None) -> str:
    if reason:
        return reason
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class FastExchange:
    """One POST on this server, and its answer written straight to the connection."""

    __slots__ = (
        "_bodiless",
        "_chunked",
        "_connection",
        "_held",
        "body",
        "ended",
        "headers",
        "keep_alive",
        "path",
        "proxy",
        "status",
    )

    method: Final = "POST"

    def __init__(self, connection: FastConnection, proxy: Proxy, path: str, headers: CIMultiDictProxy[str]) -> None:
        self._connection = connection
        self.proxy = proxy
        self.path = path
        self.headers = headers
        self.body = b""
        self.keep_alive = True
        self.status: int | None = None
        self.ended = False
        self._held = b""
        self._bodiless = False
        self._chunked = True

    async def read_body(self, limit: int) -> bytes:
        # Read whole before the handler started; its length was checked against the limit already.
        return self.body

    async def answer(self, status: int, body: bytes, headers: HeaderPairs = (), reason: str | None = None) -> None:
        self.status = status
        self.ended = True
        if status in _NO_BODY:
            self._connection.write(self._head(status, reason, headers, ""))
            return
        self._connection.write(self._head(status, reason, headers, f"Content-Length: {len(body)}\r\n") + body)

    async def start(
        self, status: int, reason: str | None, headers: HeaderPairs, *, hold: bool = False, length: int | None = None
    ) -> None:
        self.status = status
        self._bodiless = status in _NO_BODY
        self._chunked = not self._bodiless and length is None
        if self._bodiless:
            framing = ""
        elif length is not None:
            framing = f"Content-Length: {length}\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n"
        head = self._head(status, reason, headers, framing)
        if hold:
            self._held = head
        else:
            await self._connection.send(head)

    async def write(self, data: bytes) -> None:
        if not data or self._bodiless:
            return
        framed = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
        if self._held:
            framed, self._held = self._held + framed, b""
        await self._connection.send(framed)

    async def end(self, tail: bytes = b"") -> None:
        if self._bodiless:
            last = b""
        elif not self._chunked:
            last = tail
        elif tail:
            last = b"%x\r\n%b\r\n%b" % (len(tail), tail, _LAST_CHUNK)
        else:
            last = _LAST_CHUNK
        if self._held:
            last, self._held = self._held + last, b""
        self.ended = True
        await self._connection.send(last)

    def abort(self) -> None:
        self.keep_alive = False
        self._held = b""
        self._connection.abort()

    def _head(self, status: int, reason: str | None, headers: HeaderPairs, framing: str) -> bytes:
        """Status line and headers (the upstream's, already without hop-by-hop ones, Date and Server)."""
        oauth = self._connection.fast.oauth
        if oauth is not None and status in (401, 403):
            headers = self._rewrite_challenge(oauth, status, list(headers))
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
        keep_alive = "" if self.keep_alive else "Connection: close\r\n"
        head = f"HTTP/1.1 {status} {_reason(status, reason)}\r\n{lines}Date: {_date()}\r\n{framing}{keep_alive}\r\n"
        return head.encode("utf-8", "surrogateescape")

    def _rewrite_challenge(
        self, oauth: OAuthPassThrough, status: int, headers: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        challenge = next((value for name, value in headers if name.lower() == "www-authenticate"), None)
        connection = self._connection
        rewritten = oauth.challenge_to_send(
            self.path,
            lambda: oauth.origin_of(connection.remote, "http", self.headers.get("Host"), self.headers),
            status,
            challenge,
        )
        if rewritten is None:
            return headers
        return [(n, v) for n, v in headers if n.lower() != "www-authenticate"] + [("WWW-Authenticate", rewritten)]


class FastConnection(asyncio.Protocol):
    """One client connection: POSTs to MCP endpoints answered here, the first other request handed (with
    the connection) to aiohttp."""

    def __init__(self, fast: FastPath, aiohttp_server: web.Server) -> None:
        self.fast = fast
        self._aiohttp = aiohttp_server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        # Raw bytes from the start of the request being parsed: handed to aiohttp if the request is its.
        self._raw = bytearray()
        self._consumed = 0  # bytes of _raw that belong to requests already parsed
        self._handover: bytearray | None = None  # raw bytes for aiohttp, once a request is its
        # The request being parsed.
        self._url = b""
        self._header_pairs: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._parsing: FastExchange | None = None
        # The request being answered, and those waiting behind it.
        self._task: asyncio.Task[None] | None = None
        self._waiting: collections.deque[FastExchange] = collections.deque()
        self._reading_paused = False
        self._closing = False  # no more requests: closed when the one being answered is done
        self._lost = False
        self._writable: asyncio.Future[None] | None = None  # set while the transport's buffer is full
        self._idle_since = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None
        # aiohttp's server learns of this connection too: its shutdown (the app's graceful stop) waits
        # for the request being answered here as for its own. Its connection_lost reads the private
        # ``_task_handler`` of each connection it knows (to forget it once its request ends); aiohttp has
        # no public way to put a connection of another protocol under its graceful stop, and waiting
        # for these connections apart would stop them before the app's on_shutdown instead of with
        # aiohttp's. Guarded by tests/test_shutdown.py::
        # test_sigterm_refuses_new_requests_lets_calls_finish_and_flushes_the_store (a call on this server).
        self._task_handler: asyncio.Task[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self._aiohttp.connection_made(self._as_handler(), self._transport)
        self._keepalive = self._loop.call_later(KEEPALIVE_TIMEOUT, self._close_if_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._aiohttp.connection_lost(self._as_handler(), exc)
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._task is not None:
            self._task.cancel()  # as aiohttp with handler_cancellation: the client left
        self._waiting.clear()
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("the client closed the connection"))
            self._writable.exception()  # retrieved: nobody may be waiting for it

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after Connection: close, or while the app stops: no new request is read
        if self._handover is not None:
            self._handover += data  # arrived before reading paused; aiohttp gets it with the rest
            return
        raw = self._raw
        raw += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            # _ToAiohttp raised in a callback arrives as this (llhttp stops there); anything else is a bug.
            if self._handover is None:
                raise  # a bug of ours in a callback: let asyncio report it and close the connection
        except httptools.HttpParserError:
            if self._closing:
                return  # bytes after a request with Connection: close: dropped, as aiohttp does
            # Malformed: aiohttp answers it (400) as it always did, from the request's first byte.
            self._handover = bytearray(raw[self._consumed :])
        if self._handover is None and self._parsing is None and len(raw) - self._consumed > _MAX_HEAD:
            if self._closing:
                return
            # A head this long is aiohttp's, to refuse once a line is over its limits (or to serve).
            self._handover = bytearray(raw[self._consumed :])
        if self._handover is not None:
            self._pause_reading()
            self._raw = bytearray()
            self._consumed = 0
            if self._task is None:
                self._hand_over()
        elif self._consumed:
            del raw[: self._consumed]
            self._consumed = 0

    def eof_received(self) -> bool:
        return False  # as aiohttp's: a half-closed connection is closed

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # --- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._header_pairs = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_pairs.append((name, value))

    def on_headers_complete(self) -> None:
        """Decide whose request this is, before any of its body is read."""
        parser = self._parser
        path = self._url.partition(b"?")[0]
        proxy = self.fast.proxies.get(path)
        if (
            proxy is None
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
        ):
            self._to_aiohttp()
        pairs = self._header_pairs
        if len(self._url) > _MAX_LINE or len(pairs) > _MAX_HEADERS:
            self._to_aiohttp()  # over aiohttp's limits: refused there (400)
        fast = self.fast
        content_length = 0
        authorization: bytes | None = None
        singletons: set[bytes] = set()
        decoded: list[tuple[str, str]] = []
        for name, raw_value in pairs:
            if len(name) + len(raw_value) > _MAX_FIELD:
                self._to_aiohttp()
            lowered = name.lower()
            if lowered in _SINGLETONS:
                if lowered in singletons:
                    self._to_aiohttp()  # a second Host, Content-Type, ...: refused there
                singletons.add(lowered)
            # llhttp drops the whitespace before a value, not after it; aiohttp drops both.
            value = raw_value.rstrip(b" \t")
            if lowered in _AIOHTTP_HEADERS:
                self._to_aiohttp()
            elif lowered == b"content-length":
                content_length = int(value)  # llhttp already refused a malformed one
            elif lowered == b"authorization" and authorization is None:
                authorization = value  # the first, as aiohttp's headers.get gives it
            decoded.append((_header_name(name), value.decode("utf-8", "surrogateescape")))
        if b"host" not in singletons:
            self._to_aiohttp()  # an HTTP/1.1 request without Host: refused there (400)
        if content_length > fast.max_body_bytes:
            self._to_aiohttp()  # refused there, as before (413 with a JSON-RPC body)
        if fast.authorization is not None and not hmac.compare_digest(authorization or b"", fast.authorization):
            self._to_aiohttp()  # refused, logged and counted there
        headers = CIMultiDictProxy(CIMultiDict(decoded))
        self._parsing = FastExchange(self, proxy, path.decode("utf-8", "surrogateescape"), headers)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        self._parsing = None
        body = self._body
        exchange.body = body[0] if len(body) == 1 else b"".join(body)
        exchange.keep_alive = self._parser.should_keep_alive()
        # Where the next request starts in the raw bytes: after this one's head and body. Empty lines
        # before a request line are allowed; a head that does not end with CRLF CRLF (a lenient parse)
        # leaves the next start unknown, so the connection ends after this answer.
        raw = self._raw
        start = self._consumed
        # llhttp skips any CR and LF before a request line, not only whole CRLFs.
        while start < len(raw) and raw[start] in _LINE_BREAK:
            start += 1
        head_end = raw.find(_HEAD_END, start)
        if head_end < 0:
            exchange.keep_alive = False
        else:
            self._consumed = head_end + len(_HEAD_END) + len(exchange.body)
        if not exchange.keep_alive:
            self._closing = True
        if self._task is None:
            self._answer(exchange)
        else:
            self._waiting.append(exchange)
            if len(self._waiting) >= MAX_WAITING:
                self._pause_reading()

    def _to_aiohttp(self) -> NoReturn:
        """This request is aiohttp's: remember its raw bytes and stop parsing."""
        self._handover = bytearray(self._raw[self._consumed :])
        raise _ToAiohttp

    # --- answering ----------------------------------------------------------------------------------

    def _answer(self, exchange: FastExchange) -> None:
        self._task = self._task_handler = self._loop.create_task(self._run(exchange))

    async def _run(self, exchange: FastExchange) -> None:
        try:
            await exchange.proxy.handle_post(exchange)
            if self._writable is not None:
                # As aiohttp's server after each answer: the next request waits until the client has read
                # this one, so that a client reading none does not pile its answers up in memory here.
                with contextlib.suppress(ConnectionError):
                    await asyncio.shield(self._writable)
        except asyncio.CancelledError:
            self._close()
            raise
        except Exception:
            # Proxy._handle answers every failure it foresees; this is one it did not.
            log.exception("request.unhandled_error", path=exchange.path)
            if exchange.status is None:
                exchange.keep_alive = False  # as aiohttp's 500, which closes the connection and says so
                await exchange.answer(500, _INTERNAL_ERROR, [("Content-Type", "text/plain; charset=utf-8")])
            self._close()
            return
        finally:
            self._task = self._task_handler = None
        if not exchange.ended or not exchange.keep_alive:
            # An answer that did not end (the client left, the upstream broke it mid-stream) leaves the
            # connection in no state for another request; nor is one wanted after Connection: close.
            self._close()
            return
        self._idle_since = time.monotonic()
        if self._waiting:
            self._answer(self._waiting.popleft())
            if self._reading_paused and len(self._waiting) < MAX_WAITING // 2 and self._handover is None:
                self._resume_reading()
        elif self._closing:
            self._close()  # before a handover too: a connection told to close serves no further request
        elif self._handover is not None:
            self._hand_over()

    def write(self, data: bytes) -> None:
        """Write without waiting (a whole answer: at most the limit of a JSON answer)."""
        if not self._lost and self._transport is not None:
            self._transport.write(data)

    async def send(self, data: bytes) -> None:
        """Write part of a stream; wait while the client reads slower than the upstream writes."""
        if self._lost or self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)
        if self._writable is not None:
            await asyncio.shield(self._writable)

    # --- the connection -----------------------------------------------------------------------------

    def _hand_over(self) -> None:
        """Give the connection to aiohttp, with the raw bytes of its first request."""
        transport = self._transport
        data = self._handover
        assert transport is not None
        assert data is not None
        if self._lost:
            return
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._aiohttp.connection_lost(self._as_handler(), None)
        handler: RequestHandler = self._aiohttp()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._writable is not None:
            handler.pause_writing()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        handler.data_received(bytes(data))

    def _close_if_idle(self) -> None:
        """The keep-alive timer: one per connection, moved along instead of made per request."""
        if self._lost or self._handover is not None:
            return
        if self._task is not None:
            self._keepalive = self._loop.call_later(KEEPALIVE_TIMEOUT, self._close_if_idle)
            return
        left = self._idle_since + KEEPALIVE_TIMEOUT - time.monotonic()
        if left <= 0:
            self._close()
            return
        self._keepalive = self._loop.call_later(left, self._close_if_idle)

    def abort(self) -> None:
        """End the connection at once, mid-answer: the client sees an answer cut short, not a whole one."""
        self._closing = True
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None and not self._lost:
            self._transport.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = False
            self._transport.resume_reading()

    # --- aiohttp's server, for the app's graceful stop ----------------------------------------------

    def _as_handler(self) -> RequestHandler:
        # aiohttp's server keeps its connections' RequestHandlers; this connection speaks the three
        # methods it calls on them (close, shutdown, and _task_handler on connection_lost).
        return cast("RequestHandler", self)

    def close(self) -> None:
        """The app stops: no new request; the connection closes once the one being answered is done."""
        self._closing = True
        self._waiting.clear()
        if self._task is None:
            self._close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """The app stops: let the request being answered finish, then cancel it.

        As long as aiohttp lets one of its own run: it waits ``timeout``, cancels the request's body
        (which a proxy handler has read already) and waits ``timeout`` again before it cancels the
        handler; serve() gives it half the shutdown grace for that reason.
        """
        self.close()
        task = self._task
        if task is not None:
            try:
                async with asyncio.timeout(None if timeout is None else 2 * timeout):
                    await asyncio.shield(task)
            except (asyncio.CancelledError, TimeoutError, Exception):
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            if not task.done():
                task.cancel()
                # Bounded: a handler that ignores its cancellation does not hold the stop.
                await asyncio.wait([task], timeout=1.0)
        self._close()


class FastSite(web.BaseSite):
    """A TCP site whose connections start on the proxy's own server (the runner's app behind it)."""

    __slots__ = ("_fast", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, fast: Callable[[], FastPath]) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._fast = fast

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None, "the runner is set up before its sites start"
        fast = self._fast()
        # backlog: TCPSite's default, so that a burst of new clients queues as it did with aiohttp's site.
        self._server = await loop.create_server(
            lambda: FastConnection(fast, server), self._host, self._port, backlog=128
        )
