"""Configuration: file, environment and flags, validated with the key's name in every error."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_heal_proxy.config import SERVER_OPTIONS, ConfigError, ProxyConfig, build_config, default_state_path, describe
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "config.example.toml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return str(path)


def test_the_example_file_is_valid_and_documents_every_key() -> None:
    config = build_config(config_file=str(EXAMPLE), flags={}, environ={"GITHUB_TOKEN": "ghp_example"})
    (github,) = config.upstreams
    assert github.path == "/github/mcp"
    assert github.headers == {"Authorization": "Bearer ghp_example"}
    example = EXAMPLE.read_text()
    described = describe(config)
    for key in [*described["server"], *described["upstreams"]["github"]]:
        assert f"{key} =" in example or f"# {key} =" in example, f"config.example.toml does not document {key}"


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 1000\nhost = "127.0.0.2"\n[upstreams.a]\nurl = "http://a/mcp"\n')
    environ = {"MCP_HEAL_PROXY_PORT": "2000", "MCP_HEAL_PROXY_LOG_LEVEL": "debug"}
    config = build_config(config_file=path, flags={"port": 3000, "host": None}, environ=environ)
    assert config.port == 3000
    assert config.host == "127.0.0.2"
    assert config.log_level == "debug"


def test_upstream_flag_serves_at_mcp_beside_file_upstreams(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstreams.a]\nurl = "http://a/mcp"\n')
    config = build_config(config_file=path, flags={"upstream": "http://b/mcp"}, environ={})
    assert [(u.name, u.path) for u in config.upstreams] == [("default", "/mcp"), ("a", "/a/mcp")]


def test_the_state_defaults_to_the_users_state_directory(tmp_path: Path) -> None:
    config = build_config(config_file=None, flags={"upstream": "http://b/mcp"}, environ={})
    assert config.state == default_state_path()
    assert config.state.endswith("mcp-heal-proxy/sessions.db")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown key server.prot"),
        ('[server]\nport = "80"\n', "server.port must be an integer"),
        ("[upstreams.a]\npath = '/x'\n", "upstreams.a.url is required"),
        ("[upstreams.a]\nurl = 'ftp://x'\n", "upstreams.a.url must be an http(s) URL"),
        ("[upstreams.a]\nurl = 'http://x'\nheal_on = [500]\n", "heal_on must list"),
        ("[upstreams.a]\nurl = 'http://x'\nreplay = 'some'\n", "replay must be"),
        ("[upstreams.a]\nurl = 'http://x'\nheaders = { A = '${NOPE}' }\n", "${NOPE}, which is not set"),
        ("[upstreams.a]\nurl = 'http://x'\ntimeout = 3\n", "unknown key upstreams.a.timeout"),
        ("[upstreams.a]\nurl = 'http://x'\n[upstreams.b]\nurl = 'http://y'\npath = '/a/mcp'\n", "share the path"),
        ("[server\n", "invalid TOML"),
        ("", "no upstream"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        build_config(config_file=write(tmp_path, text), flags={}, environ={})


def test_a_header_value_cannot_inject_a_second_header(tmp_path: Path) -> None:
    path = write(tmp_path, "[upstreams.a]\nurl = 'http://x'\nheaders = { A = '${EVIL}' }\n")
    with pytest.raises(ConfigError, match="line break"):
        build_config(config_file=path, flags={}, environ={"EVIL": "x\r\nX-Injected: 1"})


async def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[server]\nstate = 'redis://:pw@127.0.0.1:6379/0'\n"
        "[upstreams.a]\nurl = 'http://x/mcp'\nheaders = { Authorization = 'Bearer ${TOKEN}' }\n",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        "check-config",
        path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"TOKEN": "sekrit-token-value", "PATH": "/usr/bin:/bin"},
        cwd=REPO_ROOT,
    )
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr
    assert b"sekrit-token-value" not in stdout
    assert b":pw@" not in stdout
    shown = json.loads(stdout)
    assert shown["upstreams"]["a"]["headers"] == {"Authorization": "***"}


async def test_check_config_of_a_missing_file_exits_2_in_one_line(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        "check-config",
        str(tmp_path / "missing.toml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert stderr.count(b"\n") == 1
    assert b"cannot read config" in stderr


# ---- one check for every source: the file, MCP_HEAL_PROXY_* variables, --set and the named flags -------

# (key, value as TOML, reason): values each source must refuse with the same reason.
SERVER_REFUSALS = [
    ("port", "70000", "must be between 0 and 65535"),
    ("port", "-1", "must be between 0 and 65535"),
    ("max_sessions", "0", "must be at least 1"),
    ("max_sessions", "-1", "must be at least 1"),
    ("max_streams_per_session", "0", "must be at least 1"),
    ("max_body_bytes", "0", "must be at least 1"),
    ("session_idle_ttl", "0", "must be a number of seconds, at least 1"),
    ("session_idle_ttl", "0.5", "must be a number of seconds, at least 1"),
    ("keepalive_interval", "0", "must be a number of seconds, at least 0.1"),
    ("keepalive_interval", "-15", "must be a number of seconds, at least 0.1"),
    ("keepalive_interval", "nan", "must be a number of seconds, at least 0.1"),
    ("shutdown_grace", "-1", "must be a number of seconds, 0 or more"),
    ("shutdown_grace", "inf", "must be a number of seconds, 0 or more"),
    ("stream_slot_wait", "-1", "must be a number of seconds, 0 or more"),
    ("log_level", '"verbose"', "must be one of debug, info, warning, error"),
    ("log_format", '"xml"', "must be one of auto, json, console"),
    ("state", '"postgres://db/sessions"', "must be a file path, :memory:, or a redis:// or rediss:// URL"),
    ("state", '"redis://localhost:port/0"', "must be a file path, :memory:, or a redis:// or rediss:// URL (a valid"),
    ("state", '"redis://localhost:6379/sessions"', "must name the database by number"),
    ("host", '""', "must not be empty"),
]
# Values at the edge of each range, which every source must accept.
SERVER_EDGES = [
    ("port", "0", 0),
    ("port", "65535", 65535),
    ("max_sessions", "1", 1),
    ("max_streams_per_session", "1", 1),
    ("max_body_bytes", "1", 1),
    ("session_idle_ttl", "1", 1.0),
    ("keepalive_interval", "0.1", 0.1),
    ("shutdown_grace", "0", 0.0),
    ("stream_slot_wait", "0", 0.0),
]
# Named flags of serve/check-config, besides --set.
NAMED_FLAGS = frozenset({"host", "port", "state", "log_format", "log_level"})
UPSTREAM = "[upstreams.a]\nurl = 'http://127.0.0.1:9/mcp'\n"


def text_of(toml_value: str) -> str:
    """The same value as a user types it in a variable or a flag."""
    return toml_value.strip('"')


def refusal(where: str, reason: str) -> str:
    """The whole error message, as a regex: the place, then the one reason shared by every source."""
    return "^" + re.escape(f"{where} {reason}")


@pytest.mark.parametrize(("key", "value", "reason"), SERVER_REFUSALS)
def test_a_server_value_out_of_range_is_refused_from_every_source(
    tmp_path: Path, key: str, value: str, reason: str
) -> None:
    path = write(tmp_path, f"[server]\n{key} = {value}\n{UPSTREAM}")
    with pytest.raises(ConfigError, match=refusal(f"{path}: server.{key}", reason)):
        build_config(config_file=path, flags={}, environ={})
    variable = f"MCP_HEAL_PROXY_{key.upper()}"
    with pytest.raises(ConfigError, match=refusal(variable, reason)):
        build_config(config_file=None, flags={"upstream": "http://x/mcp"}, environ={variable: text_of(value) or " "})
    with pytest.raises(ConfigError, match=refusal(f"--set {key}", reason)):
        build_config(
            config_file=None, flags={"upstream": "http://x/mcp"}, environ={}, settings=[f"{key}={text_of(value)}"]
        )
    if key in NAMED_FLAGS:
        flag = "--" + key.replace("_", "-")
        with pytest.raises(ConfigError, match=refusal(flag, reason)):
            build_config(config_file=None, flags={"upstream": "http://x/mcp", key: text_of(value)}, environ={})


@pytest.mark.parametrize(("key", "value", "expected"), SERVER_EDGES)
def test_a_server_value_at_the_edge_of_its_range_is_accepted_from_every_source(
    tmp_path: Path, key: str, value: str, expected: object
) -> None:
    path = write(tmp_path, f"[server]\n{key} = {value}\n{UPSTREAM}")
    configs = [
        build_config(config_file=path, flags={}, environ={}),
        build_config(
            config_file=None, flags={"upstream": "http://x/mcp"}, environ={f"MCP_HEAL_PROXY_{key.upper()}": value}
        ),
        build_config(config_file=None, flags={"upstream": "http://x/mcp"}, environ={}, settings=[f"{key}={value}"]),
    ]
    if key in NAMED_FLAGS:
        configs.append(build_config(config_file=None, flags={"upstream": "http://x/mcp", key: value}, environ={}))
    assert {getattr(config, key) for config in configs} == {expected}


# Upstream keys live in [upstreams.NAME]; --set gives them to the --upstream upstream.
UPSTREAM_REFUSALS = [
    ("connect_timeout", "0", "must be a number of seconds above 0"),
    ("read_timeout", "0", "must be a number of seconds above 0"),
    ("read_timeout", "-5", "must be a number of seconds above 0"),
    ("heal_timeout", "0", "must be a number of seconds above 0"),
    ("heal_timeout", "-1", "must be a number of seconds above 0"),
    ("heal_timeout", "inf", "must be a number of seconds above 0"),
    ("stream_idle_timeout", "0", "must be a number of seconds above 0"),
    ("keepalive_idle", "0", "must be a number of seconds above 0"),
    ("connect_retry", "-1", "must be a number of seconds, 0 or more"),
    ("pool_size", "0", "must be at least 1"),
    ("client", '"curl"', "must be one of aiohttp, lean"),
    ("heal_on", "[400]", "must list statuses among 400, 401, 404, and include 404"),
]


@pytest.mark.parametrize(("key", "value", "reason"), UPSTREAM_REFUSALS)
def test_an_upstream_value_out_of_range_is_refused_from_the_file_and_from_set(
    tmp_path: Path, key: str, value: str, reason: str
) -> None:
    path = write(tmp_path, f"{UPSTREAM}{key} = {value}\n")
    with pytest.raises(ConfigError, match=refusal(f"{path}: upstreams.a.{key}", reason)):
        build_config(config_file=path, flags={}, environ={})
    text = text_of(value).strip("[]")
    with pytest.raises(ConfigError, match=refusal(f"--set {key}", reason)):
        build_config(config_file=None, flags={"upstream": "http://x/mcp"}, environ={}, settings=[f"{key}={text}"])


def test_set_gives_upstream_keys_to_the_upstream_flag_and_refuses_them_without_it() -> None:
    config = build_config(
        config_file=None,
        flags={"upstream": "http://x/mcp"},
        environ={},
        settings=[
            "read_timeout=600",
            "replay=tools/list,resources/read",
            "heal_on=404,401",
            "client=aiohttp",
            "heal_timeout=2.5",
        ],
    )
    (upstream,) = config.upstreams
    assert upstream.heal_timeout == 2.5
    assert (upstream.read_timeout, upstream.replay, upstream.heal_on, upstream.client) == (
        600.0,
        ("tools/list", "resources/read"),
        (404, 401),
        "aiohttp",
    )
    with pytest.raises(ConfigError, match="upstream keys apply to the --upstream upstream"):
        build_config(config_file=None, flags={}, environ={"MCP_HEAL_PROXY_CONFIG": ""}, settings=["read_timeout=1"])
    with pytest.raises(ConfigError, match="headers can be set in a config file only"):
        build_config(config_file=None, flags={"upstream": "http://x/mcp"}, environ={}, settings=["headers=x"])
    with pytest.raises(ConfigError, match="unknown key timeout"):
        build_config(config_file=None, flags={"upstream": "http://x/mcp"}, environ={}, settings=["timeout=1"])


@pytest.mark.parametrize("url", ["http://user:secret-pw@x/mcp", "https://ghp_secret-token@x/mcp"])
def test_an_upstream_url_with_credentials_is_refused_from_every_source_without_echoing_them(
    tmp_path: Path, url: str
) -> None:
    reason = "must not carry credentials (user:password@): put them in headers"
    path = write(tmp_path, f"[upstreams.a]\nurl = '{url}'\n")
    sources: list[tuple[str, str | None, dict[str, str], dict[str, str]]] = [
        (f"{path}: upstreams.a.url", path, {}, {}),
        ("MCP_HEAL_PROXY_UPSTREAM", None, {"MCP_HEAL_PROXY_UPSTREAM": url}, {}),
        ("--upstream", None, {}, {"upstream": url}),
    ]
    for where, config_file, environ, flags in sources:
        with pytest.raises(ConfigError, match=refusal(where, reason)) as caught:
            build_config(config_file=config_file, flags=flags, environ=environ)
        assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path = '/metrics'", "upstreams.a.path must not be one of the proxy's own paths"),
        ("path = '/{name}/mcp'", "upstreams.a.path must start with '/' and use letters"),
        ("path = 'mcp'", "upstreams.a.path must start with '/'"),
        ("headers = { 'Bad Name' = 'x' }", "upstreams.a.headers has 'Bad Name', which is not a header name"),
        ("headers = { Host = 'x' }", "upstreams.a.headers must not set Host: the proxy writes it"),
        ("headers = { Mcp-Session-Id = 'x' }", "upstreams.a.headers must not set Mcp-Session-Id"),
        ("headers = { A = 1 }", "upstreams.a.headers must map A to a string"),
        ("url = 'http://x:port/mcp'", "upstreams.a.url must be an http(s) URL (a valid host and port)"),
        ("url = 'http://x:70000/mcp'", "upstreams.a.url must be an http(s) URL (a valid host and port)"),
        ("url = 'http://[::1/mcp'", "upstreams.a.url must be an http(s) URL (a valid host and port)"),
        ("url = 'http://exa mple.com/mcp'", "upstreams.a.url must be an http(s) URL (no spaces)"),
    ],
)
def test_upstream_paths_and_headers_that_could_never_work_are_refused(tmp_path: Path, text: str, message: str) -> None:
    table = "[upstreams.a]\n" if text.startswith("url") else UPSTREAM
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(config_file=write(tmp_path, f"{table}{text}\n"), flags={}, environ={})


@pytest.mark.parametrize(
    "origins",
    [["https://app.example.com/"], ["https://App.example.com"], ["app.example.com"], ["null"]],
)
def test_allowed_origins_that_no_browser_sends_are_refused(tmp_path: Path, origins: list[str]) -> None:
    path = write(tmp_path, f"[server]\nallowed_origins = {json.dumps(origins)}\n{UPSTREAM}")
    with pytest.raises(ConfigError, match=re.escape("must list origins such as https://app.example.com")):
        build_config(config_file=path, flags={}, environ={})


def test_allowed_origins_from_a_variable_are_comma_separated() -> None:
    environ = {"MCP_HEAL_PROXY_ALLOWED_ORIGINS": "https://a.example, http://b.example:8080"}
    config = build_config(config_file=None, flags={"upstream": "http://x/mcp"}, environ=environ)
    assert config.allowed_origins == ("https://a.example", "http://b.example:8080")


def test_every_server_key_can_be_set_from_the_environment_and_set() -> None:
    # The README promises MCP_HEAL_PROXY_<KEY> for every [server] key: no key may be file-only.
    assert all(option.from_text is not None for option in SERVER_OPTIONS.values())


# Every [server] key that holds a number.
NUMERIC_SERVER_KEYS = [key for key in SERVER_OPTIONS if key in {edge[0] for edge in SERVER_EDGES}]


def outcome(where: str, attempt: Callable[[], ProxyConfig], key: str) -> tuple[str, object]:
    """What one source made of a value: the value the config holds, or the error without its place."""
    try:
        return "accepted", getattr(attempt(), key)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(where + " "), message
        return "refused", message.removeprefix(where + " ")


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(NUMERIC_SERVER_KEYS),
    value=st.one_of(
        st.integers(min_value=-(10**6), max_value=10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0, 1, 65535, 65536, 0.1, 0.09, 1.0, 0.5]),
    ),
)
def test_the_file_a_variable_and_set_agree_on_every_number(key: str, value: float) -> None:
    text = repr(value)  # a TOML literal too: 1.5, 1e-05, nan, inf, -inf
    upstream = "[upstreams.a]\nurl = 'http://x/mcp'\n"
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), f"[server]\n{key} = {text}\n{upstream}")
        outcomes = {
            outcome(f"{path}: server.{key}", lambda: build_config(config_file=path, flags={}, environ={}), key),
            outcome(
                f"MCP_HEAL_PROXY_{key.upper()}",
                lambda: build_config(
                    config_file=None,
                    flags={"upstream": "http://x/mcp"},
                    environ={f"MCP_HEAL_PROXY_{key.upper()}": text},
                ),
                key,
            ),
            outcome(
                f"--set {key}",
                lambda: build_config(
                    config_file=None, flags={"upstream": "http://x/mcp"}, environ={}, settings=[f"{key}={text}"]
                ),
                key,
            ),
        }
    if value != value:
        assert all(kind == "refused" for kind, _ in outcomes), outcomes
    # One answer, whatever the source: the same value held, or the same reason given.
    assert len({(kind, str(result)) for kind, result in outcomes}) == 1, outcomes
