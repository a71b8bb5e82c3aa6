"""Smoke run of the benchmark harness (bench/): it still runs end to end and prints its table.

It checks that the benchmark works, not how fast anything is. It needs wrk and nginx (Debian packages);
without them it skips locally, and fails in CI (CI=true), where .ci/run installs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.services import find_tool

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_quick_benchmark_prints_the_table(tmp_path: Path) -> None:
    missing = [name for name in ("wrk", "nginx") if find_tool(name) is None]
    if missing:
        message = f"the benchmark needs {' and '.join(missing)} (apt-get install -y nginx wrk)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"bench --quick failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    out = done.stdout
    assert "| figure | direct | nginx | mcp-heal-proxy |" in out
    for figure in (
        "throughput c=32",
        "CPU per request c=32, JSON",
        "CPU per request c=32, SSE",
        "p50 latency c=1",
        "SSE per-event delay",
        "first call after expiry",
        "RSS",
    ):
        assert figure in out, f"no {figure!r} row in:\n{out}"
    # CPU per request of every process, measured: the proxy spends some on its own phase's requests.
    results = json.loads((tmp_path / "results.json").read_text())
    for answer in ("json", "sse"):
        assert results["cpu_us"][answer]["proxy"]["loaded"]["proxy"] > 0
        assert results["cpu_us"][answer]["nginx"]["loaded"]["nginx"] > 0
        assert results["cpu_us"][answer]["direct"]["loaded"]["upstream"] > 0
    assert "| answer | load | path | req/s | upstream | nginx | mcp-heal-proxy |" in out
    assert "Official MCP Python SDK upstream" in out
    assert (tmp_path / "results.md").read_text().strip() == out.strip()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "latency.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_the_tls_benchmark_measures_every_path_in_one_run(tmp_path: Path) -> None:
    """``python -m bench.tls``: http and https upstreams, direct and through the proxy, and through
    tinyproxy's tunnels, in one run; every path has its figures."""
    missing = [name for name in ("wrk", "tinyproxy") if find_tool(name) is None]
    if missing:
        message = f"bench.tls needs {' and '.join(missing)} (apt-get install -y wrk tinyproxy)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        [sys.executable, "-m", "bench.tls", "--rounds", "1", "--duration", "0.5", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"bench.tls failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    results = json.loads((tmp_path / "tls.json").read_text())
    paths = ("http direct", "http proxy", "https direct", "https proxy", "https proxy via tinyproxy")
    assert tuple(results["medians"]) == paths
    for path in paths:
        for answer in ("json", "sse"):
            figures = results["medians"][path][answer]
            assert figures["rps"] > 0
            assert figures["upstream_us"] > 0
            assert (figures["proxy_us"] > 0) == ("proxy" in path), (path, figures)
    assert results["medians"]["https proxy via tinyproxy"]["json"]["outbound_us"] > 0
    assert (tmp_path / "tls.md").read_text().strip() == done.stdout.strip()
