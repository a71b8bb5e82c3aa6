"""``mcp-heal-proxy demo``: watch the proxy heal an expired session, with no server of your own.

Three pieces run in this one process on free loopback ports:

- a tiny Streamable HTTP MCP server (``DemoUpstream``) that forgets a session after ``ttl`` seconds
  without requests and then answers 404 with JSON-RPC "Session not found", as the Python SDK does;
- the proxy in front of it, built by ``build_app`` exactly as ``serve`` builds it;
- a scripted client (``DemoClient``, raw aiohttp) that initializes, calls a tool, stays idle past the
  TTL, and calls again on the same client session id.

The demo prints a timeline and returns 0 when the second call succeeded after exactly one
re-initialize at the upstream, 1 otherwise. The upstream counts what it receives, so the verdict
comes from the server's side, not from trusting the proxy. Neither the server nor the client uses
the ``mcp`` SDK: it is a test-only dependency.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TextIO

import aiohttp
from aiohttp import web

from mcp_heal_proxy import __version__
from mcp_heal_proxy.config import ENDPOINT_PATH, MEMORY_STATE, single_upstream
from mcp_heal_proxy.front.app import FAST_PATH_KEY, build_app
from mcp_heal_proxy.front.http1 import FastSite
from mcp_heal_proxy.wire.headers import MCP_PROTOCOL_VERSION, MCP_SESSION_ID
from mcp_heal_proxy.wire.jsonrpc import INITIALIZE, INITIALIZED, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR
from mcp_heal_proxy.wire.sse import Event, SSEParser

DEFAULT_TTL: Final = 2.0
# How much longer than the TTL the client stays idle: enough for the upstream's timer to have fired.
IDLE_MARGIN: Final = 0.5
# The whole demo, TTL included, must end within this many seconds beyond the TTL, whatever happens.
DEADLINE_BEYOND_TTL: Final = 20.0
PROTOCOL_VERSION: Final = "2025-06-18"
SUPPORTED_VERSIONS: Final = frozenset({"2025-03-26", "2025-06-18", "2025-11-25"})
INVALID_PARAMS: Final = -32602
TOOLS_CALL: Final = "tools/call"
# The Python SDK's answer to a request on a session it does not know (PROTOCOL.md).
SESSION_NOT_FOUND: Final = "Session not found"
_JSON_TYPE: Final = "application/json"


def _short(session_id: str) -> str:
    """Enough of a session id to tell sessions apart in the timeline."""
    return session_id[:8]


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _result(request_id: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": dict(result)}


# --- the upstream -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamEvent:
    """Something the demo upstream saw: ``kind`` is initialize, initialized, tools_call, expired or not_found."""

    kind: str
    session_id: str
    wall: float  # time.time(), for the timeline
    mono: float  # time.perf_counter(), for durations


class DemoUpstream:
    """A minimal Streamable HTTP MCP server with one ``echo`` tool and an idle TTL per session.

    Answers are plain JSON (no SSE). The TTL is a timer per session, restarted by every request on
    it; when it fires the session is forgotten, and any later request naming it gets 404.
    """

    def __init__(self, ttl: float = DEFAULT_TTL, on_event: Callable[[UpstreamEvent], None] | None = None) -> None:
        self.ttl = ttl
        self.events: list[UpstreamEvent] = []
        self._on_event = on_event
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.app = web.Application()
        self.app.router.add_post(ENDPOINT_PATH, self._post)
        self.app.router.add_get(ENDPOINT_PATH, self._get, allow_head=False)
        self.app.router.add_delete(ENDPOINT_PATH, self._delete)
        self.app.on_cleanup.append(self._cleanup)

    def count(self, kind: str) -> int:
        """How many events of this kind happened so far."""
        return sum(1 for event in self.events if event.kind == kind)

    def first(self, kind: str) -> UpstreamEvent | None:
        """The earliest event of this kind, if any."""
        return next((event for event in self.events if event.kind == kind), None)

    def _record(self, kind: str, session_id: str) -> None:
        event = UpstreamEvent(kind, session_id, time.time(), time.perf_counter())
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _touch(self, session_id: str) -> None:
        """Restart the session's idle timer."""
        timer = self._timers.get(session_id)
        if timer is not None:
            timer.cancel()
        self._timers[session_id] = asyncio.get_running_loop().call_later(self.ttl, self._expire, session_id)

    def _expire(self, session_id: str) -> None:
        if self._timers.pop(session_id, None) is not None:
            self._record("expired", session_id)

    async def _cleanup(self, _: web.Application) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    @staticmethod
    def _reply(payload: Mapping[str, Any], status: int = 200, session_id: str | None = None) -> web.Response:
        headers = {MCP_SESSION_ID: session_id} if session_id is not None else None
        return web.json_response(dict(payload), status=status, headers=headers)

    async def _post(self, request: web.Request) -> web.Response:
        if not request.headers.get("Content-Type", "").startswith(_JSON_TYPE):
            return self._reply(_error(None, INVALID_REQUEST, "Content-Type must be application/json"), 415)
        try:
            message = json.loads(await request.read())
        except (ValueError, RecursionError):
            return self._reply(_error(None, PARSE_ERROR, "Parse error"), 400)
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return self._reply(_error(None, INVALID_REQUEST, "one JSON-RPC 2.0 message per POST"), 400)

        session_id = request.headers.get(MCP_SESSION_ID)
        if session_id is not None and session_id not in self._timers:
            # Checked before anything else, as the SDK does: even an initialize naming a dead session gets 404.
            self._record("not_found", session_id)
            return self._reply(_error(None, INVALID_REQUEST, SESSION_NOT_FOUND), 404)

        method = message.get("method")
        request_id = message.get("id")
        if method == INITIALIZE:
            if session_id is not None:
                return self._reply(_error(request_id, INVALID_REQUEST, "session already initialized"), 400)
            return self._initialize(request_id, message.get("params"))
        if session_id is None:
            return self._reply(_error(request_id, INVALID_REQUEST, "Bad Request: Missing session ID"), 400)
        self._touch(session_id)
        if "id" not in message or not isinstance(method, str):
            # A notification, or the client's answer to a server request: accepted, nothing to say.
            if method == INITIALIZED:
                self._record("initialized", session_id)
            return web.Response(status=202)
        return self._reply(self._answer(session_id, request_id, method, message.get("params")))

    def _initialize(self, request_id: Any, params: Any) -> web.Response:
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        version = requested if requested in SUPPORTED_VERSIONS else PROTOCOL_VERSION
        session_id = secrets.token_hex(16)
        self._touch(session_id)
        self._record("initialize", session_id)
        result: dict[str, Any] = {
            "protocolVersion": version,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "mcp-heal-proxy-demo-upstream", "version": __version__},
        }
        return self._reply(_result(request_id, result), session_id=session_id)

    def _answer(self, session_id: str, request_id: Any, method: str, params: Any) -> dict[str, Any]:
        if method == "ping":
            return _result(request_id, {})
        if method == "tools/list":
            echo = {
                "name": "echo",
                "description": "Return the text unchanged.",
                "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            }
            return _result(request_id, {"tools": [echo]})
        if method == TOOLS_CALL:
            params = params if isinstance(params, dict) else {}
            arguments = params.get("arguments")
            if params.get("name") != "echo" or not isinstance(arguments, dict):
                return _error(request_id, INVALID_PARAMS, "unknown tool or bad arguments")
            self._record("tools_call", session_id)
            content = [{"type": "text", "text": str(arguments.get("text", ""))}]
            return _result(request_id, {"content": content, "isError": False})
        return _error(request_id, METHOD_NOT_FOUND, f"Method not found: {method}")

    async def _get(self, _: web.Request) -> web.Response:
        # No server-to-client stream: the spec's answer for that is 405.
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    async def _delete(self, request: web.Request) -> web.Response:
        session_id = request.headers.get(MCP_SESSION_ID, "")
        timer = self._timers.pop(session_id, None)
        if timer is None:
            return self._reply(_error(None, INVALID_REQUEST, SESSION_NOT_FOUND), 404)
        timer.cancel()
        return web.Response(status=200)


# --- the client -------------------------------------------------------------------------------------


class DemoFailure(Exception):
    """The demo did not show what it promises; the message says what went wrong."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer to one JSON-RPC request."""

    status: int
    message: Mapping[str, Any] | None
    session_id: str | None

    def describe(self) -> str:
        """The answer in a few words, for the timeline."""
        error = self.message.get("error") if self.message is not None else None
        if isinstance(error, dict):
            return f"HTTP {self.status} {error.get('message')!r}"
        return f"HTTP {self.status}"


async def _read_message(response: aiohttp.ClientResponse, request_id: int) -> Mapping[str, Any] | None:
    """The JSON-RPC message answering ``request_id``, from a JSON or an SSE answer."""
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        parser = SSEParser()
        async for chunk in response.content.iter_any():
            for item in parser.feed(chunk):
                if isinstance(item, Event) and item.data:
                    message = json.loads(item.data)
                    if isinstance(message, dict) and message.get("id") == request_id:
                        return message
        return None
    try:
        message = json.loads(await response.read())
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class DemoClient:
    """A Streamable HTTP MCP client in a few lines of aiohttp: just what the demo needs."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.url = url
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self._http = http
        self._next_id = 0

    async def post(self, payload: Mapping[str, Any], session_id: str | None = None) -> Answer:
        """POST one JSON-RPC message, on ``session_id`` if given, else on this client's session."""
        headers = {"Content-Type": _JSON_TYPE, "Accept": f"{_JSON_TYPE}, text/event-stream"}
        sid = session_id if session_id is not None else self.session_id
        if sid is not None:
            headers[MCP_SESSION_ID] = sid
        if self.protocol_version is not None:
            headers[MCP_PROTOCOL_VERSION] = self.protocol_version
        async with self._http.post(self.url, data=json.dumps(payload), headers=headers) as response:
            message = None
            if response.status != 202:
                message = await _read_message(response, payload.get("id", -1))
            return Answer(response.status, message, response.headers.get(MCP_SESSION_ID))

    async def request(self, method: str, params: Mapping[str, Any], session_id: str | None = None) -> Answer:
        """Send a JSON-RPC request and return its answer."""
        self._next_id += 1
        return await self.post(
            {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": dict(params)}, session_id
        )

    async def initialize(self) -> None:
        """initialize, then notifications/initialized."""
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mcp-heal-proxy-demo-client", "version": __version__},
        }
        answer = await self.request(INITIALIZE, params)
        result = answer.message.get("result") if answer.message is not None else None
        if answer.status != 200 or not isinstance(result, dict) or answer.session_id is None:
            raise DemoFailure(f"initialize through the proxy failed: {answer.describe()}")
        self.session_id = answer.session_id
        self.protocol_version = str(result.get("protocolVersion", PROTOCOL_VERSION))
        answer = await self.post({"jsonrpc": "2.0", "method": INITIALIZED})
        if answer.status != 202:
            raise DemoFailure(f"notifications/initialized through the proxy failed: {answer.describe()}")

    async def echo(self, text: str) -> str:
        """Call the ``echo`` tool; return its text, or raise DemoFailure with what came back instead."""
        answer = await self.request(TOOLS_CALL, {"name": "echo", "arguments": {"text": text}})
        result = answer.message.get("result") if answer.message is not None else None
        if answer.status != 200 or not isinstance(result, dict) or result.get("isError"):
            raise DemoFailure(answer.describe())
        if answer.session_id is not None and answer.session_id != self.session_id:
            raise DemoFailure(f"the answer carried another session id ({_short(answer.session_id)})")
        content = result.get("content")
        if not isinstance(content, list) or not content or not isinstance(content[0], dict):
            raise DemoFailure("the tool answered without text content")
        return str(content[0].get("text"))


# --- the timeline and the script --------------------------------------------------------------------


class Timeline:
    """Prints ``HH:MM:SS.mmm  who  what`` lines as they happen."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def say(self, who: str, text: str, at: float | None = None) -> None:
        """One line of the timeline; ``at`` is a time.time() value (default: now)."""
        stamp = datetime.fromtimestamp(time.time() if at is None else at).strftime("%H:%M:%S.%f")[:-3]
        print(f"{stamp}  {who:<8}  {text}", file=self._out, flush=True)

    def plain(self, text: str = "") -> None:
        """A line without a time stamp."""
        print(text, file=self._out, flush=True)

    def upstream_event(self, event: UpstreamEvent, upstream: DemoUpstream) -> None:
        """The upstream's events worth a line: sessions opened and forgotten."""
        if event.kind == "initialize":
            number = upstream.count("initialize")
            self.say("upstream", f"session {_short(event.session_id)} opened (initialize #{number})", event.wall)
        elif event.kind == "expired":
            self.say(
                "upstream", f"session {_short(event.session_id)} expired after {upstream.ttl:g} s idle", event.wall
            )


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yield its MCP endpoint URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        # The proxy's app is served as `serve` serves it (its own HTTP server in front); the demo upstream's
        # by aiohttp alone.
        site: web.BaseSite = (
            FastSite(runner, "127.0.0.1", 0, app[FAST_PATH_KEY])
            if FAST_PATH_KEY in app
            else web.TCPSite(runner, "127.0.0.1", 0)
        )
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}{ENDPOINT_PATH}"
    finally:
        await runner.cleanup()


async def run_demo(out: TextIO, *, ttl: float = DEFAULT_TTL) -> int:
    """Run the whole demo, printing its timeline to ``out``; 0 if the proxy healed the session, else 1."""
    timeline = Timeline(out)
    timeline.plain(
        f"mcp-heal-proxy {__version__} demo: an MCP server that forgets idle sessions, and the proxy in front"
    )
    timeline.plain()
    try:
        async with asyncio.timeout(ttl + DEADLINE_BEYOND_TTL):
            await _script(timeline, ttl)
    except DemoFailure as exc:
        timeline.plain()
        timeline.plain(f"demo FAILED: {exc}")
        return 1
    except TimeoutError:
        timeline.plain()
        timeline.plain(f"demo FAILED: did not finish within {ttl + DEADLINE_BEYOND_TTL:g} s")
        return 1
    except aiohttp.ClientError as exc:
        timeline.plain()
        timeline.plain(f"demo FAILED: HTTP error on loopback: {exc!r}")
        return 1
    return 0


async def _script(timeline: Timeline, ttl: float) -> None:
    upstream: DemoUpstream | None = None

    def on_event(event: UpstreamEvent) -> None:
        assert upstream is not None
        timeline.upstream_event(event, upstream)

    upstream = DemoUpstream(ttl, on_event)
    timeout = aiohttp.ClientTimeout(total=10)
    async with serving(upstream.app) as upstream_url:
        timeline.say("upstream", f"demo MCP server at {upstream_url}, forgets a session after {ttl:g} s idle")
        # In memory: the demo leaves nothing behind in the user's state directory.
        proxy_config = single_upstream(upstream_url, port=0, state=MEMORY_STATE)
        async with serving(build_app(proxy_config)) as proxy_url, aiohttp.ClientSession(timeout=timeout) as http:
            timeline.say("proxy", f"mcp-heal-proxy at {proxy_url}, forwarding to the demo server")
            await _talk(timeline, upstream, DemoClient(http, proxy_url), DemoClient(http, upstream_url))


async def _talk(timeline: Timeline, upstream: DemoUpstream, client: DemoClient, direct: DemoClient) -> None:
    await client.initialize()
    assert client.session_id is not None
    client_sid = _short(client.session_id)
    timeline.say("client", f"initialized through the proxy: client session id {client_sid}")

    started = time.perf_counter()
    try:
        text = await client.echo("hello")
    except DemoFailure as exc:
        raise DemoFailure(f"call 1 failed before any expiry: {exc}") from None
    timeline.say("client", f"call 1 ok ({(time.perf_counter() - started) * 1000:.1f} ms): echo -> {text!r}")

    idle = upstream.ttl + IDLE_MARGIN
    timeline.say("client", f"idle for {idle:g} s, longer than the server's {upstream.ttl:g} s session TTL ...")
    # The point of the demo: stay quiet long enough for the upstream to forget the session.
    await asyncio.sleep(idle)
    opened = upstream.first("initialize")
    if opened is None or upstream.count("expired") != 1:
        raise DemoFailure("the demo server did not expire the idle session")

    # What a client talking to the upstream directly would get now, on the id the server gave it.
    direct.protocol_version = client.protocol_version
    answer = await direct.request(TOOLS_CALL, {"name": "echo", "arguments": {"text": "hello"}}, opened.session_id)
    timeline.say(
        "direct", f"a client without the proxy, same call on session {_short(opened.session_id)}: {answer.describe()}"
    )
    if answer.status != 404:
        raise DemoFailure(f"the demo server answered the expired session with {answer.describe()}, not 404")

    started = time.perf_counter()
    try:
        text = await client.echo("hello again")
    except DemoFailure as exc:
        raise DemoFailure(f"call 2 through the proxy failed: {exc}; the proxy did not heal the session") from None
    call_ms = (time.perf_counter() - started) * 1000

    reinitializes = upstream.count("initialize") - 1
    if reinitializes != 1:
        raise DemoFailure(f"expected exactly 1 re-initialize at the demo server, it saw {reinitializes}")
    new_session = [event for event in upstream.events if event.kind == "initialize"][-1].session_id
    handshake = next((e for e in upstream.events if e.kind == "initialized" and e.session_id == new_session), None)
    replays = [e for e in upstream.events if e.kind == "tools_call" and e.session_id == new_session]
    rejected = [
        e for e in upstream.events if e.kind == "not_found" and handshake is not None and e.mono < handshake.mono
    ]
    if handshake is None or not rejected or len(replays) != 1:
        raise DemoFailure("the demo server did not see initialize, notifications/initialized and one replayed call")
    heal_ms = (handshake.mono - rejected[-1].mono) * 1000
    timeline.say(
        "proxy",
        f"got 404, re-initialized the upstream in {heal_ms:.1f} ms "
        f"(initialize + notifications/initialized), replayed tools/call once",
        handshake.wall,
    )
    timeline.say("client", f"call 2 ok ({call_ms:.1f} ms) on the same client session id {client_sid}: echo -> {text!r}")
    timeline.plain()
    timeline.plain(
        "healed: the server forgot the session, the client never noticed "
        f"(1 re-initialize at the server, session id {client_sid} kept)."
    )
