"""What the docs claim, checked: the README's commands as written, the example config, compose.yaml,
the service units in contrib/, and the snippets users copy into their clients."""

from __future__ import annotations

import ast
import asyncio
import configparser
import contextlib
import io
import json
import os
import plistlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcp_heal_proxy.cli import banner
from mcp_heal_proxy.config import SERVER_OPTIONS, ProxyConfig, UpstreamConfig, build_config
from tests.conftest import REPO_ROOT, free_port, wait_until

README = REPO_ROOT / "README.md"
USER_GUIDE = REPO_ROOT / "docs" / "user-guide.md"
EXAMPLE = REPO_ROOT / "config.example.toml"
COMPOSE = REPO_ROOT / "compose.yaml"
SYSTEMD_UNIT = REPO_ROOT / "contrib" / "systemd" / "mcp-heal-proxy.service"
LAUNCHD_AGENT = REPO_ROOT / "contrib" / "launchd" / "mcp-heal-proxy.plist"
# pip install of the package and its dependencies into a new virtualenv, then the demo.
FRESH_INSTALL_TIMEOUT = 600.0
SERVICE_TIMEOUT = 20.0


def code_blocks(path: Path, language: str | None = None) -> list[str]:
    """The fenced code blocks of a Markdown file, optionally only those of one language."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [text for lang, text in blocks if language is None or lang == language]


@pytest.fixture
def command(tmp_path: Path) -> Path:
    """An ``mcp-heal-proxy`` executable that runs this checkout's code (whatever is installed where),
    for the places that need a program path: PATH, ExecStart, ProgramArguments."""
    shim = tmp_path / "bin" / "mcp-heal-proxy"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO_ROOT}" exec "{sys.executable}" -m mcp_heal_proxy "$@"\n')
    shim.chmod(0o755)
    return shim


def clean_environment(**extra: str) -> dict[str, str]:
    """The environment minus anything that would let the tests' own checkout stand in for an install."""
    skip = ("MCP_HEAL_PROXY_", "PYTHONPATH", "VIRTUAL_ENV")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(skip)}, **extra}


# ---- the README ----------------------------------------------------------------------------------------


def readme_first_commands() -> list[str]:
    """The commands the README starts with, before any prose."""
    text = README.read_text()
    head = text.split("\n\n", 2)
    assert head[0] == "# mcp-heal-proxy", "the README starts with its title"
    commands = re.findall(r"```sh\n(.*?)\n```", head[1], flags=re.DOTALL)
    assert head[1] == "\n".join(f"```sh\n{command}\n```" for command in commands), head[1]
    return commands


def test_the_readme_starts_with_exactly_two_commands_install_and_demo_then_install_and_tests() -> None:
    demo, tests = readme_first_commands()
    assert "\n" not in demo
    assert "\n" not in tests
    assert re.fullmatch(r"python3 -m venv \.venv && \.venv/bin/pip install \. && \.venv/bin/mcp-heal-proxy demo", demo)
    assert "pip install -e '.[test]'" in tests
    assert tests.endswith("scripts/check")


def test_ci_runs_the_readmes_test_command_and_check_shows_skip_reasons() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test]'" in ci
    assert ci.rstrip().endswith("scripts/check")
    check = (REPO_ROOT / "scripts" / "check").read_text()
    assert re.search(r"^pytest -rs ", check, flags=re.MULTILINE), "scripts/check must list skip reasons"


def readme_invocation_blocks() -> list[str]:
    """The README's command blocks that run the proxy from the first command's virtualenv (not the demo,
    nor a client's ``claude mcp add`` line: test_every_stdio_snippet_starts_the_bridge_with_a_minimal_path
    runs those)."""
    first = readme_first_commands()
    return [
        block
        for block in code_blocks(README, "sh")
        if ".venv/bin/mcp-heal-proxy" in block and block.strip() not in first and not block.startswith("claude ")
    ]


def test_the_readme_runs_the_command_its_own_set_up_installed() -> None:
    # After the first command only .venv/bin/mcp-heal-proxy exists: a bare `mcp-heal-proxy` command
    # would not be found (pipx and activation are explained beside them).
    for block in code_blocks(README, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|\|\||\||;", line):
                words = shlex.split(command, comments=True)
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words.pop(0)  # VAR=value before the command
                if words and words[0] == "export":
                    continue
                assert not words or words[0] != "mcp-heal-proxy", f"not on PATH after the README's set-up: {line}"
    assert readme_invocation_blocks(), "Run it shows the command"


def as_check(line: str) -> str:
    """A README `serve` line as the `check-config` that validates the same config without serving."""
    line = re.sub(r"\bserve --config (\S+)", r"check-config \1", line)
    return line.replace(" serve", " check-config")


def fresh_checkout(tmp_path: Path) -> Path:
    """A copy of this checkout's files (tracked and new, not ignored ones): what a clone would hold."""
    checkout = tmp_path / "checkout"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = REPO_ROOT / name
        if name.startswith(".cache") or not source.is_file():
            continue
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, checkout / name)
    return checkout


@pytest.mark.timeout(FRESH_INSTALL_TIMEOUT + 120)
async def test_the_readmes_first_command_works_in_a_fresh_checkout_and_its_run_commands_are_valid(
    tmp_path: Path,
) -> None:
    checkout = fresh_checkout(tmp_path)
    demo, _ = readme_first_commands()
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        demo,
        cwd=checkout,
        env=clean_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(FRESH_INSTALL_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"{demo}\n{stdout.decode()[-2000:]}\n{stderr.decode()[-2000:]}"
    assert b"healed" in stdout
    # Then every "Run it" block, its serve commands as check-config with the same arguments, from the
    # new virtualenv.
    for block in readme_invocation_blocks():
        script = "\n".join(as_check(line) for line in block.splitlines())
        result = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-ec", script],
            cwd=checkout,
            env=clean_environment(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{block}\n(as {script})\n{result.stderr.decode()}"


def test_the_readmes_banner_is_the_one_serve_prints() -> None:
    (shown,) = [block for block in code_blocks(README, "") if "paste into your MCP client" in block]
    config = build_config(config_file=None, flags={"upstream": "https://mcp.example.com/mcp"}, environ={})
    printed = banner(config, 8787)
    expected_first, shown_first = (
        printed[0].split(", sessions in ")[0],
        shown.splitlines()[0].split(", sessions in ")[0],
    )
    assert shown_first == expected_first
    assert shown.splitlines()[1:] == printed[1:]


def test_relative_links_in_the_readme_and_the_user_guide_lead_somewhere() -> None:
    assert "(docs/user-guide.md)" in README.read_text(), "the README links the user guide"
    for document in (README, USER_GUIDE):
        for target in re.findall(r"\]\(([^)#\s]+)\)", document.read_text()):
            if "://" in target:
                continue
            assert (document.parent / target).exists(), f"{document.name} links to missing {target}"


def points_at_the_proxy(server: dict[str, Any]) -> bool:
    """A client's MCP server entry: the proxy's URL, or the proxy launched as a stdio command."""
    if "url" in server:
        return str(server["url"]).startswith("http://127.0.0.1:8787/")
    return str(server.get("command", "")).endswith("mcp-heal-proxy") and server.get("args", [None])[0] == "stdio"


def test_client_snippets_parse_and_point_at_the_proxy() -> None:
    for document in (README, USER_GUIDE):
        for block in code_blocks(document, "toml"):
            servers = tomllib.loads(block)["mcp_servers"]
            assert all(points_at_the_proxy(server) for server in servers.values()), block
        for block in code_blocks(document, "json"):
            servers = json.loads(block)["mcpServers"]
            assert all(points_at_the_proxy(server) for server in servers.values()), block


# Where the stdio snippets put the command: a full path (GUI clients start commands with a minimal PATH).
STDIO_COMMAND = "/home/you/mcp-heal-proxy/.venv/bin/mcp-heal-proxy"
# What launchd gives a GUI app's children (and about what Claude Desktop passes on).
MINIMAL_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


def stdio_snippets() -> list[tuple[str, str, list[str]]]:
    """Every stdio launch the docs show a user: where, the command, its arguments. From the README and the
    user guide (JSON and TOML client configs, ``claude mcp add ... --`` lines) and ``stdio --help``."""
    found: list[tuple[str, str, list[str]]] = []
    for document in (README, USER_GUIDE):
        for block in code_blocks(document, "json"):
            for server in json.loads(block)["mcpServers"].values():
                if "command" in server:
                    found.append((document.name, server["command"], server["args"]))
        for block in code_blocks(document, "toml"):
            for server in tomllib.loads(block).get("mcp_servers", {}).values():
                if "command" in server:
                    found.append((document.name, server["command"], server["args"]))
        for block in code_blocks(document, "sh"):
            for line in block.splitlines():
                if line.startswith("claude mcp add") and " -- " in line:
                    command, *args = shlex.split(line.split(" -- ", 1)[1])
                    found.append((document.name, command, args))
    shown = subprocess.run(
        [sys.executable, "-m", "mcp_heal_proxy", "stdio", "--help"], capture_output=True, text=True, check=True,
        cwd=REPO_ROOT, timeout=30,
    ).stdout  # fmt: skip
    snippet = shown[shown.index('{"mcpServers"') :]
    for server in json.loads(" ".join(snippet.split())).get("mcpServers").values():
        found.append(("stdio --help", server["command"], server["args"]))
    return found


def test_every_stdio_snippet_gives_the_full_path_and_says_how_to_find_it() -> None:
    snippets = stdio_snippets()
    assert {where for where, _, _ in snippets} == {"README.md", "user-guide.md", "stdio --help"}
    assert len(snippets) >= 6, snippets
    for where, command, _ in snippets:
        assert command == STDIO_COMMAND, f"{where}: {command} (a bare name is not found on a GUI client's PATH)"
    help_text = subprocess.run(
        [sys.executable, "-m", "mcp_heal_proxy", "stdio", "--help"], capture_output=True, text=True, check=True,
        cwd=REPO_ROOT, timeout=30,
    ).stdout  # fmt: skip
    for where, text in (
        ("README.md", README.read_text()),
        ("user-guide.md", USER_GUIDE.read_text()),
        ("help", help_text),
    ):
        assert "command -v mcp-heal-proxy" in text, where


async def test_every_stdio_snippet_starts_the_bridge_with_a_minimal_path(command: Path, tmp_path: Path) -> None:
    from tests.conftest import UpstreamProcess

    upstream = UpstreamProcess(json_response=False)
    await upstream.start()
    try:
        config = tmp_path / "proxy.toml"
        config.write_text(f'[upstreams.github]\nurl = "{upstream.url}"\n')
        environment = {"PATH": MINIMAL_PATH, "HOME": str(tmp_path)}
        # The reason for full paths: with the same PATH, the bare name is not found.
        with pytest.raises(FileNotFoundError):
            subprocess.run(["mcp-heal-proxy", "--version"], env=environment, check=False, timeout=30)
        for where, program, args in stdio_snippets():
            # As a client would start it, the placeholder path being this checkout's command.
            args = [upstream.url if arg.startswith("https://mcp.example.com/") else arg for arg in args]
            args = [str(config) if arg == "/home/you/proxy.toml" else arg for arg in args]
            assert program == STDIO_COMMAND
            await _initialize_over_stdio([str(command), *args], environment, where)
    finally:
        await upstream.stop()


async def _initialize_over_stdio(argv: list[str], environment: dict[str, str], where: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=environment,
    )  # fmt: skip
    assert process.stdin is not None
    assert process.stdout is not None
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    try:
        process.stdin.write(json.dumps(initialize).encode() + b"\n")
        await process.stdin.drain()
        async with asyncio.timeout(30):
            answer = json.loads(await process.stdout.readline())
            process.stdin.close()
            _, errors = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert answer.get("id") == 1, (where, argv, answer)
    assert "result" in answer, (where, argv, answer)
    assert process.returncode == 0, (where, argv, errors)


def test_the_user_guide_covers_each_client_services_docker_and_troubleshooting() -> None:
    guide = USER_GUIDE.read_text()
    for topic in ("Codex", "Claude Code", "Cursor", "systemd", "launchd", "Docker", "compose.yaml"):
        assert topic in guide, topic
    for event in ("session.healed", "session.heal_failed", "request"):
        # Example lines, as the proxy writes them (JSON), for each event a user looks for.
        assert re.search(rf'^\{{.*"event": "{re.escape(event)}".*\}}$', guide, flags=re.MULTILINE), event
    for line in re.findall(r'^\{.*"event": .*\}$', guide, flags=re.MULTILINE):
        assert isinstance(json.loads(line), dict)


# ---- config.example.toml --------------------------------------------------------------------------------


async def test_the_example_config_passes_check_config_once_its_token_variable_is_set(command: Path) -> None:
    example = EXAMPLE.read_text()
    (token_line,) = [line for line in example.splitlines() if "${GITHUB_TOKEN}" in line]
    before = example[: example.index(token_line)]
    assert "GITHUB_TOKEN must be set" in before, "say next to the header that the variable must be set"
    for env, expected in ((clean_environment(GITHUB_TOKEN="ghp_example"), 0), (clean_environment(), 2)):
        process = await asyncio.create_subprocess_exec(
            command,
            "check-config",
            str(EXAMPLE),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
        assert process.returncode == expected, stderr
    assert b"${GITHUB_TOKEN}, which is not set" in stderr


def test_every_config_key_is_documented_in_the_example() -> None:
    example = EXAMPLE.read_text()
    keys = [f.name for f in fields(ProxyConfig) if f.name != "upstreams"]
    # config_file records where an upstream came from; no file sets it.
    keys += [f.name for f in fields(UpstreamConfig) if f.name not in ("name", "config_file")]
    for key in keys:
        assert re.search(rf"^#? ?{key} = ", example, flags=re.MULTILINE), f"config.example.toml does not document {key}"


# ---- compose.yaml ---------------------------------------------------------------------------------------


def test_compose_builds_the_proxy_from_this_checkout_and_pulls_no_placeholder() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    proxy = services["mcp-heal-proxy"]
    context = proxy["build"] if isinstance(proxy["build"], str) else proxy["build"]["context"]
    dockerfile = "Dockerfile" if isinstance(proxy["build"], str) else proxy["build"].get("dockerfile", "Dockerfile")
    assert (REPO_ROOT / context / dockerfile).is_file()
    for name, service in services.items():
        assert "build" in service, f"service {name} pulls an image nobody builds: {service.get('image')}"
    assert all(port.startswith("127.0.0.1:") for port in proxy["ports"]), "published on loopback only"
    assert any(volume.endswith(":/data") for volume in proxy["volumes"]), "the image keeps sessions on /data"
    environment = proxy["environment"]
    readable = {"MCP_HEAL_PROXY_UPSTREAM", "MCP_HEAL_PROXY_CONFIG"} | {
        f"MCP_HEAL_PROXY_{key.upper()}" for key in SERVER_OPTIONS
    }
    assert {name for name in environment if name.startswith("MCP_HEAL_PROXY_")} <= readable
    assert "MCP_HEAL_PROXY_TOKEN" in environment, "compose shows where the inbound token goes"
    assert "no authentication" not in COMPOSE.read_text()


# ---- service units --------------------------------------------------------------------------------------


def systemd_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(SYSTEMD_UNIT.read_text())
    return unit


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, command: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd); the ExecStart test still runs")
    # verify checks that ExecStart's program exists: point it at this environment's command.
    text = SYSTEMD_UNIT.read_text().replace("%h/.local/bin/mcp-heal-proxy", str(command))
    (tmp_path / SYSTEMD_UNIT.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", SYSTEMD_UNIT.name], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze warnings:\n{result.stderr}"


def service_home(tmp_path: Path) -> tuple[Path, int]:
    """A home with the config the units expect, made from the example (its port free, its store here)."""
    home = tmp_path / "home"
    config = home / ".config" / "mcp-heal-proxy" / "config.toml"
    config.parent.mkdir(parents=True)
    port = free_port()
    text = EXAMPLE.read_text().replace("port = 8787", f"port = {port}")
    text = text.replace('state = "~/.local/state/', f'state = "{home}/.local/state/')
    config.write_text(text)
    return home, port


async def run_like_a_service(command: list[str], env: dict[str, str], port: int, stop: signal.Signals) -> None:
    """Start the command as the service manager would, see /healthz answer, stop it with its signal."""
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def healthy() -> bool:
                if process.returncode is not None:
                    assert process.stderr is not None
                    raise AssertionError(f"{command} exited {process.returncode}: {await process.stderr.read()!r}")
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(healthy, SERVICE_TIMEOUT, "the service answers /healthz")
        process.send_signal(stop)
        async with asyncio.timeout(SERVICE_TIMEOUT):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr
        assert b"Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def environment_file_secrets(setting: str, home: Path) -> dict[str, str]:
    """Write the unit's EnvironmentFile as a user would (the secrets the config refers to, here the
    example's GITHUB_TOKEN) and read it back as systemd does."""
    environment_file = Path(setting.lstrip("-").replace("%h", str(home)))
    environment_file.write_text("GITHUB_TOKEN=ghp_example\n")
    return dict(line.split("=", 1) for line in environment_file.read_text().splitlines())


async def test_the_systemd_units_exec_start_serves_and_stops_on_its_kill_signal(tmp_path: Path, command: Path) -> None:
    service = systemd_unit()["Service"]
    home, port = service_home(tmp_path)
    words = shlex.split(service["ExecStart"].replace("%h", str(home)))
    assert words[0] == f"{home}/.local/bin/mcp-heal-proxy", "the unit assumes `pipx install .`"
    env = clean_environment(HOME=str(home), **environment_file_secrets(service["EnvironmentFile"], home))
    stop = signal.Signals[service["KillSignal"]]
    await run_like_a_service([str(command), *words[1:]], env, port, stop)
    assert service["RestartPreventExitStatus"] == "2", "a configuration mistake (exit 2) is not retried"


async def test_the_launchd_agents_program_arguments_serve_and_stop_on_sigterm(tmp_path: Path, command: Path) -> None:
    with LAUNCHD_AGENT.open("rb") as handle:
        agent = plistlib.load(handle)
    home, port = service_home(tmp_path)
    words = [word.replace("/Users/YOU", str(home)) for word in agent["ProgramArguments"]]
    assert words[0] == f"{home}/.local/bin/mcp-heal-proxy", "the agent assumes `pipx install .`"
    assert all(not word.startswith("~") and "$" not in word for word in words), "launchd expands neither ~ nor $"
    env = clean_environment(HOME=str(home), **agent["EnvironmentVariables"])
    await run_like_a_service([str(command), *words[1:]], env, port, signal.SIGTERM)


def transcripts(path: Path) -> list[tuple[str, str]]:
    """``$ command`` lines of plain code blocks, each with the output the document shows for it."""
    found: list[tuple[str, str]] = []
    for block in code_blocks(path, ""):
        if not block.startswith("$ "):
            continue
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, _, output = chunk.partition("\n")
            found.append((command, output))
    return found


async def test_the_user_guides_transcripts_are_what_the_commands_print(command: Path) -> None:
    shown = transcripts(USER_GUIDE)
    assert shown, "the user guide shows what a mistake looks like"
    path = f"{command.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for line, output in shown:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            line,
            env=clean_environment(PATH=path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(20):
            printed, _ = await process.communicate()
        assert printed.decode() == output, line


USER_LEVELS = frozenset({"info", "warning", "error", "exception", "critical"})


def _is_user_level(node: ast.expr, chosen: set[str]) -> bool:
    """``log.info`` (any logger name ending in ``log``), ``log.warning if ... else log.info``, or a name
    assigned one of those (``emit = log.info if ... else log.warning``): a call at info or above."""
    if isinstance(node, ast.Attribute):
        return node.attr in USER_LEVELS and isinstance(node.value, ast.Name) and node.value.id.endswith("log")
    if isinstance(node, ast.IfExp):
        return _is_user_level(node.body, chosen) or _is_user_level(node.orelse, chosen)
    return isinstance(node, ast.Name) and node.id in chosen


def _event_names(node: ast.expr) -> list[str] | None:
    """The event names a first argument can be: a literal, or a conditional between literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        body, orelse = _event_names(node.body), _event_names(node.orelse)
        return None if body is None or orelse is None else body + orelse
    return None


def logged_events() -> dict[str, str]:
    """Each event name the proxy's code logs at info or above, with where (by the code's syntax tree, so
    that calls through a chosen level, ``emit = log.info if ... else log.warning``, count too)."""
    events: dict[str, str] = {}
    for path in sorted((REPO_ROOT / "mcp_heal_proxy").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        chosen = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and _is_user_level(node.value, set())
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_user_level(node.func, chosen):
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                names = _event_names(node.args[0]) if node.args else None
                assert names is not None, f"{where}: a log call whose event is not a literal the scan can read"
                events.update(dict.fromkeys(names, where))
    return events


def test_every_event_the_proxy_logs_at_info_or_above_is_in_the_user_guide() -> None:
    """What a user sees in the log, they can look up: each event name logged at info, warning or error."""
    events = logged_events()
    assert len(events) > 40, "the scan found the proxy's log calls"
    # Those logged through a level chosen at run time count too: the heal's events and the request line.
    assert {"session.healed", "session.heal_failed", "request"} <= set(events)
    guide = USER_GUIDE.read_text(encoding="utf-8")
    missing = sorted(f"{name} ({where})" for name, where in events.items() if f"`{name}`" not in guide)
    assert not missing, f"log events not in docs/user-guide.md: {missing}"


def test_every_event_in_the_user_guides_sample_logs_is_one_the_proxy_logs() -> None:
    code = "".join(path.read_text(encoding="utf-8") for path in (REPO_ROOT / "mcp_heal_proxy").rglob("*.py"))
    shown = set(re.findall(r'"event": "([a-z_][a-z0-9_.]*)"', USER_GUIDE.read_text(encoding="utf-8")))
    assert shown, "the guide shows sample log lines"
    assert not sorted(name for name in shown if f'"{name}"' not in code)


# ---- the user guide: pipx, login, upgrading, uninstalling -----------------------------------------------


def guide_section(number: int) -> str:
    """The text of the user guide's section ``## N. ...``, up to the next section."""
    text = USER_GUIDE.read_text()
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, f"the user guide has a section {number}"
    return match.group(0)


def section_commands(number: int) -> list[str]:
    """The command lines of a section's ``sh`` blocks."""
    blocks = re.findall(r"^```sh\n(.*?)^```", guide_section(number), flags=re.MULTILINE | re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def command_words(line: str) -> list[list[str]]:
    """Each command of a line (split at ``&&``), as words, comments dropped."""
    return [shlex.split(part, comments=True) for part in line.split("&&") if shlex.split(part, comments=True)]


def expanded(word: str, environ: dict[str, str]) -> str:
    """A shell word as bash expands it in ``environ``."""
    result = subprocess.run(
        ["bash", "-c", f"printf %s {word}"], env=environ, capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout


def pipx_commands() -> list[str]:
    """The pipx lines of section 1 (how to install pipx itself)."""
    install = guide_section(1)
    start = install.index("**No pipx yet?**")
    block = re.search(r"^```sh\n(.*?)^```", install[start:], flags=re.MULTILINE | re.DOTALL)
    assert block is not None, "section 1 shows how to install pipx"
    return block.group(1).splitlines()


def test_the_guides_install_upgrade_login_and_uninstall_commands_parse_and_name_what_exists() -> None:
    from mcp_heal_proxy.cli import build_parser

    lines = pipx_commands() + section_commands(10) + section_commands(11) + section_commands(12)
    for line in lines:
        checked = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True, timeout=10, check=False)
        assert checked.returncode == 0, f"{line}: {checked.stderr}"
    commands = [words for line in lines for words in command_words(line)]
    proxy_runs = [words[1:] for words in commands if words[0] == "mcp-heal-proxy"]
    assert {words[0] for words in proxy_runs} == {"login", "logout"}
    for argv in proxy_runs:
        build_parser().parse_args(argv)  # exits (status 2) on an unknown command or flag
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert ["pipx", "install", "--force", "."] in commands, "the upgrade reinstalls with pipx as section 1 installs"
    assert ["pipx", "uninstall", project] in commands
    assert ["pipx", "ensurepath"] in commands
    # The service's names are contrib's: the unit's file name, the agent's Label and its files.
    unit = SYSTEMD_UNIT.stem
    with LAUNCHD_AGENT.open("rb") as handle:
        agent = plistlib.load(handle)
    assert ["systemctl", "--user", "restart", unit] in commands
    assert ["systemctl", "--user", "disable", "--now", unit] in commands
    assert ["rm", f"~/.config/systemd/user/{SYSTEMD_UNIT.name}"] in commands
    assert f"cp contrib/systemd/{SYSTEMD_UNIT.name} ~/.config/systemd/user/" in guide_section(6)
    assert any(line.startswith(f"launchctl kickstart -k gui/$(id -u)/{agent['Label']} ") for line in lines)
    (bootout,) = [line for line in lines if line.startswith("launchctl bootout")]
    assert f"gui/$(id -u)/{agent['Label']}" in bootout
    installed_agent = "~/Library/LaunchAgents/mcp-heal-proxy.plist"
    assert installed_agent in guide_section(6)
    assert f"rm {installed_agent} {agent['StandardOutPath'].replace('/Users/YOU', '~')}" in bootout
    # Docker: the volume and the image section 7 makes.
    docker = guide_section(7)
    volume = re.search(r"-v (\S+):/data", docker)
    image = re.search(r"docker build -t (\S+) \.", docker)
    assert volume is not None
    assert image is not None
    assert ["docker", "volume", "rm", volume.group(1)] in commands
    assert ["docker", "image", "rm", image.group(1)] in commands
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["mcp-heal-proxy"]["image"].split(":")[0] == image.group(1)


def test_the_state_directory_the_guide_deletes_is_where_the_proxy_keeps_sessions_keys_and_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcp_heal_proxy.auth.tokens import tokens_directory
    from mcp_heal_proxy.config import MEMORY_STATE, default_state_path
    from mcp_heal_proxy.engine.sealing import KEY_FILE_NAME

    removals = [words for line in section_commands(12) for words in command_words(line) if words[:2] == ["rm", "-rf"]]
    (linux,) = [words[2] for words in removals if "local/state" in words[2]]
    (macos,) = [words[2] for words in removals if "Application Support" in words[2]]
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    bare = {"PATH": os.environ["PATH"], "HOME": str(home)}
    # Where serve puts the store, session.key and the logins' tokens, with and without XDG_STATE_HOME.
    directory = Path(default_state_path()).parent
    assert expanded(linux, bare) == str(directory)
    assert (
        build_config(config_file=None, flags={"upstream": "http://127.0.0.1:1/mcp"}, environ={}).key_directory
        == directory
    )
    assert tokens_directory(default_state_path()) == tokens_directory(MEMORY_STATE) == directory / "oauth"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert expanded(linux, {**bare, "XDG_STATE_HOME": str(tmp_path / "xdg")}) == str(Path(default_state_path()).parent)
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert expanded(f'"{macos}"', bare) == str(Path(default_state_path()).parent)
    section = guide_section(12)
    for name in (Path(default_state_path()).name, KEY_FILE_NAME, "oauth/", "NAME.json"):
        assert f"`{name}`" in section, name
    # The example config (and so the service units) names the same directory on every system.
    example = tomllib.loads(EXAMPLE.read_text())
    assert Path(example["server"]["state"]).parent == Path("~/.local/state/mcp-heal-proxy")


def test_logins_wait_is_the_one_the_guide_states(tmp_path: Path) -> None:
    from mcp_heal_proxy.auth.login import LOGIN_LOCK_SLACK, LOGIN_TIMEOUT

    section = guide_section(10)
    # The table the login commands name is a valid config with a managed login of that name.
    (table,) = [block for block in code_blocks(USER_GUIDE, "") if block.startswith("[upstreams.")]
    (config_file := tmp_path / "config.toml").write_text(table)
    (upstream,) = build_config(config_file=str(config_file), flags={}, environ={}).upstreams
    assert upstream.auth == "oauth"
    assert all(f"login {upstream.name} --config" in line for line in section_commands(10))
    assert f"**{LOGIN_TIMEOUT:.0f} seconds**" in section
    assert f"up to its {LOGIN_TIMEOUT:.0f} s and {LOGIN_LOCK_SLACK:.0f} s more" in section
    (shown,) = [block for block in code_blocks(USER_GUIDE, "") if "login failed" in block]
    assert (
        shown.strip()
        == f"mcp-heal-proxy: login failed: no answer on http://127.0.0.1:PORT/callback within {LOGIN_TIMEOUT:.0f} s"
    )


async def test_a_login_nobody_finishes_fails_with_the_guides_words(
    tmp_path: Path, aiohttp_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcp_heal_proxy.auth import login as login_flow
    from mcp_heal_proxy.auth.errors import LoginError
    from mcp_heal_proxy.auth.tokens import TokenFile
    from tests.test_managed_auth import mix_up_server

    app, _ = mix_up_server(None, False)
    server = await aiohttp_server(app, host="127.0.0.1")
    upstream = UpstreamConfig(url=str(server.make_url("/mcp")), name="up", auth="oauth")
    token_file = TokenFile(tmp_path / "oauth", "up")
    output = io.StringIO()
    with pytest.raises(LoginError) as failed:
        async with asyncio.timeout(20):
            await login_flow.login(upstream, token_file, out=output, open_browser=False, wait=0.3)
    (shown,) = [block for block in code_blocks(USER_GUIDE, "") if "login failed" in block]
    expected = re.escape(shown.strip().removeprefix("mcp-heal-proxy: login failed: ")).replace("PORT", r"\d+")
    assert re.fullmatch(expected.replace("300", "0"), str(failed.value)), str(failed.value)
    assert token_file.load(upstream.url) is None, "nothing is stored"


async def test_a_sessions_db_of_the_first_sqlite_store_keeps_its_sessions_after_an_upgrade(
    tmp_path: Path, sse_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """The guide says sessions.db survives an upgrade: a file as the first SQLite store wrote it (one table,
    the record fields of then) is served by this version, its session healed onto the upstream."""
    import sqlite3
    import time

    from tests.conftest import INITIALIZE_PARAMS, echo_call, session_headers, start_serve

    state = tmp_path / "sessions.db"
    first_schema = (
        "CREATE TABLE IF NOT EXISTS sessions ("
        "client_session_id TEXT PRIMARY KEY, record TEXT NOT NULL, last_used REAL NOT NULL)"
    )
    now = time.time()
    record = {
        "client_session_id": "0f3c9a7e2b5d4c1a8e6f0b2d4a6c8e0f",
        "upstream_session_id": "an-upstream-session-long-gone",
        "initialize_params": INITIALIZE_PARAMS,
        "upstream": "default",
        "protocol_version": "2025-11-25",
        "upstream_protocol_version": "2025-11-25",
        "generation": 0,
        "subscriptions": [],
        "log_level": None,
        "created_at": now,
        "last_used": now,
    }
    with contextlib.closing(sqlite3.connect(state)) as connection, connection:
        connection.execute(first_schema)
        connection.execute(
            "INSERT INTO sessions VALUES (?, ?, ?)", (record["client_session_id"], json.dumps(record), now)
        )
    process, url = await start_serve("--upstream", sse_upstream.url, "--port", "0", "--state", str(state))
    try:
        headers = session_headers(str(record["client_session_id"]))
        async with http.post(url, json=echo_call(1, "kept"), headers=headers) as response:
            status, answer = response.status, await response.text()
    finally:
        process.terminate()
        async with asyncio.timeout(20):
            await process.wait()
    assert status == 200, answer
    assert '"text":"kept"' in answer
    with contextlib.closing(sqlite3.connect(state)) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        (stored,) = connection.execute("SELECT record FROM sessions").fetchall()
    assert tables == {"sessions", "ended"}, "the table later versions added is created, nothing else changes"
    assert json.loads(stored[0])["generation"] == 1, "the session was healed onto a new upstream session"


async def serve_installed(
    program: Path, env: dict[str, str], *args: str
) -> tuple[asyncio.subprocess.Process, str, str]:
    """An installed ``mcp-heal-proxy serve ARGS``: the process, the client URL and the store its banner name."""
    process = await asyncio.create_subprocess_exec(
        program, "serve", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(SERVICE_TIMEOUT):
            first = (await process.stdout.readline()).decode()
            while (match := re.search(r'url = "([^"]+)"', (await process.stdout.readline()).decode())) is None:
                pass
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process, match.group(1), first.split(", sessions in ")[1].strip()


async def stop_serving(process: asyncio.subprocess.Process) -> None:
    process.terminate()
    async with asyncio.timeout(SERVICE_TIMEOUT):
        assert await process.wait() == 0


@pytest.mark.timeout(2 * FRESH_INSTALL_TIMEOUT + 120)
async def test_the_guides_pipx_install_upgrade_and_uninstall_keep_the_sessions_then_remove_everything(
    tmp_path: Path, sse_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """Section 1's ``pipx install .``, section 10's ``pipx install --force .`` (a client's session id still
    works after it) and section 11's removals, as a user pastes them, in a home of their own."""
    from tests.conftest import echo_call, raw_initialize, session_headers

    if shutil.which("pipx") is None:
        message = "the guide's pipx commands need pipx (apt-get install -y pipx)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    install = [line for line in code_blocks(USER_GUIDE, "sh")[0].splitlines() if line.startswith("pipx install .")]
    upgrade = [line for line in section_commands(11) if line.startswith("pipx install --force .")]
    removals = [
        line
        for line in section_commands(12)
        if line.startswith("pipx uninstall") or (line.startswith("rm -rf") and "Application Support" not in line)
    ]
    assert len(install) == len(upgrade) == 1
    assert len(removals) == 3
    checkout = fresh_checkout(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = clean_environment(HOME=str(home))
    env.pop("XDG_STATE_HOME", None)  # the default state directory, under this home
    # The user's pip cache: the dependencies are not downloaded again for each install.
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))

    async def paste(line: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", line, cwd=checkout, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(FRESH_INSTALL_TIMEOUT):
                printed, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, f"{line}\n{printed.decode()[-3000:]}"

    program = home / ".local" / "bin" / "mcp-heal-proxy"
    await paste(install[0])
    port = str(free_port())
    process, url, store = await serve_installed(program, env, "--upstream", sse_upstream.url, "--port", port)
    try:
        session_id = await raw_initialize(http, url)
    finally:
        await stop_serving(process)
    state_directory = home / ".local" / "state" / "mcp-heal-proxy"
    assert store == str(state_directory / "sessions.db")
    assert (state_directory / "session.key").is_file()

    await paste(upgrade[0])
    process, url, _ = await serve_installed(program, env, "--upstream", sse_upstream.url, "--port", port)
    try:
        async with http.post(
            url, json=echo_call(2, "after the upgrade"), headers=session_headers(session_id)
        ) as answer:
            status, text = answer.status, await answer.text()
    finally:
        await stop_serving(process)
    assert status == 200, text
    assert '"text":"after the upgrade"' in text, "the session id from before the upgrade still works"
    assert (await sse_upstream.stats())["initialize"] == 1, "kept, not healed: the upstream session went on"

    (home / ".config" / "mcp-heal-proxy").mkdir(parents=True)
    (home / ".config" / "mcp-heal-proxy" / "config.toml").write_text("")
    for line in removals:
        await paste(line)
    assert not program.exists()
    assert not state_directory.exists()
    assert not (home / ".config" / "mcp-heal-proxy").exists()


# ---- the user guide: every command, pass-through OAuth, the status page, sessions, tail -----------------


def cli_subcommands() -> dict[str, Any]:
    """The CLI's subcommands and their parsers, as build_parser defines them."""
    import argparse

    from mcp_heal_proxy.cli import build_parser

    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(commands.choices)


def guide_proxy_commands(lines: list[str]) -> list[list[str]]:
    """The ``mcp-heal-proxy`` runs of command lines: their arguments, ``VAR=value`` prefixes dropped."""
    runs: list[list[str]] = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True  # words as bash splits them; quotes, comments and ; & | as bash reads them
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|"):
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words.pop(0)  # VAR=value before the command
                if words and words[0] == "mcp-heal-proxy":
                    runs.append(words[1:])
                words = []
            else:
                words.append(token)
    return runs


def parses(argv: list[str]) -> None:
    from mcp_heal_proxy.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"the guide's `mcp-heal-proxy {shlex.join(argv)}` does not parse") from exc


def test_every_subcommand_of_the_cli_is_in_the_user_guide_and_every_command_shown_parses() -> None:
    guide = USER_GUIDE.read_text()
    subcommands = cli_subcommands()
    assert {"serve", "sessions", "tail", "login"} <= set(subcommands), "read from the parser"
    missing = [name for name in subcommands if not re.search(rf"mcp-heal-proxy {re.escape(name)}(?![\w-])", guide)]
    assert not missing, f"subcommands the user guide never names as `mcp-heal-proxy NAME`: {missing}"
    lines = [line for block in code_blocks(USER_GUIDE, "sh") for line in block.splitlines() if line.strip()]
    runs = guide_proxy_commands(lines)
    assert len(runs) > 15, "the scan found the guide's commands"
    for argv in runs:
        parses(argv)
    shown = {argv[0] for argv in runs}
    assert {"serve", "check-config", "demo", "sessions", "tail", "login", "logout"} <= shown


def passthrough_part() -> str:
    """Section 4's paragraphs on a client that logs in itself through the proxy (OAuth pass-through)."""
    section = guide_section(4)
    start = section.index("**An upstream that needs an OAuth login, for a client that logs in itself**")
    end = section.index("**An upstream that needs an OAuth login, for a client that cannot log in**")
    return section[start:end]


def test_the_guides_pass_through_part_names_what_the_stand_in_does_not_advertise() -> None:
    from mcp_heal_proxy.auth import metadata
    from mcp_heal_proxy.config import OAUTH_PASS_THROUGH

    part = passthrough_part()
    assert all(f'"{mode}"' in part for mode in OAUTH_PASS_THROUGH), "each oauth_pass_through mode"
    assert "`[server] trusted_proxies`" in part
    for endpoint in ("authorize", "token", "register", "revoke"):
        assert f"`/{endpoint}`" in part
        assert endpoint in metadata.STAND_IN_ENDPOINTS
    # What the guide says is not advertised is left out of the stand-in's metadata.
    for words, key in (
        ("device login (RFC 8628)", "device_authorization_endpoint"),
        ("pushed authorization requests", "pushed_authorization_request_endpoint"),
        ("DPoP", "dpop_signing_alg_values_supported"),
        ("client authentication by JWT or mutual TLS", "token_endpoint_auth_signing_alg_values_supported"),
        ("client authentication by JWT or mutual TLS", "tls_client_certificate_bound_access_tokens"),
        ("signed request objects", "request_object_signing_alg_values_supported"),
        ("ID token", "id_token_signing_alg_values_supported"),
    ):
        assert words in " ".join(part.split()), words
        assert key in metadata._NOT_RELAYED, key
    upstream = {
        "issuer": "https://as.example.com",
        "authorization_endpoint": "https://as.example.com/authorize",
        "token_endpoint": "https://as.example.com/token",
        "device_authorization_endpoint": "https://as.example.com/device",
        "grant_types_supported": ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "tls_client_auth", "client_secret_post"],
        "scopes_supported": ["openid", "mcp"],
    }
    shown = metadata.rewrite_authorization_server(upstream, "http://127.0.0.1:8787", "/mcp")
    assert "device_authorization_endpoint" not in shown
    assert shown["grant_types_supported"] == ["authorization_code"]
    assert shown["token_endpoint_auth_methods_supported"] == ["client_secret_post"]
    assert shown["scopes_supported"] == ["mcp"]


async def test_the_guides_pass_through_curl_lines_show_the_proxy_standing_in(
    tmp_path: Path, command: Path, sse_upstream: Any
) -> None:
    """The two curl lines against serve in front of the OAuth test upstream (the proxy's URL everywhere),
    of an upstream without OAuth metadata (404) and of one that cannot be reached (502)."""
    from tests.oauth_clients import OAuthUpstream

    fenced = re.findall(r"^```(\w*)\n(.*?)^```", passthrough_part(), flags=re.M | re.S)
    lines = [line for language, block in fenced if language == "sh" for line in block.splitlines()]
    assert len(lines) == 2
    assert all(line.startswith("curl -s http://127.0.0.1:8787/.well-known/") for line in lines)
    upstream = OAuthUpstream(tmp_path)
    await upstream.start()
    try:
        env = clean_environment(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
        port = free_port()
        process, url, _ = await serve_installed(command, env, "--upstream", upstream.url, "--port", str(port))
        try:
            documents = []
            for line in lines:
                pasted = line.replace(":8787/", f":{port}/")
                result = await asyncio.to_thread(
                    subprocess.run, ["bash", "-c", pasted], env=env, capture_output=True, text=True, timeout=30
                )
                assert result.returncode == 0, result.stderr
                documents.append(json.loads(result.stdout))
        finally:
            await stop_serving(process)
    finally:
        await upstream.stop()
    resource, server = documents
    origin = f"http://127.0.0.1:{port}"
    assert url == f"{origin}/mcp"
    assert resource["resource"] == url
    assert resource["authorization_servers"] == [url], "the proxy's URL"
    assert server["issuer"] == url
    endpoints = [value for key, value in server.items() if key.endswith("_endpoint")]
    assert endpoints
    assert all(value.startswith(f"{origin}/oauth/mcp/") for value in endpoints), "endpoints under /oauth/mcp/"
    assert "device_authorization_endpoint" not in server
    for upstream_url, status in ((sse_upstream.url, 404), (f"http://127.0.0.1:{free_port()}/mcp", 502)):
        port = free_port()
        process, _, _ = await serve_installed(command, env, "--upstream", upstream_url, "--port", str(port))
        try:
            for line in lines:
                pasted = line.replace("curl -s ", "curl -s -o /dev/null -w %{http_code} ").replace(
                    ":8787/", f":{port}/"
                )
                result = await asyncio.to_thread(
                    subprocess.run, ["bash", "-c", pasted], env=env, capture_output=True, text=True, timeout=30
                )
                assert result.stdout == str(status), (upstream_url, line, result.stdout)
        finally:
            await stop_serving(process)


def watch_section() -> str:
    return guide_section(13)


def test_the_guides_watch_section_shows_every_flag_of_sessions_and_tail() -> None:
    section = watch_section()
    assert section.startswith("## 13. Watching the proxy")
    runs = guide_proxy_commands(section_commands(13))
    assert {argv[0] for argv in runs} == {"sessions", "tail"}
    for argv in runs:
        parses(argv)
    subcommands = cli_subcommands()
    for name in ("sessions", "tail"):
        flags = {flag for action in subcommands[name]._actions for flag in action.option_strings} - {"-h", "--help"}
        assert flags, name
        missing = sorted(flag for flag in flags if f"{flag}" not in section)
        assert not missing, f"{name} flags the guide does not show: {missing}"
    assert "forget" in {word for argv in runs for word in argv}
    assert "`MCP_HEAL_PROXY_TOKEN=YOUR_TOKEN mcp-heal-proxy sessions forget" in section
    assert "`MCP_HEAL_PROXY_TOKEN=YOUR_TOKEN mcp-heal-proxy tail`" in section
    from mcp_heal_proxy.watch import DEFAULT_GIVE_UP, DEFAULT_PROXY_URL, RECONNECT_FIRST, RECONNECT_MAX

    assert f"(default {DEFAULT_GIVE_UP:.0f})" in section
    assert f"doubling up to {RECONNECT_MAX:.0f} s" in section
    assert RECONNECT_FIRST == 0.25, "a quarter of a second"
    assert f"`{DEFAULT_PROXY_URL}`" in section
    assert f"`{DEFAULT_PROXY_URL}/`" in section, "the status page's URL"


def test_the_guides_sessions_table_and_tail_lines_are_what_the_commands_print() -> None:
    from mcp_heal_proxy.watch import format_event, format_sessions

    fenced = re.findall(r"^```(\w*)\n(.*?)^```", watch_section(), flags=re.M | re.S)
    blocks = [text for language, text in fenced if not language]
    (table,) = [block for block in blocks if block.startswith("SESSION ")]
    now = 1_796_000_000.0
    _, row = table.splitlines()
    cells = row.split()
    rows = [
        {
            "id": cells[0] + "f7e8c085fc493329d1d47d99",
            "upstream": cells[1],
            "client": cells[2],
            "client_version": cells[3],
            "protocol_version": cells[4],
            "heals": int(cells[5]),
            "created": now - 180,
            "last_used": now - 10,
            "subscriptions": [],
            "log_level": None,
        }
    ]
    assert format_sessions(rows, now) == table.rstrip("\n")
    (feed,) = [block for block in blocks if block.startswith("following ")]
    for line in feed.splitlines()[1:]:
        clock, upstream, session, *rest = line.split()
        moment = time_today(clock)
        if rest[0] == "HEAL":
            item = {"at": moment, "upstream": upstream, "session": session, "reason": rest[1], "outcome": rest[2],
                    "generation": int(rest[-1]), "duration_ms": float(rest[3])}  # fmt: skip
            assert format_event("heal", item, color=False) == line
        else:
            healed = rest[-1] == "HEALED"
            item = {"at": moment, "upstream": upstream, "session": session, "method": rest[0], "tool": rest[1],
                    "status": int(rest[2]), "duration_ms": float(rest[3]), "healed": healed}  # fmt: skip
            assert format_event("request", item, color=False) == line


def time_today(clock: str) -> float:
    """The epoch time of a ``HH:MM:SS.mmm`` clock reading today, local time (as tail prints it)."""
    import time

    hours, minutes, rest = clock.split(":")
    seconds, millis = rest.split(".")
    today = time.localtime()
    moment = time.mktime((today.tm_year, today.tm_mon, today.tm_mday, int(hours), int(minutes), int(seconds), 0, 0, -1))
    return moment + int(millis) / 1000 + 0.0001


async def test_the_guides_sessions_and_tail_lines_work_against_a_running_proxy(
    tmp_path: Path, command: Path, sse_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """Section 13's lines as a user pastes them, pointed at a ``serve`` of the test's: ``tail`` follows it
    across a restart and gives up once it is gone, ``sessions`` lists the store, ``forget`` ends a session
    through the proxy (its client then gets 404) and, with no proxy left, deletes the record only."""
    from tests.conftest import echo_call, raw_initialize, session_headers

    lines = section_commands(13)
    sessions = [line for line in lines if line.startswith("mcp-heal-proxy sessions")]
    tails = [line for line in lines if line.startswith("mcp-heal-proxy tail")]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "home" / ".config" / "mcp-heal-proxy" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[server]\nport = {port}\n\n[upstreams.default]\nurl = "{sse_upstream.url}"\n')
    path = f"{command.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = clean_environment(PATH=path, HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "state"))

    def pointed(line: str) -> str:
        """The line aimed at the test's proxy: its port, and its URL where the line relies on the default."""
        line = line.split("  #")[0].strip().replace("http://127.0.0.1:9000", base).replace(":8787", f":{port}")
        if line.startswith("mcp-heal-proxy tail") and base not in line:
            line = line.replace("mcp-heal-proxy tail", f"mcp-heal-proxy tail {base}", 1)
        if " forget " in line and "--config" not in line:
            line += f" --proxy {base}"
        return line

    async def paste(line: str) -> tuple[int, str, str]:
        result = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", pointed(line)], env=env, capture_output=True, text=True, timeout=30
        )
        return result.returncode, result.stdout, result.stderr

    async def follow(line: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "bash", "-c", "exec " + pointed(line), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def line_of(stream: asyncio.StreamReader | None) -> str:
        assert stream is not None
        async with asyncio.timeout(SERVICE_TIMEOUT):
            return (await stream.readline()).decode()

    async def serving() -> asyncio.subprocess.Process:
        process, url, _ = await serve_installed(command, env, "--config", str(config))
        assert url == f"{base}/default/mcp"
        return process

    # The --give-up line follows from the last start only: a slow restart must not run out its time.
    (giving_up,) = [line for line in tails if "--give-up" in line]
    followers: list[asyncio.subprocess.Process] = []
    try:
        proxy = await serving()
        try:
            followers = [await follow(line) for line in tails if line != giving_up]
            for follower in followers:
                assert (await line_of(follower.stderr)).startswith(f"following {base}/_proxy/api/events")
            url = f"{base}/default/mcp"
            ended, kept = await raw_initialize(http, url), await raw_initialize(http, url)
            async with http.post(url, json=echo_call(2, "seen"), headers=session_headers(ended)) as answer:
                assert answer.status == 200
                await answer.read()
            for follower, line in zip(followers, [line for line in tails if line != giving_up], strict=True):
                while "tools/call" not in (printed := await line_of(follower.stdout)):
                    pass
                if "--json" in line:
                    assert json.loads(printed)["method"] == "tools/call"
                else:
                    assert re.search(rf"  default  {ended[:8]}  tools/call echo +200 ", printed), printed
            # sessions, as listed: the plain table with both sessions, the JSON with full ids.
            for line in sessions:
                if "redis://" in line or " forget " in line:
                    continue
                status, out, err = await paste(line)
                assert status == 0, err
                if "--json" in line:
                    assert {row["id"] for row in json.loads(out)} == {ended, kept}
                else:
                    assert out.startswith("SESSION   UPSTREAM  CLIENT"), out
                    assert {row.split()[0] for row in out.splitlines()[1:]} == {ended[:8], kept[:8]}
            (forget,) = [line.replace("ae972275", ended[:8]) for line in sessions if " forget " in line]
            status, out, err = await paste(forget)
            assert status == 0, err
            (shown,) = [block for block in code_blocks(USER_GUIDE, "") if block.startswith("ended session ")]
            assert out == shown.replace("ae972275", ended[:8]).replace(":8787", f":{port}")
            async with http.post(url, json=echo_call(3, "gone"), headers=session_headers(ended)) as answer:
                assert answer.status == 404, "the client's next request on a forgotten session"
            # A restart: each tail says so and reconnects.
            await stop_serving(proxy)
            for follower in followers:
                assert "reconnecting" in await line_of(follower.stderr)
            proxy = await serving()
            for follower in followers:
                assert (await line_of(follower.stderr)).startswith(f"reconnected to {base}")
            follower = await follow(giving_up)
            followers.append(follower)
            assert (await line_of(follower.stderr)).startswith(f"following {base}/_proxy/api/events")
        finally:
            await stop_serving(proxy)
        # Gone for good: the --give-up line exits with status 1 in its time.
        seconds = float(giving_up.split("--give-up ")[1].split()[0])
        async with asyncio.timeout(seconds + SERVICE_TIMEOUT):
            _, err_bytes = await follower.communicate()
        assert follower.returncode == 1
        assert f"could not reconnect within {seconds:g} s" in err_bytes.decode()
    finally:
        for process in followers:
            if process.returncode is None:
                process.kill()
                await process.wait()
    # With no proxy left, forget deletes the record only, and says so.
    status, out, err = await paste(forget.replace(ended[:8], kept[:8]))
    assert status == 0, err
    assert out.startswith(f"forgot session {kept[:8]}: record deleted from the store only"), out
