"""What the proxy saw, kept in memory for the status page and ``mcp-heal-proxy tail``.

Three things, all bounded:

* a ring of the most recent requests (method, tool name, status, duration, healed, short session id,
  upstream) and one of the most recent heals (when, session, reason, duration, outcome);
* per upstream: the last success, the last failure and why, and the latencies of a window of recent
  requests (for percentiles);
* live subscribers (the SSE endpoint), each with a bounded backlog: a subscriber that reads too slowly
  loses events (and is told how many), it never slows the proxy.

Recording is on the proxy's hot path, so it stores plain tuples and renders nothing: dicts and JSON are
built only when someone reads (a page load, a subscriber's stream). What is recorded is chosen so that
nothing secret can reach it: no bodies, no header values, session ids cut to 8 characters.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

# Ring sizes: enough for a page that shows the last minutes of a busy session, small enough to ignore.
DEFAULT_REQUESTS: Final = 500
DEFAULT_HEALS: Final = 200
# Percentiles over the most recent requests of each upstream.
DEFAULT_LATENCY_WINDOW: Final = 1000
# Events a subscriber may have waiting before newer ones are dropped for it.
DEFAULT_BACKLOG: Final = 1000
# Live subscribers at once (each holds an open response); more are refused.
MAX_SUBSCRIBERS: Final = 64
# Client-chosen strings (method and tool names, reasons) are cut to this length.
MAX_NAME: Final = 80
SHORT_ID: Final = 8
# Why an upstream failed, as the page shows it (the proxy's own words, or a heal's error): room for a
# TLS failure's cause and its fix.
MAX_WHY: Final = 400
# A heal failure this recent explains a request's 5xx (the heal ran inside that request).
_SAME_REQUEST: Final = 1.0

# (seq, when, upstream, method, tool, status, duration_s, healed, session)
RequestEntry = tuple[int, float, str, str, str | None, int, float, bool, str | None]
# (seq, when, upstream, session, reason, duration_s, outcome, error, generation)
HealEntry = tuple[int, float, str, str, str, float, str, str | None, int]
Entry = RequestEntry | HealEntry


def short_id(session_id: str | None) -> str | None:
    """A session id as it may be shown: its first 8 characters."""
    return session_id[:SHORT_ID] if session_id else None


def _name(value: str | None) -> str | None:
    return _cut(value, MAX_NAME)


def _cut(value: str | None, limit: int) -> str | None:
    return value if value is None or len(value) <= limit else value[:limit] + "…"


def request_json(entry: RequestEntry) -> dict[str, Any]:
    """A request entry as the JSON endpoints and the event stream show it."""
    seq, when, upstream, method, tool, status, duration, healed, session = entry
    return {
        "type": "request",
        "seq": seq,
        "at": round(when, 3),
        "upstream": upstream,
        "session": session,
        "method": _name(method),
        "tool": _name(tool),
        "status": status,
        "duration_ms": round(duration * 1000, 2),
        "healed": healed,
    }


def heal_json(entry: HealEntry) -> dict[str, Any]:
    """A heal entry as the JSON endpoints and the event stream show it."""
    seq, when, upstream, session, reason, duration, outcome, error, generation = entry
    return {
        "type": "heal",
        "seq": seq,
        "at": round(when, 3),
        "upstream": upstream,
        "session": session,
        "reason": _name(reason),
        "outcome": outcome,
        "error": _name(error),
        "duration_ms": round(duration * 1000, 2),
        "generation": generation,
    }


def entry_json(entry: Entry) -> dict[str, Any]:
    """Either kind of entry as JSON (heals carry a string where requests carry a status number)."""
    if isinstance(entry[5], int):
        return request_json(entry)  # type: ignore[arg-type]
    return heal_json(entry)  # type: ignore[arg-type]


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an ordered, non-empty list."""
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


class UpstreamHealth:
    """What one upstream's recent answers say about it."""

    __slots__ = ("era", "failure", "heals_failed", "heals_ok", "last_success", "latencies", "requests")

    def __init__(self, window: int) -> None:
        self.last_success: float | None = None
        # (when, client-facing status or None for a heal, method or "heal", error message or None)
        self.failure: tuple[float, int | None, str, str | None] | None = None
        self.latencies: deque[float] = deque(maxlen=window)
        self.requests = 0
        self.heals_ok = 0
        self.heals_failed = 0
        # Which MCP era the upstream speaks, as the proxy knows it (bridge/era.py): unknown until seen.
        self.era = "unknown"

    def as_json(self, name: str) -> dict[str, Any]:
        """The health summary the page and ``/_proxy/api/upstreams`` show."""
        ordered = sorted(self.latencies)
        latency: dict[str, Any] = {"window": len(ordered)}
        if ordered:
            for label, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                latency[f"{label}_ms"] = round(percentile(ordered, fraction) * 1000, 2)
        failure: dict[str, Any] | None = None
        if self.failure is not None:
            when, status, method, error = self.failure
            if error is None:
                why = f"answered HTTP {status} to {_name(method)}"
            elif method == "heal":
                why = error
            else:
                # The proxy's words for what the upstream did (nothing answered: no status).
                why = f"{error} ({_name(method)})"
            failure = {"at": round(when, 3), "status": status, "why": _cut(why, MAX_WHY)}
        return {
            "name": name,
            "last_success": None if self.last_success is None else round(self.last_success, 3),
            "last_failure": failure,
            "latency": latency,
            "requests": self.requests,
            "heals": {"healed": self.heals_ok, "failed": self.heals_failed},
            "era": self.era,
        }


class Subscription:
    """One live reader of the feed: a bounded backlog and a wake-up."""

    __slots__ = ("_backlog", "_items", "_ready", "closed", "dropped")

    def __init__(self, backlog: int) -> None:
        self._backlog = backlog
        self._items: deque[Entry] = deque()
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def offer(self, entry: Entry) -> None:
        """Queue an entry, or count it as dropped when the reader is that far behind."""
        if len(self._items) >= self._backlog:
            self.dropped += 1
            return
        self._items.append(entry)
        self._ready.set()

    def close(self) -> None:
        """End the subscription (shutdown): the reader's next wait returns at once."""
        self.closed = True
        self._ready.set()

    async def next_batch(self, wait: float) -> list[Entry]:
        """Everything queued, waiting up to ``wait`` seconds for something; empty on timeout or close."""
        if not self._items and not self.closed:
            try:
                async with asyncio.timeout(wait):
                    await self._ready.wait()
            except TimeoutError:
                return []
        self._ready.clear()
        batch = list(self._items)
        self._items.clear()
        return batch


class EventFeed:
    """The proxy's recent requests and heals, its upstreams' health, and live subscribers."""

    def __init__(
        self,
        *,
        requests: int = DEFAULT_REQUESTS,
        heals: int = DEFAULT_HEALS,
        latency_window: int = DEFAULT_LATENCY_WINDOW,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self.started = time.time()
        self._seq = itertools.count(1)
        self._requests: deque[RequestEntry] = deque(maxlen=requests)
        self._heals: deque[HealEntry] = deque(maxlen=heals)
        self._health: dict[str, UpstreamHealth] = {}
        self._window = latency_window
        self._backlog = backlog
        self._subscribers: set[Subscription] = set()

    # --- recording (hot path) ---------------------------------------------------------------------

    def _upstream(self, name: str) -> UpstreamHealth:
        health = self._health.get(name)
        if health is None:
            health = self._health[name] = UpstreamHealth(self._window)
        return health

    def request(
        self,
        upstream: str,
        method: str,
        tool: str | None,
        status: int,
        duration: float,
        healed: bool,
        session: str | None,
        *,
        answered: bool = True,
        failure: str | None = None,
    ) -> None:
        """Record one answered client request (``duration`` in seconds, ``session`` the client's id).

        ``answered``: the upstream answered it (only then is its duration a latency, and a status below
        500 a success of the upstream's); False for an answer the proxy made itself. ``failure``: what the
        upstream did wrong when the proxy answered an error about it (could not connect, timed out, ...),
        in words; a 5xx the upstream answered itself is told by its status."""
        now = time.time()
        entry: RequestEntry = (
            next(self._seq),
            now,
            upstream,
            method,
            tool,
            status,
            duration,
            healed,
            session[:SHORT_ID] if session else None,
        )
        self._requests.append(entry)
        health = self._health.get(upstream) or self._upstream(upstream)
        health.requests += 1
        if failure is not None or (answered and status >= 500):
            # A heal that failed during this request said why, which beats the request's own error.
            previous = health.failure
            heal_why = previous[3] if previous is not None and now - previous[0] < _SAME_REQUEST else None
            health.failure = (now, status if answered else None, method, heal_why or failure)
        elif answered:
            health.last_success = now
        if answered and method != "GET":
            # Only answers are latencies: the time the proxy spent failing to connect is not the upstream's.
            # A GET answer is a stream that lives for minutes: not a latency either.
            health.latencies.append(duration)
        if self._subscribers:
            for subscriber in self._subscribers:
                subscriber.offer(entry)

    def heal(
        self,
        upstream: str,
        session: str,
        generation: int,
        reason: str,
        duration: float,
        outcome: str,
        details: Mapping[str, object],
    ) -> None:
        """Record one heal of a session at ``generation``: ``outcome`` "healed" or "failed", ``details``
        as the healer logs them (``error``, ``new_generation``)."""
        error = details.get("error")
        error = error if isinstance(error, str) else None
        after = details.get("new_generation", generation)
        generation = after if isinstance(after, int) else generation
        now = time.time()
        entry: HealEntry = (
            next(self._seq),
            now,
            upstream,
            session[:SHORT_ID],
            reason,
            duration,
            outcome,
            error,
            generation,
        )
        self._heals.append(entry)
        health = self._upstream(upstream)
        if outcome == "healed":
            health.heals_ok += 1
        else:
            health.heals_failed += 1
            health.failure = (now, None, "heal", f"heal failed: {error}" if error else "heal failed")
        for subscriber in self._subscribers:
            subscriber.offer(entry)

    def upstream_era(self, upstream: str, era: str) -> None:
        """Note the MCP era the proxy learned the upstream speaks (modern: its legacy clients are bridged)."""
        self._upstream(upstream).era = era

    def upstream_failed(self, upstream: str, why: str) -> None:
        """Note why the upstream could not be used (a TLS failure, with its fix): the upstream's last
        failure until something newer, and the reason a 5xx recorded right after it shows."""
        self._upstream(upstream).failure = (time.time(), None, "connect", why)

    # --- reading ----------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest entry (0 before any)."""
        newest = 0
        if self._requests:
            newest = self._requests[-1][0]
        if self._heals:
            newest = max(newest, self._heals[-1][0])
        return newest

    def requests(self, limit: int = DEFAULT_REQUESTS) -> list[dict[str, Any]]:
        """The most recent requests, newest first."""
        return [request_json(entry) for entry in itertools.islice(reversed(self._requests), limit)]

    def heals(self, limit: int = DEFAULT_HEALS) -> list[dict[str, Any]]:
        """The most recent heals, newest first."""
        return [heal_json(entry) for entry in itertools.islice(reversed(self._heals), limit)]

    def upstreams(self, names: list[str]) -> list[dict[str, Any]]:
        """Health of each named upstream (in that order), including those that saw no request yet."""
        return [self._upstream(name).as_json(name) for name in names]

    # --- subscribers ------------------------------------------------------------------------------

    def subscribe(self) -> Subscription | None:
        """A new live subscription, or None when there are too many already."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            return None
        subscription = Subscription(self._backlog)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a subscription (its reader left)."""
        self._subscribers.discard(subscription)

    def close_subscribers(self) -> None:
        """Shutdown: end every live stream now instead of holding the shutdown grace period."""
        for subscription in self._subscribers:
            subscription.close()

    @property
    def subscriber_count(self) -> int:
        """Live subscribers right now."""
        return len(self._subscribers)
