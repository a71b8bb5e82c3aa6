"""The official MCP conformance suite's server scenarios, run through the proxy.

``conformance server --url PROXY`` connects the suite's own client (the TypeScript SDK's) to the proxy
(``serve`` in a subprocess, with each ``http_server``), in front of tests/conformance/everything_server.mjs,
a server written to the scenarios' stated requirements: every active scenario, one session each, in the
suite's order, so that each runs beside the sessions and streams the earlier ones left.

Four scenarios have the server ask the client something in the middle of a tool call (sampling,
elicitation), with a request of its own that goes out on the session's GET stream and is dropped by the
server when no GET stream is open at that moment. The client opens its GET stream at the same moment as
its first tool call; the proxy opens the upstream GET stream when the client sends
notifications/initialized, before that call can arrive (engine/session.py, open_stream_early). Without
it, the call reached the server first in nearly every run and the server's request was lost: the tool
call waited out the client's 60 s timeout.

The suite and the SDK the server runs on are installed by tests/conformance/install.sh (run by .ci/run)
into .cache/conformance. Without them the tests skip, except in CI (``CI=true``), where a missing install
is a failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conformance.test_conformance import suite
from tests.conftest import TEST_CLIENT, start_serve

HERE = Path(__file__).parent
REPO = HERE.parent.parent
NODE_MODULES = REPO / ".cache" / "conformance" / "node_modules"
SERVER = HERE / "everything_server.mjs"
# The scenarios in which the server asks the client something during a tool call.
ASKING = ("tools-call-sampling", "tools-call-elicitation", "elicitation-sep1034-defaults", "elicitation-sep1330-enums")
SERVER_READY = 20.0
# A passing run takes a few seconds; each lost server request costs the client's 60 s request timeout.
RUN_TIMEOUT = 150.0
SHUTDOWN_TIMEOUT = 15.0

pytestmark = pytest.mark.conformance


@pytest.fixture
async def everything_server(tmp_path: Path) -> AsyncIterator[str]:
    """tests/conformance/everything_server.mjs on 127.0.0.1: its MCP URL."""
    suite()  # skips (or fails in CI) without the installed suite
    node = shutil.which("node")
    assert node is not None
    log_path = tmp_path / "everything-server.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            node,
            str(SERVER),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env={**os.environ, "CONFORMANCE_NODE_MODULES": str(NODE_MODULES)},
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(SERVER_READY):
            line = await process.stdout.readline()
        match = re.match(rb"listening on (http://127\.0\.0\.1:\d+/mcp)", line)
        assert match, f"the server did not start: {line!r}; see {log_path}"
        yield match.group(1).decode()
    finally:
        process.kill()
        await process.wait()


async def run_server_suite(url: str, tmp_path: Path) -> tuple[int, str]:
    """Every active server scenario against ``url``: the suite's exit status and output."""
    node, bundle = suite()
    process = await asyncio.create_subprocess_exec(
        node,
        str(bundle),
        "server",
        "--url",
        url,
        "-o",
        str(tmp_path / "results"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def scenario_results(output: str) -> dict[str, str]:
    """Each scenario's line of the suite's summary ("✓ name: 1 passed, 0 failed"), by name."""
    summary = output.split("=== SUMMARY ===", 1)[-1]
    return {m.group(2): m.group(0) for m in re.finditer(r"^([✓✗]) ([\w-]+): .*$", summary, re.MULTILINE)}


@pytest.mark.timeout(RUN_TIMEOUT + SERVER_READY + SHUTDOWN_TIMEOUT + 30)
@pytest.mark.parametrize("http_server", ["fast", "aiohttp"])
async def test_server_scenarios_pass_through_the_proxy(
    everything_server: str, http_server: str, tmp_path: Path
) -> None:
    proxy, url = await start_serve(
        "--upstream", everything_server, "--port", "0", "--state", ":memory:",
        "--set", f"http_server={http_server}", "--set", f"client={TEST_CLIENT}",
    )  # fmt: skip
    try:
        status, output = await run_server_suite(url, tmp_path)
    finally:
        proxy.terminate()
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await proxy.wait()
        except TimeoutError:
            proxy.kill()
            await proxy.wait()
    results = scenario_results(output)
    failed = [line for line in results.values() if line.startswith("✗")]
    assert not failed, "\n".join(failed) + "\n" + output[-4000:]
    assert status == 0, output[-4000:]
    # The whole suite ran, the scenarios that ask the client among them.
    assert len(results) >= 30, output[-4000:]
    assert all(results.get(name, "").startswith("✓") for name in ASKING), results
