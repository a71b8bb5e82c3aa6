"""JSON-RPC message classification and error bodies for the MCP POST endpoint.

A POST body is parsed exactly once, here; the rest of the proxy reads the classified result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from mcp_heal_proxy.errors import InvalidRequest, ParseError

RequestId = str | int | None

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INTERNAL_ERROR: Final = -32603

INITIALIZE: Final = "initialize"
INITIALIZED: Final = "notifications/initialized"
CANCELLED: Final = "notifications/cancelled"


class Kind(Enum):
    """What a single JSON-RPC message is."""

    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class Message:
    """One classified JSON-RPC message of a POST body."""

    kind: Kind
    method: str | None
    id: RequestId
    params: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class PostBody:
    """A parsed POST body: one message or a 2025-03-26 batch."""

    raw: bytes
    messages: tuple[Message, ...]
    is_batch: bool

    @property
    def request_ids(self) -> tuple[RequestId, ...]:
        """Ids of the requests that expect an answer (errors must carry them)."""
        return tuple(m.id for m in self.messages if m.kind is Kind.REQUEST)

    @property
    def initialize(self) -> Message | None:
        """The ``initialize`` request, when this body is one."""
        if not self.is_batch and self.messages[0].method == INITIALIZE:
            return self.messages[0]
        return None

    @property
    def belongs_to_dead_session(self) -> bool:
        """True when every message only makes sense on the session it was meant for.

        Responses to server-to-client requests and cancellations name request ids of the old
        upstream session; the new session never issued them, so they are dropped, not replayed.
        """
        return all(m.kind is Kind.RESPONSE or m.method == CANCELLED for m in self.messages)

    @property
    def method_label(self) -> str:
        """A short name for logs and metrics."""
        if self.is_batch:
            return "batch"
        message = self.messages[0]
        return message.method if message.method is not None else "response"

    @property
    def tool_name(self) -> str | None:
        """The tool a single ``tools/call`` names (``params.name``), for the status page."""
        message = self.messages[0]
        if self.is_batch or message.method != "tools/call" or message.params is None:
            return None
        name = message.params.get("name")
        return name if isinstance(name, str) else None


def _classify(item: object) -> Message:
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        raise InvalidRequest("not a JSON-RPC 2.0 message")
    method = item.get("method")
    raw_id = item.get("id")
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
        raise InvalidRequest("JSON-RPC id must be a string or an integer")
    request_id: RequestId = raw_id
    params = item.get("params")
    if params is not None and not isinstance(params, dict | list):
        raise InvalidRequest("JSON-RPC params must be an object or an array", request_id=request_id)
    if method is None:
        if "result" not in item and "error" not in item:
            raise InvalidRequest("message has neither method nor result/error", request_id=request_id)
        return Message(Kind.RESPONSE, None, request_id, None)
    if not isinstance(method, str):
        raise InvalidRequest("JSON-RPC method must be a string", request_id=request_id)
    kind = Kind.NOTIFICATION if "id" not in item else Kind.REQUEST
    return Message(kind, method, request_id, params if isinstance(params, dict) else None)


def parse_post_body(raw: bytes) -> PostBody:
    """Parse and classify a POST body; raise ParseError or InvalidRequest with a clear reason."""
    try:
        payload = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ParseError("body is not valid UTF-8") from exc
    except RecursionError as exc:
        # The stdlib parser recurses per nesting level; hostile input must not crash the handler.
        raise ParseError("JSON nested too deeply") from exc
    except ValueError as exc:
        raise ParseError(f"invalid JSON: {exc.args[0] if exc.args else exc}") from exc
    if isinstance(payload, list):
        if not payload:
            raise InvalidRequest("empty JSON-RPC batch")
        return PostBody(raw, tuple(_classify(item) for item in payload), is_batch=True)
    return PostBody(raw, (_classify(payload),), is_batch=False)


def error_object(request_id: RequestId, code: int, message: str) -> dict[str, Any]:
    """One JSON-RPC error response object."""
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def error_body(request_ids: tuple[RequestId, ...], code: int, message: str, *, is_batch: bool) -> bytes:
    """The JSON bytes of an error answer: one object, or one per request of a batch."""
    if is_batch and request_ids:
        return json.dumps([error_object(rid, code, message) for rid in request_ids]).encode()
    request_id = request_ids[0] if request_ids else None
    return json.dumps(error_object(request_id, code, message)).encode()
