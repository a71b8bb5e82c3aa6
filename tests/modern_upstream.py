"""A 2026-07-28-only MCP server for the bridge tests: the official Python SDK server (dual-era) behind a
thin ASGI guard that refuses handshake-era traffic the way the spec says a modern-only server does.

Run it as ``python tests/modern_upstream.py --port N [--json]``. It serves ``/mcp`` on 127.0.0.1 and
``/stats`` (what arrived: initialize attempts refused, tools/call, the last ``_meta`` each method got).

The guard (spec 2026-07-28, basic/transports/streamable-http.mdx "Backward Compatibility" and "Server
Validation", basic/versioning.mdx): GET and DELETE get 405 with ``Allow: POST``; an ``initialize`` gets
400 with -32022 naming the versions spoken (``data.supported``); any other POST whose
``MCP-Protocol-Version`` header is absent gets 400 with -32020 (a required header is missing), and one
naming a handshake-era version gets 400 with -32022. What passes is served by the SDK's modern entry,
which checks the ``_meta`` envelope and the Mcp-Method/Mcp-Name headers itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, ListRoots, Resolve, Sample
from mcp.types import CreateMessageResult, InputRequiredResult, ListRootsResult, SamplingMessage, TextContent
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODERN_VERSION = "2026-07-28"
STATS: dict[str, Any] = {
    "initialize_refused": 0,
    "tools_call": 0,
    "refused": 0,
    "hang_cancelled": 0,
    "steps_done": 0,
    "initialize": 0,
    "meta": {},
    "methods": [],
}

STEP_SECONDS = 0.05

server = MCPServer("modern-only-upstream", instructions="a 2026-07-28-only server for tests")


@server.tool()
async def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
async def steps(count: int, ctx: Context) -> str:
    """Report progress and log one message per step, then finish. Each step takes a moment, as work does:
    the TypeScript SDK client handles notifications a tick after the messages it read with them, and drops
    a progress notification read in one piece with the response that ends its request."""
    for step in range(1, count + 1):
        await ctx.report_progress(step, count, f"step {step}")
        await ctx.info(f"did step {step}")
        await asyncio.sleep(STEP_SECONDS)
    STATS["steps_done"] += 1  # ran to its end: nobody cancelled it
    return f"done after {count} steps"


@server.tool()
async def regional(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})], query: str) -> str:
    """A tool whose region argument is mirrored into the Mcp-Param-Region header (x-mcp-header)."""
    return f"{query} in {region}"


@server.tool()
async def link(ctx: Context) -> str | InputRequiredResult:
    """Send the user to a URL (URL-mode elicitation: 2026-07-28 has no elicitationId), done once accepted."""
    answered = (ctx.input_responses or {}).get("signin")
    if answered is not None:
        return f"linked ({getattr(answered, 'action', None)})"
    request = {
        "method": "elicitation/create",
        "params": {"mode": "url", "message": "Sign in", "url": "https://example.invalid/a"},
    }
    return InputRequiredResult.model_validate({"inputRequests": {"signin": request}, "requestState": "one"})


@server.tool()
async def hang(ctx: Context) -> str:
    """Report progress once, then never finish (a call the test breaks by restarting the server)."""
    await ctx.report_progress(1, 2, "started")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        STATS["hang_cancelled"] += 1  # the client closed the answer: the 2026-07-28 cancellation
        raise
    return "never"


class Name(BaseModel):
    """What ask_name asks the client for."""

    name: str


def ask_for_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)


@server.tool()
async def ask_name(name: Annotated[Name, Resolve(ask_for_name)]) -> str:
    """Ask the client for a name (elicitation: an input_required result in 2026-07-28) and greet it."""
    return f"hello {name.name}"


async def extra() -> str:
    """A tool that add_tool adds."""
    return "extra"


@server.tool()
async def add_tool(ctx: Context) -> str:
    """Add the tool 'extra' and tell listeners the tool list changed."""
    if all(tool.name != "extra" for tool in server._tool_manager.list_tools()):
        server.add_tool(extra, name="extra")
    await ctx.notify_tools_changed()
    return "added extra"


def sample_haiku(text: str) -> Sample:
    return Sample(
        [SamplingMessage(role="user", content=TextContent(type="text", text=f"a haiku about {text}"))], max_tokens=50
    )


@server.tool()
async def haiku(text: str, written: Annotated[CreateMessageResult, Resolve(sample_haiku)]) -> str:
    """Ask the client's model for a haiku (sampling: an input_required result in 2026-07-28)."""
    content = written.content
    return content.text if isinstance(content, TextContent) else "no text"


def ask_roots() -> ListRoots:
    return ListRoots()


@server.tool()
async def roots(listed: Annotated[ListRootsResult, Resolve(ask_roots)]) -> str:
    """The client's roots (roots/list: an input_required result in 2026-07-28)."""
    return ", ".join(str(root.uri) for root in listed.roots)


WATCHED = "file:///watched.txt"


@server.resource(WATCHED)
def watched() -> str:
    """A resource whose updates touch announces."""
    return "watched"


@server.tool()
async def touch(ctx: Context) -> str:
    """Announce that the watched resource changed (to listen streams subscribed to it)."""
    await ctx.notify_resource_updated(WATCHED)
    return "touched"


@server.custom_route("/stats", methods=["GET"])  # type: ignore[untyped-decorator]
async def stats(_: Request) -> JSONResponse:
    # pid: the tests know it is this process that answers on the port (tests/conftest.py, ServerProcess).
    return JSONResponse({**STATS, "pid": os.getpid()})


def _error(status: int, code: int, message: str, request_id: Any = None, data: Any = None) -> tuple[int, bytes]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return status, json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()


# --legacy-only turns the guard around: the server speaks only the handshake era, and answers a 2026-07-28
# request as a legacy server does (a 400 about the missing session, with no modern error).
LEGACY_ONLY = {"on": False}
# --bearer TOKEN: every MCP request needs "Authorization: Bearer TOKEN", else 401 with a challenge.
BEARER: dict[str, str | None] = {"token": None}
CHALLENGE = 'Bearer error="invalid_token", resource_metadata="http://127.0.0.1/.well-known/oauth-protected-resource"'


def refusal(method: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes] | None:
    """What a modern-only server answers a request it does not serve (None: the SDK serves it)."""
    if LEGACY_ONLY["on"]:
        if headers.get("mcp-protocol-version") == MODERN_VERSION:
            # What the TypeScript SDK's legacy server sends a request without a session: an error with a
            # null id, whose code is no modern one.
            return _error(400, -32000, "Bad Request: Mcp-Session-Id header is required")
        return None
    if method in ("GET", "DELETE"):
        return 405, b""
    if method != "POST":
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None  # the SDK answers a parse error
    request_id = parsed.get("id") if isinstance(parsed, dict) else None
    version = headers.get("mcp-protocol-version")
    supported = {"supported": [MODERN_VERSION]}
    if isinstance(parsed, dict) and parsed.get("method") == "initialize":
        STATS["initialize_refused"] += 1
        requested = (parsed.get("params") or {}).get("protocolVersion")
        return _error(400, -32022, "Unsupported protocol version", request_id, {**supported, "requested": requested})
    if version is None:
        return _error(400, -32020, "Header mismatch: the MCP-Protocol-Version header is missing", request_id)
    if version != MODERN_VERSION:
        return _error(400, -32022, "Unsupported protocol version", request_id, {**supported, "requested": version})
    return None


def modern_only(app: ASGIApp) -> ASGIApp:
    """Refuse handshake-era requests before the (dual-era) SDK sees them; count what passes."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/mcp":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while scope["method"] == "POST":
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = BEARER["token"]
        if token is not None and headers.get("authorization") != f"Bearer {token}":
            challenge = [(b"www-authenticate", CHALLENGE.encode()), (b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 401, "headers": challenge})
            await send({"type": "http.response.body", "body": b'{"error": "invalid_token"}'})
            return
        refused = refusal(scope["method"], headers, body)
        if refused is not None:
            STATS["refused"] += 1
            status, payload = refused
            if status == 405:
                extra_headers = [(b"allow", b"POST")]
            elif payload.startswith(b"{"):
                extra_headers = [(b"content-type", b"application/json")]
            else:
                extra_headers = [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": status, "headers": extra_headers})
            await send({"type": "http.response.body", "body": payload})
            return
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("method"), str):
            method = parsed["method"]
            if method == "initialize":
                STATS["initialize"] += 1
            STATS["methods"].append(method)
            params = parsed.get("params")
            if isinstance(params, dict) and isinstance(params.get("_meta"), dict):
                STATS["meta"][method] = params["_meta"]
            if method == "tools/call":
                STATS["tools_call"] += 1
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    return guarded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="answer with application/json where the SDK may")
    parser.add_argument("--legacy-only", action="store_true", help="speak only the handshake era")
    parser.add_argument("--bearer", help="require this bearer token")
    args = parser.parse_args()
    LEGACY_ONLY["on"] = args.legacy_only
    BEARER["token"] = args.bearer
    app = server.streamable_http_app(json_response=args.json, host="127.0.0.1")
    config = uvicorn.Config(modern_only(app), host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
