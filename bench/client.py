"""Measurements made from Python: session setup, SSE per-event delay, heal time, store writes.

The client code is the same on every path (direct, nginx, proxy), so its own cost cancels out of the
differences the table reports.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import aiohttp

PROTOCOL = "2025-06-18"
SESSION_HEADER = "Mcp-Session-Id"
BASE_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": PROTOCOL,
}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def _call(tool: str, arguments: dict[str, object], request_id: int = 1) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments, "_meta": {"progressToken": request_id}},
    }


async def _post(http: aiohttp.ClientSession, url: str, message: object, session: str | None = None) -> tuple[int, str]:
    headers = dict(BASE_HEADERS)
    if session is not None:
        headers[SESSION_HEADER] = session
    async with http.post(url, data=json.dumps(message), headers=headers) as response:
        await response.read()
        return response.status, response.headers.get(SESSION_HEADER, "")


async def open_session(http: aiohttp.ClientSession, url: str) -> str:
    """initialize + notifications/initialized; the session id the path handed out."""
    status, session = await _post(http, url, INITIALIZE)
    if status != 200 or not session:
        raise RuntimeError(f"initialize through {url} answered {status} without a session id")
    status, _ = await _post(http, url, INITIALIZED, session)
    if status != 202:
        raise RuntimeError(f"notifications/initialized through {url} answered {status}")
    return session


def new_session(url: str) -> str:
    async def go() -> str:
        async with aiohttp.ClientSession() as http:
            return await open_session(http, url)

    return asyncio.run(go())


# --- SSE per-event delay -------------------------------------------------------------------------


async def _sse_delays(url: str, calls: int, events: int, interval_ms: float) -> list[float]:
    """Arrival time minus the upstream's send timestamp (both CLOCK_MONOTONIC), per event, in ms."""
    delays: list[float] = []
    async with aiohttp.ClientSession() as http:
        session = await open_session(http, url)
        headers = {**BASE_HEADERS, SESSION_HEADER: session}
        for i in range(calls + 1):
            body = json.dumps(_call("stream", {"events": events, "interval_ms": interval_ms}, i + 1))
            buffer = b""
            got: list[float] = []
            async with http.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"stream tool through {url} answered {response.status}")
                async for chunk in response.content.iter_any():
                    arrived = time.monotonic_ns()
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if line.startswith(b"data: "):
                                message = json.loads(line[6:])
                                sent = (message.get("params") or {}).get("sentNs")
                                if sent is not None:
                                    got.append((arrived - sent) / 1e6)
            if len(got) != events:
                raise RuntimeError(f"stream tool through {url}: {len(got)} of {events} events arrived")
            if i:  # the first call warms the path up
                delays.extend(got)
    return delays


def sse_delays(url: str, calls: int, events: int, interval_ms: float) -> list[float]:
    return asyncio.run(_sse_delays(url, calls, events, interval_ms))


# --- heal ----------------------------------------------------------------------------------------


@dataclass
class HealResult:
    normal_ms: float  # median of a normal tools/call
    after_expiry_ms: float  # median of the first call after the upstream forgot every session
    healed: bool  # the proxy healed (True) or the client re-initialized by hand (False)


async def _heal(url: str, expire_url: str, rounds: int, *, proxy: bool) -> HealResult:
    """Per round: time a normal call, make the upstream forget all sessions, time the first call after.

    Through the proxy that first call is healed by the proxy. Direct and through nginx nothing heals, so
    the figure there is what a client would do by hand: initialize + notifications/initialized + call
    (the sequence the proxy runs for it: its limit is these same two extra round trips).
    """
    normal: list[float] = []
    after: list[float] = []
    call = _call("echo", {"text": "hello"})
    async with aiohttp.ClientSession() as http:
        session = await open_session(http, url)
        for _ in range(3):  # warm-up
            await _post(http, url, call, session)
        for _ in range(rounds):
            started = time.perf_counter()
            status, _ = await _post(http, url, call, session)
            normal.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise RuntimeError(f"normal call through {url} answered {status}")
            async with http.post(expire_url) as response:
                await response.read()
            started = time.perf_counter()
            if proxy:
                status, _ = await _post(http, url, call, session)
            else:
                session = await open_session(http, url)
                status, _ = await _post(http, url, call, session)
            after.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise RuntimeError(f"first call after expiry through {url} answered {status}")
            await asyncio.sleep(0.01)
    return HealResult(statistics.median(normal), statistics.median(after), healed=proxy)


def heal(url: str, expire_url: str, rounds: int, *, proxy: bool) -> HealResult:
    return asyncio.run(_heal(url, expire_url, rounds, proxy=proxy))


# --- store write cost ----------------------------------------------------------------------------


def store_put_us(state: str, count: int) -> float:
    """Mean cost of one SessionStore.create (what each new session writes), in microseconds.

    ``state`` is what ``--state`` takes: ":memory:", a SQLite file path, or a redis:// URL. The store is
    opened the way the proxy opens it (mcp_heal_proxy.front.app.open_store); puts run one after another.
    """
    from mcp_heal_proxy.front.app import open_store
    from mcp_heal_proxy.store.records import SessionRecord, new_client_session_id

    async def go() -> float:
        store = await open_store(state)
        try:
            params = dict(INITIALIZE["params"])  # type: ignore[call-overload]
            records = [SessionRecord(new_client_session_id(), new_client_session_id(), params) for _ in range(count)]
            for record in records[:10]:  # warm-up
                await store.create(record)
            started = time.perf_counter()
            for record in records[10:]:
                await store.create(record)
            return (time.perf_counter() - started) / (count - 10) * 1e6
        finally:
            await store.close()

    return asyncio.run(go())
