"""Configuration: file, environment and flags, validated with the key's name in every error."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from mcp_heal_proxy.config import ConfigError, build_config, default_state_path, describe
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
        ("[upstreams.a]\nurl = 'ftp://x'\n", "upstreams.a.url: not an http(s) URL"),
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
        tmp_path, "[upstreams.a]\nurl = 'http://user:pw@x/mcp'\nheaders = { Authorization = 'Bearer ${TOKEN}' }\n"
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
