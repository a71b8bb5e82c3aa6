"""One benchmark run: the same workloads direct, through nginx and through mcp-heal-proxy; a table and a plot."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from bench import client, cpu, report, wrk
from bench.services import REPO, BenchUpstream, HealProxy, Nginx, Redis, SdkUpstream, find_tool

DEFAULT_OUT = REPO / "bench" / "out"
# The tools/call each kind of answer is measured with (bench/upstream.py).
ANSWER_TOOLS = {"json": "echo", "sse": "echo_sse"}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        quick = args.quick
        self.connections = 32
        self.duration = args.duration or (1.0 if quick else 10.0)
        self.warmup = 0.0 if quick else 2.0
        self.sse_calls = 2 if quick else 20
        self.sse_events = 5 if quick else 50
        self.sse_interval_ms = 5.0
        self.heal_rounds = 3 if quick else 50
        self.sessions = (200, 1000) if quick else (10_000, 100_000)
        self.store_puts = {"memory": 1000 if quick else 100_000, "durable": 100 if quick else 2000}
        self.sdk = not args.skip_sdk
        self.memory = not args.skip_memory
        self.state = args.state
        self.client: str = args.client
        self.log_level: str = args.log_level
        self.proxy_src: Path = args.proxy_src

    def proxy_options(self) -> dict[str, Any]:
        """What every proxy of the run is started with (HealProxy.start's keywords)."""
        return {"client": self.client, "log_level": self.log_level, "src": self.proxy_src}

    def state_for(self, workdir: Path) -> str:
        """The proxy's --state: a fresh SQLite file per proxy (the default kind of store), or :memory:."""
        return ":memory:" if self.state == "memory" else str(workdir / "sessions.db")


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx = find_tool("nginx")
    wrk_path = find_tool("wrk")
    nginx_version = (
        subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr.strip() if nginx else "?"
    )
    wrk_version = "?"
    if wrk_path:
        first = subprocess.run([wrk_path, "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
        match = re.search(r"(\d+\.\d+\.\d+)", first)
        wrk_version = f"wrk {match.group(1)}" if match else first.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx_version.removeprefix("nginx version: "),
        "wrk": wrk_version.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def build(src: Path) -> str:
    """The proxy's source: the commit of its checkout, marked when files differ from it."""
    git = ["git", "-C", str(src)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    if commit.returncode != 0:
        return str(src)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False
    )
    return f"commit {commit.stdout.strip()}" + (" with uncommitted changes" if dirty.stdout.strip() else "")


def measure_wrk(
    wrk_bin: str, url: str, script: str, work: Path, settings: Settings, connections: int, meter: cpu.CpuMeter
) -> tuple[wrk.WrkResult, dict[str, float]]:
    """One wrk figure (after its warm-up) and the CPU each process spent per request it completed."""
    if settings.warmup:
        wrk.run(wrk_bin, url, script, work, connections=connections, duration_s=settings.warmup)
    result, seconds = meter.measure(
        lambda: wrk.run(wrk_bin, url, script, work, connections=connections, duration_s=settings.duration)
    )
    return result, cpu.per_request_us(seconds, result.requests)


def wrk_figures(
    wrk_bin: str, urls: dict[str, str], tool: str, work: Path, settings: Settings, meter: cpu.CpuMeter
) -> dict[str, Any]:
    """Throughput at c=32 and latency at c=1 for one tools/call, on each path in turn, with the CPU
    microseconds per request each process spent during each of the two figures."""
    rps: dict[str, float] = {}
    latency: dict[str, dict[str, float]] = {}
    curves: dict[str, list[tuple[float, int]]] = {}
    cpu_us: dict[str, dict[str, dict[str, float]]] = {}
    for path, url in urls.items():
        session = client.new_session(url)  # created through the same path wrk will use
        script = wrk.tools_call_script(session, tool, client.PROTOCOL)
        result, loaded = measure_wrk(wrk_bin, url, script, work / path, settings, settings.connections, meter)
        rps[path] = result.rps
        result, single = measure_wrk(wrk_bin, url, script, work / path, settings, 1, meter)
        latency[path] = {"50": result.percentile_ms(50), "99": result.percentile_ms(99)}
        curves[path] = result.percentiles_us
        cpu_us[path] = {"loaded": loaded, "single": single}
        spent = ", ".join(f"{name} {value:.0f}" for name, value in loaded.items() if value >= 0.5)
        log(
            f"  {tool:8} {path:6} {rps[path]:8.0f} req/s at c={settings.connections} (CPU µs/req: {spent}); "
            f"c=1 p50 {latency[path]['50']:.3f} ms p99 {latency[path]['99']:.3f} ms"
        )
    return {"rps": rps, "latency": latency, "curves": curves, "cpu_us": cpu_us}


def upstream_initializes(upstream_base: str) -> int:
    with urllib.request.urlopen(f"{upstream_base}/admin/stats", timeout=5) as response:
        return int(json.load(response)["initialize"])


def memory(wrk_bin: str, upstream: BenchUpstream, work: Path, settings: Settings, logs: Path) -> dict[str, Any]:
    """RSS of a fresh proxy after creating N sessions through it (each an initialize sent by wrk).

    Sessions are counted at the upstream (initialize requests it answered since this proxy started).
    """
    high = max(settings.sessions)
    proxy_dir = work / "proxy-memory"
    with HealProxy().start(
        upstream.url,
        logs / "proxy-memory.log",
        state=settings.state_for(proxy_dir),
        workdir=proxy_dir,
        max_sessions=2 * high,
        **settings.proxy_options(),
    ) as proxy:
        time.sleep(0.3)
        start = proxy.rss_kib()
        before = upstream_initializes(upstream.base)
        rss: dict[str, int] = {}
        created: dict[str, int] = {}
        for count in settings.sessions:
            script = wrk.initialize_script(count - (upstream_initializes(upstream.base) - before), client.PROTOCOL)
            wrk.run_until(
                wrk_bin,
                proxy.url,
                script,
                work / "memory",
                connections=settings.connections,
                finished=lambda count=count: upstream_initializes(upstream.base) - before >= count,
                timeout_s=600,
            )
            time.sleep(0.3)
            created[str(count)] = upstream_initializes(upstream.base) - before
            rss[str(count)] = proxy.rss_kib()
            log(f"  proxy RSS after {created[str(count)]:,} sessions: {rss[str(count)] / 1024:.1f} MiB")
    low, high = (str(count) for count in settings.sessions)
    per = (rss[high] - rss[low]) / (created[high] - created[low])
    return {"start_kib": start, "rss_kib": rss, "created": created, "per_session_kib": per}


def store_figures(settings: Settings, tmp: Path) -> dict[str, float | None]:
    """Microseconds per SessionStore.put for each store kind; Redis only if redis-server is installed."""
    figures: dict[str, float | None] = {
        "memory": client.store_put_us(":memory:", settings.store_puts["memory"]),
        "sqlite": client.store_put_us(str(tmp / "store" / "sessions.db"), settings.store_puts["durable"]),
        "redis": None,
    }
    redis_bin = find_tool("redis-server")
    if redis_bin:
        with Redis().start(redis_bin, tmp / "redis") as redis:
            figures["redis"] = client.store_put_us(redis.redis_url, settings.store_puts["durable"])
    else:
        log("  no redis-server: the Redis store write figure is skipped")
    for kind, value in figures.items():
        log(f"  store   {kind:6} " + ("n/a" if value is None else f"{value:.1f} µs/put"))
    return figures


def run(settings: Settings, out: Path) -> dict[str, Any]:
    wrk_bin = find_tool("wrk")
    nginx_bin = find_tool("nginx")
    missing = [name for name, found in (("wrk", wrk_bin), ("nginx", nginx_bin)) if not found]
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)} (Debian: apt-get install -y nginx wrk)")
    assert wrk_bin
    assert nginx_bin
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "connections": settings.connections,
        "duration_s": settings.duration,
        "state": "SQLite file (the default kind)" if settings.state == "sqlite" else ":memory:",
        "proxy": {"build": build(settings.proxy_src), "client": settings.client, "log_level": settings.log_level},
    }
    with tempfile.TemporaryDirectory(prefix="mcp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with BenchUpstream().start(logs / "upstream.log") as upstream:
            with (
                Nginx().start(nginx_bin, upstream.port, tmp / "nginx") as nginx,
                HealProxy().start(
                    upstream.url,
                    logs / "proxy.log",
                    state=settings.state_for(tmp / "proxy"),
                    workdir=tmp / "proxy",
                    **settings.proxy_options(),
                ) as proxy,
            ):
                urls = {"direct": upstream.url, "nginx": nginx.url, "proxy": proxy.url}
                log(
                    f"upstream {upstream.url}, nginx {nginx.url} (pid {nginx.pid}), proxy {proxy.url} (pid {proxy.pid})"
                )
                meter = cpu.CpuMeter({"upstream": upstream.pid, "nginx": nginx.pid, "proxy": proxy.pid})
                results["throughput"], results["latency"], results["latency_curves"], results["cpu_us"] = {}, {}, {}, {}
                for answer, tool in ANSWER_TOOLS.items():
                    figures = wrk_figures(wrk_bin, urls, tool, tmp / "wrk", settings, meter)
                    results["throughput"][answer] = figures["rps"]
                    results["latency"][answer] = figures["latency"]
                    results["latency_curves"][answer] = figures["curves"]
                    results["cpu_us"][answer] = figures["cpu_us"]
                results["sse_delay"] = {}
                for path, url in urls.items():
                    delays = client.sse_delays(url, settings.sse_calls, settings.sse_events, settings.sse_interval_ms)
                    results["sse_delay"][path] = delays
                    log(
                        f"  SSE     {path:6} per-event delay p50 {report._pct(delays, 50):.3f} ms p99 {report._pct(delays, 99):.3f} ms"
                    )
                results["heal"] = {}
                expire = f"{upstream.base}/admin/expire"
                for path, url in urls.items():
                    healed = client.heal(url, expire, settings.heal_rounds, proxy=path == "proxy")
                    results["heal"][path] = vars(healed)
                    log(
                        f"  heal    {path:6} normal {healed.normal_ms:.3f} ms, first after expiry {healed.after_expiry_ms:.3f} ms"
                    )
                results["proxy_rss_after_load_kib"] = proxy.rss_kib()
            if settings.memory:
                results["memory"] = memory(wrk_bin, upstream, tmp / "wrk", settings, logs)
        results["store"] = store_figures(settings, tmp)
        if settings.sdk:
            with (
                SdkUpstream().start(logs / "sdk-upstream.log") as sdk,
                Nginx().start(nginx_bin, sdk.port, tmp / "nginx-sdk") as nginx,
                HealProxy().start(
                    sdk.url,
                    logs / "proxy-sdk.log",
                    state=settings.state_for(tmp / "proxy-sdk"),
                    workdir=tmp / "proxy-sdk",
                    **settings.proxy_options(),
                ) as proxy,
            ):
                urls = {"direct": sdk.url, "nginx": nginx.url, "proxy": proxy.url}
                meter = cpu.CpuMeter({"upstream": sdk.pid, "nginx": nginx.pid, "proxy": proxy.pid})
                figures = wrk_figures(wrk_bin, urls, "echo", tmp / "wrk-sdk", settings, meter)
                results["sdk"] = {"rps": figures["rps"], "latency": figures["latency"], "cpu_us": figures["cpu_us"]}
    return results


def render(results: dict[str, Any], plot: Path | None, command: str) -> str:
    m = results["machine"]
    parts = [
        "## mcp-heal-proxy benchmark",
        "",
        f"`{command}` — {m['date']}; {m['cpu']}; Linux {m['kernel']}; Python {m['python']}; "
        f"{m['nginx']}; {m['wrk']}; wrk -t1, {results['duration_s']:g} s per figure.",
        "",
        f"Proxy: {results['proxy']['build']}, client {results['proxy']['client']}, "
        f"--log-level {results['proxy']['log_level']}, store {results['state']}.",
        "",
        "### Fast minimal upstream (bench/upstream.py): what each path costs",
        "",
        report.table(results),
        "",
        "#### CPU per request, every process (fast upstream)",
        "",
        report.cpu_table(results["cpu_us"], results["throughput"], results["connections"]),
    ]
    if "sdk" in results:
        parts += [
            "",
            "### Official MCP Python SDK upstream (tests/upstream_server.py --json)",
            "",
            report.sdk_table(results),
            "",
            report.cpu_table(
                {"json": results["sdk"]["cpu_us"]}, {"json": results["sdk"]["rps"]}, results["connections"]
            ),
        ]
    parts += ["", f"Plot: {plot.name if plot else 'not written (pip install -e .[bench] for matplotlib)'}"]
    return "\n".join(parts) + "\n"


# --- profile -------------------------------------------------------------------------------------


def profile(
    seconds: float,
    out: Path,
    top: int,
    *,
    answer: str,
    native: bool,
    proxy_options: dict[str, Any],
    target: str = "proxy",
) -> str:
    """py-spy samples the proxy (or the upstream behind it) while wrk loads the proxy at c=32 with the
    JSON (or SSE) tools/call; top functions."""
    wrk_bin = find_tool("wrk")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not wrk_bin or not Path(spy).exists():
        raise SystemExit("bench --profile needs wrk and py-spy (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    raw = out / f"profile-{answer}{'' if target == 'proxy' else '-' + target}.txt"
    tool = ANSWER_TOOLS[answer]
    with (
        tempfile.TemporaryDirectory(prefix="mcp-bench-") as tmp_name,
        BenchUpstream().start(logs / "upstream.log") as upstream,
        HealProxy().start(
            upstream.url,
            logs / "proxy.log",
            state=str(Path(tmp_name) / "sessions.db"),
            workdir=Path(tmp_name),
            **proxy_options,
        ) as proxy,
    ):
        session = client.new_session(proxy.url)
        script = wrk.tools_call_script(session, tool, client.PROTOCOL)
        wrk.run(wrk_bin, proxy.url, script, Path(tmp_name), connections=32, duration_s=2)
        sampled = proxy.pid if target == "proxy" else upstream.pid
        command = [spy, "record", "-p", str(sampled), "-r", "250", "-d", str(round(seconds))]
        command += ["-f", "raw", "-o", str(raw), "--nonblocking"] + (["--native"] if native else [])
        spy_proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        meter = cpu.CpuMeter({"upstream": upstream.pid, "proxy": proxy.pid})
        result, spent = meter.measure(
            lambda: wrk.run(wrk_bin, proxy.url, script, Path(tmp_name), connections=32, duration_s=seconds)
        )
        _, err = spy_proc.communicate(timeout=seconds + 30)
        if spy_proc.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.decode().strip()}")
    per_request = cpu.per_request_us(spent, result.requests)
    what = f"wrk c=32 {answer.upper()} tools/call through the proxy ({result.rps:.0f} req/s while sampled"
    what += ", " + ", ".join(f"{name} {value:.0f} µs CPU/req" for name, value in per_request.items()) + ")"
    return summarize_profile(raw, top, what, "proxy" if target == "proxy" else "upstream (bench/upstream.py)")


def summarize_profile(raw: Path, top: int, what: str, process: str = "proxy") -> str:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [
        f"py-spy, {total} samples of the {process} under {what}",
        "",
        "| self % | function |",
        "|---:|---|",
    ]
    lines += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in own.most_common(top)]
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; aggregate per function, not line.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file_part = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", "mcp_heal_proxy/", "bench/"):
        if marker in file_part:
            file_part = file_part.split(marker, 1)[1]
            break
    return f"{name} ({file_part})" if file_part else name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds, not minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk figure (default 10, quick 1)")
    parser.add_argument(
        "--state",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="the proxy's session store: a fresh SQLite file (the default kind) or :memory:",
    )
    parser.add_argument("--skip-sdk", action="store_true", help="skip the official SDK server run")
    parser.add_argument("--skip-memory", action="store_true", help="skip the RSS per idle session figure")
    parser.add_argument(
        "--client",
        choices=("aiohttp", "lean"),
        default="lean",
        help="the proxy's upstream HTTP client (the upstream's \"client\" key; default lean, the proxy's own)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the proxy's --log-level (default info, the proxy's own: one log event per request)",
    )
    parser.add_argument(
        "--proxy-src",
        type=Path,
        default=REPO,
        metavar="DIR",
        help="run the mcp_heal_proxy package of another checkout (e.g. a worktree of the base commit)",
    )
    parser.add_argument(
        "--profile", type=float, metavar="SECONDS", help="only profile the proxy under load with py-spy"
    )
    parser.add_argument("--answer", choices=tuple(ANSWER_TOOLS), default="json", help="what --profile loads")
    parser.add_argument("--native", action="store_true", help="--profile: py-spy --native (C frames too)")
    parser.add_argument(
        "--profile-target",
        choices=("proxy", "upstream"),
        default="proxy",
        help="--profile: the process sampled (the upstream behind the proxy, to compare)",
    )
    parser.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.profile:
        settings = Settings(args)
        text = profile(
            args.profile,
            out,
            args.top,
            answer=args.answer,
            native=args.native,
            proxy_options=settings.proxy_options(),
            target=args.profile_target,
        )
        suffix = "" if args.profile_target == "proxy" else f"-{args.profile_target}"
        (out / f"profile-{args.answer}{suffix}.md").write_text(text)
        print(text)
        return
    command = "python -m bench" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()
    results = run(Settings(args), out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot = report.plot(results, out)
    text = render(results, plot, command)
    (out / "results.md").write_text(text)
    print(text)
    log(f"done in {time.monotonic() - started:.0f} s; wrote {out / 'results.md'}" + (f" and {plot}" if plot else ""))
