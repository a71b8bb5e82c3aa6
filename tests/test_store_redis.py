"""The Redis session store against a real redis-server: the store contract, the cross-replica heal lock,
two proxies sharing one session across a heal, and Redis outages (503, then recovery).

redis-server (Debian package ``redis-server``, installed by .ci/run) runs on a free loopback port and
is stopped by its PID. Without it these tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from mcp_heal_proxy.errors import StoreUnavailable
from mcp_heal_proxy.front.app import STORE_KEY
from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.store.redis import RedisSessionStore
from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    ProxyFactory,
    RunningProxy,
    UpstreamProcess,
    free_port,
    raw_initialize,
    session_headers,
    wait_until,
)

READY_TIMEOUT = 10.0


class RedisServer:
    """A redis-server process on 127.0.0.1; ``persist`` keeps its data in ``directory`` across restarts."""

    def __init__(self, directory: Path, *, persist: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed (CI=true: .ci/run installs it)")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        command += ["--save", "", "--daemonize", "no", "--protected-mode", "yes"]
        # Persistence only where a test restarts Redis and expects the sessions back.
        command += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_until(self._answers, READY_TIMEOUT, "redis-server ready")

    async def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Stop by PID (SIGKILL: a crash; with ``persist`` every write is already on disk)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)
        self.process = None

    async def command_calls(self, command: str) -> int:
        """How many times Redis ran ``command`` since it started."""
        client = Redis(host="127.0.0.1", port=self.port)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        entry = stats.get(f"cmdstat_{command}")
        return int(entry["calls"]) if isinstance(entry, dict) else 0


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def open_store(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A factory of stores on the test's Redis, sharing one key prefix (replicas), closed at the end."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    stores: list[RedisSessionStore] = []

    async def open_one(**options: Any) -> RedisSessionStore:
        store = RedisSessionStore(redis_server.url, prefix=prefix, **options)
        await store.open()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


def record(client_session_id: str = "c1", **fields: Any) -> SessionRecord:
    base: dict[str, Any] = {
        "client_session_id": client_session_id,
        "upstream_session_id": "u1",
        "initialize_params": {"protocolVersion": "2025-11-25", "capabilities": {"roots": {}}, "list": []},
        "last_used": 1000.0,
        "created_at": 1000.0,
    }
    return SessionRecord(**(base | fields))


# --- the store contract ---------------------------------------------------------------------------


async def test_put_get_delete_and_len(open_store: Any) -> None:
    store: RedisSessionStore = await open_store()
    assert len(store) == 0
    assert await store.get("c1") is None
    full = record(
        protocol_version="2025-06-18",
        upstream_protocol_version="2025-11-25",
        subscriptions=frozenset({"file:///a", "file:///b"}),
        log_level="debug",
        generation=3,
    )
    await store.create(full)
    assert await store.get("c1") == full
    assert await store.get("c1", fresh=True) == full
    assert len(store) == 1
    await store.put(full)  # a replace does not count twice
    assert len(store) == 1
    await store.delete("c1")
    await store.delete("c1")  # idempotent
    assert await store.get("c1") is None
    assert await store.get("c1", fresh=True) is None
    assert len(store) == 0


async def test_touch_moves_last_used_forward_only_and_forget_idle_uses_it(open_store: Any) -> None:
    store: RedisSessionStore = await open_store()
    await store.create(record("old", last_used=1000.0))
    await store.create(record("used", last_used=1000.0))
    await store.touch({"used": 2000.0, "never-issued": 2000.0})
    await store.touch({"used": 1500.0})  # an older mark from a slower replica does not go back
    used = await store.get("used", fresh=True)
    assert used is not None
    assert used.last_used == 2000.0
    assert await store.get("never-issued", fresh=True) is None, "touch never creates a record"
    assert await store.forget_idle(999.0) == []
    assert [r.client_session_id for r in await store.forget_idle(1500.0)] == ["old"]
    assert await store.get("old", fresh=True) is None
    assert await store.get("used", fresh=True) is not None
    assert len(store) == 1


async def test_forget_idle_removes_more_than_one_batch(open_store: Any) -> None:
    store: RedisSessionStore = await open_store()
    for index in range(1203):
        await store.create(record(f"c{index}", last_used=1000.0))
    await store.create(record("recent", last_used=5000.0))
    assert len(await store.forget_idle(2000.0)) == 1203
    assert len(store) == 1


async def test_evict_oldest_forgets_the_least_recently_used_of_every_replica(open_store: Any) -> None:
    one: RedisSessionStore = await open_store()
    other: RedisSessionStore = await open_store()
    await one.create(record("oldest", last_used=1000.0))
    await other.create(record("middle", last_used=2000.0))
    await one.create(record("newest", last_used=3000.0))
    assert sorted(r.client_session_id for r in await one.evict_oldest(2)) == ["middle", "oldest"]
    assert [await other.get(cid, fresh=True) is not None for cid in ("oldest", "middle", "newest")] == [
        False,
        False,
        True,
    ]


async def test_replicas_see_each_others_writes_and_a_stale_put_cannot_undo_a_heal(open_store: Any) -> None:
    a: RedisSessionStore = await open_store()
    b: RedisSessionStore = await open_store()
    original = record()
    await a.create(original)
    assert await b.get("c1") == original, "a miss is never cached: another replica's new session is found"
    assert await a.get("c1") == original  # now cached in a
    healed = original.healed("u2", "2025-11-25")
    await b.put(healed)
    assert await a.get("c1", fresh=True) == healed, "fresh reads go past the cache"
    # a request that started before the heal writes state on the old generation: refused.
    assert await a.put(replace(original, log_level="debug")) == healed
    current = await b.get("c1", fresh=True)
    assert current == healed
    assert await a.get("c1") == healed, "the refused put left the newer record in the cache"


async def test_len_counts_other_replicas_sessions_after_housekeeping(open_store: Any) -> None:
    a: RedisSessionStore = await open_store()
    b: RedisSessionStore = await open_store()
    for index in range(3):
        await b.create(record(f"c{index}"))
    assert len(a) == 0, "documented staleness: len() is refreshed by housekeeping"
    await a.forget_idle(0.0)
    assert len(a) == 3


# --- the heal lock --------------------------------------------------------------------------------


async def test_heal_lock_excludes_other_replicas_until_released(open_store: Any, redis_server: RedisServer) -> None:
    a: RedisSessionStore = await open_store()
    b: RedisSessionStore = await open_store()
    acquired_by_b = asyncio.Event()

    async def b_heals() -> None:
        async with b.heal_lock("c1", 0):
            acquired_by_b.set()

    async with asyncio.timeout(10), asyncio.TaskGroup() as tasks:
        async with a.heal_lock("c1", 0):
            sets_before = await redis_server.command_calls("set")
            waiter = tasks.create_task(b_heals())

            async def b_was_refused_twice() -> bool:
                return await redis_server.command_calls("set") >= sets_before + 2

            await wait_until(b_was_refused_twice, 5, "b tries the lock while a holds it")
            assert not acquired_by_b.is_set()
            # Another generation of the same session is another lock: not blocked.
            async with b.heal_lock("c1", 1):
                pass
        await waiter
    assert acquired_by_b.is_set()


async def test_heal_lock_is_released_to_a_waiter(open_store: Any) -> None:
    a: RedisSessionStore = await open_store()
    b: RedisSessionStore = await open_store()
    a_holds = asyncio.Event()
    let_go = asyncio.Event()
    order: list[str] = []

    async def a_heals() -> None:
        async with a.heal_lock("c1", 0):
            order.append("a in")
            a_holds.set()
            await let_go.wait()
            order.append("a out")

    async def b_heals() -> None:
        await a_holds.wait()
        async with b.heal_lock("c1", 0):
            order.append("b in")

    async with asyncio.timeout(10), asyncio.TaskGroup() as tasks:
        tasks.create_task(a_heals())
        b_task = tasks.create_task(b_heals())
        await a_holds.wait()
        let_go.set()
        await b_task
    assert order == ["a in", "a out", "b in"]


async def test_lock_of_a_crashed_holder_expires(open_store: Any, redis_server: RedisServer) -> None:
    store: RedisSessionStore = await open_store(lock_ttl=0.3)
    client = Redis.from_url(redis_server.url)
    try:
        # A replica took the lock and died: its token is in Redis, with its TTL running.
        key = f"{store._prefix}heal-lock:c1:0"
        await client.set(key, "dead-replica", px=300)
        started = time.monotonic()
        async with asyncio.timeout(5), store.heal_lock("c1", 0):
            assert time.monotonic() - started >= 0.2
            # While we heal, our lock expires and another replica takes it: our release leaves it alone.
            await client.set(key, "other-replica", px=10_000)
        assert await client.get(key) == b"other-replica"
    finally:
        await client.aclose()


# --- Redis failures -------------------------------------------------------------------------------


async def test_redis_failures_become_store_unavailable_and_the_store_recovers(
    open_store: Any, redis_server: RedisServer
) -> None:
    store: RedisSessionStore = await open_store(cache_ttl=0)
    await store.create(record())
    await redis_server.stop()
    for operation in (
        store.get("c1"),
        store.create(record("c2")),
        store.put(record("c1")),
        store.delete("c1"),
        store.touch({"c1": 2000.0}),
        store.forget_idle(0.0),
        store.evict_oldest(1),
    ):
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable):
                await operation
    async with asyncio.timeout(10):
        with pytest.raises(StoreUnavailable):
            async with store.heal_lock("c1", 0):
                pass
    await redis_server.start()  # same port, data lost (no persistence here)
    assert await store.get("c1") is None
    await store.create(record("c3"))
    assert await store.get("c3", fresh=True) is not None


async def test_open_fails_fast_when_nobody_listens() -> None:
    store = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable, match="Redis open"):
                await store.open()
    finally:
        await store.close()


def test_memory_and_sqlite_users_never_import_redis(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from mcp_heal_proxy import cli\n"
        "from mcp_heal_proxy.front import app\n"
        "async def main():\n"
        "    for state in (':memory:', sys.argv[1]):\n"
        "        await (await app.open_store(state)).close()\n"
        "asyncio.run(main())\n"
        "assert not [m for m in sys.modules if m == 'redis' or m.startswith('redis.')], 'redis imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.db")], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


# --- two proxies, one Redis -----------------------------------------------------------------------


def answer_of(text: str, content_type: str, request_id: int) -> dict[str, Any]:
    """The JSON-RPC answer with this id from a JSON or SSE response body."""
    if content_type.startswith("text/event-stream"):
        payloads = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]
    else:
        payloads = [json.loads(text)]
    for payload in payloads:
        for item in payload if isinstance(payload, list) else [payload]:
            if isinstance(item, dict) and item.get("id") == request_id:
                return item
    raise AssertionError(f"no answer with id {request_id} in {text!r}")


async def echo(http: aiohttp.ClientSession, url: str, session_id: str, request_id: int, text: str) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }
    async with asyncio.timeout(20), http.post(url, json=body, headers=session_headers(session_id)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Mcp-Session-Id"] == session_id
        return answer_of(await response.text(), response.headers.get("Content-Type", ""), request_id)


def echoed(answer: dict[str, Any]) -> str:
    text: str = answer["result"]["content"][0]["text"]
    return text


async def test_a_session_opened_through_one_proxy_works_through_another(
    redis_server: RedisServer, upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    a = await start_proxy(upstream.url, state=redis_server.url)
    b = await start_proxy(upstream.url, state=redis_server.url)
    async with aiohttp.ClientSession() as http:
        session_id = await raw_initialize(http, a.url)
        assert echoed(await echo(http, b.url, session_id, 2, "via b")) == "via b"
        assert echoed(await echo(http, a.url, session_id, 3, "via a")) == "via a"
    assert await a.record(session_id) == await b.record(session_id)
    assert (await upstream.stats())["initialize"] == 1


async def test_two_proxies_heal_a_shared_session_with_one_initialize(
    redis_server: RedisServer, upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    a = await start_proxy(upstream.url, state=redis_server.url)
    b = await start_proxy(upstream.url, state=redis_server.url)
    async with aiohttp.ClientSession() as http:
        session_id = await raw_initialize(http, a.url)
        # Both replicas have the record cached: each will find the upstream session dead on its own.
        assert echoed(await echo(http, a.url, session_id, 2, "warm a")) == "warm a"
        assert echoed(await echo(http, b.url, session_id, 3, "warm b")) == "warm b"
        before = await a.record(session_id)
        assert before is not None
        await upstream.restart()
        calls = [echo(http, (a.url, b.url)[i % 2], session_id, 100 + i, f"call {i}") for i in range(20)]
        answers = await asyncio.gather(*calls)
    assert [echoed(answer) for answer in answers] == [f"call {i}" for i in range(20)]
    stats = await upstream.stats()
    assert stats["initialize"] == 1, "one re-initialize for both replicas"
    assert stats["tools_call"] >= 20
    after = await fresh_record(b, session_id)
    assert after.generation == before.generation + 1
    assert after.upstream_session_id != before.upstream_session_id


async def fresh_record(proxy: RunningProxy, session_id: str) -> SessionRecord:
    found = await proxy.app[STORE_KEY].get(session_id, fresh=True)
    assert isinstance(found, SessionRecord)
    return found


@pytest.fixture
async def persistent_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server that keeps its data across a stop and start (append-only file, fsync always)."""
    server = RedisServer(tmp_path, persist=True)
    await server.start()
    yield server
    await server.stop()


async def test_redis_down_gives_503_with_the_request_id_and_the_proxy_recovers(
    persistent_redis: RedisServer, sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    redis = persistent_redis
    a = await start_proxy(sse_upstream.url, state=redis.url)
    b = await start_proxy(sse_upstream.url, state=redis.url)
    async with aiohttp.ClientSession() as http:
        # Opened through b: a has never cached it, so a must ask Redis.
        session_id = await raw_initialize(http, b.url)
        await redis.stop()
        call = {"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
        async with (
            asyncio.timeout(10),
            http.post(a.url, json=call, headers=session_headers(session_id)) as response,
        ):
            assert response.status == 503
            answer = await response.json()
        assert answer["id"] == 42
        assert answer["error"]["code"] == -32005
        assert "session store unavailable" in answer["error"]["message"]
        initialize = {"jsonrpc": "2.0", "id": "init-1", "method": "initialize", "params": INITIALIZE_PARAMS}
        async with asyncio.timeout(10), http.post(a.url, json=initialize, headers=MCP_HEADERS) as response:
            assert response.status == 503
            assert (await response.json())["id"] == "init-1"
            assert "Mcp-Session-Id" not in response.headers, "no session id without a stored mapping"

        await redis.start()  # same port and data directory: the mapping is back
        assert echoed(await echo(http, a.url, session_id, 43, "back")) == "back"
        new_session = await raw_initialize(http, a.url)
        assert echoed(await echo(http, b.url, new_session, 44, "new")) == "new"


async def test_idle_sessions_of_a_shared_store_are_ended_upstream_only_by_a_proxy_that_serves_them(
    redis_server: RedisServer, sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    # Both proxies front the same server, but b calls its upstream "other": a does not know how to reach it
    # (in real life another URL, headers or login), so it forgets b's idle session without a DELETE.
    a = await start_proxy(sse_upstream.url, state=redis_server.url, session_idle_ttl=1.0)
    b = await start_proxy(sse_upstream.url, state=redis_server.url, name="other")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        mine = await raw_initialize(http, a.url)
        theirs = await raw_initialize(http, b.url)
    theirs_upstream = (await fresh_record(b, theirs)).upstream_session_id
    assert len(await sse_upstream.live_sessions()) == 2

    async def both_forgotten() -> bool:
        store = a.app[STORE_KEY]
        return await store.get(mine, fresh=True) is None and await store.get(theirs, fresh=True) is None

    await wait_until(both_forgotten, 15, "a's housekeeping forgot both idle sessions")

    async def only_theirs_live() -> bool:
        return await sse_upstream.live_sessions() == [theirs_upstream]

    await wait_until(only_theirs_live, 10, "a ended its own session upstream")


async def test_evicting_no_session_evicts_none(open_store: Any) -> None:
    store: RedisSessionStore = await open_store()
    await store.create(record("kept", last_used=1000.0))
    assert await store.evict_oldest(0) == []
    assert await store.get("kept", fresh=True) is not None
