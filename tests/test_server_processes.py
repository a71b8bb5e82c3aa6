"""The tests' own servers (tests/conftest.py ServerProcess): a server is ready when it answers, itself.

A port is chosen free, not reserved: on a machine where other test runs take ports too (their servers,
their clients' outgoing connections), another process can take it between the choice and the bind.
"""

from __future__ import annotations

import time

import pytest

from tests import conftest
from tests.conftest import UpstreamProcess


async def test_a_server_whose_port_another_server_took_first_starts_on_another_port() -> None:
    first = UpstreamProcess(json_response=False)
    await first.start()
    second = UpstreamProcess(json_response=False)
    second.port = first.port  # taken between free_port() and the bind, by a server that answers /stats too
    try:
        await second.start()
        assert second.process is not None
        assert second.port != first.port
        assert (await second.stats())["pid"] == second.process.pid, "ready means this process answers"
        assert first.process is not None
        assert (await first.stats())["pid"] == first.process.pid
    finally:
        await second.stop()
        await first.stop()


async def test_a_restart_whose_port_stays_taken_fails_instead_of_using_the_other_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest, "START_ATTEMPTS", 2)  # each attempt is a Python start-up: two show the rule
    first = UpstreamProcess(json_response=False)
    await first.start()
    second = UpstreamProcess(json_response=False)
    second.port = first.port
    second.port_fixed = True  # a restart: the proxy in front knows this port only
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=f"exited with .* 2 times \\(port {first.port}\\)"):
            await second.start()
        assert second.process is None
    finally:
        await second.stop()
        await first.stop()
    assert time.monotonic() - started < 60
