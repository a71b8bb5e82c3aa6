"""``login --device`` (RFC 8628) and the pasted redirect of ``login --no-browser``, piece by piece: the
device authorization answer, the polling rules (pending, slow_down, expired, denied, bounded), the
pasted-line check, and the clear error when the authorization server offers no device login. The
whole flows run against oidc-provider in tests/interop/test_oidc_provider.py.
"""

from __future__ import annotations

import asyncio
import io
import os
import pty
import time
from pathlib import Path
from typing import Any

import pytest

from mcp_heal_proxy.auth import device, paste
from mcp_heal_proxy.auth.device import DeviceAuthorization, parse_device_authorization, poll
from mcp_heal_proxy.auth.errors import LoginError, TokenRefused
from mcp_heal_proxy.auth.paste import stdin_lines
from tests.managed_login import CLI, REPO_ROOT, child_env
from tests.test_managed_login import NAME, OAuthUpstreams, oauth_upstream, write_config  # noqa: F401

AGAIN = "mcp-heal-proxy login up --config /etc/proxy.toml --device"


def authorization(interval: float = 0.01, expires_in: float = 30.0) -> DeviceAuthorization:
    return DeviceAuthorization("device-secret", "ABCD-EFGH", "https://as.example/device", None, expires_in, interval)


class Answers:
    """A token endpoint that answers each poll with the next error, then a token; records when."""

    def __init__(self, *errors: str) -> None:
        self.errors = list(errors)
        self.times: list[float] = []

    async def __call__(self) -> dict[str, Any]:
        self.times.append(time.monotonic())
        if self.errors:
            raise TokenRefused(400, self.errors.pop(0))
        return {"access_token": "at", "token_type": "Bearer"}


def test_device_authorization_answer() -> None:
    parsed = parse_device_authorization(
        {
            "device_code": "secret-device-code",
            "user_code": "U",
            "verification_uri": "https://as.example/device",
            "verification_uri_complete": "https://as.example/device?user_code=U",
            "expires_in": 600,
            "interval": 0,
        }
    )
    assert parsed.interval == device.MIN_INTERVAL, "a server saying 0 gets no busy loop"
    assert parsed.expires_in == 600
    assert parsed.verification_uri_complete == "https://as.example/device?user_code=U"
    assert "secret-device-code" not in repr(parsed), "the device code is a secret"
    bare = parse_device_authorization({"device_code": "d", "user_code": "U", "verification_uri": "https://x/"})
    assert bare.interval == device.DEFAULT_INTERVAL == 5.0
    assert bare.verification_uri_complete is None
    with pytest.raises(LoginError, match="lacks device_code"):
        parse_device_authorization({"user_code": "U", "verification_uri": "https://x/"})
    with pytest.raises(LoginError, match="not a JSON object"):
        parse_device_authorization(["device_code"])


async def test_pending_polls_on_at_the_interval() -> None:
    answers = Answers("authorization_pending", "authorization_pending")
    started = time.monotonic()
    assert (await poll(answers, authorization(interval=0.05), wait=10, again=AGAIN))["access_token"] == "at"
    assert len(answers.times) == 3
    assert answers.times[0] - started >= 0.05, "the first poll waits the interval too"
    gaps = [later - earlier for earlier, later in zip(answers.times, answers.times[1:], strict=False)]
    assert all(gap >= 0.05 for gap in gaps), gaps


async def test_slow_down_polls_more_slowly_from_then_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "SLOW_DOWN_STEP", 0.1)
    answers = Answers("slow_down", "authorization_pending")
    await poll(answers, authorization(interval=0.02), wait=10, again=AGAIN)
    gaps = [later - earlier for earlier, later in zip(answers.times, answers.times[1:], strict=False)]
    assert all(gap >= 0.12 for gap in gaps), gaps


@pytest.mark.parametrize(
    ("error", "words"),
    [
        ("expired_token", f"the code expired before the login was approved; start again: {AGAIN}"),
        ("access_denied", "the login was refused at the authorization server (access_denied)"),
        ("invalid_grant", "the token endpoint refused the device login: invalid_grant"),
    ],
)
async def test_an_answer_other_than_pending_ends_the_login(error: str, words: str) -> None:
    answers = Answers("authorization_pending", error)
    with pytest.raises(LoginError) as refused:
        await poll(answers, authorization(), wait=10, again=AGAIN)
    assert str(refused.value) == words
    assert len(answers.times) == 2


@pytest.mark.parametrize(("expires_in", "wait"), [(0.3, 30.0), (30.0, 0.3)])
async def test_polling_is_bounded_by_the_code_lifetime_and_the_wait(expires_in: float, wait: float) -> None:
    answers = Answers(*["authorization_pending"] * 1000)
    started = time.monotonic()
    with pytest.raises(LoginError, match=r"not approved within 0 s; start again: mcp-heal-proxy login up"):
        await poll(answers, authorization(interval=0.02, expires_in=expires_in), wait=wait, again=AGAIN)
    assert time.monotonic() - started < 2


def _reader(*lines: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=paste.PASTE_LIMIT)
    for line in lines:
        reader.feed_data(line)
    if eof:
        reader.feed_eof()
    return reader


async def test_a_pasted_address_counts_only_with_this_logins_state_exactly() -> None:
    out = io.StringIO()
    reader = _reader(
        b"\n",
        b"http://127.0.0.1:1/callback?code=stolen&state=s3cret-and-more\n",
        b"http://127.0.0.1:1/callback?code=x\n",
        b"  http://127.0.0.1:1/callback?code=good&state=s3cret&iss=https%3A%2F%2Fas.example  \n",
    )
    params = await paste.read_pasted(reader, "s3cret", out)
    assert params == {"code": "good", "state": "s3cret", "iss": "https://as.example"}
    assert out.getvalue().count("state does not match") == 2


async def test_a_pasted_address_with_a_non_ascii_state_is_answered_and_reading_goes_on() -> None:
    """A state that is not ASCII (percent-encoded UTF-8, raw UTF-8, bytes that are not UTF-8) is not
    this login's: the paste is answered as a mismatch, never a traceback."""
    out = io.StringIO()
    reader = _reader(
        b"http://127.0.0.1:1/callback?code=x&state=%C3%A9\n",
        b"http://127.0.0.1:1/callback?code=x&state=\xc3\xa9\n",
        b"http://127.0.0.1:1/callback?code=x&state=%FF\xff\n",
        b"http://127.0.0.1:1/callback?code=good&state=s3cret\n",
    )
    assert (await paste.read_pasted(reader, "s3cret", out))["code"] == "good"
    assert out.getvalue().count("state does not match") == 3


async def test_a_line_too_long_is_answered_and_reading_goes_on() -> None:
    out = io.StringIO()
    reader = _reader(b"x" * (paste.PASTE_LIMIT + 10) + b"\n", b"http://h/cb?state=s&code=c\n")
    assert (await paste.read_pasted(reader, "s", out))["code"] == "c"
    assert "too long" in out.getvalue()


async def test_at_the_end_of_the_input_the_login_waits_for_the_callback() -> None:
    reader = _reader(b"not an address\n")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await paste.read_pasted(reader, "s", io.StringIO())


async def test_device_login_without_a_device_endpoint_says_what_to_run_instead(
    oauth_upstream: OAuthUpstreams,  # noqa: F811
    tmp_path: Path,
) -> None:
    upstream = await oauth_upstream()
    config = write_config(tmp_path, upstream.url)
    process = await asyncio.create_subprocess_exec(
        *CLI, "login", NAME, "--config", str(config), "--device",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=child_env(tmp_path / "state"), cwd=REPO_ROOT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, errors = await process.communicate()
    assert process.returncode == 1
    message = errors.decode()
    assert "offers no device login" in message
    assert f"run `mcp-heal-proxy login {NAME} --config {config} --no-browser`" in message
    assert (await upstream.stats())["registrations"] == 0, "nothing registered for a login that cannot happen"


async def test_stdin_lines_reads_a_terminal_and_leaves_it_blocking(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    try:
        with os.fdopen(secondary, "r", closefd=False) as terminal:
            assert os.get_blocking(secondary)
            async with stdin_lines(terminal) as reader:
                assert reader is not None
                os.write(primary, b"http://127.0.0.1:1/callback?state=s&code=c\n")
                async with asyncio.timeout(5):
                    line = await reader.readline()
                assert line.strip() == b"http://127.0.0.1:1/callback?state=s&code=c"
            assert os.get_blocking(secondary), "the shell gets its terminal back as it was"
            os.fstat(secondary)  # still open
    finally:
        os.close(primary)
        os.close(secondary)


async def test_stdin_lines_is_none_where_nothing_can_be_pasted(tmp_path: Path) -> None:
    document = tmp_path / "input.txt"
    document.write_text("http://127.0.0.1:1/callback?state=s&code=c\n")
    with (
        os.fdopen(os.open(document, os.O_RDONLY)) as regular,
        os.fdopen(os.open(os.devnull, os.O_RDONLY)) as null,
    ):
        for stream in (regular, null):
            async with stdin_lines(stream) as reader:
                assert reader is None
