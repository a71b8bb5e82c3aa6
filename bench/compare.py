"""Two builds of the proxy, measured in turn against one upstream: the before/after of a change.

``python -m bench`` measures one build; on a shared machine whose load drifts, two of its runs minutes
apart differ by as much as two builds do. This puts both proxies (this checkout's and ``--base``'s) in
front of the same fixture upstream and measures them alternately, round after round, each figure with
the upstream's own CPU beside it; the medians over the rounds are the comparison.

    git worktree add /tmp/base <commit>
    python -m bench.compare --base /tmp/base --rounds 5

Per round and build: wrk c=32 for JSON and SSE answers (requests/s, CPU µs per request of the proxy and
of the upstream), then wrk c=1 for each (p50, p99). Results go to ``--out`` (compare.json, compare.md).

``--otel`` adds a third proxy: this checkout with OpenTelemetry on (``otel = true``, every request sampled,
spans and metrics exported over OTLP/HTTP to a sink in this process that answers 200 and counts what it
got), measured in the same rounds: the cost of tracing beside this checkout with it off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import client, cpu, wrk
from bench.run import ANSWER_TOOLS, DEFAULT_OUT, build, log
from bench.services import REPO, BenchUpstream, HealProxy, find_tool

FIGURES = ("rps", "proxy_us", "upstream_us", "ratio", "p50_ms", "p99_ms")


def measure(
    wrk_bin: str, url: str, upstream_pid: int, proxy_pid: int, answer: str, work: Path, duration: float
) -> dict[str, float]:
    """One build, one kind of answer: throughput and CPU at c=32, latency at c=1."""
    session = client.new_session(url)
    script = wrk.tools_call_script(session, ANSWER_TOOLS[answer], client.PROTOCOL)
    meter = cpu.CpuMeter({"upstream": upstream_pid, "proxy": proxy_pid})
    wrk.run(wrk_bin, url, script, work, connections=32, duration_s=1.0)  # warm-up
    loaded, seconds = meter.measure(lambda: wrk.run(wrk_bin, url, script, work, connections=32, duration_s=duration))
    per_request = cpu.per_request_us(seconds, loaded.requests)
    single = wrk.run(wrk_bin, url, script, work, connections=1, duration_s=duration / 2)
    return {
        "rps": loaded.rps,
        "proxy_us": per_request["proxy"],
        "upstream_us": per_request["upstream"],
        "ratio": per_request["proxy"] / per_request["upstream"] if per_request["upstream"] else 0.0,
        "p50_ms": single.percentile_ms(50),
        "p99_ms": single.percentile_ms(99),
    }


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export (200, an empty protobuf answer) and counts it."""

    exports = 0
    received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        type(self).exports += 1
        type(self).received += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@contextmanager
def otlp_sink() -> Iterator[str]:
    """The sink's endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) while it runs, on a thread of this process."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def otel_environment(endpoint: str) -> dict[str, str]:
    """OpenTelemetry on, every request sampled, exported to ``endpoint`` (the SDK's default batching)."""
    return {
        "MCP_HEAL_PROXY_OTEL": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SERVICE_NAME": "mcp-heal-proxy-bench",
    }


def medians(rounds: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for build_name in rounds[0]:
        out[build_name] = {}
        for answer in rounds[0][build_name]:
            out[build_name][answer] = {
                figure: statistics.median(r[build_name][answer][figure] for r in rounds) for figure in FIGURES
            }
    return out


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Interleaved, {result['rounds']} rounds of {result['duration']:g} s per figure, medians; "
        f"base: {result['builds']['base']}; this: {result['builds']['this']}"
        + (
            f"; this+otel: the same with otel = true, sampled at 1.0, OTLP/HTTP to a local sink "
            f"({result['otlp_exports']['requests']} exports, {result['otlp_exports']['bytes'] / 1e6:.1f} MB)."
            if "this+otel" in result["medians"]
            else "."
        ),
        "",
        "| answer | build | req/s c=32 | proxy CPU µs/req | upstream CPU µs/req | proxy ÷ upstream | p50 c=1 (ms) | p99 c=1 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for answer in ("json", "sse"):
        for build_name in result["medians"]:
            m = result["medians"][build_name][answer]
            lines.append(
                f"| {answer.upper()} | {build_name} | {m['rps']:,.0f} | {m['proxy_us']:.0f} | {m['upstream_us']:.0f} "
                f"| {m['ratio']:.2f}x | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |"
            )
    direct = result["direct"]
    lines += [
        "",
        "Direct to the upstream (measured once per round, medians): "
        + ", ".join(
            f"{answer.upper()} {direct[answer]['rps']:,.0f} req/s, upstream {direct[answer]['upstream_us']:.0f} µs/req, "
            f"p50 {direct[answer]['p50_ms']:.2f} ms"
            for answer in ("json", "sse")
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the checkout to compare with (its mcp_heal_proxy)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each measuring every build in turn")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per c=32 figure (c=1: half)")
    parser.add_argument("--log-level", default="info", help="both proxies' --log-level (default info)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "compare")
    parser.add_argument(
        "--otel", action="store_true", help="also this checkout with OpenTelemetry on (sampled at 1.0, OTLP to a sink)"
    )
    args = parser.parse_args(argv)
    wrk_bin = find_tool("wrk")
    if wrk_bin is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    args.out.mkdir(parents=True, exist_ok=True)
    builds = {"base": args.base.resolve(), "this": REPO}
    if args.otel:
        builds["this+otel"] = REPO
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp_name, otlp_sink() as endpoint:
        tmp = Path(tmp_name)
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        with BenchUpstream().start(logs / "upstream.log") as upstream:
            proxies = {
                name: HealProxy().start(
                    upstream.url,
                    logs / f"proxy-{name}.log",
                    state=":memory:",
                    workdir=tmp / name,
                    log_level=args.log_level,
                    src=src,
                    env=otel_environment(endpoint) if name == "this+otel" else None,
                )
                for name, src in builds.items()
            }
            rounds: list[dict[str, dict[str, dict[str, float]]]] = []
            direct_rounds: list[dict[str, dict[str, float]]] = []
            try:
                for number in range(1, args.rounds + 1):
                    this_round: dict[str, dict[str, dict[str, float]]] = {name: {} for name in builds}
                    direct: dict[str, dict[str, float]] = {}
                    # Alternate the order, so that neither build always runs after the other.
                    order = list(builds) if number % 2 else list(reversed(builds))
                    for answer in ("json", "sse"):
                        direct[answer] = measure(
                            wrk_bin, upstream.url, upstream.pid, upstream.pid, answer, tmp / "direct", args.duration
                        )
                        for name in order:
                            proxy = proxies[name]
                            this_round[name][answer] = figures = measure(
                                wrk_bin, proxy.url, upstream.pid, proxy.pid, answer, tmp / name, args.duration
                            )
                            log(
                                f"round {number} {answer} {name}: {figures['rps']:.0f} req/s, proxy "
                                f"{figures['proxy_us']:.0f} µs/req ({figures['ratio']:.2f}x the upstream's "
                                f"{figures['upstream_us']:.0f}), p50 {figures['p50_ms']:.2f} ms"
                            )
                    rounds.append(this_round)
                    direct_rounds.append(direct)
            finally:
                for proxy in proxies.values():
                    proxy.stop()
    result: dict[str, Any] = {
        "rounds": args.rounds,
        "duration": args.duration,
        "builds": {name: build(src) for name, src in builds.items()},
        "otlp_exports": {"requests": _Sink.exports, "bytes": _Sink.received},
        "medians": medians(rounds),
        "direct": {
            answer: {figure: statistics.median(r[answer][figure] for r in direct_rounds) for figure in FIGURES}
            for answer in ("json", "sse")
        },
        "each_round": rounds,
    }
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    table = render(result)
    (args.out / "compare.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
