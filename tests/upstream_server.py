"""The official MCP Python SDK server, run as a separate process for the tests.

Run it as ``python tests/upstream_server.py --port N [--json] [--idle-timeout S] [--certfile PEM --keyfile PEM]``.
It serves a streamable HTTP endpoint at ``/mcp`` on 127.0.0.1, with tools that the tests call, and
``/stats`` that counts the ``initialize`` requests it received (so a test can prove single-flight
healing at the upstream, not by trusting the proxy) and shows the resource subscriptions and logging
level each session holds (so a test can see what a heal gave the new session). A restart is a kill plus a new process on the
same port: the SDK keeps sessions in memory, so every session dies with the process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import GET_STREAM_KEY, EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    EmptyResult,
    JSONRPCMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATS: dict[str, int] = {"initialize": 0, "tools_call": 0}
TRACEPARENTS: collections.deque[str] = collections.deque(maxlen=20)


server = MCPServer("heal-test-upstream")


@server.tool()
async def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


class Name(BaseModel):
    """What ask_name asks the client for."""

    name: str


@server.tool()
async def ask_name(ctx: Context) -> str:
    """Ask the client for a name (a server-to-client elicitation request) and greet it."""
    answer = await ctx.elicit("What is your name?", Name)
    if answer.action != "accept" or answer.data is None:
        return f"no name ({answer.action})"
    return f"hello {answer.data.name}"


# Steps of gated_steps that the test has released (POST /release?step=N); the tool blocks on them.
RELEASED: dict[int, asyncio.Event] = {}
GATE_TIMEOUT = 30.0


def gate(step: int) -> asyncio.Event:
    return RELEASED.setdefault(step, asyncio.Event())


@server.tool()
async def gated_steps(steps: int, ctx: Context) -> str:
    """Report progress for each step, then block until the test releases that step.

    A progress notification that reaches the client while the tool is still blocked proves that the
    answer was streamed, not buffered until the tool finished.
    """
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
        async with asyncio.timeout(GATE_TIMEOUT):
            await gate(step).wait()
    return f"done after {steps} steps"


# Per upstream session id: the subscribed resource URIs and the logging level, as the client set them.
SESSION_STATE: dict[str, dict[str, Any]] = {}
# A subscribe takes this long to answer, as one that checks the resource would: two sent together are
# in flight together, which is what a test of concurrent state changes needs.
SUBSCRIBE_LATENCY = 0.3


def session_state(ctx: ServerRequestContext[Any, Any]) -> dict[str, Any]:
    session_id = ctx.request.headers.get("mcp-session-id", "") if ctx.request is not None else ""
    return SESSION_STATE.setdefault(session_id, {"subscriptions": [], "level": None})


# A resource the server refuses subscriptions to (a JSON-RPC error inside HTTP 200).
REFUSED_URI = "file:///refused"


async def on_subscribe(ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
    await asyncio.sleep(SUBSCRIBE_LATENCY)
    if params.uri == REFUSED_URI:
        raise MCPError(INVALID_PARAMS, f"cannot subscribe to {params.uri}")
    subscriptions = session_state(ctx)["subscriptions"]
    if params.uri not in subscriptions:
        subscriptions.append(params.uri)
    return EmptyResult()


async def on_unsubscribe(ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
    subscriptions = session_state(ctx)["subscriptions"]
    if params.uri in subscriptions:
        subscriptions.remove(params.uri)
    return EmptyResult()


async def on_set_level(ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
    session_state(ctx)["level"] = params.level
    return EmptyResult()


server._lowlevel_server.add_request_handler("resources/subscribe", SubscribeRequestParams, on_subscribe)
server._lowlevel_server.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, on_unsubscribe)
server._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, on_set_level)


@server.custom_route("/release", methods=["POST"])  # type: ignore[untyped-decorator]
async def release(request: Request) -> JSONResponse:
    """Let gated_steps go past one step."""
    gate(int(request.query_params["step"])).set()
    return JSONResponse({"released": int(request.query_params["step"])})


@server.custom_route("/forget", methods=["POST"])  # type: ignore[untyped-decorator]
async def forget(_: Request) -> JSONResponse:
    """Forget every session without closing its streams: requests on them answer 404 from now on, while
    a server stream already open goes on (open, and silent for good). A failover to a replica that never
    saw the sessions does this, as does a server whose session table lost its entries."""
    forgotten = list(server.session_manager._server_instances)
    server.session_manager._server_instances.clear()
    return JSONResponse({"forgotten": forgotten})


@server.tool()
async def announce(uri: str, ctx: Context) -> str:
    """Send resources/updated for ``uri`` on the session's server stream (the GET stream: a notification
    of the server's own, related to no request); the SDK drops it when that stream is not open."""
    await ctx.session.send_resource_updated(uri)
    return f"announced {uri}"


@server.custom_route("/stats", methods=["GET"])  # type: ignore[untyped-decorator]
async def stats(_: Request) -> JSONResponse:
    """How many initialize and tools/call requests arrived since start, the live session ids, and the
    state (subscriptions, level) each session was given."""
    # Reading the SDK's private session table lets a test wait for an idle expiry without touching
    # the session (any request on it would reset its idle timer).
    instances = server.session_manager._server_instances
    live = sorted(instances)
    # The sessions with a server stream (GET) open: what a test waits for before announce.
    listening = sorted(sid for sid, transport in instances.items() if GET_STREAM_KEY in transport._request_streams)
    # pid: the tests know it is this process that answers on the port, not another one that took it.
    return JSONResponse(
        {
            **STATS,
            "live_sessions": live,
            "listening": listening,
            "state": SESSION_STATE,
            "traceparents": list(TRACEPARENTS),
            "pid": os.getpid(),
        }
    )


class MemoryEventStore(EventStore):
    """Numbered events kept in memory, so that clients can resume a stream (Last-Event-ID); they die
    with the process, as a restart of a server without a durable store loses them."""

    def __init__(self) -> None:
        self._events: list[tuple[StreamId, EventId, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = str(len(self._events) + 1)
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        found = next((index for index, event in enumerate(self._events) if event[1] == last_event_id), None)
        if found is None:
            return None
        stream_id = self._events[found][0]
        for event_stream, event_id, message in self._events[found + 1 :]:
            if event_stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def counting(app: ASGIApp) -> ASGIApp:
    """Count initialize and tools/call POSTs before the SDK sees them."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(item, dict) and item.get("method") == "initialize":
                STATS["initialize"] += 1
            if isinstance(item, dict) and item.get("method") == "tools/call":
                STATS["tools_call"] += 1
                # The trace context the call came with (tests/test_otel.py: whose context went upstream).
                meta = (item.get("params") or {}).get("_meta") or {}
                if isinstance(meta, dict) and isinstance(meta.get("traceparent"), str):
                    TRACEPARENTS.append(meta["traceparent"])
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    return wrapped


def closing(app: ASGIApp) -> ASGIApp:
    """Every response says ``Connection: close``: each request of a client takes a new connection."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await app(scope, receive, send_closing)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="answer with application/json, not SSE")
    parser.add_argument("--idle-timeout", type=float, default=None, help="session idle TTL in seconds")
    parser.add_argument("--resumable", action="store_true", help="number events so clients can resume streams")
    parser.add_argument("--certfile", help="serve https with this certificate (PEM, chain included)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    parser.add_argument("--client-ca", help="require a client certificate issued by this CA (PEM)")
    parser.add_argument(
        "--close-connections", action="store_true", help="end every connection after its response (no keep-alive)"
    )
    args = parser.parse_args()
    app = server.streamable_http_app(
        json_response=args.json,
        session_idle_timeout=args.idle_timeout,
        event_store=MemoryEventStore() if args.resumable else None,
        host="127.0.0.1",
    )
    asgi = counting(app)
    if args.close_connections:
        asgi = closing(asgi)
    tls: dict[str, Any] = {}
    if args.certfile:
        tls = {"ssl_certfile": args.certfile, "ssl_keyfile": args.keyfile}
    if args.client_ca:
        tls |= {"ssl_ca_certs": args.client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(asgi, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on", **tls)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
