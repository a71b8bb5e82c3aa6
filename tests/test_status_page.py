"""The status page in a real browser: Debian's chromium driven by Playwright (never a downloaded browser).

The page must load without console errors, show the session an SDK client opened, and show a heal live
(no reload) after the upstream restarts. The screenshot it takes is the one in the README:
``MCP_HEAL_PROXY_SCREENSHOT=1 pytest tests/test_status_page.py`` refreshes docs/status-page.png.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mcp_heal_proxy.front.app import STORE_KEY
from mcp_heal_proxy.inventory import CachedStore
from tests.conftest import REPO_ROOT, ProxyFactory, UpstreamProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"
BROWSER_WAIT_MS = 15_000
HAVE_CHROMIUM = Path(CHROMIUM).exists()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's chromium under Playwright; skipped where it is missing, except in CI (.ci/run installs it)."""
    if not HAVE_CHROMIUM:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is not installed (CI=true: .ci/run installs it)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def agent_session(url: str, name: str = "example-agent", version: str = "1.4.0") -> AsyncIterator[ClientSession]:
    """The official SDK client, introducing itself as an agent would."""
    info = types.Implementation(name=name, version=version)
    async with (
        streamable_http_client(url) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream, client_info=info) as session,
    ):
        await session.initialize()
        yield session


@pytest.fixture
async def json_upstream() -> AsyncIterator[UpstreamProcess]:
    """The SDK server answering in JSON: the SDK client reads a JSON answer to its end, whereas it may
    hang up on an SSE answer as soon as it has its result, and a request cancelled that way is never
    recorded (a gap of the request path, not of the page), which would make this test racy."""
    server = UpstreamProcess(json_response=True)
    await server.start()
    yield server
    await server.stop()


async def test_page_shows_the_session_and_a_heal_live(
    json_upstream: UpstreamProcess, start_proxy: ProxyFactory, browser: Any, tmp_path: Path
) -> None:
    proxy = await start_proxy(json_upstream.url, connect_retry=10.0)
    base = proxy.url.removesuffix("/mcp")
    page = await browser.new_page(viewport={"width": 1440, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    async with agent_session(proxy.url, "other-agent", "0.9.2") as other:
        await other.list_tools()
    store = proxy.app[STORE_KEY]
    assert isinstance(store, CachedStore)
    assert store.records() == [], "the other agent ended its session"
    async with agent_session(proxy.url) as client:
        for text in ("one", "two"):
            await client.call_tool("echo", {"text": text})
        (record,) = store.records()
        short = record.client_session_id[:8]

        await page.goto(f"{base}/")
        session_row = page.locator(f'#sessions tr[data-session="{short}"]')
        await session_row.wait_for(timeout=BROWSER_WAIT_MS)
        assert "example-agent 1.4.0" in await session_row.inner_text()
        await page.locator('#live[data-state="live"]').wait_for(timeout=BROWSER_WAIT_MS)
        # A mark that a reload would wipe out.
        await page.evaluate("window.__notReloaded = true")

        await json_upstream.restart()
        result = await client.call_tool("echo", {"text": "after the restart"})
        assert not result.is_error

        heal_row = page.locator("#heals tbody tr.healed")
        await heal_row.first.wait_for(timeout=BROWSER_WAIT_MS)
        assert short in await heal_row.first.inner_text()
        healed_request = page.locator("#requests tbody tr.healed")
        await healed_request.first.wait_for(timeout=BROWSER_WAIT_MS)
        assert "tools/call" in await healed_request.first.inner_text()
        assert await page.evaluate("window.__notReloaded === true"), "the page reloaded"
        navigations = await page.evaluate("performance.getEntriesByType('navigation').length")
        assert navigations == 1
        # The sessions table catches up with the heal (generation 1) from the next snapshot.
        await page.locator(f'#sessions tr[data-session="{short}"].healed').wait_for(timeout=BROWSER_WAIT_MS)
        shot = tmp_path / "status-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

    assert problems == [], problems
    if os.environ.get("MCP_HEAL_PROXY_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)


async def test_a_token_user_opens_the_page_once_with_the_token_in_the_url(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, browser: Any
) -> None:
    token = "status-page-token-0d9f4b2a"
    proxy = await start_proxy(sse_upstream.url, token=token)
    base = proxy.url.removesuffix("/mcp")
    page = await browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    refused = await page.goto(f"{base}/")
    assert refused is not None
    assert refused.status == 401
    await page.goto(f"{base}/?token={token}")
    assert page.url == f"{base}/", "the token left the address bar"
    await page.locator('#live[data-state="live"]').wait_for(timeout=BROWSER_WAIT_MS)
    await page.locator("#upstreams .card").wait_for(timeout=BROWSER_WAIT_MS)
    assert token not in await page.content()
    assert problems == [], problems
