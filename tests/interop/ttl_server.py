"""The Python SDK test server (tests/upstream_server.py) with a short session idle TTL, as hosted servers run.

Run it from the repository root as ``python -m tests.interop.ttl_server --port N --idle-timeout S [--json]``.

The SDK suspends a session's idle countdown while its GET stream is open, and every client of this suite
opens one, so a TTL would never fire. Like many hosted servers, this one offers no GET stream (405, which
the spec allows); sessions then expire ``S`` seconds after their last request. ``/stats`` counts the
expiries under ``idle_expired``, so a test can wait for one instead of sleeping.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from tests.upstream_server import STATS, ASGIApp, Receive, Scope, Send, counting, server


class CountIdleExpiry(logging.Filter):
    """Counts the SDK session manager's "Session ... idle timeout" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "idle timeout" in record.getMessage():
            STATS["idle_expired"] = STATS.get("idle_expired", 0) + 1
        return True


def without_get_stream(app: ASGIApp) -> ASGIApp:
    """Answer GET on the MCP endpoint with 405: this server has no server-to-client stream."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/mcp":
            await send({"type": "http.response.start", "status": 405, "headers": [(b"allow", b"POST, DELETE")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, required=True, help="session idle TTL in seconds")
    parser.add_argument("--json", action="store_true", help="answer with application/json, not SSE")
    args = parser.parse_args()
    STATS["idle_expired"] = 0
    manager_log = logging.getLogger("mcp.server.streamable_http_manager")
    manager_log.setLevel(logging.INFO)
    manager_log.addFilter(CountIdleExpiry())
    app = server.streamable_http_app(
        json_response=args.json,
        session_idle_timeout=args.idle_timeout,
        host="127.0.0.1",
    )
    config = uvicorn.Config(
        without_get_stream(counting(app)), host="127.0.0.1", port=args.port, log_level="warning", lifespan="on"
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
