"""Soak run: many clients calling tools through the proxy while upstream sessions expire and the
upstream restarts. Not a unit test: a bounded run (time and request count) that reports what a user
would see.

    python -m bench.soak                      # 60 s, 20 clients, 3 upstream restarts
    python -m bench.soak --seconds 20 --clients 8 --restarts 2

The upstream is the official MCP Python SDK server (tests/upstream_server.py) with a 1 s idle TTL, so
clients that pause longer than that find their upstream session expired; it is also restarted (SIGTERM,
as a deploy would) several times. Clients speak raw Streamable HTTP and never re-initialize, like Codex
up to 0.110. A client-visible error is any answer that is not the tool's result: the target is zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "soak", "version": "1"}},
}


_IN_FLIGHT_MARKS = ("broke the stream before answering", "ServerDisconnectedError", "ClientOSError")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def wait_http(url: str) -> None:
    async with asyncio.timeout(20), aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


class Upstream:
    def __init__(self, port: int, idle_timeout: float) -> None:
        self.port = port
        self.idle_timeout = idle_timeout
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "tests" / "upstream_server.py"), "--port", str(self.port),
            "--idle-timeout", str(self.idle_timeout),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await wait_http(f"http://127.0.0.1:{self.port}/stats")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.process = None


async def start_proxy(upstream_url: str, log: int) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_heal_proxy", "serve", "--upstream", upstream_url, "--port", "0",
        "--state", ":memory:", "--log-level", "warning", "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=log, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(20):
        while True:
            line = await process.stdout.readline()
            if not line:
                raise RuntimeError("the proxy exited before printing its URL")
            if match := re.search(rb'url = "([^"]+)"', line):
                return process, match.group(1).decode()


async def client(http: aiohttp.ClientSession, url: str, tally: Tally, stop_at: float, rng: random.Random) -> None:
    async with http.post(url, json=INIT, headers=HEADERS) as response:
        session_id = response.headers["Mcp-Session-Id"]
        await response.read()
    headers = {**HEADERS, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"}
    async with http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers) as r:
        await r.read()
    number = 0
    while time.monotonic() < stop_at:
        number += 1
        text = f"{session_id[:6]}-{number}"
        body = {
            "jsonrpc": "2.0",
            "id": number,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text}},
        }
        started = time.perf_counter()
        tally.requests += 1
        try:
            async with http.post(url, json=body, headers=headers) as response:
                payload = await response.text()
                status = response.status
        except aiohttp.ClientError as exc:
            tally.errors.append(f"transport {type(exc).__name__}")
            continue
        tally.latencies.append(time.perf_counter() - started)
        if status == 200 and f'"text":"{text}"' in payload.replace(" ", ""):
            tally.ok += 1
        else:
            tally.errors.append(f"HTTP {status}: {payload[:160]}")
        # Mostly quick calls; now and then a pause past the upstream's idle TTL.
        await asyncio.sleep(rng.choice([0.0, 0.0, 0.05, 0.2, 1.5]))


async def restarter(upstream: Upstream, restarts: int, seconds: float, log: list[str]) -> None:
    for index in range(restarts):
        await asyncio.sleep(seconds / (restarts + 1))
        started = time.monotonic()
        await upstream.stop()
        await upstream.start()
        log.append(f"restart {index + 1}: upstream down for {time.monotonic() - started:.2f} s")


async def heal_count(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url.replace("/mcp", "/metrics")) as response:
        text = await response.text()
    heals: dict[str, float] = {}
    for match in re.finditer(r'mcp_heal_proxy_heals_total\{outcome="(\w+)",reason="(\w+)"[^}]*\} ([0-9.e+]+)', text):
        key = f"{match.group(1)} ({match.group(2)})"
        heals[key] = heals.get(key, 0) + float(match.group(3))
    return heals


async def soak(seconds: float, clients: int, restarts: int, seed: int) -> int:
    upstream = Upstream(free_port(), idle_timeout=1.0)
    await upstream.start()
    log_path = Path(os.environ.get("SOAK_PROXY_LOG", "/dev/null"))
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    proxy, url = await start_proxy(f"http://127.0.0.1:{upstream.port}/mcp", log)
    os.close(log)
    tally = Tally()
    restart_log: list[str] = []
    try:
        stop_at = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=clients * 2)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with asyncio.timeout(seconds + 120), asyncio.TaskGroup() as tasks:
                for index in range(clients):
                    tasks.create_task(client(http, url, tally, stop_at, random.Random(seed + index)))
                tasks.create_task(restarter(upstream, restarts, seconds, restart_log))
            heals = await heal_count(http, url)
    finally:
        proxy.send_signal(signal.SIGTERM)
        await proxy.wait()
        await upstream.stop()
    latencies = sorted(tally.latencies)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0

    print(f"soak: {seconds:.0f} s, {clients} clients, upstream idle TTL 1 s, {restarts} upstream restarts (SIGTERM)")
    for line in restart_log:
        print(f"  {line}")
    print(f"requests: {tally.requests}, answered with the tool's result: {tally.ok}")
    print(f"heals: {json.dumps(heals)}")
    print(f"latency ms: p50 {pct(0.5):.2f}, p99 {pct(0.99):.2f}, max {pct(1.0):.2f}")
    # A request the upstream had accepted when it shut down may have run: the proxy must not replay it,
    # and answers with a JSON-RPC error instead. Those are counted apart from every other error.
    in_flight = [e for e in tally.errors if any(mark in e for mark in _IN_FLIGHT_MARKS)]
    others = [e for e in tally.errors if e not in in_flight]
    print(f"in flight when the upstream shut down (not replayable, answered with an error): {len(in_flight)}")
    print(f"client-visible errors for replayable requests: {len(others)}")
    for error in sorted(set(tally.errors))[:10]:
        print(f"  {tally.errors.count(error)} x {error[:200]}")
    return 0 if not others else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    os.chdir(REPO)
    sys.exit(asyncio.run(soak(args.seconds, args.clients, args.restarts, args.seed)))


if __name__ == "__main__":
    main()
