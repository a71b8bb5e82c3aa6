"""Learn the negotiated protocol version from the initialize answer while it streams to the client."""

from __future__ import annotations

import json
from typing import Final

from mcp_heal_proxy.jsonrpc import RequestId
from mcp_heal_proxy.sse import Event, SSEParser

# An initialize answer is one small message; stop looking after this much.
_WATCH_LIMIT: Final = 256 * 1024


class InitializeAnswerWatcher:
    """Fed the bytes of the initialize answer (JSON or SSE); finds ``result.protocolVersion``."""

    def __init__(self, request_id: RequestId, content_type: str) -> None:
        self._request_id = request_id
        self._parser = SSEParser() if content_type.startswith("text/event-stream") else None
        self._json = bytearray()
        self._seen = 0
        self.protocol_version: str | None = None

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk of the answer."""
        if self.protocol_version is not None or self._seen > _WATCH_LIMIT:
            return
        self._seen += len(chunk)
        if self._parser is None:
            self._json += chunk
            self._consider(bytes(self._json))
            return
        for item in self._parser.feed(chunk):
            if isinstance(item, Event) and item.data:
                self._consider(item.data.encode())

    def _consider(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return  # incomplete JSON: more chunks to come
        if not isinstance(message, dict) or message.get("id") != self._request_id:
            return
        result = message.get("result")
        if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
            self.protocol_version = result["protocolVersion"]
