"""A fake model for ``codex exec``: the OpenAI Responses API over SSE, on 127.0.0.1, scripted.

The script does not depend on request counts but on what the request carries, so a retried request
gets the same answer:

1. no tool output in the input yet: ask for the MCP ``echo`` tool with ``FIRST_TEXT`` (as the
   argument named ``argument``: ``text`` for tests/upstream_server.py, ``message`` for server-everything);
2. the first call's output is in: run ``between_calls`` (the harness restarts the MCP upstream), then
   ask for the tool again with ``SECOND_TEXT``;
3. the second call's output is in: answer with a final assistant message.

Every request body is kept, so the test can check what reached the model.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.test_utils import TestServer

FIRST_CALL_ID: Final = "call_first"
SECOND_CALL_ID: Final = "call_second"
FIRST_TEXT: Final = "interop-before-restart"
SECOND_TEXT: Final = "interop-after-restart"
FINAL_MESSAGE: Final = "interop: both tool calls done"
TOOL_SUFFIX: Final = "echo"


def _sse(payload: dict[str, Any]) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()


def _created(response_id: str) -> dict[str, Any]:
    return {"type": "response.created", "response": {"id": response_id}}


def _completed(response_id: str) -> dict[str, Any]:
    usage = {
        "input_tokens": 0,
        "input_tokens_details": None,
        "output_tokens": 0,
        "output_tokens_details": None,
        "total_tokens": 0,
    }
    return {"type": "response.completed", "response": {"id": response_id, "usage": usage}}


def _function_call(call_id: str, tool: tuple[str, str | None], arguments: dict[str, Any]) -> dict[str, Any]:
    name, namespace = tool
    item = {"type": "function_call", "call_id": call_id, "name": name, "arguments": json.dumps(arguments)}
    if namespace is not None:
        item["namespace"] = namespace
    return {"type": "response.output_item.done", "item": item}


def _assistant_message(text: str) -> dict[str, Any]:
    item = {
        "type": "message",
        "role": "assistant",
        "id": "msg_final",
        "content": [{"type": "output_text", "text": text}],
    }
    return {"type": "response.output_item.done", "item": item}


def tool_outputs(body: dict[str, Any]) -> dict[str, str]:
    """The function_call_output items of a Responses request, by call id, as text."""
    outputs: dict[str, str] = {}
    items = body.get("input")
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            output = item.get("output")
            outputs[str(item.get("call_id"))] = output if isinstance(output, str) else json.dumps(output)
    return outputs


def _tool_name(body: dict[str, Any]) -> tuple[str, str | None]:
    """The MCP echo tool's name, and its namespace: Codex 0.105 offers ``mcp__SERVER__echo``, Codex
    0.169 a ``namespace`` tool ``mcp__SERVER`` holding ``echo``."""
    tools = body.get("tools")
    offered = [tool for tool in (tools if isinstance(tools, list) else []) if isinstance(tool, dict)]
    names = [str(tool["name"]) for tool in offered if isinstance(tool.get("name"), str)]
    for name in names:
        if name.endswith(TOOL_SUFFIX) and "mcp" in name:
            return name, None
    for tool in offered:
        if tool.get("type") == "namespace" and str(tool.get("name", "")).startswith("mcp"):
            for inner in tool.get("tools") or []:
                if isinstance(inner, dict) and inner.get("name") == TOOL_SUFFIX:
                    return TOOL_SUFFIX, str(tool["name"])
    raise LookupError(f"no MCP echo tool offered to the model; tools: {names}")


class FakeModel:
    """The scripted model server."""

    def __init__(self, between_calls: Callable[[], Awaitable[None]], *, argument: str = "text") -> None:
        self.between_calls = between_calls
        self.argument = argument
        self.requests: list[dict[str, Any]] = []
        self.unexpected: list[str] = []
        self.restarted = False
        self._server: TestServer | None = None

    @property
    def base_url(self) -> str:
        """What Codex's model provider ``base_url`` must be."""
        assert self._server is not None
        return str(self._server.make_url("/v1"))

    async def start(self) -> None:
        """Listen on 127.0.0.1, on a free port."""
        app = web.Application()
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_route("*", "/{tail:.*}", self._unexpected)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server()

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            await self._server.close()

    def final_outputs(self) -> dict[str, str]:
        """The tool outputs in the last request the model received."""
        return tool_outputs(self.requests[-1]) if self.requests else {}

    async def _unexpected(self, request: web.Request) -> web.Response:
        self.unexpected.append(f"{request.method} {request.path}")
        return web.Response(status=404)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        outputs = tool_outputs(body)
        response_id = f"resp_{len(self.requests)}"
        events = [_created(response_id)]
        if FIRST_CALL_ID not in outputs:
            events.append(_function_call(FIRST_CALL_ID, _tool_name(body), {self.argument: FIRST_TEXT}))
        elif SECOND_CALL_ID not in outputs:
            if not self.restarted:
                await self.between_calls()
                self.restarted = True
            events.append(_function_call(SECOND_CALL_ID, _tool_name(body), {self.argument: SECOND_TEXT}))
        else:
            events.append(_assistant_message(FINAL_MESSAGE))
        events.append(_completed(response_id))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for event in events:
            await response.write(_sse(event))
        await response.write_eof()
        return response
