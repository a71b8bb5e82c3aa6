"""https upstreams: the official SDK server under uvicorn with certificates from a test CA (trustme).

Healing across restarts works over https as over http for both upstream clients, the GET stream and the
stdio bridge, trusting the CA through ``ca_file`` (added to the system's trust) or ``SSL_CERT_FILE``; a
certificate the proxy cannot accept, or a handshake that fails, gets the client a JSON-RPC error with its
id that names the cause and the fix, at once (never retried as if the network were down).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult, TextContent
from structlog.testing import capture_logs

from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.upstream import tls
from mcp_heal_proxy.upstream.client import Upstream
from mcp_heal_proxy.upstream.tls import client_context
from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    CertAuthority,
    HttpsUpstreamProcess,
    ProxyFactory,
    UpstreamProcess,
    echo_call,
    mcp_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.managed_login import child_env, login, serve
from tests.oauth_clients import HeadlessLogin, MemoryStorage, OAuthUpstream, oauth_mcp_session
from tests.oauth_server import EXPIRY_LEEWAY
from tests.test_stdio import INITIALIZE as STDIO_INITIALIZE
from tests.test_stdio import bridge_process
from tests.tls_front import TLSFront

CLIENTS = ["lean", "aiohttp"]
CALL_TIMEOUT = 20.0
BRIDGE = str(Path(sys.executable).parent / "mcp-heal-proxy")


def text_of(result: CallToolResult) -> str:
    first = result.content[0]
    assert isinstance(first, TextContent)
    return first.text


async def call(http: aiohttp.ClientSession, url: str, session_id: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST one request on a session: the status and its JSON-RPC answer (from a JSON or an SSE answer)."""
    async with http.post(url, data=json.dumps(body), headers=session_headers(session_id)) as response:
        raw = (await response.read()).decode()
        if response.content_type != "text/event-stream":
            return response.status, json.loads(raw) if raw else None
    data = [line[5:] for line in raw.splitlines() if line.startswith("data:") and line[5:].strip()]
    return response.status, json.loads(data[-1])


@pytest.fixture(autouse=True)
def system_trust_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy trusts what the system trusts unless a test says otherwise."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


# --- healing over https -------------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_tool_call_survives_an_https_upstream_restart(
    client: str, https_upstream: HttpsUpstreamProcess, test_ca: CertAuthority, start_proxy: ProxyFactory
) -> None:
    assert https_upstream.url.startswith("https://127.0.0.1:")
    proxy = await start_proxy(https_upstream.url, client=client, ca_file=str(test_ca.pem))
    async with mcp_session(proxy.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        await https_upstream.restart()
        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
    assert (await https_upstream.stats())["initialize"] == 1, "the restarted upstream was re-initialized once"


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_get_stream_over_https_is_reattached_and_heals_its_session_after_a_restart(
    client: str,
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(https_upstream.url, client=client, ca_file=str(test_ca.pem))
    session_id = await raw_initialize(http, proxy.url)
    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with http.get(proxy.url, headers=headers, timeout=timeout) as stream:
        assert stream.status == 200
        assert len(await https_upstream.live_sessions()) == 1
        await https_upstream.restart()

        # The stream's reattach finds the session gone and heals it: a new upstream session, over https,
        # while the client's stream stays open.
        async def healed() -> bool:
            return len(await https_upstream.live_sessions()) == 1

        await wait_until(healed, 15, "the GET stream's reattach healed the session")
        assert not stream.content.at_eof(), "the client's GET stream stayed open"
        status, answer = await call(http, proxy.url, session_id, echo_call(7, "after"))
        assert status == 200
        assert answer["id"] == 7
        assert answer["result"]["content"][0]["text"] == "after"
    assert (await https_upstream.stats())["initialize"] == 1


async def test_the_stdio_bridge_heals_across_an_https_upstream_restart(
    https_upstream: HttpsUpstreamProcess, test_ca: CertAuthority
) -> None:
    params = StdioServerParameters(
        command=BRIDGE,
        args=["stdio", "--upstream", https_upstream.url, "--set", f"ca_file={test_ca.pem}"],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    async with (
        stdio_client(params) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream) as session,
        asyncio.timeout(CALL_TIMEOUT * 2),
    ):
        await session.initialize()
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        await https_upstream.restart()
        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
    assert (await https_upstream.stats())["initialize"] == 1


# --- trust: ca_file added to the system's CAs, SSL_CERT_FILE --------------------------------------------


def test_ca_file_is_added_to_the_systems_trust_not_put_in_its_place(test_ca: CertAuthority) -> None:
    system = len(client_context(None, None, None).get_ca_certs())
    assert system > 0, "this machine's system CAs are loaded"
    assert len(client_context(str(test_ca.pem), None, None).get_ca_certs()) == system + 1


def test_an_http_upstream_loads_no_certificates() -> None:
    """Loading the system's CAs takes tens of milliseconds: a stdio bridge to an http upstream, launched
    per client session, must not pay for it."""
    tls._context.cache_clear()
    for client in CLIENTS:
        Upstream(UpstreamConfig(url="http://127.0.0.1:9/mcp", client=client))  # type: ignore[arg-type]
    assert tls._context.cache_info().currsize == 0
    Upstream(UpstreamConfig(url="https://127.0.0.1:9/mcp"))
    assert tls._context.cache_info().currsize == 1


async def test_ssl_cert_file_is_honoured_and_ca_file_adds_to_it(
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    # SSL_CERT_FILE names the upstream's CA; ca_file another one: both are trusted.
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.pem))
    proxy = await start_proxy(https_upstream.url, ca_file=str(other_ca))
    session_id = await raw_initialize(http, proxy.url)
    assert (await call(http, proxy.url, session_id, echo_call(2)))[0] == 200
    # Without SSL_CERT_FILE, the other CA alone does not vouch for the upstream.
    monkeypatch.delenv("SSL_CERT_FILE")
    proxy = await start_proxy(https_upstream.url, ca_file=str(other_ca))
    status, answer = await initialize(http, proxy.url)
    assert status == 502
    assert "not trusted" in answer["error"]["message"]


# --- errors that say what they are ---------------------------------------------------------------------


async def initialize(http: aiohttp.ClientSession, url: str, request_id: int = 41) -> tuple[int, Any]:
    body = {"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(url, json=body, headers=MCP_HEADERS) as response:
        return response.status, await response.json()


def unverified() -> ssl.SSLContext:
    """The tests' own context for /stats of a server whose certificate is wrong on purpose."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextlib.asynccontextmanager
async def running(server: UpstreamProcess) -> AsyncIterator[UpstreamProcess]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def assert_refused_at_once(http: aiohttp.ClientSession, proxy_url: str, *expected: str) -> None:
    """An initialize gets a JSON-RPC error with its id naming the cause and the fix, well within
    connect_retry (5 s: a network failure would be retried that long), and the log has a warning."""
    with capture_logs() as logs:
        started = time.monotonic()
        status, answer = await initialize(http, proxy_url, request_id=41)
        elapsed = time.monotonic() - started
    assert status == 502
    assert answer["id"] == 41
    message = answer["error"]["message"]
    for words in expected:
        assert words in message, message
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s: retried as if the network were down"
    warnings = [entry for entry in logs if entry["event"] == "upstream.tls_failed"]
    assert warnings, logs
    assert warnings[0]["log_level"] == "warning"
    assert expected[0] in warnings[0]["error"]


def test_a_tls_connection_that_merely_ended_is_not_called_a_refusal() -> None:
    """A server killed mid-connection (a restart) ends TLS without close_notify: that is the network,
    retried as such, not a certificate problem answered at once."""
    for ended in (
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"),
        ssl.SSLSyscallError(5, "Some I/O error occurred"),
    ):
        assert tls.tls_failure(aiohttp.ClientOSError(104, "broken"), "h") is None
        wrapped = aiohttp.ClientOSError(104, "broken")
        wrapped.__cause__ = ended
        assert tls.tls_failure(wrapped, "h") is None
        assert not tls.is_refusal(ended)
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    assert tls.is_refusal(alert)


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_untrusted_certificate_is_named_with_its_fix(
    client: str, https_upstream: HttpsUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(https_upstream.url, client=client)
    await assert_refused_at_once(
        http, proxy.url, "the upstream's certificate is not trusted (", "unable to get local issuer", "set ca_file"
    )
    assert (await https_upstream.stats())["initialize"] == 0
    # The status page's upstream health names the cause too.
    async with http.get(proxy.url.replace("/mcp", "/_proxy/api/upstreams")) as response:
        assert response.status == 200
        status_page = await response.json()
    (health,) = status_page["upstreams"]
    assert health["last_failure"]["status"] is None  # nothing answered: no HTTP status
    assert "the upstream's certificate is not trusted (" in health["last_failure"]["why"]
    assert "set ca_file" in health["last_failure"]["why"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_certificate_for_another_host_is_named_with_its_fix(
    client: str, test_ca: CertAuthority, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    certificate = test_ca.ca.issue_cert("mcp.other.example")
    async with running(HttpsUpstreamProcess(certificate, test_ca.directory, client_ssl=unverified())) as server:
        proxy = await start_proxy(server.url, client=client, ca_file=str(test_ca.pem))
        await assert_refused_at_once(
            http, proxy.url, "the upstream's certificate is not for 127.0.0.1 (", "mismatch", "in the upstream URL"
        )


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_expired_certificate_is_named_with_its_fix(
    client: str, test_ca: CertAuthority, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    certificate = test_ca.ca.issue_cert(
        "127.0.0.1", not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    async with running(HttpsUpstreamProcess(certificate, test_ca.directory, client_ssl=unverified())) as server:
        proxy = await start_proxy(server.url, client=client, ca_file=str(test_ca.pem))
        await assert_refused_at_once(
            http, proxy.url, "the upstream's certificate has expired (certificate has expired)", "renew"
        )


@pytest.mark.parametrize("client", CLIENTS)
async def test_https_to_a_plain_http_server_is_named_as_a_handshake_failure(
    client: str, sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    url = sse_upstream.url.replace("http://", "https://")
    proxy = await start_proxy(url, client=client)
    await assert_refused_at_once(
        http, proxy.url, "TLS handshake with the upstream failed (", "does not speak TLS", "http:// URL"
    )


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_a_server_that_wants_a_client_certificate_gets_one_from_client_cert(
    client: str,
    version: str,
    test_ca: CertAuthority,
    sse_upstream: UpstreamProcess,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    mine = test_ca.ca.issue_cert("proxy.client.example")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    mine.cert_chain_pems[0].write_to_path(str(cert))
    mine.private_key_pem.write_to_path(str(key))
    # The server's side: its certificate for 127.0.0.1, and client certificates of the test CA required.
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.ca.issue_cert("127.0.0.1").configure_cert(server_side)
    test_ca.ca.configure_trust(server_side)
    server_side.verify_mode = ssl.CERT_REQUIRED
    # TLS 1.3 refuses with its certificate_required alert, TLS 1.2 with a bare handshake_failure.
    server_side.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else ssl.TLSVersion.TLSv1_3
    front = TLSFront(server_side, sse_upstream.port)
    try:
        url = f"https://127.0.0.1:{front.port}/mcp"
        without = await start_proxy(url, client=client, ca_file=str(test_ca.pem))
        await assert_refused_at_once(
            http, without.url, "TLS handshake with the upstream failed (", "client certificate", "set client_cert"
        )
        proxy = await start_proxy(
            url, client=client, ca_file=str(test_ca.pem), client_cert=str(cert), client_key=str(key)
        )
        session_id = await raw_initialize(http, proxy.url)
        status, answer = await call(http, proxy.url, session_id, echo_call(3, "mutual"))
        assert status == 200
        assert answer["result"]["content"][0]["text"] == "mutual"
    finally:
        front.close()


# --- OAuth over https ----------------------------------------------------------------------------------


async def test_an_oauth_login_through_the_stand_in_uses_ca_file_for_every_authorization_request(
    test_ca: CertAuthority, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The stand-in fetches the upstream's metadata, forwards registration, token and refresh requests to
    its https authorization server: all of them trust the upstream's ca_file, none the system alone."""
    certificate = test_ca.ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "oauth.pem", tmp_path / "oauth.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    upstream = OAuthUpstream(tmp_path, "--token-lifetime", "2", tls=(cert, key, test_ca.trusting_context()))
    await upstream.start()
    try:
        assert upstream.url.startswith("https://")
        # Without ca_file, the metadata the client asks for first names the certificate and the fix.
        untrusting = await start_proxy(upstream.url)
        metadata = untrusting.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
        async with aiohttp.ClientSession() as http, http.get(metadata) as response:
            assert response.status == 502
            message = (await response.json())["error"]["message"]
        assert "the upstream's certificate is not trusted (" in message
        assert "set ca_file" in message
        proxy = await start_proxy(upstream.url, ca_file=str(test_ca.pem))
        # The user's browser trusts the corporate CA too (it opens the upstream's authorize page).
        storage, login = MemoryStorage(), HeadlessLogin(test_ca.trusting_context())
        async with asyncio.timeout(60), oauth_mcp_session(proxy.url, storage, login) as session:
            first = await session.call_tool("whoami", {})
            assert not first.is_error, first
            await upstream.restart()
            issued = time.time()
            assert storage.tokens is not None
            assert storage.tokens.expires_in is not None
            expires = issued + storage.tokens.expires_in + EXPIRY_LEEWAY + 1.5
            await wait_until(lambda: time.time() > expires, storage.tokens.expires_in + 8, "access token expired")
            second = await session.call_tool("echo", {"text": "after restart"})
            assert text_of(second) == "after restart"
        stats = await upstream.stats()  # counted since the restart
        assert stats["refreshes"] >= 1, "the refresh went through the stand-in to the https server"
        assert stats["initialize"] == 1
        assert set(stats["token_resources"]) == {upstream.url}
        assert login.logins == 1
    finally:
        await upstream.stop()


@pytest.mark.parametrize("client", CLIENTS)
async def test_after_a_restart_with_a_certificate_of_another_ca_the_next_call_fails_at_once_naming_it(
    client: str, test_ca: CertAuthority, start_proxy: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The upstream restarts with a certificate of a CA nobody told the proxy about (a rotation): the
    call on the open session is not retried as if the upstream were still restarting, and says why."""
    server = HttpsUpstreamProcess(
        test_ca.ca.issue_cert("127.0.0.1"), test_ca.directory, client_ssl=test_ca.trusting_context()
    )
    async with running(server):
        proxy = await start_proxy(server.url, client=client, ca_file=str(test_ca.pem))
        session_id = await raw_initialize(http, proxy.url)
        assert (await call(http, proxy.url, session_id, echo_call(1)))[0] == 200
    rotated = HttpsUpstreamProcess(
        trustme.CA().issue_cert("127.0.0.1"), tmp_path, client_ssl=unverified(), port=server.port
    )
    async with running(rotated):
        with capture_logs() as logs:
            started = time.monotonic()
            status, answer = await call(http, proxy.url, session_id, echo_call(2))
            elapsed = time.monotonic() - started
    assert status == 502
    assert answer["id"] == 2
    assert "the upstream's certificate is not trusted (" in answer["error"]["message"]
    assert "set ca_file" in answer["error"]["message"]
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s: retried as if the upstream were still restarting"
    assert any(entry["event"] == "upstream.tls_failed" for entry in logs)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_get_stream_whose_upstream_comes_back_with_an_untrusted_certificate_ends_at_once_naming_it(
    client: str, test_ca: CertAuthority, start_proxy: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The reattach of a GET stream meets a certificate nobody trusts: no retry makes it trusted, so the
    stream ends at the first attempt with the cause in the log, not after ten attempts and a minute."""
    server = HttpsUpstreamProcess(
        test_ca.ca.issue_cert("127.0.0.1"), test_ca.directory, client_ssl=test_ca.trusting_context()
    )
    await server.start()
    proxy = await start_proxy(server.url, client=client, ca_file=str(test_ca.pem))
    session_id = await raw_initialize(http, proxy.url)
    headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    rotated = HttpsUpstreamProcess(
        trustme.CA().issue_cert("127.0.0.1"), tmp_path, client_ssl=unverified(), port=server.port
    )
    with capture_logs() as logs:
        async with http.get(proxy.url, headers=headers, timeout=timeout) as stream:
            assert stream.status == 200
            await server.stop()
            async with running(rotated):
                started = time.monotonic()
                async with asyncio.timeout(20):
                    while await stream.content.readany():
                        pass  # keep-alive comments until the proxy ends the stream
                elapsed = time.monotonic() - started
    retries = [entry for entry in logs if entry["event"] == "stream.reattach_retry"]
    failed = [entry for entry in logs if entry["event"] == "stream.reattach_failed"]
    assert failed, logs
    assert "the upstream's certificate is not trusted (" in failed[0]["error"]
    assert not [entry for entry in retries if "certificate" in entry["error"]], retries
    assert elapsed < 8.0, f"the stream ended {elapsed:.1f} s after the restart"


async def test_a_managed_login_and_its_refresh_reach_an_https_authorization_server_through_ca_file(
    test_ca: CertAuthority, tmp_path: Path
) -> None:
    """``login`` (discovery, registration, code exchange) and serve's refresh and MCP requests all trust
    the upstream's ca_file; the user's browser trusts the CA too."""
    certificate = test_ca.ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "oauth.pem", tmp_path / "oauth.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    upstream = OAuthUpstream(tmp_path, "--token-lifetime", "1", tls=(cert, key, test_ca.trusting_context()))
    await upstream.start()
    try:
        state_home = tmp_path / "state"
        env = child_env(state_home)
        config = tmp_path / "proxy.toml"
        config.write_text(
            f'[upstreams.up]\nurl = "{upstream.url}"\npath = "/mcp"\nauth = "oauth"\nca_file = "{test_ca.pem}"\n'
        )
        untrusting = tmp_path / "untrusting.toml"
        untrusting.write_text(f'[upstreams.up]\nurl = "{upstream.url}"\npath = "/mcp"\nauth = "oauth"\n')
        refused = await login(untrusting, "up", env, trust=test_ca.trusting_context())
        assert refused.returncode == 1
        assert "the upstream's certificate is not trusted (" in refused.stderr
        assert "set ca_file" in refused.stderr
        result = await login(config, "up", env, trust=test_ca.trusting_context())
        assert result.returncode == 0, result.stderr
        assert result.callback_status == 200
        proxy = await serve(config, env)
        try:
            async with mcp_session(proxy.url) as session:
                assert text_of(await session.call_tool("echo", {"text": "one"})) == "one"
                token_file = state_home / "mcp-heal-proxy" / "oauth" / "up.json"
                expires_at = json.loads(token_file.read_text())["expires_at"]
                await wait_until(lambda: time.time() > expires_at + 0.5, 10, "access token expired")
                assert text_of(await session.call_tool("echo", {"text": "two"})) == "two"
        finally:
            log = await proxy.stop()
        assert "auth.token_refreshed" in log, log[-4000:]
        stats = await upstream.stats()
        assert stats["refreshes"] >= 1
        assert stats["code_exchanges"] == 1
    finally:
        await upstream.stop()


def serving_context(ca: trustme.CA, client_ca: CertAuthority | None = None) -> ssl.SSLContext:
    """A server's context with a certificate for 127.0.0.1 from ``ca`` (and client certificates of
    ``client_ca`` required)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if client_ca is not None:
        client_ca.ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_heal_whose_re_initialize_meets_an_untrusted_certificate_fails_at_once(
    client: str, test_ca: CertAuthority, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The session expired (404) and the re-initialize's handshake finds a certificate of another CA: the
    heal is not retried for connect_retry as if the upstream were restarting; the client learns why."""
    backend = UpstreamProcess(json_response=True, close_connections=True)  # one request per connection
    async with running(backend):
        front = TLSFront(serving_context(test_ca.ca), backend.port)
        try:
            proxy = await start_proxy(f"https://127.0.0.1:{front.port}/mcp", client=client, ca_file=str(test_ca.pem))
            session_id = await raw_initialize(http, proxy.url)
            assert (await call(http, proxy.url, session_id, echo_call(1)))[0] == 200
            await backend.restart()  # the session is gone: the next call gets 404 and heals
            front.rotate(serving_context(trustme.CA()))  # from the handshake after the 404's on
            with capture_logs() as logs:
                started = time.monotonic()
                status, answer = await call(http, proxy.url, session_id, echo_call(2))
                elapsed = time.monotonic() - started
        finally:
            front.close()
    assert status == 502
    assert answer["id"] == 2
    assert "the upstream's certificate is not trusted (" in answer["error"]["message"]
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s: the heal was retried for connect_retry"
    failed = [entry for entry in logs if entry["event"] == "session.heal_failed"]
    assert failed, [entry["event"] for entry in logs]
    assert "not trusted" in failed[0]["error"]


async def test_the_stdio_bridge_answers_an_untrusted_certificate_with_an_error_naming_it(
    https_upstream: HttpsUpstreamProcess,
) -> None:
    async with bridge_process("--upstream", https_upstream.url) as bridge:
        # The clock starts once the bridge reads its stdin (a request it refuses by itself, no upstream
        # involved): its Python start-up, seconds on a loaded machine, is not the answer's time.
        await bridge.send({"jsonrpc": "2.0", "id": 76, "method": 42})
        assert (await bridge.receive())["id"] == 76
        started = time.monotonic()
        await bridge.send({**STDIO_INITIALIZE, "id": 77})
        answer = await bridge.receive()
        elapsed = time.monotonic() - started
        assert bridge.process.stdin is not None
        bridge.process.stdin.close()
        assert await bridge.wait() == 0
        log = await bridge.stderr()
    assert answer["id"] == 77
    assert "the upstream's certificate is not trusted (" in answer["error"]["message"]
    assert "set ca_file" in answer["error"]["message"]
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s"
    assert "upstream.tls_failed" in log


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_handshake_the_server_cuts_off_is_a_failed_connect_retried_within_connect_retry(
    client: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A server that reads the ClientHello and closes (one being killed, a load balancer without a backend)
    ends TLS without an alert: that is the network, retried for connect_retry like a refused connect."""
    hellos = 0

    async def cut_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hellos
        hellos += 1
        await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(cut_off, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(f"https://127.0.0.1:{port}/mcp", client=client, connect_retry=0.5)
        with capture_logs() as logs:
            status, answer = await initialize(http, proxy.url)
    finally:
        server.close()
        await server.wait_closed()
    assert status == 502
    # asyncio and uvloop report the cut as a reset without an errno; OpenSSL's own EOF error (errno 8 of
    # its own) is worded "the TLS handshake was cut off", never strerror(8), "Exec format error".
    assert answer["error"]["message"].startswith(
        ("cannot reach the upstream MCP server: ", "upstream MCP server ended the connection before answering: ")
    )
    assert "Exec format" not in answer["error"]["message"]
    assert hellos > 1, "retried within connect_retry"
    assert not [entry for entry in logs if entry["event"] == "upstream.tls_failed"]
