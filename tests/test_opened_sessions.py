"""Every path that refuses an upstream session the proxy opened ends it (a DELETE), rather than leave it
to the upstream's idle timeout: an initialize answered with garbage, a heal that fails or times out after
the new session opened."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from mcp_heal_proxy.errors import StoreUnavailable
from mcp_heal_proxy.front.app import STORE_KEY
from mcp_heal_proxy.store.records import Heal, RecordChange, SessionRecord
from tests.conftest import (
    MCP_HEADERS,
    ProxyFactory,
    RunningProxy,
    echo_call,
    post_on_session,
    raw_initialize,
    wait_until,
)
from tests.fake_upstream import FakeUpstream

AiohttpServer = Callable[..., Any]


async def test_an_initialize_answered_with_an_html_page_ends_the_session_it_opened(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    deleted: list[str | None] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            deleted.append(request.headers.get("Mcp-Session-Id"))
            return web.Response(status=200)
        # A captive portal or a misrouted balancer: 200, a session id, and a page.
        return web.Response(
            status=200, text="<html>sign in</html>", content_type="text/html", headers={"Mcp-Session-Id": "html-1"}
        )

    app = web.Application()
    app.router.add_route("*", "/mcp", handle)
    server: TestServer = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")))
    body = {"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 502
        answer = await response.json()
        assert "Mcp-Session-Id" not in response.headers
    assert answer["id"] == 7
    assert "text/html" in answer["error"]["message"]

    async def ended() -> bool:
        return deleted == ["html-1"]

    await wait_until(ended, 5, "the upstream session the refused initialize opened was ended")


# --- the heal: one deadline for all of it, and every failure ends what it opened and is reported -------


async def heals_counted(http: aiohttp.ClientSession, proxy: RunningProxy, outcome: str) -> float:
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        text = await response.text()
    prefix = f'mcp_heal_proxy_heals_total{{outcome="{outcome}",reason="http_404",upstream="default"}} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


async def test_a_store_failure_after_the_reinitialize_ends_the_new_session_and_is_reported(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    store = proxy.app[STORE_KEY]
    working_apply = store.apply

    async def apply(client_session_id: str, change: RecordChange) -> SessionRecord | None:
        if isinstance(change, Heal):
            raise StoreUnavailable("session store failed: disk full")
        return await working_apply(client_session_id, change)

    monkeypatch.setattr(store, "apply", apply)
    upstream.forget_all()
    with capture_logs() as logs:
        status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(5))
    assert (status, answer["id"], answer["error"]["code"]) == (503, 5, -32005)
    (failed,) = [entry for entry in logs if entry["event"] == "session.heal_failed"]
    assert failed["error"] == "session store failed: disk full"
    assert await heals_counted(http, proxy, "failed") == 1

    async def ended() -> bool:
        return [seen.headers.get("Mcp-Session-Id") for seen in upstream.seen if seen.method == "DELETE"] == [
            "upstream-2"
        ]

    await wait_until(ended, 5, "the upstream session the failed heal opened was ended")
    assert upstream.sessions == set()


async def hang(*args: Any, **kwargs: Any) -> Any:
    await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def lock_never_free(client_session_id: str, generation: int) -> AsyncIterator[None]:
    await asyncio.Event().wait()  # another replica holds the heal lock and never lets go
    yield


@pytest.mark.parametrize("stuck", ["heal_lock", "store_read", "store_write"])
async def test_the_whole_heal_is_bounded_by_heal_timeout(
    fake: tuple[FakeUpstream, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    stuck: str,
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, heal_timeout=0.5)
    session_id = await raw_initialize(http, proxy.url)
    store = proxy.app[STORE_KEY]
    if stuck == "heal_lock":
        monkeypatch.setattr(store, "heal_lock", lock_never_free)
    elif stuck == "store_read":
        working_get = store.get

        async def get(client_session_id: str, *, fresh: bool = False) -> SessionRecord | None:
            if fresh:
                await hang()
            return await working_get(client_session_id)

        monkeypatch.setattr(store, "get", get)
    else:
        monkeypatch.setattr(store, "apply", hang)
    upstream.forget_all()
    started = time.monotonic()
    with capture_logs() as logs:
        status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(6))
    assert time.monotonic() - started < 3.0, "the heal waited past heal_timeout"
    assert (status, answer["id"]) == (504, 6)
    assert answer["error"]["message"].startswith("the heal timed out")
    assert [entry["event"] for entry in logs if entry["event"] == "session.heal_failed"] == ["session.heal_failed"]
    assert await heals_counted(http, proxy, "failed") == 1
    if stuck == "store_write":

        async def ended() -> bool:
            return upstream.sessions == set()

        await wait_until(ended, 5, "the upstream session the timed-out heal opened was ended")
