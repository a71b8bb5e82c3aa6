"""The markdown table and the latency plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PATHS = ("direct", "nginx", "proxy")
LABELS = {"direct": "direct", "nginx": "nginx proxy_pass", "proxy": "mcp-heal-proxy"}


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _lat_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x ({a - b:+.2f} ms)"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _row(name: str, values: dict[str, float | None], *, kind: str, target: str, digits: int = 2) -> str:
    ratio = _ratio if kind == "rate" else _lat_ratio
    d, n, p = (values.get(path) for path in PATHS)
    cells = [name, _num(d, digits), _num(n, digits), _num(p, digits), ratio(n, d), ratio(p, d), ratio(p, n), target]
    return "| " + " | ".join(cells) + " |"


_HEAD = (
    "| figure | direct | nginx | mcp-heal-proxy | nginx ÷ direct | proxy ÷ direct | proxy ÷ nginx | target (proxy) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---|"
)


def _verdict(ok: bool, detail: str) -> str:
    return f"{'met' if ok else 'MISSED'}: {detail}"


# Targets (issue 13): throughput and added p50 against direct, CPU per request against the upstream's own.
THROUGHPUT_TARGET = 0.6
ADDED_P50_TARGET_MS = 0.25
CPU_TARGET = 1.3


def own_cpu(results: dict[str, Any], answer: str, phase: str = "loaded") -> dict[str, float | None]:
    """CPU µs per request of each path's own process: the upstream direct, nginx, the proxy."""
    cpu = results.get("cpu_us", {}).get(answer)
    if cpu is None:
        return dict.fromkeys(PATHS)
    return {
        "direct": cpu["direct"][phase]["upstream"],
        "nginx": cpu["nginx"][phase]["nginx"],
        "proxy": cpu["proxy"][phase]["proxy"],
    }


def table(results: dict[str, Any]) -> str:
    lines = [_HEAD]
    thr = results["throughput"]
    lat = results["latency"]
    for answer in ("json", "sse"):
        rps = thr[answer]
        ratio = rps["proxy"] / rps["direct"]
        lines.append(
            _row(
                f"throughput c={results['connections']}, {answer.upper()} answer (req/s)",
                rps,
                kind="rate",
                target=_verdict(ratio >= THROUGHPUT_TARGET, f"{ratio:.2f}x ≥ {THROUGHPUT_TARGET}x direct"),
                digits=0,
            )
        )
    for answer in ("json", "sse"):
        if "cpu_us" not in results:
            break
        values = own_cpu(results, answer)
        # The target compares the proxy with the upstream at the same moment (the proxy's load phase).
        upstream = results["cpu_us"][answer]["proxy"]["loaded"]["upstream"]
        ratio = values["proxy"] / upstream if values["proxy"] is not None and upstream else 0.0
        lines.append(
            _row(
                f"CPU per request c={results['connections']}, {answer.upper()} answer (µs)⁰",
                values,
                kind="rate",
                target=_verdict(ratio <= CPU_TARGET, f"{ratio:.2f}x ≤ {CPU_TARGET}x upstream ({upstream:.0f} µs)"),
                digits=0,
            )
        )
    for answer in ("json", "sse"):
        for p in (50, 99):
            values = {path: lat[answer][path][str(p)] for path in PATHS}
            target = "-"
            if p == 50:
                added = values["proxy"] - values["direct"]
                target = _verdict(added <= ADDED_P50_TARGET_MS, f"{added:+.2f} ms ≤ +{ADDED_P50_TARGET_MS} ms")
            lines.append(_row(f"p{p} latency c=1, {answer.upper()} answer (ms)", values, kind="latency", target=target))
    sse = results["sse_delay"]
    for p in (50, 99):
        values = {path: _pct(sse[path], p) for path in PATHS}
        target = "-"
        if p == 50:
            added = values["proxy"] - values["direct"]
            target = _verdict(added <= 5, f"{added:+.2f} ms ≤ +5 ms")
        lines.append(_row(f"SSE per-event delay p{p} (ms)", values, kind="latency", target=target))
    heal = results["heal"]
    lines.append(
        _row(
            "normal tools/call, Python client (ms)",
            {p: heal[p]["normal_ms"] for p in PATHS},
            kind="latency",
            target="-",
        )
    )
    after = {p: heal[p]["after_expiry_ms"] for p in PATHS}
    # The limit: a normal call plus two upstream round trips (initialize, notifications/initialized) plus 2 ms.
    limit = heal["proxy"]["normal_ms"] + 2 * heal["direct"]["normal_ms"] + 2
    lines.append(
        _row(
            "first call after expiry (ms)¹",
            after,
            kind="latency",
            target=_verdict(after["proxy"] <= limit, f"{after['proxy']:.2f} ≤ {limit:.2f} ms"),
        )
    )
    mem = results.get("memory")
    if mem is not None:
        counts = sorted(int(k) for k in mem["rss_kib"])
        created = mem["created"]
        for count in counts:
            mib = mem["rss_kib"][str(count)] / 1024
            lines.append(
                f"| proxy RSS after {created[str(count)]:,} sessions (MiB) | - | - | {mib:.1f} | - | - | - | - |"
            )
        per = mem["per_session_kib"]
        lines.append(
            f"| proxy RSS per idle session (KiB)² | - | - | {per:.2f} | - | - | - | {_verdict(per <= 5, f'{per:.2f} ≤ 5 KiB')} |"
        )
    else:
        lines.append("| proxy RSS per idle session (KiB)² | - | - | not measured (--skip-memory) | - | - | - | - |")
    for kind, label in (("memory", "memory"), ("sqlite", "SQLite file"), ("redis", "Redis")):
        value = results["store"].get(kind)
        shown = "n/a (no redis-server)" if value is None else f"{value:,.1f}"
        lines.append(f"| store write, {label} (µs/put)³ | - | - | {shown} | - | - | - | - |")
    notes = [
        "",
        "⁰ user + system CPU of the path's own process (/proc/PID/stat, nginx with its worker) during the "
        "c=32 figure ÷ requests wrk completed: the upstream itself (direct), nginx, mcp-heal-proxy. The "
        "target compares the proxy with the upstream's own CPU per request in the same phase; the CPU table "
        "below has every process in every phase.",
        "¹ direct and nginx cannot heal: their figure is the client re-initializing by hand "
        "(initialize + notifications/initialized + the call), the two extra round trips that are the heal's "
        "limit. Proxy target: normal call through the proxy + 2 x direct round trip + 2 ms.",
        (
            f"² (RSS after {created[str(counts[-1])]:,} - RSS after {created[str(counts[0])]:,} sessions) ÷ "
            f"{created[str(counts[-1])] - created[str(counts[0])]:,}; "
            f"RSS at start {mem['start_kib'] / 1024:.1f} MiB; proxy store: {results['state']}."
        )
        if mem is not None
        else f"² proxy store: {results['state']}.",
        "³ one SessionStore.put (a session create or a heal writes one), sequential, opened as the proxy opens "
        "it; SQLite commits to a file in WAL mode on its own thread; Redis is a local redis-server without "
        "persistence.",
    ]
    return "\n".join(lines + notes)


CPU_PROCESSES = ("upstream", "nginx", "proxy", "wrk")


def cpu_table(cpu_us: dict[str, Any], rps: dict[str, Any], connections: int) -> str:
    """CPU µs per request of every process, for each answer kind, path and load."""
    lines = [
        "| answer | load | path | req/s | upstream | nginx | mcp-heal-proxy | wrk | path total¹ | proxy ÷ upstream |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for answer, paths in cpu_us.items():
        for phase, load in (("loaded", f"c={connections}"), ("single", "c=1")):
            for path in PATHS:
                spent = paths[path][phase]
                total = spent["upstream"] + spent["nginx"] + spent["proxy"]
                shown_rps = f"{rps[answer][path]:,.0f}" if phase == "loaded" else "-"
                ratio = _ratio(spent["proxy"], spent["upstream"]) if path == "proxy" else "-"
                cells = [answer.upper(), load, LABELS[path], shown_rps]
                cells += [f"{spent[name]:.0f}" for name in CPU_PROCESSES] + [f"{total:.0f}", ratio]
                lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "µs of user + system CPU per completed request (/proc/PID/stat before and after each figure; wrk from "
        "the bench's rusage of its children). A process idle in a phase shows ~0. ¹ upstream + nginx + proxy: "
        "what the server side spends on one request on that path.",
    ]
    return "\n".join(lines)


def sdk_table(results: dict[str, Any]) -> str:
    sdk = results["sdk"]
    lines = [_HEAD]
    lines.append(_row(f"throughput c={results['connections']} (req/s)", sdk["rps"], kind="rate", target="-", digits=0))
    for p in (50, 99):
        values = {path: sdk["latency"][path][str(p)] for path in PATHS}
        lines.append(_row(f"p{p} latency c=1 (ms)", values, kind="latency", target="-"))
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> Path | None:
    """Latency distributions (c=1 JSON tools/call; SSE per-event delay) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with_cpu = "cpu_us" in results
    fig, axes = plt.subplots(1, 3 if with_cpu else 2, figsize=(16.5 if with_cpu else 11, 4.2))
    colors = {"direct": "#2b8a3e", "nginx": "#1c7ed6", "proxy": "#e8590c"}
    left = axes[0]
    for path in PATHS:
        curve = results["latency_curves"]["json"][path]
        left.plot([v / 1000 for _, v in curve], [p for p, _ in curve], label=LABELS[path], color=colors[path])
    left.set_xscale("log")
    left.set_xlabel("latency (ms, log scale)")
    left.set_ylabel("percentile")
    left.set_title("tools/call, JSON answer, concurrency 1 (wrk)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="lower right")
    right = axes[1]
    for path in PATHS:
        values = sorted(results["sse_delay"][path])
        n = len(values)
        right.plot(values, [100 * (i + 1) / n for i in range(n)], label=LABELS[path], color=colors[path])
    right.set_xscale("log")
    right.set_xlabel("delay from upstream write to client arrival (ms, log scale)")
    right.set_title("SSE progress events, per-event delay")
    right.grid(True, which="both", alpha=0.3)
    right.legend(loc="lower right")
    medians = ", ".join(f"{LABELS[p]} {statistics.median(results['sse_delay'][p]):.2f}" for p in PATHS)
    right.text(0.02, 0.97, f"medians (ms): {medians}", transform=right.transAxes, fontsize=7, va="top")
    if with_cpu:
        _plot_cpu(axes[2], results)
    fig.tight_layout()
    target = out / "latency.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _plot_cpu(axis: Any, results: dict[str, Any]) -> None:
    """Stacked CPU µs per request at c=32: what each path's processes spend, JSON and SSE answers."""
    colors = {"upstream": "#2b8a3e", "nginx": "#1c7ed6", "proxy": "#e8590c"}
    names: list[str] = []
    bottoms: list[float] = []
    for answer in ("json", "sse"):
        for path in PATHS:
            names.append(f"{answer.upper()}\n{path}")
            bottoms.append(0.0)
    for process in ("upstream", "nginx", "proxy"):
        heights = [results["cpu_us"][answer][path]["loaded"][process] for answer in ("json", "sse") for path in PATHS]
        label = LABELS.get(process, process)
        axis.bar(names, heights, bottom=bottoms, color=colors[process], label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axis.set_ylabel("CPU µs per request (user + system)")
    axis.set_title(f"CPU per request at c={results['connections']}, by process")
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(loc="upper left")
