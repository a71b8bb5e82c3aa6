"""The proxy's configuration: frozen dataclasses built once at startup and passed down.

Sources, later ones winning: the TOML file, ``MCP_HEAL_PROXY_*`` environment variables, CLI flags.
Every key of the file is checked here, with the file and the key's name in the message, so that a typo
never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import math
import os
import re
import shlex
import ssl
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import SplitResult, unquote, urlsplit

from mcp_heal_proxy.display import mask_url as mask_url  # re-exported: engine/session.py imports it from here

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8787
MEMORY_STATE: Final = ":memory:"
# MCP messages are small; a bound keeps one client from filling the proxy's memory.
DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024
ENDPOINT_PATH: Final = "/mcp"
# Statuses that can mean "session expired". 404 always does (when a session id was sent); 400 and 401
# only when the body speaks of the session (see healing.is_session_expired).
DEFAULT_HEAL_ON: Final = (404, 400)
HEALABLE_STATUSES: Final = frozenset({400, 401, 404})
ENV_PREFIX: Final = "MCP_HEAL_PROXY_"
# Listen addresses that mean "every interface", and the loopback address a local client uses instead.
WILDCARD_HOSTS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}

# The proxy's own pages: the status page at "/", its assets and JSON endpoints under /_proxy/
# (status.py). No upstream may be served there, nor at the health and metrics paths.
STATUS_PREFIX: Final = "/_proxy/"
RESERVED_PATHS: Final = frozenset({"/", "/_proxy", "/healthz", "/readyz", "/metrics"})

LogFormat = Literal["auto", "json", "console"]
LOG_FORMATS: Final = ("auto", "json", "console")
# Which HTTP server takes client connections: the proxy's own for POSTs to MCP paths (aiohttp's for the
# rest), or aiohttp's for everything (the way back, should the proxy's own misbehave with some client).
HTTP_SERVERS: Final = ("fast", "aiohttp")
HttpServer = Literal["fast", "aiohttp"]
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
ReplayPolicy = Literal["all", "none"] | tuple[str, ...]
UpstreamClient = Literal["aiohttp", "lean"]
UPSTREAM_CLIENTS: Final = ("aiohttp", "lean")
# OAuth pass-through (auth/standin.py): the proxy stands in as the authorization server, or only
# rewrites the protected-resource metadata (the upstream's own authorization server), or neither.
OAuthPassThrough = Literal["stand-in", "metadata", "off"]
OAUTH_PASS_THROUGH: Final = ("stand-in", "metadata", "off")
# Which MCP era an upstream speaks (bridge/era.py): found out ("auto"), or pinned.
UpstreamEra = Literal["auto", "legacy", "modern"]
UPSTREAM_ERAS: Final = ("auto", "legacy", "modern")
# The lean client carries 1.7x aiohttp's throughput through the proxy (docs/benchmarks.md, "Tuning");
# "aiohttp" stays available per upstream as the fallback.
DEFAULT_UPSTREAM_CLIENT: Final = "lean"
# Whose trace context the upstream gets with OpenTelemetry on (mcp_heal_proxy/otel.py): the client's, as
# it sent it (bodies byte for byte), or the proxy's own span's, written into params._meta.
OtelPropagate = Literal["client", "proxy"]
OTEL_PROPAGATE: Final = ("client", "proxy")
# What the otel switch asks for when the optional packages are missing (a command that runs as pasted).
OTEL_INSTALL: Final = "pip install 'mcp-heal-proxy[otel]'"

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(Exception):
    """A configuration mistake, reported in one line (exit status 2)."""


def default_state_path() -> str:
    """Where the session store lives unless told otherwise: the user's state directory."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return str(base / "mcp-heal-proxy" / "sessions.db")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """How to reach one upstream MCP server, and how to heal its sessions."""

    url: str
    name: str = "default"
    path: str = ENDPOINT_PATH
    # Injected into every upstream request (e.g. an Authorization bearer token); values are secrets.
    headers: Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 10.0
    # How long to keep retrying while the upstream refuses connections (a restart or deploy in
    # progress). Safe: a refused connection carried no request.
    connect_retry: float = 5.0
    # The longest silence allowed on a POST answer (a tool may think for minutes).
    read_timeout: float = 300.0
    # The longest a whole heal may take (the heal lock, the store's reads and writes, initialize and its
    # answer, notifications/initialized, the state re-applied, retries while the upstream restarts): the
    # client waiting on the heal is owed an error well before read_timeout when an upstream accepts the
    # re-initialize and never answers it, or a shared store's lock or a store call hangs.
    heal_timeout: float = 30.0
    # The longest silence on a GET stream; None waits forever (the proxy's keep-alives fill silences).
    stream_idle_timeout: float | None = None
    # Connections for requests (POST, DELETE): a request waits at most connect_timeout for a free one.
    pool_size: int = 100
    # Connections for GET streams, apart from pool_size so that open streams (one per connected client,
    # held for hours) never starve requests; a GET stream past this gets an error, not a hang.
    max_streams: int = 1000
    # Seconds a pooled connection may sit idle and still be reused (lean client): below the upstream's
    # own keep-alive timeout, so that no request is sent on a connection the upstream is closing.
    keepalive_idle: float = 4.0
    heal_on: tuple[int, ...] = DEFAULT_HEAL_ON
    replay: ReplayPolicy = "all"
    # The HTTP client for this upstream: the lean pool in upstream/lean.py, or aiohttp's ClientSession.
    client: UpstreamClient = DEFAULT_UPSTREAM_CLIENT
    oauth_pass_through: OAuthPassThrough = "stand-in"
    # "modern": the upstream speaks only 2026-07-28, and handshake-era clients are bridged (bridge/);
    # "legacy": never bridged; "auto": bridged once the upstream refuses an initialize as a modern one.
    era: UpstreamEra = "auto"
    # auth = "oauth": the proxy logs in itself (``mcp-heal-proxy login NAME``) and sends the token;
    # client_id/client_secret name a pre-registered client (else dynamic registration), scopes
    # replace the discovered ones, callback_port fixes the loopback redirect URI's port.
    auth: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scopes: tuple[str, ...] | None = None
    callback_port: int | None = None
    # TLS (upstream/tls.py): a PEM file of CAs trusted on top of the system's (a corporate or private
    # CA; [server] ca_file when unset), and a client certificate for servers that ask for one.
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    # The outbound HTTP proxy for every request of this upstream (upstream/proxy.py): None takes
    # [server] proxy, then HTTPS_PROXY / HTTP_PROXY / NO_PROXY; "" goes direct.
    proxy: str | None = None
    # The config file this upstream came from (absolute): the hints that name ``login`` repeat it, as
    # login finds the upstream there (auth = "oauth" is settable in a file only).
    config_file: str | None = None

    def replays(self, method: str) -> bool:
        """Whether a request of this method may be replayed on a new session after a heal."""
        if self.replay == "all":
            return True
        if self.replay == "none":
            return False
        return method in self.replay


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything ``serve`` needs."""

    upstreams: tuple[UpstreamConfig, ...]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    state: str = MEMORY_STATE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_format: LogFormat = "auto"
    log_level: str = "info"
    allowed_origins: tuple[str, ...] = ()
    # Client sessions unused for this long are forgotten (the durable store's housekeeping).
    session_idle_ttl: float = 24 * 3600.0
    # A comment line on idle SSE streams this often keeps load balancers from cutting them.
    keepalive_interval: float = 15.0
    # Clients must present "Authorization: Bearer <token>"; that header is then not sent upstream.
    token: str | None = None
    # On SIGTERM: stop accepting, give open streams this long to finish, then end them.
    shutdown_grace: float = 10.0
    # Bounded resources: the least recently used session is forgotten to make room for a new one,
    # and one session may hold this many streaming answers (GET streams and SSE answers) at once.
    max_sessions: int = 10_000
    # Well below pool_size (100), so that one session cannot hold every connection to its upstream.
    max_streams_per_session: int = 32
    # A request over max_streams_per_session waits this long for a slot (first come, first served), then
    # gets 429 with a JSON-RPC error: the cap shares the pool, it does not refuse what the server would serve.
    stream_slot_wait: float = 60.0
    http_server: HttpServer = "fast"
    # The ca_file of every upstream that sets none (build_config copies it there).
    ca_file: str | None = None
    # The proxy of every upstream that sets none (build_config copies it there).
    proxy: str | None = None
    # The secret that seals client session ids, so that a session outlives the loss of the store; every
    # replica sharing a Redis store needs the same one. None: a key file beside the state (key_directory).
    session_key: str | None = None
    # OpenTelemetry traces and metrics (the otel extra), configured by the standard OTEL_* variables.
    otel: bool = False
    otel_propagate: OtelPropagate = "client"

    @property
    def listens_on_all_interfaces(self) -> bool:
        """Bound to a wildcard address (0.0.0.0, ::), as in a container."""
        return self.host in WILDCARD_HOSTS

    # Peers whose X-Forwarded-Proto/-Host/-Port tell the URL a client dialed (OAuth metadata names it).
    trusted_proxies: tuple[str, ...] = ()

    def client_url(self, upstream: UpstreamConfig, port: int | None = None) -> str:
        """The URL a client puts in its config for one upstream.

        A wildcard address says where to listen, not where to connect: a client on this machine (or on
        the host of a container that publishes the port) reaches the proxy on loopback. "::" gets ::1,
        because asyncio binds IPv6 sockets IPv6-only.
        """
        host = WILDCARD_HOSTS.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port if port is None else port}{upstream.path}"

    def secrets(self) -> tuple[str, ...]:
        """Every configured value that must never be logged."""
        injected = tuple(value for upstream in self.upstreams for value in upstream.headers.values() if value)
        injected += tuple(u.client_secret for u in self.upstreams if u.client_secret)
        store_password = urlsplit(self.state).password if "://" in self.state else None
        proxy_passwords = tuple(_password(u.proxy) for u in self.upstreams)
        proxy_passwords += tuple(unquote(p) for p in proxy_passwords if p and "%" in p)  # as decoded
        return tuple(s for s in (*injected, self.token, store_password, self.session_key, *proxy_passwords) if s)

    @property
    def key_directory(self) -> Path:
        """Where the session key file lives without session_key: beside a SQLite state file (on its volume,
        in a container), else in the user's state directory (a :memory: or Redis store has no file)."""
        if self.state == MEMORY_STATE or "://" in self.state or not self.state:
            return Path(default_state_path()).parent
        return Path(self.state).parent

    @property
    def state_display(self) -> str:
        """The store location as it may be shown: a Redis URL's password and query values masked."""
        return mask_url(self.state) if "://" in self.state else self.state


def _password(url: str | None) -> str | None:
    """The password in ``[SCHEME://]USER:PASSWORD@HOST...``: all of it, up to the last '@', as a
    proxy's user information is split (urlsplit would stop at a '/' in it)."""
    if not url:
        return None
    userinfo, at, _ = url.partition("://")[2 if "://" in url else 0].rpartition("@")
    _, colon, password = userinfo.partition(":")
    return password if at and colon and password else None


def single_upstream(url: str, **options: Any) -> ProxyConfig:
    """A config with one upstream served at /mcp (what ``serve --upstream URL`` builds)."""
    upstream_options = {k: v for k, v in options.items() if k in _UPSTREAM_FIELDS}
    proxy_options = {k: v for k, v in options.items() if k not in _UPSTREAM_FIELDS}
    return ProxyConfig(upstreams=(UpstreamConfig(url=url, **upstream_options),), **proxy_options)


_UPSTREAM_FIELDS: Final = frozenset(f.name for f in fields(UpstreamConfig))

# ---- options: one check per key, wherever it is set --------------------------------------------------
#
# As in mitmproxy's optmanager, an option is checked where it is set, by one function (check_option),
# whether it comes from the file, an MCP_HEAL_PROXY_* variable or a flag. So a value the file may not
# hold, no flag may hold either, and `check-config` refuses exactly what `serve` could not run. Only the
# place named in the message differs: "proxy.toml: server.port", "MCP_HEAL_PROXY_PORT", "--port".


class _Invalid(Exception):
    """A value that breaks its option's rule; the message completes "<where> ..."."""

    def __init__(self, reason: str, *, echo: bool = True) -> None:
        super().__init__(reason)
        # False when the reason already names the culprit (or a hint follows it).
        self.echo = echo


def _shown(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        # 70000 reads the same whether it came from the file or from text ("70000", "7e4").
        return f"{value:g}"
    return repr(value)


def _hidden(_: Any) -> str | None:
    return None


def _without_userinfo(value: Any) -> str:
    """A URL as it may appear in an error: user, password and query values masked (display.mask_url)."""
    return repr(mask_url(value)) if isinstance(value, str) else repr(value)


@dataclass(frozen=True, slots=True)
class Option:
    """One settable key: the rule its value must follow, and how to read it from one line of text."""

    # The value as the config holds it (normalized: seconds as float, lists as tuples), or _Invalid.
    check: Callable[[Any], Any]
    # From an environment variable or --set KEY=VALUE; None: only a config file can set it.
    from_text: Callable[[str], Any] | None
    # How the refused value is echoed in the error; None: never (a secret).
    show: Callable[[Any], str | None] = _shown


def _text_as_int(text: str) -> Any:
    try:
        return int(text.strip())
    except ValueError:
        # "1.5" is refused as the file's 1.5 is ("must be an integer, not 1.5"); "x" as 'x'.
        return _text_as_number(text)


def _text_as_number(text: str) -> Any:
    try:
        return float(text.strip())
    except ValueError:
        return text


def _text_as_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _text_as_str(text: str) -> str:
    return text


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("must be an integer")
        if value < low or (high is not None and value > high):
            raise _Invalid(f"must be between {low} and {high}" if high is not None else f"must be at least {low}")
        return value

    return check


def _seconds(*, zero_allowed: bool = False, minimum: float = 0.0) -> Callable[[Any], float]:
    # Zero is refused where it would make every request time out at once, or turn a wait into a busy
    # loop (keep-alive comments, housekeeping: those take a floor, see the table below). NaN and
    # infinity compare oddly, so they are refused too.
    if minimum:
        rule = f"must be a number of seconds, at least {minimum:g}"
    elif zero_allowed:
        rule = "must be a number of seconds, 0 or more"
    else:
        rule = "must be a number of seconds above 0"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _Invalid(rule)
        if value < minimum or value < 0 or (value == 0 and not zero_allowed):
            raise _Invalid(rule)
        return float(value)

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}")
        return str(value)

    return check


def _switch(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


_SWITCH_TEXTS: Final = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}


def _text_as_bool(text: str) -> Any:
    return _SWITCH_TEXTS.get(text.strip().lower(), text)


def _otel(value: Any) -> bool:
    """The OpenTelemetry switch: on only with the otel extra installed (checked here, so that check-config
    refuses what serve could not run). Nothing of OpenTelemetry is imported while it is off."""
    if _switch(value):
        try:
            import opentelemetry.exporter.otlp.proto.http.trace_exporter
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError:
            raise _Invalid(f"needs the OpenTelemetry packages: {OTEL_INSTALL}", echo=False) from None
    return bool(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    if any(char in value for char in "\r\n\0"):
        # A value that ends up in a header must stay one header line.
        raise _Invalid("must be one line (no line break or NUL)")
    return value


def _host(value: Any) -> str:
    if not _string(value).strip():
        raise _Invalid("must not be empty")
    return str(value)


def _token(value: Any) -> str | None:
    # Empty means "no token" (e.g. token = "${VAR}" with VAR set to nothing).
    return _string(value) or None


# Client session ids are sealed with this secret (engine/sealing.py): guessable, it would let anyone make ids
# the proxy takes for its own.
SESSION_KEY_MIN_LENGTH: Final = 32


def _session_key(value: Any) -> str | None:
    # Empty means "no key": the proxy then keeps one in a key file (session_key = "${VAR}", VAR unset).
    key = _string(value).strip()
    if key and len(key) < SESSION_KEY_MIN_LENGTH:
        raise _Invalid(
            f"must be at least {SESSION_KEY_MIN_LENGTH} characters (e.g. the output of: openssl rand -hex 32)"
        )
    return key or None


def _state(value: Any) -> str:
    state = _string(value)
    if state in ("", MEMORY_STATE) or "://" not in state:
        return state  # "" means the default file
    parts = _split_url(state, "must be a file path, :memory:, or a redis:// or rediss:// URL")
    if parts.scheme not in ("redis", "rediss"):
        raise _Invalid("must be a file path, :memory:, or a redis:// or rediss:// URL")
    if not parts.hostname:
        raise _Invalid("must name a host (redis://HOST:PORT/DB)")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise _Invalid("must name the database by number (redis://HOST:PORT/0)")
    return state


def _shown_state(value: Any) -> str:
    return _without_userinfo(value)


_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#@\s]+$")


def _origins(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(origin, str) for origin in value):
        raise _Invalid("must be a list of origins")
    for origin in value:
        # Browsers send scheme://host[:port] in lower case, never a path: anything else would never match.
        if not _ORIGIN.match(origin) or origin != origin.lower():
            raise _Invalid(
                f"must list origins such as https://app.example.com (no path, lower case), not {origin!r}", echo=False
            )
    return tuple(value)


def _networks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid("must list IP addresses or networks")
    try:
        check_networks(tuple(value))
    except ValueError:
        raise _Invalid("must list IP addresses or networks (such as 10.0.0.0/8)") from None
    return tuple(value)


def _split_url(url: str, rule: str) -> SplitResult:
    """urlsplit, with its port checked (it is parsed only when asked) and every ValueError (an unclosed
    IPv6 bracket, a port out of range) turned into the option's rule."""
    if any(char.isspace() for char in url):
        raise _Invalid(f"{rule} (no spaces)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Invalid(f"{rule} (a valid host and port)") from None
    return parts


def _upstream_url(value: Any) -> str:
    url = _string(value)
    parts = _split_url(url, "must be an http(s) URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid("must be an http(s) URL")
    if "@" in parts.netloc:
        raise _Invalid(
            'must not carry credentials (user:password@): put them in headers, e.g. Authorization = "Bearer ${TOKEN}"',
            echo=False,
        )
    return url


def _proxy(value: Any) -> str:
    url = _string(value)
    if not url:
        return url  # "": no proxy, whatever the environment says
    from mcp_heal_proxy.upstream.routes import parse_proxy

    if "://" not in url:
        raise _Invalid('must be an http://HOST:PORT URL (or "" for none)', echo=False)
    try:
        parse_proxy(url, "proxy")
    except ValueError as exc:  # names the part that is wrong, never the value (it may hold a password)
        raise _Invalid(str(exc), echo=False) from None
    return url


_PATH = re.compile(r"^/[A-Za-z0-9._~/-]*$")


def _path(value: Any) -> str:
    path = _string(value)
    if not _PATH.match(path):
        raise _Invalid("must start with '/' and use letters, digits, '.', '_', '~', '-', '/' only")
    if is_reserved_path(path):
        raise _Invalid(
            f"must not be one of the proxy's own paths ({', '.join(sorted(RESERVED_PATHS))}, {STATUS_PREFIX}...)"
        )
    return path


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the proxy writes itself: an injected value would break framing or the session mapping.
_MANAGED_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding", "connection", "mcp-session-id"})


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid("must be a table of header names and values")
    for name, header_value in value.items():
        if not _HEADER_NAME.match(name):
            raise _Invalid(f"has {name!r}, which is not a header name", echo=False)
        if name.lower() in _MANAGED_HEADERS:
            raise _Invalid(f"must not set {name}: the proxy writes it", echo=False)
        if not isinstance(header_value, str):
            raise _Invalid(f"must map {name} to a string", echo=False)
        if any(char in header_value for char in "\r\n\0"):
            raise _Invalid(f"{name}: a value must be one line (no line break or NUL)", echo=False)
    return dict(value)


def _pem_file(value: Any) -> str:
    """A readable file (``~`` expanded); what it must hold is checked by its key's own rule."""
    path = os.path.expanduser(_string(value))
    if not path.strip():
        raise _Invalid("must name a PEM file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 20)
    except OSError as exc:
        raise _Invalid(f"cannot be read ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in head:
        raise _Invalid("must be a PEM file (-----BEGIN ...)")
    return path


def _ca_file(value: Any) -> str:
    path = _pem_file(value)
    try:
        # A bare context: the system's CAs need not be loaded (~40 ms) to check this file.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise _Invalid(f"holds no CA certificate that can be loaded ({exc})") from None
    return path


def _scopes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(scope, str) and scope and " " not in scope for scope in value):
        raise _Invalid("must be a list of scope names without spaces")
    return tuple(value)


def _heal_on(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list | tuple)
        or not all(isinstance(s, int) and s in HEALABLE_STATUSES for s in value)
        or 404 not in value
    ):
        raise _Invalid("must list statuses among 400, 401, 404, and include 404")
    return tuple(value)


def _text_as_statuses(text: str) -> Any:
    try:
        return [int(part) for part in _text_as_list(text)]
    except ValueError:
        return text


def _replay(value: Any) -> ReplayPolicy:
    if value in ("all", "none"):
        return "all" if value == "all" else "none"
    if isinstance(value, list | tuple) and all(isinstance(method, str) for method in value):
        return tuple(value)
    raise _Invalid('must be "all", "none", or a list of method names')


def _text_as_replay(text: str) -> Any:
    return text if text in ("all", "none") else _text_as_list(text)


SERVER_OPTIONS: Final[Mapping[str, Option]] = {
    "host": Option(_host, _text_as_str),
    "port": Option(_integer(0, 65535), _text_as_int),  # 0: the system picks a free port
    "state": Option(_state, _text_as_str, _shown_state),
    "log_format": Option(_one_of(LOG_FORMATS), _text_as_str),
    "log_level": Option(_one_of(LOG_LEVELS), _text_as_str),
    "max_body_bytes": Option(_integer(1), _text_as_int),
    "allowed_origins": Option(_origins, _text_as_list),
    "trusted_proxies": Option(_networks, _text_as_list),
    # Housekeeping runs every idle_ttl / 10 and a keep-alive comment every interval: floors keep both
    # from spinning (0 used to make them busy loops).
    "session_idle_ttl": Option(_seconds(minimum=1.0), _text_as_number),
    "keepalive_interval": Option(_seconds(minimum=0.1), _text_as_number),
    "token": Option(_token, _text_as_str, _hidden),
    "session_key": Option(_session_key, _text_as_str, _hidden),
    "shutdown_grace": Option(_seconds(zero_allowed=True), _text_as_number),
    "max_sessions": Option(_integer(1), _text_as_int),
    "max_streams_per_session": Option(_integer(1), _text_as_int),
    "stream_slot_wait": Option(_seconds(zero_allowed=True), _text_as_number),
    "http_server": Option(_one_of(HTTP_SERVERS), _text_as_str),
    "ca_file": Option(_ca_file, _text_as_str),
    "otel": Option(_otel, _text_as_bool),
    "otel_propagate": Option(_one_of(OTEL_PROPAGATE), _text_as_str),
    "proxy": Option(_proxy, _text_as_str, _without_userinfo),
}
# The [server] keys the stdio bridge takes too (with --set, MCP_HEAL_PROXY_*, or its --config file).
BRIDGE_SERVER_KEYS: Final = ("otel", "otel_propagate")
UPSTREAM_OPTIONS: Final[Mapping[str, Option]] = {
    "url": Option(_upstream_url, _text_as_str, _without_userinfo),
    "path": Option(_path, _text_as_str),
    "headers": Option(_headers, None, _hidden),
    "connect_timeout": Option(_seconds(), _text_as_number),
    "connect_retry": Option(_seconds(zero_allowed=True), _text_as_number),
    "read_timeout": Option(_seconds(), _text_as_number),
    "heal_timeout": Option(_seconds(), _text_as_number),
    "stream_idle_timeout": Option(_seconds(), _text_as_number),
    "pool_size": Option(_integer(1), _text_as_int),
    "max_streams": Option(_integer(1), _text_as_int),
    "keepalive_idle": Option(_seconds(), _text_as_number),
    "heal_on": Option(_heal_on, _text_as_statuses),
    "replay": Option(_replay, _text_as_replay),
    "client": Option(_one_of(UPSTREAM_CLIENTS), _text_as_str),
    "oauth_pass_through": Option(_one_of(OAUTH_PASS_THROUGH), _text_as_str),
    "era": Option(_one_of(UPSTREAM_ERAS), _text_as_str),
    # Proxy-managed OAuth login (auth/login.py, auth/managed.py); a config file's keys only: login reads the file.
    "auth": Option(_one_of(("oauth",)), None),
    "client_id": Option(_string, None),
    "client_secret": Option(_string, None, _hidden),
    "scopes": Option(_scopes, None),
    "callback_port": Option(_integer(1, 65535), None),
    "ca_file": Option(_ca_file, _text_as_str),
    # Checked together (the key must match the certificate) in _check_client_cert.
    "client_cert": Option(_pem_file, _text_as_str),
    "client_key": Option(_pem_file, _text_as_str),
    "proxy": Option(_proxy, _text_as_str, _without_userinfo),
}
# Keys that only mean something with auth = "oauth".
_OAUTH_KEYS: Final = ("client_id", "client_secret", "scopes", "callback_port")


def check_option(options: Mapping[str, Option], key: str, value: Any, where: str) -> Any:
    """The value of one option as the config holds it, or a ConfigError naming where it was set."""
    option = options[key]
    try:
        return option.check(value)
    except _Invalid as exc:
        shown = option.show(value) if exc.echo else None
        raise ConfigError(f"{where} {exc}" + (f", not {shown}" if shown is not None else "")) from None


def option_from_text(options: Mapping[str, Option], key: str, text: str, where: str) -> Any:
    """check_option for a value given as text (an environment variable, --set KEY=VALUE)."""
    read = options[key].from_text
    if read is None:
        raise ConfigError(f"{where}: {key} can be set in a config file only")
    return check_option(options, key, read(text), where)


# ---- loading ------------------------------------------------------------------------------------------


def expand_env(value: str, where: str, source: str, environ: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` with the environment variable NAME; a missing one is an error."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{source}: {where} refers to ${{{name}}}, which is not set")
        return environ[name]

    return _ENV_REFERENCE.sub(lookup, value)


def _upstream_from_table(
    name: str, table: Mapping[str, Any], source: str, environ: Mapping[str, str]
) -> UpstreamConfig:
    where = f"{source}: upstreams.{name}"
    if not _UPSTREAM_NAME.match(name):
        raise ConfigError(f"{source}: upstream name {name!r} may use letters, digits, '_', '.', '-' only")
    options: dict[str, Any] = {"name": name, "path": f"/{name}/mcp"}
    for key, value in table.items():
        if key not in UPSTREAM_OPTIONS:
            raise ConfigError(f"{source}: unknown key upstreams.{name}.{key}")
        if key in ("client_id", "client_secret", "proxy") and isinstance(value, str):
            value = expand_env(value, f"upstreams.{name}.{key}", source, environ)
        if key == "headers" and isinstance(value, dict):
            value = {
                header: expand_env(text, f"upstreams.{name}.headers.{header}", source, environ)
                if isinstance(text, str)
                else text
                for header, text in value.items()
            }
        options[key] = check_option(UPSTREAM_OPTIONS, key, value, f"{where}.{key}")
    if "url" not in table:
        raise ConfigError(f"{where}.url is required")
    _check_oauth_keys(options, where)
    _check_client_cert(options, f"{where}.")
    return UpstreamConfig(**options, config_file=os.path.abspath(source))


def _check_client_cert(options: Mapping[str, Any], prefix: str) -> None:
    """client_cert and client_key load together: a key needs a certificate, and the two must match.
    ``prefix`` comes before a key's name in the message ("proxy.toml: upstreams.x.", "--set ")."""
    cert, key = options.get("client_cert"), options.get("client_key")
    if cert is None:
        if key is not None:
            raise ConfigError(f"{prefix}client_key needs client_cert")
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            f"{prefix}client_cert cannot be used ({reason}): it must hold the certificate, and client_key "
            "(or the same file) its unencrypted private key"
        ) from None


def _refuse_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL ask for a password on the terminal.
    raise ValueError("the private key is encrypted")


def _check_oauth_keys(options: Mapping[str, Any], where: str) -> None:
    """The keys of a proxy-managed login go together (auth = "oauth" and the ones that need it)."""
    if options.get("auth") != "oauth":
        for key in _OAUTH_KEYS:
            if key in options:
                raise ConfigError(f'{where}.{key} needs auth = "oauth"')
        return
    if "client_secret" in options and "client_id" not in options:
        raise ConfigError(f"{where}.client_secret needs client_id")
    if any(header.lower() == "authorization" for header in options.get("headers", {})):
        raise ConfigError(f'{where} has both auth = "oauth" and an Authorization header; keep one')


def is_status_path(path: str) -> bool:
    """A path of the status page or its JSON endpoints."""
    return path == "/" or path.startswith(STATUS_PREFIX)


def is_reserved_path(path: str) -> bool:
    """A path the proxy serves itself, which no upstream may take."""
    return path in RESERVED_PATHS or path.startswith(STATUS_PREFIX)


def check_networks(values: tuple[Any, ...]) -> None:
    """Check trusted proxy entries: IP addresses or networks (``10.0.0.0/8``); ValueError if not."""
    for value in values:
        if not isinstance(value, str):
            raise ValueError(value)
        ipaddress.ip_network(value, strict=False)


def load_file(path: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Read a TOML config file into keyword options for ProxyConfig (validated)."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = set(document) - {"server", "upstreams"}
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {sorted(unknown)[0]}")
    server = document.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: server must be a table")
    options: dict[str, Any] = {}
    for key, value in server.items():
        if key not in SERVER_OPTIONS:
            raise ConfigError(f"{path}: unknown key server.{key}")
        if key in ("token", "session_key", "proxy") and isinstance(value, str):
            value = expand_env(value, f"server.{key}", path, environ)
        options[key] = check_option(SERVER_OPTIONS, key, value, f"{path}: server.{key}")
    upstream_tables = document.get("upstreams", {})
    if not isinstance(upstream_tables, dict) or not all(isinstance(t, dict) for t in upstream_tables.values()):
        raise ConfigError(f"{path}: upstreams must hold one table per upstream, e.g. [upstreams.github]")
    options["upstreams"] = tuple(
        _upstream_from_table(name, table, path, environ) for name, table in upstream_tables.items()
    )
    return options


# Variables read besides the [server] keys' (TOKEN is one of those); TEST_CLIENT is the test suite's.
_OTHER_VARIABLES: Final = ("UPSTREAM", "CONFIG", "TEST_CLIENT")


def unknown_variables(environ: Mapping[str, str], config_file: str | None = None) -> list[tuple[str, str | None]]:
    """Each ``MCP_HEAL_PROXY_*`` variable that is no setting (a misspelled one would be ignored without a
    word), with the closest setting's variable if one is close; variables the config file refers to as
    ``${NAME}`` are the user's own and not listed."""
    known = {ENV_PREFIX + key.upper() for key in SERVER_OPTIONS} | {ENV_PREFIX + name for name in _OTHER_VARIABLES}
    referenced: set[str] = set()
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        # build_config reports an unreadable file.
        with contextlib.suppress(OSError, UnicodeDecodeError):
            referenced = set(_ENV_REFERENCE.findall(Path(config_file).expanduser().read_text(encoding="utf-8")))
    unknown: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known and name not in referenced:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            unknown.append((name, close[0] if close else None))
    return unknown


def _env_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """Every [server] key as MCP_HEAL_PROXY_<KEY> (empty means unset), and MCP_HEAL_PROXY_UPSTREAM."""
    options: dict[str, Any] = {}
    for key in SERVER_OPTIONS:
        name = ENV_PREFIX + key.upper()
        text = environ.get(name)
        if text:
            options[key] = option_from_text(SERVER_OPTIONS, key, text, name)
    upstream = environ.get(ENV_PREFIX + "UPSTREAM")
    if upstream:
        options["upstream"] = check_option(UPSTREAM_OPTIONS, "url", upstream, ENV_PREFIX + "UPSTREAM")
    return options


def parse_setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` from ``--set``: a [server] key, or an upstream key for the ``--upstream`` upstream."""
    key, equals, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not equals or not key:
        raise ConfigError(f"--set takes KEY=VALUE, not {text!r}")
    if key not in SERVER_OPTIONS and key not in UPSTREAM_OPTIONS:
        raise ConfigError(f"--set: unknown key {key} (see config.example.toml)")
    if key in ("url", "path"):
        raise ConfigError(f"--set: {key} is set by --upstream (served at {ENDPOINT_PATH})")
    return key, value


def upstream_settings(settings: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any]:
    """Upstream keys from ``--set KEY=VALUE`` texts (the stdio bridge's), checked; with no ca_file (or
    proxy) among them, ``MCP_HEAL_PROXY_CA_FILE`` (``MCP_HEAL_PROXY_PROXY``), the [server] default, when set."""
    options: dict[str, Any] = {}
    for text in settings:
        key, value = parse_setting(text)
        if key not in UPSTREAM_OPTIONS:
            raise ConfigError(f"--set: {key} is not an upstream key (see config.example.toml's [upstreams.NAME])")
        options[key] = option_from_text(UPSTREAM_OPTIONS, key, value, f"--set {key}")
    default_ca = environ.get(ENV_PREFIX + "CA_FILE")
    if "ca_file" not in options and default_ca:
        options["ca_file"] = option_from_text(SERVER_OPTIONS, "ca_file", default_ca, ENV_PREFIX + "CA_FILE")
    default_proxy = environ.get(ENV_PREFIX + "PROXY")
    if "proxy" not in options and default_proxy:
        options["proxy"] = option_from_text(SERVER_OPTIONS, "proxy", default_proxy, ENV_PREFIX + "PROXY")
    _check_client_cert(options, "--set ")
    return options


def bridge_server_options(
    settings: Sequence[str], environ: Mapping[str, str], config_file: str | None
) -> tuple[list[str], dict[str, Any]]:
    """The [server] keys the stdio bridge takes (BRIDGE_SERVER_KEYS), from its config file's [server], then
    ``MCP_HEAL_PROXY_*``, then ``--set`` (later ones winning); and the ``--set`` texts left for its upstream."""
    options: dict[str, Any] = {}
    if config_file is not None:
        loaded = load_file(config_file, environ)
        options.update({key: loaded[key] for key in BRIDGE_SERVER_KEYS if key in loaded})
    for key in BRIDGE_SERVER_KEYS:
        name = ENV_PREFIX + key.upper()
        text = environ.get(name)
        if text:
            options[key] = option_from_text(SERVER_OPTIONS, key, text, name)
    rest: list[str] = []
    for text in settings:
        key, value = parse_setting(text)
        if key in BRIDGE_SERVER_KEYS:
            options[key] = option_from_text(SERVER_OPTIONS, key, value, f"--set {key}")
        else:
            rest.append(text)
    return rest, options


def build_config(
    *,
    config_file: str | None,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    settings: Sequence[str] = (),
) -> ProxyConfig:
    """The effective config: file, then environment, then flags (None flags are not given).

    ``flags`` are named like the [server] keys (``upstream`` for --upstream); ``settings`` are the
    ``--set KEY=VALUE`` texts, applied before the named flags.
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    options: dict[str, Any] = load_file(config_file, environ) if config_file else {"upstreams": ()}
    options.update(_env_options(environ))
    upstream_settings: dict[str, Any] = {}
    for text in settings:
        key, value = parse_setting(text)
        if key in SERVER_OPTIONS:
            options[key] = option_from_text(SERVER_OPTIONS, key, value, f"--set {key}")
        else:
            upstream_settings[key] = option_from_text(UPSTREAM_OPTIONS, key, value, f"--set {key}")
    for key, value in flags.items():
        if value is None:
            continue
        if key == "upstream":
            options["upstream"] = check_option(UPSTREAM_OPTIONS, "url", value, "--upstream")
            continue
        where = "--" + key.replace("_", "-")
        read = option_from_text if isinstance(value, str) else check_option
        options[key] = read(SERVER_OPTIONS, key, value, where)
    single = options.pop("upstream", None)
    if single is not None:
        # --upstream serves one upstream at /mcp, replacing any of the same name from the file.
        others = tuple(u for u in options["upstreams"] if u.path != ENDPOINT_PATH and u.name != "default")
        _check_client_cert(upstream_settings, "--set ")
        options["upstreams"] = (UpstreamConfig(url=single, **upstream_settings), *others)
    elif upstream_settings:
        raise ConfigError(
            f"--set {next(iter(upstream_settings))}: upstream keys apply to the --upstream upstream; "
            "give --upstream URL, or set the key in the file's [upstreams.NAME] table"
        )
    if not options["upstreams"]:
        raise ConfigError("no upstream: give --upstream URL, or [upstreams.NAME] in a config file")
    if options.get("ca_file"):
        # [server] ca_file is the default of every upstream that names no CA file of its own.
        options["upstreams"] = tuple(
            u if u.ca_file else replace(u, ca_file=options["ca_file"]) for u in options["upstreams"]
        )
    if options.get("proxy") is not None:
        # [server] proxy is the default of every upstream that names no proxy of its own.
        options["upstreams"] = tuple(
            u if u.proxy is not None else replace(u, proxy=options["proxy"]) for u in options["upstreams"]
        )
    check_proxy_environment(options["upstreams"], environ)
    paths = [u.path for u in options["upstreams"]]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"two upstreams share the path {next(p for p in paths if paths.count(p) > 1)}")
    if not options.get("state"):
        # Durable by default, so a restarted proxy keeps every client's session.
        options["state"] = default_state_path()
    elif options["state"] != MEMORY_STATE and "://" not in options["state"]:
        options["state"] = os.path.expanduser(options["state"])
    return ProxyConfig(**options)


def check_proxy_environment(upstreams: Sequence[UpstreamConfig], environ: Mapping[str, str]) -> None:
    """A malformed HTTPS_PROXY / HTTP_PROXY that an upstream would go through is a ConfigError naming it
    (a proxy key was checked where it was set)."""
    from mcp_heal_proxy.upstream.routes import proxy_for

    for upstream in upstreams:
        try:
            proxy_for(upstream.url, upstream.proxy, environ)
        except ValueError as exc:
            raise ConfigError(f"upstream {upstream.name}: {exc}") from None


def describe(config: ProxyConfig) -> dict[str, Any]:
    """The effective config as a plain dict with secrets masked (for ``check-config``)."""
    server = {f.name: getattr(config, f.name) for f in fields(ProxyConfig) if f.name != "upstreams"}
    if config.token:
        server["token"] = "***"
    if config.session_key:
        server["session_key"] = "***"
    server["state"] = config.state_display
    if config.proxy:
        server["proxy"] = mask_url(config.proxy)
    upstreams = {}
    for upstream in config.upstreams:
        table = {
            f.name: getattr(upstream, f.name) for f in fields(UpstreamConfig) if f.name not in ("name", "config_file")
        }
        table["headers"] = {name: "***" for name in upstream.headers}
        if upstream.client_secret:
            table["client_secret"] = "***"
        table["url"] = mask_url(upstream.url)
        if upstream.proxy:
            table["proxy"] = mask_url(upstream.proxy)
        upstreams[upstream.name] = table
    return {"server": server, "upstreams": upstreams}


def login_command(upstream: UpstreamConfig, state: str) -> str:
    """The ``login`` command line for an upstream, as it runs when pasted in any directory: with the
    config file it came from, and the store's path when it is not the default (the tokens sit beside it)."""
    words = ["mcp-heal-proxy", "login", upstream.name]
    if upstream.config_file:
        words += ["--config", upstream.config_file]
    if state != MEMORY_STATE and "://" not in state and os.path.abspath(state) != os.path.abspath(default_state_path()):
        words += ["--state", os.path.abspath(state)]
    return shlex.join(words)
