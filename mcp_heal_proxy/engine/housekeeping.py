"""Background upkeep of the session store: batched last-used times, and forgetting idle sessions.

Writing a timestamp to a durable store on every request would put disk or network I/O on the hot
path; instead the handlers mark use in memory and this task flushes the marks periodically.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import structlog

from mcp_heal_proxy.engine.endings import SessionEndings
from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.store.records import SessionStore

log = structlog.get_logger("mcp_heal_proxy.engine.housekeeping")

# Flush at least this often; a short idle TTL flushes more often (a tenth of it), but never more often
# than MIN_FLUSH_INTERVAL: an idle TTL of zero must not turn this loop into a busy one.
MAX_FLUSH_INTERVAL: Final = 60.0
MIN_FLUSH_INTERVAL: Final = 0.5


class SessionActivity:
    """Last-use marks not yet written to the store."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}

    def mark(self, client_session_id: str) -> None:
        """Note that a session was just used (hot path: one dict store)."""
        self._pending[client_session_id] = time.time()

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
        """Take every pending mark."""
        pending, self._pending = self._pending, {}
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
    if forgotten:
        log.info("session.forgotten_idle", count=len(forgotten), idle_ttl_s=idle_ttl)
        if endings is not None:
            endings.end_later(forgotten, "idle")
    return len(forgotten)
