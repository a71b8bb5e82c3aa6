"""The durable SQLite store: the store contract, and sessions that survive a proxy restart or kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from mcp_heal_proxy.errors import StoreUnavailable
from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.store.sqlite import SQLiteSessionStore
from tests.conftest import UpstreamProcess, raw_initialize, session_headers, start_serve


def record(client_session_id: str = "c1", **changes: object) -> SessionRecord:
    base = SessionRecord(client_session_id, "u1", {"protocolVersion": "2025-11-25", "clientInfo": {"name": "t"}})
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteSessionStore]:
    opened = SQLiteSessionStore(str(tmp_path / "state" / "sessions.db"))
    await opened.open()
    yield opened
    await opened.close()


async def test_records_round_trip_through_the_file(tmp_path: Path, store: SQLiteSessionStore) -> None:
    written = record(subscriptions=frozenset({"file:///a"}), log_level="debug", protocol_version="2025-11-25")
    await store.create(written)
    await store.close()
    reopened = SQLiteSessionStore(store.path)
    await reopened.open()
    try:
        assert await reopened.get("c1") == written
        assert len(reopened) == 1
    finally:
        await reopened.close()


async def test_the_file_is_private_and_in_wal_mode(store: SQLiteSessionStore) -> None:
    await store.create(record())
    assert os.stat(store.path).st_mode & 0o077 == 0
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_delete_touch_and_idle_expiry(store: SQLiteSessionStore) -> None:
    now = time.time()
    await store.create(record("old", last_used=now - 100))
    await store.create(record("new", last_used=now - 100))
    await store.touch({"new": now, "unknown": now})
    assert [r.client_session_id for r in await store.forget_idle(now - 50)] == ["old"]
    assert await store.get("old") is None
    assert (await store.get("new")) is not None
    await store.delete("new")
    await store.delete("new")
    assert len(store) == 0


async def test_a_locked_database_gives_store_unavailable_then_recovers(tmp_path: Path) -> None:
    store = SQLiteSessionStore(str(tmp_path / "sessions.db"), busy_timeout=0.1)
    await store.open()
    try:
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another writer holds the file, as a stuck process would
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.create(record("c2"))
        assert await store.get("c2") is None, "a failed write must not show up in the cache"
        other.execute("ROLLBACK")
        other.close()
        await store.create(record("c2"))
        assert await store.get("c2") is not None
    finally:
        await store.close()


async def call_echo(http: aiohttp.ClientSession, url: str, session_id: str, text: str) -> int:
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}}
    async with http.post(url, json=body, headers=session_headers(session_id)) as response:
        assert text in await response.text()
        return response.status


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_sessions_survive_a_proxy_restart(tmp_path: Path, sse_upstream: UpstreamProcess, how: str) -> None:
    state = tmp_path / "sessions.db"
    process, url = await start_serve("--upstream", sse_upstream.url, "--port", "0", "--state", str(state))
    try:
        async with aiohttp.ClientSession() as http:
            session_id = await raw_initialize(http, url)
            os.kill(process.pid, getattr(signal, how))
            async with asyncio.timeout(20):
                await process.wait()
            process, url = await start_serve("--upstream", sse_upstream.url, "--port", "0", "--state", str(state))
            # The old upstream session is still alive: the call goes straight to it, no heal.
            assert await call_echo(http, url, session_id, "after proxy restart") == 200
            assert (await sse_upstream.stats())["initialize"] == 1
            # And when the upstream restarts too, the restored session heals as usual.
            await sse_upstream.restart()
            assert await call_echo(http, url, session_id, "after both restarted") == 200
            assert (await sse_upstream.stats())["initialize"] == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = str(tmp_path / "sessions.db")
    first = SQLiteSessionStore(path)
    await first.open()
    second = SQLiteSessionStore(path)
    try:
        with pytest.raises(StoreUnavailable, match=f"another proxy \\(pid {os.getpid()}\\) is using this SQLite file"):
            await second.open()
    finally:
        await first.close()
    await second.open()  # the first let go: the file is free
    await second.close()


async def test_a_second_proxy_on_the_same_file_refuses_to_start_and_points_to_redis(
    tmp_path: Path, sse_upstream: UpstreamProcess
) -> None:
    state = str(tmp_path / "sessions.db")
    process, _ = await start_serve("--upstream", sse_upstream.url, "--port", "0", "--state", state)
    second: asyncio.subprocess.Process | None = None
    try:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcp_heal_proxy", "serve", "--upstream", sse_upstream.url, "--port", "0",
            "--state", state, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(20):
            stdout, stderr = await second.communicate()
        assert second.returncode == 2
        assert stdout == b""
        [line] = stderr.decode().strip().splitlines()
        assert f"another proxy (pid {process.pid}) is using this SQLite file" in line
        assert "redis://" in line
    finally:
        for started in (process, second):
            if started is not None and started.returncode is None:
                started.kill()
                await started.wait()
