"""Start-up of a stdio bridge, as a client launching it per session sees it: from spawn to the answer of
``initialize``, for ``mcp-heal-proxy stdio`` and mcp-remote 0.15.1, alternating, in the same run.

Usage: ``python -m bench.stdio_startup [--runs N]``. It starts the official MCP SDK server
(tests/upstream_server.py) on 127.0.0.1 as the upstream, and needs node and the interop npm packages
(tests/interop/install.sh) for mcp-remote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.services import REPO, free_port

INITIALIZE = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "b", "version": "1"},
            },
        }
    ).encode()
    + b"\n"
)
ANSWER_TIMEOUT = 30.0


def spawn_to_answer(command: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``command`` to the first line it writes after an initialize on stdin."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(INITIALIZE)
        process.stdin.flush()
        line = process.stdout.readline()
        elapsed = time.perf_counter() - started
        if b'"result"' not in line:
            raise RuntimeError(f"{command[0]}: no initialize answer: {line[:200]!r}")
        return elapsed
    finally:
        process.kill()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    modules = Path(os.environ.get("INTEROP_NODE_MODULES", REPO / ".cache" / "interop" / "node_modules"))
    mcp_remote = modules / "mcp-remote" / "dist" / "proxy.js"
    if not mcp_remote.exists():
        sys.exit(f"mcp-remote not installed at {mcp_remote}: run tests/interop/install.sh")
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "upstream_server.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        # Only what a client passes to the commands it launches.
        env = {key: os.environ[key] for key in ("HOME", "PATH", "USER", "LANG") if key in os.environ}
        bridge = str(Path(sys.executable).parent / "mcp-heal-proxy")
        commands = {
            "mcp-heal-proxy stdio": [bridge, "stdio", "--upstream", url],
            "mcp-remote 0.15.1": ["node", str(mcp_remote), url, "--allow-http"],
        }
        deadline = time.monotonic() + 20
        while True:  # the upstream is ready when a bridge gets an answer through it
            try:
                spawn_to_answer(commands["mcp-heal-proxy stdio"], env)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                times[name].append(spawn_to_answer(command, env))
        print("| command | median (s) | min (s) | max (s) |")
        print("|---|---|---|---|")
        for name, values in times.items():
            print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
        ratio = statistics.median(times["mcp-heal-proxy stdio"]) / statistics.median(times["mcp-remote 0.15.1"])
        print(f"\nmcp-heal-proxy / mcp-remote (medians): {ratio:.2f}x over {args.runs} runs each, alternating")
    finally:
        upstream.kill()
        upstream.wait(10)


if __name__ == "__main__":
    main()
