"""Structured logs with secrets redacted, and Prometheus metrics.

Logs: JSON when stderr is not a terminal, readable console lines when it is. A processor redacts
secrets, so that no call site has to remember to: values of sensitive keys, and any configured secret
(injected header values, the inbound token) wherever it appears in an event.

Metrics live in a registry of the app's own, so that several apps (tests, the demo) never collide.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mcp_heal_proxy.events import EventFeed

REDACTED: Final = "[redacted]"
_SENSITIVE_KEYS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "token",
        "access_token",
        "refresh_token",
        "client_secret",
        "code_verifier",
        "password",
        "secret",
        "cookie",
        "api_key",
    }
)
# A bearer credential in any text (an exception message quoting a header, say): clients' OAuth tokens
# are not known in advance, so they are found by shape (8 characters or more: "bearer token" in prose
# stays readable).
_BEARER: Final = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")

# MCP methods worth a label of their own; anything else is "other", so clients cannot grow the series.
KNOWN_METHODS: Final = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
        "response",
        "batch",
        "GET",
        "DELETE",
    }
)


class Redactor:
    """A structlog processor that removes secrets from every event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Short values would redact innocent text; real tokens are long.
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True))

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            event[key] = self._clean(key, value)
        return event

    def _clean(self, key: str, value: Any) -> Any:
        if key.lower() in _SENSITIVE_KEYS:
            return REDACTED
        if isinstance(value, str):
            if "earer" in value or "EARER" in value:  # cheap test first: most strings hold none
                value = _BEARER.sub("Bearer " + REDACTED, value)
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(key, v) for v in value]
        return value


def configure_logging(
    log_format: str = "auto", level: str = "info", secrets: Iterable[str] = (), *, cache: bool = True
) -> None:
    """Set up structlog for the process (called once by the CLI).

    ``cache`` binds each logger on first use, which saves a quarter of a log call on the hot path;
    tests that reconfigure logging more than once turn it off.
    """
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            Redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache,
    )


def method_label(method: str) -> str:
    """A bounded metrics label for a JSON-RPC method."""
    return method if method in KNOWN_METHODS else "other"


class Metrics:
    """The proxy's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Recent requests, heals and upstream health for the status page (events.py).
        self.events = EventFeed()
        self.requests = Counter(
            "mcp_heal_proxy_requests",
            "Client requests answered, by upstream, MCP method and HTTP status.",
            ("upstream", "method", "status"),
            registry=self.registry,
        )
        self.heals = Counter(
            "mcp_heal_proxy_heals",
            "Upstream session re-initializations, by reason and outcome.",
            ("upstream", "reason", "outcome"),
            registry=self.registry,
        )
        self.heal_duration = Histogram(
            "mcp_heal_proxy_heal_duration_seconds",
            "Time to re-initialize an expired upstream session.",
            ("upstream",),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "mcp_heal_proxy_upstream_latency_seconds",
            "Time from forwarding a request to the upstream's response headers.",
            ("upstream",),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.open_sessions = Gauge(
            "mcp_heal_proxy_open_sessions", "Client sessions the proxy maps.", registry=self.registry
        )
        self.open_streams = Gauge(
            "mcp_heal_proxy_open_streams",
            "Responses being streamed to clients right now.",
            ("upstream",),
            registry=self.registry,
        )
