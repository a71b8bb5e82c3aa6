"""Small things a new user meets: a 404 that lists the paths served, a misspelled MCP_HEAL_PROXY_*
variable that is warned about, and the 2026-07-28 methods under their own names in metrics and logs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp

from mcp_heal_proxy.observability import method_label
from tests.conftest import MCP_HEADERS, REPO_ROOT, ProxyFactory, UpstreamProcess, start_serve


async def test_a_post_to_a_path_not_served_lists_the_mcp_endpoints(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with http.post(proxy.url + "/", json=body, headers=MCP_HEADERS) as response:
        assert response.status == 404
        answer = await response.json()
    assert answer["error"]["message"] == "no MCP endpoint at /mcp/ (MCP endpoints here: /mcp)"


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_heal_proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT, env={**os.environ, **env},
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_misspelled_variable_is_warned_about_in_one_line(tmp_path: Path) -> None:
    upstream = ("--upstream", "http://127.0.0.1:9/mcp")
    status, _, err = await run_cli("check-config", *upstream, env={"MCP_HEAL_PROXY_PROT": "9000"})
    assert status == 0
    assert err == (
        "mcp-heal-proxy: warning: MCP_HEAL_PROXY_PROT is not a setting (did you mean MCP_HEAL_PROXY_PORT?); "
        "it is ignored\n"
    )
    # A variable of the user's own that the config file refers to is no mistake.
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[server]\ntoken = "${MCP_HEAL_PROXY_INBOUND_TOKEN}"\n[upstreams.a]\nurl = "http://127.0.0.1:9/mcp"\n'
    )
    status, _, err = await run_cli("check-config", str(config), env={"MCP_HEAL_PROXY_INBOUND_TOKEN": "x" * 32})
    assert (status, err) == (0, "")


async def test_serve_logs_a_misspelled_variable(tmp_path: Path) -> None:
    os.environ["MCP_HEAL_PROXY_MAX_SESSION"] = "5"
    try:
        process, _ = await start_serve(
            "--upstream", "http://127.0.0.1:9/mcp", "--port", "0", "--log-format", "json", "--state", ":memory:",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        del os.environ["MCP_HEAL_PROXY_MAX_SESSION"]
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while b"config.unknown_variable" not in (line := await process.stderr.readline()):
                assert line, "serve exited without the warning"
        logged = json.loads(line)
        assert (logged["level"], logged["variable"], logged["did_you_mean"]) == (
            "warning",
            "MCP_HEAL_PROXY_MAX_SESSION",
            "MCP_HEAL_PROXY_MAX_SESSIONS",
        )
    finally:
        process.kill()
        await process.wait()


def test_2026_07_28_and_task_methods_have_labels_of_their_own() -> None:
    for method in (
        "server/discover",
        "subscriptions/listen",
        "tasks/get",
        "tasks/list",
        "tasks/result",
        "tasks/cancel",
    ):
        assert method_label(method) == method
    assert method_label("vendor/anything") == "other"


async def test_a_server_discover_probe_is_counted_and_logged_by_its_name(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    probe = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}
    async with http.post(proxy.url, json=probe, headers=MCP_HEADERS) as response:
        await response.read()
    async with http.get(proxy.url.removesuffix("/mcp") + "/metrics") as response:
        metrics = await response.text()
    assert 'method="server/discover"' in metrics
    assert 'method="other"' not in metrics
