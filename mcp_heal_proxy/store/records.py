"""Client sessions: the record the proxy keeps per client-facing session id, and where it keeps it.

The client-facing id is opaque and random, never derived from the upstream's id, so that the proxy can
point it at a new upstream session after a heal while the client keeps using the same id.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Final, Protocol

# The floor of a shared store's heal lock (store/redis.py): a normal heal takes milliseconds. The proxy
# opens the store with one that outlives its longest heal_timeout (front/app.py, heal_lock_ttl).
DEFAULT_HEAL_LOCK_TTL: Final = 30.0


def new_client_session_id() -> str:
    """A fresh client-facing session id: 128 random bits as hex (visible ASCII, header-safe)."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What the proxy knows about one client session.

    ``generation`` counts heals: a request remembers the generation it was sent on, so concurrent
    requests that hit the same dead upstream session share one re-initialization.
    """

    client_session_id: str
    upstream_session_id: str
    initialize_params: Mapping[str, Any]
    # The upstream (by config name) this session belongs to: an id is valid on its own path only.
    upstream: str = "default"
    # What the client negotiated; it keeps speaking this version for the life of its session.
    protocol_version: str | None = None
    # What the current upstream session negotiated; differs only if a heal negotiated another version.
    upstream_protocol_version: str | None = None
    generation: int = 0
    # Session state the client built up, re-applied on a new upstream session before the replay.
    subscriptions: frozenset[str] = frozenset()
    log_level: str | None = None
    created_at: float = field(default_factory=time.time)
    # Updated in batches (see SessionStore.touch), so it may lag real use by the flush interval.
    last_used: float = field(default_factory=time.time)

    def healed(self, upstream_session_id: str, protocol_version: str | None) -> SessionRecord:
        """The record after a heal: new upstream session, next generation."""
        return replace(
            self,
            upstream_session_id=upstream_session_id,
            upstream_protocol_version=protocol_version,
            generation=self.generation + 1,
        )

    @property
    def version_to_send(self) -> str | None:
        """The MCP-Protocol-Version to send upstream when it differs from the client's own, else None."""
        if self.upstream_protocol_version is not None and self.upstream_protocol_version != self.protocol_version:
            return self.upstream_protocol_version
        return None


# A change to a session's record, applied by the store to the record it holds now (SessionStore.apply).
# It must be pure and quick (a store may run it on its own thread, or again after a conflicting write),
# and return its argument itself when it changes nothing.
RecordChange = Callable[["SessionRecord"], "SessionRecord"]


@dataclass(frozen=True, slots=True)
class Heal:
    """The change a heal makes: the session moves to a new upstream session, if it is still at the
    generation the heal started from (another heal, here or on another replica, may have won). State
    fields are left as they are now, so a state change recorded during the heal survives it."""

    generation: int
    upstream_session_id: str
    protocol_version: str | None

    def __call__(self, record: SessionRecord) -> SessionRecord:
        if record.generation != self.generation:
            return record
        return record.healed(self.upstream_session_id, self.protocol_version)


def refuses_write(stored_generation: int | None, record: SessionRecord) -> bool:
    """The one rule every store applies before replacing a record (the Redis store's ``_PUT`` script is
    the same rule in Lua; tests/test_store_contract.py holds all stores to it).

    A write is stale, and refused, when the session is gone (ended by DELETE, idle expiry or eviction:
    a heal or state change finishing late must not bring it back) or when the stored record is of a
    newer generation (a write prepared before a heal must not undo the heal).
    """
    return stored_generation is None or stored_generation > record.generation


class SessionStore(Protocol):
    """Where records live.

    Guarantees every store keeps: a write is durable (for a durable store) before it returns, and the
    proxy creates a record before the client sees its id; ``put`` never writes a stale record (see
    ``refuses_write``); ``get(fresh=True)`` reads past any cache (the heal path uses it to see another
    replica's heal); ``heal_lock`` serializes heals of one session generation across every proxy that
    shares the store.
    """

    async def get(self, client_session_id: str, *, fresh: bool = False) -> SessionRecord | None:
        """The record for a client session id, or None if this proxy never issued it."""

    async def create(self, record: SessionRecord) -> None:
        """Store the record of a new session (its id is fresh and random)."""

    async def put(self, record: SessionRecord) -> SessionRecord | None:
        """Replace a session's record unless the write is stale (``refuses_write``).

        Returns what the store holds now: ``record`` when written (same generation), the newer record
        when refused, None when the session is gone.
        """

    async def apply(self, client_session_id: str, change: RecordChange) -> SessionRecord | None:
        """Apply ``change`` to the session's current record, atomically: no other write lands between
        the read and the write (compare-and-set), so concurrent changes never lose one another.

        Returns the record the store holds now (unchanged when ``change`` returned its argument), or
        None when the session is gone (a change never brings an ended session back).
        """

    async def delete(self, client_session_id: str) -> None:
        """Forget a client session (idempotent)."""

    async def touch(self, last_used: Mapping[str, float]) -> None:
        """Record when sessions were last used (batched by the caller; missing ids are ignored)."""

    async def forget_idle(self, unused_since: float) -> list[SessionRecord]:
        """Forget sessions not used since this time; return their records as they were removed.

        The records name the upstream sessions to end (their upstream, id and negotiated version). A
        session used again before the removal (another replica's touch) is neither removed nor returned.
        """

    async def evict_oldest(self, count: int) -> list[SessionRecord]:
        """Forget the ``count`` least recently used sessions (the session limit); return their records."""

    def heal_lock(self, client_session_id: str, generation: int) -> AbstractAsyncContextManager[None]:
        """Held while healing this session generation; in-process stores need no lock."""

    async def close(self) -> None:
        """Release resources (flush, close files or connections)."""

    def __len__(self) -> int:
        """How many client sessions the store holds (for the open-sessions gauge)."""


def record_to_json(record: SessionRecord) -> str:
    """Serialize a record for a durable store."""
    data = asdict(record)
    data["subscriptions"] = sorted(record.subscriptions)
    return json.dumps(data, separators=(",", ":"))


def record_from_json(text: str | bytes) -> SessionRecord:
    """Read back a record written by record_to_json (unknown fields from newer versions are ignored)."""
    data = json.loads(text)
    known = {f.name for f in fields(SessionRecord)}
    data = {key: value for key, value in data.items() if key in known}
    data["subscriptions"] = frozenset(data.get("subscriptions", ()))
    return SessionRecord(**data)


def least_recently_used(records: Iterable[SessionRecord], count: int) -> list[str]:
    """Client session ids of the ``count`` records used least recently."""
    return [record.client_session_id for record in heapq.nsmallest(count, records, key=lambda r: r.last_used)]


class MemorySessionStore:
    """Keeps records in a dict: fast, and gone with the process (``--state :memory:``)."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}

    async def get(self, client_session_id: str, *, fresh: bool = False) -> SessionRecord | None:
        """See SessionStore.get."""
        return self._records.get(client_session_id)

    async def create(self, record: SessionRecord) -> None:
        """See SessionStore.create."""
        self._records[record.client_session_id] = record

    async def put(self, record: SessionRecord) -> SessionRecord | None:
        """See SessionStore.put."""
        stored = self._records.get(record.client_session_id)
        if refuses_write(stored.generation if stored is not None else None, record):
            return stored
        self._records[record.client_session_id] = record
        return record

    async def apply(self, client_session_id: str, change: RecordChange) -> SessionRecord | None:
        """See SessionStore.apply: read, change and write with no await between them."""
        stored = self._records.get(client_session_id)
        if stored is None:
            return None
        updated = change(stored)
        if updated is not stored:
            self._records[client_session_id] = updated
        return updated

    async def delete(self, client_session_id: str) -> None:
        """See SessionStore.delete."""
        self._records.pop(client_session_id, None)

    async def touch(self, last_used: Mapping[str, float]) -> None:
        """See SessionStore.touch."""
        for client_session_id, when in last_used.items():
            record = self._records.get(client_session_id)
            if record is not None and when > record.last_used:
                self._records[client_session_id] = replace(record, last_used=when)

    async def forget_idle(self, unused_since: float) -> list[SessionRecord]:
        """See SessionStore.forget_idle."""
        idle = [cid for cid, record in self._records.items() if record.last_used < unused_since]
        return [self._records.pop(client_session_id) for client_session_id in idle]

    async def evict_oldest(self, count: int) -> list[SessionRecord]:
        """See SessionStore.evict_oldest."""
        oldest = least_recently_used(self._records.values(), count)
        return [self._records.pop(client_session_id) for client_session_id in oldest]

    def heal_lock(self, client_session_id: str, generation: int) -> AbstractAsyncContextManager[None]:
        """One process: the Healer's own single-flight is enough."""
        return contextlib.nullcontext()

    def records(self) -> list[SessionRecord]:
        """Every record (the status page lists them)."""
        return list(self._records.values())

    async def close(self) -> None:
        """Nothing to release."""

    def __len__(self) -> int:
        return len(self._records)
