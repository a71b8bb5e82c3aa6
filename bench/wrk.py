"""wrk runs: a generated Lua script per workload, results read back as JSON printed by the script's done()."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Percentiles the script reports, enough to draw a latency distribution.
PERCENTILES = [*range(1, 100), 99.5, 99.9, 99.99]

_HEADER = """\
wrk.method = "POST"
wrk.path = "{path}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["MCP-Protocol-Version"] = "{protocol}"
"""

_DONE = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write("BENCH-RESULT {")
  io.write(string.format('"requests":%d,"duration_us":%d,"bytes":%d,', summary.requests, summary.duration, summary.bytes))
  io.write(string.format('"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,', e.connect, e.read, e.write, e.status, e.timeout))
  io.write(string.format('"min":%d,"max":%d,"mean":%f,"percentiles":[', latency.min, latency.max, latency.mean))
  local ps = {__PERCENTILES__}
  for i, p in ipairs(ps) do
    if i > 1 then io.write(",") end
    io.write(string.format("[%s,%d]", p, latency:percentile(p)))
  end
  io.write("]}\\n")
end
"""


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal for ASCII text


def tools_call_script(session_id: str, tool: str, protocol: str, path: str = "/mcp") -> str:
    """The same tools/call on one session (MCP allows concurrent requests per session).

    Each request gets its own JSON-RPC id: the official SDK routes answers by id, and concurrent
    requests sharing one id break each other there.
    """
    head, tail = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 999,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {"text": "hello"}},
        },
        separators=(",", ":"),
    ).split("999")
    return (
        _HEADER.format(path=path, protocol=protocol)
        + f"wrk.headers[{_lua_string('Mcp-Session-Id')}] = {_lua_string(session_id)}\n"
        + "local n = 0\n"
        + "request = function()\n"
        + "  n = n + 1\n"
        + f"  return wrk.format(nil, nil, nil, {_lua_string(head)} .. n .. {_lua_string(tail)})\n"
        + "end\n"
        + _DONE.replace("__PERCENTILES__", ",".join(str(p) for p in PERCENTILES))
    )


def initialize_script(count: int, protocol: str, path: str = "/mcp") -> str:
    """Send initialize requests (one new session each) until ``count`` answers carried a session id.

    Up to connections - 1 more may be in flight when the thread stops: the caller counts the sessions
    actually created at the upstream.
    """
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": protocol,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        },
        separators=(",", ":"),
    )
    return (
        _HEADER.format(path=path, protocol=protocol)
        + f"wrk.body = {_lua_string(body)}\n"
        + f"local target = {count}\n"
        + "local answered = 0\n"
        + "response = function(status, headers, body)\n"
        + '  if headers["Mcp-Session-Id"] or headers["mcp-session-id"] then answered = answered + 1 end\n'
        + "  if answered >= target then wrk.thread:stop() end\n"
        + "end\n"
        + _DONE.replace("__PERCENTILES__", "50")
    )


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    errors: int
    percentiles_us: list[tuple[float, int]]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, p: float) -> float:
        for q, value in self.percentiles_us:
            if q >= p:
                return value / 1000
        return self.percentiles_us[-1][1] / 1000


def run(
    wrk: str, url: str, script: str, workdir: Path, *, connections: int, duration_s: float, threads: int = 1
) -> WrkResult:
    """Run wrk once; raise if it reports errors (a broken path must not pass for a fast one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "script.lua"
    lua.write_text(script)
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            data = json.loads(line.removeprefix("BENCH-RESULT "))
            break
    else:
        raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    errors = sum(data[key] for key in ("connect", "read", "write", "status", "timeout"))
    result = WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        errors=errors,
        percentiles_us=[(float(p), int(v)) for p, v in data["percentiles"]],
    )
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors on {url}: {data}\n{done.stdout}")
    return result


def run_until(
    wrk: str, url: str, script: str, workdir: Path, *, connections: int, finished: Callable[[], bool], timeout_s: float
) -> None:
    """Run wrk until ``finished()`` holds (polled), then stop it with SIGINT (wrk stops cleanly on it).

    wrk's -d always runs to the end even when the script stopped its thread, hence the polling.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "script.lua"
    lua.write_text(script)
    command = [wrk, "-t1", f"-c{connections}", f"-d{round(timeout_s)}s", "--timeout", "10s", "-s", str(lua), url]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not finished():
            if process.poll() is not None or time.monotonic() > deadline:
                out, err = process.communicate()
                raise RuntimeError(f"wrk ended before the target was reached: {out} {err}")
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
