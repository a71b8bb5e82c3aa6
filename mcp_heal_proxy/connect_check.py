"""``check-config --connect``: try each upstream once, step by step, and say where it stopped and why.

The steps are the ones a request of the proxy takes: DNS, TCP (or, through an outbound proxy, the proxy
and its CONNECT tunnel), TLS (https), then HTTP and MCP through
the proxy's own upstream client (the configured headers, ca_file, client certificate and managed login
apply): an ``initialize``, whose session is then ended with a DELETE so that the check leaves nothing
open upstream. Each upstream gets one line: the steps that worked, then the one that failed with its
cause and fix. Every step is bounded by the upstream's ``connect_timeout`` (reads by ``read_timeout``,
at most 30 s); nothing is retried, so a check ends in a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import aiohttp

from mcp_heal_proxy import __version__
from mcp_heal_proxy.config import ProxyConfig, UpstreamConfig, mask_url
from mcp_heal_proxy.display import mask_text
from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.upstream.proxy import (
    ProxyCouldNotConnect,
    ProxyRefused,
    ProxyRoute,
    ProxyUnreachable,
    open_tunnel,
    proxy_for,
)
from mcp_heal_proxy.upstream.tls import tls_context, tls_failure

# A check waits no longer than this for an answer, whatever read_timeout allows a tool call.
_MAX_READ: Final = 30.0
# The protocol version the check's initialize asks for; the server answers with the one it speaks.
_PROTOCOL_VERSION: Final = "2025-11-25"
_INITIALIZE_ID: Final = "mcp-heal-proxy-check"


class _Stopped(Exception):
    """A step failed: ``step`` is its name, the message its cause and fix."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.message = message


@dataclass(slots=True)
class Outcome:
    """What one upstream's check found: the steps that worked, and the failure if one stopped it."""

    name: str
    url: str
    passed: list[str] = field(default_factory=list)
    stopped_at: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.stopped_at is None

    def line(self) -> str:
        done = ", ".join(self.passed)
        if self.ok:
            return f"{self.name} ({self.url}): ok: {done}"
        before = f"{done}; " if done else ""
        return f"{self.name} ({self.url}): {before}stopped at {self.stopped_at}: {self.reason}"


async def check_upstream(upstream: UpstreamConfig, state: str) -> Outcome:
    """Try one upstream once; never raises for a failure of the upstream (it is in the outcome)."""
    outcome = Outcome(upstream.name, mask_url(upstream.url))
    parts = urlsplit(upstream.url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    timeout = upstream.connect_timeout
    try:
        try:
            route = proxy_for(upstream.url, upstream.proxy)
        except ValueError as exc:
            raise _Stopped("proxy", str(exc)) from None
        if route is not None:
            outcome.passed.extend(await _through_proxy(upstream, route, host, port, https, timeout))
            outcome.passed.extend(await _mcp(upstream, state))
            return outcome
        addresses = await _resolve(host, port, timeout)
        if addresses[0] != host:  # an IP address in the URL needs no DNS
            outcome.passed.append(f"DNS {host} -> {addresses[0]}")
        await _tcp(addresses[0], port, host, timeout)
        outcome.passed.append(f"TCP {port}")
        if https:
            version = await _tls(upstream, host, port, timeout)
            outcome.passed.append(f"TLS ({version})")
        outcome.passed.extend(await _mcp(upstream, state))
    except _Stopped as stop:
        outcome.stopped_at = stop.step
        outcome.reason = stop.message
    return outcome


async def _resolve(host: str, port: int, limit: float) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(limit):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise _Stopped("DNS", f"no answer for {host} within {limit:g} s; check the DNS servers") from None
    except OSError as exc:
        raise _Stopped(
            "DNS", f"cannot resolve {host} ({exc.strerror or exc}); check the host name in the URL"
        ) from None
    return [str(info[4][0]) for info in infos]


async def _tcp(address: str, port: int, host: str, limit: float) -> None:
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(address, port)
    except TimeoutError:
        raise _Stopped(
            "TCP",
            f"no connection to {host}:{port} within connect_timeout ({limit:g} s); a firewall, or a host that is down",
        ) from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise _Stopped(
            "TCP", f"cannot connect to {host}:{port} ({reason}); is the server running, and the port right?"
        ) from None
    writer.close()
    await _closed(writer)


async def _tls(upstream: UpstreamConfig, host: str, port: int, limit: float) -> str:
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(host, port, ssl=tls_context(upstream), server_hostname=host)
    except TimeoutError:
        raise _Stopped("TLS", f"no TLS handshake within connect_timeout ({limit:g} s)") from None
    except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
        raise _Stopped("TLS", tls_failure(exc, host) or f"the handshake failed ({exc})") from None
    ssl_object = writer.get_extra_info("ssl_object")
    version = ssl_object.version() if ssl_object is not None else None
    writer.close()
    await _closed(writer)
    return str(version or "ok")


async def _through_proxy(
    upstream: UpstreamConfig, route: ProxyRoute, host: str, port: int, https: bool, limit: float
) -> list[str]:
    """The proxy, its tunnel to the upstream, and TLS inside the tunnel (https): what passed."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(limit):
            raw = await open_tunnel(loop, route, host, port)
    except TimeoutError:
        raise _Stopped(
            "proxy", f"no answer from the outbound proxy {route.shown} within connect_timeout ({limit:g} s)"
        ) from None
    except ProxyUnreachable as exc:
        raise _Stopped("proxy", f"{exc.strerror}; check the proxy URL ({route.source}) and that it runs") from None
    except ProxyRefused as exc:
        raise _Stopped("CONNECT", str(exc)) from None
    except ProxyCouldNotConnect as exc:
        raise _Stopped("CONNECT", f"{exc.strerror}; is the server running, and the port right?") from None
    passed = [f"proxy {route.shown} ({route.source})", f"CONNECT {host}:{port}"]
    if not https:
        raw.close()
        return passed
    protocol = asyncio.Protocol()
    raw.set_protocol(protocol)
    try:
        async with asyncio.timeout(limit):
            secured = await loop.start_tls(raw, protocol, tls_context(upstream), server_hostname=host)
    except TimeoutError:
        raw.close()
        raise _Stopped("TLS", f"no TLS handshake within connect_timeout ({limit:g} s)") from None
    except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
        raw.close()
        raise _Stopped("TLS", tls_failure(exc, host) or f"the handshake failed ({exc})") from None
    ssl_object = secured.get_extra_info("ssl_object") if secured is not None else None
    version = ssl_object.version() if ssl_object is not None else None
    passed.append(f"TLS ({version or 'ok'})")
    if secured is not None:
        secured.close()
    return passed


async def _closed(writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(2):
            await writer.wait_closed()
    except (TimeoutError, OSError, ssl.SSLError):
        pass  # closing is not a step the check reports on


async def _mcp(upstream_config: UpstreamConfig, state: str) -> list[str]:
    """The MCP steps through the proxy's own client: initialize, then DELETE of the session it opened."""
    from dataclasses import replace

    from mcp_heal_proxy.bridge.probe import discovered, refused_as_modern
    from mcp_heal_proxy.upstream.client import Upstream, read_capped

    auth = None
    if upstream_config.auth == "oauth":
        from mcp_heal_proxy.auth.managed import managed_auth

        auth = managed_auth(upstream_config, state)
    # One attempt, reads bounded for a check (a tool may think for minutes; an initialize does not).
    config = replace(upstream_config, connect_retry=0.0, read_timeout=min(upstream_config.read_timeout, _MAX_READ))
    upstream = Upstream(config, auth=auth)
    passed: list[str] = []
    try:
        body = {
            "jsonrpc": "2.0",
            "id": _INITIALIZE_ID,
            "method": "initialize",
            "params": {
                "protocolVersion": _PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-heal-proxy check-config", "version": __version__},
            },
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        try:
            response = await upstream.send("POST", headers, json.dumps(body).encode(), patient=False)
        except ProxyError as exc:
            raise _Stopped("HTTP", exc.message) from None
        try:
            status = response.status
            session_id = response.headers.get("Mcp-Session-Id")
            content_type = response.headers.get("Content-Type", "")
            raw = await read_capped(response)
        except ProxyError as exc:
            raise _Stopped("HTTP", exc.message) from None
        finally:
            response.release()
        if status == 400 and upstream_config.era != "legacy" and refused_as_modern(status, raw):
            # A 2026-07-28-only server: what the proxy bridges to is its server/discover.
            found = await discovered(upstream)
            if found is not None:
                return [*passed, "HTTP 400 to initialize (a 2026-07-28-only server)", found]
        if status != 200:
            raise _Stopped("HTTP", _status_hint(status, upstream_config))
        passed.append("HTTP 200")
        result = _initialize_result(raw, content_type)
        info = result.get("serverInfo")
        server: dict[str, Any] = info if isinstance(info, dict) else {}
        described = " ".join(str(server[key]) for key in ("name", "version") if server.get(key))
        passed.append(
            f"MCP initialize ({described or 'a server'}, protocol {result.get('protocolVersion', 'unnamed')})"
        )
        if session_id is None:
            passed.append("no session to end (stateless server)")
            return passed
        ending = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": str(result.get("protocolVersion", ""))}
        try:
            answer = await upstream.send("DELETE", ending, patient=False, resendable=True)
            answer.release()
        except ProxyError as exc:
            raise _Stopped(
                "DELETE", f"{exc.message}; the check's session stays open until the server expires it"
            ) from None
        if answer.status in (200, 202, 204):
            passed.append("session ended (DELETE)")
        elif answer.status == 405:
            passed.append("session left to expire (the server refuses DELETE: 405)")
        else:
            raise _Stopped("DELETE", f"the server answered {answer.status} to ending the check's session")
        return passed
    finally:
        await upstream.close()


def _status_hint(status: int, upstream: UpstreamConfig) -> str:
    if status == 401:
        how = (
            f"run `mcp-heal-proxy login {upstream.name}`"
            if upstream.auth == "oauth"
            else 'set headers.Authorization, or auth = "oauth" and `mcp-heal-proxy login NAME` (or let '
            "clients log in through the proxy)"
        )
        return f"HTTP 401: the server wants credentials; {how}"
    if status == 403:
        return "HTTP 403: the server refuses these credentials; check the token and its scopes"
    if status in (404, 405):
        return f"HTTP {status}: no MCP endpoint at this URL; check the URL's path (often /mcp)"
    if status in (301, 302, 303, 307, 308):
        return f"HTTP {status}: redirected to another origin; set the URL to where it points"
    if status >= 500:
        return f"HTTP {status}: the server failed; see its logs, or try again"
    return f"HTTP {status}: not an MCP answer to initialize; check the URL"


def _initialize_result(raw: bytes, content_type: str) -> dict[str, Any]:
    """The initialize result from a JSON or an SSE answer; _Stopped at MCP if there is none."""
    messages: list[Any] = []
    try:
        if content_type.startswith("text/event-stream"):
            for line in raw.decode().splitlines():
                if line.startswith("data:") and line[5:].strip():
                    messages.append(json.loads(line[5:]))
        else:
            messages.append(json.loads(raw))
    except ValueError:
        raise _Stopped("MCP", "the answer to initialize is not JSON-RPC; is this an MCP endpoint?") from None
    for message in messages:
        if isinstance(message, dict) and message.get("id") == _INITIALIZE_ID:
            if isinstance(message.get("result"), dict):
                result: dict[str, Any] = message["result"]
                return result
            error = message.get("error")
            detail = error.get("message") if isinstance(error, dict) else None
            raise _Stopped("MCP", f"the server refused initialize ({detail or 'an error'})")
    raise _Stopped("MCP", "no answer to initialize in the server's reply; is this an MCP endpoint?")


async def check_connections(config: ProxyConfig, out: TextIO) -> int:
    """Check every upstream (one at a time, so the lines come in the file's order); 0 if all passed."""
    failed = 0
    secrets = config.secrets()
    for upstream in config.upstreams:
        try:
            outcome = await check_upstream(upstream, config.state)
        except aiohttp.ClientError as exc:  # an outcome, never a traceback
            outcome = Outcome(upstream.name, mask_url(upstream.url), stopped_at="HTTP", reason=str(exc))
        failed += not outcome.ok
        # A reason may quote an exception's text, which may hold a URL with its credentials.
        print(mask_text(outcome.line(), secrets), file=out, flush=True)
    return 1 if failed else 0
