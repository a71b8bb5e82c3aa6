"""Proxy-managed OAuth login (``auth = "oauth"`` on an upstream), for clients that cannot log in themselves.

``mcp-heal-proxy login NAME`` runs the authorization code flow with PKCE (S256) against the upstream's
authorization server, as an MCP client would (authorization spec 2025-11-25, with the 2025-03-26
fallbacks), and stores the tokens (tokens.py). ``serve`` then sends them upstream through
``ManagedAuth``, the hook ``Upstream.send`` calls: it refreshes the access token before it expires and
once when the upstream answers 401 with a Bearer challenge (one refresh for all the requests that
found the token stale), and turns every way of needing the user (no login, a refused refresh, a 403
``insufficient_scope``) into a JSON-RPC error that says to run ``login``. The upstream's own challenge
never reaches the client, which would start a login of its own against the proxy.

The discovery steps are small pure functions (``prm_urls``, ``check_resource``, ``as_metadata_urls``,
``choose_scopes``, ``token_auth_method``) so that each rule can be tested, and switched off in a test
to show that the conformance scenario covering it then fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import secrets
import ssl
import time
import webbrowser
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, TextIO
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp import web

from mcp_heal_proxy.auth.bodies import BodyTooLarge, response_body
from mcp_heal_proxy.auth.metadata import check_resource
from mcp_heal_proxy.auth.tokens import Grant, TokenFile, TokenFileError, tokens_directory
from mcp_heal_proxy.config import MEMORY_STATE, ConfigError, ProxyConfig, UpstreamConfig, login_command
from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.errors import ProxyError, connection_failure
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.tls import tls_context, tls_failure

log = structlog.get_logger("mcp_heal_proxy.auth")

# Every request to an authorization server or a metadata URL is bounded.
HTTP_TIMEOUT: Final = aiohttp.ClientTimeout(total=30)
# A refresh holds up the upstream requests waiting for it: bounded tighter than a login's requests.
REFRESH_TIMEOUT: Final = aiohttp.ClientTimeout(total=10, sock_connect=5)
# How long a refresh waits for another process's refresh (which its own REFRESH_TIMEOUT bounds).
REFRESH_LOCK_PATIENCE: Final = 12.0
# What a request waits for the shared refresh at most: both bounds above, and a little for the file.
REFRESH_WAIT: Final = REFRESH_LOCK_PATIENCE + 10 + 3
# After a refresh that timed out (a hanging authorization server), requests do not start another one
# for this long (each would wait again): they use the token's last seconds or get the error at once.
REFRESH_FAILURE_TTL: Final = 5.0
# How long ``login`` waits for the browser to come back to the loopback callback.
LOGIN_TIMEOUT: Final = 300.0
# A login waiting for another one gives it its whole browser wait, plus this for its token request.
LOGIN_LOCK_SLACK: Final = 60.0
CLIENT_NAME: Final = "mcp-heal-proxy"
CALLBACK_PATH: Final = "/callback"
OFFLINE_ACCESS: Final = "offline_access"
# A refresh token is what lets one login last: ask for the grant at registration (SEP-2207).
REGISTRATION_GRANT_TYPES: Final = ("authorization_code", "refresh_token")
AUTH_METHODS: Final = ("client_secret_basic", "client_secret_post", "none")
_PROBE_VERSION: Final = "2025-11-25"
_CHALLENGE_PARAM = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


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


def _origin(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}" + (f":{parts.port}" if parts.port else "")


def prm_urls(upstream_url: str, from_challenge: str | None) -> list[str]:
    """Where to look for protected-resource metadata, in order (RFC 9728 section 3, MCP 2025-11-25).

    The 401's ``resource_metadata`` first, then the path-aware well-known URL, then the root one.
    """
    path = urlsplit(upstream_url).path.rstrip("/")
    origin = _origin(upstream_url)
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
    origin = _origin(issuer)
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
    origin = _origin(upstream_url)
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


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()], quote_via=quote)
    return urlunsplit(parts._replace(query=query))


# --- discovery (network) --------------------------------------------------------------------------


@dataclass(slots=True)
class Discovery:
    """What ``login`` learned about the upstream and its authorization server."""

    metadata: dict[str, Any]
    resource: str | None
    issuer: str | None
    challenge_scope: str | None = None
    resource_scopes: list[str] | None = None


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """A JSON object from ``url``; None when the server has none there (any non-200 answer)."""
    try:
        async with http.get(url, headers={"Accept": "application/json"}, allow_redirects=False) as response:
            if response.status != 200:
                return None
            payload = json.loads(await response_body(response))
    except (aiohttp.ClientError, TimeoutError, ValueError, BodyTooLarge):
        return None
    return payload if isinstance(payload, dict) else None


async def _probe(http: aiohttp.ClientSession, upstream_url: str) -> Challenge | None:
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
                f"cannot reach the upstream MCP server {mask_url(upstream_url)}: {_why(exc, upstream_url)}"
            ) from None
    return None


async def legacy_metadata(http: aiohttp.ClientSession, upstream_url: str) -> dict[str, Any]:
    """A 2025-03-26 server (no protected-resource metadata): the authorization server is the MCP
    server's origin, with RFC 8414 metadata at its root, else the default endpoints there."""
    metadata = await _get_json(http, f"{_origin(upstream_url)}/.well-known/oauth-authorization-server")
    return metadata if metadata is not None else legacy_endpoints(upstream_url)


async def discover(
    http: aiohttp.ClientSession, upstream_url: str, out: Callable[[str], None] = lambda _: None
) -> Discovery:
    """Find the upstream's authorization server and its metadata (MCP authorization, "Discovery")."""
    challenge = await _probe(http, upstream_url)
    asked = challenge is not None
    if challenge is None:
        out("the upstream answered without asking for a token; looking for its metadata anyway")
    challenge = challenge or Challenge()
    resource_metadata: dict[str, Any] | None = None
    for url in prm_urls(upstream_url, challenge.resource_metadata):
        resource_metadata = await _get_json(http, url)
        if resource_metadata is not None:
            break
    if resource_metadata is None:
        # No challenge and no metadata of either kind: the default endpoints would only end in a
        # registration 404; the upstream needs no login at all.
        if (
            not asked
            and await _get_json(http, f"{_origin(upstream_url)}/.well-known/oauth-authorization-server") is None
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
        metadata = await _get_json(http, url)
        if metadata is not None:
            break
    if metadata is None:
        raise LoginError(f"no authorization server metadata found for {mask_url(issuer)}")
    if isinstance(metadata.get("issuer"), str) and metadata["issuer"].rstrip("/") != issuer.rstrip("/"):
        raise LoginError(f"the authorization server metadata names issuer {metadata['issuer']!r}, not {issuer!r}")
    scopes = resource_metadata.get("scopes_supported")
    return Discovery(
        metadata=metadata,
        resource=resource,
        issuer=issuer,
        challenge_scope=challenge.scope,
        resource_scopes=[s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else None,
    )


# --- token endpoint -------------------------------------------------------------------------------


class TokenRefused(Exception):
    """The token endpoint said no (an OAuth error answer)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error


def _client_auth(form: dict[str, str], client_id: str, secret: str | None, method: str) -> dict[str, str]:
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


async def _token_request(
    http: aiohttp.ClientSession, endpoint: str, form: dict[str, str], client_id: str, secret: str | None, method: str
) -> dict[str, Any]:
    headers = {"Accept": "application/json", **_client_auth(form, client_id, secret, method)}
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


def _grant_from(answer: Mapping[str, Any], base: Grant) -> Grant:
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


async def refresh_grant(grant: Grant, tls: ssl.SSLContext) -> Grant:
    """A new access token for the grant (RFC 6749 section 6), over the upstream's TLS settings (``tls``);
    raises TokenRefused or aiohttp errors."""
    assert grant.refresh_token is not None
    form = {"grant_type": "refresh_token", "refresh_token": grant.refresh_token}
    if grant.resource:
        form["resource"] = grant.resource
    async with _client(tls, REFRESH_TIMEOUT) as http:
        answer = await _token_request(
            http, grant.token_endpoint, form, grant.client_id, grant.client_secret, grant.auth_method
        )
    return _grant_from(answer, grant)


def _why(exc: BaseException, url: str) -> str:
    """Why a request failed, in a few words: a refused certificate with its fix, else what happened."""
    if isinstance(exc, BodyTooLarge):
        return "its answer is too large"
    return tls_failure(exc, urlsplit(url).hostname or "") or connection_failure(exc).words


def _client(tls: ssl.SSLContext, timeout: aiohttp.ClientTimeout = HTTP_TIMEOUT) -> aiohttp.ClientSession:
    """An HTTP client for OAuth requests of one upstream: its ca_file and client certificate apply, as to
    its MCP requests (the authorization server is often behind the same corporate CA)."""
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=tls))


# --- login ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Client:
    client_id: str
    secret: str | None
    registered_method: str | None


async def _register(
    http: aiohttp.ClientSession, metadata: Mapping[str, Any], redirect_uri: str, scopes: list[str]
) -> _Client:
    """Dynamic client registration (RFC 7591)."""
    endpoint = metadata.get("registration_endpoint")
    if not isinstance(endpoint, str):
        raise LoginError(
            "the authorization server offers no dynamic client registration: register a client with it and "
            "set client_id (and client_secret) on this upstream"
        )
    supported = metadata.get("token_endpoint_auth_methods_supported")
    body: dict[str, Any] = {
        "client_name": CLIENT_NAME,
        "redirect_uris": [redirect_uri],
        "grant_types": list(REGISTRATION_GRANT_TYPES),
        "response_types": ["code"],
        "token_endpoint_auth_method": registration_auth_method(supported if isinstance(supported, list) else None),
    }
    if scopes:
        body["scope"] = " ".join(scopes)
    try:
        async with http.post(endpoint, json=body, allow_redirects=False) as response:
            payload = json.loads(await response_body(response)) if response.status in (200, 201) else None
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError, BodyTooLarge) as exc:
        raise LoginError(f"client registration at {mask_url(endpoint)} failed: {_why(exc, endpoint)}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("client_id"), str):
        raise LoginError(f"client registration at {mask_url(endpoint)} failed: HTTP {status}")
    secret = payload.get("client_secret")
    method = payload.get("token_endpoint_auth_method")
    return _Client(
        payload["client_id"], secret if isinstance(secret, str) else None, method if isinstance(method, str) else None
    )


class _Callback:
    """The loopback redirect target (RFC 8252 section 7.3): one authorization response, then done."""

    def __init__(self, state: str, again: str) -> None:
        self._state = state
        self._again = again
        self.answer: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get(CALLBACK_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise LoginError(f"cannot listen on 127.0.0.1:{port} for the login callback: {exc.strerror}") from None
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        if not secrets.compare_digest(params.get("state", ""), self._state):
            # Not the answer to our request (a stale tab, or someone else's redirect): ignore it.
            return web.Response(status=400, text=f"Unknown login attempt; start again with: {self._again}")
        if not self.answer.done():
            self.answer.set_result(params)
        if "error" in params:
            return web.Response(text="The login was refused. You can close this tab.")
        return web.Response(text="Logged in. You can close this tab and go back to mcp-heal-proxy.")

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}{CALLBACK_PATH}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _print(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


async def login(
    upstream: UpstreamConfig,
    token_file: TokenFile,
    *,
    out: TextIO,
    open_browser: bool,
    wait: float = LOGIN_TIMEOUT,
    again: str | None = None,
    device: bool = False,
    pasted: asyncio.StreamReader | None = None,
) -> Grant:
    """Log in to the upstream's authorization server and store the grant. ``again`` is the command that
    starts this login (login_command), for the browser page of a stale attempt. ``device``: the device
    authorization grant (device.py) instead of the browser's redirect; ``pasted``: where the user may
    paste the address the browser was sent to, when the loopback callback cannot be reached.

    Two logins of one upstream at once (two terminals, or two proxies' users sharing a state
    directory) take turns; one that waited uses the tokens the other one obtained instead of sending
    the user through the browser a second time.
    """
    before = token_file.load(upstream.url)
    async with token_file.lock(patience=wait + LOGIN_LOCK_SLACK, purpose="login"):
        current = token_file.load(upstream.url)
        if current is not None and current.logged_in_at > (before.logged_in_at if before else 0.0):
            _print(out, f"Another login of {upstream.name} finished meanwhile; using its tokens.")
            return current
        command = again or login_command(upstream, MEMORY_STATE)
        if device:
            from mcp_heal_proxy.auth.device import device_login

            return await device_login(upstream, token_file, current, out=out, wait=wait, again=command)
        return await _login(
            upstream, token_file, current, out=out, open_browser=open_browser, wait=wait, again=command, pasted=pasted
        )


async def _login(
    upstream: UpstreamConfig,
    token_file: TokenFile,
    previous: Grant | None,
    *,
    out: TextIO,
    open_browser: bool,
    wait: float,
    again: str,
    pasted: asyncio.StreamReader | None = None,
) -> Grant:
    async with _client(tls_context(upstream)) as http:
        found = await discover(http, upstream.url, lambda line: _print(out, line))
        metadata = found.metadata
        methods = metadata.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise LoginError("the authorization server does not support PKCE with S256; refusing to log in")
        authorize = metadata.get("authorization_endpoint")
        token_endpoint = metadata.get("token_endpoint")
        if not isinstance(authorize, str) or not isinstance(token_endpoint, str):
            raise LoginError("the authorization server metadata lacks authorization_endpoint or token_endpoint")
        server_scopes = metadata.get("scopes_supported")
        scopes = choose_scopes(
            configured=upstream.scopes,
            challenge_scope=found.challenge_scope,
            resource_scopes=found.resource_scopes,
            server_scopes=server_scopes if isinstance(server_scopes, list) else None,
            wanted=previous.wanted_scope if previous else None,
        )
        state = secrets.token_urlsafe(24)
        callback = _Callback(state, again)
        await callback.start(upstream.callback_port or 0)
        try:
            if upstream.client_id:
                client = _Client(upstream.client_id, upstream.client_secret, None)
            else:
                client = await _register(http, metadata, callback.redirect_uri, scopes)
            supported = metadata.get("token_endpoint_auth_methods_supported")
            method = token_auth_method(
                client.registered_method, supported if isinstance(supported, list) else None, client.secret is not None
            )
            verifier, challenge = pkce_pair()
            # The token is for the upstream: resource names it (as its metadata does), never the proxy.
            resource = found.resource or upstream.url
            params = {
                "response_type": "code",
                "client_id": client.client_id,
                "redirect_uri": callback.redirect_uri,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                "state": state,
                "resource": resource,
            }
            if scopes:
                params["scope"] = " ".join(scopes)
            if OFFLINE_ACCESS in scopes:
                # OpenID Connect Core 1.0 section 11: offline_access is ignored unless the user is
                # asked to consent (oidc-provider then grants no refresh token).
                params["prompt"] = "consent"
            url = _with_query(authorize, params)
            _print(out, f"Log in to {upstream.name} ({mask_url(upstream.url)}) by opening this URL in a browser:")
            _print(out, url)
            _print(out, f"Waiting for the authorization server to redirect to {callback.redirect_uri} ...")
            if pasted is not None:
                _print(
                    out,
                    "If the browser runs on another machine, that page will not load: paste its address "
                    "(the whole URL from the address bar) here and press Enter.",
                )
            if open_browser:
                with contextlib.suppress(webbrowser.Error):
                    webbrowser.open(url)
            answer = await _answer(callback, pasted, state, out, wait)
        finally:
            await callback.close()
        if "error" in answer:
            raise LoginError(f"the authorization server refused the login: {answer['error']}")
        iss = answer.get("iss")
        expected_issuer = metadata.get("issuer") if isinstance(metadata.get("issuer"), str) else found.issuer
        if iss is not None and expected_issuer is not None and iss.rstrip("/") != str(expected_issuer).rstrip("/"):
            # RFC 9207: an answer from another authorization server (a mix-up attack) is not used.
            raise LoginError(f"the authorization answer came from issuer {iss!r}, not {expected_issuer!r}")
        if metadata.get("authorization_response_iss_parameter_supported") is True and iss is None:
            raise LoginError("the authorization server promised an iss parameter (RFC 9207) and sent none")
        code = answer.get("code")
        if not code:
            raise LoginError("the authorization answer carries no code")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": callback.redirect_uri,
            "code_verifier": verifier,
            "resource": resource,
        }
        base = base_grant(upstream, found, token_endpoint, client, method, resource, scopes)
        try:
            try:
                answer_tokens = await _token_request(
                    http, token_endpoint, dict(form), client.client_id, client.secret, method
                )
            except TokenRefused as exc:
                if not _try_post_instead(exc, client, method, supported):
                    raise
                # A pre-registered client whose method nobody told us: client_secret_basic was refused
                # as a client authentication (the code is not spent then), so try client_secret_post.
                method = "client_secret_post"
                answer_tokens = await _token_request(
                    http, token_endpoint, dict(form), client.client_id, client.secret, method
                )
        except TokenRefused as exc:
            raise LoginError(f"the token endpoint refused the authorization code: {exc.error}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LoginError(
                f"cannot reach the token endpoint {mask_url(token_endpoint)}: {_why(exc, token_endpoint)}"
            ) from None
    grant = _grant_from(answer_tokens, replace(base, auth_method=method))
    async with token_file.lock():
        token_file.save(grant)
    return grant


def base_grant(
    upstream: UpstreamConfig,
    found: Discovery,
    token_endpoint: str,
    client: _Client,
    method: str,
    resource: str,
    scopes: list[str],
) -> Grant:
    """What a login knows before the token answer (which _grant_from adds)."""
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


# A pasted line longer than this is not an authorization answer (StreamReader's line limit).
PASTE_LIMIT: Final = 16 * 1024


async def _answer(
    callback: _Callback, pasted: asyncio.StreamReader | None, state: str, out: TextIO, wait: float
) -> dict[str, str]:
    """The authorization answer: at the loopback callback, or pasted, whichever comes first, within ``wait``."""
    waiting: list[asyncio.Future[dict[str, str]]] = [callback.answer]
    # The reader of pasted lines lives as long as this wait: cancelled once an answer came.
    reader = TaskOwner()
    if pasted is not None:
        waiting.append(reader.spawn(_read_pasted(pasted, state, out), name="login-pasted-answer"))
    try:
        done, _ = await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await reader.close()
    if not done:
        raise LoginError(f"no answer on {callback.redirect_uri} within {wait:.0f} s")
    return done.pop().result()


async def _read_pasted(reader: asyncio.StreamReader, state: str, out: TextIO) -> dict[str, str]:
    """The query of the first pasted URL whose ``state`` is this login's, exactly; other lines are
    answered with what is wrong with them. At the end of the input, waits on (the callback may still
    come)."""
    while True:
        try:
            line = (await reader.readline()).decode(errors="replace").strip()
        except ValueError:  # a line over PASTE_LIMIT
            _print(out, "That line is too long to be the address; paste the address the browser was sent to.")
            continue
        if not line:
            if reader.at_eof():
                await asyncio.Future()  # nothing more will be pasted: the callback or the timeout decides
            continue
        params = dict(parse_qsl(urlsplit(line).query, keep_blank_values=True))
        if not secrets.compare_digest(params.get("state", ""), state):
            _print(
                out,
                "That address is not the answer to this login (its state does not match); paste the address "
                "the browser was sent to after you logged in.",
            )
            continue
        return params


def _try_post_instead(refused: TokenRefused, client: _Client, method: str, supported: object) -> bool:
    """Whether a refused client_secret_basic deserves a client_secret_post attempt (issue: "else
    client_secret_basic, then client_secret_post"): only for a client whose registration said nothing."""
    return (
        refused.error == "invalid_client"
        and method == "client_secret_basic"
        and client.registered_method is None
        and client.secret is not None
        and (not isinstance(supported, list) or "client_secret_post" in supported)
    )


def _upstream_named(config: ProxyConfig, name: str) -> UpstreamConfig:
    for upstream in config.upstreams:
        if upstream.name == name:
            if upstream.auth != "oauth":
                raise ConfigError(f'upstream {name} does not have auth = "oauth"; nothing to log in to')
            return upstream
    known = ", ".join(u.name for u in config.upstreams if u.auth == "oauth") or "none"
    raise ConfigError(f'no upstream named {name} (upstreams with auth = "oauth": {known})')


async def run_login(
    config: ProxyConfig,
    name: str,
    *,
    out: TextIO,
    open_browser: bool,
    device: bool = False,
    pasted: asyncio.StreamReader | None = None,
) -> int:
    """``mcp-heal-proxy login NAME``: exit status 0 once the tokens are stored."""
    upstream = _upstream_named(config, name)
    token_file = TokenFile(tokens_directory(config.state), name)
    try:
        command = login_command(upstream, config.state)
        await login(
            upstream, token_file, out=out, open_browser=open_browser, again=command, device=device, pasted=pasted
        )
    except TokenFileError as exc:
        raise LoginError(str(exc)) from None
    _print(out, f"Logged in to {name}; tokens saved in {token_file.path}")
    return 0


# RFC 7009 section 2.2.1: the server does not revoke tokens of this type (oidc-provider, for one,
# revokes no JWT access token: it stays valid until it expires).
UNSUPPORTED_TOKEN_TYPE: Final = "unsupported_token_type"


async def revoke_grant(grant: Grant) -> list[str]:
    """Revoke the grant's refresh and access tokens at its authorization server (RFC 7009); what
    was revoked ("refresh token", "access token"): a type of token the server does not revoke is
    left out. Raises TokenRefused or aiohttp errors."""
    assert grant.revocation_endpoint is not None
    revoked: list[str] = []
    tokens = (("refresh_token", grant.refresh_token), ("access_token", grant.access_token))
    async with aiohttp.ClientSession(timeout=REFRESH_TIMEOUT) as http:
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
    headers = {"Accept": "application/json", **_client_auth(form, grant.client_id, grant.client_secret, method)}
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


async def run_logout(config: ProxyConfig, name: str, *, out: TextIO) -> int:
    """``mcp-heal-proxy logout NAME``: revoke the tokens at the authorization server when it offers
    revocation (RFC 7009), then forget them; says what it did."""
    upstream = _upstream_named(config, name)
    token_file = TokenFile(tokens_directory(config.state), name)
    try:
        async with token_file.lock():
            grant = token_file.load(upstream.url)
            if grant is None:
                existed = token_file.delete()
            else:
                _print(out, await _revoke_for_logout(grant))
                existed = token_file.delete()
    except TokenFileError as exc:
        raise LoginError(str(exc)) from None
    _print(out, f"Logged out of {upstream.name}." if existed else f"Not logged in to {upstream.name}.")
    return 0


async def _revoke_for_logout(grant: Grant) -> str:
    """Revoke the grant's tokens when the authorization server lets us; one line saying what happened."""
    if grant.revocation_endpoint is None:
        return (
            "The authorization server offers no token revocation (or the login predates it): its tokens "
            "are deleted here and stay valid there until they expire."
        )
    try:
        revoked = await revoke_grant(grant)
    except TokenRefused as exc:
        return f"The authorization server refused to revoke the tokens ({exc.error}): deleted here only."
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = connection_failure(exc).words
        return f"Cannot reach the authorization server to revoke the tokens ({why}): deleted here only."
    if not revoked:
        return "No token to revoke."
    done = f"Revoked the {' and '.join(revoked)} at the authorization server."
    if grant.refresh_token and "access token" not in revoked:
        done += " It does not revoke access tokens: the last one stays valid until it expires."
    return done


# --- the hook in Upstream.send --------------------------------------------------------------------


# ``Upstream._transmit``: one request to the upstream, with the proxy's transport rules:
# (method, headers, body, **transport options) -> the response.
Transmit = Callable[..., Awaitable[aiohttp.ClientResponse]]


def _is_token_challenge(response: aiohttp.ClientResponse) -> bool:
    """A 401 about the token carries a Bearer challenge (RFC 6750 section 3); a 401 that speaks of the
    session (healing.is_session_expired) comes from the MCP layer, past the token check, without one."""
    return response.status == 401 and parse_challenge(response.headers.get("WWW-Authenticate")) is not None


class ManagedAuth:
    """Puts the stored access token on every upstream request of one upstream, and keeps it fresh."""

    def __init__(self, upstream: UpstreamConfig, token_file: TokenFile, state: str = MEMORY_STATE) -> None:
        self._upstream = upstream
        self._name = upstream.name
        self._login = login_command(upstream, state)
        self._file = token_file
        self._grant: Grant | None = None
        self._stamp: int | None = None
        self._loaded = False
        # The refresh in flight (one for every request that needs it), owned: cancelled at close.
        self._tasks = TaskOwner()
        self._refreshing: asyncio.Task[Grant] | None = None
        # The access token whose refresh the authorization server refused: no more attempts with it
        # until the file changes (a new login), so a dead grant does not cost a refresh per request.
        self._refused: str | None = None
        # Until when (monotonic) a refresh that could not reach the authorization server is not retried.
        self._unavailable_until = 0.0

    async def close(self) -> None:
        """Cancel a refresh in flight (the proxy is stopping)."""
        await self._tasks.close()

    def _hint(self, why: str) -> str:
        return f"{why}: run `{self._login}` (upstream {self._name})"

    def _current(self) -> Grant | None:
        """The stored grant, read again whenever the file changed (a login, or another proxy's refresh)."""
        stamp = self._file.stamp()
        if not self._loaded or stamp != self._stamp:
            try:
                self._grant = self._file.load(self._upstream.url)
            except TokenFileError as exc:
                raise LoginRequired(self._hint(str(exc))) from None
            self._stamp = stamp
            self._loaded = True
            self._refused = None
        return self._grant

    async def _usable(self) -> Grant:
        grant = self._current()
        if grant is None:
            raise LoginRequired(self._hint("not logged in to the upstream"))
        if grant.expires_soon():
            try:
                grant = await self._refreshed(grant.access_token, "expiry")
            except AuthServerUnavailable:
                # The authorization server is down, but the token has a few seconds left: use them.
                if grant.expires_at is None or grant.expires_at <= time.time():
                    raise
        return grant

    async def _refreshed(self, stale: str, reason: str) -> Grant:
        """A grant whose access token is not ``stale``: one refresh shared by every caller."""
        grant = self._current()
        if grant is not None and grant.access_token != stale and not grant.expires_soon():
            return grant
        if self._refused == stale:
            raise LoginRequired(self._hint("the authorization server refused to refresh the token"))
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() < self._unavailable_until:
                raise self._unavailable()
            self._refreshing = self._tasks.spawn(self._refresh(stale, reason), name=f"auth-refresh-{self._name}")
            self._refreshing.add_done_callback(_retrieve)
        # Shielded: a client that gives up does not abort the refresh the others wait for.
        try:
            async with asyncio.timeout(REFRESH_WAIT):
                return await asyncio.shield(self._refreshing)
        except TimeoutError:
            raise AuthServerUnavailable(
                f"the refresh of upstream {self._name}'s token did not finish within {REFRESH_WAIT:g} s"
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this request itself was cancelled
            # The refresh was (the proxy is stopping): an error for this request, not a cancellation.
            raise AuthServerUnavailable(f"the proxy stopped while refreshing upstream {self._name}'s token") from None

    def _unavailable(self) -> AuthServerUnavailable:
        return AuthServerUnavailable(
            f"cannot reach the authorization server of upstream {self._name} to refresh the token"
        )

    async def _refresh(self, stale: str, reason: str) -> Grant:
        try:
            async with self._file.lock(patience=REFRESH_LOCK_PATIENCE):
                grant = self._file.load(self._upstream.url)
                if grant is None:
                    raise LoginRequired(self._hint("not logged in to the upstream"))
                if grant.access_token != stale and not grant.expires_soon():
                    # Another process refreshed while this one waited for the lock.
                    self._adopt(grant)
                    return grant
                if not grant.refresh_token:
                    why = "the access token expired" if reason == "expiry" else "the upstream refused the access token"
                    raise LoginRequired(self._hint(f"{why} and the login gave no refresh token"))
                try:
                    fresh = await refresh_grant(grant, tls_context(self._upstream))
                except TokenRefused as exc:
                    self._refused = stale
                    log.warning("auth.refresh_refused", upstream=self._name, reason=reason, error=exc.error)
                    raise LoginRequired(
                        self._hint(f"the authorization server refused to refresh the token ({exc.error})")
                    ) from None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning(
                        "auth.refresh_failed",
                        upstream=self._name,
                        reason=reason,
                        error=_why(exc, grant.token_endpoint),
                    )
                    if isinstance(exc, TimeoutError):
                        # A hanging server: the next requests should not each wait for it again. (A
                        # refused connection costs nothing to try again, and comes back soon after a
                        # restart.)
                        self._unavailable_until = time.monotonic() + REFRESH_FAILURE_TTL
                    raise self._unavailable() from None
                self._file.save(fresh)
                self._adopt(fresh)
        except TokenFileError as exc:
            raise LoginRequired(self._hint(str(exc))) from None
        log.info("auth.token_refreshed", upstream=self._name, reason=reason)
        return fresh

    def _adopt(self, grant: Grant) -> None:
        self._grant = grant
        self._stamp = self._file.stamp()
        self._loaded = True
        self._refused = None

    def _forbidden(self, response: aiohttp.ClientResponse) -> Challenge | None:
        challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
        return challenge if challenge is not None and challenge.error == "insufficient_scope" else None

    async def send(
        self,
        transmit: Transmit,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None,
        **options: Any,
    ) -> aiohttp.ClientResponse:
        """Send with the access token; refresh and send once more on a 401 about the token.

        ``options`` are the transport's (stream, resendable, ...), passed through unchanged.
        """
        grant = await self._usable()

        async def reauthorize(final: bool) -> dict[str, str] | None:
            # A request the transport retries (the upstream refusing connections while it restarts)
            # takes the token again: the one chosen before the wait may have expired meanwhile. An
            # authorization server down with the upstream (one process) lets the transport wait on.
            nonlocal grant
            try:
                grant = await self._usable()
            except AuthServerUnavailable:
                if final:
                    raise
                return None
            return _authorized(headers, grant)

        response = await transmit(method, _authorized(headers, grant), body, reauthorize=reauthorize, **options)
        if _is_token_challenge(response):
            # Refused before it was processed: sending it again cannot run anything twice.
            response.release()
            grant = await self._refreshed(grant.access_token, "http_401")
            response = await transmit(method, _authorized(headers, grant), body, reauthorize=reauthorize, **options)
            if _is_token_challenge(response):
                response.release()
                raise LoginRequired(self._hint("the upstream refuses the token even after a refresh"))
        if response.status == 403:
            challenge = self._forbidden(response)
            if challenge is not None:
                response.release()
                wanted = challenge.scope
                if wanted:
                    with contextlib.suppress(TokenFileError):
                        async with self._file.lock():
                            self._file.remember_wanted_scope(self._upstream.url, wanted)
                log.warning("auth.insufficient_scope", upstream=self._name, scope=wanted)
                needs = f"scope {wanted!r}" if wanted else "a wider scope"
                raise LoginRequired(
                    self._hint(f"the upstream needs {needs}, which the login did not grant; log in again")
                )
        return response


def _retrieve(task: asyncio.Task[Grant]) -> None:
    if not task.cancelled():
        task.exception()


def _authorized(headers: Mapping[str, str], grant: Grant) -> dict[str, str]:
    """The request's headers with the proxy's bearer token in place of any the client sent."""
    sent = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    sent["Authorization"] = f"Bearer {grant.access_token}"
    return sent


def managed_auth(upstream: UpstreamConfig, state: str) -> ManagedAuth | None:
    """The hook for an upstream with ``auth = "oauth"``; None for any other."""
    if upstream.auth != "oauth":
        return None
    token_file = TokenFile(tokens_directory(state), upstream.name)
    with contextlib.suppress(TokenFileError):
        if token_file.load(upstream.url) is None:
            log.warning(
                "auth.not_logged_in",
                upstream=upstream.name,
                hint=f"run `{login_command(upstream, state)}`; until then its requests get an error",
            )
    return ManagedAuth(upstream, token_file, state)
