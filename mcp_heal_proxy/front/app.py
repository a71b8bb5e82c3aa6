"""Builds the aiohttp application: routes, and the resources that live as long as the app."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mcp_heal_proxy.auth.managed import managed_auth
from mcp_heal_proxy.auth.standin import OAuthPassThrough
from mcp_heal_proxy.config import MEMORY_STATE, ConfigError, ProxyConfig
from mcp_heal_proxy.engine.endings import SessionEndings
from mcp_heal_proxy.engine.healing import Healer
from mcp_heal_proxy.engine.housekeeping import SessionActivity, flush, run_housekeeping
from mcp_heal_proxy.engine.sealing import KEY_FILE_NAME, SessionSealer, key_from_file
from mcp_heal_proxy.engine.session import SessionEngine
from mcp_heal_proxy.front.guards import Cors, front_door
from mcp_heal_proxy.front.http import Proxy, ProxySettings
from mcp_heal_proxy.front.http1 import FastPath
from mcp_heal_proxy.observability import Metrics, method_label
from mcp_heal_proxy.status import ENDINGS_KEY, add_routes
from mcp_heal_proxy.store.records import DEFAULT_HEAL_LOCK_TTL, MemorySessionStore, SessionStore
from mcp_heal_proxy.store.sqlite import SQLiteSessionStore
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.client import Upstream

if TYPE_CHECKING:
    from mcp_heal_proxy.otel import Telemetry

log = structlog.get_logger("mcp_heal_proxy.front.app")

PROXIES_KEY = web.AppKey("proxies", dict[str, Proxy])
# What the proxy's own HTTP/1.1 server needs of the app (front/http1.py), once the app has started.
FAST_PATH_KEY: web.AppKey[Callable[[], FastPath]] = web.AppKey("fast_path")
STORE_KEY = web.AppKey("store", SessionStore)


# A heal holds the store's heal lock for its handshake (bounded by heal_timeout) plus a few store reads and
# one write: the lock must outlive the longest heal, or another replica could heal the same generation.
HEAL_LOCK_MARGIN: Final = 10.0


def heal_lock_ttl(config: ProxyConfig) -> float:
    """How long a Redis heal lock lives: the longest heal_timeout of the upstreams, plus a margin."""
    longest = max((upstream.heal_timeout for upstream in config.upstreams), default=0.0)
    return max(DEFAULT_HEAL_LOCK_TTL, longest + HEAL_LOCK_MARGIN)


async def open_store(state: str, *, heal_lock_ttl: float = DEFAULT_HEAL_LOCK_TTL) -> SessionStore:
    """The session store named by ``--state``: memory, a Redis URL, or a SQLite file path."""
    if state == MEMORY_STATE:
        return MemorySessionStore()
    if state.startswith(("redis://", "rediss://")):
        # Imported here: the redis package is needed only by those who choose a Redis store.
        from mcp_heal_proxy.store.redis import RedisSessionStore

        redis_store = RedisSessionStore(state, lock_ttl=heal_lock_ttl)
        await redis_store.open()
        return redis_store
    store = SQLiteSessionStore(state)
    await store.open()
    return store


def session_sealer(config: ProxyConfig) -> SessionSealer:
    """What seals client session ids: session_key when set, else the key file beside the state (made the
    first time). A directory that cannot hold one leaves a key that dies with the process: sessions then
    do not outlive a restart, and the log says how to fix that."""
    if config.session_key:
        return SessionSealer(config.session_key)
    directory = config.key_directory
    try:
        key = key_from_file(directory)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if key is None:
        log.warning(
            "session.key_not_kept",
            directory=str(directory),
            hint="client sessions will not outlive a restart of this proxy; set session_key",
        )
        return SessionSealer.ephemeral()
    if config.state.startswith(("redis://", "rediss://")):
        # Each replica would make a key of its own, and refuse the others' ids once Redis lost the sessions.
        log.info(
            "session.key_file",
            path=str(directory / KEY_FILE_NAME),
            hint="replicas sharing this Redis must all set one session_key",
        )
    return SessionSealer(key)


def build_app(config: ProxyConfig, otel: Telemetry | None = None) -> web.Application:
    """The proxy as an aiohttp application: one MCP endpoint per upstream, plus health and metrics.

    ``otel``: OpenTelemetry's hooks (a test's, with its own exporter); with none given and ``otel = true``,
    the proxy's own from the OTEL_* variables, shut down (pending spans exported) when the app ends."""
    owned = None
    if otel is None and config.otel:
        from mcp_heal_proxy.otel import from_environment

        otel = owned = from_environment(transport="tcp", propagate_proxy=config.otel_propagate == "proxy")
    metrics = Metrics(otel)
    upstream_names = {upstream.path: upstream.name for upstream in config.upstreams}

    def refused(request: web.Request, status: int) -> None:
        """A request a guard refused: logged and counted like every other (no header values logged)."""
        upstream = upstream_names.get(request.path, "-")
        label = method_label(request.method)
        metrics.requests.labels(upstream, label, str(status)).inc()
        log.info("request", upstream=upstream, method=label, path=request.path, status=status, refused=True)

    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[front_door(config.allowed_origins, config.token, refused, [u.path for u in config.upstreams])],
    )
    settings = ProxySettings(
        max_body_bytes=config.max_body_bytes,
        keepalive_interval=config.keepalive_interval,
        max_sessions=config.max_sessions,
        max_streams_per_session=config.max_streams_per_session,
        stream_slot_wait=config.stream_slot_wait,
    )

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        # One exit per resource, entered in order and left in reverse: a teardown that fails does not
        # skip the ones after it (the store is closed even when an upstream's close raised).
        async with contextlib.AsyncExitStack() as resources:
            if owned is not None:
                # Left last: the spans of calls that ended during the stop are exported before the exit.
                resources.push_async_callback(asyncio.to_thread, owned.shutdown)
            store = await open_store(config.state, heal_lock_ttl=heal_lock_ttl(config))
            resources.push_async_callback(store.close)
            # After the store: an unusable state path is reported as the store's problem, in one line.
            sealer = session_sealer(config)
            app[STORE_KEY] = store
            activity = SessionActivity()
            # Last-use marks since the last flush are written before the store closes (callbacks run
            # in reverse: this one before store.close).
            resources.push_async_callback(flush, store, activity, config.session_idle_ttl)
            metrics.open_sessions.set_function(lambda: len(store))
            proxies: dict[str, Proxy] = {}
            endings = SessionEndings(metrics)
            for upstream_config in config.upstreams:
                upstream = Upstream(
                    upstream_config,
                    strip_client_authorization=config.token is not None,
                    auth=managed_auth(upstream_config, config.state),
                )
                upstream.on_lasting_failure = functools.partial(metrics.events.upstream_failed, upstream_config.name)
                resources.push_async_callback(upstream.close)
                healer = Healer(upstream, store, metrics)
                resources.push_async_callback(healer.close)
                engine = SessionEngine(
                    upstream,
                    store,
                    healer,
                    metrics,
                    activity,
                    max_sessions=config.max_sessions,
                    endings=endings,
                    sealer=sealer,
                )
                proxies[upstream_config.path] = Proxy(engine, metrics, settings)
            app[PROXIES_KEY] = proxies
            app[ENDINGS_KEY] = endings
            # Before the upstream clients close (callbacks run in reverse): their DELETEs stop first.
            resources.push_async_callback(endings.close)
            tasks = TaskOwner()
            resources.push_async_callback(tasks.close)
            tasks.spawn(run_housekeeping(store, activity, config.session_idle_ttl, endings), name="housekeeping")
            yield

    app.cleanup_ctx.append(lifetime)

    async def end_server_streams(app: web.Application) -> None:
        for proxy in app[PROXIES_KEY].values():
            proxy.end_server_streams()

    app.on_shutdown.append(end_server_streams)

    def proxy_for(request: web.Request) -> Proxy:
        return request.app[PROXIES_KEY][request.path]

    async def post(request: web.Request) -> web.StreamResponse:
        return await proxy_for(request).post(request)

    # With an inbound token the client's Authorization is the proxy's own: nothing to pass through.
    oauth = OAuthPassThrough(config) if config.token is None else None
    if oauth is not None and oauth.enabled:
        oauth.install(app)
    else:
        oauth = None

    def fast_path() -> FastPath:
        proxies = app[PROXIES_KEY]
        return FastPath(proxies, token=config.token, max_body_bytes=config.max_body_bytes, oauth=oauth)

    app[FAST_PATH_KEY] = fast_path

    async def get(request: web.Request) -> web.StreamResponse:
        if oauth is not None:
            challenge = await oauth.challenge_for_probe(request)
            if challenge is not None:
                return challenge
        return await proxy_for(request).get(request)

    async def delete(request: web.Request) -> web.StreamResponse:
        return await proxy_for(request).delete(request)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = STORE_KEY in request.app and PROXIES_KEY in request.app
        return web.json_response({"status": "ready" if ready else "starting"}, status=200 if ready else 503)

    async def metrics_page(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    cors = Cors(config.allowed_origins)
    app.on_response_prepare.append(cors.on_response_prepare)
    for upstream_config in config.upstreams:
        app.router.add_route("OPTIONS", upstream_config.path, cors.preflight)
        app.router.add_post(upstream_config.path, post)
        app.router.add_get(upstream_config.path, get, allow_head=False)
        app.router.add_delete(upstream_config.path, delete)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    add_routes(app, config, metrics.events, STORE_KEY)  # the status page and its JSON (status.py)
    return app
