"""Ending the upstream sessions of client sessions the proxy forgot on its own.

Idle expiry (``session_idle_ttl``), the session limit (``max_sessions``) and the status page's "forget"
drop a client session; without a word to the upstream, its upstream session would live on until the
upstream's own idle timeout, and forever on servers without one. Each gets one DELETE, best effort and
bounded (no connect retry, ``connect_timeout`` for the answer, see ``SessionEngine.end_forgotten``): a
refusal (a 401 under pass-through auth, where no client credentials exist at that moment) or a failure
is logged as ``session.orphan_left_upstream`` and counted, never raised.

Idle expiry and eviction end them in the background, so that neither the housekeeping round nor the
initialize that evicted waits on an upstream. Per upstream, at most ``MAX_CONCURRENT`` DELETEs run at
once and ``MAX_QUEUED`` wait; beyond that they are dropped (counted and logged), and those upstream
sessions expire on their own, as they did before.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import structlog

from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.observability import Metrics
from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.client import Upstream

log = structlog.get_logger("mcp_heal_proxy.engine.endings")

# A mass idle expiry (thousands of sessions in one housekeeping round) must not take the upstream's
# request pool (pool_size, 100 by default) from client traffic: a few DELETEs at a time is plenty.
MAX_CONCURRENT: Final = 4
# Waiting DELETEs per upstream. At MAX_CONCURRENT at a time, each bounded by connect_timeout (10 s),
# a hanging upstream takes under an hour to get through a full queue; more would only grow memory.
MAX_QUEUED: Final = 1000

Reason = Literal["idle", "evicted", "forgotten"]


@dataclass(frozen=True, slots=True)
class UpstreamEnding:
    """How one upstream session's DELETE went: the upstream's status, or why there is none."""

    status: int | None = None
    error: str | None = None

    @property
    def outcome(self) -> str:
        """ended (2xx), gone (404 or 405: nothing left to end), refused (any other status), failed."""
        if self.status is None:
            return "failed"
        if 200 <= self.status < 300:
            return "ended"
        if self.status in (404, 405):
            return "gone"
        return "refused"

    @property
    def done(self) -> bool:
        """Nothing of the session is left upstream."""
        return self.outcome in ("ended", "gone")


async def delete_upstream_session(upstream: Upstream, headers: dict[str, str]) -> UpstreamEnding:
    """One DELETE of the upstream session ``headers`` name, best effort and bounded: no connect retry,
    ``connect_timeout`` for the whole of it. Never raises ProxyError: how it went is the answer. Every
    path that ends an upstream session nobody needs any more goes through here (a forgotten session, an
    initialize the proxy could not store, a heal's orphan)."""
    timeout = upstream.config.connect_timeout
    try:
        async with asyncio.timeout(timeout):
            response = await upstream.send("DELETE", headers, resendable=True, patient=False, read_timeout=timeout)
            response.release()
    except ProxyError as exc:
        return UpstreamEnding(error=exc.message)
    except TimeoutError:
        return UpstreamEnding(error=f"no answer within connect_timeout ({timeout:g} s)")
    return UpstreamEnding(status=response.status)


# One upstream's way to end a session (SessionEngine.end_forgotten): bounded, and never raises ProxyError.
EndSession = Callable[[SessionRecord, str], Awaitable[UpstreamEnding]]


@dataclass(slots=True)
class _Lane:
    """One upstream's waiting DELETEs, its workers, and how many DELETEs are under way."""

    end: EndSession
    waiting: collections.deque[tuple[SessionRecord, Reason]] = field(default_factory=collections.deque)
    workers: int = 0
    running: int = 0


class SessionEndings:
    """Routes each forgotten record to the upstream it belongs to, and ends its upstream session there."""

    def __init__(self, metrics: Metrics, *, concurrency: int = MAX_CONCURRENT, queue_limit: int = MAX_QUEUED) -> None:
        self._metrics = metrics
        self._concurrency = concurrency
        self._queue_limit = queue_limit
        self._lanes: dict[str, _Lane] = {}
        self._tasks = TaskOwner()
        self._closed = False

    def serve(self, upstream: str, end: EndSession) -> None:
        """Sessions of this upstream (by config name) are ended with ``end``."""
        self._lanes[upstream] = _Lane(end)

    def end_later(self, records: Iterable[SessionRecord], reason: Reason) -> None:
        """Queue the upstream sessions of these forgotten records for ending; returns at once.

        Records of upstreams this proxy does not serve (another proxy's, sharing a Redis store) are left
        alone: that proxy's config, not this one's, says how to reach them.
        """
        if self._closed:
            return  # shutting down: the upstream clients are closing
        dropped: collections.Counter[str] = collections.Counter()
        touched: dict[str, _Lane] = {}
        for record in records:
            lane = self._lanes.get(record.upstream)
            if lane is None:
                continue
            if len(lane.waiting) >= self._queue_limit:
                dropped[record.upstream] += 1
                continue
            lane.waiting.append((record, reason))
            touched[record.upstream] = lane
        for upstream, count in dropped.items():
            self._metrics.sessions_ended.labels(upstream, reason, "dropped").inc(count)
            log.info(
                "session.orphan_left_upstream",
                upstream=upstream,
                reason=reason,
                count=count,
                error=f"more than {self._queue_limit} upstream sessions waiting to be ended",
            )
        for upstream, lane in touched.items():
            for _ in range(min(self._concurrency - lane.workers, len(lane.waiting))):
                lane.workers += 1
                self._tasks.spawn(self._work(upstream, lane), name="end-upstream-sessions")

    async def end_now(self, record: SessionRecord, reason: Reason) -> UpstreamEnding:
        """End one record's upstream session and say how it went (the status page's forget waits for it)."""
        lane = self._lanes.get(record.upstream)
        if lane is None:
            return UpstreamEnding(error=f"upstream {record.upstream} is not served by this proxy")
        return await self._end(record.upstream, lane, record, reason)

    async def _work(self, upstream: str, lane: _Lane) -> None:
        try:
            while lane.waiting:
                record, reason = lane.waiting.popleft()
                lane.running += 1
                try:
                    await self._end(upstream, lane, record, reason)
                finally:
                    lane.running -= 1
        finally:
            lane.workers -= 1

    async def _end(self, upstream: str, lane: _Lane, record: SessionRecord, reason: Reason) -> UpstreamEnding:
        try:
            ending = await lane.end(record, reason)
        except Exception:  # a bug here must not stop the lane's other DELETEs
            log.warning("session.orphan_left_upstream", upstream=upstream, reason=reason, exc_info=True)
            ending = UpstreamEnding(error="the proxy failed to send the DELETE; its log has the details")
        self._metrics.sessions_ended.labels(upstream, reason, ending.outcome).inc()
        return ending

    def pending(self) -> int:
        """DELETEs waiting or running, over every upstream."""
        return sum(len(lane.waiting) + lane.running for lane in self._lanes.values())

    async def close(self) -> None:
        """Stop (shutdown): waiting DELETEs are dropped, running ones cancelled."""
        self._closed = True
        for lane in self._lanes.values():
            lane.waiting.clear()
        await self._tasks.close()
