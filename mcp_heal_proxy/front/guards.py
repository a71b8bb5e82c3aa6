"""The middleware in front of every handler (one, for the cost of one per request): errors as JSON-RPC,
Origin, inbound token; and CORS.

- Router errors (unknown path, unsupported method) become JSON-RPC error bodies with the same status.
- Origin validation (DNS rebinding): a present Origin that is neither a localhost origin nor configured
  gets 403, as the MCP spec asks of local servers.
- An optional inbound bearer token, compared in constant time; 401 without it. Health probes stay open
  so that container and load-balancer checks need no secret.
- CORS for browser-based clients on allowed Origins: preflights answered on the MCP paths, and every
  answer to an allowed Origin says so and exposes Mcp-Session-Id (a browser hides it otherwise).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from mcp_heal_proxy.config import is_status_path
from mcp_heal_proxy.constant_time import same_secret
from mcp_heal_proxy.wire import jsonrpc
from mcp_heal_proxy.wire.headers import LAST_EVENT_ID, MCP_PROTOCOL_VERSION, MCP_SESSION_ID
from mcp_heal_proxy.wire.responses import json_error

LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})


def origin_is_allowed(origin: str, allowed: frozenset[str]) -> bool:
    """Localhost origins, and the configured ones, may talk to the proxy."""
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.hostname in LOCAL_HOSTS


def origin_policy(allowed_origins: Iterable[str]) -> Callable[[str], bool]:
    """origin_is_allowed for one configuration, remembered per Origin: a browser client sends the same
    one on every request (bounded, since any page can send any Origin)."""
    allowed = frozenset(allowed_origins)

    @functools.lru_cache(maxsize=256)
    def allows(origin: str) -> bool:
        return origin_is_allowed(origin, allowed)

    return allows


# Told of every request the front door refuses (its status), so that refusals are logged and counted like
# the requests the handlers answer.
Refused = Callable[[web.Request, int], None]


def _not_recorded(request: web.Request, status: int) -> None:
    """The default for a front door built without a recorder (tests of the guards alone)."""


def front_door(
    allowed_origins: Iterable[str],
    token: str | None,
    refused: Refused = _not_recorded,
    endpoints: Iterable[str] = (),
) -> Middleware:
    """The one middleware in front of every handler (one per request, not one per concern):

    - a foreign Origin (a web page trying DNS rebinding) gets 403;
    - with a ``token``, ``Authorization: Bearer <token>`` is required on everything but health probes,
      CORS preflights and the status page, compared in constant time; 401 without it;
    - unknown paths and methods get JSON-RPC bodies a client can parse, never an HTML page; an unknown
      path's answer lists the MCP ``endpoints`` served (a trailing slash or a typo is then plain to see).

    In that order: a refused request learns nothing about which paths exist.
    """
    allows = origin_policy(allowed_origins)
    expected = f"Bearer {token}".encode() if token else None
    served = ", ".join(sorted(endpoints))
    not_here = f" (MCP endpoints here: {served})" if served else ""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not allows(origin):
            refused(request, 403)
            return json_error(403, jsonrpc.INVALID_REQUEST, "Origin not allowed")
        # Browsers never send credentials on a CORS preflight, and answering one reaches no upstream. The
        # status page checks the token itself: a browser brings it as a cookie (status.py).
        if (
            expected is not None
            and request.path not in OPEN_PATHS
            and request.method != "OPTIONS"
            and not is_status_path(request.path)
        ):
            presented = request.headers.get("Authorization", "")
            if not same_secret(presented, expected):
                refused(request, 401)
                return json_error(
                    401, jsonrpc.INVALID_REQUEST, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
                )
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return json_error(405, jsonrpc.INVALID_REQUEST, f"method {request.method} not allowed", {"Allow": allowed})
        except web.HTTPNotFound:
            return json_error(404, jsonrpc.METHOD_NOT_FOUND, f"no MCP endpoint at {request.path}{not_here}")

    return guard


# ---- CORS ---------------------------------------------------------------------------------------------

CORS_ALLOW_METHODS: Final = "GET, POST, DELETE, OPTIONS"
# What a Streamable HTTP client sends; a preflight may ask for more (see Cors.preflight).
CORS_ALLOW_HEADERS: Final = (
    "Content-Type",
    "Accept",
    "Authorization",
    MCP_SESSION_ID,
    MCP_PROTOCOL_VERSION,
    LAST_EVENT_ID,
)
# Response headers a browser client must be able to read: its session id, the negotiated version, and
# the challenge of a 401.
CORS_EXPOSE_HEADERS: Final = f"{MCP_SESSION_ID}, {MCP_PROTOCOL_VERSION}, WWW-Authenticate"
# Chrome caps a cached preflight at 2 hours; one preflight per origin and header set until then.
CORS_MAX_AGE: Final = "7200"
# Requested headers never allowed through: the proxy or the browser owns them, or they are hop-by-hop.
_NOT_REQUESTABLE: Final = frozenset(
    {
        "host",
        "origin",
        "cookie",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_MAX_REQUESTED_HEADERS: Final = 32
_ALWAYS_ALLOWED: Final = frozenset(name.lower() for name in CORS_ALLOW_HEADERS)


class Cors:
    """CORS for allowed Origins (localhost ones and ``allowed_origins``); foreign ones never get here
    (front_door answers 403 first)."""

    def __init__(self, allowed_origins: Iterable[str]) -> None:
        self._allows = origin_policy(allowed_origins)

    async def preflight(self, request: web.Request) -> web.Response:
        """OPTIONS on an MCP path: 204 with what a browser needs to send the real request."""
        headers = {"Allow": CORS_ALLOW_METHODS}
        origin = request.headers.get("Origin")
        if origin is not None and "Access-Control-Request-Method" in request.headers:
            headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
            headers["Access-Control-Allow-Headers"] = ", ".join(
                (*CORS_ALLOW_HEADERS, *_extra_headers(request.headers.get("Access-Control-Request-Headers", "")))
            )
            headers["Access-Control-Max-Age"] = CORS_MAX_AGE
            headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
            if request.headers.get("Access-Control-Request-Private-Network") == "true":
                # Chrome's Private Network Access: a page on a public origin the user allowed may reach
                # this proxy on loopback.
                headers["Access-Control-Allow-Private-Network"] = "true"
        return web.Response(status=204, headers=headers)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Mark every answer to an allowed Origin as readable by it (before its headers are sent).

        Hot path: a client without an Origin header (every non-browser client) costs one lookup.
        """
        origin = request.headers.get("Origin")
        if origin is None or not self._allows(origin):
            return
        headers = response.headers
        if request.method != "OPTIONS":
            # The proxy's policy, not the upstream's: an upstream's own Access-Control-* headers (e.g.
            # "Allow-Origin: *" beside ours) would make the browser refuse the answer.
            for name in [name for name in headers if name.lower().startswith("access-control-")]:
                headers.popall(name)
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        # The answer depends on the Origin: no cache may give it to another one.
        vary = headers.get("Vary")
        if vary is None:
            headers["Vary"] = "Origin"
        elif "origin" not in vary.lower():
            headers["Vary"] = f"{vary}, Origin"


def _extra_headers(requested: str) -> list[str]:
    """Requested header names beyond the MCP ones that may be allowed: valid names, not owned by the
    proxy or the browser, and a bounded number of them (a preflight is unauthenticated)."""
    extra: list[str] = []
    for raw in requested.split(",")[:_MAX_REQUESTED_HEADERS]:
        name = raw.strip()
        lowered = name.lower()
        if (
            _HEADER_NAME.fullmatch(name)
            and lowered not in _ALWAYS_ALLOWED
            and lowered not in _NOT_REQUESTABLE
            and not lowered.startswith(("sec-", "proxy-", "access-control-"))
            and name not in extra
        ):
            extra.append(name)
    return extra
