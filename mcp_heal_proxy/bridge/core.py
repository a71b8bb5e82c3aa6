"""A bridged session: a handshake-era client's session that the proxy holds itself, in front of a
2026-07-28-only upstream (which has no sessions).

The proxy answers ``initialize`` from ``server/discover`` and mints the session (its record in the store,
marked by ``BRIDGED`` as its upstream session id, so it survives a proxy restart); every later request
goes upstream as one modern POST; ``ping``, ``logging/setLevel`` and ``resources/subscribe`` are
answered here (the level and the subscriptions go into the record, the level on every later request);
``input_required`` results become requests to the client (``elicitation/create``, ...) whose answers
are sent back with ``inputResponses`` and ``requestState``; the session's GET stream is fed from
``subscriptions/listen``. Front-independent: both fronts take the messages each call yields (None: a
silence long enough for a keep-alive) and write them their own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiohttp
import structlog

from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.bridge.era import (
    BRIDGED,
    HEADER_MISMATCH,
    MODERN_VERSION,
    UNSUPPORTED_VERSION,
    EraState,
    modern_error,
    speaks_legacy,
)
from mcp_heal_proxy.bridge.wire import (
    LIST_CHANGED,
    clean_notification,
    clean_result,
    clean_tools,
    envelope,
    error_message,
    initialize_result,
    listen_filter,
    modern_body,
    modern_headers,
    param_headers,
)
from mcp_heal_proxy.engine.answers import IDLE, AnswerStream, Ending, answered_ids
from mcp_heal_proxy.engine.state import SET_LEVEL, SUBSCRIBE, UNSUBSCRIBE, StateChange
from mcp_heal_proxy.errors import AnswerTooLarge, ProxyError, UpstreamUnavailable
from mcp_heal_proxy.observability import Metrics
from mcp_heal_proxy.store.records import SessionRecord
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.client import INSPECT_LIMIT, read_capped
from mcp_heal_proxy.wire.headers import upstream_request_headers
from mcp_heal_proxy.wire.jsonrpc import Message, PostBody

if TYPE_CHECKING:
    from mcp_heal_proxy.engine.session import Opened, SessionEngine

log = structlog.get_logger("mcp_heal_proxy.bridge")

# Client headers never sent upstream on a bridged request: the proxy sets the modern ones itself.
_DROP: Final = ("mcp-protocol-version", "last-event-id", "accept", "content-type", "mcp-method", "mcp-name")
# Requests that cannot run a tool: resent when a connection broke before any answer (a restart).
_RESENDABLE: Final = frozenset(
    {
        "server/discover",
        "tools/list",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "completion/complete",
        "subscriptions/listen",
    }
)
# Answered by the proxy: the upstream has no such methods (2026-07-28 removed them).
_LOCAL: Final = frozenset({"ping", SET_LEVEL, SUBSCRIBE, UNSUBSCRIBE})
# Rounds of input_required before the proxy gives up (the Python and TypeScript SDKs use 10).
INPUT_ROUNDS: Final = 10
# The largest answer read whole (a JSON answer, one SSE message).
_MAX_MESSAGE: Final = 16 * 1024 * 1024
# The JSON-RPC error of a bridged call whose session ended under it (as for a session the proxy forgot).
SESSION_ENDED: Final = -32001
_BROKEN: Final = "upstream MCP server broke the stream before answering; the request was not replayed (it may have run)"
# A GET stream fed from subscriptions/listen: reopened with backoff when it drops.
_LISTEN_FIRST: Final = 0.25
_LISTEN_MAX: Final = 30.0
_LISTEN_LIVED: Final = 30.0
# How often a listen stream looks whether its filter changed or the proxy stops.
_LISTEN_TICK: Final = 1.0


class UpstreamChallenge(ProxyError):
    """The upstream asked for credentials (401/403 with a challenge): the HTTP front passes it on as is."""

    http_status = 401

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"upstream MCP server answered {status}")
        self.status = status
        self.headers = dict(headers)
        self.body = body


class BridgeGone(ProxyError):
    """The upstream stopped answering as a 2026-07-28-only server does: the bridged session ends (404, so
    that the client initializes again and the proxy looks at the upstream's era again). ``what``: what
    the upstream answered."""

    http_status = 404
    code = -32001

    def __init__(self, what: str) -> None:
        super().__init__(f"upstream MCP server no longer answers as a 2026-07-28 server ({what}); initialize again")
        self.what = what


@dataclass(frozen=True, slots=True)
class BridgedOpen:
    """A bridged initialize: the new session's record and the proxy's answer."""

    record: SessionRecord
    answer: dict[str, Any]


def is_bridged(record: SessionRecord) -> bool:
    """Whether a session is one the proxy holds itself in front of a modern-only upstream."""
    return record.upstream_session_id == BRIDGED


class Bridge:
    """One upstream's bridged sessions (built by its SessionEngine, used by both fronts)."""

    def __init__(self, engine: SessionEngine, metrics: Metrics) -> None:
        self._engine = engine
        self.upstream = engine.upstream
        self.name = engine.name
        self._bridged = metrics.sessions_bridged.labels(engine.name)
        self.era = EraState(engine.name, engine.config.era, functools.partial(_show_era, metrics, engine.name))
        self._capabilities: dict[str, Any] = {}
        self._schemas: dict[str, object] = {}
        self._ids = itertools.count(1)
        # Input requests sent to clients, by (client session, the id the proxy gave the request).
        self._inputs: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        # The calls running, by (client session, request id as text): stopped by a cancel or the session's end.
        self._cancels: dict[tuple[str, str], _Running] = {}
        # The GET streams (subscriptions/listen) being served, by client session.
        self._listening: dict[str, _Listening] = {}
        # Calls whose client left before their response, read to their end (see _drain).
        self._drains = TaskOwner()
        self._draining: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Sessions whose client opened a GET stream here (a later one reopens after a gap).
        self._listened: set[str] = set()
        self._started = time.time()
        self._closing = asyncio.Event()

    # --- initialize ---------------------------------------------------------------------------------

    async def open(self, client_headers: Mapping[str, str], body: PostBody) -> Opened | BridgedOpen:
        """A client's initialize: bridged when the upstream is known modern-only, else forwarded as always;
        an upstream that refuses it as a modern-only server does is bridged then."""
        init = body.initialize
        assert init is not None
        if self.era.bridges:
            bridged = await self.initialize(client_headers, init)
            if bridged is not None:
                return bridged
        opened = await self._engine.initialize(client_headers, body)
        answer = opened.answer
        if opened.record is not None:
            self.era.learn("legacy", "initialize accepted")  # a legacy or dual-era upstream
            return opened
        if answer.status != 400 or not self.era.may_bridge:
            return opened
        try:
            raw = await answer.read_whole(INSPECT_LIMIT)
        except ProxyError:
            answer.release()
            raise
        answer.release()
        error = modern_error(answer.status, answer.decoded(raw))
        if error is not None and not speaks_legacy(error):
            bridged = await self.initialize(client_headers, init, why=f"initialize refused with {error.get('code')}")
            if bridged is not None:
                return bridged
        # Not modern-only after all: the refusal goes to the client, from the bytes read.
        return type(opened)(_read_again(answer, (init.id,), raw), None)

    async def adopt(
        self, client_headers: Mapping[str, str], record: SessionRecord, answer: AnswerStream
    ) -> SessionRecord | AnswerStream:
        """A request on a handshake-era session refused with 400: when the refusal is a modern error and the
        upstream answers server/discover, the upstream turned 2026-07-28-only under the session, which
        becomes a bridged one (returned: the request, refused unrun, goes again through the bridge).
        Else the answer, from the bytes read, for the front to relay."""
        try:
            raw = await answer.read_whole(INSPECT_LIMIT)
        finally:
            answer.release()
        error = modern_error(answer.status, answer.decoded(raw))
        if error is not None and not speaks_legacy(error) and await self.discover(client_headers) is not None:
            self.era.learn("modern", f"a session's request refused with {error.get('code')}")
            adopted = await self._engine.store.apply(record.client_session_id, _bridged_now)
            if adopted is not None and is_bridged(adopted):
                # Its client's next GET follows a gap (the legacy stream ended): list changes were lost.
                self._listened.add(record.client_session_id)
                self._bridged.inc()
                log.info(
                    "session.bridged", upstream=self.name, client_session=record.client_session_id[:8], adopted=True
                )
                return adopted
        return _read_again(answer, answer.unanswered, raw)

    async def initialize(self, client_headers: Mapping[str, str], init: Message, why: str = "") -> BridgedOpen | None:
        """Answer an initialize from server/discover and mint the session; None when the upstream does not
        answer discover (not modern: the initialize goes upstream)."""
        discover = await self.discover(client_headers)
        if discover is None:
            self.era.forget("server/discover refused")
            return None
        if why:
            self.era.learn("modern", why)
        await self._engine.make_room()
        params = dict(init.params or {})
        result = initialize_result(discover, params.get("protocolVersion"))
        version = result["protocolVersion"]
        record = SessionRecord(
            client_session_id=self._engine.new_client_session_id(params, version, bridged=True),
            upstream_session_id=BRIDGED,
            initialize_params=params,
            upstream=self.name,
            protocol_version=version,
            upstream_protocol_version=MODERN_VERSION,
        )
        await self._engine.store.create(record)
        self._bridged.inc()
        log.info("session.bridged", upstream=self.name, client_session=record.client_session_id[:8], version=version)
        return BridgedOpen(record, {"jsonrpc": "2.0", "id": init.id, "result": result})

    async def discover(self, client_headers: Mapping[str, str]) -> dict[str, Any] | None:
        """The upstream's server/discover result, or None when it is not a modern server's answer."""
        params = {"_meta": envelope({}, None)}
        try:
            response = await self.upstream.send(
                "POST",
                self._headers(client_headers, "server/discover", params),
                modern_body(0, "server/discover", params),
                resendable=True,
            )
        except ProxyError as exc:
            log.info("bridge.discover_failed", upstream=self.name, error=exc.message)
            return None
        try:
            if response.status in (401, 403):
                # Credentials first: the initialize then goes upstream, and its challenge reaches the
                # client as without the bridge (its OAuth flow starts; the next initialize looks again).
                log.info("bridge.discover_failed", upstream=self.name, status=response.status)
                return None
            raw = await read_capped(response)
        except ProxyError as exc:
            log.info("bridge.discover_failed", upstream=self.name, error=exc.message)
            return None
        finally:
            response.release()
        try:
            payload = json.loads(raw) if response.status == 200 else None
        except (ValueError, RecursionError):
            payload = None
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, dict) or not isinstance(result.get("supportedVersions"), list):
            return None
        if MODERN_VERSION not in result["supportedVersions"]:
            return None
        capabilities = result.get("capabilities")
        self._capabilities = dict(capabilities) if isinstance(capabilities, dict) else {}
        return result

    # --- requests -----------------------------------------------------------------------------------

    def take(self, record: SessionRecord, body: PostBody) -> bool:
        """A client's answers to the proxy's input requests: handed to the call waiting for them. True when
        every message of the body was one."""
        try:
            payload = json.loads(body.raw)
        except (ValueError, RecursionError):
            return False
        taken = True
        for item in payload if isinstance(payload, list) else [payload]:
            request_id = item.get("id") if isinstance(item, dict) else None
            waiter = self._inputs.get((record.client_session_id, str(request_id)))
            if waiter is None or waiter.done() or ("result" not in item and "error" not in item):
                taken = False
                continue
            waiter.set_result(item)
        return taken

    async def call(
        self, client_headers: Mapping[str, str], record: SessionRecord, message: Message, idle: float
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """One client request, bridged: yields the messages for the client (notifications, input requests,
        the response last), and None after ``idle`` seconds of silence. A ``notifications/cancelled`` for
        it (``cancel``) ends it at once without a response, closing its upstream stream (the 2026-07-28
        cancellation). Closed before its response without one (its client left: a dropped stream is no
        cancellation), the upstream answer is read to its end in the background and discarded."""
        key = (record.client_session_id, str(message.id))
        running = self._cancels[key] = _Running()
        messages = self._call(client_headers, record, message, idle)
        steps = TaskOwner()
        step: asyncio.Task[dict[str, Any] | _End | None] | None = None
        done = False  # answered, cancelled, stopped or failed: nothing upstream is left to read
        try:
            while True:
                step = steps.spawn(_next(messages), name="bridge-step")
                if not await _first_or_set(step, running.stop):
                    done = True
                    if running.ended is not None:
                        # The session ended under the call: its client still gets an answer with its id.
                        yield error_message(message.id, SESSION_ENDED, running.ended)
                        return
                    log.info("bridge.call_cancelled", upstream=self.name, client_session=key[0][:8])
                    return
                if step.cancelled():
                    done = True  # cancelled from inside: the client still gets an answer with its id
                    yield error_message(message.id, SESSION_ENDED, "the proxy stopped the request")
                    return
                try:
                    item = step.result()
                except BaseException:
                    done = True
                    raise
                step = None
                if isinstance(item, _End):
                    done = True
                    return
                # Its response, or an input request (the upstream answer asking is complete: nothing is open
                # upstream while the client is asked): a close right after it leaves nothing to read.
                done = item is not None and "id" in item
                yield item
                done = False
        finally:
            if self._cancels.get(key) is running:
                del self._cancels[key]
            if done or running.stop.is_set() or self._closing.is_set():
                await steps.close()  # closes the upstream answer being read: the modern cancellation
                await messages.aclose()
            else:
                drain = self._drains.spawn(self._drain(key, messages, step, steps), name="bridge-drain")
                self._draining[key] = drain
                drain.add_done_callback(functools.partial(_forget_drain, self._draining, key))

    async def _drain(
        self,
        key: tuple[str, str],
        messages: AsyncGenerator[dict[str, Any] | None, None],
        step: asyncio.Task[dict[str, Any] | _End | None] | None,
        steps: TaskOwner,
    ) -> None:
        """A call whose client left before its response: read the upstream answer to its end (closing
        it would cancel the call on a 2026-07-28 server), bounded by read_timeout, and discard it. An input
        request ends it: nobody is left to answer, and the upstream holds nothing while it asks."""
        outcome = "answered"
        try:
            async with asyncio.timeout(self.upstream.config.read_timeout):
                item = await step if step is not None else await _next(messages)
                while not isinstance(item, _End) and (item is None or "id" not in item):
                    item = await _next(messages)
        except TimeoutError:
            outcome = "read_timeout"
        except ProxyError as exc:
            outcome = exc.message
        finally:
            await steps.close()
            await messages.aclose()
        log.info("bridge.call_drained", upstream=self.name, client_session=key[0][:8], outcome=outcome)

    def cancel(self, record: SessionRecord, params: Mapping[str, Any] | None) -> None:
        """A client's notifications/cancelled: end the call it names, if it runs."""
        request_id = (params or {}).get("requestId")
        running = self._cancels.get((record.client_session_id, str(request_id)))
        if running is not None:
            running.stop.set()

    async def _call(
        self, client_headers: Mapping[str, str], record: SessionRecord, message: Message, idle: float
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        method = message.method
        assert method is not None
        if method in _LOCAL:
            yield await self._local(record, message)
            return
        params = dict(message.params or {})
        client_meta = params.pop("_meta", None)
        retried: set[int] = set()
        rounds = 0
        links: list[str] = []
        while True:
            current = await self._engine.store.get(record.client_session_id) or record
            sent = {**params, "_meta": envelope(current.initialize_params, current.log_level, client_meta)}
            final: dict[str, Any] | None = None
            try:
                async with contextlib.aclosing(self._send(client_headers, method, sent, idle)) as answer:
                    async for item in answer:
                        if item is not None and item.get("id") == _FINAL:
                            final = item
                            break
                        yield item
            except (UpstreamChallenge, BridgeGone):
                raise
            except ProxyError as exc:
                yield error_message(message.id, exc.code, exc.message)
                return
            if final is None:
                yield error_message(message.id, UpstreamUnavailable.code, _BROKEN)
                return
            error = final.get("error")
            if isinstance(error, dict):
                code = error.get("code")
                if code == UNSUPPORTED_VERSION and speaks_legacy(error):
                    # The upstream speaks a handshake-era version now: the bridge ends.
                    self.era.forget("-32022 naming a handshake-era version to a bridged request")
                    raise BridgeGone("-32022 naming a handshake-era version")
                if code == UNSUPPORTED_VERSION and code not in retried:
                    # The upstream moved: look at it again, and retry once if it still speaks 2026-07-28.
                    retried.add(code)
                    if await self.discover(client_headers) is not None:
                        continue
                    self.era.forget("-32022 to a bridged request, server/discover refused")
                    raise BridgeGone("-32022, and server/discover failed")
                if code == HEADER_MISMATCH and method == "tools/call" and code not in retried:
                    # The tool's x-mcp-header annotations changed: list tools again, retry once.
                    retried.add(code)
                    await self._refresh_tools(client_headers, current)
                    continue
                yield {"jsonrpc": "2.0", "id": message.id, "error": error}
                return
            result = final.get("result")
            if not isinstance(result, dict):
                yield error_message(message.id, UpstreamUnavailable.code, "upstream MCP server answered no result")
                return
            kind = result.get("resultType", "complete")
            if kind == "input_required":
                rounds += 1
                if rounds > INPUT_ROUNDS:
                    yield error_message(
                        message.id, -32603, f"upstream MCP server asked for input more than {INPUT_ROUNDS} times"
                    )
                    return
                responses: dict[str, Any] = {}
                requests = result.get("inputRequests")
                asking = requests if isinstance(requests, dict) else {}
                # Closed with the call (its client left mid-question): the input requests go with it.
                async with contextlib.aclosing(self._ask(record, asking, responses, idle, links)) as questions:
                    async for item in questions:
                        yield item
                if isinstance(requests, dict) and len(responses) < len(requests):
                    # The client refused (its error goes back as the request's) or never answered.
                    refusal = responses.get("")
                    if isinstance(refusal, dict):
                        yield {"jsonrpc": "2.0", "id": message.id, "error": refusal}
                    else:
                        yield error_message(
                            message.id, -32603, "the client did not answer the server's request in time"
                        )
                    return
                params = {k: v for k, v in params.items() if k not in ("inputResponses", "requestState")}
                if responses:
                    params["inputResponses"] = responses
                if isinstance(result.get("requestState"), str):
                    params["requestState"] = result["requestState"]
                if not responses:
                    await asyncio.sleep(min(0.05 * 2**rounds, 1.0))  # state only: the server is not ready yet
                continue
            if kind != "complete":
                yield error_message(message.id, -32603, f"upstream MCP server answered an unknown resultType {kind!r}")
                return
            for link in links:
                # What 2025-11-25 says once a URL-mode interaction is done: the call that needed it is.
                yield {
                    "jsonrpc": "2.0",
                    "method": "notifications/elicitation/complete",
                    "params": {"elicitationId": link},
                }
            cleaned = clean_result(result)
            if method == "tools/list":
                cleaned, schemas = clean_tools(cleaned)
                self._schemas.update(schemas)
            yield {"jsonrpc": "2.0", "id": message.id, "result": cleaned}
            return

    async def _ask(
        self,
        record: SessionRecord,
        requests: Mapping[str, Any],
        responses: dict[str, Any],
        idle: float,
        links: list[str],
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """Send the upstream's input requests to the client and collect its answers into ``responses``
        (a refusal: under the key "", and the loop stops). A URL-mode elicitation gets the
        ``elicitationId`` 2025-11-25 requires (2026-07-28 has none); the ids the client accepted go into
        ``links``, to be told complete when the call is."""
        loop = asyncio.get_running_loop()
        waiting: list[tuple[str, tuple[str, str], asyncio.Future[dict[str, Any]], object]] = []
        cid = record.client_session_id
        try:
            for key, request in requests.items():
                if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                    continue
                minted = f"mcp-heal-proxy-{next(self._ids)}"
                future: asyncio.Future[dict[str, Any]] = loop.create_future()
                self._inputs[(cid, minted)] = future
                params = request.get("params")
                params = dict(params) if isinstance(params, dict) else {}
                link = None
                if request["method"] == "elicitation/create" and params.get("mode") == "url":
                    link = params.setdefault("elicitationId", f"mcp-heal-proxy-elicitation-{next(self._ids)}")
                waiting.append((key, (cid, minted), future, link))
                yield {"jsonrpc": "2.0", "id": minted, "method": request["method"], "params": params}
            deadline = loop.time() + self.upstream.config.read_timeout
            for key, _, future, link in waiting:
                while not future.done():
                    left = deadline - loop.time()
                    if left <= 0:
                        return
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(idle, left)):
                            await asyncio.shield(future)
                    if not future.done():
                        yield None
                answer = future.result()
                if isinstance(answer.get("error"), dict):
                    responses[""] = answer["error"]
                    return
                result = answer.get("result")
                responses[key] = result
                if isinstance(link, str) and isinstance(result, dict) and result.get("action") == "accept":
                    links.append(link)
        finally:
            for _, slot, future, _ in waiting:
                self._inputs.pop(slot, None)
                future.cancel()

    async def _local(self, record: SessionRecord, message: Message) -> dict[str, Any]:
        """ping, logging/setLevel, resources/subscribe and unsubscribe: answered by the proxy."""
        params = message.params or {}
        if message.method != "ping":
            value = params.get("level" if message.method == SET_LEVEL else "uri")
            if not isinstance(value, str):
                return error_message(
                    message.id,
                    -32602,
                    f"{message.method} needs a string {'level' if message.method == SET_LEVEL else 'uri'}",
                )
            assert message.method is not None
            await self._engine.store.apply(record.client_session_id, StateChange(((message.method, value),)))
            listening = self._listening.get(record.client_session_id)
            if message.method != SET_LEVEL and listening is not None:
                # The session's listen is reopened with the new URIs; the client hears its subscribe was
                # taken once the upstream acknowledged them, so no update sent after the answer is lost.
                listening.acknowledged.clear()
                listening.changed.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.upstream.config.connect_timeout):
                        await listening.acknowledged.wait()
        return {"jsonrpc": "2.0", "id": message.id, "result": {}}

    async def _refresh_tools(self, client_headers: Mapping[str, str], record: SessionRecord) -> None:
        params = {"_meta": envelope(record.initialize_params, record.log_level)}
        with contextlib.suppress(ProxyError):
            async with contextlib.aclosing(self._send(client_headers, "tools/list", params, 3600.0)) as answer:
                async for item in answer:
                    result = item.get("result") if item is not None and item.get("id") == _FINAL else None
                    if isinstance(result, dict):
                        self._schemas.update(clean_tools(result)[1])

    def _headers(self, client_headers: Mapping[str, str], method: str, params: Mapping[str, Any]) -> dict[str, str]:
        headers = upstream_request_headers(client_headers, None, drop=_DROP)
        extra: Mapping[str, str] = {}
        if method == "tools/call" and isinstance(params.get("name"), str):
            extra = param_headers(self._schemas.get(params["name"]), params.get("arguments"))
        headers.update(modern_headers(method, params, extra))
        return headers

    async def _send(
        self, client_headers: Mapping[str, str], method: str, params: Mapping[str, Any], idle: float
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """POST one modern request; yield the notifications of its answer, then its response with the id
        ``_FINAL`` (whatever id it came with), or nothing more if the answer broke before it."""
        upstream_id = next(self._ids)
        response = await self.upstream.send(
            "POST",
            self._headers(client_headers, method, params),
            modern_body(upstream_id, method, params),
            stream=True,
            resendable=method in _RESENDABLE,
        )
        answer = AnswerStream(response, (upstream_id,))
        try:
            if answer.is_sse and response.status == 200:
                answer.bound_events(_MAX_MESSAGE)
                while (piece := await answer.next(idle)) is not None:
                    if piece is IDLE:
                        yield None
                        continue
                    for event in piece.events:
                        payload = event.payload
                        if not isinstance(payload, dict):
                            continue
                        if upstream_id in answered_ids(payload):
                            yield {**payload, "id": _FINAL}
                            return
                        if isinstance(payload.get("method"), str) and "id" not in payload:
                            yield payload  # progress, log messages: related to this request
                if answer.ending is Ending.BROKEN:
                    log.warning("upstream.stream_broken", upstream=self.name, error=answer.failure)
                return
            try:
                raw = answer.decoded(await answer.read_whole(_MAX_MESSAGE))
            except AnswerTooLarge as exc:
                yield {"jsonrpc": "2.0", "id": _FINAL, "error": {"code": exc.code, "message": exc.message}}
                return
            self._challenge(response, raw)
            try:
                payload = json.loads(raw)
            except (ValueError, RecursionError):
                payload = None
            answers = isinstance(payload, dict) and ("result" in payload or "error" in payload)
            refusal = response.status in (400, 404)
            if answers and (
                payload.get("id") == upstream_id
                # A null id answers this request unless it is a refusal no modern server sends (a legacy
                # server's 400 "Mcp-Session-Id header is required", its 404 "Session not found").
                or (payload.get("id") is None and (not refusal or modern_error(400, raw) is not None))
            ):
                yield {**payload, "id": _FINAL}
                return
            if refusal and modern_error(response.status, raw) is None:
                # Not a modern server's refusal: the upstream changed era (or is not what it was).
                self.era.forget(f"HTTP {response.status} without a modern error to {method}")
                raise BridgeGone(f"HTTP {response.status}")
            what = f"{response.status} {response.reason or ''}".strip()
            yield error_message(
                _FINAL, UpstreamUnavailable.code, f"upstream MCP server answered {what} without a JSON-RPC answer"
            )
        finally:
            _done_with(answer)

    @staticmethod
    def _challenge(response: aiohttp.ClientResponse, body: bytes) -> None:
        if response.status in (401, 403) and response.headers.get("WWW-Authenticate"):
            raise UpstreamChallenge(response.status, response.headers, body)

    # --- the GET stream -----------------------------------------------------------------------------

    async def listen(
        self, client_headers: Mapping[str, str], record: SessionRecord, idle: float
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """The bridged session's server stream: the notifications of one upstream subscriptions/listen
        (list changes the upstream's capabilities allow, the subscribed resources), reopened with backoff
        when it drops (then one list_changed per kind: what changed meanwhile is unknown) and when the
        subscriptions change. None after ``idle`` seconds of silence. Ends with the session or the proxy."""
        cid = record.client_session_id
        listening = self._listening[cid] = _Listening()
        changed = listening.changed
        backoff = Backoff(first=_LISTEN_FIRST, maximum=_LISTEN_MAX)
        loop = asyncio.get_running_loop()
        # A client's GET again (its stream was cut: the network, a proxy restart) also follows a gap; the
        # first GET of a session made by this process does not.
        gap = cid in self._listened or record.created_at < self._started
        self._listened.add(cid)
        quiet = 0.0
        try:
            while not self._closing.is_set() and not listening.ended:
                current = await self._engine.store.get(cid)
                if current is None or not is_bridged(current):
                    return  # ended, or a handshake-era session again (unbridge)
                if not self._capabilities:
                    await self.discover(client_headers)
                notifications = listen_filter(self._capabilities, current.subscriptions)
                changed.clear()
                params = {"notifications": notifications, "_meta": envelope(current.initialize_params, None)}
                opened = loop.time()
                try:
                    opening = self._listen_once(client_headers, params, listening, gap)
                    async with contextlib.aclosing(opening) as events:
                        async for item in events:
                            if item is None:
                                quiet += _LISTEN_TICK
                                if quiet < idle:
                                    continue
                            quiet = 0.0
                            gap = False
                            yield item
                except ProxyError as exc:
                    log.info("bridge.listen_failed", upstream=self.name, client_session=cid[:8], error=exc.message)
                if listening.ended:
                    return
                if changed.is_set():
                    continue  # the subscriptions changed: a new filter at once
                gap = True
                if loop.time() - opened >= _LISTEN_LIVED:
                    backoff.reset()
                delay = backoff.next_delay()
                log.info("bridge.listen_reopen", upstream=self.name, client_session=cid[:8], delay_s=round(delay, 3))
                waited = 0.0
                while waited < delay and not self._closing.is_set():
                    step = min(_LISTEN_TICK, delay - waited)
                    await asyncio.sleep(step)
                    waited += step
                    quiet += step
                    if quiet >= idle:
                        quiet = 0.0
                        yield None
        finally:
            if self._listening.get(cid) is listening:
                del self._listening[cid]

    async def _listen_once(
        self, client_headers: Mapping[str, str], params: dict[str, Any], listening: _Listening, gap: bool
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """One upstream listen: its notifications (without the acknowledgment), None at each tick; it
        ends at once when the session's subscriptions change (``listening.changed``)."""
        response = await self.upstream.send(
            "POST",
            self._headers(client_headers, "subscriptions/listen", params),
            modern_body(next(self._ids), "subscriptions/listen", params),
            stream=True,
            resendable=True,
        )
        answer = AnswerStream(response)
        try:
            if response.status != 200 or not answer.is_sse:
                raise UpstreamUnavailable(f"upstream MCP server answered {response.status} to subscriptions/listen")
            answer.bound_events(_MAX_MESSAGE)
            while not listening.changed.is_set() and not self._closing.is_set():
                _, piece = await _unless_set(answer.next(_LISTEN_TICK), listening.changed)
                if piece is None:
                    return
                if piece is IDLE:
                    yield None
                    continue
                for event in piece.events:
                    payload = event.payload
                    if not isinstance(payload, dict) or not isinstance(payload.get("method"), str):
                        continue
                    if payload["method"] == "notifications/subscriptions/acknowledged":
                        listening.acknowledged.set()
                        if gap:
                            # Reopened after a drop: whatever changed meanwhile was lost, so say every kind did.
                            for _, key, notification in LIST_CHANGED:
                                if params["notifications"].get(key):
                                    yield {"jsonrpc": "2.0", "method": notification}
                        continue
                    yield clean_notification(payload)
        finally:
            _done_with(answer)

    # --- the end ------------------------------------------------------------------------------------

    async def end(self, record: SessionRecord) -> None:
        """DELETE of a bridged session: forget it (the upstream has nothing to end)."""
        cid = record.client_session_id
        await self._engine.store.delete(cid)
        self.forget(cid, "the client ended the session while the request ran")
        log.info("session.bridge_ended", upstream=self.name, client_session=cid[:8])

    def forget(self, cid: str, why: str = "the proxy forgot the session while the request ran") -> None:
        """A bridged session that ended (DELETE, idle expiry, eviction, the status page's forget): its
        listen ends, its calls answer with an error naming ``why``, and nothing of it is kept here."""
        self._stop_calls(cid, why)
        for key in [key for key in self._draining if key[0] == cid]:
            self._draining.pop(key).cancel()
        listening = self._listening.get(cid)
        if listening is not None:
            listening.ended = True
            listening.changed.set()
        self._listened.discard(cid)

    async def unbridge(self, record: SessionRecord) -> SessionRecord | None:
        """A bridged session whose upstream speaks the handshake era now, where its client cannot
        initialize again (stdio): it becomes a handshake-era session whose upstream session is lost, so
        that its next request initializes one upstream with the client's own initialize params (the
        heal, as for a restored session). Its listen ends. The record, or None when the store has none."""
        # Imported here: engine/session.py builds this module's Bridge.
        from mcp_heal_proxy.engine.session import lost_upstream_session_id

        def handshake_era(current: SessionRecord) -> SessionRecord:
            if not is_bridged(current):
                return current
            return replace(
                current,
                upstream_session_id=lost_upstream_session_id(),
                upstream_protocol_version=current.protocol_version,
                generation=current.generation + 1,
            )

        cid = record.client_session_id
        updated = await self._engine.store.apply(cid, handshake_era)
        listening = self._listening.get(cid)
        if listening is not None:
            listening.changed.set()
        log.info("session.unbridged", upstream=self.name, client_session=cid[:8])
        return updated

    def _stop_calls(self, cid: str, why: str) -> None:
        """End a session's calls: each still answers its client, with an error naming ``why`` (an input
        request it waits on is given that error as its answer: a cancelled future would cut the call's
        stream without a response)."""
        for slot in [slot for slot in self._inputs if slot[0] == cid]:
            waiter = self._inputs.pop(slot)
            if not waiter.done():
                waiter.set_result(error_message(slot[1], SESSION_ENDED, why))
        for key in [key for key in self._cancels if key[0] == cid]:
            running = self._cancels[key]
            running.ended = why
            running.stop.set()

    def close_streams(self) -> None:
        """Shutdown: end every listen stream (clients reconnect to the next proxy), and stop reading the
        answers of calls whose clients left."""
        self._closing.set()
        for drain in list(self._draining.values()):
            drain.cancel()


# The id the bridge gives an upstream response inside _send (its caller puts the client's id on it).
_FINAL: Final = "mcp-heal-proxy-final"


@dataclass(slots=True)
class _Running:
    """A bridged call: ``stop`` set ends it; without ``ended`` (a notifications/cancelled) it ends without
    a response, with it (the session ended) its client gets an error naming why."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ended: str | None = None


@dataclass(slots=True)
class _Listening:
    """A bridged session's GET stream: told when its subscriptions change, and tells when the upstream
    acknowledged the listen opened with them."""

    changed: asyncio.Event = field(default_factory=asyncio.Event)
    acknowledged: asyncio.Event = field(default_factory=asyncio.Event)
    # The session ended: the stream ends (its record may still be in the store for a moment).
    ended: bool = False


class _End:
    """What a call's next step gives when the call has no more messages."""


_END: Final = _End()
_T = TypeVar("_T")


async def _unless_set(work: Coroutine[Any, Any, _T], event: asyncio.Event) -> tuple[bool, _T | None]:
    """(True, the result of ``work``), or (False, None) as soon as ``event`` is set (the work is given up:
    cancelled, which closes the upstream answer it was reading)."""
    owner = TaskOwner()
    task = owner.spawn(work, name="bridge-step")
    wait = owner.spawn(event.wait(), name="bridge-step-unless")
    try:
        await asyncio.wait((task, wait), return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not task.cancelled():
            return True, task.result()
        # Not done, or cancelled from inside (never by this caller, who is still running): given up.
        return False, None
    finally:
        await owner.close()


async def _next(messages: AsyncGenerator[dict[str, Any] | None, None]) -> dict[str, Any] | _End | None:
    """A call's next message, or _END."""
    return await anext(messages, _END)


async def _first_or_set(task: asyncio.Future[Any], event: asyncio.Event) -> bool:
    """Wait until ``task`` is done (True) or ``event`` is set (False). The task is never cancelled here:
    when the caller is (its client left), the task goes on for whoever takes it."""
    waiter = TaskOwner()
    setting = waiter.spawn(event.wait(), name="bridge-step-unless")
    try:
        await asyncio.wait((task, setting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        setting.cancel()
    return task.done()


def _forget_drain(draining: dict[tuple[str, str], asyncio.Task[None]], key: tuple[str, str], task: Any) -> None:
    if draining.get(key) is task:
        del draining[key]


def _read_again(answer: AnswerStream, request_ids: tuple[Any, ...], raw: bytes) -> AnswerStream:
    """An answer the bridge read whole (and released) to look at it, as a stream for the front to relay:
    its bytes come from what was read, never again from the connection."""
    again = AnswerStream(answer.response, request_ids, raw)
    again.ending = Ending.COMPLETE
    return again


def _bridged_now(record: SessionRecord) -> SessionRecord:
    """A handshake-era session whose upstream turned 2026-07-28-only, as a bridged one (the next
    generation: a heal prepared on the old upstream session cannot write over it)."""
    if is_bridged(record):
        return record
    return replace(
        record,
        upstream_session_id=BRIDGED,
        upstream_protocol_version=MODERN_VERSION,
        generation=record.generation + 1,
    )


def _show_era(metrics: Metrics, upstream: str, era: str) -> None:
    """The status page's and the era gauge's view of an upstream's era."""
    metrics.events.upstream_era(upstream, era)
    for label in ("modern", "legacy", "unknown"):
        metrics.upstream_era.labels(upstream, label).set(1 if label == era else 0)


def _done_with(answer: AnswerStream) -> None:
    """Hand the connection back when the answer was read to its end, else close it (a listen stream or a
    call given up: closing is the modern cancellation)."""
    if answer.ending is Ending.OPEN:
        answer.close()
    else:
        answer.release()
