"""``check-config --connect``: each upstream tried once, one line each saying where it stopped and why.

Run as the user runs it (``python -m mcp_heal_proxy check-config --connect FILE``) against the SDK
server over https with a test CA, the same server without its CA trusted, a wrong path, a port nobody
listens on, and a host name that cannot resolve.
"""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import REPO_ROOT, CertAuthority, HttpsUpstreamProcess, free_port


async def check_connect(config: Path) -> tuple[int, list[str], str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_heal_proxy", "check-config", "--connect", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode().splitlines(), stderr.decode()


async def test_each_upstream_gets_one_line_with_what_worked_and_where_it_stopped(
    https_upstream: HttpsUpstreamProcess, test_ca: CertAuthority, tmp_path: Path
) -> None:
    closed_port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[upstreams.good]
url = "{https_upstream.url}"
ca_file = "{test_ca.pem}"
connect_timeout = 5

[upstreams.untrusted]
url = "{https_upstream.url}"
connect_timeout = 5

[upstreams.wrongpath]
url = "{https_upstream.origin}/nope"
ca_file = "{test_ca.pem}"
connect_timeout = 5

[upstreams.down]
url = "http://127.0.0.1:{closed_port}/mcp"
connect_timeout = 5

[upstreams.nohost]
url = "https://mcp.heal-proxy-check.invalid/mcp"
connect_timeout = 5
"""
    )
    status, lines, stderr = await check_connect(config)
    assert status == 1, (lines, stderr)
    assert stderr == ""
    good, untrusted, wrongpath, down, nohost = lines
    assert good.startswith(f"good ({https_upstream.url}): ok: TCP {https_upstream.port}, TLS (TLSv1.3), HTTP 200, ")
    assert "MCP initialize (heal-test-upstream, protocol 2025-11-25)" in good
    assert good.endswith("session ended (DELETE)")
    assert untrusted.startswith(f"untrusted ({https_upstream.url}): TCP {https_upstream.port}; stopped at TLS: ")
    assert "the upstream's certificate is not trusted (" in untrusted
    assert "set ca_file" in untrusted
    assert wrongpath.startswith(f"wrongpath ({https_upstream.origin}/nope): TCP {https_upstream.port}, TLS (TLSv1.3)")
    assert "; stopped at HTTP: HTTP 404: no MCP endpoint at this URL; check the URL's path" in wrongpath
    assert down == (
        f"down (http://127.0.0.1:{closed_port}/mcp): stopped at TCP: cannot connect to 127.0.0.1:{closed_port} "
        "(Connection refused); is the server running, and the port right?"
    )
    assert nohost.startswith("nohost (https://mcp.heal-proxy-check.invalid/mcp): stopped at DNS: ")
    assert "check the host name in the URL" in nohost or "check the DNS servers" in nohost
    # The check's own session was ended: nothing left open upstream.
    stats = await https_upstream.stats()
    assert stats["initialize"] == 2, "good and wrongpath sent one initialize each (the counter sees every path)"
    assert await https_upstream.live_sessions() == []


async def test_every_upstream_answering_exits_0(
    https_upstream: HttpsUpstreamProcess, test_ca: CertAuthority, tmp_path: Path
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[upstreams.good]\nurl = "{https_upstream.url}"\nca_file = "{test_ca.pem}"\n')
    status, lines, stderr = await check_connect(config)
    assert status == 0, (lines, stderr)
    assert len(lines) == 1
    assert lines[0].startswith("good (")


async def test_an_unexpected_client_error_is_printed_with_urls_and_secrets_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp's errors may carry the URL they were about (InvalidURL, a redirect's target): the reason
    is printed with every URL masked and every configured secret removed."""
    from mcp_heal_proxy import connect_check
    from mcp_heal_proxy.config import build_config

    config = build_config(
        config_file=None,
        flags={"upstream": "https://mcp.example/mcp?api_key=s3cret-key", "proxy": "http://u:Xy7%2Fs3cr3t@p.corp:3128"},
        environ={},
    )

    async def fails(upstream: object, state: str) -> connect_check.Outcome:
        raise aiohttp.InvalidURL("https://u:Xy7/s3cr3t@p.corp:3128/mcp?api_key=s3cret-key (decoded Xy7/s3cr3t)")

    monkeypatch.setattr(connect_check, "check_upstream", fails)
    out = io.StringIO()
    assert await connect_check.check_connections(config, out) == 1
    shown = out.getvalue()
    assert "stopped at HTTP" in shown, shown
    assert "s3cret-key" not in shown, shown
    assert "s3cr3t" not in shown, shown
