"""A fast, minimal Streamable HTTP MCP server for the benchmark (not a conforming server).

Run as ``python -m bench.upstream --port N [--certfile PEM --keyfile PEM]`` (https with the second
pair); it prints ``ready`` on stdout once it listens.

POST /mcp
  initialize                 -> 200 JSON result, a fresh ``Mcp-Session-Id``
  notifications/* , answers  -> 202
  tools/call ``echo``        -> 200 application/json answer
  tools/call ``echo_sse``    -> 200 text/event-stream, one event with the answer
  tools/call ``stream``      -> 200 text/event-stream, ``events`` progress notifications paced
                                ``interval_ms`` apart, each carrying ``sentNs`` (time.monotonic_ns()
                                at the moment of the write), then the answer
  any request naming an unknown session -> 404 with a JSON-RPC error (as the official SDKs do)
POST /admin/expire           -> forget every session (the next request of each gets 404)
GET  /admin/stats            -> {"sessions": n, "initialize": n}
GET/DELETE /mcp              -> 405 / 200

The server does as little as it can so that what a proxy in front of it costs is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
import uuid

from aiohttp import web

PROTOCOL_VERSION = "2025-06-18"
SESSION_HEADER = "Mcp-Session-Id"

_NOT_FOUND = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32001,"message":"Session not found"}}'


class State:
    def __init__(self) -> None:
        self.sessions: set[str] = set()
        self.initialize = 0


def _result(request_id: object, result: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}, separators=(",", ":")).encode()


def _text_result(request_id: object, text: str) -> bytes:
    return _result(request_id, {"content": [{"type": "text", "text": text}], "isError": False})


def build_app() -> web.Application:
    state = State()
    app = web.Application()

    async def post(request: web.Request) -> web.StreamResponse:
        message = json.loads(await request.read())
        method = message.get("method") if isinstance(message, dict) else None
        if method == "initialize":
            session = uuid.uuid4().hex
            state.sessions.add(session)
            state.initialize += 1
            body = _result(
                message.get("id"),
                {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "bench-upstream", "version": "1"},
                },
            )
            return web.Response(body=body, content_type="application/json", headers={SESSION_HEADER: session})
        if request.headers.get(SESSION_HEADER) not in state.sessions:
            return web.Response(status=404, body=_NOT_FOUND, content_type="application/json")
        if method != "tools/call":
            return web.Response(status=202)
        request_id = message.get("id")
        params = message.get("params") or {}
        name = params.get("name")
        arguments = params.get("arguments") or {}
        if name == "echo":
            body = _text_result(request_id, str(arguments.get("text", "")))
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if name == "stream":
            events = int(arguments.get("events", 10))
            interval = float(arguments.get("interval_ms", 5)) / 1000
            token = (params.get("_meta") or {}).get("progressToken", 1)
            for step in range(1, events + 1):
                await asyncio.sleep(interval)
                params_out = {"progressToken": token, "progress": step, "total": events, "sentNs": time.monotonic_ns()}
                note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": params_out}
                await response.write(b"event: message\ndata: " + json.dumps(note).encode() + b"\n\n")
            body = _text_result(request_id, f"done after {events} events")
        else:
            body = _text_result(request_id, str(arguments.get("text", "")))
        await response.write(b"event: message\ndata: " + body + b"\n\n")
        await response.write_eof()
        return response

    async def get(_: web.Request) -> web.Response:
        return web.Response(status=405)

    async def delete(request: web.Request) -> web.Response:
        state.sessions.discard(request.headers.get(SESSION_HEADER, ""))
        return web.Response(status=200)

    async def expire(_: web.Request) -> web.Response:
        forgotten = len(state.sessions)
        state.sessions.clear()
        return web.json_response({"forgotten": forgotten})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"sessions": len(state.sessions), "initialize": state.initialize})

    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", get, allow_head=False)
    app.router.add_delete("/mcp", delete)
    app.router.add_post("/admin/expire", expire)
    app.router.add_get("/admin/stats", stats)
    return app


async def serve(port: int, context: ssl.SSLContext | None = None) -> None:
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", help="serve https with this certificate (PEM; with --keyfile)")
    parser.add_argument("--keyfile")
    args = parser.parse_args()
    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, context))
    else:
        uvloop.run(serve(args.port, context))


if __name__ == "__main__":
    main()
