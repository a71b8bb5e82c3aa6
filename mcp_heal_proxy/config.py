"""The proxy's configuration: frozen dataclasses built once at startup and passed down.

Sources, later ones winning: the TOML file, ``MCP_HEAL_PROXY_*`` environment variables, CLI flags.
Every key of the file is checked here, with the file and the key's name in the message, so that a typo
never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

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

LogFormat = Literal["auto", "json", "console"]
LOG_FORMATS: Final = ("auto", "json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
ReplayPolicy = Literal["all", "none"] | tuple[str, ...]
UpstreamClient = Literal["aiohttp", "lean"]
UPSTREAM_CLIENTS: Final = ("aiohttp", "lean")
# The lean client carries 1.7x aiohttp's throughput through the proxy (docs/benchmarks.md, "Tuning");
# "aiohttp" stays available per upstream as the fallback.
DEFAULT_UPSTREAM_CLIENT: Final = "lean"

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
    # The longest silence on a GET stream; None waits forever (the proxy's keep-alives fill silences).
    stream_idle_timeout: float | None = None
    pool_size: int = 100
    # Seconds a pooled connection may sit idle and still be reused (lean client): below the upstream's
    # own keep-alive timeout, so that no request is sent on a connection the upstream is closing.
    keepalive_idle: float = 4.0
    heal_on: tuple[int, ...] = DEFAULT_HEAL_ON
    replay: ReplayPolicy = "all"
    # The HTTP client for this upstream: the lean pool in upstream_lean.py, or aiohttp's ClientSession.
    client: UpstreamClient = DEFAULT_UPSTREAM_CLIENT
    # auth = "oauth": the proxy logs in itself (``mcp-heal-proxy login NAME``) and sends the token;
    # client_id/client_secret name a pre-registered client (else dynamic registration), scopes
    # replace the discovered ones, callback_port fixes the loopback redirect URI's port.
    auth: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scopes: tuple[str, ...] | None = None
    callback_port: int | None = None

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
    max_streams_per_session: int = 256

    def client_url(self, upstream: UpstreamConfig, port: int | None = None) -> str:
        """The URL a client puts in its config for one upstream."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if port is None else port}{upstream.path}"

    def secrets(self) -> tuple[str, ...]:
        """Every configured value that must never be logged."""
        injected = tuple(value for upstream in self.upstreams for value in upstream.headers.values() if value)
        injected += tuple(u.client_secret for u in self.upstreams if u.client_secret)
        store_password = urlsplit(self.state).password if "://" in self.state else None
        return tuple(s for s in (*injected, self.token, store_password) if s)

    @property
    def state_display(self) -> str:
        """The store location as it may be shown: a Redis URL's password masked."""
        return mask_url(self.state) if "://" in self.state else self.state


def single_upstream(url: str, **options: Any) -> ProxyConfig:
    """A config with one upstream served at /mcp (what ``serve --upstream URL`` builds)."""
    upstream_options = {k: v for k, v in options.items() if k in _UPSTREAM_FIELDS}
    proxy_options = {k: v for k, v in options.items() if k not in _UPSTREAM_FIELDS}
    return ProxyConfig(upstreams=(UpstreamConfig(url=url, **upstream_options),), **proxy_options)


_UPSTREAM_FIELDS: Final = frozenset(f.name for f in fields(UpstreamConfig))

# ---- loading ------------------------------------------------------------------------------------------

_SERVER_KEYS: Final = {
    "host": str,
    "port": int,
    "state": str,
    "log_format": str,
    "log_level": str,
    "max_body_bytes": int,
    "allowed_origins": list,
    "session_idle_ttl": (int, float),
    "keepalive_interval": (int, float),
    "token": str,
    "shutdown_grace": (int, float),
    "max_sessions": int,
    "max_streams_per_session": int,
}
_UPSTREAM_KEYS: Final = {
    "url": str,
    "path": str,
    "headers": dict,
    "connect_timeout": (int, float),
    "connect_retry": (int, float),
    "read_timeout": (int, float),
    "stream_idle_timeout": (int, float),
    "pool_size": int,
    "keepalive_idle": (int, float),
    "heal_on": list,
    "replay": (str, list),
    "client": str,
    "auth": str,
    "client_id": str,
    "client_secret": str,
    "scopes": list,
    "callback_port": int,
}


def _type_name(expected: Any) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "a table", float: "a number"}
    if isinstance(expected, tuple):
        return " or ".join(names[t] for t in expected if t in names)
    return names.get(expected, str(expected))


def _check_table(table: Mapping[str, Any], allowed: Mapping[str, Any], where: str, source: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key {where}.{key}")
        expected = allowed[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"{source}: {where}.{key} must be {_type_name(expected)}, not {value!r}")


def expand_env(value: str, where: str, source: str, environ: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` with the environment variable NAME; a missing one is an error."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{source}: {where} refers to ${{{name}}}, which is not set")
        return environ[name]

    expanded = _ENV_REFERENCE.sub(lookup, value)
    if any(char in expanded for char in "\r\n\0"):
        # Header injection: a value must stay one header line.
        raise ConfigError(f"{source}: {where} contains a line break or NUL")
    return expanded


def _upstream_from_table(
    name: str, table: Mapping[str, Any], source: str, environ: Mapping[str, str]
) -> UpstreamConfig:
    where = f"upstreams.{name}"
    if not _UPSTREAM_NAME.match(name):
        raise ConfigError(f"{source}: upstream name {name!r} may use letters, digits, '_', '.', '-' only")
    _check_table(table, _UPSTREAM_KEYS, where, source)
    if "url" not in table:
        raise ConfigError(f"{source}: {where}.url is required")
    options: dict[str, Any] = {"name": name, "url": check_url(table["url"], f"{source}: {where}.url")}
    options["path"] = table.get("path", f"/{name}/mcp")
    if not options["path"].startswith("/"):
        raise ConfigError(f"{source}: {where}.path must start with '/'")
    headers = table.get("headers", {})
    for header, value in headers.items():
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where}.headers.{header} must be a string")
    options["headers"] = {h: expand_env(v, f"{where}.headers.{h}", source, environ) for h, v in headers.items()}
    if "connect_retry" in table:
        if table["connect_retry"] < 0:
            raise ConfigError(f"{source}: {where}.connect_retry must not be negative")
        options["connect_retry"] = float(table["connect_retry"])
    for key in ("connect_timeout", "read_timeout", "stream_idle_timeout", "keepalive_idle"):
        if key in table:
            if table[key] <= 0:
                raise ConfigError(f"{source}: {where}.{key} must be positive")
            options[key] = float(table[key])
    if "pool_size" in table:
        if table["pool_size"] < 1:
            raise ConfigError(f"{source}: {where}.pool_size must be at least 1")
        options["pool_size"] = table["pool_size"]
    if "heal_on" in table:
        heal_on = table["heal_on"]
        if not all(isinstance(s, int) and s in HEALABLE_STATUSES for s in heal_on) or 404 not in heal_on:
            raise ConfigError(f"{source}: {where}.heal_on must list statuses among 400, 401, 404, and include 404")
        options["heal_on"] = tuple(heal_on)
    if "replay" in table:
        options["replay"] = _replay_policy(table["replay"], f"{source}: {where}.replay")
    if "client" in table:
        if table["client"] not in UPSTREAM_CLIENTS:
            raise ConfigError(f'{source}: {where}.client must be "aiohttp" or "lean"')
        if table["client"] == "lean" and "@" in urlsplit(options["url"]).netloc:
            raise ConfigError(f"{source}: {where}.url: the lean client takes no credentials in the URL (use headers)")
        options["client"] = table["client"]
    options.update(_oauth_options(table, where, source, environ))
    return UpstreamConfig(**options)


def _oauth_options(table: Mapping[str, Any], where: str, source: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """The proxy-managed login keys of one upstream table (auth, client_id, client_secret, scopes, callback_port)."""
    options: dict[str, Any] = {}
    if "auth" not in table:
        for key in ("client_id", "client_secret", "scopes", "callback_port"):
            if key in table:
                raise ConfigError(f'{source}: {where}.{key} needs {where}.auth = "oauth"')
        return options
    if table["auth"] != "oauth":
        raise ConfigError(f'{source}: {where}.auth must be "oauth"')
    if any(header.lower() == "authorization" for header in table.get("headers", {})):
        raise ConfigError(f'{source}: {where} has both auth = "oauth" and an Authorization header; keep one')
    options["auth"] = "oauth"
    if "client_id" in table:
        options["client_id"] = expand_env(table["client_id"], f"{where}.client_id", source, environ)
    if "client_secret" in table:
        if "client_id" not in table:
            raise ConfigError(f"{source}: {where}.client_secret needs {where}.client_id")
        options["client_secret"] = expand_env(table["client_secret"], f"{where}.client_secret", source, environ)
    if "scopes" in table:
        if not all(isinstance(scope, str) and scope and " " not in scope for scope in table["scopes"]):
            raise ConfigError(f"{source}: {where}.scopes must be a list of scope names without spaces")
        options["scopes"] = tuple(table["scopes"])
    if "callback_port" in table:
        if not 1 <= table["callback_port"] <= 65535:
            raise ConfigError(f"{source}: {where}.callback_port must be a port number")
        options["callback_port"] = table["callback_port"]
    return options


def _replay_policy(value: Any, where: str) -> ReplayPolicy:
    if value in ("all", "none"):
        return "all" if value == "all" else "none"
    if isinstance(value, list) and all(isinstance(method, str) for method in value):
        return tuple(value)
    raise ConfigError(f'{where} must be "all", "none", or a list of method names')


def check_url(value: str, where: str) -> str:
    """An http(s) URL with a host, or a ConfigError naming where it came from."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: not an http(s) URL: {value!r}")
    return value


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
    _check_table(server, _SERVER_KEYS, "server", path)
    options: dict[str, Any] = dict(server)
    if "token" in options:
        options["token"] = expand_env(options["token"], "server.token", path, environ) or None
    if "allowed_origins" in options:
        options["allowed_origins"] = tuple(options["allowed_origins"])
    upstream_tables = document.get("upstreams", {})
    if not isinstance(upstream_tables, dict) or not all(isinstance(t, dict) for t in upstream_tables.values()):
        raise ConfigError(f"{path}: upstreams must hold one table per upstream, e.g. [upstreams.github]")
    options["upstreams"] = tuple(
        _upstream_from_table(name, table, path, environ) for name, table in upstream_tables.items()
    )
    return options


def _env_options(environ: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key in ("host", "state", "log_format", "log_level", "token"):
        value = environ.get(ENV_PREFIX + key.upper())
        if value:
            options[key] = value
    for key in ("port", "max_body_bytes"):
        value = environ.get(ENV_PREFIX + key.upper())
        if value:
            try:
                options[key] = int(value)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{key.upper()} must be an integer, not {value!r}") from None
    upstream = environ.get(ENV_PREFIX + "UPSTREAM")
    if upstream:
        options["upstream"] = check_url(upstream, f"{ENV_PREFIX}UPSTREAM")
    return options


def build_config(
    *, config_file: str | None, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> ProxyConfig:
    """The effective config: file, then environment, then flags (None flags are not given)."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    options: dict[str, Any] = load_file(config_file, environ) if config_file else {"upstreams": ()}
    options.update(_env_options(environ))
    options.update({key: value for key, value in flags.items() if value is not None})
    single = options.pop("upstream", None)
    if single is not None:
        # --upstream serves one upstream at /mcp, replacing any of the same name from the file.
        others = tuple(u for u in options["upstreams"] if u.path != ENDPOINT_PATH and u.name != "default")
        options["upstreams"] = (UpstreamConfig(url=single), *others)
    if not options["upstreams"]:
        raise ConfigError("no upstream: give --upstream URL, or [upstreams.NAME] in a config file")
    paths = [u.path for u in options["upstreams"]]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"two upstreams share the path {next(p for p in paths if paths.count(p) > 1)}")
    if options.get("log_format", "auto") not in LOG_FORMATS:
        raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
    if options.get("log_level", "info") not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if not options.get("state"):
        # Durable by default, so a restarted proxy keeps every client's session.
        options["state"] = default_state_path()
    elif options["state"] != MEMORY_STATE and "://" not in options["state"]:
        options["state"] = os.path.expanduser(options["state"])
    return ProxyConfig(**options)


def describe(config: ProxyConfig) -> dict[str, Any]:
    """The effective config as a plain dict with secrets masked (for ``check-config``)."""
    server = {f.name: getattr(config, f.name) for f in fields(ProxyConfig) if f.name != "upstreams"}
    if config.token:
        server["token"] = "***"
    server["state"] = config.state_display
    upstreams = {}
    for upstream in config.upstreams:
        table = {f.name: getattr(upstream, f.name) for f in fields(UpstreamConfig) if f.name != "name"}
        table["headers"] = {name: "***" for name in upstream.headers}
        if upstream.client_secret:
            table["client_secret"] = "***"
        table["url"] = mask_url(upstream.url)
        upstreams[upstream.name] = table
    return {"server": server, "upstreams": upstreams}


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
