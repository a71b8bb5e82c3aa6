"""The proxy's own failures, each with the HTTP status and JSON-RPC code the client receives.

One place (``proxy.error_response``) turns these into answers, so every failure reaches the client as a
JSON-RPC error carrying its request's id, never as a hang or a dropped connection.
"""

from __future__ import annotations

from typing import ClassVar

RequestId = str | int | None


class ProxyError(Exception):
    """Base of every error the proxy answers on its own."""

    http_status: ClassVar[int] = 500
    code: ClassVar[int] = -32603

    def __init__(self, message: str, *, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.message = message
        # Known only when the failure happened while classifying a single message.
        self.request_id = request_id


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


class UpstreamTimeout(ProxyError):
    """The upstream did not connect or answer in time."""

    http_status = 504
    code = -32002


class AnswerTooLarge(UpstreamUnavailable):
    """The upstream's answer is over ``max_body_bytes`` where the proxy must hold it whole (the stdio
    bridge writes each message as one line)."""


class UpstreamBusy(ProxyError):
    """No connection to the upstream could be had in time (every pooled connection in use)."""

    http_status = 503
    code = -32002


class HealFailed(ProxyError):
    """The upstream session expired and re-initializing it did not succeed."""

    http_status = 502
    code = -32003


class StoreUnavailable(ProxyError):
    """The session store failed (disk full, read-only, Redis down): refuse rather than guess a mapping."""

    http_status = 503
    code = -32005


class TooManyStreams(ProxyError):
    """A session already holds the configured number of streaming answers."""

    http_status = 429
    code = -32006
