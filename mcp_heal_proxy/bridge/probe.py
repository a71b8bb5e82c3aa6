"""``check-config --connect`` against a 2026-07-28-only upstream: its refusal of the check's initialize,
then one ``server/discover``, said in a line."""

from __future__ import annotations

import json
from typing import Any

from mcp_heal_proxy.bridge.era import MODERN_VERSION, modern_error, speaks_legacy
from mcp_heal_proxy.bridge.wire import SERVER_INFO_KEY, envelope, modern_body, modern_headers
from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.upstream.client import Upstream, read_capped


def refused_as_modern(status: int, raw: bytes) -> bool:
    """Whether an initialize was refused as a 2026-07-28-only server refuses it."""
    error = modern_error(status, raw)
    return error is not None and not speaks_legacy(error)


async def discovered(upstream: Upstream) -> str | None:
    """What the upstream's server/discover says, as a check line; None when it is no modern answer."""
    params = {"_meta": envelope({}, None)}
    try:
        response = await upstream.send(
            "POST",
            modern_headers("server/discover", params, {}),
            modern_body(0, "server/discover", params),
            patient=False,
        )
    except ProxyError:
        return None
    try:
        raw = await read_capped(response)
    except ProxyError:
        return None
    finally:
        response.release()
    try:
        payload: Any = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    result = payload.get("result") if isinstance(payload, dict) and response.status == 200 else None
    if not isinstance(result, dict) or MODERN_VERSION not in (result.get("supportedVersions") or []):
        return None
    meta = result.get("_meta")
    info = meta.get(SERVER_INFO_KEY) if isinstance(meta, dict) else None
    server = info if isinstance(info, dict) else {}
    described = " ".join(str(server[key]) for key in ("name", "version") if server.get(key))
    versions = ", ".join(str(version) for version in result["supportedVersions"])
    return f"MCP server/discover ({described or 'a server'}, protocol {versions}): handshake-era clients are bridged"
