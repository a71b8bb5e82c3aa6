"""Which MCP era an upstream speaks, as the proxy learns it.

The spec's client rule (2026-07-28 basic/versioning.mdx, "Backward Compatibility"): a recognized modern
JSON-RPC error in a 400 means a modern server; anything else means legacy. ``server/discover`` alone
cannot tell a dual-era server from a modern-only one (the Python SDK 2.3.0 dual-era server answers it
with ``supportedVersions: ["2026-07-28"]``), and dual-era upstreams must keep today's behaviour (real
upstream sessions, healing). So the proxy forwards a client's ``initialize`` as always, and only an
upstream that refuses it with a modern error and then answers ``server/discover`` is taken for
modern-only: from then on its handshake-era clients are bridged. A bridged request that meets a
legacy-looking refusal makes the proxy look again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Final, Literal

import structlog

from mcp_heal_proxy.config import UpstreamEra

log = structlog.get_logger("mcp_heal_proxy.bridge.era")

# The upstream session id of a bridged record: the upstream has no sessions, the proxy holds this one.
BRIDGED: Final = "mcp-heal-proxy-bridged"
MODERN_VERSION: Final = "2026-07-28"
MODERN_VERSIONS: Final = frozenset({MODERN_VERSION})
# The handshake-era versions a bridged client may negotiate, newest first.
LEGACY_VERSIONS: Final = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
HEADER_MISMATCH: Final = -32020
MISSING_CLIENT_CAPABILITY: Final = -32021
UNSUPPORTED_VERSION: Final = -32022
# The errors only a modern server sends (schema: HeaderMismatchError, MissingRequiredClientCapabilityError,
# UnsupportedProtocolVersionError).
MODERN_ERROR_CODES: Final = frozenset({HEADER_MISMATCH, MISSING_CLIENT_CAPABILITY, UNSUPPORTED_VERSION})

Known = Literal["legacy", "modern"]


def modern_error(status: int, body: bytes) -> dict[str, Any] | None:
    """The JSON-RPC error of a 400 that only a modern server sends, else None."""
    if status != 400 or not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("code") in MODERN_ERROR_CODES:
        return error
    return None


def speaks_legacy(error: dict[str, Any]) -> bool:
    """Whether a -32022's ``data.supported`` names a handshake-era version (a dual-era server that refused
    only the version asked for)."""
    data = error.get("data")
    supported = data.get("supported") if isinstance(data, dict) else None
    return isinstance(supported, list) and any(version in LEGACY_VERSIONS for version in supported)


class EraState:
    """One upstream's era: pinned by ``era``, or learned (and learned again when it changes)."""

    __slots__ = ("_name", "changed_at", "known", "on_change", "pinned")

    def __init__(self, name: str, pinned: UpstreamEra, on_change: Callable[[str], None] | None = None) -> None:
        self._name = name
        self.pinned = pinned
        self.known: Known | None = "modern" if pinned == "modern" else "legacy" if pinned == "legacy" else None
        self.changed_at: float | None = None
        # Told the new label at every change (the status page, the era gauge).
        self.on_change = on_change
        if on_change is not None:
            on_change(self.label)

    @property
    def bridges(self) -> bool:
        """Whether handshake-era clients of this upstream are bridged now."""
        return self.known == "modern"

    @property
    def may_bridge(self) -> bool:
        """Whether this upstream may turn out modern-only (not pinned to legacy)."""
        return self.pinned != "legacy"

    @property
    def label(self) -> str:
        """What the status page and ``sessions`` say: modern, legacy, or unknown (not seen yet)."""
        return self.known or "unknown"

    def learn(self, era: Known, why: str) -> None:
        """Remember what the upstream showed (a pinned era never changes)."""
        if self.pinned != "auto" or self.known == era:
            return
        log.info("upstream.era", upstream=self._name, era=era, was=self.known or "unknown", why=why)
        self.known = era
        self.changed_at = time.time()
        if self.on_change is not None:
            self.on_change(self.label)

    def forget(self, why: str) -> None:
        """The upstream answered as the learned era does not: look again at the next initialize."""
        if self.pinned != "auto" or self.known is None:
            return
        log.info("upstream.era", upstream=self._name, era="unknown", was=self.known, why=why)
        self.known = None
        self.changed_at = time.time()
        if self.on_change is not None:
            self.on_change(self.label)
