"""The bridge's translation rules (mcp_heal_proxy/bridge/wire.py, era.py), as pure functions."""

from __future__ import annotations

import json

import pytest

from mcp_heal_proxy.bridge.era import modern_error, speaks_legacy
from mcp_heal_proxy.bridge.wire import (
    clean_notification,
    clean_result,
    client_capabilities,
    envelope,
    header_annotations_valid,
    header_value,
    initialize_result,
    listen_filter,
    modern_headers,
    negotiated_version,
    param_headers,
)


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("us-west1", "us-west1"),
        ("two words", "two words"),
        ("Hello, 世界", "=?base64?SGVsbG8sIOS4lueVjA==?="),
        (" padded ", "=?base64?IHBhZGRlZCA=?="),
        ("line1\nline2", "=?base64?bGluZTEKbGluZTI=?="),
        ("=?base64?literal?=", "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="),
    ],
)
def test_header_values_follow_the_specs_encoding_examples(value: str, sent: str) -> None:
    assert header_value(value) == sent


def test_modern_headers_name_the_method_and_the_named_param() -> None:
    headers = modern_headers("resources/read", {"uri": "file:///a b"}, {})
    assert headers["MCP-Protocol-Version"] == "2026-07-28"
    assert headers["Mcp-Method"] == "resources/read"
    assert headers["Mcp-Name"] == "file:///a b"
    assert "Mcp-Name" not in modern_headers("tools/list", {}, {})


SCHEMA = {
    "type": "object",
    "properties": {
        "region": {"type": "string", "x-mcp-header": "Region"},
        "limit": {"type": "integer", "x-mcp-header": "Limit"},
        "flag": {"type": "boolean", "x-mcp-header": "Flag"},
        "nested": {"type": "object", "properties": {"tenant": {"type": "string", "x-mcp-header": "Tenant"}}},
    },
}


def test_param_headers_take_each_annotated_value_at_its_path() -> None:
    arguments = {"region": "eu", "limit": 42, "flag": False, "nested": {"tenant": "t1"}}
    assert param_headers(SCHEMA, arguments) == {
        "Mcp-Param-Region": "eu",
        "Mcp-Param-Limit": "42",
        "Mcp-Param-Flag": "false",
        "Mcp-Param-Tenant": "t1",
    }
    assert param_headers(SCHEMA, {"region": None}) == {}


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"a": {"type": "number", "x-mcp-header": "A"}}},
        {"properties": {"a": {"type": "string", "x-mcp-header": "A b"}}},
        {"properties": {"a": {"type": "string", "x-mcp-header": "A"}, "b": {"type": "string", "x-mcp-header": "a"}}},
        {"properties": {"a": {"type": "array", "items": {"type": "string", "x-mcp-header": "A"}}}},
        {"oneOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]},
    ],
)
def test_invalid_annotations_make_the_tool_invalid(schema: dict[str, object]) -> None:
    assert not header_annotations_valid(schema)


def test_valid_annotations_and_none_are_valid() -> None:
    assert header_annotations_valid(SCHEMA)
    assert header_annotations_valid({"type": "object", "properties": {"q": {"type": "string"}}})


def test_initialize_result_from_discover() -> None:
    discover = {
        "capabilities": {"tools": {"listChanged": True}, "extensions": {"x/y": {}}},
        "supportedVersions": ["2026-07-28"],
        "instructions": "be kind",
        "resultType": "complete",
        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "s", "version": "1"}},
    }
    result = initialize_result(discover, "2025-06-18")
    assert result == {
        "protocolVersion": "2025-06-18",
        "capabilities": {"tools": {"listChanged": True}, "logging": {}},
        "serverInfo": {"name": "s", "version": "1"},
        "instructions": "be kind",
    }
    assert initialize_result({}, "2030-01-01")["serverInfo"]["name"] == "mcp-heal-proxy bridge"
    assert negotiated_version("1999-01-01") == "2025-11-25"


def test_envelope_keeps_the_clients_meta_and_declares_what_the_proxy_relays() -> None:
    params = {
        "capabilities": {"roots": {"listChanged": True}, "elicitation": {}, "tasks": {}, "experimental": {}},
        "clientInfo": {"name": "c", "version": "1"},
    }
    meta = envelope(params, "debug", {"progressToken": 0, "vendor/key": 1})
    assert meta == {
        "progressToken": 0,
        "vendor/key": 1,
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}, "roots": {}},
        "io.modelcontextprotocol/clientInfo": {"name": "c", "version": "1"},
        "io.modelcontextprotocol/logLevel": "debug",
    }
    assert client_capabilities({}) == {}


def test_results_and_notifications_lose_the_modern_members() -> None:
    result = {
        "tools": [],
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "s"}, "vendor/x": 1},
    }
    assert clean_result(result) == {"tools": [], "_meta": {"vendor/x": 1}}
    listened = {"jsonrpc": "2.0", "method": "m", "params": {"_meta": {"io.modelcontextprotocol/subscriptionId": 6}}}
    assert clean_notification(listened) == {"jsonrpc": "2.0", "method": "m"}


def test_listen_filter_asks_for_what_the_capabilities_allow() -> None:
    capabilities = {"tools": {"listChanged": True}, "prompts": {}, "resources": {"listChanged": True}}
    assert listen_filter(capabilities, frozenset({"file:///b", "file:///a"})) == {
        "toolsListChanged": True,
        "resourcesListChanged": True,
        "resourceSubscriptions": ["file:///a", "file:///b"],
    }


def _error(code: int, data: object = None) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": code, "message": "m", "data": data}}).encode()


def test_only_a_modern_error_in_a_400_means_modern() -> None:
    assert modern_error(400, _error(-32022, {"supported": ["2026-07-28"]})) is not None
    assert modern_error(400, _error(-32020)) is not None
    assert modern_error(400, _error(-32602)) is None  # any server's invalid params
    assert modern_error(404, _error(-32022)) is None
    assert modern_error(400, b"Bad Request: No valid session ID provided") is None
    assert modern_error(400, b"") is None


def test_a_dual_era_refusal_names_a_legacy_version() -> None:
    assert speaks_legacy({"code": -32022, "data": {"supported": ["2026-07-28", "2025-11-25"]}})
    assert not speaks_legacy({"code": -32022, "data": {"supported": ["2026-07-28"]}})
