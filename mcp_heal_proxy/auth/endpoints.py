"""The requests a managed login makes: discovery (the upstream's challenge, protected-resource and
authorization-server metadata), dynamic client registration (RFC 7591), the token endpoint (codes and
refreshes, RFC 6749) and revocation (RFC 7009). Every request is bounded in time and every body read
whole and bounded (bodies.py); only OAuth error codes are reported, never what was sent.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import quote, urlsplit

import aiohttp

from mcp_heal_proxy.auth.bodies import BodyTooLarge, response_body
from mcp_heal_proxy.auth.errors import LoginError, NoLoginNeeded, TokenRefused
from mcp_heal_proxy.auth.metadata import check_resource
from mcp_heal_proxy.auth.rules import (
    Challenge,
    as_metadata_urls,
    choose_scopes,
    legacy_endpoints,
    origin_of,
    parse_challenge,
    prm_urls,
    registration_auth_method,
)
from mcp_heal_proxy.auth.tokens import Grant
from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.errors import connection_failure
from mcp_heal_proxy.upstream.proxy import oauth_client
from mcp_heal_proxy.upstream.tls import client_context, tls_context, tls_failure

# Every request to an authorization server or a metadata URL is bounded.
HTTP_TIMEOUT: Final = aiohttp.ClientTimeout(total=30)
# A refresh holds up the upstream requests waiting for it: bounded tighter than a login's requests.
REFRESH_TIMEOUT: Final = aiohttp.ClientTimeout(total=10, sock_connect=5)
CLIENT_NAME: Final = "mcp-heal-proxy"
# A refresh token is what lets one login last: ask for the grant at registration (SEP-2207).
REGISTRATION_GRANT_TYPES: Final = ("authorization_code", "refresh_token")
_PROBE_VERSION: Final = "2025-11-25"


# --- discovery (network) --------------------------------------------------------------------------


@dataclass(slots=True)
class Discovery:
    """What ``login`` learned about the upstream and its authorization server."""

    metadata: dict[str, Any]
    resource: str | None
    issuer: str | None
    challenge_scope: str | None = None
    resource_scopes: list[str] | None = None

    def scopes(self, upstream: UpstreamConfig, previous: Grant | None) -> list[str]:
        """The scopes a login of ``upstream`` asks for (rules.choose_scopes), ``previous`` its last grant."""
        server_scopes = self.metadata.get("scopes_supported")
        return choose_scopes(
            configured=upstream.scopes,
            challenge_scope=self.challenge_scope,
            resource_scopes=self.resource_scopes,
            server_scopes=server_scopes if isinstance(server_scopes, list) else None,
            wanted=previous.wanted_scope if previous else None,
        )


async def get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """A JSON object from ``url``; None when the server has none there (any non-200 answer)."""
    try:
        async with http.get(url, headers={"Accept": "application/json"}, allow_redirects=False) as response:
            if response.status != 200:
                return None
            payload = json.loads(await response_body(response))
    except (aiohttp.ClientError, TimeoutError, ValueError, BodyTooLarge):
        return None
    return payload if isinstance(payload, dict) else None


async def probe(http: aiohttp.ClientSession, upstream_url: str) -> Challenge | None:
    """Ask the upstream without a token and read its challenge (a 401, or a 403 naming a scope).

    An initialize first, as a client would start; a server that lets initialize through without a
    token (and guards only the calls after it) is asked again with a tools/list.
    """
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    initialize = {
        "jsonrpc": "2.0",
        "id": "mcp-heal-proxy-login",
        "method": "initialize",
        "params": {
            "protocolVersion": _PROBE_VERSION,
            "capabilities": {},
            "clientInfo": {"name": CLIENT_NAME, "version": "login"},
        },
    }
    tools_list = {"jsonrpc": "2.0", "id": "mcp-heal-proxy-login-2", "method": "tools/list"}
    for body in (initialize, tools_list):
        try:
            async with http.post(upstream_url, json=body, headers=headers, allow_redirects=False) as response:
                if response.status in (401, 403):
                    return parse_challenge(response.headers.get("WWW-Authenticate")) or Challenge()
                session_id = response.headers.get("Mcp-Session-Id")
                if session_id:
                    headers["Mcp-Session-Id"] = session_id
                    headers["MCP-Protocol-Version"] = _PROBE_VERSION
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LoginError(
                f"cannot reach the upstream MCP server {mask_url(upstream_url)}: {failure_reason(exc, upstream_url)}"
            ) from None
    return None


async def legacy_metadata(http: aiohttp.ClientSession, upstream_url: str) -> dict[str, Any]:
    """A 2025-03-26 server (no protected-resource metadata): the authorization server is the MCP
    server's origin, with RFC 8414 metadata at its root, else the default endpoints there."""
    metadata = await get_json(http, f"{origin_of(upstream_url)}/.well-known/oauth-authorization-server")
    return metadata if metadata is not None else legacy_endpoints(upstream_url)


async def discover(
    http: aiohttp.ClientSession, upstream_url: str, out: Callable[[str], None] = lambda _: None
) -> Discovery:
    """Find the upstream's authorization server and its metadata (MCP authorization, "Discovery")."""
    challenge = await probe(http, upstream_url)
    asked = challenge is not None
    if challenge is None:
        out("the upstream answered without asking for a token; looking for its metadata anyway")
    challenge = challenge or Challenge()
    resource_metadata: dict[str, Any] | None = None
    for url in prm_urls(upstream_url, challenge.resource_metadata):
        resource_metadata = await get_json(http, url)
        if resource_metadata is not None:
            break
    if resource_metadata is None:
        # No challenge and no metadata of either kind: the default endpoints would only end in a
        # registration 404; the upstream needs no login at all.
        if (
            not asked
            and await get_json(http, f"{origin_of(upstream_url)}/.well-known/oauth-authorization-server") is None
        ):
            raise NoLoginNeeded(
                f"this upstream asks for no login: {mask_url(upstream_url)} answered without asking for a token "
                'and publishes no OAuth metadata; remove auth = "oauth" from its [upstreams.NAME] table'
            )
        legacy = await legacy_metadata(http, upstream_url)
        return Discovery(metadata=legacy, resource=None, issuer=None, challenge_scope=challenge.scope)
    resource = resource_metadata.get("resource")
    if not isinstance(resource, str) or not check_resource(resource, upstream_url):
        raise LoginError(
            f"the upstream's protected-resource metadata names {resource!r}, not {mask_url(upstream_url)}: "
            "refusing to send a login for another server"
        )
    servers = resource_metadata.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], str):
        raise LoginError("the upstream's protected-resource metadata names no authorization server")
    issuer = servers[0]
    metadata = None
    for url in as_metadata_urls(issuer):
        metadata = await get_json(http, url)
        if metadata is not None:
            break
    if metadata is None:
        raise LoginError(f"no authorization server metadata found for {mask_url(issuer)}")
    # RFC 8414 section 3.3: the metadata's issuer is identical to the one its URL was built from (a simple
    # string comparison, no normalising: "https://as/" is another issuer than "https://as"), and it is
    # required (section 2): metadata that names none could be anyone's.
    named = metadata.get("issuer")
    if not isinstance(named, str):
        raise LoginError(
            f"the authorization server metadata for {mask_url(issuer)} names no issuer (RFC 8414 requires it): "
            "refusing to log in with metadata that is not tied to its server"
        )
    if named != issuer:
        raise LoginError(
            f"the authorization server metadata names issuer {named!r}, not {issuer!r} as the upstream's "
            "protected-resource metadata does (they must be identical, RFC 8414 section 3.3)"
        )
    scopes = resource_metadata.get("scopes_supported")
    return Discovery(
        metadata=metadata,
        resource=resource,
        issuer=issuer,
        challenge_scope=challenge.scope,
        resource_scopes=[s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else None,
    )


def client_auth(form: dict[str, str], client_id: str, secret: str | None, method: str) -> dict[str, str]:
    """Add the client's credentials to a token request; return the headers that carry them.

    client_id goes in the body whatever the method: it names the client without authenticating it,
    and some servers (the MCP SDK's) look the client up by it before reading a Basic header.
    """
    form["client_id"] = client_id
    if method == "client_secret_basic" and secret is not None:
        # RFC 6749 section 2.3.1: both parts form-urlencoded before base64.
        pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    if method == "client_secret_post" and secret is not None:
        form["client_secret"] = secret
    return {}


async def token_request(
    http: aiohttp.ClientSession, endpoint: str, form: dict[str, str], client_id: str, secret: str | None, method: str
) -> dict[str, Any]:
    headers = {"Accept": "application/json", **client_auth(form, client_id, secret, method)}
    async with http.post(endpoint, data=form, headers=headers, allow_redirects=False) as response:
        try:
            payload = json.loads(await response_body(response))
        except (ValueError, BodyTooLarge):
            payload = None
        if response.status != 200 or not isinstance(payload, dict) or "access_token" not in payload:
            error = payload.get("error") if isinstance(payload, dict) else None
            # Only the OAuth error code: a description or body could echo what was sent.
            raise TokenRefused(response.status, str(error) if error else "no token in the answer")
    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenRefused(200, f"unsupported token type {token_type!r}")
    return payload


def grant_from(answer: Mapping[str, Any], base: Grant) -> Grant:
    now = time.time()
    expires_in = answer.get("expires_in")
    refresh_token = answer.get("refresh_token")
    scope = answer.get("scope")
    return replace(
        base,
        access_token=str(answer["access_token"]),
        # A refresh answer without a new refresh token keeps the old one (RFC 6749 section 6).
        refresh_token=str(refresh_token) if refresh_token else base.refresh_token,
        expires_at=now + float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None,
        obtained_at=now,
        scope=str(scope) if scope else base.scope,
    )


async def refresh_grant(grant: Grant, tls: ssl.SSLContext, proxy: str | None = None) -> Grant:
    """A new access token for the grant (RFC 6749 section 6), over the upstream's TLS settings (``tls``)
    and outbound proxy (``proxy``, its key: None takes the environment's); raises TokenRefused or
    aiohttp errors."""
    assert grant.refresh_token is not None
    form = {"grant_type": "refresh_token", "refresh_token": grant.refresh_token}
    if grant.resource:
        form["resource"] = grant.resource
    async with http_client(tls, REFRESH_TIMEOUT, proxy) as http:
        answer = await token_request(
            http, grant.token_endpoint, form, grant.client_id, grant.client_secret, grant.auth_method
        )
    return grant_from(answer, grant)


def failure_reason(exc: BaseException, url: str) -> str:
    """Why a request failed, in a few words: a refused certificate with its fix, else what happened."""
    if isinstance(exc, BodyTooLarge):
        return "its answer is too large"
    return tls_failure(exc, urlsplit(url).hostname or "") or connection_failure(exc).words


def http_client(
    tls: ssl.SSLContext, timeout: aiohttp.ClientTimeout = HTTP_TIMEOUT, proxy: str | None = None
) -> aiohttp.ClientSession:
    """An HTTP client for OAuth requests of one upstream: its ca_file, client certificate and outbound
    proxy apply, as to its MCP requests (the authorization server is often behind the same corporate CA
    and proxy)."""
    return oauth_client(tls, proxy, timeout=timeout)


@dataclass(slots=True)
class RegisteredClient:
    client_id: str
    secret: str | None
    registered_method: str | None


async def register(
    http: aiohttp.ClientSession,
    metadata: Mapping[str, Any],
    scopes: list[str],
    *,
    redirect_uri: str | None,
    grant_types: tuple[str, ...] | None = None,
) -> RegisteredClient:
    """Dynamic client registration (RFC 7591): of a browser login's client (its loopback ``redirect_uri``,
    response type ``code``), or with ``redirect_uri`` None of a device client (RFC 8628: no redirect URI,
    no response type, its own ``grant_types``; None is the browser login's, REGISTRATION_GRANT_TYPES, read
    when called)."""
    endpoint = metadata.get("registration_endpoint")
    if not isinstance(endpoint, str):
        raise LoginError(
            "the authorization server offers no dynamic client registration: register a client with it and "
            "set client_id (and client_secret) on this upstream"
        )
    supported = metadata.get("token_endpoint_auth_methods_supported")
    body: dict[str, Any] = {
        "client_name": CLIENT_NAME,
        **({"redirect_uris": [redirect_uri], "response_types": ["code"]} if redirect_uri else {"response_types": []}),
        "grant_types": list(grant_types if grant_types is not None else REGISTRATION_GRANT_TYPES),
        "token_endpoint_auth_method": registration_auth_method(supported if isinstance(supported, list) else None),
    }
    if scopes:
        body["scope"] = " ".join(scopes)
    try:
        async with http.post(endpoint, json=body, allow_redirects=False) as response:
            payload = json.loads(await response_body(response)) if response.status in (200, 201) else None
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError, BodyTooLarge) as exc:
        raise LoginError(
            f"client registration at {mask_url(endpoint)} failed: {failure_reason(exc, endpoint)}"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("client_id"), str):
        raise LoginError(f"client registration at {mask_url(endpoint)} failed: HTTP {status}")
    secret = payload.get("client_secret")
    method = payload.get("token_endpoint_auth_method")
    return RegisteredClient(
        payload["client_id"], secret if isinstance(secret, str) else None, method if isinstance(method, str) else None
    )


# RFC 7009 section 2.2.1: the server does not revoke tokens of this type (oidc-provider, for one,
# revokes no JWT access token: it stays valid until it expires).
UNSUPPORTED_TOKEN_TYPE: Final = "unsupported_token_type"


async def revoke_grant(grant: Grant, upstream: UpstreamConfig | None = None) -> list[str]:
    """Revoke the grant's refresh and access tokens at its authorization server (RFC 7009), over the
    upstream's TLS settings and outbound proxy; what
    was revoked ("refresh token", "access token"): a type of token the server does not revoke is
    left out. Raises TokenRefused or aiohttp errors."""
    assert grant.revocation_endpoint is not None
    revoked: list[str] = []
    tokens = (("refresh_token", grant.refresh_token), ("access_token", grant.access_token))
    tls = tls_context(upstream) if upstream is not None else client_context(None, None, None)
    async with http_client(tls, REFRESH_TIMEOUT, upstream.proxy if upstream is not None else None) as http:
        for hint, token in tokens:
            if not token:
                continue
            try:
                await _revoke(http, grant, grant.auth_method, token, hint)
            except TokenRefused as exc:
                if exc.error == UNSUPPORTED_TOKEN_TYPE:
                    continue
                if not (
                    exc.status in (400, 401) and grant.auth_method == "client_secret_basic" and grant.client_secret
                ):
                    raise
                # The MCP SDK's revocation endpoint checks the Basic credentials and then insists on
                # a client_secret field in the form as well: the same secret, to the same endpoint.
                await _revoke(http, grant, grant.auth_method, token, hint, secret_in_form=True)
            revoked.append(hint.replace("_", " "))
    return revoked


async def _revoke(
    http: aiohttp.ClientSession, grant: Grant, method: str, token: str, hint: str, *, secret_in_form: bool = False
) -> None:
    assert grant.revocation_endpoint is not None
    form = {"token": token, "token_type_hint": hint}
    headers = {"Accept": "application/json", **client_auth(form, grant.client_id, grant.client_secret, method)}
    if secret_in_form and grant.client_secret is not None:
        form["client_secret"] = grant.client_secret
    async with http.post(grant.revocation_endpoint, data=form, headers=headers, allow_redirects=False) as response:
        # 200 whether or not the token was still valid (RFC 7009 section 2.2).
        if response.status == 200:
            return
        try:
            payload = json.loads(await response_body(response))
        except (ValueError, BodyTooLarge):
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        # Only the OAuth error code: a description could echo what was sent.
        raise TokenRefused(response.status, str(error) if error else f"HTTP {response.status}")


def base_grant(
    upstream: UpstreamConfig,
    found: Discovery,
    token_endpoint: str,
    client: RegisteredClient,
    method: str,
    resource: str,
    scopes: list[str],
) -> Grant:
    """What a login knows before the token answer (which grant_from adds)."""
    revocation = found.metadata.get("revocation_endpoint")
    return Grant(
        upstream_url=upstream.url,
        token_endpoint=token_endpoint,
        client_id=client.client_id,
        client_secret=client.secret,
        auth_method=method,
        access_token="",
        resource=resource,
        issuer=found.issuer,
        revocation_endpoint=revocation if isinstance(revocation, str) else None,
        scope=" ".join(scopes) or None,
        logged_in_at=time.time(),
    )
