"""The event feed behind the status page and ``tail``: bounded rings, health, and subscribers that can
fall behind without slowing the proxy."""

from __future__ import annotations

import asyncio

from mcp_heal_proxy.events import EventFeed, entry_json, percentile
from mcp_heal_proxy.wire import jsonrpc


def test_the_request_ring_keeps_the_newest_and_shows_them_newest_first() -> None:
    feed = EventFeed(requests=3)
    for n in range(5):
        feed.request("default", "tools/call", f"tool{n}", 200, 0.001 * n, False, "0123456789abcdef")
    shown = feed.requests()
    assert [r["tool"] for r in shown] == ["tool4", "tool3", "tool2"]
    assert shown[0]["session"] == "01234567", "session ids are cut to 8 characters"
    assert shown[0]["duration_ms"] == 4.0
    assert feed.last_seq == 5


def test_health_tracks_success_failure_and_latency_without_get_streams() -> None:
    feed = EventFeed(latency_window=4)
    feed.request("a", "tools/call", "echo", 200, 0.010, False, None)
    feed.request("a", "GET", None, 200, 120.0, False, "s")  # a stream's lifetime is no latency
    feed.request("a", "tools/call", "echo", 502, 0.030, False, "s")
    (health,) = feed.upstreams(["a"])
    assert health["requests"] == 3
    assert health["last_failure"]["status"] == 502
    assert health["last_failure"]["why"] == "answered HTTP 502 to tools/call"
    assert health["latency"] == {"window": 2, "p50_ms": 10.0, "p90_ms": 30.0, "p99_ms": 30.0}
    assert feed.upstreams(["b"])[0]["last_success"] is None, "an upstream without traffic is listed too"


def test_a_failed_heal_is_the_upstreams_last_failure_with_its_reason() -> None:
    feed = EventFeed()
    feed.heal("a", "0123456789", 0, "http_404", 0.5, "failed", {"error": "upstream answered 500 to the re-initialize"})
    feed.heal("a", "abcdefabcdef", 2, "http_404", 0.02, "healed", {"new_generation": 3})
    failed, healed = reversed(feed.heals())
    assert failed["outcome"] == "failed"
    assert failed["session"] == "01234567"
    assert failed["generation"] == 0
    assert healed["generation"] == 3
    assert healed["error"] is None
    (health,) = feed.upstreams(["a"])
    assert health["heals"] == {"healed": 1, "failed": 1}
    assert health["last_failure"]["why"] == "heal failed: upstream answered 500 to the re-initialize"


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(n) for n in range(1, 101)]
    assert percentile(ordered, 0.5) == 50.0
    assert percentile(ordered, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0


async def test_a_slow_subscriber_loses_events_and_is_told_how_many() -> None:
    feed = EventFeed(backlog=3)
    slow = feed.subscribe()
    assert slow is not None
    for _n in range(10):
        feed.request("a", "ping", None, 200, 0.001, False, None)
    assert slow.dropped == 7
    batch = await slow.next_batch(1.0)
    assert [entry_json(entry)["seq"] for entry in batch] == [1, 2, 3]
    assert await slow.next_batch(0.01) == [], "an idle wait ends empty after its time"


async def test_closing_subscribers_wakes_their_readers_at_once() -> None:
    feed = EventFeed()
    subscription = feed.subscribe()
    assert subscription is not None
    reader = asyncio.get_running_loop().create_future()

    async def read() -> None:
        reader.set_result(await subscription.next_batch(60.0))

    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        group.create_task(read())
        await asyncio.sleep(0)
        feed.close_subscribers()
    assert reader.result() == []
    assert subscription.closed
    feed.unsubscribe(subscription)
    assert feed.subscriber_count == 0


def test_subscribers_are_bounded() -> None:
    feed = EventFeed()
    taken = [feed.subscribe() for _ in range(64)]
    assert all(taken)
    assert feed.subscribe() is None


def test_tool_name_is_read_from_a_single_tools_call_only() -> None:
    call = jsonrpc.parse_post_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}')
    assert call.tool_name == "echo"
    listing = jsonrpc.parse_post_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"name":"x"}}')
    assert listing.tool_name is None
    odd = jsonrpc.parse_post_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}')
    assert odd.tool_name is None
    batch = jsonrpc.parse_post_body(b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}]')
    assert batch.tool_name is None
