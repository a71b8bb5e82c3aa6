"""The hot path over https beside http, in one run: ``python -m bench.tls``.

Two bench upstreams (bench/upstream.py), one serving http and one https (a certificate of a CA made for
the run with trustme), each measured direct (wrk to the upstream itself; wrk speaks TLS to the https
one) and through its own mcp-heal-proxy (the client's leg stays http on loopback; the proxy's leg to the
upstream is http, or https trusting the run's CA through ``ca_file``). With tinyproxy installed, a third
proxy reaches the https upstream through tinyproxy's CONNECT tunnels (``proxy`` key): the outbound
proxy's own CPU is shown apart. Rounds alternate the order of the paths; the figures are medians over
the rounds: at c=32 requests/s and CPU µs per request of the proxy and of the upstream, at c=1 p50/p99.

    python -m bench.tls --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from bench import client, cpu, wrk
from bench.run import ANSWER_TOOLS, DEFAULT_OUT, build, log
from bench.services import REPO, BenchUpstream, HealProxy, find_tool, free_port, wait_port

FIGURES = ("rps", "proxy_us", "upstream_us", "outbound_us", "p50_ms", "p99_ms")
PATHS = ("http direct", "http proxy", "https direct", "https proxy", "https proxy via tinyproxy")


def new_session(url: str, context: ssl.SSLContext | None) -> str:
    """A session on ``url`` (an https upstream's certificate checked against the run's CA)."""

    async def go() -> str:
        connector = aiohttp.TCPConnector(ssl=context if context is not None else True)
        async with aiohttp.ClientSession(connector=connector) as http:
            return await client.open_session(http, url)

    return asyncio.run(go())


def measure(
    wrk_bin: str,
    url: str,
    pids: dict[str, int],
    answer: str,
    work: Path,
    duration: float,
    context: ssl.SSLContext | None,
) -> dict[str, float]:
    """One path, one kind of answer: throughput and CPU at c=32, latency at c=1."""
    session = new_session(url, context)
    script = wrk.tools_call_script(session, ANSWER_TOOLS[answer], client.PROTOCOL)
    meter = cpu.CpuMeter(pids)
    wrk.run(wrk_bin, url, script, work, connections=32, duration_s=1.0)  # warm-up
    loaded, seconds = meter.measure(lambda: wrk.run(wrk_bin, url, script, work, connections=32, duration_s=duration))
    per_request = cpu.per_request_us(seconds, loaded.requests)
    single = wrk.run(wrk_bin, url, script, work, connections=1, duration_s=duration / 2)
    return {
        "rps": loaded.rps,
        # Direct paths have no proxy: its column is 0 there.
        "proxy_us": per_request.get("proxy", 0.0),
        "upstream_us": per_request["upstream"],
        "outbound_us": per_request.get("outbound", 0.0),
        "p50_ms": single.percentile_ms(50),
        "p99_ms": single.percentile_ms(99),
    }


class TinyProxy:
    """tinyproxy on a free 127.0.0.1 port (warnings only in its log), stopped by its PID."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.port = free_port()
        config = directory / "tinyproxy.conf"
        config.write_text(
            f'Port {self.port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{directory / "tinyproxy.log"}"\n'
            "LogLevel Warning\nMaxClients 256\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
        )
        self.process = subprocess.Popen(
            [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(self.port, self.process, "tinyproxy")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['rounds']} rounds of {result['duration']:g} s per figure, medians; build {result['build']}; "
        f"upstream client {result['client']}.",
        "",
        "| answer | path | req/s c=32 | proxy CPU µs/req | upstream CPU µs/req | tinyproxy CPU µs/req "
        "| p50 c=1 (ms) | p99 c=1 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for answer in ("json", "sse"):
        for path in result["medians"]:
            m = result["medians"][path][answer]
            outbound = f"{m['outbound_us']:.0f}" if path.endswith("tinyproxy") else ""
            proxy = f"{m['proxy_us']:.0f}" if "proxy" in path else ""
            lines.append(
                f"| {answer.upper()} | {path} | {m['rps']:,.0f} | {proxy} | {m['upstream_us']:.0f} | {outbound} "
                f"| {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every path in turn")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per c=32 figure (c=1: half)")
    parser.add_argument("--client", choices=("lean", "aiohttp"), default="lean", help="the proxies' upstream client")
    parser.add_argument("--log-level", default="info", help="the proxies' --log-level (default info)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "tls")
    args = parser.parse_args(argv)
    wrk_bin = find_tool("wrk")
    if wrk_bin is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    tinyproxy_bin = find_tool("tinyproxy")
    if tinyproxy_bin is None:
        log("tinyproxy is not installed: the path through an outbound proxy is left out")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp_name:
        tmp = Path(tmp_name)
        ca = trustme.CA(organization_name="mcp-heal-proxy bench")
        ca_pem, cert, key = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
        ca.cert_pem.write_to_path(str(ca_pem))
        leaf = ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        outbound = TinyProxy(tinyproxy_bin, tmp) if tinyproxy_bin is not None else None
        plain = BenchUpstream().start(logs / "upstream-http.log")
        secure = BenchUpstream(tls=(cert, key)).start(logs / "upstream-https.log")
        proxies: dict[str, HealProxy] = {}
        try:
            common: dict[str, Any] = {"state": ":memory:", "client": args.client, "log_level": args.log_level}
            proxies["http proxy"] = HealProxy().start(
                plain.url, logs / "proxy-http.log", workdir=tmp / "http", **common
            )
            proxies["https proxy"] = HealProxy().start(
                secure.url, logs / "proxy-https.log", workdir=tmp / "https", upstream_keys={"ca_file": str(ca_pem)},
                **common,
            )  # fmt: skip
            if outbound is not None:
                proxies["https proxy via tinyproxy"] = HealProxy().start(
                    secure.url, logs / "proxy-tunnel.log", workdir=tmp / "tunnel",
                    upstream_keys={"ca_file": str(ca_pem), "proxy": outbound.url}, **common,
                )  # fmt: skip
            paths = [path for path in PATHS if "direct" in path or path in proxies]
            rounds: list[dict[str, dict[str, dict[str, float]]]] = []
            for number in range(1, args.rounds + 1):
                this_round: dict[str, dict[str, dict[str, float]]] = {path: {} for path in paths}
                order = paths if number % 2 else list(reversed(paths))
                for answer in ("json", "sse"):
                    for path in order:
                        upstream = secure if path.startswith("https") else plain
                        pids = {"upstream": upstream.pid}
                        if path in proxies:
                            pids["proxy"] = proxies[path].pid
                        if path.endswith("tinyproxy") and outbound is not None:
                            pids["outbound"] = outbound.process.pid
                        url = proxies[path].url if path in proxies else upstream.url
                        context = trusting if url.startswith("https") else None
                        work = tmp / path.replace(" ", "-")
                        this_round[path][answer] = figures = measure(
                            wrk_bin, url, pids, answer, work, args.duration, context
                        )
                        log(
                            f"round {number} {answer} {path}: {figures['rps']:.0f} req/s, proxy "
                            f"{figures['proxy_us']:.0f} µs/req, upstream {figures['upstream_us']:.0f} µs/req, "
                            f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms"
                        )
                rounds.append(this_round)
        finally:
            for proxy in proxies.values():
                proxy.stop()
            plain.stop()
            secure.stop()
            if outbound is not None:
                outbound.stop()
    result: dict[str, Any] = {
        "rounds": args.rounds,
        "duration": args.duration,
        "client": args.client,
        "build": build(REPO),
        "medians": {
            path: {
                answer: {figure: statistics.median(r[path][answer][figure] for r in rounds) for figure in FIGURES}
                for answer in ("json", "sse")
            }
            for path in rounds[0]
        },
        "each_round": rounds,
    }
    (args.out / "tls.json").write_text(json.dumps(result, indent=2))
    table = render(result)
    (args.out / "tls.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
