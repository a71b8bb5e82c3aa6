"""Session state and sessions in use, against the official SDK server: state changes in flight together
all survive a heal (issue 26, item 1); sessions in use are never forgotten (item 2)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.conftest import ProxyFactory, UpstreamProcess, echo_call, raw_initialize, session_headers


def request(request_id: int, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def call(http: aiohttp.ClientSession, url: str, session_id: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST one request on a session: the status and its JSON-RPC answer (from a JSON or an SSE answer)."""
    async with http.post(url, data=json.dumps(body), headers=session_headers(session_id)) as response:
        raw = (await response.read()).decode()
        if response.content_type != "text/event-stream":
            return response.status, json.loads(raw) if raw else None
    for line in raw.splitlines():
        if line.startswith("data:") and line[5:].strip():
            message = json.loads(line[5:])
            if message.get("id") == body["id"]:
                return response.status, message
    return response.status, None


async def test_concurrent_state_changes_all_survive_a_heal(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    session_id = await raw_initialize(http, proxy.url)
    # In flight together (the server takes a moment to answer a subscribe), as clients subscribe at start.
    answers = await asyncio.gather(
        call(http, proxy.url, session_id, request(1, "resources/subscribe", uri="file:///a")),
        call(http, proxy.url, session_id, request(2, "resources/subscribe", uri="file:///b")),
        call(http, proxy.url, session_id, request(3, "logging/setLevel", level="debug")),
    )
    assert [(status, "result" in answer) for status, answer in answers] == [(200, True)] * 3, answers
    await sse_upstream.restart()  # every upstream session dies
    status, answer = await call(http, proxy.url, session_id, echo_call(4, "after"))
    assert status == 200
    assert answer["result"]["content"][0]["text"] == "after"
    stats = await sse_upstream.stats()
    [live] = stats["live_sessions"]
    given = stats["state"][live]
    assert sorted(given["subscriptions"]) == ["file:///a", "file:///b"]
    assert given["level"] == "debug"
