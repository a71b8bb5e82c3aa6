"""JSON-RPC error answers as aiohttp responses, for every front and for auth/ (which fronts import,
so it cannot import them back)."""

from __future__ import annotations

from aiohttp import web

from mcp_heal_proxy.wire import jsonrpc


def json_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON-RPC error body (id null: the request was refused before it was read)."""
    body = jsonrpc.error_body((None,), code, message, is_batch=False)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
