"""A client session outlives the loss of the session store (issue 26 item 11).

The client-facing session id is sealed (engine/sealing.py): it carries the upstream's name, the client's
initialize params and the negotiated version under an HMAC with the proxy's key. When the store no longer
knows an id (a Redis that restarted empty, ``:memory:`` across a proxy restart, a deleted SQLite file),
the proxy re-creates the session from the id and heals it with one re-initialize; ids it did not issue,
and sessions it ended on purpose, still get 404 "Session not found".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.types import TextContent
from redis.asyncio import Redis
from structlog.testing import capture_logs

from mcp_heal_proxy.config import (
    ConfigError,
    ProxyConfig,
    UpstreamClient,
    UpstreamConfig,
    build_config,
    describe,
    single_upstream,
)
from mcp_heal_proxy.engine.sealing import (
    KEY_FILE_NAME,
    MAX_SEALED_ID,
    SealedSession,
    SessionSealer,
    key_from_file,
)
from mcp_heal_proxy.front.app import FAST_PATH_KEY, STORE_KEY, build_app
from mcp_heal_proxy.front.http1 import FastSite
from mcp_heal_proxy.store.records import MemorySessionStore
from mcp_heal_proxy.store.redis import RedisSessionStore
from mcp_heal_proxy.wire.headers import is_valid_session_id
from tests.conftest import (
    INITIALIZE_PARAMS,
    TEST_CLIENT,
    RunningProxy,
    UpstreamProcess,
    echo_call,
    free_port,
    mcp_session,
    post_on_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream, answer_404
from tests.test_store_redis import RedisServer

KEY = "k" * 16 + "0123456789abcdef0123456789abcdef"
OTHER_KEY = "o" * 48
CALL_TIMEOUT = 30.0


@pytest.fixture
async def json_upstream() -> AsyncIterator[UpstreamProcess]:
    """The SDK server answering in JSON, for the raw requests of these tests."""
    server = UpstreamProcess(json_response=True)
    await server.start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def running(config: ProxyConfig, port: int = 0) -> AsyncIterator[RunningProxy]:
    """The proxy in this process, as serve() runs it, stopped (its store closed) when the block ends."""
    app = build_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = FastSite(runner, "127.0.0.1", port, app[FAST_PATH_KEY])
        await site.start()
        yield RunningProxy(f"http://127.0.0.1:{runner.addresses[0][1]}/mcp", app, runner)
    finally:
        await runner.cleanup()


def proxy_config(upstream_url: str, **options: Any) -> ProxyConfig:
    options.setdefault("client", TEST_CLIENT)
    options.setdefault("session_key", KEY)
    return single_upstream(upstream_url, **options)


async def echo(http: aiohttp.ClientSession, url: str, session_id: str, request_id: int) -> tuple[int, Any]:
    status, _, answer = await post_on_session(http, url, session_id, echo_call(request_id, f"call {request_id}"))
    return status, answer


def delete_files(directory: Path, pattern: str) -> None:
    for path in directory.glob(pattern):
        path.unlink()


def echoed(answer: Any) -> str:
    text: str = answer["result"]["content"][0]["text"]
    return text


# --- the sealed id --------------------------------------------------------------------------------


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_sessions = st.builds(
    SealedSession,
    upstream=st.text(min_size=1, max_size=30),
    initialize_params=st.dictionaries(st.text(max_size=12), _json, max_size=6),
    protocol_version=st.none() | st.text(max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(
    session=_sessions,
    position=st.integers(min_value=0),
    replacement=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
)
def test_a_sealed_id_opens_to_what_was_sealed_and_any_change_is_refused(
    session: SealedSession, position: int, replacement: str
) -> None:
    sealer = SessionSealer(KEY)
    session_id = sealer.seal(session)
    if session_id is None:  # too large to seal: refused at the limit, never cut
        return
    assert len(session_id) <= MAX_SEALED_ID
    assert is_valid_session_id(session_id), "a header value the proxy itself accepts"
    assert sealer.open(session_id) == session
    assert SessionSealer(OTHER_KEY).open(session_id) is None, "another key does not open it"
    index = position % len(session_id)
    tampered = session_id[:index] + replacement + session_id[index + 1 :]
    if tampered != session_id:
        assert sealer.open(tampered) is None
    assert sealer.open(session_id[:-1]) is None
    assert sealer.open(session_id + "A") is None


@given(garbage=st.text(max_size=300))
def test_garbage_never_opens_and_never_raises(garbage: str) -> None:
    assert SessionSealer(KEY).open(garbage) is None


def test_two_sessions_with_the_same_params_get_ids_that_differ_from_the_first_characters() -> None:
    sealer = SessionSealer(KEY)
    session = SealedSession("default", INITIALIZE_PARAMS, "2025-11-25")
    ids = [sealer.seal(session) for _ in range(200)]
    assert all(session_id is not None for session_id in ids)
    assert len({session_id[:8] for session_id in ids if session_id}) == 200, "logs show the first 8 characters"
    assert all(set(session_id[:32]) <= set("0123456789abcdef") for session_id in ids if session_id), "hex, as before"
    assert all(sealer.open(session_id) == session for session_id in ids if session_id)


def test_params_too_large_to_seal_are_not_sealed() -> None:
    icons = {"clientInfo": {"name": "x", "icons": [{"src": "data:image/png;base64," + os.urandom(900).hex()}]}}
    assert SessionSealer(KEY).seal(SealedSession("default", icons, None)) is None


# --- the key ----------------------------------------------------------------------------------------


def test_the_key_file_is_made_once_private_and_shared_by_processes_starting_together(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    keys = {key_from_file(directory) for _ in range(3)}
    (key,) = keys
    assert key is not None
    assert len(key) == 64
    assert stat.S_IMODE((directory / KEY_FILE_NAME).stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == [KEY_FILE_NAME], "no temporary file left behind"


async def test_proxies_starting_at_once_agree_on_one_key(tmp_path: Path) -> None:
    """Eight processes race to make the key file: every one reads the same key."""
    directory = tmp_path / "race"
    code = "import sys; from pathlib import Path; from mcp_heal_proxy.engine.sealing import key_from_file; "
    code += "print(key_from_file(Path(sys.argv[1])))"

    async def one() -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, str(directory), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        return out.decode().strip()

    keys = await asyncio.gather(*(one() for _ in range(8)))
    assert len(set(keys)) == 1
    assert keys[0] == (directory / KEY_FILE_NAME).read_text().strip()


def test_a_key_file_without_a_key_stops_the_proxy_rather_than_replacing_it(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).write_text("not a key\n")
    with pytest.raises(ValueError, match="does not hold a session key"):
        key_from_file(tmp_path)


def test_a_directory_that_cannot_hold_a_key_gives_none(tmp_path: Path) -> None:
    """The caller then seals with a key that dies with the process, and says so (session.key_not_kept)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert key_from_file(blocker / "state") is None


async def test_serve_stops_with_one_line_on_a_key_file_without_a_key(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).write_text("not a key\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_heal_proxy", "serve", "--upstream", "http://127.0.0.1:9/mcp",
        "--port", "0", "--state", str(tmp_path / "sessions.db"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2, stderr
    assert b"does not hold a session key: delete it (a new one is made) or set session_key" in stderr
    assert b"Traceback" not in stderr


def test_session_key_is_checked_masked_and_read_from_the_environment(tmp_path: Path) -> None:
    environ = {"MCP_HEAL_PROXY_SESSION_KEY": KEY}
    config = build_config(config_file=None, flags={"upstream": "http://127.0.0.1:1/mcp"}, environ=environ)
    assert config.session_key == KEY
    assert describe(config)["server"]["session_key"] == "***"
    assert KEY in config.secrets(), "never logged"
    with pytest.raises(ConfigError, match="at least 32 characters") as refused:
        build_config(
            config_file=None,
            flags={"upstream": "http://127.0.0.1:1/mcp"},
            environ={"MCP_HEAL_PROXY_SESSION_KEY": "short-secret"},
        )
    assert "short-secret" not in str(refused.value)
    file = tmp_path / "proxy.toml"
    file.write_text('[server]\nsession_key = "${SEALING}"\n[upstreams.a]\nurl = "http://127.0.0.1:1/mcp"\n')
    assert build_config(config_file=str(file), flags={}, environ={"SEALING": KEY}).session_key == KEY


def test_the_key_file_lives_beside_a_sqlite_state_file(tmp_path: Path) -> None:
    assert proxy_config("http://127.0.0.1:1/mcp", state=str(tmp_path / "s.db")).key_directory == tmp_path


# --- the store lost ------------------------------------------------------------------------------


async def test_an_sdk_client_session_outlives_a_redis_that_restarts_empty(
    sse_upstream: UpstreamProcess, tmp_path: Path
) -> None:
    """FLUSHALL between two calls of the official SDK client on one session: the second call succeeds
    through one heal (before: 404 "Session not found", which the SDK client never recovers from)."""
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with running(proxy_config(sse_upstream.url, state=redis.url)) as proxy:
            store = proxy.app[STORE_KEY]
            assert isinstance(store, RedisSessionStore)
            # Every read goes to Redis, as it does once the 1 s record cache has run out (or on another replica).
            store._cache_ttl = 0.0
            async with mcp_session(proxy.url) as session, asyncio.timeout(CALL_TIMEOUT):
                first = await session.call_tool("echo", {"text": "before"})
                assert isinstance(first.content[0], TextContent)
                client = Redis(host="127.0.0.1", port=redis.port)
                try:
                    await client.flushall()
                finally:
                    await client.aclose()
                second = await session.call_tool("echo", {"text": "after"})
                assert isinstance(second.content[0], TextContent)
                assert second.content[0].text == "after"
                third = await session.call_tool("echo", {"text": "again"})
                assert isinstance(third.content[0], TextContent)
            assert (await sse_upstream.stats())["initialize"] == 2, "one heal, and one only"
    finally:
        await redis.stop()


async def test_an_sdk_client_session_outlives_a_restart_of_a_proxy_that_keeps_sessions_in_memory(
    sse_upstream: UpstreamProcess,
) -> None:
    """``--state :memory:``: the proxy stops and another starts on the same port (same key) between two
    calls of the SDK client (before: 404 "Session not found")."""
    port = free_port()
    config = proxy_config(sse_upstream.url, state=":memory:")
    first: contextlib.AbstractAsyncContextManager[RunningProxy] | None = running(config, port)
    assert first is not None
    proxy = await first.__aenter__()
    try:
        async with mcp_session(proxy.url) as session, asyncio.timeout(CALL_TIMEOUT):
            before = await session.call_tool("echo", {"text": "before"})
            assert isinstance(before.content[0], TextContent)
            memory = proxy.app[STORE_KEY]
            assert isinstance(memory, MemorySessionStore)
            (session_id,) = [record.client_session_id for record in memory.records()]
            stopping, first = first, None
            await stopping.__aexit__(None, None, None)
            async with running(config, port) as restarted:
                after = await session.call_tool("echo", {"text": "after"})
                assert isinstance(after.content[0], TextContent)
                assert after.content[0].text == "after"
                record = await restarted.record(session_id)
                assert record is not None
                assert record.generation == 1
    finally:
        if first is not None:
            await first.__aexit__(None, None, None)
    assert (await sse_upstream.stats())["initialize"] == 2, "one heal, and one only"


async def test_a_session_id_carries_over_to_another_proxy_with_the_same_key(
    json_upstream: UpstreamProcess, http: aiohttp.ClientSession
) -> None:
    """Two in-process proxies with one key, each with its own memory store: the id one issued works on the
    other, concurrent requests included, through one heal; the restore is counted and logged."""
    config = proxy_config(json_upstream.url, state=":memory:")
    async with running(config) as before, running(config) as after:
        session_id = await raw_initialize(http, before.url)
        status, answer = await echo(http, before.url, session_id, 1)
        assert (status, echoed(answer)) == (200, "call 1")
        results = await asyncio.gather(*(echo(http, after.url, session_id, n) for n in range(2, 10)))
        assert [(status, echoed(answer)) for status, answer in results] == [(200, f"call {n}") for n in range(2, 10)]
        assert (await json_upstream.stats())["initialize"] == 2, "eight requests on the lost session, one heal"
        status, answer = await echo(http, after.url, session_id, 10)
        assert (status, echoed(answer)) == (200, "call 10")
        assert (await json_upstream.stats())["initialize"] == 2
        record = await after.record(session_id)
        assert record is not None
        assert record.generation == 1
        assert record.initialize_params == INITIALIZE_PARAMS
        assert record.protocol_version == "2025-11-25"
        async with http.get(after.url.replace("/mcp", "/metrics")) as response:
            metrics = await response.text()
        assert 'mcp_heal_proxy_sessions_restored_total{upstream="default"} 1.0' in metrics


async def test_a_session_outlives_its_deleted_sqlite_file(
    json_upstream: UpstreamProcess, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The SQLite file is deleted while the proxy is down; without session_key, the key kept beside the
    file (session.key) opens the id after the restart."""
    state = tmp_path / "sessions.db"
    config = proxy_config(json_upstream.url, state=str(state), session_key=None)
    async with running(config) as proxy:
        session_id = await raw_initialize(http, proxy.url)
        assert (await echo(http, proxy.url, session_id, 1))[0] == 200
    assert (tmp_path / KEY_FILE_NAME).exists()
    await asyncio.to_thread(delete_files, tmp_path, "sessions.db*")
    async with running(config) as proxy:
        status, answer = await echo(http, proxy.url, session_id, 2)
        assert (status, echoed(answer)) == (200, "call 2")
        assert state.exists()
    assert (await json_upstream.stats())["initialize"] == 2


# --- ids the proxy did not issue, sessions it ended ------------------------------------------------


async def test_forged_and_tampered_ids_get_404_and_never_reach_the_upstream(
    json_upstream: UpstreamProcess, http: aiohttp.ClientSession
) -> None:
    config = proxy_config(json_upstream.url, state=":memory:")
    async with running(config) as proxy:
        issued = await raw_initialize(http, proxy.url)
        nonce, payload, tag = issued.split(".")
        forged = SessionSealer(OTHER_KEY).seal(SealedSession("default", INITIALIZE_PARAMS, "2025-11-25"))
        assert forged is not None
        flipped = "A" if payload[5] != "A" else "B"
        candidates = [
            forged,  # sealed with another key
            f"{nonce}.{payload[:5]}{flipped}{payload[6:]}.{tag}",  # the payload altered
            f"{nonce[:-1]}{'A' if nonce[-1] != 'A' else 'B'}.{payload}.{tag}",  # the nonce altered
            f"{nonce}.{payload}",  # no tag
            "0123456789abcdef0123456789abcdef",  # an unsealed id of an older version
        ]
        initializes = (await json_upstream.stats())["initialize"]
        for index, session_id in enumerate(candidates):
            status, answer = await echo(http, proxy.url, session_id, 100 + index)
            assert status == 404, session_id
            assert answer["id"] == 100 + index
            assert answer["error"]["message"] == "Session not found"
            assert await proxy.record(session_id) is None
        assert (await json_upstream.stats())["initialize"] == initializes, "no heal for an id the proxy did not issue"
        assert (await echo(http, proxy.url, issued, 1))[0] == 200


async def test_an_id_issued_for_another_upstream_path_gets_404(
    json_upstream: UpstreamProcess, http: aiohttp.ClientSession
) -> None:
    upstreams = tuple(
        UpstreamConfig(url=json_upstream.url, name=name, path=f"/{name}/mcp", client=cast(UpstreamClient, TEST_CLIENT))
        for name in "ab"
    )
    config = ProxyConfig(upstreams=upstreams, state=":memory:", session_key=KEY)
    async with running(config) as before:
        base = before.url.removesuffix("/mcp")
        session_id = await raw_initialize(http, f"{base}/a/mcp")
        assert (await echo(http, f"{base}/b/mcp", session_id, 1))[0] == 404, "known to the store, on another path"
    async with running(config) as after:
        base = after.url.removesuffix("/mcp")
        status, answer = await echo(http, f"{base}/b/mcp", session_id, 2)
        assert (status, answer["error"]["message"]) == (404, "Session not found"), "lost, on another path"
        assert await after.app[STORE_KEY].get(session_id) is None
        assert (await echo(http, f"{base}/a/mcp", session_id, 3))[0] == 200


async def test_a_deleted_session_is_not_brought_back_by_its_sealed_id(
    json_upstream: UpstreamProcess, http: aiohttp.ClientSession
) -> None:
    config = proxy_config(json_upstream.url, state=":memory:")
    async with running(config) as before:
        session_id = await raw_initialize(http, before.url)
    async with running(config) as after:
        async with http.delete(after.url, headers=session_headers(session_id)) as response:
            assert response.status == 200, "a restored session can be ended"
        status, answer = await echo(http, after.url, session_id, 1)
        assert (status, answer["error"]["message"]) == (404, "Session not found")


async def test_a_get_stream_is_reattached_to_a_session_the_store_lost(
    sse_upstream: UpstreamProcess, tmp_path: Path
) -> None:
    """Redis restarts empty, then the upstream restarts and ends the SDK client's GET stream: the proxy
    restores the session and reattaches the stream on the healed session (before: the stream ended, as
    for a session the client had ended)."""
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with running(proxy_config(sse_upstream.url, state=redis.url)) as proxy:
            store = proxy.app[STORE_KEY]
            assert isinstance(store, RedisSessionStore)
            store._cache_ttl = 0.0  # every read goes to Redis (see above)
            with capture_logs() as logs:
                async with mcp_session(proxy.url) as session, asyncio.timeout(CALL_TIMEOUT):
                    await session.call_tool("echo", {"text": "before"})
                    client = Redis(host="127.0.0.1", port=redis.port)
                    try:
                        await client.flushall()
                    finally:
                        await client.aclose()
                    await sse_upstream.restart()

                    def reattached() -> bool:
                        return any(entry["event"] == "stream.reattached" for entry in logs)

                    await wait_until(reattached, 15, "the GET stream reattached")
                    after = await session.call_tool("echo", {"text": "after"})
                    assert isinstance(after.content[0], TextContent)
                    assert after.content[0].text == "after"
            events = [entry["event"] for entry in logs]
            assert events.count("session.restored") == 1
            assert (await sse_upstream.stats())["initialize"] == 1, "the restarted upstream: one heal"
    finally:
        await redis.stop()


async def test_a_store_lost_while_a_request_finds_its_upstream_session_dead_heals_instead_of_404(
    fake: tuple[FakeUpstream, str], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Redis restarts empty between the request's read of the session and its heal (a whole node restarted:
    Redis and the upstream together): the heal restores the session from its id (before: 404)."""
    upstream, url = fake
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with running(proxy_config(url, state=redis.url)) as proxy:
            session_id = await raw_initialize(http, proxy.url)

            async def lose_everything_once(request: web.Request, body: Any) -> web.StreamResponse | None:
                upstream.on_request = None
                client = Redis(host="127.0.0.1", port=redis.port)
                try:
                    await client.flushall()
                finally:
                    await client.aclose()
                upstream.forget_all()
                return await answer_404(request, body)

            upstream.on_request = lose_everything_once
            status, answer = await echo(http, proxy.url, session_id, 1)
            assert status == 200, answer
            assert upstream.initializes == 2, "one heal"
            record = await proxy.app[STORE_KEY].get(session_id, fresh=True)
            assert record is not None
            assert record.generation == 1
    finally:
        await redis.stop()


async def test_a_redis_store_without_session_key_says_replicas_need_one(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    _, url = fake
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        for session_key, said in ((None, True), (KEY, False)):
            with capture_logs() as logs:
                async with running(proxy_config(url, state=redis.url, session_key=session_key)):
                    pass
            events = [entry for entry in logs if entry["event"] == "session.key_file"]
            assert bool(events) == said
            assert all(KEY not in str(entry) for entry in logs)
    finally:
        await redis.stop()
