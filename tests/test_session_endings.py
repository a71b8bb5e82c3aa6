"""Client sessions the proxy forgets on its own (idle expiry, max_sessions, the status page's forget) have
their upstream sessions ended with a bounded, best-effort DELETE, in the background, a few at a time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from mcp_heal_proxy.config import single_upstream
from mcp_heal_proxy.engine import housekeeping
from mcp_heal_proxy.engine.endings import MAX_CONCURRENT, SessionEndings, UpstreamEnding
from mcp_heal_proxy.front.app import build_app, heal_lock_ttl
from mcp_heal_proxy.observability import Metrics
from mcp_heal_proxy.status import ENDINGS_KEY
from mcp_heal_proxy.store.records import SessionRecord
from tests.conftest import (
    TEST_CLIENT,
    ProxyFactory,
    RunningProxy,
    UpstreamProcess,
    echo_call,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream, hang_forever

ENDED = "mcp_heal_proxy_upstream_sessions_ended_total"


async def ended_count(http: aiohttp.ClientSession, proxy: RunningProxy, reason: str, outcome: str) -> float:
    """The proxy's counter of upstream sessions ended for ``reason`` with ``outcome`` (0 when absent)."""
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        text = await response.text()
    prefix = f'{ENDED}{{outcome="{outcome}",reason="{reason}",upstream="default"}} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


async def upstream_session_of(proxy: RunningProxy, client_session_id: str) -> str:
    record = await proxy.record(client_session_id)
    assert record is not None
    return record.upstream_session_id


# --- against the real SDK server ---------------------------------------------------------------------


async def test_a_session_forgotten_for_idleness_is_ended_upstream(
    upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    # The SDK server here has no idle timeout of its own: without the DELETE, its session lives forever.
    proxy = await start_proxy(upstream.url, session_idle_ttl=1.0)
    session_id = await raw_initialize(http, proxy.url)
    assert await upstream.live_sessions() == [await upstream_session_of(proxy, session_id)]

    async def ended_upstream() -> bool:
        return await upstream.live_sessions() == []

    await wait_until(ended_upstream, 15, "the idle session's upstream session was ended")
    assert await proxy.record(session_id) is None
    assert await ended_count(http, proxy, "idle", "ended") == 1


async def test_the_session_evicted_for_max_sessions_is_ended_upstream(
    upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(upstream.url, max_sessions=2)
    first = await raw_initialize(http, proxy.url)
    evicted = await upstream_session_of(proxy, first)
    second = await raw_initialize(http, proxy.url)
    third = await raw_initialize(http, proxy.url)
    kept = {await upstream_session_of(proxy, second), await upstream_session_of(proxy, third)}
    assert await proxy.record(first) is None

    async def only_the_kept_live() -> bool:
        return set(await upstream.live_sessions()) == kept

    await wait_until(only_the_kept_live, 10, f"the evicted upstream session {evicted} was ended")
    assert await ended_count(http, proxy, "evicted", "ended") == 1


# --- bounds and failures, with the fault-injecting fake ---------------------------------------------------


async def test_a_mass_idle_expiry_ends_a_few_upstream_sessions_at_a_time(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    in_flight = 0
    most = 0
    gate = asyncio.Event()

    async def slow_delete(request: web.Request, body: Any) -> web.StreamResponse | None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await gate.wait()
        finally:
            in_flight -= 1
        return None

    upstream.on_delete = slow_delete
    proxy = await start_proxy(url, session_idle_ttl=1.0, connect_timeout=10.0)
    for _ in range(10):
        await raw_initialize(http, proxy.url)
    endings = proxy.app[ENDINGS_KEY]
    await wait_until(lambda: in_flight == MAX_CONCURRENT, 10, "the first DELETEs under way")
    await wait_until(lambda: endings.pending() == 10, 10, "every idle session forgotten, its DELETE pending")
    # Housekeeping went on; the rest wait for a free slot rather than open ten connections.
    assert most == MAX_CONCURRENT
    gate.set()
    await wait_until(lambda: not upstream.sessions, 10, "every upstream session ended")
    assert most == MAX_CONCURRENT
    deletes = [seen for seen in upstream.seen if seen.method == "DELETE"]
    assert len(deletes) == 10
    # Each carries the session's negotiated version (required from 2025-06-18 on).
    assert {seen.headers.get("MCP-Protocol-Version") for seen in deletes} == {"2025-11-25"}
    await wait_until(lambda: endings.pending() == 0, 5, "the lanes emptied")


async def test_a_delete_the_upstream_refuses_or_never_answers_is_logged_and_counted_not_raised(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake

    async def refuse_or_hang(request: web.Request, body: Any) -> web.StreamResponse | None:
        if request.headers.get("Mcp-Session-Id") == "upstream-1":
            # Pass-through auth: the upstream wants the client's token, which nobody has at that moment.
            return web.json_response({"error": "invalid_token"}, status=401)
        return await hang_forever(request, body)

    upstream.on_delete = refuse_or_hang
    proxy = await start_proxy(url, session_idle_ttl=1.0, connect_timeout=1.0)
    with capture_logs() as logs:
        first = await raw_initialize(http, proxy.url)
        await raw_initialize(http, proxy.url)

        async def both_counted() -> bool:
            return (
                await ended_count(http, proxy, "idle", "refused") == 1
                and await ended_count(http, proxy, "idle", "failed") == 1
            )

        await wait_until(both_counted, 10, "the refused and the unanswered DELETE counted")
    left = [entry for entry in logs if entry["event"] == "session.orphan_left_upstream"]
    assert sorted((entry["status"] is None, entry["log_level"]) for entry in left) == [(False, "info"), (True, "info")]
    assert {entry["client_session"] for entry in left} >= {first[:8]}
    # The proxy goes on serving: a new session works.
    assert await raw_initialize(http, proxy.url)


async def test_an_initialize_that_evicts_does_not_wait_for_the_evicted_sessions_delete(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    upstream.on_delete = hang_forever
    proxy = await start_proxy(url, max_sessions=1, connect_timeout=5.0)
    await raw_initialize(http, proxy.url)
    started = time.monotonic()
    await raw_initialize(http, proxy.url)
    assert time.monotonic() - started < 2.0, "the initialize waited on the evicted session's DELETE"
    await wait_until(lambda: upstream.count("initialize") == 2, 1, "both initializes reached the upstream")
    await wait_until(
        lambda: sum(1 for seen in upstream.seen if seen.method == "DELETE") == 1, 5, "the evicted session's DELETE"
    )


async def test_the_status_pages_forget_is_bounded_when_the_upstream_never_answers_the_delete(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    upstream.on_delete = hang_forever
    proxy = await start_proxy(url, connect_timeout=1.0)
    session_id = await raw_initialize(http, proxy.url)
    started = time.monotonic()
    async with http.delete(proxy.url.replace("/mcp", f"/_proxy/api/sessions/{session_id}")) as response:
        assert response.status == 200
        answer = await response.json()
    assert time.monotonic() - started < 5.0
    assert answer["record_deleted"] is True
    assert answer["upstream_ended"] is False
    assert answer["upstream_status"] is None
    assert "connect_timeout" in answer["upstream_error"]
    assert await proxy.record(session_id) is None
    assert await ended_count(http, proxy, "forgotten", "failed") == 1


async def test_shutdown_does_not_wait_for_a_delete_the_upstream_never_answers(
    fake: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    let_go = asyncio.Event()

    async def hang_until_let_go(request: web.Request, body: Any) -> web.StreamResponse | None:
        try:
            return await hang_forever(request, body)
        finally:
            let_go.set()  # the proxy closed the connection (aiohttp cancels the handler)

    upstream.on_delete = hang_until_let_go
    config = single_upstream(url, client=TEST_CLIENT, max_sessions=1, connect_timeout=30.0, shutdown_grace=0.0)
    server = TestServer(build_app(config), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        proxy_url = str(server.make_url("/mcp"))
        await raw_initialize(http, proxy_url)
        await raw_initialize(http, proxy_url)  # evicts the first: its DELETE hangs
        await wait_until(lambda: any(seen.method == "DELETE" for seen in upstream.seen), 5, "the DELETE under way")
    finally:
        started = time.monotonic()
        async with asyncio.timeout(10):
            await server.close()
    assert time.monotonic() - started < 5.0, "shutdown waited for the DELETE"
    # ... and did not leave it running past shutdown either.
    await wait_until(let_go.is_set, 5, "the DELETE's connection closed at shutdown")


# --- the queue, without a network ----------------------------------------------------------------------


def record(client_session_id: str, upstream: str = "default") -> SessionRecord:
    return SessionRecord(client_session_id, f"u-{client_session_id}", {}, upstream=upstream)


def counter(metrics: Metrics, reason: str, outcome: str, upstream: str = "default") -> float:
    labels = {"upstream": upstream, "reason": reason, "outcome": outcome}
    return metrics.registry.get_sample_value(ENDED, labels) or 0.0


async def test_beyond_the_queue_limit_endings_are_dropped_counted_and_logged() -> None:
    metrics = Metrics()
    endings = SessionEndings(metrics, concurrency=1, queue_limit=3)
    gate = asyncio.Event()
    ended: list[str] = []

    async def end(forgotten: SessionRecord, reason: str) -> UpstreamEnding:
        await gate.wait()
        ended.append(forgotten.client_session_id)
        return UpstreamEnding(status=200)

    endings.serve("default", end)
    try:
        with capture_logs() as logs:
            endings.end_later([record(f"c{index}") for index in range(10)], "idle")
        assert endings.pending() == 3, "no more than the queue limit waits"
        (dropped,) = [entry for entry in logs if entry["event"] == "session.orphan_left_upstream"]
        assert (dropped["count"], dropped["reason"]) == (7, "idle")
        gate.set()
        await wait_until(lambda: endings.pending() == 0, 5, "the queue drained")
        assert ended == ["c0", "c1", "c2"]
        assert (counter(metrics, "idle", "ended"), counter(metrics, "idle", "dropped")) == (3, 7)
    finally:
        await endings.close()


async def test_records_of_upstreams_this_proxy_does_not_serve_are_left_alone() -> None:
    metrics = Metrics()
    endings = SessionEndings(metrics)
    ended: list[str] = []

    async def end(forgotten: SessionRecord, reason: str) -> UpstreamEnding:
        ended.append(forgotten.client_session_id)
        return UpstreamEnding(status=404)

    endings.serve("default", end)
    try:
        # A Redis store shared with another proxy: its sessions of "elsewhere" idle out here too.
        endings.end_later([record("mine"), record("theirs", upstream="elsewhere")], "idle")
        await wait_until(lambda: endings.pending() == 0, 5, "the queue drained")
        assert ended == ["mine"]
        assert counter(metrics, "idle", "gone") == 1
        answer = await endings.end_now(record("theirs", upstream="elsewhere"), "forgotten")
        assert (answer.outcome, answer.error) == ("failed", "upstream elsewhere is not served by this proxy")
    finally:
        await endings.close()


async def test_closing_cancels_running_endings_and_drops_waiting_ones() -> None:
    endings = SessionEndings(Metrics(), concurrency=2)
    started = 0

    async def end(forgotten: SessionRecord, reason: str) -> UpstreamEnding:
        nonlocal started
        started += 1
        await asyncio.Event().wait()
        return UpstreamEnding(status=200)

    endings.serve("default", end)
    endings.end_later([record(f"c{index}") for index in range(5)], "evicted")
    await wait_until(lambda: started == 2, 5, "two endings under way")
    async with asyncio.timeout(5):
        await endings.close()
    assert (endings.pending(), started) == (0, 2)
    endings.end_later([record("late")], "idle")  # after shutdown: nothing starts
    assert endings.pending() == 0


async def test_the_status_pages_forget_removes_the_record_before_the_upstream_hears_the_delete(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Otherwise a request of the client between the two would be healed onto a new upstream session, which
    the record's deletion would then leave to nobody."""
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    records_at_delete: list[SessionRecord | None] = []

    async def look_at_the_record(request: web.Request, body: Any) -> web.StreamResponse | None:
        records_at_delete.append(await proxy.record(session_id))
        return None

    upstream.on_delete = look_at_the_record
    async with http.delete(proxy.url.replace("/mcp", f"/_proxy/api/sessions/{session_id}")) as response:
        assert response.status == 200
        assert (await response.json())["upstream_ended"] is True
    assert records_at_delete == [None]


async def test_eviction_writes_pending_last_use_marks_first_and_spares_a_session_just_used(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = fake
    proxy = await start_proxy(url, max_sessions=2)
    first = await raw_initialize(http, proxy.url)
    second = await raw_initialize(http, proxy.url)
    # The first session is used now: its mark waits for the next housekeeping round (a minute away).
    async with http.post(proxy.url, json=echo_call(1), headers=session_headers(first)) as response:
        assert response.status == 200
    await raw_initialize(http, proxy.url)  # one too many: the least recently used goes
    assert await proxy.record(first) is not None
    assert await proxy.record(second) is None


async def test_housekeeping_goes_on_after_a_round_that_failed_unforeseen(monkeypatch: Any) -> None:
    monkeypatch.setattr(housekeeping, "MIN_FLUSH_INTERVAL", 0.01)
    rounds: list[str] = []

    class FlakyStore:
        async def touch(self, marks: dict[str, float]) -> None:
            return None

        async def forget_idle(self, unused_since: float) -> list[SessionRecord]:
            rounds.append("round")
            if len(rounds) == 1:
                raise ValueError("a record this version cannot read")
            return []

    task = asyncio.ensure_future(housekeeping.run_housekeeping(FlakyStore(), housekeeping.SessionActivity(), 0.0))  # type: ignore[arg-type]  # noqa: TID251 (cancelled below)
    try:
        await wait_until(lambda: len(rounds) >= 3, 5, "rounds after the failed one")
    finally:
        task.cancel()


def test_the_heal_lock_outlives_the_longest_heal_timeout() -> None:
    config = single_upstream("http://127.0.0.1:1/mcp", heal_timeout=120.0)
    assert heal_lock_ttl(config) >= 120.0 + 5
    assert heal_lock_ttl(single_upstream("http://127.0.0.1:1/mcp")) >= 30.0
