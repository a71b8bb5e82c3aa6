"""The official MCP Python SDK server as a resource server only: it accepts the JWT access tokens of an
outside authorization server (tests/interop/oidc_provider.mjs), checked against that server's keys.

Run it as ``python -m tests.interop.jwt_mcp_server --port N --issuer URL [--no-scopes]``. The token
check is strict: RS256 signed by a key of the issuer's JWKS, ``iss`` the issuer, ``aud`` exactly this
server's URL (``http://127.0.0.1:N/mcp``), not expired, with scope ``mcp``. Its protected-resource
metadata names the issuer and, unless ``--no-scopes``, ``scopes_supported: ["mcp"]``.

Test-only endpoint (no auth): ``GET /stats``, the initialize requests and 401 answers counted since
start, and fingerprints of the tokens the initialize requests carried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import jwt
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse

from tests.oauth_server import fingerprint

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATS: dict[str, Any] = {"initialize": 0, "tools_call": 0, "mcp_401": 0, "initialize_tokens": []}
SCOPE = "mcp"


class JwtVerifier:
    """Checks a JWT access token of ``issuer`` for ``audience`` (the SDK's TokenVerifier protocol)."""

    def __init__(self, issuer: str, audience: str) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = jwt.PyJWKClient(f"{issuer}/jwks", cache_keys=True, timeout=5)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = await asyncio.to_thread(self.keys.get_signing_key_from_jwt, token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud", "client_id"]},
            )
        except (jwt.PyJWTError, OSError):
            return None
        scopes = str(claims.get("scope", "")).split()
        return AccessToken(
            token=token,
            client_id=str(claims["client_id"]),
            scopes=scopes,
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=claims.get("sub"),
        )


def counting(app: ASGIApp) -> ASGIApp:
    """Count initialize requests (and their tokens) and 401 answers on /mcp."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/mcp" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        authorization = headers.get("authorization", "")
        token = authorization[7:] if authorization.lower().startswith("bearer ") else None
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
            if message["type"] == "http.response.start" and message["status"] == 401:
                STATS["mcp_401"] += 1
            await send(message)

        await app(scope, replay, counting_send)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--no-scopes", action="store_true", help="advertise and require no scope")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/mcp"
    server = MCPServer(
        "oidc-protected-upstream",
        token_verifier=JwtVerifier(args.issuer, url),
        auth=AuthSettings(
            issuer_url=args.issuer,
            resource_server_url=url,  # type: ignore[arg-type]
            required_scopes=None if args.no_scopes else [SCOPE],
            validate_token_resource=True,
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
        # pid: the tests know it is this process that answers on the port (tests/conftest.py ServerProcess).
        return JSONResponse({**STATS, "pid": os.getpid()})

    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(counting(app), host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
