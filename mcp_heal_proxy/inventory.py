"""The sessions in a store, read from outside the proxy that owns it (``mcp-heal-proxy sessions``) or by
the proxy's status page, and shown without secrets.

A running proxy keeps writing its store, so readers never take it over: a SQLite file is opened
read-only (``mode=ro``; WAL mode lets readers see every committed write while the proxy writes), and
Redis is read with plain reads of the layout described in store/redis.py.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, Protocol, cast, runtime_checkable
from urllib.parse import quote

from mcp_heal_proxy.bridge.era import BRIDGED
from mcp_heal_proxy.config import MEMORY_STATE
from mcp_heal_proxy.errors import StoreUnavailable, store_failure
from mcp_heal_proxy.events import MAX_NAME, short_id
from mcp_heal_proxy.store.records import SessionRecord, record_from_json
from mcp_heal_proxy.store.sqlite import ENDED_SCHEMA

# The page shows this many sessions, most recently used first; the count covers them all.
PAGE_SESSIONS: Final = 200


@runtime_checkable
class CachedStore(Protocol):
    """A store that holds every record in this process (memory, SQLite)."""

    def records(self) -> list[SessionRecord]:
        """Every record, in no particular order."""


def is_redis(state: str) -> bool:
    """Whether a ``--state`` value names a Redis store."""
    return state.startswith(("redis://", "rediss://"))


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= MAX_NAME else value[:MAX_NAME] + "…"


def client_info(record: SessionRecord) -> tuple[str | None, str | None]:
    """The client's name and version, from the ``clientInfo`` of its initialize."""
    info = record.initialize_params.get("clientInfo")
    if not isinstance(info, dict):
        return None, None
    return _text(info.get("name")), _text(info.get("version"))


def summary(record: SessionRecord, *, full: bool = False) -> dict[str, Any]:
    """One session as shown: the page gets the short id and a count of subscriptions (resource URIs can
    carry credentials in a query string); the ``sessions`` command, run by the store's owner, gets both
    in full."""
    name, version = client_info(record)
    shown: dict[str, Any] = {
        "id": record.client_session_id if full else short_id(record.client_session_id),
        "upstream": record.upstream,
        "client": name,
        "client_version": version,
        "protocol_version": record.protocol_version,
        "heals": record.generation,
        "created": round(record.created_at, 3),
        "last_used": round(record.last_used, 3),
        "subscriptions": sorted(record.subscriptions) if full else len(record.subscriptions),
        "log_level": record.log_level,
    }
    if record.upstream_session_id == BRIDGED:
        # The proxy holds this session itself in front of a 2026-07-28-only upstream (bridge/).
        shown["bridged"] = True
    elif full and record.upstream_protocol_version not in (None, record.protocol_version):
        shown["upstream_protocol_version"] = record.upstream_protocol_version
    return shown


def most_recent(records: Iterable[SessionRecord], limit: int | None = None) -> list[SessionRecord]:
    """Records, most recently used first."""
    ordered = sorted(records, key=lambda r: r.last_used, reverse=True)
    return ordered if limit is None else ordered[:limit]


def read_sqlite(path: str) -> list[SessionRecord]:
    """Every record of a SQLite store, read-only (a proxy may be writing it right now)."""
    if not Path(path).exists():
        raise StoreUnavailable(f"no session store at {path}")
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=5.0)
        try:
            rows = connection.execute("SELECT record, last_used FROM sessions").fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot read the session store {path}: {exc}") from exc
    return [replace(record_from_json(text), last_used=last_used) for text, last_used in rows]


def forget_sqlite(path: str, client_session_id: str) -> bool:
    """Delete one record from a SQLite store no proxy is running on, and mark the session ended (as the
    store's ``delete`` does: its sealed id must not bring it back); whether it was there."""
    try:
        connection = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        try:
            connection.execute("BEGIN")
            deleted = connection.execute(
                "DELETE FROM sessions WHERE client_session_id = ?", (client_session_id,)
            ).rowcount
            if deleted:
                connection.execute(ENDED_SCHEMA)  # a file written before sessions were marked ended
                connection.execute(
                    "INSERT OR REPLACE INTO ended (client_session_id, ended_at) VALUES (?, ?)",
                    (client_session_id, time.time()),
                )
            connection.execute("COMMIT")
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot write the session store {path}: {exc}") from exc
    return bool(deleted)


class RedisReader:
    """Reads a Redis store's records (store/redis.py's layout) over a connection of its own."""

    def __init__(self, url: str, prefix: str | None = None) -> None:
        # Imported here: the redis package is needed only by those who chose a Redis store.
        from redis.asyncio import Redis

        from mcp_heal_proxy.store.redis import DEFAULT_PREFIX

        prefix = DEFAULT_PREFIX if prefix is None else prefix
        self._redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._session_prefix = f"{prefix}session:"
        self._last_used_key = f"{prefix}last-used"
        self._ended_key = f"{prefix}ended"

    async def count(self) -> int:
        """Sessions in the store."""
        from redis.exceptions import RedisError

        try:
            return int(await self._redis.zcard(self._last_used_key))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"cannot read the Redis session store: {store_failure(exc)}") from exc

    async def records(self, limit: int | None = None) -> list[SessionRecord]:
        """Records, most recently used first (the ``limit`` most recent when given)."""
        from redis.exceptions import RedisError

        try:
            members = cast(
                "list[tuple[bytes, float]]",
                await self._redis.zrange(
                    self._last_used_key, 0, -1 if limit is None else limit - 1, desc=True, withscores=True
                ),
            )
            async with self._redis.pipeline(transaction=False) as pipe:
                for member, _ in members:
                    pipe.hget(self._session_prefix + _decode(member), "record")
                texts = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"cannot read the Redis session store: {store_failure(exc)}") from exc
        found = []
        for (_, score), text in zip(members, texts, strict=True):
            if text is not None:  # deleted between the two reads
                found.append(replace(record_from_json(text), last_used=float(score)))
        return found

    async def forget(self, client_session_id: str) -> bool:
        """Delete one record (as the store's ``delete`` does); whether it was there."""
        from redis.exceptions import RedisError

        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._session_prefix + client_session_id)
                pipe.zrem(self._last_used_key, client_session_id)
                pipe.zadd(self._ended_key, {client_session_id: time.time()})
                deleted, *_ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"cannot write the Redis session store: {store_failure(exc)}") from exc
        return bool(deleted)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def _decode(member: object) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)


async def read_state(state: str) -> list[SessionRecord]:
    """Every record of the store a ``--state`` value names, most recently used first."""
    if state == MEMORY_STATE:
        raise StoreUnavailable("a :memory: store lives inside its proxy: see its status page instead")
    if is_redis(state):
        reader = RedisReader(state)
        try:
            return await reader.records()
        finally:
            await reader.close()
    return most_recent(read_sqlite(state))


def resolve(records: Iterable[SessionRecord], prefix: str) -> SessionRecord:
    """The one record whose client id starts with ``prefix`` (the short id the listing shows)."""
    matches = [record for record in records if record.client_session_id.startswith(prefix)]
    if not matches:
        raise LookupError(f"no session {prefix}")
    if len(matches) > 1:
        raise LookupError(f"{len(matches)} sessions start with {prefix}: give more of the id")
    return matches[0]


def age(when: float, now: float | None = None) -> str:
    """A short human age: 4s, 12m, 3h, 2d."""
    seconds = max(0.0, (time.time() if now is None else now) - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
