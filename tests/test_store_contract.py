"""One rule for every store: a write never brings back an ended session nor undoes a heal
(sessions.refuses_write; the Redis store runs the same rule in Lua), and a change is applied to the
record the store holds now, so concurrent writers (requests of one proxy, replicas sharing a store)
never lose one another's changes (SessionStore.apply, the merge rule in engine/state.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_heal_proxy.engine.state import SET_LEVEL, SUBSCRIBE, UNSUBSCRIBE, StateChange
from mcp_heal_proxy.store.records import (
    Heal,
    MemorySessionStore,
    RecordChange,
    SessionRecord,
    SessionStore,
    refuses_write,
)
from mcp_heal_proxy.store.redis import RedisSessionStore
from mcp_heal_proxy.store.sqlite import SQLiteSessionStore
from tests.test_store_redis import RedisServer, record


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[SessionStore]]:
    """Two handles on one state: for Redis two replicas; for memory and SQLite the same store twice (one
    process owns a file: store/sqlite.py), its writers racing each other on the event loop."""
    opened: list[SessionStore] = []
    redis: RedisServer | None = None
    if request.param == "redis":
        redis = RedisServer(tmp_path)
        await redis.start()
    for _ in range(2):
        if opened and request.param != "redis":
            opened.append(opened[0])
        elif request.param == "memory":
            opened.append(MemorySessionStore())
        elif request.param == "sqlite":
            sqlite = SQLiteSessionStore(str(tmp_path / "sessions.db"))
            await sqlite.open()
            opened.append(sqlite)
        else:
            assert redis is not None
            redis_store = RedisSessionStore(redis.url, cache_ttl=0)
            await redis_store.open()
            opened.append(redis_store)
    yield opened
    for each in dict.fromkeys(opened):
        await each.close()
    if redis is not None:
        await redis.stop()


@pytest.fixture
def store(stores: list[SessionStore]) -> SessionStore:
    return stores[0]


async def test_a_write_after_a_delete_does_not_bring_the_session_back(store: SessionStore) -> None:
    original = record()
    await store.create(original)
    await store.delete("c1")
    assert await store.put(original.healed("u2", None)) is None
    assert await store.get("c1", fresh=True) is None


async def test_a_write_of_an_older_generation_is_refused_and_the_newer_record_returned(store: SessionStore) -> None:
    original = record()
    await store.create(original)
    healed = original.healed("u2", "2025-11-25")
    assert await store.put(healed) == healed
    stale = replace(original, log_level="debug")
    assert await store.put(stale) == healed
    assert await store.get("c1", fresh=True) == healed


async def test_a_write_of_the_same_generation_is_taken(store: SessionStore) -> None:
    original = record()
    await store.create(original)
    changed = replace(original, log_level="debug", subscriptions=frozenset({"file:///a"}))
    assert await store.put(changed) == changed
    assert await store.get("c1", fresh=True) == changed


def ending(forgotten: list[SessionRecord]) -> list[tuple[str, str, str, str | None]]:
    """What ending a forgotten session upstream needs: which upstream, its session id and version."""
    return sorted(
        (r.client_session_id, r.upstream, r.upstream_session_id, r.upstream_protocol_version) for r in forgotten
    )


async def test_forget_idle_gives_back_the_records_it_forgot_and_keeps_sessions_used_since(store: SessionStore) -> None:
    await store.create(
        record("old", upstream="github", upstream_session_id="u-old", upstream_protocol_version="2025-06-18")
    )
    await store.create(record("used", upstream_session_id="u-used"))
    await store.create(record("healed", upstream_session_id="u-dead"))
    await store.put(record("healed").healed("u-new", "2025-11-25"))
    await store.touch({"used": 2000.0})  # used again (on this proxy or another) before the round
    forgotten = await store.forget_idle(1500.0)
    assert ending(forgotten) == [
        ("healed", "default", "u-new", "2025-11-25"),
        ("old", "github", "u-old", "2025-06-18"),
    ]
    assert [await store.get(cid, fresh=True) is None for cid in ("old", "healed", "used")] == [True, True, False]
    assert len(store) == 1
    assert await store.forget_idle(1500.0) == [], "what was forgotten is given back once"


async def test_evict_oldest_gives_back_the_records_it_evicted(store: SessionStore) -> None:
    await store.create(record("oldest", upstream_session_id="u-1", upstream_protocol_version="2025-11-25"))
    await store.create(record("middle", upstream="github", upstream_session_id="u-2", last_used=1100.0))
    await store.create(record("newest", upstream_session_id="u-3", last_used=1200.0))
    await store.touch({"oldest": 3000.0})  # used again: now the newest
    evicted = await store.evict_oldest(2)
    assert ending(evicted) == [("middle", "github", "u-2", None), ("newest", "default", "u-3", None)]
    assert await store.get("oldest", fresh=True) is not None
    assert len(store) == 1


@given(stored=st.none() | st.integers(min_value=0, max_value=5), incoming=st.integers(min_value=0, max_value=5))
def test_the_rule(stored: int | None, incoming: int) -> None:
    refused = refuses_write(stored, replace(record(), generation=incoming))
    assert refused == (stored is None or stored > incoming)


def subscribe(uri: str) -> StateChange:
    return StateChange(((SUBSCRIBE, uri),))


async def test_concurrent_state_changes_all_survive(stores: list[SessionStore]) -> None:
    first = stores[0]
    await first.create(record())
    second = stores[1]
    uris = [f"file:///{n}" for n in range(24)]
    changes = [subscribe(uri) for uri in uris] + [StateChange(((SET_LEVEL, "debug"),))]
    # Every other change through the second handle: for Redis and SQLite, two writers racing on one record.
    results = await asyncio.gather(
        *((first if n % 2 else second).apply("c1", change) for n, change in enumerate(changes))
    )
    assert all(result is not None for result in results)
    stored = await first.get("c1", fresh=True)
    assert stored is not None
    assert stored.subscriptions == frozenset(uris)
    assert stored.log_level == "debug"
    assert stored.generation == 0


async def test_a_heal_and_a_state_change_racing_keep_both(stores: list[SessionStore]) -> None:
    first = stores[0]
    await first.create(record())
    second = stores[1]
    await asyncio.gather(
        first.apply("c1", subscribe("file:///a")),
        second.apply("c1", Heal(0, "u2", "2025-11-25")),
        first.apply("c1", subscribe("file:///b")),
        # A second heal of the same generation (another replica lost the race) changes nothing.
        second.apply("c1", Heal(0, "u3", None)),
    )
    stored = await first.get("c1", fresh=True)
    assert stored is not None
    assert stored.subscriptions == {"file:///a", "file:///b"}
    assert (stored.generation, stored.upstream_session_id) in {(1, "u2"), (1, "u3")}


async def test_a_change_never_brings_back_an_ended_session(store: SessionStore) -> None:
    await store.create(record())
    await store.delete("c1")
    assert await store.apply("c1", subscribe("file:///a")) is None
    assert await store.apply("c1", Heal(0, "u2", None)) is None
    assert await store.get("c1", fresh=True) is None


async def test_a_change_that_changes_nothing_gives_back_the_stored_record(store: SessionStore) -> None:
    original = record(subscriptions=frozenset({"file:///a"}))
    await store.create(original)
    assert await store.apply("c1", subscribe("file:///a")) == original
    assert await store.apply("c1", Heal(5, "u9", None)) == original, "a heal of another generation"


_steps = st.lists(
    st.tuples(st.sampled_from([SUBSCRIBE, UNSUBSCRIBE]), st.sampled_from(["file:///a", "file:///b", "file:///c"]))
    | st.tuples(st.just(SET_LEVEL), st.sampled_from(["debug", "info", "error"])),
    min_size=1,
    max_size=4,
)


@given(changes=st.lists(_steps.map(lambda steps: StateChange(tuple(steps))), max_size=8), heal_at=st.integers(0, 8))
def test_the_merge_rule(changes: list[StateChange], heal_at: int) -> None:
    """Changes applied one after another to the current record, a heal anywhere among them: the state is
    every step in order (a set of subscriptions, the last level), the heal moves the generation once, and
    neither touches what the other owns."""
    current = record(log_level="notice")
    applied: list[RecordChange] = [*changes[:heal_at], Heal(0, "u2", "2025-11-25"), *changes[heal_at:]]
    for change in applied:
        current = change(current)
    subscriptions: set[str] = set()
    level = "notice"
    for change in changes:
        for method, value in change.steps:
            if method == SUBSCRIBE:
                subscriptions.add(value)
            elif method == UNSUBSCRIBE:
                subscriptions.discard(value)
            else:
                level = value
    assert current.subscriptions == subscriptions
    assert current.log_level == level
    assert (current.generation, current.upstream_session_id, current.upstream_protocol_version) == (
        1,
        "u2",
        "2025-11-25",
    )
    assert Heal(0, "u3", None)(current) is current, "a second heal of the generation changes nothing"
