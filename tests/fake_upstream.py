"""A scriptable stand-in MCP upstream for fault injection (never in place of the real SDK server).

It speaks just enough Streamable HTTP: initialize opens a session, notifications/initialized gets 202,
``echo`` answers as JSON. Tests flip its behaviour to make it forget sessions, die during a heal,
hang, or answer in the odd ways real servers do.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Behaviour = Callable[[web.Request, Any], Awaitable[web.StreamResponse | None]]


@dataclass
class Seen:
    """One request as the fake upstream received it."""

    method: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeUpstream:
    """State and knobs of the fake upstream."""

    sessions: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    initializes: int = 0
    # Called for every initialize after the first; return a response to override the normal answer.
    on_reinitialize: Behaviour | None = None
    # Called for every session request (not initialize); return a response to override.
    on_request: Behaviour | None = None
    # Called for every GET on a live session; return a response to override the one-event stream.
    on_get: Behaviour | None = None
    # Called for every DELETE; return a response to override the normal answer (200, or 404 if unknown).
    on_delete: Behaviour | None = None
    # The protocol version re-initializes negotiate (the first initialize always gets 2025-11-25).
    reinitialize_version: str = "2025-11-25"
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def forget_all(self) -> None:
        """The upstream restarted: every session is gone."""
        self.sessions.clear()

    def app(self) -> web.Application:
        """The aiohttp app serving /mcp."""
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request."""
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.seen.append(Seen(request.method, dict(request.headers), body))
        session_id = request.headers.get("Mcp-Session-Id")
        if request.method == "DELETE":
            if self.on_delete is not None:
                override = await self.on_delete(request, body)
                if override is not None:
                    return override
            if session_id in self.sessions:
                self.sessions.discard(session_id)
                return web.Response(status=200)
            return not_found()
        if request.method == "GET":
            if session_id not in self.sessions:
                return not_found()
            if self.on_get is not None:
                override = await self.on_get(request, body)
                if override is not None:
                    return override
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'id: 1\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n')
            return response
        if isinstance(body, dict) and body.get("method") == "initialize":
            self.initializes += 1
            if self.initializes > 1 and self.on_reinitialize is not None:
                override = await self.on_reinitialize(request, body)
                if override is not None:
                    return override
            new_id = f"upstream-{next(self._ids)}"
            self.sessions.add(new_id)
            version = "2025-11-25" if self.initializes == 1 else self.reinitialize_version
            result = {
                "protocolVersion": version,
                "capabilities": {},
                "serverInfo": {"name": "fake", "version": "1"},
            }
            return web.json_response(
                {"jsonrpc": "2.0", "id": body["id"], "result": result}, headers={"Mcp-Session-Id": new_id}
            )
        if self.on_request is not None:
            override = await self.on_request(request, body)
            if override is not None:
                return override
        if session_id not in self.sessions:
            return not_found()
        if isinstance(body, dict) and "id" in body and "method" in body:
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"echo": body.get("params")}})
        return web.Response(status=202)

    def count(self, method: str) -> int:
        """How many POSTs carried this JSON-RPC method."""
        return sum(1 for seen in self.seen if isinstance(seen.body, dict) and seen.body.get("method") == method)


def not_found() -> web.Response:
    """The Python SDK's answer for an unknown session."""
    return web.json_response(
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}, status=404
    )


async def hang_forever(request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
    """Accept the request and never answer (bounded by the test's own timeout)."""
    await asyncio.Event().wait()
    return None


async def drop_connection(request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
    """Die mid-request: close the socket without an answer."""
    assert request.transport is not None
    request.transport.close()
    raise asyncio.CancelledError


async def answer_404(request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
    """Refuse with 404, as a server that forgot everything would."""
    return not_found()
