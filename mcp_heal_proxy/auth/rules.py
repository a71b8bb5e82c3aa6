"""The discovery rules of a managed login, as small pure functions (MCP authorization spec 2025-11-25,
with the 2025-03-26 fallbacks): where to look for metadata, which scopes to ask for, how to
authenticate at the token endpoint, the Bearer challenge, PKCE. Each rule can be tested alone, and
switched off in a test to show that the conformance scenario covering it then fails.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from mcp_heal_proxy.auth.errors import LoginError

OFFLINE_ACCESS: Final = "offline_access"
AUTH_METHODS: Final = ("client_secret_basic", "client_secret_post", "none")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


# --- WWW-Authenticate ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """The parameters of a ``Bearer`` challenge (RFC 6750 section 3, RFC 9728 section 5.1)."""

    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        return self.params.get("error")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope") or None

    @property
    def resource_metadata(self) -> str | None:
        return self.params.get("resource_metadata") or None


def parse_challenge(value: str | None) -> Challenge | None:
    """The Bearer challenge in a WWW-Authenticate value; None when there is none."""
    if not value:
        return None
    match = re.search(r"(?:^|[\s,])bearer(?:\s+|$)", value, re.IGNORECASE)
    if match is None:
        return None
    rest = value[match.end() :]
    params: dict[str, str] = {}
    for param in _CHALLENGE_PARAM.finditer(rest):
        name = param.group(1).lower()
        quoted = param.group(2)
        params.setdefault(name, re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else param.group(3))
    return Challenge(params)


# --- discovery rules (pure) -----------------------------------------------------------------------


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}" + (f":{parts.port}" if parts.port else "")


def prm_urls(upstream_url: str, from_challenge: str | None) -> list[str]:
    """Where to look for protected-resource metadata, in order (RFC 9728 section 3, MCP 2025-11-25).

    The 401's ``resource_metadata`` first, then the path-aware well-known URL, then the root one.
    """
    path = urlsplit(upstream_url).path.rstrip("/")
    origin = origin_of(upstream_url)
    urls = [from_challenge] if from_challenge else []
    if path:
        urls.append(f"{origin}/.well-known/oauth-protected-resource{path}")
    urls.append(f"{origin}/.well-known/oauth-protected-resource")
    return list(dict.fromkeys(urls))


def as_metadata_urls(issuer: str) -> list[str]:
    """Where to look for authorization-server metadata, in order.

    An issuer with a path: RFC 8414 path-inserted, OIDC path-inserted, OIDC path-appended; never the
    root, which belongs to another tenant of the same host. Without a path: the two root documents.
    """
    origin = origin_of(issuer)
    path = urlsplit(issuer).path.rstrip("/")
    if path:
        return [
            f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}/.well-known/openid-configuration{path}",
            f"{origin}{path}/.well-known/openid-configuration",
        ]
    return [f"{origin}/.well-known/oauth-authorization-server", f"{origin}/.well-known/openid-configuration"]


def legacy_endpoints(upstream_url: str) -> dict[str, str]:
    """2025-03-26 servers without any metadata: the default endpoints at the MCP server's origin."""
    origin = origin_of(upstream_url)
    return {
        "issuer": origin,
        "authorization_endpoint": f"{origin}/authorize",
        "token_endpoint": f"{origin}/token",
        "registration_endpoint": f"{origin}/register",
    }


def choose_scopes(
    *,
    configured: tuple[str, ...] | None,
    challenge_scope: str | None,
    resource_scopes: list[str] | None,
    server_scopes: list[str] | None,
    wanted: str | None,
) -> list[str]:
    """The scopes to ask for (MCP 2025-11-25 "Scope Selection Strategy").

    The configured ones, else the 401's ``scope``, else the resource's ``scopes_supported``, else the
    authorization server's (as the MCP Python SDK falls back: a server such as oidc-provider refuses an
    authorization that asks for no scope), else none (the scope parameter is then left out). A scope
    an upstream asked for by a 403 step-up is added. ``offline_access`` is added only when the
    authorization server lists it (SEP-2207), and never alone.
    """
    if configured is not None:
        scopes = list(configured)
    elif challenge_scope:
        scopes = challenge_scope.split()
    elif resource_scopes:
        scopes = list(resource_scopes)
    elif server_scopes:
        scopes = [scope for scope in server_scopes if scope != OFFLINE_ACCESS]
    else:
        scopes = []
    for scope in (wanted or "").split():
        if scope not in scopes:
            scopes.append(scope)
    if scopes and server_scopes and OFFLINE_ACCESS in server_scopes and OFFLINE_ACCESS not in scopes:
        scopes.append(OFFLINE_ACCESS)
    return scopes


def registration_auth_method(supported: list[str] | None) -> str:
    """The token endpoint auth method to ask for at registration: a public client when allowed."""
    if supported is None or "none" in supported:
        return "none"
    return next((method for method in AUTH_METHODS if method in supported), "client_secret_basic")


def token_auth_method(registered: str | None, supported: list[str] | None, has_secret: bool) -> str:
    """How to authenticate at the token endpoint.

    What the registration answered; else, with a secret, client_secret_basic (OAuth's default) unless
    the server lists only client_secret_post; without a secret, none.
    """
    if registered:
        if registered not in AUTH_METHODS:
            raise LoginError(f"the authorization server registered the client for {registered}, which is not supported")
        return registered
    if not has_secret:
        return "none"
    if supported is None or "client_secret_basic" in supported or "client_secret_post" not in supported:
        return "client_secret_basic"
    return "client_secret_post"


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()], quote_via=quote)
    return urlunsplit(parts._replace(query=query))
