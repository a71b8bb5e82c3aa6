"""OAuth pass-through: the client logs in itself, against the proxy's URL.

For each upstream with ``oauth_pass_through`` on, the proxy
- serves the upstream's protected-resource metadata at its own path-aware and root well-known URLs,
  with ``resource`` = the URL the client dialed;
- points the ``WWW-Authenticate`` of the upstream's 401 and 403 answers at that metadata;
- in ``stand-in`` mode (the default) names itself as the authorization server: its metadata is the
  upstream authorization server's with the endpoints moved to the proxy, ``/authorize`` redirects to
  the upstream's with ``resource`` mapped from the proxy's URL to the upstream's, and ``/token``,
  ``/register``, ``/revoke`` are forwarded with the same mapping. Tokens are then minted for the
  upstream's own URL, which upstreams that check the audience insist on.
- answers a GET without session or credentials (Codex's probe) with the challenge the upstream would
  give, so that discovery goes on.

The client's ``Authorization`` goes upstream untouched (upstream/client.py), and nothing here logs a header
value, a request body or a token answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp import web

from mcp_heal_proxy.auth.bodies import OAUTH_BODY_LIMIT, BodyTooLarge, request_body, response_body
from mcp_heal_proxy.auth.discovery import MetadataUnavailable, UpstreamMetadata
from mcp_heal_proxy.auth.metadata import (
    AUTHORIZATION_SERVER_WELL_KNOWN,
    OPENID_WELL_KNOWN,
    PROTECTED_RESOURCE_WELL_KNOWN,
    STAND_IN_PREFIX,
    bearer_param,
    dialed_origin,
    is_trusted,
    map_resource,
    parse_networks,
    protected_resource_metadata_url,
    rewrite_authorization_server,
    rewrite_challenge,
    rewrite_protected_resource,
)
from mcp_heal_proxy.config import ProxyConfig, UpstreamConfig
from mcp_heal_proxy.constant_time import same_secret
from mcp_heal_proxy.errors import UpstreamUnavailable, connection_failure
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.proxy import oauth_client
from mcp_heal_proxy.upstream.tls import tls_context, tls_failure
from mcp_heal_proxy.wire import jsonrpc
from mcp_heal_proxy.wire.headers import MCP_SESSION_ID
from mcp_heal_proxy.wire.responses import json_error

log = structlog.get_logger("mcp_heal_proxy.auth")

# Token, registration and revocation requests are small forms or JSON documents.
FORM_LIMIT: Final = OAUTH_BODY_LIMIT
FORWARD_TIMEOUT: Final = aiohttp.ClientTimeout(total=30.0, sock_connect=5.0)
# Headers of the authorization server's answers that the client needs; the rest stays behind.
_ANSWER_HEADERS: Final = ("Content-Type", "Cache-Control", "Pragma", "WWW-Authenticate", "Location")
_CHALLENGE_STATUSES: Final = frozenset({401, 403})
# Authorizations the stand-in relays through its own callback (RFC 9207 upstreams): a login takes
# minutes at most; the bound keeps abandoned ones from piling up.
PENDING_TTL: Final = 600.0
PENDING_LIMIT: Final = 1000
ISS_SUPPORTED: Final = "authorization_response_iss_parameter_supported"


def relays_redirect(server: Mapping[str, Any]) -> bool:
    """Whether the stand-in must receive the upstream's authorization redirect itself.

    An authorization server that sends RFC 9207 ``iss`` names itself in the redirect; a client that
    was told the proxy is its authorization server refuses that. The proxy then takes the redirect at
    its own callback, checks ``iss`` there, and hands the client the code with its own ``iss``.
    """
    return server.get(ISS_SUPPORTED) is True


def with_offline_consent(pairs: list[tuple[str, str]], server: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The authorization request's parameters, with ``prompt=consent`` added when the client asks an
    OpenID provider for ``offline_access`` and says nothing of ``prompt``.

    The stand-in advertises ``offline_access`` in its own name, as a plain OAuth server would grant
    it; an OpenID provider ignores it unless the user is asked to consent (OpenID Connect Core 1.0
    section 11), and then issues no refresh token. Clients that send no ``prompt`` (Codex) would get
    logins that end at the first token expiry. A ``prompt`` the client chose is left alone.
    """
    scopes_supported = server.get("scopes_supported")
    if not isinstance(scopes_supported, list) or "openid" not in scopes_supported:
        return pairs
    asked = dict(pairs)
    if "offline_access" not in asked.get("scope", "").split() or "prompt" in asked:
        return pairs
    return [*pairs, ("prompt", "consent")]


# Clients whose registrations the proxy remembers (the most recent ones): a bound on what /register,
# open to anyone, can make it keep.
REGISTERED_LIMIT: Final = 10_000


def redirect_tag(redirect_uri: str) -> str:
    """The path segment naming one client redirect URI in the proxy's callback URL.

    At registration the proxy registers ``.../callback/<tag>`` for each redirect URI the client
    registers, and at ``/authorize`` it sends the upstream ``.../callback/<tag of the redirect_uri
    asked for>``: the upstream's authorization server then accepts the authorization only if the
    client registered that exact redirect URI (its own exact match, RFC 6749 4.1.2.1), which holds
    across proxy restarts. A digest, not a secret: nobody can add a URI to another client's
    registration, so knowing the tag of an attacker's URI gains nothing.
    """
    digest = hashlib.sha256(redirect_uri.encode()).digest()[:18]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class _Registered:
    """Redirect URIs of the clients that registered through this proxy (since it started), bounded.

    Lets ``/authorize`` refuse a redirect URI the client never registered at once, without sending
    the browser anywhere. Clients registered before a restart are not here; for them the upstream's
    exact match on the tagged callback (``redirect_tag``) is the check.
    """

    def __init__(self) -> None:
        self._clients: OrderedDict[str, frozenset[str]] = OrderedDict()

    def add(self, client_id: str, redirect_uris: list[str]) -> None:
        self._clients[client_id] = frozenset(redirect_uris)
        self._clients.move_to_end(client_id)
        while len(self._clients) > REGISTERED_LIMIT:
            self._clients.popitem(last=False)

    def allows(self, client_id: str, redirect_uri: str) -> bool | None:
        """Whether the client registered this exact redirect URI; None when the client is not known here."""
        uris = self._clients.get(client_id)
        return None if uris is None else redirect_uri in uris


@dataclass(frozen=True, slots=True)
class _Authorization:
    """One relayed authorization: what the client asked for, and the callback URL the upstream saw."""

    client_id: str
    redirect_uri: str
    state: str | None
    callback: str
    expires: float


class _Pending:
    """Relayed authorizations: the proxy's state key -> the authorization; and, once the upstream
    issued it, the code -> the authorization (the token request must name the same redirect URI)."""

    def __init__(self) -> None:
        self.states: OrderedDict[str, _Authorization] = OrderedDict()
        self.codes: OrderedDict[str, _Authorization] = OrderedDict()

    @staticmethod
    def _trim(table: OrderedDict[str, _Authorization]) -> None:
        now = time.monotonic()
        while table and (len(table) > PENDING_LIMIT or next(iter(table.values())).expires < now):
            table.popitem(last=False)

    def start(self, client_id: str, redirect_uri: str, state: str | None, callback: str) -> str:
        key = secrets.token_urlsafe(24)
        self.states[key] = _Authorization(client_id, redirect_uri, state, callback, time.monotonic() + PENDING_TTL)
        self._trim(self.states)
        return key

    def finish(self, key: str) -> _Authorization | None:
        self._trim(self.states)
        return self.states.pop(key, None)

    def remember_code(self, code: str, authorization: _Authorization) -> None:
        self.codes[code] = replace(authorization, expires=time.monotonic() + PENDING_TTL)
        self._trim(self.codes)

    def redeem(self, code: str) -> _Authorization | None:
        """The authorization a code was issued for, once: a second token request with it finds none."""
        self._trim(self.codes)
        return self.codes.pop(code, None)


def oauth_error(status: int, error: str, description: str) -> web.Response:
    """An OAuth-style JSON error (RFC 6749 section 5.2), what OAuth clients parse."""
    return web.json_response(
        {"error": error, "error_description": description}, status=status, headers={"Cache-Control": "no-store"}
    )


def metadata_error(exc: MetadataUnavailable) -> web.Response:
    """No metadata to serve: a JSON-RPC error body like the proxy's other unknown paths (404), or 502."""
    if exc.missing:
        return json_error(404, jsonrpc.METHOD_NOT_FOUND, exc.message)
    return json_error(UpstreamUnavailable.http_status, UpstreamUnavailable.code, exc.message)


def _passes_through(upstream: UpstreamConfig) -> bool:
    """Whether clients log in to this upstream themselves (through the proxy).

    Not when the proxy logs in for them (a managed login, ``auth = "oauth"``): then no client may be
    shown an OAuth challenge or metadata for it.
    """
    return upstream.oauth_pass_through != "off" and getattr(upstream, "auth", None) != "oauth"


class _Upstream:
    """What the pass-through knows of one upstream."""

    __slots__ = ("_http", "config", "metadata", "pending", "registered", "stand_in")

    def __init__(self, config: UpstreamConfig, tasks: TaskOwner) -> None:
        self.config = config
        # Its own client (made while the app runs): the upstream's TLS settings (ca_file, client_cert)
        # apply to its metadata, token, revocation and registration requests as to its MCP requests.
        self._http: aiohttp.ClientSession | None = None
        self.stand_in = config.oauth_pass_through == "stand-in"
        self.metadata = UpstreamMetadata(config.url, config.name, tasks)
        self.pending = _Pending()
        self.registered = _Registered()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "the app is not running"
        return self._http


class OAuthPassThrough:
    """The pass-through's routes and hooks for every upstream that has it on."""

    def __init__(self, config: ProxyConfig) -> None:
        self._networks = parse_networks(config.trusted_proxies)
        self._fallback_host = f"{config.host}:{config.port}"
        # The metadata fetches in flight, cancelled when the app stops (before its HTTP client closes).
        self._tasks = TaskOwner()
        self._by_path = {u.path: _Upstream(u, self._tasks) for u in config.upstreams if _passes_through(u)}
        # The upstream the origin's root well-known URLs describe: the one at /mcp, else the only one.
        root = self._by_path.get("/mcp")
        if root is None and len(self._by_path) == 1:
            root = next(iter(self._by_path.values()))
        self._root = root

    @property
    def enabled(self) -> bool:
        return bool(self._by_path)

    def install(self, app: web.Application) -> None:
        """Add the routes, the HTTP client for metadata and forwarding, and the challenge hook."""
        app.cleanup_ctx.append(self._http_client)
        app.on_response_prepare.append(self._rewrite_challenge)
        for path, upstream in self._by_path.items():
            app.router.add_get(PROTECTED_RESOURCE_WELL_KNOWN + path, self._handler(self._protected_resource, upstream))
            if not upstream.stand_in:
                continue
            for well_known in (
                AUTHORIZATION_SERVER_WELL_KNOWN + path,
                OPENID_WELL_KNOWN + path,
                path.rstrip("/") + OPENID_WELL_KNOWN,
            ):
                app.router.add_get(well_known, self._handler(self._authorization_server, upstream))
            prefix = f"{STAND_IN_PREFIX}{path}"
            app.router.add_get(f"{prefix}/authorize", self._handler(self._authorize, upstream))
            app.router.add_get(f"{prefix}/callback/{{tag}}", self._handler(self._callback, upstream))
            app.router.add_post(f"{prefix}/token", self._handler(self._forward_form, upstream, "token_endpoint"))
            app.router.add_post(f"{prefix}/revoke", self._handler(self._forward_form, upstream, "revocation_endpoint"))
            app.router.add_post(f"{prefix}/register", self._handler(self._register, upstream))
        if self._root is not None and "/" not in self._by_path:
            root = self._root
            app.router.add_get(PROTECTED_RESOURCE_WELL_KNOWN, self._handler(self._protected_resource, root))
            if root.stand_in:
                # Codex asks the MCP URL's origin for authorization-server metadata as well.
                app.router.add_get(AUTHORIZATION_SERVER_WELL_KNOWN, self._handler(self._authorization_server, root))

    async def _http_client(self, app: web.Application) -> AsyncIterator[None]:
        upstreams = list(self._by_path.values())
        for upstream in upstreams:
            upstream._http = oauth_client(
                tls_context(upstream.config), upstream.config.proxy, cookie_jar=aiohttp.DummyCookieJar()
            )
        try:
            yield
        finally:
            await self._tasks.close()
            for upstream in upstreams:
                if upstream._http is not None:
                    await upstream._http.close()
                    upstream._http = None

    @staticmethod
    def _handler(
        handler: Callable[..., Awaitable[web.StreamResponse]], upstream: _Upstream, *args: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """An aiohttp handler that calls ``handler`` with this upstream (and ``args``)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await handler(request, upstream, *args)

        return handle

    def _origin(self, request: web.Request) -> str:
        return self.origin_of(request.remote, request.scheme, request.host, request.headers)

    def origin_of(self, remote: str | None, scheme: str, host: str | None, headers: Mapping[str, str]) -> str:
        """The origin the client dialed (behind a trusted reverse proxy: the one it says was dialed)."""
        trusted = is_trusted(remote, self._networks)
        return dialed_origin(scheme, host, headers, trusted=trusted, fallback_host=self._fallback_host)

    # --- the resource server's side ---------------------------------------------------------------

    async def _protected_resource(self, request: web.Request, upstream: _Upstream) -> web.StreamResponse:
        try:
            document = await upstream.metadata.protected_resource(upstream.http)
        except MetadataUnavailable as exc:
            return metadata_error(exc)
        origin = self._origin(request)
        path = upstream.config.path
        server = origin + path if upstream.stand_in else None
        return web.json_response(rewrite_protected_resource(document, origin + path, server))

    async def _rewrite_challenge(self, request: web.Request, response: web.StreamResponse) -> None:
        """Point an upstream challenge at the proxy's metadata (on_response_prepare: every response)."""
        rewritten = self.challenge_to_send(
            request.path, lambda: self._origin(request), response.status, response.headers.get("WWW-Authenticate")
        )
        if rewritten is not None:
            response.headers["WWW-Authenticate"] = rewritten

    def challenge_to_send(self, path: str, origin: Callable[[], str], status: int, challenge: str | None) -> str | None:
        """The challenge to send instead of an upstream's on ``path``, pointing at the proxy's metadata
        (``origin`` gives the origin the client dialed); None to send it as it is. Both HTTP servers
        (aiohttp's, the proxy's own) ask this one rule."""
        if status not in _CHALLENGE_STATUSES or not challenge:
            return None
        upstream = self._by_path.get(path)
        if upstream is None:
            return None
        metadata_url = protected_resource_metadata_url(origin(), upstream.config.path)
        hint = bearer_param(challenge, "resource_metadata")
        if hint == metadata_url:
            return None  # the proxy's own challenge (challenge_for_probe), already pointing here
        upstream.metadata.remember_hint(hint)
        return rewrite_challenge(challenge, metadata_url)

    async def challenge_for_probe(self, request: web.Request) -> web.StreamResponse | None:
        """A 401 for a GET with neither session nor credentials, when the upstream needs a login.

        Codex probes the MCP URL this way before it logs in; the proxy would otherwise answer 400
        (a GET needs a session), which tells it nothing about authorization.
        """
        upstream = self._by_path.get(request.path)
        if upstream is None or MCP_SESSION_ID in request.headers or "Authorization" in request.headers:
            return None
        try:
            await upstream.metadata.protected_resource(upstream.http)
        except MetadataUnavailable:
            return None
        metadata_url = protected_resource_metadata_url(self._origin(request), upstream.config.path)
        refusal = oauth_error(401, "invalid_token", "Authentication required")
        refusal.headers["WWW-Authenticate"] = rewrite_challenge("Bearer", metadata_url)
        return refusal

    # --- the stand-in authorization server ---------------------------------------------------------

    async def _upstream_server(self, request: web.Request, upstream: _Upstream) -> dict[str, Any]:
        return await upstream.metadata.authorization_server(upstream.http)

    async def _upstream_resource(self, request: web.Request, upstream: _Upstream) -> str:
        document = await upstream.metadata.protected_resource(upstream.http)
        resource: str = document["resource"]
        return resource

    async def _authorization_server(self, request: web.Request, upstream: _Upstream) -> web.StreamResponse:
        try:
            document = await self._upstream_server(request, upstream)
        except MetadataUnavailable as exc:
            return metadata_error(exc)
        return web.json_response(rewrite_authorization_server(document, self._origin(request), upstream.config.path))

    async def _authorize(self, request: web.Request, upstream: _Upstream) -> web.StreamResponse:
        """Redirect to the upstream's authorization endpoint, ``resource`` mapped, ``prompt=consent``
        added for an OpenID provider's ``offline_access`` (``with_offline_consent``), all else untouched.

        When the proxy relays the upstream's redirect (RFC 9207 upstreams), the ``redirect_uri`` the
        request names is where the proxy will send the code: it must be one this client registered,
        character for character (RFC 6749 4.1.2.1 and 10.6, RFC 9700 4.1), or a crafted link would
        send a logged-in user's code to whoever wrote it. A redirect URI the proxy knows the client did
        not register is refused here, with an error page and no redirect; one of a client the proxy
        does not know (registered before a restart, or never through it) goes to the upstream as the
        tagged callback of that exact URI, which the upstream's server refuses unless that client
        registered it through the proxy.
        """
        try:
            server = await self._upstream_server(request, upstream)
            resource = await self._upstream_resource(request, upstream)
        except MetadataUnavailable as exc:
            return oauth_error(502, "temporarily_unavailable", exc.message)
        pairs = parse_qsl(request.query_string, keep_blank_values=True)
        mapped = [(k, map_resource(v, upstream.config.path, resource) if k == "resource" else v) for k, v in pairs]
        mapped = with_offline_consent(mapped, server)
        if relays_redirect(server):
            asked = dict(pairs)
            client_id, redirect_uri = asked.get("client_id"), asked.get("redirect_uri")
            if not client_id or not redirect_uri:
                return oauth_error(400, "invalid_request", "client_id and redirect_uri are required")
            if upstream.registered.allows(client_id, redirect_uri) is False:
                log.warning("oauth.redirect_uri_refused", upstream=upstream.config.name)
                return oauth_error(400, "invalid_request", "redirect_uri is not one this client registered")
            callback = self._callback_url(request, upstream, redirect_uri)
            key = upstream.pending.start(client_id, redirect_uri, asked.get("state"), callback)
            relayed = {"redirect_uri": callback, "state": key}
            mapped = [(k, relayed.get(k, v)) for k, v in mapped]
            if "state" not in asked:
                mapped.append(("state", key))
        target = urlsplit(server["authorization_endpoint"])
        query = "&".join(q for q in (target.query, urlencode(mapped)) if q)
        location = urlunsplit((target.scheme, target.netloc, target.path, query, ""))
        raise web.HTTPFound(location, headers={"Cache-Control": "no-store"})

    def _callback_url(self, request: web.Request, upstream: _Upstream, redirect_uri: str) -> str:
        """The proxy's callback for one client redirect URI (see ``redirect_tag``)."""
        return f"{self._origin(request)}{STAND_IN_PREFIX}{upstream.config.path}/callback/{redirect_tag(redirect_uri)}"

    async def _callback(self, request: web.Request, upstream: _Upstream) -> web.StreamResponse:
        """The upstream's authorization redirect (RFC 9207 upstreams): check ``iss``, pass the code on."""
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        found = upstream.pending.finish(query.get("state", ""))
        if found is None or not same_secret(request.match_info["tag"], redirect_tag(found.redirect_uri)):
            return oauth_error(400, "invalid_request", "unknown or expired authorization")
        try:
            server = await self._upstream_server(request, upstream)
        except MetadataUnavailable as exc:
            return oauth_error(502, "temporarily_unavailable", exc.message)
        answer = {k: v for k, v in query.items() if k not in ("state", "iss")}
        if query.get("iss") != server.get("issuer"):
            # A mix-up (RFC 9207 section 2.4): the code did not come from the upstream's server.
            answer = {"error": "access_denied", "error_description": "authorization response from another issuer"}
        elif "code" in answer:
            upstream.pending.remember_code(answer["code"], found)
        if found.state is not None:
            answer["state"] = found.state
        answer["iss"] = self._origin(request) + upstream.config.path
        target = urlsplit(found.redirect_uri)
        query_string = "&".join(q for q in (target.query, urlencode(answer)) if q)
        location = urlunsplit((target.scheme, target.netloc, target.path, query_string, ""))
        raise web.HTTPFound(location, headers={"Cache-Control": "no-store"})

    async def _forward_form(self, request: web.Request, upstream: _Upstream, endpoint_key: str) -> web.StreamResponse:
        """Forward a token or revocation request (a form) with ``resource`` mapped."""
        try:
            server = await self._upstream_server(request, upstream)
            resource = await self._upstream_resource(request, upstream)
        except MetadataUnavailable as exc:
            return oauth_error(502, "temporarily_unavailable", exc.message)
        endpoint = server.get(endpoint_key)
        if not isinstance(endpoint, str):
            return oauth_error(404, "unsupported", f"the upstream's authorization server has no {endpoint_key}")
        body = await _read_small(request)
        if body is None:
            return oauth_error(413, "invalid_request", "request body too large")
        pairs = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        mapped = [(k, map_resource(v, upstream.config.path, resource) if k == "resource" else v) for k, v in pairs]
        form = dict(pairs)
        code = form.get("code") if form.get("grant_type") == "authorization_code" else None
        relayed = upstream.pending.redeem(code) if code else None
        if relayed is not None:
            # The upstream issued this code to the proxy's callback. The token request must name the
            # redirect URI the authorization request named (RFC 6749 4.1.3), and the upstream must see
            # the callback it redirected to.
            if form.get("redirect_uri") != relayed.redirect_uri:
                return oauth_error(400, "invalid_grant", "redirect_uri differs from the authorization request's")
            if "client_id" in form and form["client_id"] != relayed.client_id:
                return oauth_error(400, "invalid_grant", "the code was issued to another client")
            mapped = [(k, relayed.callback if k == "redirect_uri" else v) for k, v in mapped]
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        return await self._forward(request, upstream, endpoint, urlencode(mapped).encode(), headers)

    async def _register(self, request: web.Request, upstream: _Upstream) -> web.StreamResponse:
        """Forward a dynamic client registration as it is."""
        try:
            server = await self._upstream_server(request, upstream)
        except MetadataUnavailable as exc:
            return oauth_error(502, "temporarily_unavailable", exc.message)
        endpoint = server.get("registration_endpoint")
        if not isinstance(endpoint, str):
            return oauth_error(404, "unsupported", "the upstream's authorization server offers no registration")
        body = await _read_small(request)
        if body is None:
            return oauth_error(413, "invalid_client_metadata", "request body too large")
        headers = {
            "Content-Type": request.headers.get("Content-Type", "application/json"),
            "Accept": "application/json",
        }
        if not relays_redirect(server):
            return await self._forward(request, upstream, endpoint, body, headers)
        # The upstream will redirect to the proxy's callback: register the callback of each of the
        # client's redirect URIs (redirect_tag) beside them.
        try:
            registration = json.loads(body)
            redirect_uris = list(registration["redirect_uris"])
        except (ValueError, KeyError, TypeError):
            return oauth_error(400, "invalid_client_metadata", "redirect_uris is required")
        if not redirect_uris or not all(isinstance(uri, str) and uri for uri in redirect_uris):
            return oauth_error(400, "invalid_redirect_uri", "redirect_uris must be a list of URIs")
        callbacks = [self._callback_url(request, upstream, uri) for uri in redirect_uris]
        registration["redirect_uris"] = [*redirect_uris, *callbacks]
        answer = await self._forward(request, upstream, endpoint, json.dumps(registration).encode(), headers)
        try:
            registered = json.loads(answer.body if isinstance(answer.body, bytes) else b"")
        except ValueError:
            return answer
        if isinstance(registered, dict) and "redirect_uris" in registered:
            registered["redirect_uris"] = redirect_uris  # the client sees what it asked for
            answer.body = json.dumps(registered).encode()
            if answer.status in (200, 201) and isinstance(registered.get("client_id"), str):
                upstream.registered.add(registered["client_id"], redirect_uris)
        return answer

    async def _forward(
        self, request: web.Request, upstream: _Upstream, url: str, body: bytes, headers: dict[str, str]
    ) -> web.Response:
        # client_secret_basic, or a registration's initial access token.
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        try:
            async with upstream.http.post(
                url, data=body, headers=headers, timeout=FORWARD_TIMEOUT, allow_redirects=False
            ) as answer:
                try:
                    content = await response_body(answer, FORM_LIMIT)
                except BodyTooLarge:
                    return oauth_error(502, "server_error", "the authorization server's answer is too large")
                passed = {name: answer.headers[name] for name in _ANSWER_HEADERS if name in answer.headers}
                return web.Response(status=answer.status, body=content, headers=passed)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            refused = tls_failure(exc, urlsplit(url).hostname or "")
            log.warning("oauth.forward_failed", path=request.path, error=refused or connection_failure(exc).words)
            if refused is not None:
                return oauth_error(502, "temporarily_unavailable", f"the upstream's authorization server: {refused}")
            return oauth_error(502, "temporarily_unavailable", "the upstream's authorization server did not answer")


async def _read_small(request: web.Request) -> bytes | None:
    """The whole request body, or None when it is larger than a form or registration can be."""
    try:
        return await request_body(request, FORM_LIMIT)
    except BodyTooLarge:
        return None
