"""Delays for every loop that tries again: exponential, jittered, capped, and never below what the
server asked for (an SSE ``retry:`` field).

One class so that every reconnect loop (upstream connects, re-initialize while the upstream restarts,
GET stream reattach, the store's heal lock) backs off the same way, and none can spin: a loop that
asks for a delay always gets a positive one.
"""

from __future__ import annotations

import random
from typing import Final

# The smallest delay any loop waits: a floor that turns a bug or a zero setting into a slow loop, not a
# busy one.
MIN_DELAY: Final = 0.01


class Backoff:
    """``next_delay()`` returns first, then about twice the previous delay, up to ``maximum``."""

    __slots__ = ("_current", "_first", "_jitter", "_maximum")

    def __init__(self, *, first: float, maximum: float, jitter: float = 0.2) -> None:
        self._first = max(first, MIN_DELAY)
        self._maximum = max(maximum, self._first)
        # Up to this fraction is taken off a delay at random, so that many clients do not retry in step.
        self._jitter = jitter
        self._current = 0.0

    def next_delay(self, *, at_least: float = 0.0) -> float:
        """The next delay in seconds: the backoff's, or ``at_least`` (the server's retry) if larger."""
        self._current = self._first if self._current == 0.0 else min(self._current * 2, self._maximum)
        delay = self._current * (1.0 - self._jitter * random.random())
        return max(delay, at_least, MIN_DELAY)

    def reset(self) -> None:
        """Start again from ``first`` (after a success)."""
        self._current = 0.0
