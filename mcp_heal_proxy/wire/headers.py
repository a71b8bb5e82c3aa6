"""Header rewriting between the client and the upstream: pure functions over header pairs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

MCP_SESSION_ID: Final = "Mcp-Session-Id"
MCP_PROTOCOL_VERSION: Final = "MCP-Protocol-Version"
LAST_EVENT_ID: Final = "Last-Event-ID"
CONTENT_ENCODING: Final = "Content-Encoding"

# RFC 9110 section 7.6.1 plus the proxy-specific ones every proxy drops.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Never copied upstream: Host is the upstream's own (aiohttp sets it from the URL; the Python SDK
# answers 421 to a foreign Host); the body length is recomputed; the session id is rewritten.
# The client's Accept-Encoding is replaced by "identity" (see upstream_request_headers). Origin names
# the page that talked to the proxy, which means nothing to the upstream and trips its DNS-rebinding guard.
# Content-Encoding: the proxy sends a body it has decoded (it reads every POST; aiohttp decodes a gzip or
# deflate request body), or one of its own (a heal's initialize), never the client's coded bytes.
_NOT_UPSTREAM: Final = HOP_BY_HOP | {
    "host",
    "content-length",
    "content-encoding",
    "mcp-session-id",
    "accept-encoding",
    "origin",
}

# Never copied back to the client: the upstream's session id must not leak (the TypeScript SDK client
# adopts any session id header it sees, even on an error answer); the length is set by the proxy's own
# response writer. Content-Encoding is kept: an upstream that compresses although asked for identity
# has its bytes forwarded as they are, and they must arrive with their coding.
_NOT_DOWNSTREAM: Final = HOP_BY_HOP | {
    "content-length",
    "mcp-session-id",
    "server",
    "date",
}


# The spec allows visible ASCII (0x21-0x7E) in session ids. The proxy's own are sealed (engine/sealing.py):
# a few hundred characters, never more than 1024; an upstream's are usually a UUID. Longer is refused: no
# legitimate id comes near it, and every id is sent on with every request.
MAX_SESSION_ID_LENGTH: Final = 1024
_VALID_SESSION_ID: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_SESSION_ID_LENGTH}}}")


def is_valid_session_id(value: str) -> bool:
    """Whether a session id is safe to use as a header value (no CR/LF, spaces or controls)."""
    return _VALID_SESSION_ID.fullmatch(value) is not None


def _tokens(value: str | None) -> frozenset[str]:
    """Header names that a ``Connection`` value marks as hop-by-hop for this one message."""
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


# The names to skip for one Connection header value and one set of dropped names, remembered: on the hot
# path they are the same few every time (no Connection header, or "keep-alive"). Bounded, since the
# Connection value is the peer's to choose.
_SkipKey = tuple[str | None, tuple[str, ...]]
_SKIPS_REMEMBERED: Final = 256
_upstream_skips: dict[_SkipKey, frozenset[str]] = {}
_downstream_skips: dict[_SkipKey, frozenset[str]] = {}


def _skipped(
    base: frozenset[str], connection: str | None, drop: tuple[str, ...], known: dict[_SkipKey, frozenset[str]]
) -> frozenset[str]:
    key = (connection, drop)
    skip = known.get(key)
    if skip is None:
        skip = base | _tokens(connection) | {name.lower() for name in drop}
        if len(known) < _SKIPS_REMEMBERED:
            known[key] = skip
    return skip


def upstream_request_headers(
    client_headers: Mapping[str, str],
    upstream_session_id: str | None,
    *,
    drop: Iterable[str] = (),
) -> dict[str, str]:
    """Headers to send upstream for a client's request, carrying the upstream session id."""
    skip = _skipped(_NOT_UPSTREAM, client_headers.get("Connection"), tuple(drop), _upstream_skips)
    out = {name: value for name, value in client_headers.items() if name.lower() not in skip}
    # Ask for an uncompressed answer: the proxy reads error and initialize bodies, and compression
    # would hold SSE events back. (Without the header, a server may pick any coding it likes.)
    out["Accept-Encoding"] = "identity"
    if upstream_session_id is not None:
        out[MCP_SESSION_ID] = upstream_session_id
    return out


def client_response_headers(
    upstream_headers: Mapping[str, str], client_session_id: str | None
) -> list[tuple[str, str]]:
    """Headers to send the client for an upstream answer, carrying the client's own session id."""
    skip = _skipped(_NOT_DOWNSTREAM, upstream_headers.get("Connection"), (), _downstream_skips)
    out = [(name, value) for name, value in upstream_headers.items() if name.lower() not in skip]
    if client_session_id is not None:
        out.append((MCP_SESSION_ID, client_session_id))
    return out
