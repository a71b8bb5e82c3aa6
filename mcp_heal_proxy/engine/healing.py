"""Expiry detection and the heal sequence (PROTOCOL.md, "Healing, step by step").

``is_session_expired`` is pure so it can be tested over arbitrary status/body pairs. ``Healer`` runs
the re-initialization: at most one per client session and generation at a time, shared by every
request that found the upstream session dead (single-flight).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp
import structlog

from mcp_heal_proxy.auth.metadata import is_token_challenge
from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.config import DEFAULT_HEAL_ON, HEALABLE_STATUSES
from mcp_heal_proxy.engine.answers import AnswerStream
from mcp_heal_proxy.engine.endings import delete_upstream_session
from mcp_heal_proxy.engine.state import state_requests
from mcp_heal_proxy.errors import (
    AnswerTooLarge,
    HealFailed,
    ProxyError,
    UnknownSession,
    UpstreamTimeout,
    UpstreamTLSFailed,
    UpstreamUnavailable,
    connection_failure,
)
from mcp_heal_proxy.observability import Metrics
from mcp_heal_proxy.store.records import Heal, SessionRecord, SessionStore
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.client import INSPECT_LIMIT, Upstream
from mcp_heal_proxy.wire.headers import (
    LAST_EVENT_ID,
    MCP_PROTOCOL_VERSION,
    MCP_SESSION_ID,
    is_valid_session_id,
    upstream_request_headers,
)
from mcp_heal_proxy.wire.jsonrpc import INITIALIZE, INITIALIZED, METHOD_NOT_FOUND

log = structlog.get_logger("mcp_heal_proxy.engine.healing")

# Statuses worth reading the body of: every expiry answer seen in the wild (PROTOCOL.md) is one of these.
EXPIRY_STATUSES: Final = frozenset(HEALABLE_STATUSES)

_JSON_HEADERS: Final = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def _jsonrpc_error_code(body: bytes) -> int | None:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), int):
            return int(error["code"])
    return None


def is_session_expired(
    status: int,
    body: bytes,
    *,
    sent_session_id: bool,
    heal_on: tuple[int, ...] = DEFAULT_HEAL_ON,
    www_authenticate: str | None = None,
) -> bool:
    """Does this upstream answer mean "the session you named is gone"?

    Only a request that carried an upstream session id can find its session expired. 404 is the
    spec's signal, except when it carries JSON-RPC -32601 (a 2026-07-28 server's "method not found").
    400 and 401 (when listed in ``heal_on``) count only when the body speaks of the session, as
    server-everything's 400 "No valid session ID provided" and some hosted servers' 401 "Session not
    found" do; any other 400 or 401 is the request's own fault and passes through. A 401 whose Bearer
    challenge carries an error (``invalid_token``) is about the token, whatever its body says: the
    client must see it to refresh its token, and a heal would only fail with the same token.
    """
    if not sent_session_id or (status != 404 and status not in heal_on):
        return False
    if status == 401 and is_token_challenge(www_authenticate):
        return False
    if _jsonrpc_error_code(body) == METHOD_NOT_FOUND:
        return False
    if status == 404:
        return True
    return b"session" in body.lower()


async def read_answer(response: aiohttp.ClientResponse, request_id: str) -> Mapping[str, Any]:
    """Read the JSON-RPC answer to ``request_id`` from a JSON or SSE upstream response (bounded)."""
    stream = AnswerStream(response, (request_id,), keep_answers=True)
    try:
        await stream.read_until_answered(INSPECT_LIMIT)
    except AnswerTooLarge as exc:
        raise HealFailed("upstream's answer to the re-initialize is too large") from exc
    answer = stream.answer(request_id)
    if answer is None:
        raise HealFailed("upstream sent no answer to the re-initialize")
    return answer


def _unforeseen(exc: BaseException | None = None) -> HealFailed:
    """A failure no step of the heal foresaw (a bug, a store that broke in an unexpected way), in words:
    a connection's failure as errors.connection_failure says it, anything else without class names."""
    if exc is None:
        return HealFailed("the heal failed: a step timed out before heal_timeout")
    if isinstance(exc, OSError) or type(exc).__module__.startswith("aiohttp"):
        return HealFailed(f"the heal failed: {connection_failure(exc).words}")
    return HealFailed("the heal failed unexpectedly; the proxy's log has the details")


class Healer:
    """Re-initializes expired upstream sessions, once per (client session, generation)."""

    def __init__(self, upstream: Upstream, store: SessionStore, metrics: Metrics) -> None:
        self._upstream = upstream
        self._store = store
        self._metrics = metrics
        self._name = upstream.config.name
        self._tasks = TaskOwner()
        self._in_flight: dict[tuple[str, int], asyncio.Task[SessionRecord]] = {}
        self._ids = itertools.count(1)
        # OpenTelemetry (mcp_heal_proxy/otel.py), None when off: each step of a heal as a CLIENT span
        # under the heal's span (the engine's), and the heal metrics.
        self._otel = metrics.otel
        self._peer = self._otel.peer(self._name, upstream.config.url) if self._otel is not None else None
        # Told of each session a heal moved on, from the heal's own task: also when every caller left
        # before it ended (the engine ends the server streams left on the old upstream session).
        self.on_healed: Callable[[SessionRecord], None] | None = None

    async def heal(self, record: SessionRecord, client_headers: Mapping[str, str], reason: str) -> SessionRecord:
        """Return the record of a live upstream session for this client session, healing if needed.

        Concurrent callers with the same generation share one heal. The heal runs in its own task so
        that a client that disconnects while waiting does not abort it for the others.
        """
        key = (record.client_session_id, record.generation)
        task = self._in_flight.get(key)
        if task is None:
            task = self._tasks.spawn(self._heal_once(record, dict(client_headers), reason), name="heal")
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
            task.add_done_callback(self._tell_healed)
        return await asyncio.shield(task)

    def _tell_healed(self, done: asyncio.Task[SessionRecord]) -> None:
        if self.on_healed is not None and not done.cancelled() and done.exception() is None:
            self.on_healed(done.result())

    def _forget(self, key: tuple[str, int], done: asyncio.Task[SessionRecord]) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled():
            # Retrieve the outcome so that a heal whose waiters all left is not reported as unhandled.
            done.exception()

    async def close(self) -> None:
        """Cancel heals still running (shutdown)."""
        await self._tasks.close()

    async def _heal_once(self, record: SessionRecord, client_headers: dict[str, str], reason: str) -> SessionRecord:
        """The heal, under one deadline (the upstream's heal_timeout) for the whole of it: the wait for the
        heal lock (another replica healing this generation), the store's reads and writes, and the
        re-initialize. Every failure ends the upstream sessions this heal opened and is reported (the heal
        metric and ``session.heal_failed``), whichever step failed."""
        cid = record.client_session_id
        started = time.perf_counter()
        # Upstream sessions this heal opened, newest last: all but a stored last one are orphans (a retry
        # after a broken handshake, a handshake cut short by the deadline, a heal the store refused).
        opened: list[tuple[str, str | None]] = []
        heal_timeout = self._upstream.config.heal_timeout
        deadline = asyncio.timeout(heal_timeout)
        current = record
        try:
            async with deadline, self._store.heal_lock(cid, record.generation):
                latest = await self._store.get(cid, fresh=True)
                if latest is None:
                    raise UnknownSession("Session not found")  # ended (DELETE, idle expiry) meanwhile
                if latest.generation > record.generation:
                    # This generation was healed already (here, or by another proxy sharing the store).
                    return latest
                current = latest
                log.debug(
                    "heal.start",
                    upstream=self._name,
                    client_session=cid[:8],
                    reason=reason,
                    generation=current.generation,
                )
                upstream_session_id, protocol_version = await self._reinitialize_patiently(
                    current, client_headers, opened
                )
                # Applied to the record the store holds now (a state change may have landed during the
                # heal, and it stays), and only if the session still exists at this generation: a DELETE
                # during the heal stays a DELETE, another replica's heal of this generation stays that heal.
                stored = await self._store.apply(cid, Heal(current.generation, upstream_session_id, protocol_version))
        except TimeoutError:
            if not deadline.expired():
                raise self._failed(current, reason, started, client_headers, opened, _unforeseen()) from None
            timed_out = UpstreamTimeout(
                f"the heal timed out: it did not complete within heal_timeout ({heal_timeout:g} s) "
                "(the heal lock, the session store and the upstream's re-initialize together)"
            )
            raise self._failed(current, reason, started, client_headers, opened, timed_out) from None
        except UnknownSession:
            if opened:
                self._end_orphans(client_headers, opened)
                self._report(current, reason, started, outcome="abandoned")
            raise
        except ProxyError as exc:
            raise self._failed(current, reason, started, client_headers, opened, exc) from None
        except Exception as exc:
            raise self._failed(current, reason, started, client_headers, opened, _unforeseen(exc)) from exc
        if (
            stored is None
            or stored.generation != current.generation + 1
            or stored.upstream_session_id != upstream_session_id
        ):
            # The session ended (or moved on) while healing: the new upstream session belongs to nobody.
            self._end_orphans(client_headers, opened)
            self._report(current, reason, started, outcome="abandoned")
            if stored is None:
                raise UnknownSession("Session not found")
            return stored
        self._end_orphans(client_headers, opened[:-1])
        if (
            protocol_version is not None
            and current.protocol_version is not None
            and protocol_version != current.protocol_version
        ):
            log.warning(
                "session.protocol_version_changed",
                upstream=self._name,
                client_session=cid[:8],
                client_version=current.protocol_version,
                upstream_version=protocol_version,
            )
        self._report(current, reason, started, outcome="healed", new_generation=stored.generation)
        return stored

    def _failed(
        self,
        record: SessionRecord,
        reason: str,
        started: float,
        client_headers: dict[str, str],
        opened: list[tuple[str, str | None]],
        error: ProxyError,
    ) -> ProxyError:
        """A heal failed: end what it opened, report it, and give back the error to raise."""
        self._end_orphans(client_headers, opened)
        self._report(record, reason, started, outcome="failed", error=error.message)
        return error

    def _end_orphans(self, client_headers: dict[str, str], opened: list[tuple[str, str | None]]) -> None:
        """End, in the background, upstream sessions a failed or retried handshake left behind: the
        client waiting on the heal gets its answer without waiting for these DELETEs."""
        for upstream_session_id, protocol_version in opened:
            self._tasks.spawn(self._end_orphan(client_headers, upstream_session_id, protocol_version), name="orphan")

    async def _end_orphan(
        self, client_headers: dict[str, str], upstream_session_id: str, protocol_version: str | None
    ) -> None:
        """DELETE an upstream session no client session points to (bounded, best effort)."""
        headers = upstream_request_headers(client_headers, upstream_session_id, drop=(LAST_EVENT_ID,))
        if protocol_version is not None:
            headers[MCP_PROTOCOL_VERSION] = protocol_version
        ending = await delete_upstream_session(self._upstream, headers)
        if ending.error is not None:
            log.info("session.orphan_left_upstream", upstream=self._name, error=ending.error)

    def _report(self, record: SessionRecord, reason: str, started: float, *, outcome: str, **details: object) -> None:
        """Count a heal and log it: ``session.healed`` or ``session.heal_failed``."""
        duration = time.perf_counter() - started
        self._metrics.heals.labels(self._name, reason, outcome).inc()
        self._metrics.heal_duration.labels(self._name).observe(duration)
        if self._otel is not None:
            self._otel.heal_reported(self._name, reason, outcome, duration)
        self._metrics.events.heal(
            self._name, record.client_session_id, record.generation, reason, duration, outcome, details
        )
        emit = log.info if outcome == "healed" else log.warning
        emit(
            "session.healed" if outcome == "healed" else "session.heal_failed",
            upstream=self._name,
            client_session=record.client_session_id[:8],
            reason=reason,
            outcome=outcome,
            old_generation=record.generation,
            duration_ms=round(duration * 1000, 2),
            **details,
        )

    async def _reinitialize_patiently(
        self, record: SessionRecord, client_headers: dict[str, str], opened: list[tuple[str, str | None]]
    ) -> tuple[str, str | None]:
        """Re-initialize, trying again while the upstream breaks connections (it is restarting).

        A re-initialize only opens a session (an orphan, noted in ``opened`` and ended by the caller), so
        trying again is safe; the attempts stop after the upstream's connect_retry window, or when the
        caller's heal_timeout runs out.
        """
        give_up = time.monotonic() + self._upstream.config.connect_retry
        backoff = Backoff(first=0.05, maximum=1.0)
        while True:
            try:
                return await self._reinitialize(record, client_headers, opened)
            except UpstreamTLSFailed:
                raise  # a refused certificate is refused again: no restart to wait out
            except UpstreamUnavailable as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > give_up:
                    raise
                log.debug("heal.retry", upstream=self._name, error=exc.message, delay_s=round(delay, 3))
                await asyncio.sleep(delay)

    async def _reinitialize(
        self, record: SessionRecord, client_headers: dict[str, str], opened: list[tuple[str, str | None]]
    ) -> tuple[str, str | None]:
        """Steps 2 and 3: initialize without a session id, then notifications/initialized.

        The session the upstream opens is added to ``opened`` as soon as its id is known, before its
        answer is read: from then on it exists upstream, whatever happens to this handshake.
        """
        base = upstream_request_headers(client_headers, None, drop=(MCP_PROTOCOL_VERSION, LAST_EVENT_ID))
        base.update(_JSON_HEADERS)
        request_id = f"mcp-heal-proxy-{next(self._ids)}"
        initialize = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": INITIALIZE,
            "params": record.initialize_params,
        }
        sent = time.perf_counter()
        response = await self._step(INITIALIZE, request_id, base, json.dumps(initialize).encode())
        log.debug(
            "heal.initialize",
            upstream=self._name,
            client_session=record.client_session_id[:8],
            status=response.status,
            content_type=response.headers.get("Content-Type", ""),
            duration_ms=round((time.perf_counter() - sent) * 1000, 2),
        )
        try:
            upstream_session_id = response.headers.get(MCP_SESSION_ID) or ""
            valid = is_valid_session_id(upstream_session_id)
            if valid and 200 <= response.status < 300:
                opened.append((upstream_session_id, None))  # it exists upstream, whatever comes next
            if response.status != 200:
                raise HealFailed(f"upstream answered {response.status} to the re-initialize")
            if not valid:
                raise HealFailed("upstream gave no valid session id to the re-initialize")
            answer = await read_answer(response, request_id)
        finally:
            response.release()
        result = answer.get("result")
        if not isinstance(result, dict):
            raise HealFailed("upstream refused the re-initialize")
        version = result.get("protocolVersion")
        protocol_version = version if isinstance(version, str) else None
        opened[-1] = (upstream_session_id, protocol_version)

        # Servers may refuse requests on a session whose handshake is not complete: wait for the 202.
        headers = dict(base)
        headers[MCP_SESSION_ID] = upstream_session_id
        if protocol_version is not None:
            headers[MCP_PROTOCOL_VERSION] = protocol_version
        notification = json.dumps({"jsonrpc": "2.0", "method": INITIALIZED}).encode()
        sent = time.perf_counter()
        response = await self._step(INITIALIZED, None, headers, notification)
        log.debug(
            "heal.initialized",
            upstream=self._name,
            client_session=record.client_session_id[:8],
            status=response.status,
            negotiated_version=protocol_version,
            duration_ms=round((time.perf_counter() - sent) * 1000, 2),
        )
        try:
            if not 200 <= response.status < 300:
                raise HealFailed(f"upstream answered {response.status} to notifications/initialized")
        finally:
            response.release()
        await self._reapply_state(record, headers)
        return upstream_session_id, protocol_version

    async def _step(
        self, method: str, request_id: str | None, headers: dict[str, str], body: bytes
    ) -> aiohttp.ClientResponse:
        """One request of the heal (only the proxy's own: resent over a connection that broke unanswered),
        with its CLIENT span when OpenTelemetry is on."""
        if self._otel is None or self._peer is None:
            return await self._upstream.send("POST", headers, body, resendable=True)
        step = self._otel.step(method, request_id, self._peer)
        try:
            response = await self._upstream.send("POST", headers, body, resendable=True)
        except BaseException as exc:
            step.failed(exc)
            raise
        step.answered(response.status)
        return response

    async def _reapply_state(self, record: SessionRecord, headers: dict[str, str]) -> None:
        """Step 4: give the new session the subscriptions and log level the client had set."""
        for method, params in state_requests(record):
            request_id = f"mcp-heal-proxy-{next(self._ids)}"
            message = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            response = await self._step(method, request_id, headers, message.encode())
            try:
                answer = await read_answer(response, request_id) if response.status == 200 else None
            finally:
                response.release()
            log.debug(
                "heal.state_reapplied",
                upstream=self._name,
                client_session=record.client_session_id[:8],
                method=method,
                status=response.status,
                ok=answer is not None and "error" not in answer,
            )
            if answer is None or "error" in answer:
                # The replay can still succeed; the client just lost this piece of state, as it would
                # have without the proxy. Say so, and go on.
                log.warning(
                    "session.state_not_restored",
                    upstream=self._name,
                    client_session=record.client_session_id[:8],
                    method=method,
                    status=response.status,
                )
