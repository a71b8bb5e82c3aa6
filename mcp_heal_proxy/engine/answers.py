"""Watching an upstream answer stream for the JSON-RPC responses it carries, while it is forwarded.

Two uses: learn the negotiated protocol version from the initialize answer, and know which requests of
a POST were still unanswered when the upstream broke its SSE stream, so that the client gets an error
for each of them instead of waiting forever. JSON is parsed lazily: on the success path the tracker
only splits events and keeps the few whose data could be a response.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from mcp_heal_proxy.wire.content_coding import decoder_for
from mcp_heal_proxy.wire.jsonrpc import RequestId
from mcp_heal_proxy.wire.sse import Event, SSEParser

# A JSON answer (not SSE) is only watched for initialize, whose answer is one small message.
_JSON_WATCH_LIMIT: Final = 256 * 1024


class AnswerTracker:
    """Fed the bytes of an answer (SSE or JSON) as they are forwarded."""

    __slots__ = ("_candidates", "_decode", "_json", "_parser", "_request_ids")

    def __init__(
        self, request_ids: Iterable[RequestId], content_type: str, content_encoding: str | None = None
    ) -> None:
        self._request_ids = frozenset(request_ids)
        # An answer compressed against the proxy's wish is forwarded as it is, and read decoded here.
        self._decode = decoder_for(content_encoding)
        self._parser = SSEParser() if content_type.startswith("text/event-stream") else None
        self._json: bytearray | None = None if self._parser is not None else bytearray()
        self._candidates: list[str] = []

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk of the answer."""
        if self._decode is not None:
            chunk = self._decode(chunk)
        if self._parser is None:
            assert self._json is not None
            if len(self._json) < _JSON_WATCH_LIMIT:
                self._json += chunk
            return
        for item in self._parser.feed(chunk):
            # Only an event that mentions a result or an error can be a response: keep it unparsed.
            if isinstance(item, Event) and ('"result"' in item.data or '"error"' in item.data):
                self._candidates.append(item.data)

    def answers(self) -> dict[RequestId, Mapping[str, Any]]:
        """The responses seen so far to the tracked request ids."""
        found: dict[RequestId, Mapping[str, Any]] = {}
        texts = [bytes(self._json)] if self._json is not None else self._candidates
        for text in texts:
            try:
                payload = json.loads(text)
            except (ValueError, RecursionError):
                continue
            for message in payload if isinstance(payload, list) else [payload]:
                if not isinstance(message, dict) or ("result" not in message and "error" not in message):
                    continue
                request_id = message.get("id")
                if isinstance(request_id, str | int) and request_id in self._request_ids:
                    found[request_id] = message
        return found

    @property
    def resumable(self) -> bool:
        """Whether the upstream numbered its events, so that a client can resume the stream by GET with
        Last-Event-ID (the spec's way to finish an answer after the stream closed early)."""
        return self._parser is not None and self._parser.last_event_id is not None

    @property
    def last_event_id(self) -> str | None:
        """The id of the last numbered event of an SSE answer (where a client's resume starts)."""
        return self._parser.last_event_id if self._parser is not None else None

    def may_be_unanswered(self) -> bool:
        """Cheap check first: with at least one possible response per request, assume all answered."""
        return len(self._candidates) < len(self._request_ids) if self._parser is not None else True

    def unanswered(self) -> list[RequestId]:
        """Tracked request ids with no response seen yet."""
        answered = self.answers()
        return [request_id for request_id in self._request_ids if request_id not in answered]

    def protocol_version(self, request_id: RequestId) -> str | None:
        """``result.protocolVersion`` of the answer to ``request_id`` (an initialize), if seen."""
        result = self.answers().get(request_id, {}).get("result")
        if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
            return str(result["protocolVersion"])
        return None
