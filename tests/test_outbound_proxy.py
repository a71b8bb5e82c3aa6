"""Outbound HTTP proxies: a real proxy (tinyproxy, tests/outbound_proxy.py) between the proxy and the
official SDK server, over http and https (the test CA), for both upstream clients.

Every case reads tinyproxy's own log to show the traffic went through it (or, with NO_PROXY, did not).
A proxy that refuses (407) or cannot be reached gets the client a JSON-RPC error with its id that names
the proxy (its password masked) and the fix; a 407 is answered at once, not retried.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from structlog.testing import capture_logs

from mcp_heal_proxy.config import ConfigError, build_config, describe, upstream_settings
from mcp_heal_proxy.upstream.routes import bypassed, proxy_for
from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    REPO_ROOT,
    CertAuthority,
    HttpsUpstreamProcess,
    ProxyFactory,
    UpstreamProcess,
    free_port,
    mcp_session,
)
from tests.outbound_proxy import TinyProxy, tinyproxy, tinyproxy_with_auth
from tests.test_tls import BRIDGE, text_of, unverified

__all__ = ["tinyproxy", "tinyproxy_with_auth"]  # fixtures

CLIENTS = ["lean", "aiohttp"]
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own proxy variables (a CI runner may set some) stay out of these tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def went_through(tinyproxy: TinyProxy, port: int) -> int:
    """Tunnels tinyproxy opened to 127.0.0.1:``port`` (both clients open every connection with CONNECT)."""
    return tinyproxy.connects_to(port)


async def initialize(http: aiohttp.ClientSession, url: str, request_id: int = 41) -> tuple[int, Any]:
    body = {"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(url, json=body, headers=MCP_HEADERS) as response:
        return response.status, await response.json()


# --- healing through the proxy ------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_http_upstream_heals_across_a_restart_through_the_proxy(
    client: str, sse_upstream: UpstreamProcess, tinyproxy: TinyProxy, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url, client=client, proxy=tinyproxy.url)
    async with mcp_session(proxy.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        before = went_through(tinyproxy, sse_upstream.port)
        assert before >= 1, tinyproxy.requests()
        await sse_upstream.restart()
        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
    assert (await sse_upstream.stats())["initialize"] == 1, "the restarted upstream was re-initialized once"
    assert went_through(tinyproxy, sse_upstream.port) > before, "the heal went through the proxy too"
    # CONNECT for http too: every connection is a tunnel, no request goes in absolute form.
    assert all(line.startswith("CONNECT ") for line in tinyproxy.requests()), tinyproxy.requests()


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_https_upstream_heals_across_a_restart_through_a_connect_tunnel(
    client: str,
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    tinyproxy: TinyProxy,
    start_proxy: ProxyFactory,
) -> None:
    proxy = await start_proxy(https_upstream.url, client=client, ca_file=str(test_ca.pem), proxy=tinyproxy.url)
    async with mcp_session(proxy.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        assert tinyproxy.connects_to(https_upstream.port) >= 1, tinyproxy.requests()
        await https_upstream.restart()
        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
    assert (await https_upstream.stats())["initialize"] == 1
    assert all(line.startswith("CONNECT ") for line in tinyproxy.requests()), tinyproxy.requests()


@pytest.mark.parametrize("client", CLIENTS)
async def test_tls_inside_the_tunnel_is_checked_against_the_upstreams_host_name(
    client: str,
    https_upstream: HttpsUpstreamProcess,
    tinyproxy: TinyProxy,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Without the test CA trusted, the certificate the upstream shows through the tunnel is refused."""
    proxy = await start_proxy(https_upstream.url, client=client, proxy=tinyproxy.url)
    started = time.monotonic()
    status, answer = await initialize(http, proxy.url)
    assert time.monotonic() - started < 2.0
    assert (status, answer["id"]) == (502, 41)
    assert "the upstream's certificate is not trusted (" in answer["error"]["message"]
    assert tinyproxy.connects_to(https_upstream.port) >= 1


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_certificate_for_another_host_is_refused_inside_the_tunnel(
    client: str,
    test_ca: CertAuthority,
    tinyproxy: TinyProxy,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The tunnel ends at the upstream, so its certificate must name the upstream's host: one for another
    name, from a trusted CA, is refused (TLS is not checked against the proxy's name)."""
    server = HttpsUpstreamProcess(
        test_ca.ca.issue_cert("mcp.other.example"), tmp_path, client_ssl=test_ca.trusting_context()
    )
    server.client_ssl = unverified()
    await server.start()
    try:
        proxy = await start_proxy(server.url, client=client, ca_file=str(test_ca.pem), proxy=tinyproxy.url)
        status, answer = await initialize(http, proxy.url)
        assert (status, answer["id"]) == (502, 41)
        assert "the upstream's certificate is not for 127.0.0.1" in answer["error"]["message"]
        assert tinyproxy.connects_to(server.port) >= 1
    finally:
        await server.stop()


# --- credentials --------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_proxy_credentials_are_sent_and_masked_in_every_output(
    client: str,
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    tinyproxy_with_auth: TinyProxy,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    secret = tinyproxy_with_auth.password
    assert secret is not None
    with capture_logs() as logs:
        proxy = await start_proxy(
            https_upstream.url, client=client, ca_file=str(test_ca.pem), proxy=tinyproxy_with_auth.url
        )
        async with mcp_session(proxy.url) as session:
            assert text_of(await session.call_tool("echo", {"text": "hi"})) == "hi"
    assert tinyproxy_with_auth.connects_to(https_upstream.port) >= 1
    assert secret not in json.dumps(logs, default=str)
    # The status page names the proxy, masked.
    async with http.get(proxy.url.replace("/mcp", "/_proxy/api/upstreams")) as response:
        (health,) = (await response.json())["upstreams"]
    assert health["proxy"] == f"http://***@127.0.0.1:{tinyproxy_with_auth.port}", health


def test_check_config_and_the_banner_mask_the_proxy_password(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[server]\nproxy = "http://corp:hunter22@proxy.example:3128"\n'
        '[upstreams.a]\nurl = "https://a.example/mcp"\n'
        '[upstreams.b]\nurl = "https://b.example/mcp"\nproxy = ""\n'
    )
    built = build_config(config_file=str(config), flags={}, environ={})
    a, b = built.upstreams
    assert a.proxy == "http://corp:hunter22@proxy.example:3128", "[server] proxy is the default"
    assert b.proxy == "", '"" goes direct'
    shown = json.dumps(describe(built))
    assert "hunter22" not in shown
    assert "http://***@proxy.example:3128" in shown
    assert "hunter22" in built.secrets()
    from mcp_heal_proxy.cli import banner

    lines = "\n".join(banner(built, 8080))
    assert "hunter22" not in lines
    assert "a.example/mcp via proxy http://***@proxy.example:3128 (proxy)" in lines
    assert "b.example/mcp\n" in lines + "\n"


async def test_the_served_banner_and_log_mask_the_proxy_password(tinyproxy_with_auth: TinyProxy) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_heal_proxy", "serve", "--upstream", "https://mcp.example/mcp",
        "--set", f"proxy={tinyproxy_with_auth.url}", "--port", "0", "--state", ":memory:",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not any("paste into your MCP client" in line for line in lines):
                line = (await process.stdout.readline()).decode()
                assert line, f"the proxy stopped: {lines}"
                lines.append(line)
    finally:
        process.terminate()
        async with asyncio.timeout(10):
            _, stderr = await process.communicate()
    shown = "".join(lines) + stderr.decode()
    assert tinyproxy_with_auth.password is not None
    assert tinyproxy_with_auth.password not in shown
    assert f"via proxy http://***@127.0.0.1:{tinyproxy_with_auth.port} (proxy)" in shown, shown


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_407_is_named_with_its_fix_at_once(
    client: str,
    scheme: str,
    sse_upstream: UpstreamProcess,
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    tinyproxy_with_auth: TinyProxy,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    upstream = https_upstream if scheme == "https" else sse_upstream
    proxy = await start_proxy(upstream.url, client=client, ca_file=str(test_ca.pem), proxy=tinyproxy_with_auth.bare_url)
    with capture_logs() as logs:
        started = time.monotonic()
        status, answer = await initialize(http, proxy.url)
        elapsed = time.monotonic() - started
    assert (status, answer["id"]) == (502, 41)
    message = answer["error"]["message"]
    assert f"the outbound proxy http://127.0.0.1:{tinyproxy_with_auth.port} (proxy) refused" in message, message
    assert "407" in message
    assert "http://USER:PASSWORD@HOST:PORT" in message
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s: retried as if the network were down"
    warnings = [entry for entry in logs if entry["event"] == "upstream.proxy_refused"]
    assert warnings, logs
    assert warnings[0]["log_level"] == "warning"
    assert (await upstream.stats())["initialize"] == 0
    async with http.get(proxy.url.replace("/mcp", "/_proxy/api/upstreams")) as response:
        (health,) = (await response.json())["upstreams"]
    assert "407" in health["last_failure"]["why"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_wrong_proxy_password_is_named_as_such(
    client: str,
    sse_upstream: UpstreamProcess,
    tinyproxy_with_auth: TinyProxy,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    wrong = f"http://proxyuser:not-the-password@127.0.0.1:{tinyproxy_with_auth.port}"
    proxy = await start_proxy(sse_upstream.url, client=client, proxy=wrong)
    status, answer = await initialize(http, proxy.url)
    assert (status, answer["id"]) == (502, 41)
    message = answer["error"]["message"]
    # tinyproxy answers wrong credentials with 401 (and none with 407): both are a refusal for good.
    assert "401 Unauthorized" in message, message
    assert "user and password are wrong" in message
    assert "not-the-password" not in message
    assert f"http://***@127.0.0.1:{tinyproxy_with_auth.port}" in message


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_403_from_the_proxys_policy_is_named_at_once(
    client: str, sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """tinyproxy allows CONNECT to port 443 only here (as Squid does by default): 403 to the upstream's."""
    strict = TinyProxy(tmp_path, connect_ports=(443,))
    await strict.start()
    try:
        proxy = await start_proxy(sse_upstream.url, client=client, proxy=strict.url)
        started = time.monotonic()
        status, answer = await initialize(http, proxy.url)
        elapsed = time.monotonic() - started
        assert strict.requests() == [f"CONNECT 127.0.0.1:{sse_upstream.port} HTTP/1.1"]
    finally:
        await strict.stop()
    assert (status, answer["id"]) == (502, 41)
    message = answer["error"]["message"]
    assert f"the outbound proxy http://127.0.0.1:{strict.port} (proxy) refused the connection (403" in message
    assert "its policy refuses this host or port" in message
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s: retried as if the network were down"


# --- a proxy that cannot be reached -----------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_unreachable_proxy_is_named(
    client: str, sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    proxy = await start_proxy(
        sse_upstream.url, client=client, proxy=f"http://someone:pw@127.0.0.1:{port}", connect_retry=0.5
    )
    status, answer = await initialize(http, proxy.url)
    assert (status, answer["id"]) == (502, 41)
    message = answer["error"]["message"]
    assert f"cannot connect to the outbound proxy http://***@127.0.0.1:{port} (proxy)" in message, message
    assert "connection refused" in message.lower()
    async with http.get(proxy.url.replace("/mcp", "/_proxy/api/upstreams")) as response:
        (health,) = (await response.json())["upstreams"]
    assert "outbound proxy" in json.dumps(health), health


# --- the environment -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
async def test_https_proxy_from_the_environment_is_used_when_no_key_is_set(
    client: str,
    variable: str,
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    tinyproxy: TinyProxy,
    start_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(variable, tinyproxy.url)
    proxy = await start_proxy(https_upstream.url, client=client, ca_file=str(test_ca.pem))
    async with mcp_session(proxy.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "hi"})) == "hi"
    assert tinyproxy.connects_to(https_upstream.port) >= 1, tinyproxy.requests()


@pytest.mark.parametrize("client", CLIENTS)
async def test_http_proxy_from_the_environment_is_used_and_no_proxy_honoured(
    client: str,
    sse_upstream: UpstreamProcess,
    tinyproxy: TinyProxy,
    start_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    proxied = await start_proxy(sse_upstream.url, client=client)
    async with mcp_session(proxied.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "hi"})) == "hi"
    carried = went_through(tinyproxy, sse_upstream.port)
    assert carried >= 1, tinyproxy.requests()
    monkeypatch.setenv("NO_PROXY", "example.com, 127.0.0.0/8")
    direct = await start_proxy(sse_upstream.url, client=client)
    async with mcp_session(direct.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "direct"})) == "direct"
    assert went_through(tinyproxy, sse_upstream.port) == carried, "NO_PROXY's host went direct"


async def test_a_proxy_key_wins_over_the_environment_and_empty_goes_direct(
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    tinyproxy: TinyProxy,
    start_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # HTTPS_PROXY, not HTTP_PROXY: the test's own MCP client (httpx) reads the variables too, and talks
    # to the proxy over http.
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    direct = await start_proxy(https_upstream.url, ca_file=str(test_ca.pem), proxy="")
    async with mcp_session(direct.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "direct"})) == "direct"
    keyed = await start_proxy(https_upstream.url, ca_file=str(test_ca.pem), proxy=tinyproxy.url)
    async with mcp_session(keyed.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "keyed"})) == "keyed"
    assert tinyproxy.connects_to(https_upstream.port) >= 1


def test_no_proxy_matches_hosts_domains_addresses_networks_and_ports() -> None:
    environ = {"NO_PROXY": "internal.example, .corp.example, 10.0.0.0/8, ::1, 192.168.1.5:8443"}
    assert bypassed("internal.example", 443, environ)
    assert bypassed("mcp.internal.example", 443, environ)
    assert bypassed("a.corp.example", 443, environ)
    assert bypassed("corp.example", 443, environ)
    assert not bypassed("notinternal.example", 443, environ)
    assert bypassed("10.2.3.4", 80, environ)
    assert not bypassed("11.2.3.4", 80, environ)
    assert bypassed("::1", 80, environ)
    assert bypassed("192.168.1.5", 8443, environ)
    assert not bypassed("192.168.1.5", 443, environ)
    assert bypassed("anything", 1, {"no_proxy": "*"})
    assert not bypassed("anything", 1, {})


def test_the_environment_picks_the_proxy_by_the_urls_scheme() -> None:
    environ = {"HTTPS_PROXY": "proxy.example:3128", "http_proxy": "http://plain.example:8080", "NO_PROXY": "skip.me"}
    secure = proxy_for("https://mcp.example/mcp", None, environ)
    assert secure is not None
    assert (secure.host, secure.port, secure.source) == ("proxy.example", 3128, "HTTPS_PROXY")
    plain = proxy_for("http://mcp.example/mcp", None, environ)
    assert plain is not None
    assert (plain.host, plain.port, plain.source) == ("plain.example", 8080, "http_proxy")
    assert proxy_for("https://skip.me/mcp", None, environ) is None
    assert proxy_for("https://mcp.example/mcp", "", environ) is None
    keyed = proxy_for("https://skip.me/mcp", "http://u:p%40ss@key.example:1", environ)
    assert keyed is not None
    assert keyed.authorization == "Basic dTpwQHNz"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("https://proxy.example:3128", "must be an http:// URL"),
        ("http://proxy.example:3128/path", "without a path"),
        ("proxy.example:3128", "must be an http://HOST:PORT URL"),
        ("http://proxy.example:99999", "port must be a number from 1 to 65535"),
    ],
)
def test_a_bad_proxy_key_is_refused_where_it_is_set(value: str, words: str, tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[upstreams.a]\nurl = "https://a.example/mcp"\nproxy = "{value}"\n')
    with pytest.raises(ConfigError, match=r"upstreams\.a\.proxy") as refused:
        build_config(config_file=str(config), flags={}, environ={})
    assert words in str(refused.value)


def test_a_bad_proxy_variable_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY must be an http:// URL") as refused:
        build_config(
            config_file=None, flags={"upstream": "https://a.example/mcp"}, environ={"HTTPS_PROXY": "socks5://u:pw@h:1"}
        )
    assert "pw" not in str(refused.value)


# Values a mask could miss: a '/' in the password (unencoded, so the rest parses as a path), and a
# HOST:PORT without a scheme (the environment's form). Each names the part that is wrong, never the value.
TRICKY_PROXIES = [
    ("proxy", "http://user:Xy7/s3cr3t@proxy.corp:3128", "Xy7/s3cr3t", "percent-encode"),
    ("proxy", "http://user:s3cr3t-pw@proxy.corp:abc", "s3cr3t-pw", "port"),
    ("HTTPS_PROXY", "user:s3cret@proxy:abc", "s3cret", "port"),
    ("HTTPS_PROXY", "user:Xy7/s3cr3t@proxy.corp:3128", "Xy7/s3cr3t", "percent-encode"),
    ("HTTPS_PROXY", "socks5://user:s3cr3t-pw@proxy.corp:1080", "s3cr3t-pw", "scheme"),
]


def tricky_config(tmp_path: Path, where: str, value: str) -> tuple[Path, dict[str, str]]:
    config = tmp_path / "proxy.toml"
    if where == "proxy":
        config.write_text(f'[upstreams.a]\nurl = "https://a.example/mcp"\nproxy = "{value}"\n')
        return config, {}
    config.write_text('[upstreams.a]\nurl = "https://a.example/mcp"\n')
    return config, {where: value}


def password_parts(password: str) -> list[str]:
    """The password and each piece of it a mask that stops at '/' would leave."""
    return [password, *(piece for piece in password.split("/") if len(piece) >= 3)]


@pytest.mark.parametrize(("where", "value", "password", "words"), TRICKY_PROXIES)
def test_a_refused_proxy_value_is_never_echoed(
    where: str, value: str, password: str, words: str, tmp_path: Path
) -> None:
    config, environ = tricky_config(tmp_path, where, value)
    with pytest.raises(ConfigError) as refused:
        build_config(config_file=str(config), flags={}, environ=environ)
    message = str(refused.value)
    assert (where if where != "proxy" else "upstreams.a.proxy") in message, message
    assert words in message, message
    for part in password_parts(password):
        assert part not in message, message
    with pytest.raises(ValueError, match="PROXY") as raised:
        proxy_for("https://a.example/mcp", None, {where: value} if where != "proxy" else {"HTTPS_PROXY": value})
    for part in password_parts(password):
        assert part not in str(raised.value), raised.value


@pytest.mark.parametrize(("where", "value", "password", "words"), TRICKY_PROXIES)
async def test_check_config_and_its_connect_never_echo_a_refused_proxy(
    where: str, value: str, password: str, words: str, tmp_path: Path
) -> None:
    config, environ = tricky_config(tmp_path, where, value)
    for connect in ([], ["--connect"]):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcp_heal_proxy", "check-config", *connect, str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
            env={**os.environ, **environ},
        )  # fmt: skip
        async with asyncio.timeout(30):
            stdout, stderr = await process.communicate()
        shown = stdout.decode() + stderr.decode()
        assert process.returncode != 0, shown
        assert words in shown, shown
        for part in password_parts(password):
            assert part not in shown, shown


def test_a_proxy_password_is_a_secret_whole_and_never_in_a_repr() -> None:
    from mcp_heal_proxy.config import _password
    from mcp_heal_proxy.observability import Redactor
    from mcp_heal_proxy.status import _proxy_shown

    # Up to the last '@': the whole password, not the part before a '/' (too short to be redacted).
    assert _password("http://user:Xy7/s3cr3t@proxy.corp:3128") == "Xy7/s3cr3t"
    assert _password("http://user:p@ss:w0rd@proxy.corp:3128") == "p@ss:w0rd"
    assert _password("http://proxy.corp:3128") is None
    accepted = "http://user:Xy7%2Fs3cr3t@proxy.corp:3128"
    config = build_config(config_file=None, flags={"upstream": "https://a.example/mcp", "proxy": accepted}, environ={})
    redactor = Redactor(config.secrets())
    event = redactor(None, "info", {"event": "x", "a": f"via {accepted}", "b": "decoded Xy7/s3cr3t"})
    assert "s3cr3t" not in json.dumps(event), event
    (upstream,) = config.upstreams
    assert _proxy_shown(upstream) == "http://***@proxy.corp:3128"
    route = proxy_for(upstream.url, upstream.proxy)
    assert route is not None
    assert route.authorization is not None
    assert "s3cr3t" not in repr(route), repr(route)
    assert route.authorization not in repr(route), repr(route)


@pytest.mark.parametrize("how", ["--set", "MCP_HEAL_PROXY_PROXY", "HTTPS_PROXY"])
async def test_the_stdio_bridge_heals_across_an_https_upstream_restart_through_the_proxy(
    how: str, https_upstream: HttpsUpstreamProcess, test_ca: CertAuthority, tinyproxy: TinyProxy
) -> None:
    args = ["stdio", "--upstream", https_upstream.url, "--set", f"ca_file={test_ca.pem}"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if how == "--set":
        args += ["--set", f"proxy={tinyproxy.url}"]
    else:
        env[how] = tinyproxy.url
    params = StdioServerParameters(command=BRIDGE, args=args, env=env)
    async with (
        stdio_client(params) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream) as session,
        asyncio.timeout(40),
    ):
        await session.initialize()
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        before = tinyproxy.connects_to(https_upstream.port)
        assert before >= 1, tinyproxy.requests()
        await https_upstream.restart()
        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
    assert (await https_upstream.stats())["initialize"] == 1
    assert tinyproxy.connects_to(https_upstream.port) > before


def test_mcp_heal_proxy_proxy_is_the_default_of_every_upstream_and_of_the_bridge() -> None:
    environ = {"MCP_HEAL_PROXY_PROXY": "http://u:pw@proxy.example:3128"}
    built = build_config(config_file=None, flags={"upstream": "https://a.example/mcp"}, environ=environ)
    assert built.upstreams[0].proxy == "http://u:pw@proxy.example:3128"
    assert upstream_settings([], environ)["proxy"] == "http://u:pw@proxy.example:3128"
    assert upstream_settings(["proxy="], environ)["proxy"] == "", "--set proxy= goes direct"


# --- OAuth and check-config ----------------------------------------------------------------------------------


async def test_oauth_pass_through_discovery_goes_through_the_proxy(
    tinyproxy: TinyProxy, start_proxy: ProxyFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    from tests.oauth_clients import OAuthUpstream

    upstream = OAuthUpstream(tmp_path)
    await upstream.start()
    try:
        proxy = await start_proxy(upstream.url, proxy=tinyproxy.url)
        metadata = proxy.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
        async with http.get(metadata) as response:
            assert response.status == 200, await response.text()
            document = await response.json()
        assert document["authorization_servers"], document
        fetched = [line for line in tinyproxy.requests() if f"127.0.0.1:{upstream.port}" in line]
        assert fetched, tinyproxy.requests()
    finally:
        await upstream.stop()


async def test_a_managed_login_its_refresh_and_logout_go_through_the_proxy(
    tinyproxy: TinyProxy, tmp_path: Path
) -> None:
    """login (discovery, registration, code exchange), serve's refresh and logout's revocation: every
    request to the authorization server goes through the upstream's proxy (absolute-form requests for
    this http one, so tinyproxy's log shows each path), the MCP requests through CONNECT tunnels."""
    from tests.managed_login import child_env, login, serve
    from tests.oauth_clients import OAuthUpstream

    upstream = OAuthUpstream(tmp_path, "--token-lifetime", "1")
    await upstream.start()
    try:
        state_home = tmp_path / "state"
        env = {k: v for k, v in child_env(state_home).items() if k.lower() not in PROXY_VARIABLES}
        config = tmp_path / "proxy.toml"
        config.write_text(
            f'[upstreams.up]\nurl = "{upstream.url}"\npath = "/mcp"\nauth = "oauth"\nproxy = "{tinyproxy.url}"\n'
        )
        result = await login(config, "up", env)
        assert result.returncode == 0, result.stderr
        origin = f"http://127.0.0.1:{upstream.port}"
        paths = [line.split()[1].removeprefix(origin) for line in tinyproxy.requests() if origin in line]
        assert any(path.startswith("/.well-known/oauth-protected-resource") for path in paths), paths
        assert any(path.startswith("/.well-known/oauth-authorization-server") for path in paths), paths
        assert "/register" in paths
        assert "/token" in paths
        proxy = await serve(config, env)
        try:
            async with mcp_session(proxy.url) as session:
                assert text_of(await session.call_tool("echo", {"text": "one"})) == "one"
                token_file = state_home / "mcp-heal-proxy" / "oauth" / "up.json"
                expires_at = json.loads(token_file.read_text())["expires_at"]
                await asyncio.sleep(max(0.0, expires_at + 0.5 - time.time()))
                assert text_of(await session.call_tool("echo", {"text": "two"})) == "two"
        finally:
            log = await proxy.stop()
        assert "auth.token_refreshed" in log, log[-4000:]
        tokens = [line for line in tinyproxy.requests() if line.startswith(f"POST {origin}/token ")]
        assert len(tokens) >= 2, "the code exchange and the refresh"
        assert tinyproxy.connects_to(upstream.port) >= 1, "the MCP requests"
        logout = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcp_heal_proxy", "logout", "up", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, errors = await logout.communicate()
        assert logout.returncode == 0, errors.decode()
        assert "Revoked the refresh token and access token" in out.decode()
        assert any(line.startswith(f"POST {origin}/revoke ") for line in tinyproxy.requests()), tinyproxy.requests()
    finally:
        await upstream.stop()


async def check_connect(config: Path, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_heal_proxy", "check-config", "--connect", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode().splitlines(), stderr.decode()


async def test_check_config_connect_goes_through_the_proxy_and_names_each_step(
    https_upstream: HttpsUpstreamProcess,
    test_ca: CertAuthority,
    tinyproxy_with_auth: TinyProxy,
    tmp_path: Path,
) -> None:
    closed = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[upstreams.good]
url = "{https_upstream.url}"
ca_file = "{test_ca.pem}"
proxy = "{tinyproxy_with_auth.url}"

[upstreams.nocreds]
url = "{https_upstream.url}"
ca_file = "{test_ca.pem}"
proxy = "{tinyproxy_with_auth.bare_url}"

[upstreams.down]
url = "https://127.0.0.1:{closed}/mcp"
proxy = "{tinyproxy_with_auth.url}"

[upstreams.noproxy]
url = "{https_upstream.url}"
proxy = "http://127.0.0.1:{free_port()}"
connect_timeout = 5
"""
    )
    status, lines, stderr = await check_connect(config)
    assert status == 1, (lines, stderr)
    good, nocreds, down, noproxy = lines
    secret = tinyproxy_with_auth.password
    assert secret is not None
    assert secret not in "\n".join(lines) + stderr
    shown = f"http://***@127.0.0.1:{tinyproxy_with_auth.port}"
    assert good.startswith(f"good ({https_upstream.url}): ok: proxy {shown} (proxy), CONNECT 127.0.0.1:"), good
    assert "TLS (TLSv1." in good
    assert "HTTP 200" in good
    assert "MCP initialize" in good
    assert "stopped at CONNECT: the outbound proxy http://127.0.0.1:" in nocreds, nocreds
    assert "407" in nocreds
    assert "stopped at CONNECT: the outbound proxy" in down, down
    assert "could not reach 127.0.0.1:" in down
    assert "stopped at proxy: cannot connect to the outbound proxy" in noproxy, noproxy
    assert tinyproxy_with_auth.connects_to(https_upstream.port) >= 2  # the check's tunnel and the client's
