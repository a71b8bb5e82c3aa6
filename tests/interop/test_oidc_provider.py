"""OAuth through the proxy against a real, certified OpenID Connect server: panva's oidc-provider as the
MCP server's authorization server (tests/interop/oidc.py), with PKCE S256 required, dynamic
registration, JWT access tokens whose audience is the MCP server (checked strictly), 2 s access
tokens, rotating refresh tokens, revocation, RFC 9207 ``iss`` and the device flow. Its login and
consent pages are completed by a headless browser (form posts).

Both ways of logging in go the whole way: log in, call a tool, the MCP server restarts (its sessions
die), the access token expires, the same session calls again (a heal and a refresh, no new login),
and the tokens are revoked at the end.
- pass-through: the Python SDK's ``OAuthClientProvider`` logs in through the proxy's stand-in (which
  relays the redirect, since oidc-provider sends ``iss``);
- managed login: ``mcp-heal-proxy login``, then the SDK client without OAuth; ``logout`` revokes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory, free_port, mcp_session, wait_until
from tests.interop.clients import run_codex
from tests.interop.conftest import NodeEnv
from tests.interop.conftest import ProxyFactory as ProcessProxyFactory
from tests.interop.fake_model import FIRST_CALL_ID, FIRST_TEXT, SECOND_CALL_ID, SECOND_TEXT
from tests.interop.oidc import (
    TOKEN_LIFETIME,
    AuthorizationServer,
    Browser,
    JwtUpstream,
    OidcUpstream,
    redirect_uri_of,
    require_oidc_provider,
)
from tests.interop.test_codex_oauth import APPROVE_TOOLS, CREDENTIALS_IN_FILE, codex_login, codex_oauth_binary  # noqa: F401
from tests.interop.test_ts_oauth import run_ts_oauth_client
from tests.managed_login import CLI, REPO_ROOT, child_env, login, serve
from tests.oauth_clients import REDIRECT_URI, HeadlessLogin, MemoryStorage, oauth_mcp_session
from tests.oauth_server import fingerprint
from tests.test_managed_login import NAME, stored, text_of, write_config

pytestmark = pytest.mark.interop

SCENARIO_TIMEOUT = 90.0
# The redirect URL of tests/interop/ts_oauth_client.mjs (never dialed).
TS_REDIRECT_URL = "http://127.0.0.1:9/callback"
# oidc-provider offers these; the proxy's stand-in cannot carry them, so it does not advertise them.
NOT_THROUGH_THE_STAND_IN = (
    "pushed_authorization_request_endpoint",
    "userinfo_endpoint",
    "end_session_endpoint",
    "device_authorization_endpoint",
    "dpop_signing_alg_values_supported",
    "token_endpoint_auth_signing_alg_values_supported",
)
# After the upstream restart, wait until the access token the client holds has expired, and a second
# more (the resource server allows no leeway, but clocks tick in whole seconds in a JWT).
EXPIRY_MARGIN = 1.0


OidcUpstreams = Callable[..., Awaitable[OidcUpstream]]


@pytest.fixture
async def oidc_upstreams(node_env: NodeEnv, tmp_path: Path) -> AsyncIterator[OidcUpstreams]:
    """Start oidc-provider (2 s access tokens unless ``token_lifetime`` says otherwise) and the MCP
    server it protects, with the MCP server's options (e.g. ``--no-scopes``); stops them all at the end."""
    require_oidc_provider(node_env)
    started: list[OidcUpstream] = []

    async def start(*options: str, token_lifetime: float = TOKEN_LIFETIME) -> OidcUpstream:
        mcp_port = free_port()
        resource = f"http://127.0.0.1:{mcp_port}/mcp"
        directory = tmp_path / f"oidc-{len(started)}"
        directory.mkdir()
        authorization_server = AuthorizationServer(
            node_env, resource, directory / "oidc-provider.log", token_lifetime=token_lifetime
        )
        mcp = JwtUpstream(mcp_port, authorization_server.issuer, directory / "jwt-mcp-server.log", *options)
        started.append(OidcUpstream(authorization_server, mcp))
        await authorization_server.start()
        await mcp.start()
        return started[-1]

    yield start
    for pair in started:
        await pair.mcp.stop()
        await pair.authorization_server.stop()


@pytest.fixture
async def oidc_upstream(oidc_upstreams: OidcUpstreams) -> OidcUpstream:
    """oidc-provider and the MCP server it protects (scope ``mcp`` advertised)."""
    return await oidc_upstreams()


class BrowserLogin(HeadlessLogin):
    """The SDK client's redirect and callback handlers, signing in at oidc-provider's pages."""

    def __init__(self, browser: Browser) -> None:
        super().__init__()
        self.browser = browser

    async def redirect(self, authorization_url: str) -> None:
        self.logins += 1
        self.callback_url = await self.browser.authorize(authorization_url, REDIRECT_URI)


async def _expired(expires_at: float) -> None:
    await wait_until(lambda: time.time() > expires_at + EXPIRY_MARGIN, TOKEN_LIFETIME + 10, "access token expired")


async def _form(url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(url, data=form, headers={"Accept": "application/json"}) as response,
    ):
        body = await response.json(content_type=None) if response.content_length != 0 else {}
        return response.status, body if isinstance(body, dict) else {}


async def _metadata(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(url) as response,
    ):
        assert response.status == 200, await response.text()
        data: dict[str, Any] = await response.json()
        return data


async def test_sdk_client_logs_in_through_the_stand_in_heals_refreshes_and_revokes(
    oidc_upstream: OidcUpstream, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(oidc_upstream.url)
    storage = MemoryStorage()
    async with Browser() as browser:
        login = BrowserLogin(browser)
        async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(proxy.url, storage, login) as session:
            assert await text_of(session, "echo", {"text": "before"}) == "before"
            assert storage.tokens is not None
            issued = time.time()
            await oidc_upstream.mcp.restart()
            await _expired(issued + float(storage.tokens.expires_in or TOKEN_LIFETIME))
            assert await text_of(session, "echo", {"text": "after"}) == "after"
    assert login.logins == 1, "one sign-in; the refresh token did the rest"
    authorization_server = oidc_upstream.authorization_server
    stats = await authorization_server.stats()
    assert stats["authorizations"] == 1, stats
    assert stats["grants"].get("refresh_token", 0) >= 1, stats
    # Every access token was issued for the MCP server: the stand-in mapped the proxy's URL to its own.
    assert set(stats["token_audiences"]) == {oidc_upstream.url}, stats
    upstream_stats = await oidc_upstream.mcp.stats()  # since the restart
    assert upstream_stats["initialize"] >= 1, "the proxy re-initialized the restarted upstream"
    held = {fingerprint(token) for token in storage.seen_access_tokens}
    assert set(upstream_stats["initialize_tokens"]) <= held, upstream_stats

    # The client signs out: it revokes its refresh token at the revocation endpoint the proxy advertises.
    assert storage.tokens is not None
    assert storage.tokens.refresh_token is not None
    assert storage.client_info is not None
    assert storage.client_info.client_id is not None
    metadata = await _metadata(proxy.url.rsplit("/mcp", 1)[0] + "/.well-known/oauth-authorization-server/mcp")
    real = await _metadata(f"{authorization_server.issuer}/.well-known/openid-configuration")
    # The stand-in names itself and advertises only what it relays: oidc-provider's PAR, userinfo,
    # end-session, device and DPoP, and OpenID's ID tokens (which name the real issuer), are left out.
    assert metadata["issuer"] == proxy.url
    for left_out in NOT_THROUGH_THE_STAND_IN:
        assert left_out in real, left_out
        assert left_out not in metadata, left_out
    assert "openid" not in metadata["scopes_supported"]
    assert "private_key_jwt" not in metadata["token_endpoint_auth_methods_supported"]
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    client_id = storage.client_info.client_id
    refresh_token = storage.tokens.refresh_token
    status, _ = await _form(
        metadata["revocation_endpoint"],
        {"token": refresh_token, "token_type_hint": "refresh_token", "client_id": client_id},
    )
    assert status == 200
    assert (await authorization_server.stats())["revocations"] == 1
    status, answer = await _form(
        metadata["token_endpoint"],
        {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id},
    )
    assert (status, answer.get("error")) == (400, "invalid_grant"), answer


async def test_managed_login_heals_refreshes_across_expiry_and_logout_revokes(
    oidc_upstream: OidcUpstream, tmp_path: Path
) -> None:
    """``login`` against oidc-provider yields a refresh token (offline_access granted, prompt=consent):
    the login outlives the 2 s access token, through a restart, and ``logout`` revokes it."""
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, oidc_upstream.url)
    async with Browser() as browser:

        async def sign_in(url: str) -> int:
            return await browser.open(await browser.authorize(url, redirect_uri_of(url)))

        result = await login(config, NAME, env, visit=sign_in, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.callback_status == 200
    grant = stored(state_home)
    assert grant.get("refresh_token"), "oidc-provider granted offline access: the login can last"
    authorization_server = oidc_upstream.authorization_server
    proxy = await serve(config, env)
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT), mcp_session(proxy.url) as session:
            assert await text_of(session, "echo", {"text": "one"}) == "one"
            await oidc_upstream.mcp.restart()
            await _expired(float(stored(state_home)["expires_at"]))
            assert await text_of(session, "echo", {"text": "two"}) == "two"
            # And once more after the refreshed token expired too: rotation kept the grant alive.
            await _expired(float(stored(state_home)["expires_at"]))
            assert await text_of(session, "whoami", {}) == grant["client_id"]
    finally:
        log = await proxy.stop()
    assert "auth.token_refreshed" in log, log[-4000:]
    stats = await authorization_server.stats()
    assert stats["authorizations"] == 1, f"one sign-in, no new login: {stats}"
    assert stats["grants"].get("refresh_token", 0) >= 2, stats
    assert set(stats["token_audiences"]) == {oidc_upstream.url}, stats

    refresh_token = stored(state_home)["refresh_token"]
    process = await asyncio.create_subprocess_exec(
        *CLI, "logout", NAME, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, errors = await process.communicate()
    assert process.returncode == 0, errors.decode()
    assert "Revoked the refresh token" in out.decode(), out.decode()
    assert (await authorization_server.stats())["revocations"] >= 1
    metadata = await _metadata(f"{authorization_server.issuer}/.well-known/openid-configuration")
    status, answer = await _form(
        metadata["token_endpoint"],
        {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": grant["client_id"]},
    )
    assert (status, answer.get("error")) == (400, "invalid_grant"), answer


async def test_managed_login_gets_a_grant_when_nothing_advertises_scopes(
    oidc_upstreams: OidcUpstreams, tmp_path: Path
) -> None:
    """The MCP server names no scope (no scopes_supported, no scope in its challenge): the login asks
    for the authorization server's scopes, as the MCP SDK does; oidc-provider refuses an authorization
    without any scope."""
    upstream = await oidc_upstreams("--no-scopes")
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)
    async with Browser() as browser:

        async def sign_in(url: str) -> int:
            return await browser.open(await browser.authorize(url, redirect_uri_of(url)))

        result = await login(config, NAME, env, visit=sign_in, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stored(state_home).get("refresh_token"), "offline_access asked for and granted"
    proxy = await serve(config, env)
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT), mcp_session(proxy.url) as session:
            assert await text_of(session, "echo", {"text": "scoped"}) == "scoped"
    finally:
        await proxy.stop()
    stats = await upstream.authorization_server.stats()
    [asked] = stats["authorize_scopes"]
    assert asked is not None
    assert set(asked.split()) == {"openid", "mcp", "offline_access"}, stats


async def _run_login(
    config: Path, env: dict[str, str], *options: str, stdin: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI, "login", NAME, "--config", str(config), *options,
        stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT,
    )  # fmt: skip


async def _line_after(process: asyncio.subprocess.Process, marker: str, printed: list[str]) -> str:
    """The first line the login prints after the line containing ``marker`` (bounded by the caller)."""
    assert process.stdout is not None
    seen = False
    while True:
        line = (await process.stdout.readline()).decode()
        if not line:
            raise AssertionError("the login ended early: " + "".join(printed))
        printed.append(line)
        if seen:
            return line.strip()
        seen = marker in line


async def _finish(process: asyncio.subprocess.Process, printed: list[str]) -> str:
    try:
        async with asyncio.timeout(60):
            rest, errors = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = "".join(printed) + rest.decode()
    assert process.returncode == 0, output + errors.decode()
    return output


async def test_device_login_then_a_client_without_oauth_calls_tools(
    oidc_upstream: OidcUpstream, tmp_path: Path
) -> None:
    """``login --device`` (RFC 8628): the code is approved at oidc-provider's device pages, from another
    "device" (the headless browser), while the login polls; the tokens then work through the proxy."""
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, oidc_upstream.url)
    process = await _run_login(config, env, "--device")
    printed: list[str] = []
    async with asyncio.timeout(60):
        url = await _line_after(process, "which carries the code", printed)
        async with Browser() as browser:
            page = await browser.approve_device(url)
        assert "Sign-in Success" in page
        output = await _finish(process, printed)
    assert "enter the code" in output
    assert f"Logged in to {NAME}" in output
    stats = await oidc_upstream.authorization_server.stats()
    assert stats["device_authorizations"] == 1, stats
    assert stats["grants"].get("urn:ietf:params:oauth:grant-type:device_code") == 1, stats
    assert set(stats["token_audiences"]) == {oidc_upstream.url}, stats
    grant = stored(state_home)
    assert grant.get("refresh_token"), "offline_access granted to the device login too"
    proxy = await serve(config, env)
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT), mcp_session(proxy.url) as session:
            assert await text_of(session, "whoami", {}) == grant["client_id"]
            await _expired(float(grant["expires_at"]))
            assert await text_of(session, "echo", {"text": "later"}) == "later"
    finally:
        log = await proxy.stop()
    assert "auth.token_refreshed" in log, log[-4000:]


async def test_no_browser_login_takes_the_redirect_address_pasted_on_stdin(
    oidc_upstream: OidcUpstream, tmp_path: Path
) -> None:
    """The browser runs elsewhere, so its redirect to the loopback callback never arrives: the user
    pastes the address it ended on. One with another login's state is refused; this one is taken."""
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, oidc_upstream.url)
    process = await _run_login(config, env, "--no-browser", stdin=asyncio.subprocess.PIPE)
    assert process.stdin is not None
    printed: list[str] = []
    async with asyncio.timeout(60):
        url = await _line_after(process, "by opening this URL in a browser", printed)
        async with Browser() as browser:
            final = await browser.authorize(url, redirect_uri_of(url))
        assert "code=" in final
        forged = final.replace("state=", "state=x")
        process.stdin.write(f"{forged}\n".encode())
        answer = await _line_after(process, "paste its address", printed)  # to the forged line
        assert "state does not match" in answer, printed
        process.stdin.write(f"  {final}  \n".encode())
        await process.stdin.drain()
        output = await _finish(process, printed)
    assert f"Logged in to {NAME}" in output
    proxy = await serve(config, env)
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT), mcp_session(proxy.url) as session:
            assert await text_of(session, "whoami", {}) == stored(state_home)["client_id"]
    finally:
        await proxy.stop()


async def test_ts_client_logs_in_through_the_stand_in_and_heals(
    node_env: NodeEnv, oidc_upstreams: OidcUpstreams, proxy_process: ProcessProxyFactory
) -> None:
    """The TypeScript SDK client with an authProvider, through ``serve``: sign-in at oidc-provider's
    pages, a call, the MCP server restarts, a call on the same session (a heal).

    No refresh here: TS SDK 1.32.2 asks for the resource's scopes only, never ``offline_access``, so
    oidc-provider (an OpenID provider) gives it no refresh token, with the proxy or without; after
    the access token expires it has to log in again: one-minute access tokens here.
    """
    oidc_upstream = await oidc_upstreams(token_lifetime=60)
    proxy = await proxy_process(oidc_upstream.url)
    async with Browser() as browser:

        async def authorize(url: str) -> str:
            return await browser.authorize(url, TS_REDIRECT_URL)

        run = await run_ts_oauth_client(node_env, proxy.url, oidc_upstream.mcp.restart, authorize)
    assert run.steps.get("first", {}).get("text"), (run, proxy.log()[-4000:])
    assert run.steps.get("second", {}).get("text") == "after", (run, proxy.log()[-4000:])
    assert run.steps["first"]["session"] == run.steps["second"]["session"], "the client kept one session id"
    assert run.steps["auth"]["logins"] == 1, run
    assert run.returncode == 0, run
    stats = await oidc_upstream.authorization_server.stats()
    assert stats["authorizations"] == 1, stats
    assert stats["authorize_scopes"] == ["mcp"], "what the client asked for: no offline_access"
    assert set(stats["token_audiences"]) == {oidc_upstream.url}, stats
    assert "session.healed" in proxy.log()


async def test_codex_logs_in_through_the_stand_in_and_its_second_call_survives_restart_and_refresh(
    codex_oauth_binary: Path,  # noqa: F811 (the fixture, imported)
    oidc_upstream: OidcUpstream,
    proxy_process: ProcessProxyFactory,
    tmp_path: Path,
) -> None:
    """Codex 0.169 (``codex mcp login --no-browser``, then ``codex exec``) through ``serve``, signing in at
    oidc-provider's pages; the MCP server restarts and the access token expires between its two calls.

    Codex asks for ``offline_access`` without ``prompt``; an OpenID provider drops it then (OpenID
    Connect Core 1.0 section 11) and Codex, without a refresh token, cannot even start once its 2 s
    token expired. The stand-in adds ``prompt=consent`` for it."""
    proxy = await proxy_process(oidc_upstream.url)
    home = tmp_path / "home"
    async with Browser() as browser:
        returncode, output = await codex_login(codex_oauth_binary, home, proxy.url, browser.authorize)
    assert returncode == 0, output
    assert "Successfully logged in" in output, output

    async def restart_and_expire() -> None:
        expires = time.time() + TOKEN_LIFETIME
        await oidc_upstream.mcp.restart()
        await _expired(expires)

    run = await run_codex(
        codex_oauth_binary,
        home,
        proxy.url,
        restart_and_expire,
        extra_config=CREDENTIALS_IN_FILE,
        server_config=APPROVE_TOOLS,
    )
    assert run.model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert run.returncode == 0, run.explain()
    stats = await oidc_upstream.authorization_server.stats()
    assert stats["authorizations"] == 1, stats
    assert stats["authorize_scopes"] == ["mcp offline_access"], stats
    assert stats["authorize_prompts"] == ["consent"], "the stand-in asked for consent"
    assert stats["grants"].get("refresh_token", 0) >= 1, stats
    assert set(stats["token_audiences"]) == {oidc_upstream.url}, stats
