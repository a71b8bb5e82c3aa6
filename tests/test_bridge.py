"""The bridge across 2026-07-28: handshake-era clients through the proxy to a modern-only upstream
(tests/modern_upstream.py), and era detection per upstream."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import ModernUpstreamProcess, mcp_session


async def test_legacy_client_fails_directly(modern_upstream: ModernUpstreamProcess) -> None:
    """Without the proxy, the SDK's handshake-era ClientSession cannot talk to a modern-only server: its
    initialize is refused with -32022 naming the versions the server speaks."""
    with pytest.raises((MCPError, BaseExceptionGroup)) as failed:
        async with mcp_session(modern_upstream.url):
            pass
    refused = failed.value
    while isinstance(refused, BaseExceptionGroup):
        refused = refused.exceptions[0]
    assert isinstance(refused, MCPError)
    assert refused.error.code == -32022
    assert refused.error.data["supported"] == ["2026-07-28"]
    assert (await modern_upstream.stats())["initialize_refused"] == 1
