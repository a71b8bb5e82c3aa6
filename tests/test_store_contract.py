"""One rule for every store: a write never brings back an ended session nor undoes a heal
(sessions.refuses_write; the Redis store runs the same rule in Lua)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_heal_proxy.store.records import MemorySessionStore, SessionRecord, SessionStore, refuses_write
from mcp_heal_proxy.store.redis import RedisSessionStore
from mcp_heal_proxy.store.sqlite import SQLiteSessionStore
from tests.test_store_redis import RedisServer, record


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    opened: SessionStore
    redis: RedisServer | None = None
    if request.param == "memory":
        opened = MemorySessionStore()
    elif request.param == "sqlite":
        sqlite = SQLiteSessionStore(str(tmp_path / "sessions.db"))
        await sqlite.open()
        opened = sqlite
    else:
        redis = RedisServer(tmp_path)
        await redis.start()
        redis_store = RedisSessionStore(redis.url, cache_ttl=0)
        await redis_store.open()
        opened = redis_store
    yield opened
    await opened.close()
    if redis is not None:
        await redis.stop()


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
