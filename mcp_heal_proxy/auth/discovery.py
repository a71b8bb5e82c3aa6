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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import structlog

from mcp_heal_proxy.auth.bodies import OAUTH_BODY_LIMIT, BodyTooLarge, response_body
from mcp_heal_proxy.auth.metadata import (
    authorization_server_candidates,
    check_resource,
    protected_resource_candidates,
)
from mcp_heal_proxy.errors import connection_failure
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.tls import tls_failure

log = structlog.get_logger("mcp_heal_proxy.auth")

# Metadata rarely changes; a minute keeps a burst of logins to one fetch and still notices a move soon.
METADATA_TTL: Final = 60.0
# "The upstream has none" is remembered for less time: the upstream may be restarting.
MISSING_TTL: Final = 10.0
# "The metadata host did not answer" for a few seconds: a burst of logins against a hanging host waits
# for one fetch (bounded by FETCH_TIMEOUT), and an upstream back from a restart is asked again soon.
UNREACHABLE_TTL: Final = 5.0
# A metadata document is a few hundred bytes; anything much larger is not metadata.
METADATA_LIMIT: Final = OAUTH_BODY_LIMIT
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
            body = await response_body(response, METADATA_LIMIT)
    except BodyTooLarge:
        return None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # A refused certificate says so, with its fix (ca_file); anything else in words, not a class name.
        why = tls_failure(exc, urlsplit(url).hostname or "") or connection_failure(exc).words
        raise MetadataUnavailable(f"cannot fetch OAuth metadata: {why}", missing=False) from exc
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


class _Document:
    """One metadata document: its cached answer, and the fetch in flight that every waiter shares.

    Answers (a document, "none published", "unreachable") are kept for their entry's time, for the
    ``key`` they were fetched for (the URL of the upstream's last challenge, or the authorization
    server named); a new key fetches again. The fetch is an owned task, so a waiter that gives up (its
    client left) does not abort it for the others.
    """

    __slots__ = ("_entry", "_entry_key", "_fetch", "_fetch_key", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._entry: _Entry | None = None
        self._entry_key: str | None = None
        self._fetch: asyncio.Task[_Entry] | None = None
        self._fetch_key: str | None = None

    async def get(self, key: str | None, fetch: Callable[[], Awaitable[_Entry]], tasks: TaskOwner) -> dict[str, Any]:
        entry = self._entry
        if entry is None or self._entry_key != key or entry.expires < time.monotonic():
            if self._fetch is None or self._fetch.done() or self._fetch_key != key:
                self._fetch_key = key
                self._fetch = tasks.spawn(self._run(key, fetch), name=f"oauth-metadata-{self._name}")
            entry = await asyncio.shield(self._fetch)
        if entry.document is None:
            assert entry.error is not None
            raise entry.error
        return entry.document

    async def _run(self, key: str | None, fetch: Callable[[], Awaitable[_Entry]]) -> _Entry:
        entry = await fetch()
        if self._fetch_key == key:  # not superseded by a fetch for another key meanwhile
            self._entry, self._entry_key = entry, key
        return entry


class UpstreamMetadata:
    """One upstream's protected-resource and authorization-server metadata, cached.

    One fetch per document at a time, shared by every login that needs it, and the two documents
    fetched independently: logins against a slow metadata host wait for one fetch, not one each in
    turn. ``tasks`` owns the fetches (cancelled when the proxy stops).
    """

    def __init__(self, upstream_url: str, name: str, tasks: TaskOwner) -> None:
        self.upstream_url = upstream_url
        self.name = name
        self._tasks = tasks
        # The resource_metadata URL of the upstream's last challenge: the most precise source.
        self._hint: str | None = None
        self._resource = _Document(f"{name}-resource")
        self._authorization_server = _Document(f"{name}-authorization-server")

    def remember_hint(self, url: str | None) -> None:
        """Note the ``resource_metadata`` URL of an upstream challenge (http(s) URLs only): the next
        request fetches from there."""
        if url and url.startswith(("http://", "https://")):
            self._hint = url

    async def protected_resource(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """The upstream's protected-resource metadata; MetadataUnavailable if it has none."""
        hint = self._hint
        return await self._resource.get(hint, lambda: self._fetch_protected_resource(http, hint), self._tasks)

    async def authorization_server(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Metadata of the first authorization server the upstream names."""
        resource = await self.protected_resource(http)
        servers = resource.get("authorization_servers")
        issuer = servers[0] if isinstance(servers, list) and servers and isinstance(servers[0], str) else None
        return await self._authorization_server.get(
            issuer, lambda: self._fetch_authorization_server(http, issuer), self._tasks
        )

    async def _fetch_protected_resource(self, http: aiohttp.ClientSession, hint: str | None) -> _Entry:
        candidates = protected_resource_candidates(self.upstream_url)
        if hint is not None:
            candidates.insert(0, hint)
        try:
            for url in candidates:
                document = await fetch_json(http, url)
                if document is None or not isinstance(document.get("resource"), str):
                    continue
                if not check_resource(document["resource"], self.upstream_url):
                    # Metadata for another server (RFC 9728 section 7.3): serving it would send the
                    # client for tokens for that server, and the rewritten resource would hide it.
                    log.warning("oauth.metadata_for_another_resource", upstream=self.name)
                    refused = MetadataUnavailable(
                        f"the upstream's protected-resource metadata names {document['resource']!r}, "
                        f"not {self.upstream_url}: refusing to pass on a login for another server",
                        missing=False,
                    )
                    return _Entry(None, refused, time.monotonic() + MISSING_TTL)
                return _Entry(document, None, time.monotonic() + METADATA_TTL)
        except MetadataUnavailable as exc:
            log.warning("oauth.metadata_unreachable", upstream=self.name, kind="protected_resource", error=exc.message)
            return _Entry(None, exc, time.monotonic() + UNREACHABLE_TTL)
        missing = MetadataUnavailable("the upstream MCP server publishes no protected resource metadata", missing=True)
        return _Entry(None, missing, time.monotonic() + MISSING_TTL)

    async def _fetch_authorization_server(self, http: aiohttp.ClientSession, issuer: str | None) -> _Entry:
        if issuer is None:
            missing = MetadataUnavailable("the upstream names no authorization server", missing=True)
            return _Entry(None, missing, time.monotonic() + MISSING_TTL)
        try:
            for url in authorization_server_candidates(issuer):
                document = await fetch_json(http, url)
                if document is not None and isinstance(document.get("authorization_endpoint"), str):
                    return _Entry(document, None, time.monotonic() + METADATA_TTL)
        except MetadataUnavailable as exc:
            log.warning(
                "oauth.metadata_unreachable", upstream=self.name, kind="authorization_server", error=exc.message
            )
            return _Entry(None, exc, time.monotonic() + UNREACHABLE_TTL)
        missing = MetadataUnavailable("the upstream's authorization server publishes no metadata", missing=True)
        return _Entry(None, missing, time.monotonic() + MISSING_TTL)
