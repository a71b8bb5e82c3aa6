"""The shared session store: Redis, for several proxy replicas behind one load balancer.

Selected by ``state = "redis://HOST:PORT/DB"`` (or ``rediss://`` for TLS). Every replica reads and
writes the same records, and heals of one session generation are serialized across replicas with a
Redis lock, so two replicas hit by the same dead upstream session re-initialize it once.

Layout (``P`` is the key prefix, ``mcp-heal-proxy:`` by default):

* ``P session:<client id>``: a hash with ``record`` (the record as JSON, ``record_to_json``) and
  ``generation`` (kept beside the JSON so a Lua script can compare it without parsing the JSON).
* ``P last-used``: a sorted set, member the client id, score its last use (Unix time). It is the one
  place ``last_used`` lives (the copy inside the JSON is the value at the last ``put``), the index that
  makes ``forget_idle`` a range query over the idle sessions only, and the count behind ``len()``.
  A member exists exactly when its record does: ``put``, ``delete``, ``forget_idle`` and
  ``evict_oldest`` change both atomically.
* ``P heal-lock:<client id>:<generation>``: the heal lock (``SET NX PX`` with a random token).
* ``P ended``: a sorted set, member the client id of a session the proxy ended (DELETE, idle expiry,
  eviction), score when (``SessionStore.ended``). Written in the same script or transaction that removes
  the record; marks older than the idle cutoff go at each ``forget_idle``.

Why a sorted set rather than a key TTL equal to the idle TTL: with a TTL, Redis would drop idle
records for free, but the store would need the idle TTL at construction (it is an argument of
``forget_idle``), ``forget_idle`` could not say which sessions it forgot (so their upstream sessions
could not be ended), and ``len()`` would need a key scan. The sorted set costs one ``ZADD`` per ``put`` and one per batch of ``touch`` (``ZADD XX GT``:
existing members only, never backwards), and ``forget_idle`` touches only the sessions it removes.

What the store guarantees beyond the protocol:

* A ``put`` never moves a session back to an older generation: a replica holding a stale record (from
  its cache, or from a request that started before another replica healed) cannot overwrite a heal.
  The refused write is logged and the newer record replaces the stale one in the cache.
* Any Redis failure (refused connection, timeout, protocol error) raises ``StoreUnavailable`` (HTTP 503
  with a JSON-RPC error): the proxy refuses rather than guess a mapping. The connection pool reconnects
  by itself once Redis is back; nothing has to be restarted.

The cache: ``get`` may answer from an in-process cache for ``cache_ttl`` (1 s), which saves a round
trip on every proxied request. What a stale entry can cost: after another replica healed the session,
one request goes to the dead upstream session, finds it expired, and the heal path (which reads with
``fresh=True`` under the lock) picks up the other replica's heal without a second initialize; after a
DELETE or idle expiry on another replica, this one keeps serving the session for up to ``cache_ttl``.

Limits: Redis 6.2 or newer (``ZADD GT``). One Redis (a primary, optionally with replicas for
failover), not Redis Cluster: the scripts touch keys in several hash slots. Configure Redis with
``maxmemory-policy noeviction``; an evicted record is a session the proxy must re-create from its sealed
id (engine/sealing.py: one heal, and the client's subscriptions and log level are lost). Idle expiry is
as exact as the last-use marks: each replica flushes its marks every housekeeping round, so another
replica's ``forget_idle`` may see a use up to one round late.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, WatchError

from mcp_heal_proxy.errors import StoreUnavailable, store_failure
from mcp_heal_proxy.store.records import (
    DEFAULT_HEAL_LOCK_TTL,
    RecordChange,
    SessionRecord,
    record_from_json,
    record_to_json,
)

log = structlog.get_logger("mcp_heal_proxy.store.redis")

DEFAULT_PREFIX: Final = "mcp-heal-proxy:"
# A cached record may be this old when served to a request (``get(fresh=True)`` always reads Redis).
DEFAULT_CACHE_TTL: Final = 1.0
# A heal is an initialize, a notifications/initialized and the state re-apply, the whole bounded by the
# upstream's heal_timeout. The proxy opens the store with a lock that outlives its longest heal_timeout
# (front/app.py, heal_lock_ttl); this is the floor. A replica that crashed while holding the lock blocks
# that session's heal for at most the lock's life.
DEFAULT_LOCK_TTL: Final = DEFAULT_HEAL_LOCK_TTL
# Redis answers in well under a millisecond; a command that takes seconds means Redis is gone.
DEFAULT_SOCKET_TIMEOUT: Final = 2.0
# Waiting for another replica's heal: poll the lock with backoff from 5 ms up to 100 ms.
_LOCK_POLL_FIRST: Final = 0.005
_LOCK_POLL_MAX: Final = 0.1
# Records are removed by forget_idle in scripts of at most this many, so Redis is never blocked long.
_FORGET_BATCH: Final = 500
_CACHE_MAX: Final = 10_000
# An apply whose record another writer changed between its read and its write reads and tries again;
# each conflict means another writer succeeded, so this many in a row means a session under siege.
_APPLY_ATTEMPTS: Final = 50

# KEYS: record, last-used set, ended set. ARGV: record JSON, generation, last_used, client id, mode
# ("create" or "update"). A create is refused when the session exists (two replicas re-creating one session
# from its sealed id: the first stands) and clears the ended mark. An update is sessions.refuses_write in
# Lua: refused when the session is gone or its stored generation is newer. Returns {1, created} when
# written, {0, stored JSON or false} when refused.
_PUT: Final = """
local stored = redis.call('HGET', KEYS[1], 'generation')
if ARGV[5] == 'create' and stored then
    return {0, redis.call('HGET', KEYS[1], 'record')}
end
if ARGV[5] == 'update' and (not stored or tonumber(stored) > tonumber(ARGV[2])) then
    return {0, redis.call('HGET', KEYS[1], 'record')}
end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'generation', ARGV[2])
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[4])
if ARGV[5] == 'create' then redis.call('ZREM', KEYS[3], ARGV[4]) end
if stored then return {1, 0} end
return {1, 1}
"""

# KEYS: last-used set, ended set. ARGV: idle cutoff, batch size, record key prefix, now.
# Returns {removed, remaining, record JSON...}: the records go back so that their upstream sessions can be
# ended. Chosen and removed in one script, so a session another replica touched meanwhile stays.
_FORGET_IDLE: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
local idle = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local answer = {#idle, 0}
for _, id in ipairs(idle) do
    local record = redis.call('HGET', ARGV[3] .. id, 'record')
    if record then table.insert(answer, record) end
    redis.call('DEL', ARGV[3] .. id)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[4], id)
end
answer[2] = redis.call('ZCARD', KEYS[1])
return answer
"""

# KEYS: last-used set, ended set. ARGV: how many, record key prefix, now. Returns {remaining, record
# JSON...}: the least recently used sessions of every replica, chosen and removed in one script (as
# _FORGET_IDLE).
_EVICT_OLDEST: Final = """
local oldest = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local answer = {0}
for _, id in ipairs(oldest) do
    local record = redis.call('HGET', ARGV[2] .. id, 'record')
    if record then table.insert(answer, record) end
    redis.call('DEL', ARGV[2] .. id)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[3], id)
end
answer[1] = redis.call('ZCARD', KEYS[1])
return answer
"""

# Compare-and-delete: only the holder (who knows the token) releases the lock.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


@contextlib.contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    """Turn every Redis failure into StoreUnavailable (the client-facing message names no address)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        log.warning("store.redis_failed", operation=what, error=store_failure(exc), detail=str(exc))
        raise StoreUnavailable(f"session store unavailable (Redis {what} failed: {store_failure(exc)})") from exc


class _Turn:
    """This replica's changes of one session, taking turns (RedisSessionStore.apply)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class RedisSessionStore:
    """Records in Redis, shared by every proxy replica that names the same URL and prefix."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # One quick retry: a pooled connection that Redis closed (a Redis restart) fails once,
            # and the retry reconnects. Anything longer would only delay the 503.
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        )
        self._prefix = prefix
        self._session_prefix = f"{prefix}session:"
        self._last_used_key = f"{prefix}last-used"
        self._ended_key = f"{prefix}ended"
        self._cache_ttl = cache_ttl
        self._lock_ttl = lock_ttl
        self._cache: dict[str, tuple[float, SessionRecord]] = {}
        self._apply_turns: dict[str, _Turn] = {}
        self._count = 0
        self._put_script = self._redis.register_script(_PUT)
        self._forget_script = self._redis.register_script(_FORGET_IDLE)
        self._evict_script = self._redis.register_script(_EVICT_OLDEST)
        self._release_script = self._redis.register_script(_RELEASE)

    def _key(self, client_session_id: str) -> str:
        return f"{self._session_prefix}{client_session_id}"

    async def open(self) -> None:
        """Check that Redis answers and read the session count (fails fast on a wrong URL)."""
        with _redis_errors("open"):
            await self._redis.ping()
            self._count = int(await self._redis.zcard(self._last_used_key))

    # --- records ----------------------------------------------------------------------------------

    async def get(self, client_session_id: str, *, fresh: bool = False) -> SessionRecord | None:
        """See SessionStore.get: a cached record at most ``cache_ttl`` old, or Redis when ``fresh``.

        Misses are never cached: a session another replica just created is found at once.
        """
        if not fresh:
            cached = self._cache.get(client_session_id)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
        with _redis_errors("get"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._key(client_session_id), "record")
                pipe.zscore(self._last_used_key, client_session_id)
                text, last_used = await pipe.execute()
        if text is None:
            self._cache.pop(client_session_id, None)
            return None
        record = record_from_json(text)
        if last_used is not None:
            record = replace(record, last_used=float(last_used))
        self._remember(record)
        return record

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See SessionStore.create: in Redis before it returns; whether the id exists is checked by Redis
        itself, so two replicas re-creating one session from its sealed id agree on the first one's record."""
        written = await self._write(record, "create")
        assert written is not None  # a refused create gives back the stored record
        return written

    async def ended(self, client_session_id: str) -> bool:
        """See SessionStore.ended (always asks Redis: it is asked only when a record is missing)."""
        with _redis_errors("ended"):
            return await self._redis.zscore(self._ended_key, client_session_id) is not None

    async def put(self, record: SessionRecord) -> SessionRecord | None:
        """See SessionStore.put: in Redis before it returns; the rule is checked by Redis itself, so a
        replica holding a stale record (from its cache, or from a request that started before another
        replica healed) cannot overwrite a heal or bring back an ended session."""
        return await self._write(record, "update")

    async def _write(self, record: SessionRecord, mode: str) -> SessionRecord | None:
        with _redis_errors("put"):
            written, detail = await self._put_script(
                keys=[self._key(record.client_session_id), self._last_used_key, self._ended_key],
                args=[
                    record_to_json(record),
                    record.generation,
                    repr(record.last_used),
                    record.client_session_id,
                    mode,
                ],
            )
        if not written:
            if mode == "create":
                stored = record_from_json(detail)  # another replica created it first
                self._remember(stored)
                return stored
            if not detail:
                log.info("store.put_refused_session_gone", client_session=record.client_session_id[:8])
                self._cache.pop(record.client_session_id, None)
                return None
            stored = record_from_json(detail)
            log.warning(
                "store.stale_put_refused",
                client_session=record.client_session_id[:8],
                generation=record.generation,
                stored_generation=stored.generation,
            )
            self._remember(stored)
            return stored
        self._count += int(detail)
        self._remember(record)
        return record

    async def apply(self, client_session_id: str, change: RecordChange) -> SessionRecord | None:
        """See SessionStore.apply: optimistic compare-and-set with WATCH/MULTI. The record is read under
        WATCH, changed here (the one rule, in Python), and written in a MULTI that Redis refuses if any
        replica wrote or deleted the record meanwhile; then it is read again and the change re-applied.

        This replica's own changes of one session take turns (a client subscribing to many resources at
        once would otherwise conflict with itself): conflicts come from other replicas only."""
        turn = self._apply_turns.get(client_session_id)
        if turn is None:
            turn = self._apply_turns[client_session_id] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                return await self._apply(client_session_id, change)
        finally:
            turn.users -= 1
            if not turn.users:
                del self._apply_turns[client_session_id]

    async def _apply(self, client_session_id: str, change: RecordChange) -> SessionRecord | None:
        key = self._key(client_session_id)
        with _redis_errors("apply"):
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(_APPLY_ATTEMPTS):
                    await pipe.watch(key)
                    text = await pipe.hget(key, "record")
                    last_used = await pipe.zscore(self._last_used_key, client_session_id)
                    if text is None:
                        await pipe.reset()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                        self._cache.pop(client_session_id, None)
                        return None
                    stored = record_from_json(text)
                    if last_used is not None:
                        stored = replace(stored, last_used=float(last_used))
                    updated = change(stored)
                    if updated is stored:
                        await pipe.reset()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                        self._remember(stored)
                        return stored
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                    pipe.hset(key, mapping={"record": record_to_json(updated), "generation": updated.generation})
                    try:
                        await pipe.execute()
                    except WatchError:
                        continue  # another writer came first: apply the change to what it wrote
                    self._remember(updated)
                    return updated
        raise StoreUnavailable(f"session store unavailable (a record changed under {_APPLY_ATTEMPTS} writes in a row)")

    async def delete(self, client_session_id: str) -> None:
        """See SessionStore.delete."""
        self._cache.pop(client_session_id, None)
        with _redis_errors("delete"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(client_session_id))
                pipe.zrem(self._last_used_key, client_session_id)
                pipe.zadd(self._ended_key, {client_session_id: time.time()})
                deleted, *_ = await pipe.execute()
        self._count = max(0, self._count - int(deleted))

    async def touch(self, last_used: Mapping[str, float]) -> None:
        """See SessionStore.touch: one ``ZADD XX GT`` for the batch (known sessions only, never backwards)."""
        if not last_used:
            return
        with _redis_errors("touch"):
            await self._redis.zadd(self._last_used_key, dict(last_used), xx=True, gt=True)

    async def forget_idle(self, unused_since: float) -> list[SessionRecord]:
        """See SessionStore.forget_idle; also refreshes the count behind ``len()`` and prunes the cache."""
        now = time.monotonic()
        self._cache = {cid: entry for cid, entry in self._cache.items() if entry[0] > now}
        forgotten: list[SessionRecord] = []
        with _redis_errors("forget_idle"):
            while True:
                removed, remaining, *texts = await self._forget_script(
                    keys=[self._last_used_key, self._ended_key],
                    args=[repr(unused_since), _FORGET_BATCH, self._session_prefix, repr(time.time())],
                )
                forgotten += self._forgotten(texts)
                self._count = int(remaining)
                if int(removed) < _FORGET_BATCH:
                    return forgotten

    async def evict_oldest(self, count: int) -> list[SessionRecord]:
        """See SessionStore.evict_oldest: the oldest by the shared last-used set, whichever replica made them."""
        if count <= 0:
            return []  # the script's ZRANGE 0 -1 would take every session
        with _redis_errors("evict_oldest"):
            remaining, *texts = await self._evict_script(
                keys=[self._last_used_key, self._ended_key], args=[count, self._session_prefix, repr(time.time())]
            )
        self._count = int(remaining)
        return self._forgotten(texts)

    def _forgotten(self, texts: list[bytes]) -> list[SessionRecord]:
        """Records a script removed, out of the cache too."""
        records = [record_from_json(text) for text in texts]
        for record in records:
            self._cache.pop(record.client_session_id, None)
        return records

    def _remember(self, record: SessionRecord) -> None:
        if self._cache_ttl <= 0:
            return
        if len(self._cache) >= _CACHE_MAX:
            now = time.monotonic()
            self._cache = {cid: entry for cid, entry in self._cache.items() if entry[0] > now}
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
        self._cache[record.client_session_id] = (time.monotonic() + self._cache_ttl, record)

    # --- the cross-replica heal lock --------------------------------------------------------------

    def heal_lock(self, client_session_id: str, generation: int) -> AbstractAsyncContextManager[None]:
        """Held while healing this session generation, by one proxy among all that share this Redis.

        ``SET NX PX`` with a random token; released by compare-and-delete so a holder whose lock
        expired never frees another's. A waiter polls with a bounded backoff; the lock expires after
        ``lock_ttl`` so a replica that crashed mid-heal delays the next heal by at most that long.
        """
        return self._heal_lock(f"{self._prefix}heal-lock:{client_session_id}:{generation}")

    @contextlib.asynccontextmanager
    async def _heal_lock(self, key: str) -> AsyncIterator[None]:
        token = secrets.token_hex(16)
        ttl_ms = int(self._lock_ttl * 1000)
        delay = _LOCK_POLL_FIRST
        try:
            # Once the holder's TTL has run out the lock is free, so a wait longer than that (plus
            # slack for Redis round trips) means other replicas keep taking it: give up then.
            async with asyncio.timeout(self._lock_ttl + 5.0):
                while True:
                    with _redis_errors("heal_lock"):
                        acquired = await self._redis.set(key, token, nx=True, px=ttl_ms)
                    if acquired:
                        break
                    await asyncio.sleep(delay)  # another replica is healing this generation
                    delay = min(delay * 2, _LOCK_POLL_MAX)
        except TimeoutError:
            raise StoreUnavailable("session store unavailable (heal lock held elsewhere for too long)") from None
        try:
            yield
        finally:
            try:
                with _redis_errors("heal_unlock"):
                    await self._release_script(keys=[key], args=[token])
            except StoreUnavailable:
                # The heal's outcome stands; the lock expires on its own after lock_ttl.
                pass

    async def close(self) -> None:
        """Close the connection pool (every write is already in Redis)."""
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    def __len__(self) -> int:
        """Sessions in Redis as of the last housekeeping round, plus this replica's own puts and deletes
        since; sessions other replicas created or deleted show up at the next round (at most a minute)."""
        return self._count
