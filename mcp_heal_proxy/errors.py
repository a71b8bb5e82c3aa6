"""The proxy's own failures, each with the HTTP status and JSON-RPC code the client receives.

One place (``proxy.error_response``) turns these into answers, so every failure reaches the client as a
JSON-RPC error carrying its request's id, never as a hang or a dropped connection.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass
from typing import ClassVar

RequestId = str | int | None


class ProxyError(Exception):
    """Base of every error the proxy answers on its own."""

    http_status: ClassVar[int] = 500
    code: ClassVar[int] = -32603
    # Whether the error says what the upstream did (could not be reached, timed out, broke an answer,
    # failed a heal): the status page and the request log count it against the upstream's health. The
    # proxy's refusals of a client's request (400, 404, 413, 415, 429) and its store's failures do not.
    about_upstream: ClassVar[bool] = False
    # Whether every attempt would fail the same way (a refused certificate, the outbound proxy's 407):
    # loops that retry (a GET stream's reattach) stop at once.
    lasting: ClassVar[bool] = False

    def __init__(self, message: str, *, request_id: RequestId = None, failure: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Known only when the failure happened while classifying a single message.
        self.request_id = request_id
        # What happened on the way to the upstream (a Failure.kind: refused, timeout, dns, tls, ...)
        # when nothing answered: the log and the status page say so instead of naming an HTTP status.
        self.failure = failure


class ParseError(ProxyError):
    """The body is not JSON (or not UTF-8)."""

    http_status = 400
    code = -32700


class InvalidRequest(ProxyError):
    """The body is JSON but not a valid JSON-RPC message, or the HTTP request is malformed."""

    http_status = 400
    code = -32600


class UnsupportedMediaType(ProxyError):
    """The POST is not ``application/json``."""

    http_status = 415
    code = -32600


class BodyTooLarge(ProxyError):
    """The POST body exceeds the configured limit."""

    http_status = 413
    code = -32600


class UnknownSession(ProxyError):
    """The client sent a session id this proxy never issued (or has forgotten).

    404 is what the MCP spec tells a client to answer with a fresh ``initialize``.
    """

    http_status = 404
    code = -32001


class UpstreamUnavailable(ProxyError):
    """The upstream refused the connection or broke it before answering."""

    http_status = 502
    code = -32002
    about_upstream = True


class UpstreamTLSFailed(UpstreamUnavailable):
    """The TLS handshake with the upstream failed: the message names the cause and the fix. Answered at
    once, not retried: a certificate that is refused now is refused on every attempt."""

    lasting = True


class UpstreamProxyRefused(UpstreamUnavailable):
    """The outbound proxy refused to connect to the upstream for good (407: credentials; 403: its
    policy): the message names the proxy (masked) and the fix. Answered at once, not retried."""

    lasting = True


class UpstreamTimeout(ProxyError):
    """The upstream did not connect or answer in time."""

    http_status = 504
    code = -32002
    about_upstream = True


class AnswerTooLarge(UpstreamUnavailable):
    """The upstream's answer is over ``max_body_bytes`` where the proxy must hold it whole (the stdio
    bridge writes each message as one line)."""


class UpstreamBusy(ProxyError):
    """No connection to the upstream could be had in time (every pooled connection in use)."""

    http_status = 503
    code = -32002
    about_upstream = True


class HealFailed(ProxyError):
    """The upstream session expired and re-initializing it did not succeed."""

    http_status = 502
    code = -32003
    about_upstream = True


class StoreUnavailable(ProxyError):
    """The session store failed (disk full, read-only, Redis down): refuse rather than guess a mapping."""

    http_status = 503
    code = -32005


class TooManyStreams(ProxyError):
    """A session already holds the configured number of streaming answers."""

    http_status = 429
    code = -32006


@dataclass(frozen=True, slots=True)
class Failure:
    """What went wrong on a connection, for people: ``kind`` is one word for logs and the status page
    (refused, timeout, dns, tls, proxy, unreachable, closed, reset, broken, failed), ``words`` a short phrase
    that completes "cannot reach the upstream MCP server: ..." or "... broke its answer: ..." (never an
    exception's class name)."""

    kind: str
    words: str


def _causes(exc: BaseException) -> list[BaseException]:
    # An aiohttp error wraps the OSError it met (os_error, or __cause__ when raised "from"); the lean
    # client's ConnectFailed wraps it as __cause__.
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        nested = getattr(current, "os_error", None)
        if isinstance(nested, BaseException) and nested not in chain:
            chain.append(nested)
        current = current.__cause__ or current.__context__
    return chain


def connection_failure(exc: BaseException) -> Failure:
    """Name a failure to reach a server, or to read its answer, in words a user understands."""
    import aiohttp  # here, not at the top: the CLI imports this module before it needs aiohttp

    # Classes newer aiohttp releases added; older ones raise the stdlib error they wrap.
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", socket.gaierror)
    reset_error = getattr(aiohttp, "ClientConnectionResetError", ConnectionResetError)
    from mcp_heal_proxy.upstream.proxy import ProxyCouldNotConnect, ProxyRefused, ProxyUnreachable

    chain = _causes(exc)
    for cause in chain:
        # The outbound proxy's own failures carry their words (its URL masked): before the causes
        # below, which would name the proxy's refused socket as the upstream's.
        if isinstance(cause, ProxyUnreachable | ProxyCouldNotConnect) and cause.strerror:
            return Failure("proxy", cause.strerror)
        if isinstance(cause, ProxyRefused):
            return Failure("proxy", str(cause))
        # aiohttp's (the OAuth requests'): the proxy's URL is not at hand here, and not needed.
        if isinstance(cause, aiohttp.ClientHttpProxyError):
            return Failure("proxy", f"the outbound proxy refused the connection ({cause.status} {cause.message})")
        if isinstance(cause, aiohttp.ClientProxyConnectionError):
            return Failure("proxy", f"cannot connect to the outbound proxy: {cause.os_error.strerror or 'failed'}")
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or "not trusted"
            return Failure("tls", f"TLS certificate not accepted: {detail}")
    for cause in chain:
        if isinstance(cause, ssl.SSLError | aiohttp.ClientSSLError):
            return Failure("tls", "TLS handshake failed")
    for cause in chain:
        if isinstance(cause, socket.gaierror | dns_error):
            return Failure("dns", "host name not found in DNS")
    for cause in chain:
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return Failure("refused", "connection refused: nothing listens at that address")
    for cause in chain:
        if getattr(cause, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return Failure("unreachable", "network or host unreachable")
    for cause in chain:
        if isinstance(cause, TimeoutError | aiohttp.ServerTimeoutError | aiohttp.ConnectionTimeoutError):
            return Failure("timeout", "timed out")
    for cause in chain:
        if isinstance(cause, aiohttp.ServerDisconnectedError):
            return Failure("closed", "connection closed by the server")
        if isinstance(cause, ConnectionResetError | BrokenPipeError | reset_error):
            return Failure("reset", "connection reset")
        if isinstance(cause, aiohttp.ClientPayloadError):
            return Failure("broken", "answer cut off before its end")
    for cause in chain:
        if isinstance(cause, OSError) and cause.strerror:
            return Failure("failed", f"connection failed: {cause.strerror.lower()}")
    return Failure("failed", "connection failed")


def store_failure(exc: BaseException) -> str:
    """Name a Redis store failure in words (never its class name): what the connection did, or what
    Redis answered; completes "Redis ... failed: "."""
    kind = type(exc).__name__
    if kind.startswith("Authentication"):
        return "it refused the credentials"
    if kind in ("ResponseError", "DataError", "ReadOnlyError", "NoPermissionError", "OutOfMemoryError"):
        first_line = str(exc).splitlines()[0] if str(exc) else kind
        return f"it answered an error: {first_line[:200]}"
    return connection_failure(exc).words


def unreachable(exc: BaseException) -> UpstreamUnavailable:
    """The client's error when the upstream could not be reached: what happened, in words."""
    failure = connection_failure(exc)
    if failure.kind in _AFTER_CONNECTING:
        # It was reached: it ended the connection before its answer came.
        return UpstreamUnavailable(
            f"upstream MCP server ended the connection before answering: {failure.words}", failure=failure.kind
        )
    return UpstreamUnavailable(f"cannot reach the upstream MCP server: {failure.words}", failure=failure.kind)


# Failures that happen on a connection that was open (the server was reached).
_AFTER_CONNECTING = frozenset({"closed", "reset", "broken"})


def answer_broken(exc: BaseException) -> UpstreamUnavailable:
    """The client's error when the upstream broke an answer it had started."""
    failure = connection_failure(exc)
    return UpstreamUnavailable(f"upstream MCP server broke its answer: {failure.words}", failure=failure.kind)


def unexpected_failure(exc: BaseException) -> UpstreamUnavailable:
    """The client's error for a failure no branch of the proxy foresaw (its log has the traceback): a
    connection's failure said in words, anything else without naming the proxy's internals."""
    if isinstance(exc, OSError) or type(exc).__module__.startswith("aiohttp"):
        return unreachable(exc)
    return UpstreamUnavailable("the proxy failed on this request; its log (stderr) has the details")
