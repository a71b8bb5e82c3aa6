"""The official MCP Python SDK server behind OAuth, run as a separate process for the tests.

Run it as ``python tests/oauth_server.py --port N [options]``. One process is both the resource server
(``/mcp``, protected-resource metadata at ``/.well-known/oauth-protected-resource/mcp``) and an
auto-approving authorization server (``/authorize`` redirects straight back with a code; ``/token``,
``/register``, ``/revoke``; metadata at ``/.well-known/oauth-authorization-server``): dynamic client
registration, PKCE S256, rotating refresh tokens, short access-token lifetimes.

Options:
- ``--strict-audience``: the MCP endpoint accepts only tokens issued for its own URL (RFC 8707
  ``resource`` = ``http://127.0.0.1:N/mcp``), as servers that bind tokens to their resource do.
- ``--token-lifetime S``: access tokens expire after S seconds (refresh exercised).
- ``--state-file PATH``: clients and tokens are kept in this file, so that a restart (kill plus a new
  process on the same port) forgets every MCP session but keeps every issued token valid.
- ``--idle-timeout S``: MCP sessions idle this long are forgotten.
- ``--scopes a,b``: scopes the server knows; the first is required on ``/mcp`` (default ``mcp``).
- ``--step-up-scope S``: ``/mcp`` also requires S and answers 403 ``insufficient_scope`` without it
  (``POST /test/step-up?scope=S`` switches it at run time, empty to switch off).
- ``--no-refresh-tokens``: token answers carry no refresh token.
- ``--no-registration``: no dynamic client registration; ``--static-client ID[:SECRET]`` with
  ``--static-redirect-uri URI`` (repeatable) pre-registers a client.
- ``--send-iss``: authorization redirects carry the RFC 9207 ``iss`` parameter, and the metadata
  says so (``authorization_response_iss_parameter_supported``).

Test-only endpoints (no auth): ``GET /stats`` (counters, live MCP sessions, fingerprints of the tokens
that initialize requests carried), ``POST /test/revoke-refresh-tokens`` (every refresh token stops
working, as when the user revokes the grant), ``POST /test/step-up?scope=S``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    construct_redirect_uri,
)
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from pydantic import AnyUrl
from starlette.requests import Request
from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATS: dict[str, Any] = {
    "initialize": 0,
    "tools_call": 0,
    "registrations": 0,
    "authorizations": 0,
    "code_exchanges": 0,
    "refreshes": 0,
    "mcp_401": 0,
    "mcp_403": 0,
    # sha256 prefixes of the bearer tokens initialize requests carried (never the tokens themselves).
    "initialize_tokens": [],
    # The RFC 8707 resource each authorization request and each token request named.
    "authorize_resources": [],
    "token_resources": [],
}
REFRESH_LIFETIME = 24 * 3600
# Seconds an access token stays accepted after the expires_in its client was given.
EXPIRY_LEEWAY = 1.0


def fingerprint(token: str) -> str:
    """A short, one-way name for a token that tests can compare."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class AutoApprovingProvider:
    """An authorization server that approves every request at once, keeping its state in a file."""

    def __init__(self, args: argparse.Namespace, issuer: str) -> None:
        self.args = args
        self.issuer = issuer
        self.scopes: list[str] = args.scopes.split(",")
        self.path: Path | None = Path(args.state_file) if args.state_file else None
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.load()
        if args.static_client:
            client_id, _, secret = args.static_client.partition(":")
            self.clients[client_id] = OAuthClientInformationFull(
                client_id=client_id,
                client_secret=secret or None,
                token_endpoint_auth_method="client_secret_post" if secret else "none",
                redirect_uris=[AnyUrl(uri) for uri in args.static_redirect_uri],
                scope=" ".join(self.all_scopes()),
            )

    def all_scopes(self) -> list[str]:
        return self.scopes + ([self.args.step_up_scope] if self.args.step_up_scope else [])

    # --- persistence (so that a restart keeps tokens valid) ---

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        data = json.loads(self.path.read_text())
        self.clients = {k: OAuthClientInformationFull.model_validate(v) for k, v in data["clients"].items()}
        self.codes = {k: AuthorizationCode.model_validate(v) for k, v in data["codes"].items()}
        self.access = {k: AccessToken.model_validate(v) for k, v in data["access"].items()}
        self.refresh = {k: RefreshToken.model_validate(v) for k, v in data["refresh"].items()}

    def save(self) -> None:
        if self.path is None:
            return
        data = {
            name: {k: v.model_dump(mode="json") for k, v in table.items()}
            for name, table in (
                ("clients", self.clients),
                ("codes", self.codes),
                ("access", self.access),
                ("refresh", self.refresh),
            )
        }
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(data))
        os.replace(partial, self.path)

    # --- OAuthAuthorizationServerProvider ---

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        # Auto-approve every known scope, so that a later step-up needs no new registration.
        client_info.scope = " ".join(self.all_scopes())
        self.clients[client_info.client_id] = client_info
        STATS["registrations"] += 1
        self.save()

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        assert client.client_id is not None
        code = secrets.token_urlsafe(32)
        self.codes[code] = AuthorizationCode(
            code=code,
            scopes=params.scopes or [self.scopes[0]],
            expires_at=time.time() + 300,
            client_id=client.client_id,
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
        )
        STATS["authorizations"] += 1
        STATS["authorize_resources"].append(params.resource)
        self.save()
        iss = self.issuer if self.args.send_iss else None
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state, iss=iss)

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        code = self.codes.get(authorization_code)
        return code if code is not None and code.client_id == client.client_id else None

    def _issue(self, client_id: str, scopes: list[str], resource: str | None) -> OAuthToken:
        access = secrets.token_urlsafe(32)
        lifetime = int(self.args.token_lifetime)
        self.access[access] = AccessToken(
            token=access,
            client_id=client_id,
            scopes=scopes,
            # Valid a little longer here than the client is told (as servers allow for clock skew):
            # the server must not refuse a token the client, counting expires_in from when it got the
            # answer, still holds valid; the Python SDK client would answer that 401 with a new login.
            expires_at=math.ceil(time.time() + lifetime + EXPIRY_LEEWAY),
            resource=resource,
        )
        refresh: str | None = None
        if not self.args.no_refresh_tokens:
            refresh = secrets.token_urlsafe(32)
            self.refresh[refresh] = RefreshToken(
                token=refresh,
                client_id=client_id,
                scopes=scopes,
                expires_at=int(time.time() + REFRESH_LIFETIME),
                resource=resource,
            )
        self.save()
        return OAuthToken(access_token=access, expires_in=lifetime, scope=" ".join(scopes), refresh_token=refresh)

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        assert client.client_id is not None
        self.codes.pop(authorization_code.code, None)
        STATS["code_exchanges"] += 1
        return self._issue(client.client_id, authorization_code.scopes, authorization_code.resource)

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> RefreshToken | None:
        token = self.refresh.get(refresh_token)
        if token is None or token.client_id != client.client_id:
            return None
        if token.expires_at is not None and token.expires_at < time.time():
            return None
        return token

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        assert client.client_id is not None
        # Rotation: the old refresh token is spent.
        self.refresh.pop(refresh_token.token, None)
        STATS["refreshes"] += 1
        return self._issue(client.client_id, scopes or refresh_token.scopes, refresh_token.resource)

    async def load_access_token(self, token: str) -> AccessToken | None:
        access = self.access.get(token)
        if access is None or (access.expires_at is not None and access.expires_at < time.time()):
            return None
        return access

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        self.access.pop(token.token, None)
        self.refresh.pop(token.token, None)
        self.save()


def origin_of(args: argparse.Namespace) -> str:
    return f"{'https' if args.certfile else 'http'}://127.0.0.1:{args.port}"


def build_server(args: argparse.Namespace) -> tuple[MCPServer, AutoApprovingProvider, dict[str, str | None]]:
    origin = origin_of(args)
    provider = AutoApprovingProvider(args, origin)
    step_up: dict[str, str | None] = {"scope": args.step_up_scope or None}
    server = MCPServer(
        "oauth-test-upstream",
        auth_server_provider=provider,  # type: ignore[arg-type]
        auth=AuthSettings(
            issuer_url=origin,  # type: ignore[arg-type]
            resource_server_url=f"{origin}/mcp",  # type: ignore[arg-type]
            client_registration_options=ClientRegistrationOptions(
                enabled=not args.no_registration, valid_scopes=provider.all_scopes()
            ),
            revocation_options=RevocationOptions(enabled=True),
            required_scopes=[provider.scopes[0]],
            validate_token_resource=args.strict_audience,
        ),
    )

    @server.tool()
    async def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def whoami() -> str:
        """The OAuth client id the caller's token was issued to."""
        from mcp.server.auth.middleware.auth_context import get_access_token

        token = get_access_token()
        return token.client_id if token is not None else "anonymous"

    @server.custom_route("/stats", methods=["GET"])  # type: ignore[untyped-decorator]
    async def stats(_: Request) -> JSONResponse:
        """Counters since start, and the live session ids (read from the SDK's private table)."""
        live = sorted(server.session_manager._server_instances)
        # pid: the tests know it is this process that answers on the port, not another one that took it.
        return JSONResponse({**STATS, "live_sessions": live, "step_up_scope": step_up["scope"], "pid": os.getpid()})

    @server.custom_route("/test/revoke-refresh-tokens", methods=["POST"])  # type: ignore[untyped-decorator]
    async def revoke_refresh_tokens(_: Request) -> JSONResponse:
        """Every refresh token stops working (the user revoked the grant at the provider)."""
        count = len(provider.refresh)
        provider.refresh.clear()
        provider.save()
        return JSONResponse({"revoked": count})

    @server.custom_route("/test/step-up", methods=["POST"])  # type: ignore[untyped-decorator]
    async def set_step_up(request: Request) -> JSONResponse:
        """Require one more scope on /mcp from now on (empty: none)."""
        step_up["scope"] = request.query_params.get("scope") or None
        return JSONResponse({"step_up_scope": step_up["scope"]})

    return server, provider, step_up


def instrumented(app: ASGIApp, provider: AutoApprovingProvider, step_up: dict[str, str | None], origin: str) -> ASGIApp:
    """Count what reaches /mcp, and enforce the step-up scope, before the SDK sees a request."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/mcp":
            await app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        authorization = headers.get("authorization", "")
        token = authorization[7:] if authorization.lower().startswith("bearer ") else None
        access = await provider.load_access_token(token) if token else None
        required = step_up["scope"]
        if access is not None and required and required not in access.scopes:
            STATS["mcp_403"] += 1
            challenge = (
                f'Bearer error="insufficient_scope", scope="{" ".join([*access.scopes, required])}", '
                f'resource_metadata="{origin}/.well-known/oauth-protected-resource/mcp", '
                f'error_description="Required scope: {required}"'
            )
            refusal = json.dumps({"error": "insufficient_scope", "error_description": f"Required scope: {required}"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", challenge.encode())],
                }
            )
            await send({"type": "http.response.body", "body": refusal.encode()})
            return

        body = b""
        if scope["method"] == "POST":
            chunks: list[bytes] = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            for item in parsed if isinstance(parsed, list) else [parsed]:
                if isinstance(item, dict) and item.get("method") == "initialize":
                    STATS["initialize"] += 1
                    STATS["initialize_tokens"].append(fingerprint(token) if token else None)
                if isinstance(item, dict) and item.get("method") == "tools/call":
                    STATS["tools_call"] += 1
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (401, 403):
                STATS[f"mcp_{message['status']}"] += 1
            await send(message)

        await app(scope, replay if scope["method"] == "POST" else receive, counting_send)

    return wrapped


def instrument_as(app: ASGIApp) -> ASGIApp:
    """Record the resource indicator of token requests (the SDK's handler does not pass it on)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/token" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        from urllib.parse import parse_qs

        resource = parse_qs(body.decode(errors="replace")).get("resource", [None])[0]
        STATS["token_resources"].append(resource)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    return wrapped


def advertising_iss(app: ASGIApp) -> ASGIApp:
    """Add RFC 9207 ``authorization_response_iss_parameter_supported`` to the SDK's AS metadata."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/.well-known/oauth-authorization-server":
            await app(scope, receive, send)
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def patching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                document = json.loads(body)
                document["authorization_response_iss_parameter_supported"] = True
                body = json.dumps(document).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await app(scope, receive, patching_send)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="answer with application/json, not SSE")
    parser.add_argument("--strict-audience", action="store_true")
    parser.add_argument("--token-lifetime", type=float, default=3600.0)
    parser.add_argument("--state-file", default=None)
    parser.add_argument("--idle-timeout", type=float, default=None, help="session idle TTL in seconds")
    parser.add_argument("--scopes", default="mcp")
    parser.add_argument("--step-up-scope", default=None)
    parser.add_argument("--no-refresh-tokens", action="store_true")
    parser.add_argument("--no-registration", action="store_true")
    parser.add_argument("--static-client", default=None, help="ID[:SECRET] of a pre-registered client")
    parser.add_argument("--static-redirect-uri", action="append", default=[])
    parser.add_argument("--send-iss", action="store_true")
    parser.add_argument("--certfile", help="serve https with this certificate (PEM, chain included)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    server, provider, step_up = build_server(args)
    app = server.streamable_http_app(
        json_response=args.json,
        session_idle_timeout=args.idle_timeout,
        host="127.0.0.1",
    )
    origin = origin_of(args)
    wrapped = instrument_as(instrumented(app, provider, step_up, origin))
    if args.send_iss:
        wrapped = advertising_iss(wrapped)
    tls = {"ssl_certfile": args.certfile, "ssl_keyfile": args.keyfile} if args.certfile else {}
    config = uvicorn.Config(wrapped, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on", **tls)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
