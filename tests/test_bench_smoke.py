"""Smoke run of the benchmark harness (bench/): it still runs end to end and prints its table.

It checks that the benchmark works, not how fast anything is. It needs wrk and nginx (Debian packages);
without them it skips locally, and fails in CI (CI=true), where .ci/run installs them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str | None:
    """On PATH, or in an sbin directory a non-root PATH may lack (Debian installs nginx in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.mark.timeout(300)
def test_quick_benchmark_prints_the_table(tmp_path: Path) -> None:
    missing = [name for name in ("wrk", "nginx") if _tool(name) is None]
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
    for figure in ("throughput c=32", "p50 latency c=1", "SSE per-event delay", "first call after expiry", "RSS"):
        assert figure in out, f"no {figure!r} row in:\n{out}"
    assert "Official MCP Python SDK upstream" in out
    assert (tmp_path / "results.md").read_text().strip() == out.strip()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "latency.png").stat().st_size > 0
