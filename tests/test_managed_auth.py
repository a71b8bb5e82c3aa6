"""Proxy-managed login, piece by piece: the discovery rules, the config keys, the token file, and the hook
that puts the token on upstream requests (against a stand-in transmit, to count what it sends)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from mcp_heal_proxy.auth import errors, managed, rules
from mcp_heal_proxy.auth import login as login_flow
from mcp_heal_proxy.auth.errors import LoginRequired
from mcp_heal_proxy.auth.managed import ManagedAuth
from mcp_heal_proxy.auth.rules import as_metadata_urls, choose_scopes, parse_challenge, prm_urls, token_auth_method
from mcp_heal_proxy.auth.tokens import Grant, TokenFile, TokenFileError, tokens_directory
from mcp_heal_proxy.config import ConfigError, UpstreamConfig, build_config, describe
from mcp_heal_proxy.upstream.client import Upstream
from tests.conftest import free_port, wait_until
from tests.managed_login import follow_authorization

UPSTREAM = "https://mcp.example.com/tenant/mcp"

# --- discovery rules ------------------------------------------------------------------------------


def test_protected_resource_metadata_order() -> None:
    hinted = "https://mcp.example.com/custom/prm.json"
    assert prm_urls(UPSTREAM, hinted) == [
        hinted,
        "https://mcp.example.com/.well-known/oauth-protected-resource/tenant/mcp",
        "https://mcp.example.com/.well-known/oauth-protected-resource",
    ]
    assert prm_urls("http://127.0.0.1:8000/", None) == ["http://127.0.0.1:8000/.well-known/oauth-protected-resource"]


def test_authorization_server_metadata_order_never_tries_the_root_for_an_issuer_with_a_path() -> None:
    assert as_metadata_urls("https://auth.example.com/tenant1") == [
        "https://auth.example.com/.well-known/oauth-authorization-server/tenant1",
        "https://auth.example.com/.well-known/openid-configuration/tenant1",
        "https://auth.example.com/tenant1/.well-known/openid-configuration",
    ]
    assert as_metadata_urls("https://auth.example.com/") == [
        "https://auth.example.com/.well-known/oauth-authorization-server",
        "https://auth.example.com/.well-known/openid-configuration",
    ]


def test_scope_selection() -> None:
    def pick(**overrides: Any) -> list[str]:
        options: dict[str, Any] = {
            "configured": None,
            "challenge_scope": None,
            "resource_scopes": None,
            "server_scopes": None,
            "wanted": None,
        }
        return choose_scopes(**(options | overrides))

    assert pick() == []
    assert pick(challenge_scope="a b", resource_scopes=["c"]) == ["a", "b"]
    assert pick(resource_scopes=["c", "d"]) == ["c", "d"]
    assert pick(configured=("x",), challenge_scope="a") == ["x"]
    assert pick(challenge_scope="a", wanted="a b") == ["a", "b"]
    assert pick(challenge_scope="a", server_scopes=["a", "offline_access"]) == ["a", "offline_access"]
    assert pick(challenge_scope="a", server_scopes=["a"]) == ["a"]
    # offline_access alone would narrow a token that asked for nothing else: left out then.
    assert pick(server_scopes=["offline_access"]) == []
    # Nothing about the resource: the authorization server's scopes (the MCP SDK's fallback).
    assert pick(server_scopes=["openid", "offline_access", "mcp"]) == ["openid", "mcp", "offline_access"]
    assert pick(resource_scopes=["c"], server_scopes=["openid", "mcp"]) == ["c"]


@pytest.mark.parametrize(
    ("registered", "supported", "has_secret", "method"),
    [
        ("client_secret_post", ["client_secret_basic"], True, "client_secret_post"),
        ("none", None, False, "none"),
        (None, None, True, "client_secret_basic"),
        (None, ["client_secret_post"], True, "client_secret_post"),
        (None, ["client_secret_basic", "client_secret_post"], True, "client_secret_basic"),
        (None, ["client_secret_basic"], False, "none"),
    ],
)
def test_token_endpoint_auth_method(
    registered: str | None, supported: list[str] | None, has_secret: bool, method: str
) -> None:
    assert token_auth_method(registered, supported, has_secret) == method


def test_a_registered_method_the_proxy_cannot_use_is_a_clear_error() -> None:
    with pytest.raises(errors.LoginError, match="private_key_jwt"):
        token_auth_method("private_key_jwt", None, True)


def test_bearer_challenge_parsing() -> None:
    challenge = parse_challenge(
        'Bearer error="insufficient_scope", scope="a b", resource_metadata="https://x/.well-known/p", '
        'error_description="needs \\"b\\""'
    )
    assert challenge is not None
    assert challenge.error == "insufficient_scope"
    assert challenge.scope == "a b"
    assert challenge.resource_metadata == "https://x/.well-known/p"
    assert challenge.params["error_description"] == 'needs "b"'
    assert parse_challenge('Basic realm="x", Bearer scope=a') == rules.Challenge({"scope": "a"})
    assert parse_challenge("Bearer") == rules.Challenge({})
    assert parse_challenge('Basic realm="x"') is None
    assert parse_challenge(None) is None


def test_pkce_challenge_is_s256_of_the_verifier() -> None:
    import base64
    import hashlib

    verifier, challenge = rules.pkce_pair()
    assert 43 <= len(verifier) <= 128
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert challenge == digest


# --- config ---------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return str(path)


def test_auth_oauth_config_with_a_pre_registered_client(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[upstreams.gh]\nurl = "https://mcp.example.com/mcp"\nauth = "oauth"\nclient_id = "abc"\n'
        'client_secret = "${GH_SECRET}"\nscopes = ["repo", "read:org"]\ncallback_port = 33418\n',
    )
    config = build_config(config_file=path, flags={}, environ={"GH_SECRET": "s3cret-value"})
    upstream = config.upstreams[0]
    assert (upstream.auth, upstream.client_id, upstream.client_secret) == ("oauth", "abc", "s3cret-value")
    assert upstream.scopes == ("repo", "read:org")
    assert upstream.callback_port == 33418
    assert "s3cret-value" in config.secrets()
    shown = json.dumps(describe(config), default=list)
    assert "s3cret-value" not in shown
    assert describe(config)["upstreams"]["gh"]["client_secret"] == "***"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('auth = "basic"', "upstreams.gh.auth must be one of oauth"),
        ('client_id = "x"', 'upstreams.gh.client_id needs auth = "oauth"'),
        ('auth = "oauth"\nclient_secret = "x"', "upstreams.gh.client_secret needs client_id"),
        ('auth = "oauth"\nscopes = ["a b"]', "scopes must be a list"),
        ('auth = "oauth"\ncallback_port = 70000', "callback_port must be between 1 and 65535"),
        ('auth = "oauth"\nheaders = { Authorization = "Bearer x" }', "keep one"),
        ('auth = "oauth"\nclient_id = "x"\nclient_secret = 5', "client_secret must be a string$"),
    ],
)
def test_auth_config_mistakes(tmp_path: Path, table: str, message: str) -> None:
    path = write(tmp_path, f'[upstreams.gh]\nurl = "https://mcp.example.com/mcp"\n{table}\n')
    with pytest.raises(ConfigError, match=message):
        build_config(config_file=path, flags={}, environ={})


# --- token file -----------------------------------------------------------------------------------


def grant(**overrides: Any) -> Grant:
    values: dict[str, Any] = {
        "upstream_url": "http://127.0.0.1:9/mcp",
        "token_endpoint": "http://127.0.0.1:9/token",
        "client_id": "client-1",
        "auth_method": "none",
        "access_token": "access-token-one",
        "refresh_token": "refresh-token-one",
        "expires_at": time.time() + 3600,
        "obtained_at": time.time(),
    }
    return Grant(**(values | overrides))


def test_token_file_is_private_and_per_upstream_url(tmp_path: Path) -> None:
    token_file = TokenFile(tmp_path / "oauth", "up")
    token_file.save(grant())
    assert stat.S_IMODE(token_file.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.directory.stat().st_mode) == 0o700
    assert token_file.load("http://127.0.0.1:9/mcp") == grant(
        expires_at=token_file.load("http://127.0.0.1:9/mcp").expires_at,  # type: ignore[union-attr]
        obtained_at=token_file.load("http://127.0.0.1:9/mcp").obtained_at,  # type: ignore[union-attr]
    )
    # A login for another URL under the same name is no login for this one.
    assert token_file.load("http://127.0.0.1:10/mcp") is None
    assert "access-token-one" not in repr(token_file.load("http://127.0.0.1:9/mcp"))
    assert token_file.delete() is True
    assert token_file.delete() is False


def test_tokens_live_beside_the_session_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert tokens_directory(str(tmp_path / "data" / "sessions.db")) == tmp_path / "data" / "oauth"
    assert tokens_directory(":memory:") == tmp_path / "xdg" / "mcp-heal-proxy" / "oauth"
    assert tokens_directory("redis://127.0.0.1:6379/0") == tmp_path / "xdg" / "mcp-heal-proxy" / "oauth"


def test_expiry_margin_scales_with_short_lifetimes() -> None:
    now = 1000.0
    short = grant(obtained_at=now, expires_at=now + 10)
    assert not short.expires_soon(now + 8.9)
    assert short.expires_soon(now + 9.1)
    long = grant(obtained_at=now, expires_at=now + 3600)
    assert not long.expires_soon(now + 3569)
    assert long.expires_soon(now + 3571)
    assert not grant(expires_at=None).expires_soon()


async def test_lock_is_exclusive_and_bounded(tmp_path: Path) -> None:
    token_file = TokenFile(tmp_path / "oauth", "up")
    other = TokenFile(tmp_path / "oauth", "up")  # another process would open its own descriptor
    async with token_file.lock():
        with pytest.raises(TokenFileError, match="another mcp-heal-proxy process"):
            async with other.lock(patience=0.2):
                pass
    async with other.lock(patience=0.2):
        pass


# --- the hook -------------------------------------------------------------------------------------


class FakeResponse:
    """The part of an upstream response the hook looks at."""

    def __init__(self, status: int, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(headers or {}))
        self.released = False

    def release(self) -> None:
        self.released = True


class FakeTransmit:
    """Answers with the queued responses in order; records the Authorization of each request."""

    def __init__(self, *answers: FakeResponse) -> None:
        self.answers = list(answers)
        self.sent: list[str | None] = []
        self.gate: asyncio.Event | None = None

    async def __call__(
        self, method: str, headers: Mapping[str, str], body: bytes | None, **options: Any
    ) -> aiohttp.ClientResponse:
        self.sent.append(headers.get("Authorization"))
        assert not any(k.lower() == "authorization" and v == "Bearer client-own" for k, v in headers.items())
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.pop(0) if self.answers else FakeResponse(200)
        return answer  # type: ignore[return-value]


CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token", resource_metadata="http://x/prm"'}


@pytest.fixture
def refreshes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand in for the token endpoint: each refresh returns the next access token."""
    spent: list[str] = []

    async def fake_refresh(old: Grant, tls: ssl.SSLContext, proxy: str | None = None) -> Grant:
        await asyncio.sleep(0.05)  # long enough for concurrent callers to pile up behind it
        spent.append(old.access_token)
        return replace(
            old, access_token=f"access-{len(spent) + 1}", obtained_at=time.time(), expires_at=time.time() + 3600
        )

    monkeypatch.setattr(managed, "refresh_grant", fake_refresh)
    return spent


def hook(tmp_path: Path, saved: Grant | None = None) -> tuple[ManagedAuth, TokenFile]:
    config = UpstreamConfig(url="http://127.0.0.1:9/mcp", name="up", auth="oauth")
    token_file = TokenFile(tmp_path / "oauth", "up")
    if saved is not None:
        token_file.save(saved)
    return ManagedAuth(config, token_file), token_file


async def send(auth: ManagedAuth, transmit: FakeTransmit) -> Any:
    headers = {"Authorization": "Bearer client-own", "Content-Type": "application/json"}
    return await auth.send(transmit, "POST", headers, b"{}", stream=False, resendable=False)


async def test_the_stored_token_replaces_the_clients(tmp_path: Path, refreshes: list[str]) -> None:
    auth, _ = hook(tmp_path, grant())
    transmit = FakeTransmit(FakeResponse(200))
    assert (await send(auth, transmit)).status == 200
    assert transmit.sent == ["Bearer access-token-one"]
    assert refreshes == []


async def test_a_token_about_to_expire_is_refreshed_before_use(tmp_path: Path, refreshes: list[str]) -> None:
    auth, token_file = hook(tmp_path, grant(obtained_at=time.time() - 100, expires_at=time.time() + 1))
    transmit = FakeTransmit(FakeResponse(200))
    await send(auth, transmit)
    assert transmit.sent == ["Bearer access-2"]
    # Written back, so that a restarted proxy (or another one) starts from the fresh token.
    assert token_file.load("http://127.0.0.1:9/mcp").access_token == "access-2"  # type: ignore[union-attr]


async def test_a_401_with_a_bearer_challenge_refreshes_once_and_resends(tmp_path: Path, refreshes: list[str]) -> None:
    auth, _ = hook(tmp_path, grant())
    refused = FakeResponse(401, CHALLENGE)
    transmit = FakeTransmit(refused, FakeResponse(200))
    assert (await send(auth, transmit)).status == 200
    assert refused.released
    assert transmit.sent == ["Bearer access-token-one", "Bearer access-2"]
    assert refreshes == ["access-token-one"]


async def test_a_401_without_a_challenge_is_left_to_healing(tmp_path: Path, refreshes: list[str]) -> None:
    """A 401 "Session not found" comes from past the token check: healing.is_session_expired reads it."""
    auth, _ = hook(tmp_path, grant())
    session_gone = FakeResponse(401, {"Content-Type": "application/json"})
    transmit = FakeTransmit(session_gone)
    assert await send(auth, transmit) is session_gone
    assert not session_gone.released
    assert refreshes == []


async def test_a_token_refused_after_a_refresh_is_a_login_error(tmp_path: Path, refreshes: list[str]) -> None:
    auth, _ = hook(tmp_path, grant())
    transmit = FakeTransmit(FakeResponse(401, CHALLENGE), FakeResponse(401, CHALLENGE))
    with pytest.raises(LoginRequired, match="mcp-heal-proxy login up"):
        await send(auth, transmit)
    assert len(transmit.sent) == 2, "one refresh and one resend, never a loop"


async def test_concurrent_401s_share_one_refresh(tmp_path: Path, refreshes: list[str]) -> None:
    auth, _ = hook(tmp_path, grant())
    transmit = FakeTransmit(*[FakeResponse(401, CHALLENGE) for _ in range(8)])
    transmit.gate = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        calls = [group.create_task(send(auth, transmit)) for _ in range(8)]
        await wait_until(lambda: len(transmit.sent) == 8, 5, "every request in flight with the old token")
        transmit.gate.set()
    answers = [call.result() for call in calls]
    assert [a.status for a in answers] == [200] * 8
    assert refreshes == ["access-token-one"]


async def test_a_refused_refresh_is_not_retried_until_the_next_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []

    async def refused(old: Grant, tls: ssl.SSLContext, proxy: str | None = None) -> Grant:
        attempts.append(old.access_token)
        raise errors.TokenRefused(400, "invalid_grant")

    monkeypatch.setattr(managed, "refresh_grant", refused)
    auth, token_file = hook(tmp_path, grant())
    for _ in range(3):
        with pytest.raises(LoginRequired, match=r"refused to refresh.*mcp-heal-proxy login up"):
            await send(auth, FakeTransmit(FakeResponse(401, CHALLENGE)))
    assert attempts == ["access-token-one"]
    token_file.save(grant(access_token="after-login"))  # a new login
    transmit = FakeTransmit(FakeResponse(200))
    await send(auth, transmit)
    assert transmit.sent == ["Bearer after-login"]


async def test_insufficient_scope_asks_for_a_new_login_and_remembers_the_scope(
    tmp_path: Path, refreshes: list[str]
) -> None:
    auth, token_file = hook(tmp_path, grant())
    forbidden = FakeResponse(
        403, {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="mcp extra", resource_metadata="x"'}
    )
    with pytest.raises(LoginRequired, match=r"'mcp extra'.*log in again") as caught:
        await send(auth, FakeTransmit(forbidden))
    assert caught.value.http_status not in (401, 403), "never an OAuth challenge for the client"
    assert token_file.load("http://127.0.0.1:9/mcp").wanted_scope == "mcp extra"  # type: ignore[union-attr]
    assert refreshes == [], "a refresh cannot widen the scope"


async def test_an_unreachable_authorization_server_spends_the_tokens_last_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreachable(_: Grant, tls: ssl.SSLContext, proxy: str | None = None) -> Grant:
        raise aiohttp.ClientConnectionError("refused")

    monkeypatch.setattr(managed, "refresh_grant", unreachable)
    auth, _ = hook(tmp_path, grant(obtained_at=time.time() - 100, expires_at=time.time() + 5))
    transmit = FakeTransmit(FakeResponse(200))
    assert (await send(auth, transmit)).status == 200
    assert transmit.sent == ["Bearer access-token-one"]
    expired, _ = hook(tmp_path / "expired", grant(obtained_at=time.time() - 100, expires_at=time.time() - 1))
    with pytest.raises(errors.AuthServerUnavailable, match="cannot reach the authorization server"):
        await send(expired, FakeTransmit())


@pytest.mark.parametrize("same_process", [False, True], ids=["own-authorization-server", "one-process"])
async def test_a_request_retried_across_an_upstream_restart_takes_a_fresh_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_process: bool
) -> None:
    """The upstream refuses connections (restarting) longer than the access token has left: the
    request waits in the transport, then must go out with a refreshed token, never the expired one.
    When the authorization server is the upstream's own process, it is down as long: the request
    waits for both."""
    refreshes: list[str] = []
    up = False

    async def refresh(old: Grant, tls: ssl.SSLContext, proxy: str | None = None) -> Grant:
        if same_process and not up:
            raise aiohttp.ClientConnectionError("refused")
        refreshes.append(old.access_token)
        return replace(old, access_token="access-2", obtained_at=time.time(), expires_at=time.time() + 3600)

    monkeypatch.setattr(managed, "refresh_grant", refresh)
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    config = UpstreamConfig(url=url, name="up", auth="oauth", connect_retry=10.0)
    token_file = TokenFile(tmp_path / "oauth", "up")
    expires = time.time() + 1.0
    token_file.save(grant(upstream_url=url, obtained_at=time.time(), expires_at=expires))
    auth = ManagedAuth(config, token_file)
    upstream = Upstream(config, auth=auth)
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    app = web.Application()
    app.router.add_post("/mcp", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize"}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            sending = group.create_task(upstream.send("POST", headers, initialize))
            # The upstream comes back once the token the request started with has expired.
            await wait_until(lambda: time.time() > expires + 0.2, 5, "the first access token expired")
            await web.TCPSite(runner, "127.0.0.1", port).start()
            up = True
        response = sending.result()
        response.release()
    finally:
        await upstream.close()
        await runner.cleanup()
    assert response.status == 200
    assert seen == ["Bearer access-2"], "the expired token never left the proxy"
    assert refreshes == ["access-token-one"]


async def test_close_cancels_a_refresh_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = asyncio.Event()

    async def hanging(_: Grant, tls: ssl.SSLContext, proxy: str | None = None) -> Grant:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(managed, "refresh_grant", hanging)
    auth, _ = hook(tmp_path, grant(obtained_at=time.time() - 100, expires_at=time.time() - 1))

    async def close_once_refreshing() -> asyncio.Task[Grant]:
        await started.wait()
        refresh = auth._refreshing
        assert refresh is not None
        await auth.close()
        return refresh

    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(send(auth, FakeTransmit()), close_once_refreshing(), return_exceptions=True)
    outcome, refresh = outcomes
    assert isinstance(refresh, asyncio.Task)
    assert refresh.cancelled()
    # The request waiting for it gets an error that says why, not a cancellation.
    assert isinstance(outcome, errors.AuthServerUnavailable)
    assert "stopped" in str(outcome)


async def test_a_hanging_authorization_server_holds_requests_a_bounded_time_then_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds = 0

    async def hanging(_: Grant, tls: ssl.SSLContext, proxy: str | None = None) -> Grant:
        nonlocal rounds
        rounds += 1
        await asyncio.sleep(0.3)
        raise TimeoutError

    monkeypatch.setattr(managed, "refresh_grant", hanging)
    auth, _ = hook(tmp_path, grant(obtained_at=time.time() - 100, expires_at=time.time() - 1))
    started = time.monotonic()
    with pytest.raises(errors.AuthServerUnavailable):
        await send(auth, FakeTransmit())
    # The next requests do not wait for another round at once: the failure is remembered briefly.
    for _ in range(3):
        with pytest.raises(errors.AuthServerUnavailable):
            await send(auth, FakeTransmit())
    assert rounds == 1
    assert time.monotonic() - started < 1.5
    await auth.close()


async def test_no_login_is_a_login_error(tmp_path: Path) -> None:
    auth, _ = hook(tmp_path)
    with pytest.raises(LoginRequired, match=r"not logged in.*mcp-heal-proxy login up"):
        await send(auth, FakeTransmit())


# --- RFC 9207: the authorization answer's issuer ----------------------------------------------------


class Lines(io.StringIO):
    """The login's output, with an event when the authorization URL is printed."""

    def __init__(self) -> None:
        super().__init__()
        self.url: str | None = None
        self.printed = asyncio.Event()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if "code_challenge=" in line:
                self.url = line.strip()
                self.printed.set()
        return super().write(text)


async def login_parts(
    app: web.Application, tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> tuple[UpstreamConfig, TokenFile, Lines]:
    """A managed login's upstream (``app`` serving it and its authorization server), token file and output."""
    server = await aiohttp_server(app, host="127.0.0.1")
    upstream = UpstreamConfig(url=str(server.make_url("/mcp")), name="up", auth="oauth")
    return upstream, TokenFile(tmp_path / "oauth", "up"), Lines()


def mix_up_server(iss: str | None, promise_iss: bool, issuer: str | None = "SELF") -> tuple[web.Application, list[str]]:
    """An MCP server that is its own authorization server and redirects with ``iss`` (or none); its
    metadata names ``issuer`` (SELF: its own origin, the protected-resource metadata's name for it)."""
    token_requests: list[str] = []
    app = web.Application()

    def base(request: web.Request) -> str:
        return f"http://{request.host}"

    async def mcp(request: web.Request) -> web.Response:
        prm = f"{base(request)}/.well-known/oauth-protected-resource/mcp"
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer resource_metadata="{prm}"'})

    async def prm(request: web.Request) -> web.Response:
        return web.json_response({"resource": f"{base(request)}/mcp", "authorization_servers": [base(request)]})

    async def metadata(request: web.Request) -> web.Response:
        document = {
            "authorization_endpoint": f"{base(request)}/authorize",
            "token_endpoint": f"{base(request)}/token",
            "registration_endpoint": f"{base(request)}/register",
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": promise_iss,
        }
        if issuer is not None:
            document["issuer"] = issuer.replace("SELF", base(request))
        return web.json_response(document)

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"client_id": "mixed-up", "token_endpoint_auth_method": "none"}, status=201)

    async def authorize(request: web.Request) -> web.Response:
        query = {"code": "the-code", "state": request.query["state"]}
        if iss is not None:
            query["iss"] = iss.replace("SELF", base(request))
        raise web.HTTPFound(f"{request.query['redirect_uri']}?{urlencode(query)}")

    async def token(request: web.Request) -> web.Response:
        token_requests.append((await request.post())["code"])  # type: ignore[arg-type]
        return web.json_response({"access_token": "mixed-up-access", "token_type": "Bearer"})

    app.router.add_post("/mcp", mcp)
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", prm)
    app.router.add_get("/.well-known/oauth-authorization-server", metadata)
    app.router.add_post("/register", register)
    app.router.add_get("/authorize", authorize)
    app.router.add_post("/token", token)
    return app, token_requests


@pytest.mark.parametrize(
    ("iss", "promise_iss", "refusal"),
    [
        ("SELF", True, None),
        (None, False, None),
        ("https://other-issuer.example", False, "came from issuer"),
        # RFC 9207 section 2.4: simple string comparison; a trailing '/' is another issuer.
        ("SELF/", True, "came from issuer"),
        (None, True, "promised an iss parameter"),
    ],
)
async def test_the_authorization_answer_must_come_from_the_issuer(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    iss: str | None,
    promise_iss: bool,
    refusal: str | None,
) -> None:
    await login_against_mix_up_server(tmp_path, aiohttp_server, iss, promise_iss, "SELF", refusal)


@pytest.mark.parametrize(
    ("issuer", "refusal"),
    [
        # RFC 8414 section 3.3: identical to the issuer the metadata was fetched for, so not with a '/' added.
        ("SELF/", "names issuer"),
        ("https://other-issuer.example", "names issuer"),
        # RFC 8414 section 2: issuer is required; without it nothing ties the metadata to the server.
        (None, "names no issuer"),
    ],
)
async def test_authorization_server_metadata_must_name_its_issuer_exactly(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]], issuer: str | None, refusal: str
) -> None:
    await login_against_mix_up_server(tmp_path, aiohttp_server, "SELF", True, issuer, refusal)


async def login_against_mix_up_server(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    iss: str | None,
    promise_iss: bool,
    issuer: str | None,
    refusal: str | None,
) -> None:
    app, token_requests = mix_up_server(iss, promise_iss, issuer)
    upstream, token_file, out = await login_parts(app, tmp_path, aiohttp_server)
    logging_in = asyncio.get_running_loop().create_task(
        login_flow.login(upstream, token_file, out=out, open_browser=False, wait=20)
    )
    logging_in.add_done_callback(lambda _: out.printed.set())  # refused metadata prints no URL
    try:
        async with asyncio.timeout(20):
            await out.printed.wait()
        if out.url is not None:  # refused metadata ends the login before any URL is printed
            await follow_authorization(out.url)
        if refusal is None:
            assert (await logging_in).access_token == "mixed-up-access"
            assert token_requests == ["the-code"]
        else:
            with pytest.raises(errors.LoginError, match=refusal):
                await logging_in
            assert token_requests == [], "a code from a mixed-up answer is never redeemed"
            assert token_file.load(upstream.url) is None
    finally:
        logging_in.cancel()
        with contextlib.suppress(BaseException):
            await logging_in


async def test_a_callback_with_a_non_ascii_state_is_refused_and_the_login_goes_on(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """The login's callback compares the state as bytes: a non-ASCII one is a stranger's (400), not a
    500, and the real answer that follows still logs in."""
    app, token_requests = mix_up_server("SELF", True)
    upstream, token_file, out = await login_parts(app, tmp_path, aiohttp_server)
    logging_in = asyncio.get_running_loop().create_task(
        login_flow.login(upstream, token_file, out=out, open_browser=False, wait=20)
    )
    try:
        async with asyncio.timeout(20):
            await out.printed.wait()
        assert out.url is not None
        redirect_uri = parse_qs(urlsplit(out.url).query)["redirect_uri"][0]
        async with aiohttp.ClientSession() as http:
            for state in ("%C3%A9", "%FF", "\u00e9t\u00e9"):
                async with http.get(f"{redirect_uri}?code=stolen&state={state}") as response:
                    assert response.status == 400, (state, await response.text())
        await follow_authorization(out.url)
        assert (await logging_in).access_token == "mixed-up-access"
        assert token_requests == ["the-code"]
    finally:
        logging_in.cancel()
        with contextlib.suppress(BaseException):
            await logging_in


async def test_a_login_that_waited_for_another_uses_its_tokens(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    app, token_requests = mix_up_server("SELF", True)
    upstream, token_file, out = await login_parts(app, tmp_path, aiohttp_server)
    loads: list[str] = []
    load = token_file.load

    def counted_load(url: str) -> Grant | None:
        loads.append(url)
        return load(url)

    token_file.load = counted_load  # type: ignore[method-assign,assignment]
    async with token_file.lock(purpose="login"):  # another login is in the browser
        waiting = asyncio.get_running_loop().create_task(
            login_flow.login(upstream, token_file, out=out, open_browser=False, wait=20)
        )
        await wait_until(lambda: len(loads) == 1, 5, "the second login noted the tokens before it waited")
        assert not waiting.done()
        token_file.save(grant(upstream_url=upstream.url, access_token="from-the-other-login", logged_in_at=time.time()))
    async with asyncio.timeout(10):
        obtained = await waiting
    assert obtained.access_token == "from-the-other-login"
    assert out.url is None, "the user is not sent through the browser a second time"
    assert "finished meanwhile" in out.getvalue()
    assert token_requests == []


@pytest.mark.parametrize(
    ("unsupported", "said"),
    [
        (
            {"access_token"},
            "Revoked the refresh token at the authorization server. It does not revoke access tokens: "
            "the last one stays valid until it expires.",
        ),
        (
            {"access_token", "refresh_token"},
            "The authorization server does not revoke these tokens (unsupported_token_type): deleted here "
            "only; they stay valid there until they expire.",
        ),
        (set(), "Revoked the refresh token and access token at the authorization server."),
    ],
)
async def test_logout_says_which_tokens_the_server_revoked(
    aiohttp_server: Callable[..., Awaitable[TestServer]], unsupported: set[str], said: str
) -> None:
    """RFC 7009 section 2.2.1: a server that does not revoke a type of token (oidc-provider's JWT access
    tokens) answers unsupported_token_type; the other token is still revoked, and logout says so."""
    hints: list[str] = []

    async def revoke(request: web.Request) -> web.Response:
        hint = (await request.post())["token_type_hint"]
        assert isinstance(hint, str)
        hints.append(hint)
        if hint in unsupported:
            return web.json_response({"error": "unsupported_token_type"}, status=400)
        return web.Response()

    app = web.Application()
    app.router.add_post("/revoke", revoke)
    server = await aiohttp_server(app, host="127.0.0.1")
    grant = Grant(
        upstream_url=UPSTREAM,
        token_endpoint=str(server.make_url("/token")),
        client_id="client",
        auth_method="none",
        access_token="access",
        refresh_token="refresh",
        revocation_endpoint=str(server.make_url("/revoke")),
    )
    upstream = UpstreamConfig(url=UPSTREAM, name="up", auth="oauth", proxy="")
    assert await login_flow._revoke_for_logout(grant, upstream) == said
    assert hints == ["refresh_token", "access_token"]
