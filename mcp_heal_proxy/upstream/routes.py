"""Which outbound HTTP proxy a request goes through (see upstream/proxy.py for the rules), without
aiohttp: config.py checks proxy keys and variables with it on the CLI's fast paths.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from mcp_heal_proxy.display import mask_url

# Variables that name a proxy (lower case first, as curl reads them).
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """One outbound proxy: where it listens, and the credentials its URL carries."""

    # As configured, credentials included: never shown (``shown`` is), so not in the repr either.
    url: str = field(repr=False)
    host: str
    port: int
    # "Basic ..." from the URL's user and password, or None.
    authorization: str | None = field(repr=False)
    # Where it was set: "proxy" (the key) or the environment variable's name, for messages.
    source: str

    @property
    def shown(self) -> str:
        """The proxy's URL as every output may show it (its password masked)."""
        return mask_url(self.url)


def parse_proxy(url: str, source: str) -> ProxyRoute:
    """A proxy URL, checked: ``http://[USER:PASSWORD@]HOST[:PORT]`` (a bare ``HOST:PORT`` from the
    environment is taken as http, as curl takes it). ValueError says which part is wrong, never the
    value: it may hold a password that no mask can be sure to find in a malformed URL."""
    if "://" not in url:
        url = f"http://{url}"
    authority = url.partition("://")[2]
    for end in "/?#":
        authority = authority.partition(end)[0]
    if "@" in url.partition("://")[2] and "@" not in authority:
        raise ValueError(
            "must percent-encode '/', '?' and '#' in its user and password (as %2F, %3F, %23): "
            "http://USER:PASSWORD@HOST:PORT"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("must name a valid host: http://HOST:PORT") from None
    try:
        port = parts.port
    except ValueError:
        raise ValueError("must be http://HOST:PORT, and its port must be a number from 1 to 65535") from None
    if parts.scheme != "http":
        raise ValueError(
            "must be an http:// URL, not another scheme (the proxy is spoken to in plain HTTP; CONNECT carries TLS)"
        )
    if not parts.hostname:
        raise ValueError("must name a host: http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be http://HOST:PORT, without a path or query")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return ProxyRoute(url, parts.hostname, port or 80, authorization, source)


def proxy_for(url: str, configured: str | None, environ: Mapping[str, str] | None = None) -> ProxyRoute | None:
    """The proxy a request to ``url`` goes through: the configured one (``""``: none), else the
    environment's for the URL's scheme unless NO_PROXY names its host; None: direct.

    A malformed proxy variable raises ValueError (the caller says which; config.py checks keys first).
    """
    if configured is not None:
        return parse_proxy(configured, "proxy") if configured else None
    environ = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("http", "https"):
        return None
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
        value = environ.get(name)
        if value:
            break
    else:
        return None
    host = parts.hostname or ""
    if bypassed(host, parts.port or (443 if scheme == "https" else 80), environ):
        return None
    try:
        return parse_proxy(value, name)
    except ValueError as exc:
        raise ValueError(f"{name} {exc}") from None  # never the value: see parse_proxy


def bypassed(host: str, port: int, environ: Mapping[str, str]) -> bool:
    """Whether NO_PROXY (or no_proxy) names ``host``: ``*``, the host itself or a parent domain
    (``example.com`` and ``.example.com`` both cover ``api.example.com``), an IP address or a network
    (``10.0.0.0/8``), each optionally with ``:PORT``."""
    value = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    host = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in value.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [::1]:8080
            bracket = entry.find("]")
            rest = entry[bracket + 1 :]
            entry = entry[1:bracket]
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:
            name, _, maybe_port = entry.partition(":")
            if maybe_port.isdigit():
                entry, entry_port = name, int(maybe_port)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            continue
        entry = entry.lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def refusal_words(route: ProxyRoute, status: int, reason: str) -> str:
    """Why the proxy refused, and the fix (completes "cannot reach the upstream MCP server: ...")."""
    said = f"{status} {reason}".strip()
    if status in (401, 407):
        fix = (
            "its user and password are wrong; check them in the proxy URL"
            if route.authorization is not None
            else "it wants a user and password: put them in the proxy URL (http://USER:PASSWORD@HOST:PORT)"
        )
    elif status == 403:
        fix = "its policy refuses this host or port; ask its administrators to allow it, or set NO_PROXY"
    else:
        fix = "it could not reach the upstream"
    return f"the outbound proxy {route.shown} ({route.source}) refused the connection ({said}): {fix}"
