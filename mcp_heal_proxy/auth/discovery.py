"""An upstream's OAuth metadata, fetched on demand and cached briefly.

Protected-resource metadata comes from the URL the upstream's last 401 named (``resource_metadata``),
else from its path-aware and root well-known URLs; authorization-server metadata from the first
authorization server that metadata lists. Every fetch is bounded in time and size; the cache holds
one entry of each kind per upstream, so it cannot grow.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog

from mcp_heal_proxy.auth.metadata import authorization_server_candidates, protected_resource_candidates
from mcp_heal_proxy.errors import connection_failure

log = structlog.get_logger("mcp_heal_proxy.auth")

# Metadata rarely changes; a minute keeps a burst of logins to one fetch and still notices a move soon.
METADATA_TTL: Final = 60.0
# "The upstream has none" is remembered for less time: the upstream may be restarting.
MISSING_TTL: Final = 10.0
# A metadata document is a few hundred bytes; anything much larger is not metadata.
METADATA_LIMIT: Final = 64 * 1024
FETCH_TIMEOUT: Final = aiohttp.ClientTimeout(total=10.0, sock_connect=5.0)


class MetadataUnavailable(Exception):
    """The upstream publishes no such metadata (``missing``), or could not be asked."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.message = message
        self.missing = missing


@dataclass(frozen=True, slots=True)
class _Entry:
    document: dict[str, Any] | None
    error: MetadataUnavailable | None
    expires: float


async def fetch_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """A JSON object from ``url``, or None when the server has none there (any non-200, non-JSON).

    Raises MetadataUnavailable (not missing) when the server cannot be reached or times out.
    """
    try:
        async with http.get(url, timeout=FETCH_TIMEOUT, allow_redirects=False) as response:
            if response.status != 200:
                return None
            body = await response.content.read(METADATA_LIMIT + 1)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise MetadataUnavailable(
            f"cannot fetch OAuth metadata: {connection_failure(exc).words}", missing=False
        ) from exc
    if len(body) > METADATA_LIMIT:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


class UpstreamMetadata:
    """One upstream's protected-resource and authorization-server metadata, cached."""

    def __init__(self, upstream_url: str, name: str) -> None:
        self.upstream_url = upstream_url
        self.name = name
        # The resource_metadata URL of the upstream's last challenge: the most precise source.
        self._hint: str | None = None
        self._resource: _Entry | None = None
        self._authorization_server: _Entry | None = None
        self._lock = asyncio.Lock()

    def remember_hint(self, url: str | None) -> None:
        """Note the ``resource_metadata`` URL of an upstream challenge (http(s) URLs only)."""
        if url and url.startswith(("http://", "https://")) and url != self._hint:
            self._hint = url
            self._resource = None

    async def protected_resource(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """The upstream's protected-resource metadata; MetadataUnavailable if it has none."""
        async with self._lock:
            entry = self._resource
            if entry is None or entry.expires < time.monotonic():
                entry = self._resource = await self._fetch_protected_resource(http)
        if entry.document is None:
            assert entry.error is not None
            raise entry.error
        return entry.document

    async def authorization_server(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Metadata of the first authorization server the upstream names."""
        resource = await self.protected_resource(http)
        async with self._lock:
            entry = self._authorization_server
            if entry is None or entry.expires < time.monotonic():
                entry = self._authorization_server = await self._fetch_authorization_server(http, resource)
        if entry.document is None:
            assert entry.error is not None
            raise entry.error
        return entry.document

    async def _fetch_protected_resource(self, http: aiohttp.ClientSession) -> _Entry:
        candidates = protected_resource_candidates(self.upstream_url)
        if self._hint is not None:
            candidates.insert(0, self._hint)
        try:
            for url in candidates:
                document = await fetch_json(http, url)
                if document is not None and isinstance(document.get("resource"), str):
                    return _Entry(document, None, time.monotonic() + METADATA_TTL)
        except MetadataUnavailable as exc:
            log.warning("oauth.metadata_unreachable", upstream=self.name, kind="protected_resource")
            return _Entry(None, exc, time.monotonic())  # not cached: the next login asks again
        missing = MetadataUnavailable("the upstream MCP server publishes no protected resource metadata", missing=True)
        return _Entry(None, missing, time.monotonic() + MISSING_TTL)

    async def _fetch_authorization_server(self, http: aiohttp.ClientSession, resource: dict[str, Any]) -> _Entry:
        servers = resource.get("authorization_servers")
        if not isinstance(servers, list) or not servers or not isinstance(servers[0], str):
            missing = MetadataUnavailable("the upstream names no authorization server", missing=True)
            return _Entry(None, missing, time.monotonic() + MISSING_TTL)
        try:
            for url in authorization_server_candidates(servers[0]):
                document = await fetch_json(http, url)
                if document is not None and isinstance(document.get("authorization_endpoint"), str):
                    return _Entry(document, None, time.monotonic() + METADATA_TTL)
        except MetadataUnavailable as exc:
            log.warning("oauth.metadata_unreachable", upstream=self.name, kind="authorization_server")
            return _Entry(None, exc, time.monotonic())
        missing = MetadataUnavailable("the upstream's authorization server publishes no metadata", missing=True)
        return _Entry(None, missing, time.monotonic() + MISSING_TTL)
