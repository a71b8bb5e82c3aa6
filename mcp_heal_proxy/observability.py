"""Structured logs with secrets redacted, and Prometheus metrics.

Logs: JSON when stderr is not a terminal, readable console lines when it is. A processor redacts
secrets, so that no call site has to remember to: values of sensitive keys, and any configured secret
(injected header values, the inbound token) wherever it appears in an event.

Metrics live in a registry of the app's own, so that several apps (tests, the demo) never collide.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Final, TextIO

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mcp_heal_proxy.display import terminal_safe
from mcp_heal_proxy.events import EventFeed

if TYPE_CHECKING:
    from mcp_heal_proxy.otel import Telemetry

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
        # 2025-11-25 tasks.
        "tasks/get",
        "tasks/list",
        "tasks/result",
        "tasks/cancel",
        "notifications/tasks/status",
        # 2026-07-28: a dual-era client's probe, and the modern subscription stream.
        "server/discover",
        "subscriptions/listen",
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
        # Key names seen so far and whether each is sensitive: event keys are a small fixed set (keys
        # of dict values come from data, hence the bound).
        self._sensitive: dict[str, bool] = {}

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Hot path (every request logs an event): plain strings, numbers, booleans and None are handled
        # here without a call; containers and subclasses go through _clean.
        secrets = self.secrets
        known = self._sensitive
        for key, value in event.items():
            sensitive = known.get(key)
            if sensitive is None:
                sensitive = self._is_sensitive(key)
            if sensitive:
                event[key] = REDACTED
                continue
            kind = value.__class__
            if kind is str:
                if "earer" in value or "EARER" in value:  # a bearer credential, found by its shape
                    value = _BEARER.sub("Bearer " + REDACTED, value)
                    event[key] = value
                for secret in secrets:
                    if secret in value:
                        value = value.replace(secret, REDACTED)
                        event[key] = value
            elif kind not in _PLAIN:
                event[key] = self._clean(key, value)
        return event

    def _is_sensitive(self, key: str) -> bool:
        known = self._sensitive.get(key)
        if known is None:
            known = key.lower() in _SENSITIVE_KEYS
            if len(self._sensitive) < _KEYS_REMEMBERED:
                self._sensitive[key] = known
        return known

    def _clean(self, key: str, value: Any) -> Any:
        if self._is_sensitive(key):
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


# Values that can hold no secret (subclasses, e.g. an IntEnum, go through Redactor._clean as before).
_PLAIN: Final = frozenset({int, float, bool, type(None)})
_KEYS_REMEMBERED: Final = 4096


class IsoTimeStamper:
    """``structlog.processors.TimeStamper(fmt="iso", utc=True)`` with the same output, cheaper: the
    date and time of day are formatted once per second, only the microseconds on every event."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        """The current UTC time as ``datetime.isoformat`` writes it, ``Z`` for ``+00:00``."""
        nanos = time.time_ns()
        # datetime.now() has microsecond resolution (truncated here, as the clock's own value is).
        second, micros = divmod(nanos // 1000, 1_000_000)
        if second != self._second:
            moment = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
            self._prefix = moment.isoformat().removesuffix("+00:00")
            self._second = second
        # isoformat leaves the fraction out when it is zero.
        return f"{self._prefix}.{micros:06d}Z" if micros else f"{self._prefix}Z"

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["timestamp"] = self.now()
        return event


def _json_fallback(value: Any) -> Any:
    # What structlog's JSONRenderer does with values JSON has no type for.
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


class JSONLineRenderer:
    """``structlog.processors.JSONRenderer()`` with the same output, with one encoder made once
    instead of one per event (json.dumps with a ``default`` builds a new encoder on every call)."""

    __slots__ = ("_encode",)

    def __init__(self) -> None:
        self._encode = json.JSONEncoder(default=_json_fallback).encode

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> str:
        return self._encode(event)


class LineWriter:
    """A structlog logger that writes each rendered event as a line, at most one write per loop turn.

    On the event loop, lines are queued and written (and flushed) together by a callback that runs in
    the loop's next turn: under load the many request events of one turn cost one ``write`` instead of
    one each, and no line waits longer than the turn in which it was logged. Off the loop (CLI commands,
    other threads), each line is written at once. Lines still queued when the process exits are written
    by an ``atexit`` hook.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending: list[str] = []
        # The loop a flush is scheduled on (None when none is): a loop that ended before running it
        # must not hold later lines back, so a flush pending on another loop does not count.
        self._scheduled: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        """Queue (or, off the event loop, write) one line."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(message)
            if loop is not None:
                if self._scheduled is loop:
                    return
                self._scheduled = loop
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    # structlog calls the method named like the level; every level goes the same way.
    debug = info = warning = warn = error = critical = exception = fatal = failure = err = log = msg

    def flush(self) -> None:
        """Write every queued line now."""
        with self._lock:
            self._scheduled = None
            if not self._pending:
                return
            lines = self._pending
            self._pending = []
            try:
                self._file.write("\n".join(lines) + "\n")
                self._file.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: a log line is never worth a crash


class LineWriterFactory:
    """structlog logger factory: one LineWriter per file, shared by every logger."""

    def __init__(self, file: TextIO) -> None:
        self._writer = LineWriter(file)

    def __call__(self, *_: Any) -> LineWriter:
        return self._writer


def configure_logging(
    log_format: str = "auto", level: str = "info", secrets: Iterable[str] = (), *, cache: bool = True
) -> None:
    """Set up structlog for the process (called once by the CLI).

    ``cache`` binds each logger on first use, which saves a quarter of a log call on the hot path;
    tests that reconfigure logging more than once turn it off. Every request logs an event, so the
    pipeline is built for cost: a timestamp formatted once per second, one JSON encoder, and lines
    written at most once per event-loop turn (LineWriter); the output is what structlog's own
    TimeStamper and JSONRenderer write.
    """
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else JSONLineRenderer()
    # JSON escapes control characters on its own; console lines go to a terminal as they are.
    safe: list[Any] = [terminal_safe_event] if use_console else []
    structlog.configure(
        # The redactor runs before the level and the timestamp are added: neither can hold a secret.
        processors=[
            Redactor(secrets),
            *safe,
            structlog.processors.add_log_level,
            IsoTimeStamper(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=LineWriterFactory(sys.stderr),
        cache_logger_on_first_use=cache,
    )


def terminal_safe_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor for console lines: a client's method or tool name, or an upstream's
    message, cannot move the cursor or retitle the terminal the proxy logs to (display.terminal_safe)."""
    # Other values are written as their repr(), which escapes control characters already.
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = terminal_safe(value)
    return event


def method_label(method: str) -> str:
    """A bounded metrics label for a JSON-RPC method."""
    return method if method in KNOWN_METHODS else "other"


class Metrics:
    """The proxy's Prometheus metrics, in a registry of their own."""

    def __init__(self, otel: Telemetry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # OpenTelemetry traces and metrics (mcp_heal_proxy/otel.py), None when off: the fronts and the
        # engine read it once and check it per request.
        self.otel = otel
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
        self.sessions_ended = Counter(
            "mcp_heal_proxy_upstream_sessions_ended",
            "Upstream sessions of client sessions the proxy forgot, by reason (idle, evicted, forgotten) and "
            "outcome of their DELETE (ended, gone, refused, failed, dropped).",
            ("upstream", "reason", "outcome"),
            registry=self.registry,
        )
        self.sessions_evicted_in_use = Counter(
            "mcp_heal_proxy_sessions_evicted_in_use",
            "Client sessions evicted at max_sessions while a request or stream was still open on them "
            "(only when every session was in use).",
            ("upstream",),
            registry=self.registry,
        )
        self.sessions_restored = Counter(
            "mcp_heal_proxy_sessions_restored",
            "Client sessions re-created from their sealed id after the session store lost them (each then heals once).",
            ("upstream",),
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
            "Time from forwarding a request to the upstream's response headers (from the attempt it answered: "
            "connect retries before it are not counted).",
            ("upstream",),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.open_sessions = Gauge(
            "mcp_heal_proxy_open_sessions", "Client sessions the proxy maps.", registry=self.registry
        )
        self.upstream_era = Gauge(
            "mcp_heal_proxy_upstream_era",
            "1 for the MCP era each upstream speaks as the proxy knows it (modern: legacy clients are bridged).",
            ("upstream", "era"),
            registry=self.registry,
        )
        self.sessions_bridged = Counter(
            "mcp_heal_proxy_sessions_bridged_total",
            "Handshake-era client sessions the proxy opened itself in front of a 2026-07-28-only upstream.",
            ("upstream",),
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "mcp_heal_proxy_open_streams",
            "Responses being streamed to clients right now.",
            ("upstream",),
            registry=self.registry,
        )
