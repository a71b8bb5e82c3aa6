"""The proxy's configuration: frozen dataclasses built once at startup and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from mcp_heal_proxy.upstream import UpstreamConfig

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8787
MEMORY_STATE: Final = ":memory:"
# MCP messages are small; a bound keeps one client from filling the proxy's memory.
DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024
ENDPOINT_PATH: Final = "/mcp"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything ``serve`` needs."""

    upstream: UpstreamConfig
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    state: str = MEMORY_STATE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_format: str = "auto"
    log_level: str = "info"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def client_url(self) -> str:
        """The URL a client puts in its config."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{ENDPOINT_PATH}"
