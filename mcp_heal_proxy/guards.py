"""Middlewares that stand in front of every handler: errors as JSON-RPC, Origin, inbound token.

- Router errors (unknown path, unsupported method) become JSON-RPC error bodies with the same status.
- Origin validation (DNS rebinding): a present Origin that is neither a localhost origin nor configured
  gets 403, as the MCP spec asks of local servers.
- An optional inbound bearer token, compared in constant time; 401 without it. Health probes stay open
  so that container and load-balancer checks need no secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from mcp_heal_proxy import jsonrpc
from mcp_heal_proxy.config import is_status_path

LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})


def json_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON-RPC error body (id null: the request was refused before it was read)."""
    body = jsonrpc.error_body((None,), code, message, is_batch=False)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


@web.middleware
async def router_errors_as_jsonrpc(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and methods get JSON-RPC bodies a client can parse, never an HTML page."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return json_error(405, jsonrpc.INVALID_REQUEST, f"method {request.method} not allowed", {"Allow": allowed})
    except web.HTTPNotFound:
        return json_error(404, jsonrpc.METHOD_NOT_FOUND, f"no MCP endpoint at {request.path}")


def origin_is_allowed(origin: str, allowed: frozenset[str]) -> bool:
    """Localhost origins, and the configured ones, may talk to the proxy."""
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.hostname in LOCAL_HOSTS


def origin_guard(allowed_origins: Iterable[str]) -> Middleware:
    """Refuse requests whose Origin is foreign (a web page trying DNS rebinding)."""
    allowed = frozenset(allowed_origins)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not origin_is_allowed(origin, allowed):
            return json_error(403, jsonrpc.INVALID_REQUEST, "Origin not allowed")
        return await handler(request)

    return guard


def token_guard(token: str) -> Middleware:
    """Require ``Authorization: Bearer <token>`` on everything but health probes and the status page."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The status page checks the token itself: a browser brings it as a cookie (status.py).
        if request.path not in OPEN_PATHS and not is_status_path(request.path):
            presented = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(presented, expected):
                return json_error(
                    401, jsonrpc.INVALID_REQUEST, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
                )
        return await handler(request)

    return guard
