"""Clients that know nothing of OAuth, through a proxy-managed login, to an OAuth-protected upstream.

The upstream is tests/oauth_server.py (the Python SDK server behind an auto-approving authorization
server), lenient or strict about the token's audience, with 1 s access tokens and issued tokens kept
across its restart. ``mcp-heal-proxy login --no-browser`` is completed by following the printed URL;
then the TypeScript SDK client and Codex call a tool, the upstream restarts (every MCP session dies and
the access token has expired by then), and they call again on the same session: the proxy refreshes the
token and heals the session. Talking to the upstream directly, the same clients fail at once (401).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.interop.clients import run_codex, run_ts_client
from tests.interop.conftest import NodeEnv
from tests.interop.fake_model import FIRST_CALL_ID, FIRST_TEXT, SECOND_CALL_ID, SECOND_TEXT
from tests.managed_login import Serving, child_env, login, serve
from tests.test_managed_login import NAME, OAuthUpstream, _expired, write_config

pytestmark = pytest.mark.interop


@pytest.fixture(params=["lenient", "strict"])
async def oauth_upstream(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OAuthUpstream]:
    options = ["--token-lifetime", "1", "--state-file", str(tmp_path / "as.json")]
    if request.param == "strict":
        options.append("--strict-audience")
    server = OAuthUpstream(*options)
    await server.start()
    yield server
    await server.stop()


def restart_then_expiry(upstream: OAuthUpstream, state_home: Path) -> Callable[[], Awaitable[None]]:
    """Between the calls: the upstream restarts, then the stored access token runs out (a restart
    alone may take less than the 1 s token lifetime, and then nothing needs a refresh)."""

    async def between() -> None:
        await upstream.restart()
        await wait_until(lambda: _expired(state_home), 10, "stored access token expired")

    return between


@pytest.fixture
async def managed_proxy(oauth_upstream: OAuthUpstream, tmp_path: Path) -> AsyncIterator[Serving]:
    env = child_env(tmp_path / "state")
    config = write_config(tmp_path, oauth_upstream.url)
    result = await login(config, NAME, env)
    assert result.returncode == 0, result.stderr
    proxy = await serve(config, env)
    yield proxy
    await proxy.stop()


async def test_ts_client_through_a_managed_login_survives_restart_and_expiry(
    node_env: NodeEnv, oauth_upstream: OAuthUpstream, managed_proxy: Serving, tmp_path: Path
) -> None:
    run = await run_ts_client(node_env, managed_proxy.url, restart_then_expiry(oauth_upstream, tmp_path / "state"))
    assert run.text("first") == "before", run
    assert run.text("second") == "after", run
    assert run.steps["first"]["session"] == run.steps["second"]["session"], "the client kept one session id"
    assert run.returncode == 0, run
    stats = await oauth_upstream.stats()  # since the restart
    assert stats["refreshes"] >= 1
    assert stats["authorizations"] == 0, "no new login"


async def test_ts_client_without_the_proxy_cannot_even_start(node_env: NodeEnv, oauth_upstream: OAuthUpstream) -> None:
    run = await run_ts_client(node_env, oauth_upstream.url, oauth_upstream.restart)
    assert run.text("first") is None, run
    assert run.returncode == 1, run
    error = run.error("setup")
    assert error is not None, run
    assert "Authentication required" in error, run


async def test_codex_through_a_managed_login_survives_restart_and_expiry(
    codex_binary: Path, oauth_upstream: OAuthUpstream, managed_proxy: Serving, tmp_path: Path
) -> None:
    between = restart_then_expiry(oauth_upstream, tmp_path / "state")
    run = await run_codex(codex_binary, tmp_path / "home", managed_proxy.url, between)
    assert run.model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain()
    assert run.tool_statuses() == ["completed", "completed"], run.explain()
    stats = await oauth_upstream.stats()
    assert stats["refreshes"] >= 1
    assert stats["authorizations"] == 0


async def test_codex_without_the_proxy_gets_no_tool_result(
    codex_binary: Path, oauth_upstream: OAuthUpstream, tmp_path: Path
) -> None:
    run = await run_codex(codex_binary, tmp_path / "home", oauth_upstream.url, oauth_upstream.restart)
    assert run.output_of(FIRST_CALL_ID) is None, run.explain()
    assert run.tool_statuses() == [], run.explain()
    assert "AuthRequired" in run.stderr, run.explain()
