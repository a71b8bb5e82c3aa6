"""The durable session store: SQLite in WAL mode, on a thread of its own so the event loop never waits on disk.

All records are loaded once at startup and served from memory; every change is committed to the file
before the call returns (write-through). So a ``put`` made before the client sees its session id
survives ``kill -9``, and reads on the hot path cost a dict lookup. One proxy process owns a file;
replicas share state through the Redis store instead.

Because the cache is the truth, a second proxy on the same file would serve sessions the first never
sees (a session made on one gets 404 on the other). So the file is locked while a store has it open
(``flock`` on ``<file>.lock``, released by the kernel when the process dies, even by ``kill -9``), and a
second proxy refuses to start with one line that says so and points to Redis. Platforms without
``flock`` (Windows) skip the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import IO, Final, TypeVar

from mcp_heal_proxy.errors import StoreUnavailable

try:
    import fcntl
except ImportError:  # Windows: no flock, no check
    fcntl = None  # type: ignore[assignment]
from mcp_heal_proxy.store.records import (
    RecordChange,
    SessionRecord,
    least_recently_used,
    record_from_json,
    record_to_json,
    refuses_write,
)

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sessions (
    client_session_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    last_used REAL NOT NULL
)
"""


class SQLiteSessionStore:
    """Records in a SQLite file, cached in memory."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        # How long a write waits for another connection's lock before failing as StoreUnavailable.
        self._busy_timeout = busy_timeout
        # One thread: sqlite3 connections belong to the thread that uses them, and one writer at a
        # time is all SQLite allows anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._connection: sqlite3.Connection | None = None
        self._records: dict[str, SessionRecord] = {}
        # Held while open: this process owns the file (see the module docstring).
        self._owner_lock: IO[str] | None = None

    async def open(self) -> None:
        """Create or open the file and load every record."""
        records = await self._run(self._open_sync)
        self._records = {record.client_session_id: record for record in records}

    def _open_sync(self) -> list[SessionRecord]:
        directory = Path(self.path).parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_ownership()
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout)
        except BaseException:
            self._release_ownership()
            raise
        with contextlib.suppress(OSError):
            # Records hold clients' initialize parameters: readable by this user only.
            os.chmod(self.path, 0o600)
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, not only a killed process. Commits are rare (a new
        # session, a heal, a batch of last-used times), so the fsync is affordable.
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(_SCHEMA)
        self._connection = connection
        rows = connection.execute("SELECT record, last_used FROM sessions").fetchall()
        return [replace(record_from_json(text), last_used=last_used) for text, last_used in rows]

    def _take_ownership(self) -> None:
        """Lock ``<file>.lock``, or refuse: another proxy (a live process) has this file open."""
        if fcntl is None or self._owner_lock is not None:
            return
        lock = open(f"{self.path}.lock", "a+", encoding="utf-8")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise StoreUnavailable(
                f"another proxy{f' (pid {holder})' if holder.isdigit() else ''} is using this SQLite file, "
                "and two proxies on one file would not see each other's sessions: give this one its own "
                '--state file, or share sessions between proxies with state = "redis://HOST:6379/0"'
            ) from None
        except BaseException:
            lock.close()
            raise
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._owner_lock = lock

    def _release_ownership(self) -> None:
        if self._owner_lock is not None:
            lock, self._owner_lock = self._owner_lock, None
            lock.close()  # closing the descriptor releases the flock

    async def _run(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"session store failed: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"session store failed: {exc.strerror or exc}") from exc

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StoreUnavailable("session store is not open")
        return self._connection

    async def get(self, client_session_id: str, *, fresh: bool = False) -> SessionRecord | None:
        """See SessionStore.get (this process is the only writer, so the cache is always fresh)."""
        return self._records.get(client_session_id)

    async def create(self, record: SessionRecord) -> None:
        """See SessionStore.create: committed to the file before it returns."""
        text = record_to_json(record)
        await self._run(
            lambda: self._db().execute(
                "INSERT INTO sessions (client_session_id, record, last_used) VALUES (?, ?, ?)",
                (record.client_session_id, text, record.last_used),
            )
        )
        self._records[record.client_session_id] = record

    async def put(self, record: SessionRecord) -> SessionRecord | None:
        """See SessionStore.put: committed to the file before it returns.

        The cache is the truth (this process is the only writer) and the file's writes run in order on
        one thread. The rule is checked before the write and again after it: a delete or a newer write
        that came in while this one was on its way has already been queued behind it, so this write must
        not then reappear in the cache.
        """
        cid = record.client_session_id
        stored = self._records.get(cid)
        if refuses_write(stored.generation if stored is not None else None, record):
            return stored
        text = record_to_json(record)
        await self._run(
            lambda: self._db().execute(
                "UPDATE sessions SET record = ?, last_used = max(last_used, ?) WHERE client_session_id = ?",
                (text, record.last_used, cid),
            )
        )
        stored = self._records.get(cid)
        if refuses_write(stored.generation if stored is not None else None, record):
            return stored
        self._records[cid] = record
        return record

    async def apply(self, client_session_id: str, change: RecordChange) -> SessionRecord | None:
        """See SessionStore.apply: read, change and write in one transaction (BEGIN IMMEDIATE takes the
        write lock first, so no other writer, in this process or another, lands in between)."""

        def write() -> SessionRecord | None:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT record, last_used FROM sessions WHERE client_session_id = ?", (client_session_id,)
                ).fetchone()
                updated: SessionRecord | None = None
                if row is not None:
                    stored = replace(record_from_json(row[0]), last_used=row[1])
                    updated = change(stored)
                    if updated is not stored:
                        db.execute(
                            "UPDATE sessions SET record = ? WHERE client_session_id = ?",
                            (record_to_json(updated), client_session_id),
                        )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            return updated

        updated = await self._run(write)
        # The file's writes run in order on one thread, so a later write's own cache update comes after
        # this one; only a delete clears the cache before its write, and it must stay cleared.
        if updated is None or client_session_id not in self._records:
            return None
        self._records[client_session_id] = updated
        return updated

    async def delete(self, client_session_id: str) -> None:
        """See SessionStore.delete."""
        self._records.pop(client_session_id, None)
        await self._run(
            lambda: self._db().execute("DELETE FROM sessions WHERE client_session_id = ?", (client_session_id,))
        )

    async def touch(self, last_used: Mapping[str, float]) -> None:
        """See SessionStore.touch: one transaction for the whole batch."""
        rows = [(when, cid) for cid, when in last_used.items() if cid in self._records]
        if not rows:
            return

        def write() -> None:
            db = self._db()
            db.execute("BEGIN")
            db.executemany("UPDATE sessions SET last_used = max(last_used, ?) WHERE client_session_id = ?", rows)
            db.execute("COMMIT")

        await self._run(write)
        for when, cid in rows:
            record = self._records.get(cid)
            if record is not None and when > record.last_used:
                self._records[cid] = replace(record, last_used=when)

    async def forget_idle(self, unused_since: float) -> list[SessionRecord]:
        """See SessionStore.forget_idle."""
        return await self._forget([cid for cid, record in self._records.items() if record.last_used < unused_since])

    async def evict_oldest(self, count: int) -> list[SessionRecord]:
        """See SessionStore.evict_oldest."""
        return await self._forget(least_recently_used(self._records.values(), count))

    async def _forget(self, idle: list[str]) -> list[SessionRecord]:
        if not idle:
            return []

        def write() -> None:
            db = self._db()
            db.execute("BEGIN")
            db.executemany("DELETE FROM sessions WHERE client_session_id = ?", [(cid,) for cid in idle])
            db.execute("COMMIT")

        await self._run(write)
        # Taken from the cache after the write: a heal that landed meanwhile left the newer upstream
        # session in it, and that is the one to end.
        forgotten = (self._records.pop(cid, None) for cid in idle)
        return [record for record in forgotten if record is not None]

    def heal_lock(self, client_session_id: str, generation: int) -> AbstractAsyncContextManager[None]:
        """One process owns the file: the Healer's own single-flight is enough."""
        return contextlib.nullcontext()

    def records(self) -> list[SessionRecord]:
        """Every record (the status page lists them)."""
        return list(self._records.values())

    async def close(self) -> None:
        """Close the file (every change is already committed)."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await asyncio.get_running_loop().run_in_executor(self._executor, connection.close)
        self._executor.shutdown(wait=True)
        self._release_ownership()

    def __len__(self) -> int:
        return len(self._records)
