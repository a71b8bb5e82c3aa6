"""What goes wrong with a managed login: in ``login`` (one-line messages), at the token endpoint, and in
``serve`` (JSON-RPC errors that say to run ``login``)."""

from __future__ import annotations

from mcp_heal_proxy.errors import ProxyError


class LoginError(Exception):
    """``login`` cannot go on; the message says why in one line (exit status 1)."""


class NoLoginNeeded(LoginError):
    """The upstream answered without a token and publishes no OAuth metadata: nothing to log in to."""


class LoginRequired(ProxyError):
    """The proxy holds no usable token for the upstream: the user must run ``login``.

    Not 401: a client seeing 401 would start an OAuth login of its own against the proxy.
    """

    http_status = 502
    code = -32007


class AuthServerUnavailable(ProxyError):
    """The authorization server could not be reached to refresh the token (try again later)."""

    http_status = 502
    code = -32002


class TokenRefused(Exception):
    """The token endpoint said no (an OAuth error answer)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
