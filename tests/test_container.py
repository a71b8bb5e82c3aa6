"""The image, built from the Dockerfile and run for real with podman.

No image registry is reachable from the test machines, so the Dockerfile's base (python:3.11-slim) is
stood in for by scripts/container-base: Debian bookworm minbase with its python3 (3.11), made by
debootstrap and loaded with `podman import`. The image is built as a user's `docker build` would, the
base image aside, and run as compose.yaml runs it (read-only root, all capabilities dropped), with the
flags this machine needs: runc, the host's network (the upstream is the SDK server on the host's
127.0.0.1; the proxy is told `--host 127.0.0.1` so that it listens on loopback only) and ulimits no higher
than the machine allows.

Without podman (and runc, debootstrap) these tests skip, except in CI (CI=true), where .ci/run installs
them and their absence is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import (
    UpstreamProcess,
    free_port,
    mcp_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.test_proxy_sdk import text_of

ROOT = Path(__file__).parent.parent
IMAGE = "localhost/mcp-heal-proxy:test"
# A cold build runs debootstrap (1.5 to 5 minutes on a busy 2-core machine) and pip; a warm one reuses
# podman's cached layers (under a minute after a code change, seconds without one).
BUILD_TIMEOUT = 900.0
STARTUP_TIMEOUT = 60.0
PODMAN_TIMEOUT = 60.0
# `docker stop`'s default grace period: a proxy still running after it gets SIGKILL (exit status 137).
STOP_TIMEOUT = 10
PROMPT_STOP = 5.0
IMAGE_UID = "10001"
# How this machine lets containers run: runc (crun is not installed) and ulimits within the host's own
# (it refuses to raise them, and runc otherwise asks for more). The network is chosen per container: the
# host's, to reach the SDK server on 127.0.0.1, or none at all.
RUN_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
# compose.yaml's hardening: the image must work under it.
COMPOSE_FLAGS = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")

# The whole module may build the image first; a per-test bound still applies to everything after.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 300)


def require_podman() -> None:
    """Skip without podman, runc and debootstrap; in CI, where .ci/run installs them, fail instead."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (apt-get install podman runc debootstrap; .ci/run does)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the container tests: {reason}")
    pytest.skip(reason)


def podman(*args: str, timeout: float = PODMAN_TIMEOUT) -> str:
    """Run podman, failing the test with its stderr if it fails; its stdout."""
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited with {result.returncode}:\n{result.stderr}")
    return result.stdout


async def apodman(*args: str, timeout: float = PODMAN_TIMEOUT) -> str:
    """podman without blocking the event loop (an SDK client may be reading a stream meanwhile)."""
    return await asyncio.to_thread(podman, *args, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """The image built from the Dockerfile on the stand-in base; podman's layer cache keeps reruns quick."""
    require_podman()
    base = subprocess.run(
        [str(ROOT / "scripts" / "container-base")], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    assert base.returncode == 0, f"scripts/container-base failed:\n{base.stderr}"
    podman(
        "build", "--isolation", "chroot", "--network=host", "--pull=never",
        # The docker format keeps the HEALTHCHECK (the OCI format has no place for it).
        "--format", "docker",
        "--build-arg", f"BASE_IMAGE={base.stdout.strip()}",
        "--tag", IMAGE, str(ROOT),
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    return IMAGE


@dataclass
class Container:
    """One container of the image: its name, and the host port its proxy listens on."""

    name: str
    port: int

    @property
    def url(self) -> str:
        """The MCP endpoint a client on the host uses."""
        return f"http://127.0.0.1:{self.port}/mcp"

    async def logs(self) -> str:
        """What the proxy printed (stdout and stderr)."""
        result = await asyncio.to_thread(
            subprocess.run, ["podman", "logs", self.name], capture_output=True, text=True, timeout=PODMAN_TIMEOUT
        )
        return result.stdout + result.stderr

    async def wait_healthy(self) -> None:
        """Until /healthz answers 200; the proxy's output in the failure if it never does."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            last_look = time.monotonic()

            async def healthy() -> bool:
                nonlocal last_look
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    pass
                # A proxy that exited (a store it cannot open) fails the test now, not at the timeout;
                # once a second is enough, podman being slow to ask.
                if time.monotonic() - last_look > 1.0:
                    last_look = time.monotonic()
                    state = await apodman("container", "inspect", "--format", "{{.State.Status}}", self.name)
                    if state.strip() in ("exited", "stopped"):
                        raise AssertionError(f"container {self.name} exited:\n{await self.logs()}")
                return False

            try:
                await wait_until(healthy, STARTUP_TIMEOUT, f"container {self.name} answers /healthz")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{await self.logs()}") from None

    async def stop(self, timeout: int = STOP_TIMEOUT) -> tuple[int, float]:
        """`podman stop` (SIGTERM, then SIGKILL after ``timeout``): the exit status and how long it took."""
        started = time.monotonic()
        await apodman("stop", "--time", str(timeout), self.name, timeout=PODMAN_TIMEOUT + timeout)
        elapsed = time.monotonic() - started
        status = await apodman("container", "inspect", "--format", "{{.State.ExitCode}}", self.name)
        return int(status), elapsed


@dataclass
class Containers:
    """Containers and volumes a test started, all removed by name when it ends."""

    image: str
    names: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=itertools.count)

    def unique(self, kind: str) -> str:
        """A name no other test run on this machine uses."""
        return f"mcp-heal-proxy-test-{kind}-{os.getpid()}-{next(self.counter)}"

    def volume(self) -> str:
        """A new named volume, like compose.yaml's proxy-state."""
        name = self.unique("data")
        podman("volume", "create", name)
        self.volumes.append(name)
        return name

    async def start(self, upstream_url: str, volume: str, *run_flags: str) -> Container:
        """Start the image detached, in front of ``upstream_url``, with ``volume`` on /data."""
        container = Container(self.unique("proxy"), free_port())
        self.names.append(container.name)
        await apodman(
            "run", "--detach", "--name", container.name, *RUN_FLAGS, "--network=host", *COMPOSE_FLAGS,
            # No systemd runs the healthcheck's timer here; the tests run the check by hand instead.
            "--health-interval", "disable",
            "--volume", f"{volume}:/data",
            # The port as a user moves it, through the variable the HEALTHCHECK reads too.
            "--env", f"MCP_HEAL_PROXY_PORT={container.port}",
            *run_flags,
            self.image, "--host", "127.0.0.1", "--upstream", upstream_url,
        )  # fmt: skip
        return container

    def remove_all(self) -> None:
        """Remove every container (killed at once if still running) and volume this test made."""
        for name in self.names:
            subprocess.run(
                ["podman", "rm", "--force", "--time", "0", name], capture_output=True, timeout=PODMAN_TIMEOUT
            )
        for name in self.volumes:
            subprocess.run(["podman", "volume", "rm", "--force", name], capture_output=True, timeout=PODMAN_TIMEOUT)


@pytest.fixture
async def containers(image: str) -> AsyncIterator[Containers]:
    """Start containers of the image; every one of them and their volumes removed at the end, even on failure."""
    made = Containers(image)
    try:
        yield made
    finally:
        await asyncio.to_thread(made.remove_all)


async def test_container_heals_a_session_when_the_upstream_restarts(
    containers: Containers, sse_upstream: UpstreamProcess
) -> None:
    container = await containers.start(sse_upstream.url, containers.volume())
    await container.wait_healthy()
    # The image's HEALTHCHECK, run as the engine runs it: inside the container, on the moved port.
    await apodman("healthcheck", "run", container.name)
    # PID 1 is tini, the proxy its child, both as the image's non-root user.
    processes = (await apodman("top", container.name, "user", "comm")).split()
    assert processes.count("mcp") == 2, processes
    assert "tini" in processes, processes
    assert await apodman("exec", container.name, "id", "-u") == f"{IMAGE_UID}\n"

    async with mcp_session(container.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "before the restart"})) == "before the restart"
        await sse_upstream.restart()  # every upstream session dies with the process
        assert text_of(await session.call_tool("echo", {"text": "after the restart"})) == "after the restart"
    # The new upstream process saw the proxy re-initialize: the call was healed, not lucky.
    assert (await sse_upstream.stats())["initialize"] == 1


async def test_container_stops_promptly_on_sigterm_with_a_client_connected(
    containers: Containers, sse_upstream: UpstreamProcess
) -> None:
    container = await containers.start(sse_upstream.url, containers.volume())
    await container.wait_healthy()
    async with mcp_session(container.url) as session:
        await session.call_tool("echo", {"text": "connected"})
        # The SDK client holds a GET stream open; the proxy must end it rather than wait for it.
        status, elapsed = await container.stop()
    assert status == 0, f"exit status {status} (137: SIGKILL after {STOP_TIMEOUT} s)\n{await container.logs()}"
    assert elapsed < PROMPT_STOP, f"podman stop took {elapsed:.1f} s"
    logs = await container.logs()
    # Its own handler ran (tini's -e 143 would turn death by SIGTERM into status 0 as well).
    assert "proxy.stopping" in logs
    assert "Traceback" not in logs


def compose_stop_grace_period() -> int:
    """compose.yaml's stop_grace_period for the proxy, in seconds."""
    match = re.search(r"^\s*stop_grace_period:\s*(\d+)s\s*$", (ROOT / "compose.yaml").read_text(), re.MULTILINE)
    assert match is not None, "compose.yaml sets the proxy's stop_grace_period in seconds"
    return int(match.group(1))


async def test_container_stops_cleanly_with_a_call_in_flight_given_compose_grace_period(
    containers: Containers, sse_upstream: UpstreamProcess
) -> None:
    """A tool call still running at SIGTERM: the proxy waits out its shutdown grace (10 s), then exits.

    With `docker stop`'s default 10 s (compose.yaml had the same) the SIGKILL came first: status 137.
    """
    grace_period = compose_stop_grace_period()
    container = await containers.start(sse_upstream.url, containers.volume())
    await container.wait_healthy()
    async with mcp_session(container.url) as session, asyncio.TaskGroup() as tasks:

        async def call_in_flight() -> None:
            # Blocks upstream until released, which this test never does: the call is in flight until
            # the proxy, its grace over, ends the answer's stream.
            with contextlib.suppress(MCPError):
                await session.call_tool("gated_steps", {"steps": 1})

        call = tasks.create_task(call_in_flight())

        async def reached_upstream() -> bool:
            return bool((await sse_upstream.stats())["tools_call"])

        await wait_until(reached_upstream, 10.0, "the tool call reached the upstream")
        status, elapsed = await container.stop(grace_period)
        call.cancel()
    assert status == 0, f"exit status {status} after {elapsed:.1f} s (137: SIGKILL)\n{await container.logs()}"
    assert elapsed < grace_period
    assert "proxy.stopping" in await container.logs()


async def test_container_stopped_while_starting_exits_promptly_and_cleanly(
    containers: Containers, sse_upstream: UpstreamProcess
) -> None:
    """SIGTERM before the proxy has installed its handlers (`docker compose up` then `down` at once).

    The kernel drops a signal that PID 1 has no handler for: with the proxy as PID 1 this SIGTERM was
    lost, and podman killed the container after STOP_TIMEOUT (status 137). tini as PID 1 hands it on.
    """
    container = await containers.start(sse_upstream.url, containers.volume())
    status, elapsed = await container.stop()  # at once: the interpreter is still importing
    assert status == 0, f"exit status {status}\n{await container.logs()}"
    assert elapsed < PROMPT_STOP, f"podman stop took {elapsed:.1f} s"


async def test_client_session_survives_the_container_being_replaced(
    containers: Containers, sse_upstream: UpstreamProcess
) -> None:
    volume = containers.volume()
    first = await containers.start(sse_upstream.url, volume)
    await first.wait_healthy()
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        session_id = await raw_initialize(http, first.url)
        async with http.post(first.url, json=call, headers=session_headers(session_id)) as response:
            assert response.status == 200, await response.text()
        status, _ = await first.stop()
        assert status == 0
        await apodman("rm", first.name)  # the container's own file system goes with it: only the volume stays

        second = await containers.start(sse_upstream.url, volume)
        await second.wait_healthy()
        async with http.post(second.url, json=call, headers=session_headers(session_id)) as response:
            body = await response.text()
            assert response.status == 200, body
        assert '"text":"x"' in body.replace(" ", "")
        # The new container found the session on the volume and used the same upstream session:
        # no second initialize reached the upstream (a heal would have sent one).
        assert (await sse_upstream.stats())["initialize"] == 1
        # A session id the store never held is still refused: the success above was the volume's doing.
        async with http.post(second.url, json=call, headers=session_headers("not-a-session")) as response:
            assert response.status == 404


async def test_container_under_an_arbitrary_uid_in_group_0_can_write_its_state(
    containers: Containers, sse_upstream: UpstreamProcess
) -> None:
    """OpenShift runs images as a random uid in group 0: /data must be writable by that group."""
    container = await containers.start(sse_upstream.url, containers.volume(), "--user", "123456:0")
    await container.wait_healthy()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        await raw_initialize(http, container.url)
    # The store was created by that uid (the proxy writes it before the client sees its session id).
    assert await apodman("exec", container.name, "stat", "--format", "%u", "/data/sessions.db") == "123456\n"


async def test_host_directory_on_data_needs_to_be_writable_by_the_image_user(
    containers: Containers, sse_upstream: UpstreamProcess, tmp_path: Path
) -> None:
    """The README's advice for a bind mount in place of the volume: chown 10001 DIR."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # root's, as a directory made on the host is
    refused = await containers.start(sse_upstream.url, str(data))
    status = int(await apodman("wait", refused.name))
    logs = await refused.logs()
    assert status == 2, logs  # a user's mistake: one line and status 2, not a traceback
    assert "cannot open the session store /data/sessions.db" in logs
    assert "Traceback" not in logs

    os.chown(data, int(IMAGE_UID), int(IMAGE_UID))
    container = await containers.start(sse_upstream.url, str(data))
    await container.wait_healthy()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        await raw_initialize(http, container.url)
    assert (data / "sessions.db").stat().st_uid == int(IMAGE_UID)


async def test_image_as_documented_prints_the_url_to_paste_and_passes_its_healthcheck(containers: Containers) -> None:
    """The README's `docker run` as written (the ENTRYPOINT's --host 0.0.0.0, port 8787, the upstream
    from the environment), in a network namespace of its own with no way out, so 0.0.0.0 is the
    container's alone: the banner gives the URL a client on the host pastes, and the HEALTHCHECK passes."""
    name = containers.unique("documented")
    containers.names.append(name)
    await apodman(
        "run", "--detach", "--name", name, *RUN_FLAGS, "--network=none", *COMPOSE_FLAGS,
        "--health-interval", "disable",
        "--volume", f"{containers.volume()}:/data",
        "--env", "MCP_HEAL_PROXY_UPSTREAM=https://mcp.example.com/mcp",
        containers.image,
    )  # fmt: skip
    container = Container(name, 8787)

    async def banner_printed() -> bool:
        return "paste into your MCP client" in await container.logs()

    await wait_until(banner_printed, STARTUP_TIMEOUT, "the banner")
    assert 'url = "http://127.0.0.1:8787/mcp"' in await container.logs()
    healthcheck = await asyncio.to_thread(
        subprocess.run, ["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=PODMAN_TIMEOUT
    )
    assert healthcheck.returncode == 0, f"{healthcheck.stdout}{healthcheck.stderr}\n{await container.logs()}"


def test_missing_podman_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="podman, runc, debootstrap not installed"):
        require_podman()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the container tests"):
        require_podman()
