"""``mcp-heal-proxy login NAME`` and ``logout NAME``: the authorization code flow with PKCE (S256)
against the upstream's authorization server, as an MCP client would, through the loopback callback
(RFC 8252 section 7.3) or an address pasted on stdin; ``--device`` runs device.py's flow instead. The
grant is stored in the token file (tokens.py) for ``serve`` (managed.py); ``logout`` revokes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import webbrowser
from dataclasses import replace
from typing import Final, TextIO

import aiohttp
from aiohttp import web

from mcp_heal_proxy.auth.endpoints import (
    RegisteredClient,
    base_grant,
    discover,
    failure_reason,
    grant_from,
    http_client,
    register,
    revoke_grant,
    token_request,
)
from mcp_heal_proxy.auth.errors import LoginError, TokenRefused
from mcp_heal_proxy.auth.paste import read_pasted
from mcp_heal_proxy.auth.rules import OFFLINE_ACCESS, pkce_pair, token_auth_method, with_query
from mcp_heal_proxy.auth.tokens import Grant, TokenFile, TokenFileError, tokens_directory
from mcp_heal_proxy.config import MEMORY_STATE, ConfigError, ProxyConfig, UpstreamConfig, login_command
from mcp_heal_proxy.constant_time import same_secret
from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.errors import connection_failure
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.tls import tls_context

# How long ``login`` waits for the browser to come back to the loopback callback.
LOGIN_TIMEOUT: Final = 300.0
# A login waiting for another one gives it its whole browser wait, plus this for its token request.
LOGIN_LOCK_SLACK: Final = 60.0
CALLBACK_PATH: Final = "/callback"


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
        if not same_secret(params.get("state", ""), self._state):
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


def say(out: TextIO, line: str) -> None:
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
            say(out, f"Another login of {upstream.name} finished meanwhile; using its tokens.")
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
    async with http_client(tls_context(upstream), proxy=upstream.proxy) as http:
        found = await discover(http, upstream.url, lambda line: say(out, line))
        metadata = found.metadata
        methods = metadata.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise LoginError("the authorization server does not support PKCE with S256; refusing to log in")
        authorize = metadata.get("authorization_endpoint")
        token_endpoint = metadata.get("token_endpoint")
        if not isinstance(authorize, str) or not isinstance(token_endpoint, str):
            raise LoginError("the authorization server metadata lacks authorization_endpoint or token_endpoint")
        scopes = found.scopes(upstream, previous)
        state = secrets.token_urlsafe(24)
        callback = _Callback(state, again)
        await callback.start(upstream.callback_port or 0)
        try:
            if upstream.client_id:
                client = RegisteredClient(upstream.client_id, upstream.client_secret, None)
            else:
                client = await register(http, metadata, scopes, redirect_uri=callback.redirect_uri)
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
            url = with_query(authorize, params)
            say(out, f"Log in to {upstream.name} ({mask_url(upstream.url)}) by opening this URL in a browser:")
            say(out, url)
            say(out, f"Waiting for the authorization server to redirect to {callback.redirect_uri} ...")
            if pasted is not None:
                say(
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
        expected_issuer = found.issuer  # discovery checked that the metadata names exactly this one
        if iss is not None and iss != expected_issuer:
            # RFC 9207: an answer from another authorization server (a mix-up attack) is not used; its
            # section 2.4 asks for a simple string comparison, so no normalising of a trailing '/'.
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
                answer_tokens = await token_request(
                    http, token_endpoint, dict(form), client.client_id, client.secret, method
                )
            except TokenRefused as exc:
                if not _try_post_instead(exc, client, method, supported):
                    raise
                # A pre-registered client whose method nobody told us: client_secret_basic was refused
                # as a client authentication (the code is not spent then), so try client_secret_post.
                method = "client_secret_post"
                answer_tokens = await token_request(
                    http, token_endpoint, dict(form), client.client_id, client.secret, method
                )
        except TokenRefused as exc:
            raise LoginError(f"the token endpoint refused the authorization code: {exc.error}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LoginError(
                f"cannot reach the token endpoint {mask_url(token_endpoint)}: {failure_reason(exc, token_endpoint)}"
            ) from None
    grant = grant_from(answer_tokens, replace(base, auth_method=method))
    async with token_file.lock():
        token_file.save(grant)
    return grant


async def _answer(
    callback: _Callback, pasted: asyncio.StreamReader | None, state: str, out: TextIO, wait: float
) -> dict[str, str]:
    """The authorization answer: at the loopback callback, or pasted, whichever comes first, within ``wait``."""
    waiting: list[asyncio.Future[dict[str, str]]] = [callback.answer]
    # The reader of pasted lines lives as long as this wait: cancelled once an answer came.
    reader = TaskOwner()
    if pasted is not None:
        waiting.append(reader.spawn(read_pasted(pasted, state, out), name="login-pasted-answer"))
    try:
        done, _ = await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await reader.close()
    if not done:
        raise LoginError(f"no answer on {callback.redirect_uri} within {wait:.0f} s")
    return done.pop().result()


def _try_post_instead(refused: TokenRefused, client: RegisteredClient, method: str, supported: object) -> bool:
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
    say(out, f"Logged in to {name}; tokens saved in {token_file.path}")
    return 0


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
                say(out, await _revoke_for_logout(grant, upstream))
                existed = token_file.delete()
    except TokenFileError as exc:
        raise LoginError(str(exc)) from None
    say(out, f"Logged out of {upstream.name}." if existed else f"Not logged in to {upstream.name}.")
    return 0


async def _revoke_for_logout(grant: Grant, upstream: UpstreamConfig) -> str:
    """Revoke the grant's tokens when the authorization server lets us; one line saying what happened."""
    if grant.revocation_endpoint is None:
        return (
            "The authorization server offers no token revocation (or the login predates it): its tokens "
            "are deleted here and stay valid there until they expire."
        )
    try:
        revoked = await revoke_grant(grant, upstream)
    except TokenRefused as exc:
        return f"The authorization server refused to revoke the tokens ({exc.error}): deleted here only."
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = connection_failure(exc).words
        return f"Cannot reach the authorization server to revoke the tokens ({why}): deleted here only."
    if not revoked:
        if grant.access_token or grant.refresh_token:
            return (
                "The authorization server does not revoke these tokens (unsupported_token_type): deleted here "
                "only; they stay valid there until they expire."
            )
        return "No token to revoke."
    done = f"Revoked the {' and '.join(revoked)} at the authorization server."
    if grant.access_token and "access token" not in revoked:
        done += " It does not revoke access tokens: the last one stays valid until it expires."
    return done
