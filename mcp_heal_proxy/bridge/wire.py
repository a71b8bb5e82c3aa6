"""Translating messages between the eras (pure functions; docs/design.md has the table).

"M:" below is the 2026-07-28 specification (docs/specification/2026-07-28/ in the spec repository).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from mcp_heal_proxy.bridge.era import LEGACY_VERSIONS, MODERN_VERSION

META_PREFIX: Final = "io.modelcontextprotocol/"
PROTOCOL_VERSION_KEY: Final = META_PREFIX + "protocolVersion"
CLIENT_CAPABILITIES_KEY: Final = META_PREFIX + "clientCapabilities"
CLIENT_INFO_KEY: Final = META_PREFIX + "clientInfo"
LOG_LEVEL_KEY: Final = META_PREFIX + "logLevel"
SERVER_INFO_KEY: Final = META_PREFIX + "serverInfo"
SUBSCRIPTION_ID_KEY: Final = META_PREFIX + "subscriptionId"
# Methods whose Mcp-Name header mirrors a param (M: basic/transports/streamable-http.mdx).
NAME_PARAMS: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
# Result members a handshake-era client does not know (M: schema, Result and CacheableResult).
_MODERN_RESULT_KEYS: Final = ("resultType", "ttlMs", "cacheScope")
# List-changed kinds: the discover capability that allows each, the listen filter key, the notification.
LIST_CHANGED: Final = (
    ("tools", "toolsListChanged", "notifications/tools/list_changed"),
    ("prompts", "promptsListChanged", "notifications/prompts/list_changed"),
    ("resources", "resourcesListChanged", "notifications/resources/list_changed"),
)
_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SAFE_VALUE: Final = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_MAX_SAFE_INTEGER: Final = 2**53 - 1


def negotiated_version(requested: object) -> str:
    """The version a bridged client gets: its own when it is a handshake-era one the proxy speaks, else the
    newest (as a legacy server answers an initialize it cannot match)."""
    return requested if isinstance(requested, str) and requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]


def initialize_result(discover: Mapping[str, Any], requested_version: object) -> dict[str, Any]:
    """The answer to a bridged client's initialize, from the upstream's server/discover result: its
    capabilities without ``extensions`` plus ``logging`` (the proxy implements logging/setLevel), its
    serverInfo (handshake-era clients require one), its instructions."""
    capabilities = {k: v for k, v in dict(discover.get("capabilities") or {}).items() if k != "extensions"}
    capabilities["logging"] = {}
    meta = discover.get("_meta")
    server_info = meta.get(SERVER_INFO_KEY) if isinstance(meta, dict) else None
    if not isinstance(server_info, dict) or not isinstance(server_info.get("name"), str):
        server_info = {"name": "mcp-heal-proxy bridge", "version": ""}
    if not isinstance(server_info.get("version"), str):
        server_info = {**server_info, "version": ""}
    result: dict[str, Any] = {
        "protocolVersion": negotiated_version(requested_version),
        "capabilities": capabilities,
        "serverInfo": server_info,
    }
    if isinstance(discover.get("instructions"), str):
        result["instructions"] = discover["instructions"]
    return result


def client_capabilities(initialize_params: Mapping[str, Any]) -> dict[str, Any]:
    """The client's capabilities as a modern request declares them: elicitation, sampling and roots (the
    proxy relays those), without roots.listChanged (no modern meaning); legacy ``tasks`` and
    ``experimental`` are dropped (tasks moved into an extension)."""
    declared = initialize_params.get("capabilities")
    if not isinstance(declared, dict):
        return {}
    out: dict[str, Any] = {}
    for key in ("elicitation", "sampling", "extensions"):
        if isinstance(declared.get(key), dict):
            out[key] = declared[key]
    if isinstance(declared.get("roots"), dict):
        out["roots"] = {k: v for k, v in declared["roots"].items() if k != "listChanged"}
    return out


def envelope(initialize_params: Mapping[str, Any], log_level: str | None, client_meta: object = None) -> dict[str, Any]:
    """``params._meta`` of a modern request: the client's own keys (progressToken, vendor keys) plus
    the version, capabilities, client info and log level (M: basic/index.mdx, "_meta")."""
    meta: dict[str, Any] = dict(client_meta) if isinstance(client_meta, dict) else {}
    meta[PROTOCOL_VERSION_KEY] = MODERN_VERSION
    meta[CLIENT_CAPABILITIES_KEY] = client_capabilities(initialize_params)
    info = initialize_params.get("clientInfo")
    if isinstance(info, dict):
        meta[CLIENT_INFO_KEY] = info
    if log_level is not None:
        meta[LOG_LEVEL_KEY] = log_level
    return meta


def header_value(value: str) -> str:
    """A value as a header carries it: as is when plain visible ASCII (inner spaces allowed), else the
    Base64 sentinel form (M: streamable-http.mdx, "Value Encoding")."""
    if _SAFE_VALUE.match(value) and not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


def modern_headers(method: str, params: Mapping[str, Any], param_headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a modern POST carries: version, Mcp-Method, Mcp-Name, Mcp-Param-* (``param_headers``)."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": method,
    }
    name_param = NAME_PARAMS.get(method)
    if name_param is not None and isinstance(params.get(name_param), str):
        headers["Mcp-Name"] = header_value(params[name_param])
    headers.update(param_headers)
    return headers


def _header_properties(schema: object, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, object]]:
    """Every (property path, x-mcp-header name, property schema) reachable through ``properties`` only."""
    found: list[tuple[tuple[str, ...], str, object]] = []
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return found
    for key, sub in properties.items():
        if isinstance(sub, dict):
            if "x-mcp-header" in sub:
                found.append(((*path, key), sub["x-mcp-header"], sub))
            found.extend(_header_properties(sub, (*path, key)))
    return found


def _misplaced(schema: object, reachable: bool) -> bool:
    """Whether an x-mcp-header sits anywhere but on a property reached by ``properties`` keys alone
    (through items, oneOf, $ref, ...: the annotation, and so the tool, is invalid)."""
    if isinstance(schema, dict):
        if "x-mcp-header" in schema and not reachable:
            return True
        for key, value in schema.items():
            if key == "properties" and reachable and isinstance(value, dict):
                if any(_misplaced(sub, True) for sub in value.values()):
                    return True
            elif key != "x-mcp-header" and _misplaced(value, False):
                return True
    elif isinstance(schema, list):
        return any(_misplaced(item, False) for item in schema)
    return False


def header_annotations_valid(input_schema: object) -> bool:
    """Whether a tool's x-mcp-header annotations follow the rules (M: streamable-http.mdx, "Schema
    Extension"); a client must leave a tool with invalid ones out of tools/list."""
    seen: set[str] = set()
    for _, name, sub in _header_properties(input_schema):
        if not isinstance(name, str) or not _TOKEN.match(name) or name.lower() in seen:
            return False
        seen.add(name.lower())
        kind = sub.get("type") if isinstance(sub, dict) else None
        if kind not in ("string", "integer", "boolean"):
            return False
    return not _misplaced(input_schema, True)


def param_headers(input_schema: object, arguments: object) -> dict[str, str]:
    """The Mcp-Param-* headers of a tools/call: each annotated property's value at its exact path."""
    headers: dict[str, str] = {}
    for path, name, _ in _header_properties(input_schema):
        value: object = arguments
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None or not isinstance(name, str):
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int) and abs(value) <= _MAX_SAFE_INTEGER:
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            continue
        headers[f"Mcp-Param-{name}"] = header_value(text)
    return headers


def modern_body(request_id: object, method: str, params: Mapping[str, Any]) -> bytes:
    """One modern JSON-RPC request."""
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode()


def clean_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """A modern result as a handshake-era client reads it: without resultType, ttlMs, cacheScope and the
    serverInfo ``_meta`` key (an empty ``_meta`` left out)."""
    out = {k: v for k, v in result.items() if k not in _MODERN_RESULT_KEYS}
    meta = out.get("_meta")
    if isinstance(meta, dict) and SERVER_INFO_KEY in meta:
        rest = {k: v for k, v in meta.items() if k != SERVER_INFO_KEY}
        if rest:
            out["_meta"] = rest
        else:
            del out["_meta"]
    return out


def clean_tools(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, object]]:
    """A tools/list result without the tools whose x-mcp-header annotations are invalid, and the input
    schemas of the tools kept (for their calls' Mcp-Param-* headers)."""
    tools = result.get("tools")
    if not isinstance(tools, list):
        return result, {}
    kept = [tool for tool in tools if isinstance(tool, dict) and header_annotations_valid(tool.get("inputSchema"))]
    schemas = {tool["name"]: tool.get("inputSchema") for tool in kept if isinstance(tool.get("name"), str)}
    return ({**result, "tools": kept} if len(kept) != len(tools) else result), schemas


def clean_notification(message: dict[str, Any]) -> dict[str, Any]:
    """A notification from a listen stream without the listen's subscriptionId ``_meta`` key."""
    params = message.get("params")
    if isinstance(params, dict) and isinstance(params.get("_meta"), dict) and SUBSCRIPTION_ID_KEY in params["_meta"]:
        meta = {k: v for k, v in params["_meta"].items() if k != SUBSCRIPTION_ID_KEY}
        params = {k: v for k, v in params.items() if k != "_meta"}
        if meta:
            params["_meta"] = meta
        message = {**message, "params": params}
        if not params:
            del message["params"]
    return message


def listen_filter(capabilities: Mapping[str, Any], subscriptions: frozenset[str]) -> dict[str, Any]:
    """The ``subscriptions/listen`` filter that feeds a bridged GET stream: every list-changed kind the
    upstream's capabilities allow, and the resource URIs the client subscribed to."""
    notifications: dict[str, Any] = {}
    for capability, key, _ in LIST_CHANGED:
        declared = capabilities.get(capability)
        if isinstance(declared, dict) and declared.get("listChanged"):
            notifications[key] = True
    if subscriptions:
        notifications["resourceSubscriptions"] = sorted(subscriptions)
    return notifications


def error_message(request_id: object, code: int, message: str, data: object = None) -> dict[str, Any]:
    """A JSON-RPC error response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}
