"""Proxy-managed OAuth (``auth = "oauth"`` on an upstream), for clients that cannot log in themselves:
the hook that sends the tokens of a login (login.py) upstream.

``ManagedAuth`` is the hook ``Upstream.send`` calls: it refreshes the access token before it expires
and once when the upstream answers 401 with a Bearer challenge (one refresh for all the requests that
found the token stale), and turns every way of needing the user (no login, a refused refresh, a 403
``insufficient_scope``) into a JSON-RPC error that says to run ``login``. The upstream's own challenge
never reaches the client, which would start a login of its own against the proxy.

The login itself is split as the MCP Python SDK splits its client: the flow (login.py, device.py), the
requests it makes (endpoints.py), the discovery rules (rules.py), token storage (tokens.py) and errors
(errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import aiohttp
import structlog

from mcp_heal_proxy.auth.endpoints import failure_reason, refresh_grant
from mcp_heal_proxy.auth.errors import AuthServerUnavailable, LoginRequired, TokenRefused
from mcp_heal_proxy.auth.rules import Challenge, parse_challenge
from mcp_heal_proxy.auth.tokens import Grant, TokenFile, TokenFileError, tokens_directory
from mcp_heal_proxy.config import MEMORY_STATE, UpstreamConfig, login_command
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.tls import tls_context

log = structlog.get_logger("mcp_heal_proxy.auth")

# How long a refresh waits for another process's refresh (which its own REFRESH_TIMEOUT bounds).
REFRESH_LOCK_PATIENCE: Final = 12.0
# What a request waits for the shared refresh at most: both bounds above, and a little for the file.
REFRESH_WAIT: Final = REFRESH_LOCK_PATIENCE + 10 + 3
# After a refresh that timed out (a hanging authorization server), requests do not start another one
# for this long (each would wait again): they use the token's last seconds or get the error at once.
REFRESH_FAILURE_TTL: Final = 5.0


# --- the hook in Upstream.send --------------------------------------------------------------------


# ``Upstream._transmit``: one request to the upstream, with the proxy's transport rules:
# (method, headers, body, **transport options) -> the response.
Transmit = Callable[..., Awaitable[aiohttp.ClientResponse]]


def _is_token_challenge(response: aiohttp.ClientResponse) -> bool:
    """A 401 about the token carries a Bearer challenge (RFC 6750 section 3); a 401 that speaks of the
    session (healing.is_session_expired) comes from the MCP layer, past the token check, without one."""
    return response.status == 401 and parse_challenge(response.headers.get("WWW-Authenticate")) is not None


class ManagedAuth:
    """Puts the stored access token on every upstream request of one upstream, and keeps it fresh."""

    def __init__(self, upstream: UpstreamConfig, token_file: TokenFile, state: str = MEMORY_STATE) -> None:
        self._upstream = upstream
        self._name = upstream.name
        self._login = login_command(upstream, state)
        self._file = token_file
        self._grant: Grant | None = None
        self._stamp: int | None = None
        self._loaded = False
        # The refresh in flight (one for every request that needs it), owned: cancelled at close.
        self._tasks = TaskOwner()
        self._refreshing: asyncio.Task[Grant] | None = None
        # The access token whose refresh the authorization server refused: no more attempts with it
        # until the file changes (a new login), so a dead grant does not cost a refresh per request.
        self._refused: str | None = None
        # Until when (monotonic) a refresh that could not reach the authorization server is not retried.
        self._unavailable_until = 0.0

    async def close(self) -> None:
        """Cancel a refresh in flight (the proxy is stopping)."""
        await self._tasks.close()

    def _hint(self, why: str) -> str:
        return f"{why}: run `{self._login}` (upstream {self._name})"

    def _current(self) -> Grant | None:
        """The stored grant, read again whenever the file changed (a login, or another proxy's refresh)."""
        stamp = self._file.stamp()
        if not self._loaded or stamp != self._stamp:
            try:
                self._grant = self._file.load(self._upstream.url)
            except TokenFileError as exc:
                raise LoginRequired(self._hint(str(exc))) from None
            self._stamp = stamp
            self._loaded = True
            self._refused = None
        return self._grant

    async def _usable(self) -> Grant:
        grant = self._current()
        if grant is None:
            raise LoginRequired(self._hint("not logged in to the upstream"))
        if grant.expires_soon():
            try:
                grant = await self._refreshed(grant.access_token, "expiry")
            except AuthServerUnavailable:
                # The authorization server is down, but the token has a few seconds left: use them.
                if grant.expires_at is None or grant.expires_at <= time.time():
                    raise
        return grant

    async def _refreshed(self, stale: str, reason: str) -> Grant:
        """A grant whose access token is not ``stale``: one refresh shared by every caller."""
        grant = self._current()
        if grant is not None and grant.access_token != stale and not grant.expires_soon():
            return grant
        if self._refused == stale:
            raise LoginRequired(self._hint("the authorization server refused to refresh the token"))
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() < self._unavailable_until:
                raise self._unavailable()
            self._refreshing = self._tasks.spawn(self._refresh(stale, reason), name=f"auth-refresh-{self._name}")
            self._refreshing.add_done_callback(_retrieve)
        # Shielded: a client that gives up does not abort the refresh the others wait for.
        try:
            async with asyncio.timeout(REFRESH_WAIT):
                return await asyncio.shield(self._refreshing)
        except TimeoutError:
            raise AuthServerUnavailable(
                f"the refresh of upstream {self._name}'s token did not finish within {REFRESH_WAIT:g} s"
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this request itself was cancelled
            # The refresh was (the proxy is stopping): an error for this request, not a cancellation.
            raise AuthServerUnavailable(f"the proxy stopped while refreshing upstream {self._name}'s token") from None

    def _unavailable(self) -> AuthServerUnavailable:
        return AuthServerUnavailable(
            f"cannot reach the authorization server of upstream {self._name} to refresh the token"
        )

    async def _refresh(self, stale: str, reason: str) -> Grant:
        try:
            async with self._file.lock(patience=REFRESH_LOCK_PATIENCE):
                grant = self._file.load(self._upstream.url)
                if grant is None:
                    raise LoginRequired(self._hint("not logged in to the upstream"))
                if grant.access_token != stale and not grant.expires_soon():
                    # Another process refreshed while this one waited for the lock.
                    self._adopt(grant)
                    return grant
                if not grant.refresh_token:
                    why = "the access token expired" if reason == "expiry" else "the upstream refused the access token"
                    raise LoginRequired(self._hint(f"{why} and the login gave no refresh token"))
                try:
                    fresh = await refresh_grant(grant, tls_context(self._upstream), self._upstream.proxy)
                except TokenRefused as exc:
                    self._refused = stale
                    log.warning("auth.refresh_refused", upstream=self._name, reason=reason, error=exc.error)
                    raise LoginRequired(
                        self._hint(f"the authorization server refused to refresh the token ({exc.error})")
                    ) from None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning(
                        "auth.refresh_failed",
                        upstream=self._name,
                        reason=reason,
                        error=failure_reason(exc, grant.token_endpoint),
                    )
                    if isinstance(exc, TimeoutError):
                        # A hanging server: the next requests should not each wait for it again. (A
                        # refused connection costs nothing to try again, and comes back soon after a
                        # restart.)
                        self._unavailable_until = time.monotonic() + REFRESH_FAILURE_TTL
                    raise self._unavailable() from None
                self._file.save(fresh)
                self._adopt(fresh)
        except TokenFileError as exc:
            raise LoginRequired(self._hint(str(exc))) from None
        log.info("auth.token_refreshed", upstream=self._name, reason=reason)
        return fresh

    def _adopt(self, grant: Grant) -> None:
        self._grant = grant
        self._stamp = self._file.stamp()
        self._loaded = True
        self._refused = None

    def _forbidden(self, response: aiohttp.ClientResponse) -> Challenge | None:
        challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
        return challenge if challenge is not None and challenge.error == "insufficient_scope" else None

    async def send(
        self,
        transmit: Transmit,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None,
        **options: Any,
    ) -> aiohttp.ClientResponse:
        """Send with the access token; refresh and send once more on a 401 about the token.

        ``options`` are the transport's (stream, resendable, ...), passed through unchanged.
        """
        grant = await self._usable()

        async def reauthorize(final: bool) -> dict[str, str] | None:
            # A request the transport retries (the upstream refusing connections while it restarts)
            # takes the token again: the one chosen before the wait may have expired meanwhile. An
            # authorization server down with the upstream (one process) lets the transport wait on.
            nonlocal grant
            try:
                grant = await self._usable()
            except AuthServerUnavailable:
                if final:
                    raise
                return None
            return _authorized(headers, grant)

        response = await transmit(method, _authorized(headers, grant), body, reauthorize=reauthorize, **options)
        if _is_token_challenge(response):
            # Refused before it was processed: sending it again cannot run anything twice.
            response.release()
            grant = await self._refreshed(grant.access_token, "http_401")
            response = await transmit(method, _authorized(headers, grant), body, reauthorize=reauthorize, **options)
            if _is_token_challenge(response):
                response.release()
                raise LoginRequired(self._hint("the upstream refuses the token even after a refresh"))
        if response.status == 403:
            challenge = self._forbidden(response)
            if challenge is not None:
                response.release()
                wanted = challenge.scope
                if wanted:
                    with contextlib.suppress(TokenFileError):
                        async with self._file.lock():
                            self._file.remember_wanted_scope(self._upstream.url, wanted)
                log.warning("auth.insufficient_scope", upstream=self._name, scope=wanted)
                needs = f"scope {wanted!r}" if wanted else "a wider scope"
                raise LoginRequired(
                    self._hint(f"the upstream needs {needs}, which the login did not grant; log in again")
                )
        return response


def _retrieve(task: asyncio.Task[Grant]) -> None:
    if not task.cancelled():
        task.exception()


def _authorized(headers: Mapping[str, str], grant: Grant) -> dict[str, str]:
    """The request's headers with the proxy's bearer token in place of any the client sent."""
    sent = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    sent["Authorization"] = f"Bearer {grant.access_token}"
    return sent


def managed_auth(upstream: UpstreamConfig, state: str) -> ManagedAuth | None:
    """The hook for an upstream with ``auth = "oauth"``; None for any other."""
    if upstream.auth != "oauth":
        return None
    token_file = TokenFile(tokens_directory(state), upstream.name)
    with contextlib.suppress(TokenFileError):
        if token_file.load(upstream.url) is None:
            log.warning(
                "auth.not_logged_in",
                upstream=upstream.name,
                hint=f"run `{login_command(upstream, state)}`; until then its requests get an error",
            )
    return ManagedAuth(upstream, token_file, state)
