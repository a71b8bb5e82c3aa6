"""The lean upstream client's tests run on asyncio's loop and on uvloop (the CLI's loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Applies to the tests in this directory only (pytest-asyncio asks through the item's own hooks)."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
