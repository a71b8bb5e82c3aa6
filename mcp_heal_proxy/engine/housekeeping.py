"""Background upkeep of the session store: batched last-used times, and forgetting idle sessions.

Writing a timestamp to a durable store on every request would put disk or network I/O on the hot
path; instead the handlers mark use in memory and this task flushes the marks periodically.

A session with a request in flight or a GET stream open is *in use* (the fronts say so through
``SessionActivity.using``): however long ago it started, it is used now. Every round writes it as used
now, so idle expiry never takes it (on this proxy, nor on another replica sharing the store: its cutoff
is the idle TTL ago, and a round comes every tenth of that), and the session limit evicts the least
recently used sessions not in use first; one in use goes only when every session is (logged as
``session.evicted_in_use`` and counted in ``mcp_heal_proxy_sessions_evicted_in_use``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Final

import structlog

from mcp_heal_proxy.engine.endings import SessionEndings
from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.store.records import SessionRecord, SessionStore

log = structlog.get_logger("mcp_heal_proxy.engine.housekeeping")

# Flush at least this often; a short idle TTL flushes more often (a tenth of it), but never more often
# than MIN_FLUSH_INTERVAL: an idle TTL of zero must not turn this loop into a busy one.
MAX_FLUSH_INTERVAL: Final = 60.0
MIN_FLUSH_INTERVAL: Final = 0.5


class SessionActivity:
    """Last-use marks not yet written to the store, and the sessions in use right now."""

    __slots__ = ("_in_use", "_pending")

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        # Requests in flight and GET streams open, per client session id.
        self._in_use: dict[str, int] = {}

    def mark(self, client_session_id: str) -> None:
        """Note that a session was just used (hot path: one dict store)."""
        self._pending[client_session_id] = time.time()

    @contextlib.contextmanager
    def using(self, client_session_id: str) -> Iterator[None]:
        """The session is in use while this is held (a request in flight, a GET stream open)."""
        self.begin_use(client_session_id)
        try:
            yield
        finally:
            self.end_use(client_session_id)

    def begin_use(self, client_session_id: str) -> None:
        """A request or stream of the session started (pair with ``end_use``; hot path)."""
        self._in_use[client_session_id] = self._in_use.get(client_session_id, 0) + 1

    def end_use(self, client_session_id: str) -> None:
        """A request or stream of the session ended: its last use is now."""
        left = self._in_use[client_session_id] - 1
        if left:
            self._in_use[client_session_id] = left
        else:
            del self._in_use[client_session_id]
        self._pending[client_session_id] = time.time()

    def in_use(self, client_session_id: str) -> bool:
        """Whether the session has a request in flight or a GET stream open here."""
        return client_session_id in self._in_use

    async def write_to(self, store: SessionStore) -> None:
        """Write the pending marks now (before the store picks sessions by last use); kept for the next
        round if the store fails."""
        marks = self.drain()
        if not marks:
            return
        try:
            await store.touch(marks)
        except BaseException:
            self.keep(marks)
            raise

    def keep(self, marks: dict[str, float]) -> None:
        """Put marks back that could not be written (newer ones win)."""
        for client_session_id, when in marks.items():
            self._pending.setdefault(client_session_id, when)

    def drain(self) -> dict[str, float]:
        """Take every pending mark; a session in use is marked as used now."""
        pending, self._pending = self._pending, {}
        if self._in_use:
            now = time.time()
            pending.update(dict.fromkeys(self._in_use, now))
        return pending


async def run_housekeeping(
    store: SessionStore, activity: SessionActivity, idle_ttl: float, endings: SessionEndings | None = None
) -> None:
    """Forever: flush last-use marks, then forget sessions idle for longer than ``idle_ttl``."""
    interval = max(MIN_FLUSH_INTERVAL, min(MAX_FLUSH_INTERVAL, idle_ttl / 10))
    while True:
        await asyncio.sleep(interval)
        try:
            await flush(store, activity, idle_ttl, endings)
        except Exception:
            # A failure flush() did not foresee (a record the store cannot read back): this round is
            # lost, housekeeping is not. A dead loop would stop idle expiry for the process's life.
            log.exception("store.housekeeping_failed")


async def flush(
    store: SessionStore, activity: SessionActivity, idle_ttl: float, endings: SessionEndings | None = None
) -> int:
    """One round of upkeep; returns how many sessions were forgotten.

    With ``endings``, the upstream sessions of the forgotten ones are ended in the background (the round
    does not wait for them); without (the last round at shutdown), they are left to the upstream.
    """
    marks = activity.drain()
    try:
        if marks:
            await store.touch(marks)
        forgotten = await store.forget_idle(time.time() - idle_ttl)
    except ProxyError as exc:
        # The store is down: keep the marks for the next round rather than lose them.
        activity.keep(marks)
        log.warning("store.housekeeping_failed", error=exc.message)
        return 0
    forgotten = await _keep_in_use(store, activity, forgotten)
    if forgotten:
        log.info("session.forgotten_idle", count=len(forgotten), idle_ttl_s=idle_ttl)
        if endings is not None:
            endings.end_later(forgotten, "idle")
    return len(forgotten)


async def _keep_in_use(
    store: SessionStore, activity: SessionActivity, forgotten: list[SessionRecord]
) -> list[SessionRecord]:
    """Put back the sessions a request started on between this round's marks and its removal (they were
    marked in use after the marks were taken): their upstream sessions are alive and in use. Returns the
    rest, the sessions really forgotten."""
    kept = [record for record in forgotten if activity.in_use(record.client_session_id)]
    if not kept:
        return forgotten
    for record in kept:
        await store.create(replace(record, last_used=time.time()))
    log.info("session.kept_in_use", count=len(kept))
    return [record for record in forgotten if not activity.in_use(record.client_session_id)]
