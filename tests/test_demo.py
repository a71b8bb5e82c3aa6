"""``mcp-heal-proxy demo``: the newcomer's first command shows a heal and exits 0 within bounded time."""

from __future__ import annotations

import asyncio
import io
import re
import sys

import pytest

from mcp_heal_proxy.demo import run_demo
from mcp_heal_proxy.engine import session

# The demo idles 2.5 s; interpreter start-up and the rest take well under a second here.
DEMO_DEADLINE = 30.0


async def run_demo_command() -> tuple[int, str, str]:
    """Run ``python -m mcp_heal_proxy demo`` as a newcomer would; return status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEMO_DEADLINE):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"demo did not finish within {DEMO_DEADLINE} s") from None
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_demo_command_shows_a_heal_and_exits_0() -> None:
    status, out, err = await run_demo_command()
    assert status == 0, f"demo failed:\n{out}\n{err}"
    client_id = re.search(r"initialized through the proxy: client session id (\w+)", out)
    assert client_id, out
    assert re.search(r"call 1 ok \([\d.]+ ms\)", out), out
    assert "expired after 2 s idle" in out
    assert "a client without the proxy, same call on session" in out
    assert "HTTP 404 'Session not found'" in out
    assert re.search(r"re-initialized the upstream in [\d.]+ ms", out), out
    assert re.search(rf"call 2 ok \([\d.]+ ms\) on the same client session id {client_id[1]}", out), out
    # Exactly one re-initialize: the upstream saw initialize #1 (the client's) and #2 (the heal), no more.
    assert re.findall(r"opened \(initialize #(\d+)\)", out) == ["1", "2"], out
    assert "demo FAILED" not in out
    assert "Traceback" not in err


async def test_demo_exits_1_with_a_clear_message_when_the_proxy_does_not_heal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy that never recognizes expiry passes the upstream's 404 through to the client.
    monkeypatch.setattr(session, "is_session_expired", lambda *_, **__: False)
    out = io.StringIO()
    async with asyncio.timeout(DEMO_DEADLINE):
        status = await run_demo(out, ttl=0.2)
    assert status == 1, out.getvalue()
    assert "demo FAILED: call 2 through the proxy failed: HTTP 404 'Session not found'" in out.getvalue()
    assert "the proxy did not heal the session" in out.getvalue()
    assert "call 2 ok" not in out.getvalue()
