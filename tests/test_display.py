"""What the proxy shows a person: URLs with their secrets masked (every output that prints one), and
client-chosen text made harmless for a terminal."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from mcp_heal_proxy.auth.tokens import Grant
from mcp_heal_proxy.config import ConfigError, build_config, describe
from mcp_heal_proxy.display import mask_url, terminal_safe
from tests.conftest import ProxyFactory, raw_initialize
from tests.fake_upstream import FakeUpstream


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://mcp.example.com/mcp", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com/mcp?api_key=s3cret", "https://mcp.example.com/mcp?api_key=***"),
        ("https://mcp.example.com/mcp?a=1&key=s3cret&flag", "https://mcp.example.com/mcp?a=***&key=***&***"),
        ("https://mcp.example.com/mcp#token=s3cret", "https://mcp.example.com/mcp#***"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("redis://user:s3cret@127.0.0.1:6379/0?password=s3cret", "redis://***@127.0.0.1:6379/0?password=***"),
        ("https://s3cret@[::1]:8443/mcp", "https://***@[::1]:8443/mcp"),
        # Not parseable (a bad port): masked by shape all the same.
        ("https://u:s3cret@host:99999/mcp?k=s3cret", "https://***@host:99999/mcp?k=***"),
        # A '/' in the password makes the rest look like a path: masked up to the last '@' all the same.
        ("http://user:Xy7/s3cr3t@proxy.corp:3128", "http://***@proxy.corp:3128"),
        ("http://user:Xy7/s3cr3t@p@ss@proxy.corp:abc", "http://***@proxy.corp:abc"),
        # No scheme (HTTPS_PROXY=HOST:PORT is taken as http): user and password masked too.
        ("user:s3cret@proxy:abc", "***@proxy:abc"),
        ("/var/lib/sessions.db", "/var/lib/sessions.db"),
        (":memory:", ":memory:"),
    ],
)
def test_mask_url_masks_credentials_and_every_query_value(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_check_config_masks_query_values_of_the_upstream_and_the_store() -> None:
    config = build_config(
        config_file=None,
        flags={"upstream": "https://mcp.example.com/mcp?api_key=s3cret", "state": "redis://h:6379/0?password=s3cret"},
        environ={},
    )
    shown = describe(config)
    assert shown["upstreams"]["default"]["url"] == "https://mcp.example.com/mcp?api_key=***"
    assert shown["server"]["state"] == "redis://h:6379/0?password=***"
    assert "s3cret" not in repr(shown)


def test_a_refused_url_is_echoed_masked() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(config_file=None, flags={"upstream": "https://h/mcp", "state": "redis://h/x?password=s3cret"})
    assert "s3cret" not in str(caught.value)
    assert "password=***" in str(caught.value)


def test_a_grant_prints_its_upstream_masked() -> None:
    grant = Grant(
        upstream_url="https://h/mcp?api_key=s3cret",
        token_endpoint="https://h/token",
        client_id="c",
        auth_method="none",
        access_token="a" * 20,
    )
    assert "s3cret" not in repr(grant)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("claude-code", "claude-code"),
        ("évite ✓", "évite ✓"),
        ("\x1b[2J\x1b]0;owned\x07", "\\x1b[2J\\x1b]0;owned\\x07"),
        ("a\rforged line\nb", "a\\x0dforged line\\x0ab"),
        ("x\x08\x7f\x9b31m\x85", "x\\x08\\x7f\\x9b31m\\x85"),
    ],
)
def test_terminal_safe_writes_every_control_character_as_text(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown


async def test_redirect_logs_show_the_target_masked(
    aiohttp_server: Any, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = FakeUpstream()

    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/v2/mcp?api_key=s3cret")

    app = web.Application()
    app.router.add_route("*", "/mcp", moved)
    app.router.add_route("*", "/v2/mcp", upstream.handle)
    server = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")))
    with capture_logs() as logs:
        await raw_initialize(http, proxy.url)
    (redirected,) = [entry for entry in logs if entry["event"] == "upstream.redirected"]
    assert redirected["to"] == str(server.make_url("/v2/mcp")) + "?api_key=***"
    assert "s3cret" not in repr(logs)
