"""Text the proxy shows a person: URLs with their secrets masked, and client-chosen strings made safe
for a terminal. Every output that prints a URL goes through ``mask_url``, every terminal line that
holds a client's text through ``terminal_safe``; the status page escapes HTML on its own (status.py).

No imports beyond the standard library: the stdio bridge and the CLI's fast paths import this too.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit, urlunsplit

MASK: Final = "***"


def _mask_query(query: str) -> str:
    # Keys are kept (they tell the reader which parameter is set), values are not: hosted servers take
    # API keys as ?api_key=..., Redis URLs their password as ?password=....
    parts = []
    for item in query.split("&"):
        key, equals, _ = item.partition("=")
        parts.append(f"{key}={MASK}" if equals else MASK if item else "")
    return "&".join(parts)


def mask_url(url: str) -> str:
    """The URL as it may be printed or logged: user and password (``user:password@``) shown as ``***@``,
    each query value and any fragment as ``***``. A string that is not a URL is returned as it is,
    unless it holds an ``@`` (``user:password@host:port``, a proxy variable's form without a scheme)."""
    if "://" not in url:
        return _mask_by_shape("", url) if "@" in url else url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        scheme, _, rest = url.partition("://")
        return _mask_by_shape(f"{scheme}://", rest)
    netloc = parts.netloc
    if "@" in netloc:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{MASK}@{host}" + (f":{port}" if port is not None else "")
    query = _mask_query(parts.query) if parts.query else ""
    fragment = MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _mask_by_shape(prefix: str, rest: str) -> str:
    """A URL that does not parse (a bad port, an unencoded '/' in the password), masked by its shape:
    everything up to the last '@' (a password may hold '/', '?', '#' and '@'), and the query's values."""
    _, at, rest = rest.rpartition("@")
    base, question, query = rest.partition("?")
    return prefix + (f"{MASK}@" if at else "") + base + (f"?{_mask_query(query.partition('#')[0])}" if question else "")


_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def mask_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Free text (an exception's message) as it may be printed: each URL in it masked (``mask_url``)
    and each of ``secrets`` (the config's, ``ProxyConfig.secrets``) replaced by ``***`` (as the log's
    redactor does, only from 6 characters on: shorter values would mask innocent text)."""
    text = _URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text)
    for secret in sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


# C0 controls (ESC, BEL, CR, LF, BS, ...), DEL and the C1 controls (0x80-0x9f, among them CSI 0x9b,
# which some terminals take as ESC [): each would let a client clear the screen, retitle the window,
# move the cursor or forge a line of its own.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}"


def terminal_safe(text: object) -> str:
    """A client-chosen string as a terminal may show it: every control character written as ``\\xNN``,
    so it prints as text and does nothing."""
    value = str(text)
    if _CONTROL.search(value) is None:
        return value
    return _CONTROL.sub(_escape, value)
