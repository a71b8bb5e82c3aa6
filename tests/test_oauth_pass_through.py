"""OAuth pass-through with the real parts: the SDK server behind its own authorization server
(tests/oauth_server.py, its own process), the proxy in this process, and the SDK's OAuthClientProvider
logging in headlessly through the proxy.

Each scenario logs in, calls a tool, has the upstream restart (its sessions die, its tokens survive),
waits out the short access-token lifetime (so the client refreshes) and calls again on the same
session. Its counterparts (the proxy without the feature, or without the proxy) fail.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import structlog
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.shared.exceptions import MCPError
from yarl import URL

from mcp_heal_proxy.auth import discovery, standin
from mcp_heal_proxy.auth.metadata import bearer_param
from mcp_heal_proxy.front.app import STORE_KEY
from mcp_heal_proxy.observability import configure_logging
from mcp_heal_proxy.store.records import MemorySessionStore
from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    ProxyFactory,
    RunningProxy,
    UpstreamProcess,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream
from tests.oauth_clients import (
    REDIRECT_URI,
    HeadlessLogin,
    MemoryStorage,
    OAuthUpstream,
    follow_to_redirect_uri,
    leaves,
    oauth_mcp_session,
)
from tests.oauth_server import EXPIRY_LEEWAY, fingerprint

TOKEN_LIFETIME = 2.0
SCENARIO_TIMEOUT = 60.0

OAuthFactory = Callable[..., Awaitable[OAuthUpstream]]


@pytest.fixture
async def oauth_upstream(tmp_path: Path) -> AsyncIterator[OAuthFactory]:
    """Start tests/oauth_server.py with the given options; stopped by PID at the end."""
    started: list[OAuthUpstream] = []

    async def start(*options: str) -> OAuthUpstream:
        server = OAuthUpstream(tmp_path, *options)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """The proxy's JSON logs, every level, in a buffer."""
    buffer = io.StringIO()
    configure_logging("json", "debug", secrets=[], cache=False)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer))
    yield buffer
    structlog.reset_defaults()


async def wait_for_token_expiry(storage: MemoryStorage, issued_at: float) -> None:
    """Bounded wait until the access token the client holds has expired (so its next call refreshes)."""
    assert storage.tokens is not None
    assert storage.tokens.expires_in is not None
    expires = issued_at + storage.tokens.expires_in + EXPIRY_LEEWAY + 1.5  # the server rounds expiry up to a second
    await wait_until(lambda: time.time() > expires, storage.tokens.expires_in + 8, "access token expired")


async def login_call_restart_call(url: str, upstream: OAuthUpstream) -> tuple[MemoryStorage, HeadlessLogin, str]:
    """The scenario: log in through ``url``, call, restart the upstream, let the token expire, call again."""
    storage, login = MemoryStorage(), HeadlessLogin()
    async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(url, storage, login) as session:
        first = await session.call_tool("whoami", {})
        assert not first.is_error, first
        await upstream.restart()
        await wait_for_token_expiry(storage, time.time())
        second = await session.call_tool("echo", {"text": "after restart"})
        assert not second.is_error, second
        text = second.content[0].text  # type: ignore[union-attr]
    return storage, login, text


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
async def test_sdk_client_logs_in_through_proxy_and_keeps_its_session_across_restart_and_refresh(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, strict: bool
) -> None:
    options = ["--token-lifetime", str(TOKEN_LIFETIME)] + (["--strict-audience"] if strict else [])
    upstream = await oauth_upstream(*options)
    proxy = await start_proxy(upstream.url)
    storage, login, text = await login_call_restart_call(proxy.url, upstream)
    assert text == "after restart"
    assert login.logins == 1, "one authorization; the refresh token did the rest"
    stats = await upstream.stats()  # counted since the restart
    assert stats["refreshes"] >= 1, "the client refreshed its token during the run"
    assert stats["initialize"] == 1, "the proxy re-initialized the restarted upstream once"
    assert storage.tokens is not None
    # The heal may be triggered by the tool call (with the refreshed token) or by the proxy reattaching
    # the client's GET stream (with the token that stream was opened with): either way a token the
    # client itself sent. test_reinitialize_carries_the_credentials_of_the_triggering_request pins it.
    held = {fingerprint(token) for token in storage.seen_access_tokens}
    assert len(stats["initialize_tokens"]) == 1
    assert stats["initialize_tokens"][0] in held
    # The stand-in mapped the proxy's URL to the upstream's: tokens are minted for the upstream.
    assert set(stats["token_resources"]) == {upstream.url}


async def test_strict_upstream_refuses_tokens_when_the_proxy_only_rewrites_metadata(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await oauth_upstream("--strict-audience")
    proxy = await start_proxy(upstream.url, oauth_pass_through="metadata")
    storage, login = MemoryStorage(), HeadlessLogin()
    with pytest.raises(Exception):  # noqa: B017, PT011 - the SDK wraps its OAuth failure in task groups
        async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(proxy.url, storage, login) as session:
            await session.call_tool("whoami", {})
    stats = await upstream.stats()
    assert stats["authorize_resources"]
    assert set(stats["authorize_resources"]) == {proxy.url}
    assert stats["tools_call"] == 0


async def test_lenient_upstream_login_works_when_the_proxy_only_rewrites_metadata(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await oauth_upstream("--token-lifetime", str(TOKEN_LIFETIME))
    proxy = await start_proxy(upstream.url, oauth_pass_through="metadata")
    _, login, text = await login_call_restart_call(proxy.url, upstream)
    assert text == "after restart"
    assert login.logins == 1


async def test_login_fails_through_a_proxy_without_pass_through(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await oauth_upstream()
    proxy = await start_proxy(upstream.url, oauth_pass_through="off")
    with pytest.raises(Exception) as failure:  # noqa: PT011
        async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(proxy.url, MemoryStorage(), HeadlessLogin()):
            pass
    assert any("does not match expected" in str(exc) for exc in leaves(failure.value)), failure.value


async def test_session_dies_with_the_upstream_restart_without_the_proxy(oauth_upstream: OAuthFactory) -> None:
    upstream = await oauth_upstream("--token-lifetime", str(TOKEN_LIFETIME))
    with pytest.raises(Exception) as failure:  # noqa: PT011
        await login_call_restart_call(upstream.url, upstream)
    errors = [exc for exc in leaves(failure.value) if isinstance(exc, MCPError)]
    assert errors, failure.value
    assert "Session not found" in str(errors[0])


async def test_no_token_reaches_logs_metrics_or_error_bodies(
    oauth_upstream: OAuthFactory,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    captured_logs: io.StringIO,
) -> None:
    upstream = await oauth_upstream("--token-lifetime", str(TOKEN_LIFETIME))
    proxy = await start_proxy(upstream.url, heal_on=(404, 400, 401))
    storage, _, _ = await login_call_restart_call(proxy.url, upstream)
    assert storage.tokens is not None
    assert storage.client_info is not None
    secrets = [*storage.seen_access_tokens, storage.tokens.refresh_token, storage.client_info.client_secret]
    # Error answers that quote the request: a wrong token upstream, a wrong refresh token at the stand-in.
    wrong = "wrong-token-" + "x" * 24
    bodies = []
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {wrong}"}
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(proxy.url, json=initialize, headers=headers) as response:
        assert response.status == 401
        bodies.append(await response.text() + str(response.headers))
    form = {"grant_type": "refresh_token", "refresh_token": wrong, "client_id": storage.client_info.client_id or ""}
    async with http.post(proxy.url.replace("/mcp", "/oauth/mcp/token"), data=form) as response:
        assert response.status in (400, 401)  # the client did not authenticate, or the grant is unknown
        bodies.append(await response.text())
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        metrics = await response.text()
    logs = captured_logs.getvalue()
    assert '"event": "session.healed"' in logs or '"event":"session.healed"' in logs
    for secret in [*secrets, wrong]:
        assert secret
        assert secret not in logs
        assert secret not in metrics
    for body in bodies:
        assert wrong not in body
        for secret in secrets:
            assert secret
            assert secret not in body


def challenge_param(value: str, name: str) -> str | None:
    return bearer_param(value, name)


async def test_a_401_about_the_token_passes_through_and_is_never_healed(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream()
    proxy = await start_proxy(upstream.url, heal_on=(404, 400, 401))
    storage, login = MemoryStorage(), HeadlessLogin()
    async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(proxy.url, storage, login) as session:
        await session.call_tool("whoami", {})
        # The client's session is live; the same request with a token the upstream does not know:
        session_id = session_ids(proxy)
        initializes = (await upstream.stats())["initialize"]
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
        headers = {
            **MCP_HEADERS,
            "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": "2025-11-25",
            "Authorization": "Bearer not-a-token-of-this-server",
        }
        async with http.post(proxy.url, json=call, headers=headers) as response:
            assert response.status == 401
            challenge = response.headers["WWW-Authenticate"]
        assert challenge_param(challenge, "resource_metadata") == proxy.url.replace(
            "/mcp", "/.well-known/oauth-protected-resource/mcp"
        )
        assert challenge_param(challenge, "error") == "invalid_token"
        assert (await upstream.stats())["initialize"] == initializes, "no heal: the 401 was about the token"
        # The session is still the client's, with its own token.
        result = await session.call_tool("echo", {"text": "still here"})
        assert result.content[0].text == "still here"  # type: ignore[union-attr]


def session_ids(proxy: RunningProxy) -> str:
    """The one client session id the proxy's memory store holds."""
    store = proxy.app[STORE_KEY]
    assert isinstance(store, MemorySessionStore)
    ids = list(store._records)
    assert len(ids) == 1, ids
    return str(ids[0])


@pytest.mark.parametrize(
    ("challenge", "heals"),
    [('Bearer error="invalid_token", error_description="expired"', False), ('Bearer realm="mcp"', True)],
    ids=["token-error", "session-named"],
)
async def test_a_401_that_names_the_session_heals_and_one_about_the_token_does_not(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    challenge: str,
    heals: bool,
) -> None:
    upstream, url = fake

    async def session_401(request: web.Request, body: Any) -> web.StreamResponse | None:
        if request.headers.get("Mcp-Session-Id") in upstream.sessions:
            return None
        return web.json_response(
            {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}},
            status=401,
            headers={"WWW-Authenticate": challenge},
        )

    upstream.on_request = session_401
    proxy = await start_proxy(url, heal_on=(404, 400, 401))
    session_id = await raw_initialize(http, proxy.url)
    upstream.forget_all()
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo"}}
    async with http.post(proxy.url, json=call, headers=session_headers(session_id)) as response:
        assert response.status == (200 if heals else 401)
    assert upstream.initializes == (2 if heals else 1)


async def test_metadata_names_the_dialed_url_at_path_aware_and_root_well_known(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream("--scopes", "mcp,extra")
    proxy = await start_proxy(upstream.url)
    origin = proxy.url.removesuffix("/mcp")
    for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"):
        async with http.get(origin + path) as response:
            assert response.status == 200
            document = await response.json()
        assert document["resource"] == proxy.url
        assert document["authorization_servers"] == [proxy.url]
        assert document["scopes_supported"] == ["mcp"]
    async with http.get(origin + "/.well-known/oauth-authorization-server/mcp") as response:
        server = await response.json()
    assert server["issuer"] == proxy.url
    assert server["authorization_endpoint"] == origin + "/oauth/mcp/authorize"
    assert server["token_endpoint"] == origin + "/oauth/mcp/token"
    assert server["registration_endpoint"] == origin + "/oauth/mcp/register"
    assert server["code_challenge_methods_supported"] == ["S256"]
    assert server["scopes_supported"] == ["mcp", "extra"]


async def test_forwarded_headers_count_only_from_trusted_proxies(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream()
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mcp.example.com"}
    untrusted = await start_proxy(upstream.url)
    trusted = await start_proxy(upstream.url, trusted_proxies=("127.0.0.0/8",))
    path = "/.well-known/oauth-protected-resource/mcp"
    async with http.get(untrusted.url.replace("/mcp", path), headers=forwarded) as response:
        assert (await response.json())["resource"] == untrusted.url
    async with http.get(trusted.url.replace("/mcp", path), headers=forwarded) as response:
        assert (await response.json())["resource"] == "https://mcp.example.com/mcp"
    # A Host that is not host[:port] never reaches the metadata.
    async with http.get(untrusted.url.replace("/mcp", path), headers={"Host": 'evil"host'}) as response:
        assert '"' not in (await response.json())["resource"].removeprefix("http://")


async def test_metadata_is_a_json_error_when_the_upstream_has_none(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    async with http.get(proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")) as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        assert (await response.json())["error"]["code"] == -32601
    # And a GET without a session still gets the usual answer: nothing asks for a login.
    async with http.get(proxy.url, headers={"Accept": "text/event-stream"}) as response:
        assert response.status == 400


async def test_metadata_fetch_is_bounded_in_time(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery, "FETCH_TIMEOUT", aiohttp.ClientTimeout(total=0.5))

    async def hang(_: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", hang)
    server = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")))
    started = time.monotonic()
    async with http.get(proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == -32002
    assert time.monotonic() - started < 5


async def test_codex_style_probe_gets_a_challenge_and_the_origin_metadata(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream()
    proxy = await start_proxy(upstream.url)
    async with http.get(proxy.url, headers={"Accept": "text/event-stream"}) as response:
        assert response.status == 401
        challenge = response.headers["WWW-Authenticate"]
    assert challenge_param(challenge, "resource_metadata") == proxy.url.replace(
        "/mcp", "/.well-known/oauth-protected-resource/mcp"
    )
    async with http.get(proxy.url.replace("/mcp", "/.well-known/oauth-authorization-server")) as response:
        assert response.status == 200
        assert (await response.json())["token_endpoint"].endswith("/oauth/mcp/token")


async def test_insufficient_scope_points_at_the_proxy_and_the_client_steps_up(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream("--scopes", "mcp,extra")
    proxy = await start_proxy(upstream.url)
    storage, login = MemoryStorage(), HeadlessLogin()
    async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(proxy.url, storage, login) as session:
        await session.call_tool("whoami", {})
        await upstream.post("/test/step-up?scope=extra")
        assert storage.tokens is not None
        call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
        headers = {
            **MCP_HEADERS,
            "Mcp-Session-Id": session_ids(proxy),
            "MCP-Protocol-Version": "2025-11-25",
            "Authorization": f"Bearer {storage.tokens.access_token}",
        }
        async with http.post(proxy.url, json=call, headers=headers) as response:
            assert response.status == 403
            challenge = response.headers["WWW-Authenticate"]
        assert challenge_param(challenge, "error") == "insufficient_scope"
        assert challenge_param(challenge, "scope") == "mcp extra"
        assert challenge_param(challenge, "resource_metadata") == proxy.url.replace(
            "/mcp", "/.well-known/oauth-protected-resource/mcp"
        )
        # The SDK client answers the 403 by authorizing again with the wider scope, through the proxy.
        result = await session.call_tool("echo", {"text": "stepped up"})
        assert result.content[0].text == "stepped up"  # type: ignore[union-attr]
    assert login.logins == 2
    assert storage.tokens is not None
    assert storage.tokens.scope is not None
    assert "extra" in storage.tokens.scope.split()


async def test_rfc_9207_upstream_the_stand_in_relays_the_redirect_and_names_itself(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory
) -> None:
    upstream = await oauth_upstream("--send-iss", "--strict-audience", "--token-lifetime", str(TOKEN_LIFETIME))
    proxy = await start_proxy(upstream.url)
    storage, login, text = await login_call_restart_call(proxy.url, upstream)
    assert text == "after restart"
    assert login.callback_url is not None
    assert parse_qs(urlsplit(login.callback_url).query)["iss"] == [proxy.url]
    assert storage.client_info is not None
    assert [str(uri) for uri in storage.client_info.redirect_uris or []] == [REDIRECT_URI]


async def test_rfc_9207_upstream_fails_when_the_stand_in_passes_its_redirect_straight_on(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(standin, "relays_redirect", lambda server: False)
    upstream = await oauth_upstream("--send-iss")
    proxy = await start_proxy(upstream.url)
    with pytest.raises(Exception) as failure:  # noqa: PT011
        async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(proxy.url, MemoryStorage(), HeadlessLogin()):
            pass
    assert any("iss mismatch" in str(exc) for exc in leaves(failure.value)), failure.value


async def test_relayed_callback_refuses_unknown_state_and_a_foreign_issuer(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream("--send-iss")
    proxy = await start_proxy(upstream.url)
    callback = proxy.url.replace("/mcp", "/oauth/mcp/callback/") + standin.redirect_tag(REDIRECT_URI)
    async with http.get(callback, params={"code": "c", "state": "never-issued"}, allow_redirects=False) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_request"
    # A real authorization, whose redirect is then replayed with another issuer.
    authorize = proxy.url.replace("/mcp", "/oauth/mcp/authorize")
    params = {"response_type": "code", "client_id": "x", "redirect_uri": REDIRECT_URI, "state": "s1"}
    async with http.get(authorize, params=params, allow_redirects=False) as response:
        assert response.status == 302
        relayed_state = parse_qs(urlsplit(response.headers["Location"]).query)["state"][0]
    forged = {"code": "c", "state": relayed_state, "iss": "https://attacker.example"}
    async with http.get(callback, params=forged, allow_redirects=False) as response:
        assert response.status == 302
        answer = parse_qs(urlsplit(response.headers["Location"]).query)
    assert answer["error"] == ["access_denied"]
    assert answer["state"] == ["s1"]
    assert "code" not in answer


async def test_relayed_callback_with_a_non_ascii_tag_is_refused_not_an_error(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream("--send-iss")
    proxy = await start_proxy(upstream.url)
    authorize = proxy.url.replace("/mcp", "/oauth/mcp/authorize")
    params = {"response_type": "code", "client_id": "x", "redirect_uri": REDIRECT_URI, "state": "s1"}
    async with http.get(authorize, params=params, allow_redirects=False) as response:
        assert response.status == 302
        relayed_state = parse_qs(urlsplit(response.headers["Location"]).query)["state"][0]
    # The tag is the path's last segment, percent-decoded: a non-ASCII one names no client redirect.
    callback = proxy.url.replace("/mcp", "/oauth/mcp/callback/%C3%A9")
    answer = {"code": "c", "state": relayed_state, "iss": upstream.origin}
    async with http.get(yarl.URL(callback, encoded=True), params=answer, allow_redirects=False) as response:
        assert response.status == 400, await response.text()
        assert (await response.json())["error"] == "invalid_request"


async def test_with_an_inbound_token_nothing_is_passed_through(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream()
    proxy = await start_proxy(upstream.url, token="inbound-token-for-the-proxy")
    headers = {"Authorization": "Bearer inbound-token-for-the-proxy"}
    async with http.get(proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp"), headers=headers) as r:
        assert r.status == 404, "the client's Authorization is the proxy's own: no OAuth through it"
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(proxy.url, json=initialize, headers={**MCP_HEADERS, **headers}) as response:
        assert response.status == 401
        assert challenge_param(response.headers["WWW-Authenticate"], "resource_metadata") == (
            f"{upstream.origin}/.well-known/oauth-protected-resource/mcp"
        ), "the upstream's challenge is passed through untouched"


async def test_reinitialize_carries_the_credentials_of_the_triggering_request(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    for number, token in enumerate(("first-token-aaaaaaaa", "refreshed-token-bbbbbbbb"), start=1):
        upstream.forget_all()
        call = {"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": {"name": "echo"}}
        headers = {**session_headers(session_id), "Authorization": f"Bearer {token}"}
        async with http.post(proxy.url, json=call, headers=headers) as response:
            assert response.status == 200
        reinitialize = [seen for seen in upstream.seen if isinstance(seen.body, dict) and seen.body.get("method")]
        sent = [(seen.body["method"], seen.headers.get("Authorization")) for seen in reinitialize[-4:]]
        assert sent == [
            ("tools/call", f"Bearer {token}"),
            ("initialize", f"Bearer {token}"),
            ("notifications/initialized", f"Bearer {token}"),
            ("tools/call", f"Bearer {token}"),
        ]


async def test_a_get_stream_whose_token_stopped_working_ends_instead_of_retrying(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    streams = 0

    async def one_event_then_token_expires(request: web.Request, body: Any) -> web.StreamResponse:
        nonlocal streams
        streams += 1
        if streams > 1:  # the token the stream was opened with has expired meanwhile
            return web.json_response(
                {"error": "invalid_token"}, status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"id: 1\ndata: {}\n\n")
        return response

    upstream.on_get = one_event_then_token_expires
    headers = {**session_headers(session_id), "Accept": "text/event-stream", "Authorization": "Bearer old-token-x"}
    async with http.get(proxy.url, headers=headers) as response:
        assert response.status == 200
        # The stream ends at once, so that the client reopens it with its current token (retrying with
        # the old one would keep it waiting through every reattach delay, half a minute).
        async with asyncio.timeout(3):
            body = await response.read()
    assert body.startswith(b"id: 1\n")
    assert streams == 2


ATTACKER_REDIRECT = "http://attacker.example/steal"


async def browse(http: aiohttp.ClientSession, url: str) -> tuple[list[str], int]:
    """Follow redirects as a browser would, stopping before any request to the attacker's host.

    Returns every URL visited or redirected to, and the last status.
    """
    visited = [url]
    for _ in range(6):
        async with http.get(url, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status not in (302, 303, 307) or location is None:
                return visited, response.status
        url = location
        visited.append(url)
        if urlsplit(url).hostname == "attacker.example":
            return visited, response.status
    raise AssertionError(f"too many redirects: {visited}")


def attacker_link(proxy_url: str, client_id: str, redirect_uri: str = ATTACKER_REDIRECT) -> str:
    """A crafted authorization link: a real client, the attacker's redirect URI and PKCE challenge."""
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": "attacker-challenge-" + "a" * 24,
        "code_challenge_method": "S256",
        "state": "attacker-state",
        "resource": proxy_url,
    }
    return str(URL(proxy_url.replace("/mcp", "/oauth/mcp/authorize")).with_query(query))


async def test_a_crafted_authorization_link_never_sends_a_code_to_a_redirect_uri_the_client_did_not_register(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream("--send-iss")
    proxy = await start_proxy(upstream.url)
    storage, login = MemoryStorage(), HeadlessLogin()
    async with asyncio.timeout(SCENARIO_TIMEOUT), oauth_mcp_session(proxy.url, storage, login) as session:
        await session.call_tool("whoami", {})
    assert storage.client_info is not None
    client_id = storage.client_info.client_id
    assert client_id
    # The proxy knows the client's registration: refused at once, no redirect anywhere.
    async with http.get(attacker_link(proxy.url, client_id), allow_redirects=False) as response:
        assert response.status == 400
        assert "Location" not in response.headers
        assert (await response.json())["error"] == "invalid_request"
    # A proxy that does not know the client (restarted since it registered): the upstream's server
    # refuses the callback of a redirect URI the client never registered, without redirecting.
    port = proxy.port
    await proxy.stop()
    restarted = await start_proxy(upstream.url, port=port)
    authorizations = (await upstream.stats())["authorizations"]
    visited, status = await browse(http, attacker_link(restarted.url, client_id))
    assert not any(urlsplit(url).hostname == "attacker.example" for url in visited), visited
    assert status == 400
    assert (await upstream.stats())["authorizations"] == authorizations, "no code was issued"
    # While the client's own redirect URI still works through the restarted proxy.
    landed = await follow_to_redirect_uri(attacker_link(restarted.url, client_id, REDIRECT_URI), REDIRECT_URI)
    assert "code" in parse_qs(urlsplit(landed).query)


async def test_a_relayed_code_is_redeemed_only_with_the_redirect_uri_of_its_authorization(
    oauth_upstream: OAuthFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await oauth_upstream("--send-iss")
    proxy = await start_proxy(upstream.url)
    register = proxy.url.replace("/mcp", "/oauth/mcp/register")
    registration = {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none", "client_name": "t"}
    async with http.post(register, json=registration) as response:
        assert response.status == 201
        client = await response.json()
    assert client["redirect_uris"] == [REDIRECT_URI]
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT_URI,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "s",
    }
    authorize = str(URL(proxy.url.replace("/mcp", "/oauth/mcp/authorize")).with_query(query))
    code = parse_qs(urlsplit(await follow_to_redirect_uri(authorize, REDIRECT_URI)).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": ATTACKER_REDIRECT,
        "code_verifier": verifier,
        "client_id": client["client_id"],
    }
    token = proxy.url.replace("/mcp", "/oauth/mcp/token")
    exchanges = (await upstream.stats())["code_exchanges"]
    async with http.post(token, data=form) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_grant"
    # Nor by another client, with the right redirect URI.
    code = parse_qs(urlsplit(await follow_to_redirect_uri(authorize, REDIRECT_URI)).query)["code"][0]
    form = {**form, "code": code, "redirect_uri": REDIRECT_URI, "client_id": "another-client"}
    async with http.post(token, data=form) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_grant"
    assert (await upstream.stats())["code_exchanges"] == exchanges


def metadata_upstream(resource: Callable[[str], str]) -> web.Application:
    """An upstream whose protected-resource metadata names ``resource(its own MCP URL)``, with an
    authorization server at its origin."""

    async def protected_resource(request: web.Request) -> web.Response:
        origin = f"http://{request.host}"
        return web.json_response({"resource": resource(origin + "/mcp"), "authorization_servers": [origin]})

    async def authorization_server(request: web.Request) -> web.Response:
        origin = f"http://{request.host}"
        return web.json_response(
            {"issuer": origin, "authorization_endpoint": origin + "/authorize", "token_endpoint": origin + "/token"}
        )

    app = web.Application()
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", protected_resource)
    app.router.add_get("/.well-known/oauth-authorization-server", authorization_server)
    return app


@pytest.mark.parametrize(
    "foreign",
    [lambda _: "https://api.other.example/v1", lambda url: url.replace("/mcp", "/other-api")],
    ids=["another-origin", "another-path"],
)
async def test_metadata_naming_another_resource_is_refused_everywhere(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    foreign: Callable[[str], str],
) -> None:
    server = await aiohttp_server(metadata_upstream(foreign))
    proxy = await start_proxy(str(server.make_url("/mcp")))
    async with http.get(proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")) as response:
        assert response.status == 502
        error = (await response.json())["error"]
    assert error["code"] == -32002
    assert "refusing" in error["message"]
    authorize = proxy.url.replace("/mcp", "/oauth/mcp/authorize")
    query = {"response_type": "code", "client_id": "c", "redirect_uri": REDIRECT_URI, "resource": proxy.url}
    async with http.get(authorize, params=query, allow_redirects=False) as response:
        assert response.status == 502, "no authorization is asked for the other server's resource"
        assert "Location" not in response.headers


async def test_metadata_naming_the_upstreams_origin_is_accepted(
    aiohttp_server: Callable[..., Awaitable[TestServer]], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    server = await aiohttp_server(metadata_upstream(lambda url: url.removesuffix("/mcp")))
    proxy = await start_proxy(str(server.make_url("/mcp")))
    async with http.get(proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")) as response:
        assert response.status == 200
        assert (await response.json())["resource"] == proxy.url
    authorize = proxy.url.replace("/mcp", "/oauth/mcp/authorize")
    query = {"response_type": "code", "client_id": "c", "redirect_uri": REDIRECT_URI, "resource": proxy.url}
    async with http.get(authorize, params=query, allow_redirects=False) as response:
        assert response.status == 302
        sent = parse_qs(urlsplit(response.headers["Location"]).query)
    assert sent["resource"] == [str(server.make_url(""))]


async def test_logins_against_a_hanging_metadata_host_share_one_fetch_and_its_failure(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery, "FETCH_TIMEOUT", aiohttp.ClientTimeout(total=0.5))
    asked = 0

    async def hang(_: web.Request) -> web.Response:
        nonlocal asked
        asked += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", hang)
    server = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")))
    metadata = proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")

    async def fetch() -> int:
        async with http.get(metadata) as response:
            return response.status

    started = time.monotonic()
    statuses = await asyncio.gather(*(fetch() for _ in range(8)))
    elapsed = time.monotonic() - started
    assert statuses == [502] * 8
    assert asked == 1, "one fetch for all eight"
    assert elapsed < 2.0, f"the eight waited {elapsed:.1f} s (one after another: 8 x 0.5 s)"
    # The failure is remembered for a few seconds: the next login gets it at once.
    started = time.monotonic()
    assert await fetch() == 502
    assert time.monotonic() - started < 0.3
    assert asked == 1


async def test_a_slow_authorization_server_document_does_not_hold_up_the_resource_document(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery, "FETCH_TIMEOUT", aiohttp.ClientTimeout(total=3.0))

    async def protected_resource(request: web.Request) -> web.Response:
        origin = f"http://{request.host}"
        return web.json_response({"resource": origin + "/mcp", "authorization_servers": [origin]})

    fetching = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        fetching.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", protected_resource)
    app.router.add_get("/.well-known/oauth-authorization-server", hang)
    server = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")))
    metadata = proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
    async with http.get(metadata) as response:
        assert response.status == 200
    authorize = proxy.url.replace("/mcp", "/oauth/mcp/authorize")

    async def authorization() -> int:
        async with http.get(authorize, params={"client_id": "c"}, allow_redirects=False) as response:
            return response.status

    async def resource_document_meanwhile() -> float:
        async with asyncio.timeout(5):
            await fetching.wait()  # the authorization server's metadata is being fetched
        started = time.monotonic()
        async with http.get(metadata) as response:
            assert response.status == 200
        return time.monotonic() - started

    async with asyncio.TaskGroup() as group:
        waiting = group.create_task(authorization())
        meanwhile = group.create_task(resource_document_meanwhile())
    assert meanwhile.result() < 1.0
    assert waiting.result() == 502
