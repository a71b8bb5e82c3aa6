"""The session engine: everything that happens on the upstream side of one client session.

Map a client session to its upstream session, send, detect expiry, heal (single-flight, through the
``Healer``), replay by policy, remember the state the client set, reattach server streams, end
sessions. It knows nothing of how the client reached the proxy: the HTTP front (front/http.py) and the
stdio bridge (front/stdio.py) are two faces of this one engine. Client headers come in as a plain mapping;
answers go out as the upstream's responses, for the front to relay its own way.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import structlog

from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.bridge.core import Bridge, is_bridged
from mcp_heal_proxy.bridge.era import BRIDGED, MODERN_VERSION
from mcp_heal_proxy.config import mask_url
from mcp_heal_proxy.engine.answers import AnswerStream
from mcp_heal_proxy.engine.endings import SessionEndings, UpstreamEnding, delete_upstream_session
from mcp_heal_proxy.engine.healing import EXPIRY_STATUSES, Healer, is_session_expired
from mcp_heal_proxy.engine.housekeeping import SessionActivity
from mcp_heal_proxy.engine.sealing import SealedSession, SessionSealer
from mcp_heal_proxy.engine.state import state_change, state_request_ids
from mcp_heal_proxy.engine.streams import ServerStreams
from mcp_heal_proxy.errors import (
    InvalidRequest,
    ProxyError,
    UnknownSession,
    UpstreamUnavailable,
)
from mcp_heal_proxy.observability import Metrics
from mcp_heal_proxy.store.records import SessionRecord, SessionStore, new_client_session_id
from mcp_heal_proxy.upstream.client import INSPECT_LIMIT, Upstream, attempt_started, read_capped
from mcp_heal_proxy.wire.content_coding import decoded
from mcp_heal_proxy.wire.headers import (
    CONTENT_ENCODING,
    LAST_EVENT_ID,
    MAX_SESSION_ID_LENGTH,
    MCP_PROTOCOL_VERSION,
    MCP_SESSION_ID,
    is_valid_session_id,
    upstream_request_headers,
)
from mcp_heal_proxy.wire.jsonrpc import INITIALIZED, PostBody, RequestId

if TYPE_CHECKING:
    from mcp_heal_proxy.otel import HealTrace, Telemetry

log = structlog.get_logger("mcp_heal_proxy.engine.session")

# GET stream answers after which reattaching is pointless: no GET stream, one already open, or
# credentials that no longer work (the stream was opened with a token since refreshed or revoked: the
# client reopens it with its current one once its stream ends).
GET_REFUSED: Final = frozenset({401, 403, 405, 409})
# Upstream answers to DELETE that mean the session is already gone or cannot be ended: to the
# client, whose session the proxy forgets either way, that is success.
DELETE_GONE: Final = frozenset({404, 405})
# Reattaching a GET stream when opening a new one fails: back off, and give up after a while so that a
# client whose upstream is gone for good sees its stream end and can decide for itself.
_REATTACH_ATTEMPTS: Final = 10
_REATTACH_RETRY_FIRST: Final = 0.1
_REATTACH_RETRY_MAX: Final = 8.0
# The server stream the engine opens when a client says notifications/initialized (see open_stream_early)
# waits this long for the client's first GET to take it over, then is closed. Clients open their GET as
# soon as the notification is taken (milliseconds); a short wait also keeps the stream from holding off
# the upstream's idle expiry of a session whose client never opens one (servers do not expire a session
# while its GET stream is open).
EARLY_STREAM_WAIT: Final = 3.0
# The stream a heal opens for a client that listens waits longer: the front reattaches after its backoff
# (which grows with quick heals in a row, and is never shorter than the server's retry:), up to 30 s.
HEALED_STREAM_WAIT: Final = 30.0
# How long a heal waits for that stream's head before it replays without it (the replay waits on it).
HEALED_STREAM_OPEN_TIMEOUT: Final = 2.0


class NotReplayed(ProxyError):
    """The replay policy forbids replaying this request on the new session."""

    http_status = 200
    code = -32004


@dataclass(slots=True)
class Sent:
    """An upstream answer to a message sent on a session, ready to be relayed.

    ``answer`` is None when the message needed no sending after all (answers and cancellations for
    a dead session's requests: dropped, as nobody waits for them).
    """

    answer: AnswerStream | None
    record: SessionRecord
    healed: bool = False


@dataclass(slots=True)
class _EarlyStream:
    """A server stream opened before the client asked for it, waiting for the client's first GET."""

    response: aiohttp.ClientResponse
    upstream_session_id: str
    expiry: asyncio.TimerHandle


@dataclass(slots=True)
class Opened:
    """The upstream's answer to an initialize, and the new session's record (None: nothing to map)."""

    answer: AnswerStream
    record: SessionRecord | None


class SessionEngine:
    """One upstream's sessions, as every front uses them."""

    def __init__(
        self,
        upstream: Upstream,
        store: SessionStore,
        healer: Healer,
        metrics: Metrics,
        activity: SessionActivity,
        *,
        max_sessions: int,
        endings: SessionEndings | None = None,
        sealer: SessionSealer | None = None,
    ) -> None:
        self.upstream = upstream
        self.config = upstream.config
        self.name = upstream.config.name
        self.store = store
        self._healer = healer
        self._metrics = metrics
        self._activity = activity
        self._max_sessions = max_sessions
        # Bound once: labels() takes a lock and builds a key on every call.
        self._upstream_latency = metrics.upstream_latency.labels(self.name)
        # OpenTelemetry (mcp_heal_proxy/otel.py), None when off: one check per request.
        self._otel = metrics.otel
        self._peer = self._otel.peer(self.name, self.config.url) if self._otel is not None else None
        # Where evicted sessions go to have their upstream sessions ended (None: left to the upstream).
        self._endings = endings
        # Seals the client session ids this engine issues, and opens them when the store lost a session
        # (engine/sealing.py). Without one, a key that dies with the process (the stdio bridge).
        self._sealer = sealer if sealer is not None else SessionSealer.ephemeral()
        self._sessions_restored = metrics.sessions_restored.labels(self.name)
        if endings is not None:
            endings.serve(self.name, self.end_forgotten)
        # Server streams opened at notifications/initialized, by client session id, until the client's
        # first GET takes them; and the openings under way, which that GET waits for.
        self._early_streams: dict[str, _EarlyStream] = {}
        self._early_openings: dict[str, asyncio.Future[None]] = {}
        # Off once the upstream showed it has no GET streams (405) or keeps their heads waiting.
        self._opens_streams_early = True
        # The server streams open now, by upstream session: a heal ends those it left on the old one.
        self._server_streams = ServerStreams()
        healer.on_healed = self._server_streams.healed
        # Handshake-era clients in front of a 2026-07-28-only upstream (bridge/): the era, the sessions.
        self.bridge = Bridge(self, metrics)

    @property
    def otel(self) -> Telemetry | None:
        """OpenTelemetry's hooks (mcp_heal_proxy/otel.py), None when off."""
        return self._otel

    @property
    def activity(self) -> SessionActivity:
        """Where the fronts say which sessions are in use (engine/housekeeping.py)."""
        return self._activity

    # --- sessions -----------------------------------------------------------------------------------

    async def session(self, client_session_id: str) -> SessionRecord:
        """The record of a client session this upstream's proxy issued (and mark it used)."""
        if not is_valid_session_id(client_session_id):
            raise InvalidRequest(f"{MCP_SESSION_ID} must be 1 to {MAX_SESSION_ID_LENGTH} visible ASCII characters")
        record = await self.store.get(client_session_id)
        if record is None:
            record = await self.restore(client_session_id)
        if record.upstream != self.name:
            raise UnknownSession("Session not found")
        self._activity.mark(client_session_id)
        return record

    async def restore(self, client_session_id: str) -> SessionRecord:
        """Re-create the record of a session the store does not know, from its sealed id: the store lost it
        (a Redis that restarted empty, ``:memory:`` across a restart, a deleted SQLite file).

        Only an id this proxy's key opens, issued for this upstream, and not ended on purpose (DELETE, idle
        expiry, eviction: ``SessionStore.ended``) comes back; anything else is 404 as before. The record
        points at an upstream session nobody has (the old one's id was in the lost store), so the first
        request meets the upstream's 404 and heals through the normal path: one re-initialize with the
        client's own initialize params. The state the client set (subscriptions, log level) was in the
        store and is lost with it. Two requests restoring one session at once (here or on another replica)
        share the record the store took first.
        """
        sealed = self._sealer.open(client_session_id)
        if sealed is None or sealed.upstream != self.name or await self.store.ended(client_session_id):
            raise UnknownSession("Session not found")
        record = SessionRecord(
            client_session_id=client_session_id,
            upstream_session_id=BRIDGED if sealed.bridged else lost_upstream_session_id(),
            initialize_params=sealed.initialize_params,
            upstream=self.name,
            protocol_version=sealed.protocol_version,
            upstream_protocol_version=MODERN_VERSION if sealed.bridged else sealed.protocol_version,
        )
        stored = await self.store.create(record)
        if stored is record:
            self._sessions_restored.inc()
            log.info("session.restored", upstream=self.name, client_session=client_session_id[:8])
        return stored

    async def initialize(self, client_headers: Mapping[str, str], body: PostBody) -> Opened:
        """Forward an initialize without any session id; map the session the upstream opens.

        The record, negotiated protocol version included, is stored before the front sends a byte of
        the answer: a client that reads its session id and hangs up at once must not leave a record
        without its version (every later heal would then misreport a version change).
        """
        init = body.initialize
        assert init is not None
        await self.make_room()
        headers = upstream_request_headers(client_headers, None)
        otel = self._otel
        response = await (
            self.send("POST", headers, body.raw) if otel is None else self._traced_post(otel, headers, body)
        )
        upstream_session_id = response.headers.get(MCP_SESSION_ID)
        # An upstream session exists from here on whatever else the answer says: every refusal below
        # ends it rather than leave it to the upstream's idle timeout (forever, on some servers).
        opened = 200 <= response.status < 300 and upstream_session_id is not None
        answer = AnswerStream(response, (init.id,), keep_answers=True)
        try:
            refuse_garbage(response, body, self.config.url)
            if response.status != 200 or not upstream_session_id:
                # A refused initialize, or a server without sessions: nothing to map.
                return Opened(answer, None)
            if not is_valid_session_id(upstream_session_id):
                opened = False  # an id that cannot be sent back cannot be ended either
                raise UpstreamUnavailable("upstream MCP server sent a malformed session id")
            # The initialize answer is one small message: read up to it (bounded), then store, then relay.
            read = await answer.read_until_answered(INSPECT_LIMIT)
            version = protocol_version(answer.answer(init.id))
            record = SessionRecord(
                client_session_id=self.new_client_session_id(init.params or {}, version),
                upstream_session_id=upstream_session_id,
                initialize_params=dict(init.params or {}),
                upstream=self.name,
                protocol_version=version,
                upstream_protocol_version=version,
            )
            # Stored before the client sees the id, so no request can arrive for an unknown id.
            await self.store.create(record)
            if otel is not None:
                otel.set_session(record.client_session_id, version)
        except BaseException:
            response.release()
            if opened and upstream_session_id is not None:
                # The upstream session was opened for nobody: end it rather than leave it to its idle timeout.
                await self.end_upstream_session(client_headers, upstream_session_id, reason="initialize_refused")
            raise
        # What was read to see the answer goes to the client first.
        return Opened(AnswerStream(response, (init.id,), read), record)

    async def make_room(self) -> None:
        """Before a new session (the engine's or the bridge's): evict the least recently used sessions
        beyond ``max_sessions``."""
        excess = len(self.store) - self._max_sessions + 1
        if excess > 0:
            # Last-use marks not yet flushed are written first: the least recently used session is chosen
            # by what the store knows, and a session used a moment ago (its upstream session then ended
            # under a running call) must not pass for the oldest.
            await self._activity.write_to(self.store)
            # Sessions in use were just written as used now, so the least recently used are idle ones.
            evicted = await self.store.evict_oldest(excess)
            log.info("session.evicted", upstream=self.name, count=len(evicted), max_sessions=self._max_sessions)
            in_use = sum(self._activity.in_use(record.client_session_id) for record in evicted)
            if in_use:
                # Every session was in use: the limit wins, and the clients of these will get 404.
                self._metrics.sessions_evicted_in_use.labels(self.name).inc(in_use)
                log.warning("session.evicted_in_use", upstream=self.name, count=in_use, max_sessions=self._max_sessions)
            if self._endings is not None:
                # In the background: this client's initialize does not wait on another session's DELETE.
                self._endings.end_later(evicted, "evicted")

    async def heal(
        self, record: SessionRecord, client_headers: Mapping[str, str], reason: str, trace: HealTrace | None = None
    ) -> SessionRecord:
        """Heal through the Healer; a session the store lost during the request (the heal found no record)
        is restored from its sealed id and healed then, rather than answered 404. A session ended meanwhile
        (DELETE) stays ended: it is marked so, and restore refuses it. ``trace``: the heal's span (with
        OpenTelemetry on), told the outcome.

        A session whose client listens on a server stream gets the new session's stream opened here, before
        the replay (open_stream_early): what the new session sends on its own from its first moment waits
        in it for the stream's reattach, which takes it, instead of being dropped by a server that keeps
        nothing for a stream not yet open."""
        listening = self._server_streams.listening(record.client_session_id)
        try:
            try:
                healed = await self._healer.heal(record, client_headers, reason=reason)
            except UnknownSession:
                restored = await self.restore(record.client_session_id)
                healed = await self._healer.heal(restored, client_headers, reason=reason)
        except BaseException as exc:
            if trace is not None:
                trace.failed(exc)
            raise
        if trace is not None:
            trace.healed(healed.generation)
        if (
            listening
            and healed.upstream_session_id != record.upstream_session_id
            and not is_bridged(healed)
            and not self._server_streams.open_on(healed)
        ):
            await self.open_stream_early(client_headers, healed, after_heal=True)
        return healed

    def _heal_trace(self, record: SessionRecord, reason: str) -> HealTrace | None:
        """The span of a heal about to start (None with OpenTelemetry off): current until closed, after the
        replay went out, so that the healer's steps and the replay are its children."""
        if self._otel is None or self._peer is None:
            return None
        return self._otel.heal(self._peer, record.client_session_id, reason, record.generation)

    async def _traced_post(
        self, otel: Telemetry, headers: dict[str, str], body: PostBody, *, replay: bool = False
    ) -> aiohttp.ClientResponse:
        """``send`` of a POST body with its CLIENT span (OpenTelemetry on)."""
        assert self._peer is not None
        exchange = otel.exchange(body, self._peer, replay=replay)
        try:
            response = await self.send("POST", headers, exchange.outgoing(body, headers))
        except BaseException as exc:
            exchange.failed(exc)
            raise
        exchange.answered(response.status)
        return response

    async def _traced_get(self, kind: str, headers: dict[str, str], record: SessionRecord) -> aiohttp.ClientResponse:
        """``send`` of a server stream's GET, with its span when OpenTelemetry is on."""
        if self._otel is None or self._peer is None:
            return await self.send("GET", headers, stream=True)
        exchange = self._otel.stream(kind, self._peer, record.client_session_id, generation=record.generation)
        try:
            response = await self.send("GET", headers, stream=True)
        except BaseException as exc:
            exchange.failed(exc)
            raise
        exchange.answered(response.status)
        return response

    def new_client_session_id(
        self, initialize_params: Mapping[str, Any], protocol_version: str | None, *, bridged: bool = False
    ) -> str:
        """A sealed id for a new session (engine/sealing.py), or a random one when the client's initialize
        params are too large to seal (that session then does not outlive the store)."""
        sealed = self._sealer.seal(SealedSession(self.name, initialize_params, protocol_version, bridged))
        if sealed is not None:
            return sealed
        log.info("session.not_sealed", upstream=self.name, reason="initialize params too large")
        return new_client_session_id()

    async def post(self, client_headers: Mapping[str, str], body: PostBody, record: SessionRecord) -> Sent:
        """Send messages on a client session; heal and replay (by policy) if its upstream session is gone."""
        otel = self._otel
        headers = self.headers(client_headers, record)
        response = await (
            self.send("POST", headers, body.raw) if otel is None else self._traced_post(otel, headers, body)
        )
        expired, prefetched = await self.check_expiry(response)
        if not expired:
            refuse_garbage(response, body, self.config.url)
            prefetched = await self.remember_state(record, body, response, prefetched)
            if response.status < 300 and not body.is_batch and body.messages[0].method == INITIALIZED:
                # Before the client hears its notification was taken, and so before its first request.
                await self.open_stream_early(client_headers, record)
            return Sent(AnswerStream(response, body.request_ids, prefetched), record)
        if body.belongs_to_dead_session:
            # Answers and cancellations for requests of the dead session: nobody is waiting for them.
            return Sent(None, record)
        healing = self._heal_trace(record, f"http_{response.status}")
        try:
            record = await self.heal(record, client_headers, reason=f"http_{response.status}", trace=healing)
            refused = [m.method for m in body.messages if m.method is not None and not self.config.replays(m.method)]
            if refused:
                raise NotReplayed(
                    f"upstream session expired; the proxy opened a new one but does not replay {refused[0]}"
                )
            headers = self.headers(client_headers, record)
            response = await (
                self.send("POST", headers, body.raw)
                if otel is None
                else self._traced_post(otel, headers, body, replay=True)
            )
        finally:
            if healing is not None:
                healing.close()
        refuse_garbage(response, body, self.config.url)
        prefetched = await self.remember_state(record, body, response)
        return Sent(AnswerStream(response, body.request_ids, prefetched), record, healed=True)

    async def post_without_session(self, client_headers: Mapping[str, str], body: PostBody) -> AnswerStream:
        """A message without a session: a 2026-07-28 stateless request, or a mistake the upstream explains."""
        headers = upstream_request_headers(client_headers, None)
        otel = self._otel
        response = await (
            self.send("POST", headers, body.raw) if otel is None else self._traced_post(otel, headers, body)
        )
        refuse_garbage(response, body, self.config.url)
        return AnswerStream(response, body.request_ids)

    async def remember_state(
        self, record: SessionRecord, body: PostBody, response: aiohttp.ClientResponse, prefetched: bytes = b""
    ) -> bytes:
        """Record the state the client set (subscriptions, log level) once the upstream accepted it: only
        requests answered with a result count (an error inside HTTP 200 is a refusal). Their answers are
        read first (small, bounded; only bodies with such requests); the bytes read are given back, to be
        relayed before the rest.

        The change goes to the record the store holds *now*: other changes of this session (another
        request's, a heal's) may have landed while this request was answered, and applying it to the
        record read at the start would undo them."""
        ids = state_request_ids(body)
        if not ids or response.status != 200:
            return prefetched
        watch = AnswerStream(response, ids, prefetched, keep_answers=True)
        try:
            read = await watch.read_until_answered(INSPECT_LIMIT)  # prefetched first
        except BaseException:
            response.release()
            raise
        answers = (watch.answer(request_id) for request_id in ids)
        succeeded = {answer["id"] for answer in answers if answer is not None and "result" in answer}
        change = state_change(body, succeeded)
        if change is not None:
            await self.store.apply(record.client_session_id, change)
        return read

    async def end(self, client_headers: Mapping[str, str], record: SessionRecord) -> int:
        """End a session: one prompt DELETE upstream (nothing a client does on its way out may hang), and
        forget the record whatever the upstream says. Returns the upstream's status; raises when the
        upstream could not be told."""
        self._drop_early_stream(record.client_session_id)
        self._server_streams.forget(record.client_session_id)
        try:
            # No connect_retry and a short read bound.
            response = await self.upstream.send(
                "DELETE", self.headers(client_headers, record), patient=False, read_timeout=self.config.connect_timeout
            )
            response.release()
            if self._otel is not None:
                self._otel.session_ended(record.created_at, record.protocol_version)
            return response.status
        except ProxyError as exc:
            log.warning(
                "session.delete_upstream_failed",
                upstream=self.name,
                client_session=record.client_session_id[:8],
                error=exc.message,
            )
            raise type(exc)(f"the proxy forgot the session but could not end it upstream: {exc.message}") from exc
        finally:
            await self.store.delete(record.client_session_id)

    async def end_upstream_session(
        self, client_headers: Mapping[str, str], upstream_session_id: str, reason: str
    ) -> None:
        """Best effort, bounded: DELETE an upstream session that no client session points to."""
        ending = await delete_upstream_session(
            self.upstream, upstream_request_headers(client_headers, upstream_session_id)
        )
        if ending.error is not None:
            log.info("session.orphan_left_upstream", upstream=self.name, reason=reason)

    async def end_forgotten(self, record: SessionRecord, reason: str) -> UpstreamEnding:
        """Best effort, bounded: DELETE the upstream session of a client session the proxy forgot (idle
        expiry, eviction, the status page's forget). No client headers exist at that moment, so an
        upstream that wants the client's credentials refuses (401): logged, as any failure, never raised."""
        self._drop_early_stream(record.client_session_id)
        self._server_streams.forget(record.client_session_id)
        if is_bridged(record):
            self.bridge.forget(record.client_session_id)
            return UpstreamEnding(204)  # the proxy held the session: nothing upstream to end
        headers = upstream_request_headers({}, record.upstream_session_id)
        version = record.upstream_protocol_version or record.protocol_version
        if version is not None:
            headers[MCP_PROTOCOL_VERSION] = version
        ending = await delete_upstream_session(self.upstream, headers)
        if self._otel is not None:
            self._otel.session_ended(record.created_at, record.protocol_version)
        if not ending.done:
            log.info(
                "session.orphan_left_upstream",
                upstream=self.name,
                client_session=record.client_session_id[:8],
                reason=reason,
                status=ending.status,
                error=ending.error,
            )
        return ending

    # --- server streams -------------------------------------------------------------------------------

    async def open_stream_early(
        self, client_headers: Mapping[str, str], record: SessionRecord, *, after_heal: bool = False
    ) -> None:
        """Open the session's server stream (GET) now, for the client's first GET to take over.

        A server may send its own requests (sampling, elicitation) on the GET stream at any moment, even
        in the middle of a tool call, and drops them while no GET stream is open. A client opens its GET
        after notifications/initialized, at the same moment as its first request, and through the proxy
        that request would reach the server first (it goes out on a pooled connection, the GET needs a
        new one): the server's first requests would be lost. Opened here, before the client hears its
        notification was taken, the stream is there before the client can send anything else; what the
        server sends on it waits (in the connection's buffers) for the client's GET. Best effort and
        bounded by ``connect_timeout``: a failure leaves the client's GET to open its own stream.

        ``after_heal``: opened by a heal, for the front's reattach (see heal): bounded more tightly, as the
        replay waits on it, kept longer for its taker, and a slow one does not switch early streams off.
        """
        cid = record.client_session_id
        underway = self._early_openings.get(cid)
        if underway is not None:
            if after_heal:
                await asyncio.shield(underway)  # another caller of the same heal is opening it: replay after
            return
        if not self._opens_streams_early:
            return
        opening: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early_openings[cid] = opening
        self._drop_early_stream(cid)
        headers = {
            name: value
            for name, value in self.headers(client_headers, record, fresh_stream=True).items()
            if name.lower() not in ("accept", "content-type", "content-length", "content-encoding")
        }
        headers["Accept"] = "text/event-stream"
        bound = (
            min(self.config.connect_timeout, HEALED_STREAM_OPEN_TIMEOUT) if after_heal else self.config.connect_timeout
        )
        try:
            async with asyncio.timeout(bound):
                response = await self.upstream.send("GET", headers, stream=True, resendable=True, patient=False)
        except TimeoutError:
            log.warning("stream.early_open_slow", upstream=self.name, timeout_s=bound)
            if not after_heal:
                # A server that holds a GET's head back until it has an event would cost every session start
                # this wait: no more early streams for this upstream.
                self._opens_streams_early = False
            return
        except ProxyError as exc:
            log.info("stream.early_open_failed", upstream=self.name, error=exc.message)
            return
        finally:
            del self._early_openings[cid]
            opening.set_result(None)
        if response.status != 200 or not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            response.release()
            if response.status == 405:
                self._opens_streams_early = False  # this server has no GET streams
            return
        wait = HEALED_STREAM_WAIT if after_heal else EARLY_STREAM_WAIT
        expiry = asyncio.get_running_loop().call_later(wait, self._drop_early_stream, cid)
        self._early_streams[cid] = _EarlyStream(response, record.upstream_session_id, expiry)

    def _drop_early_stream(self, client_session_id: str) -> None:
        """Close a stream opened early that no GET took (its session ended, or the client never came)."""
        early = self._early_streams.pop(client_session_id, None)
        if early is not None:
            early.expiry.cancel()
            early.response.close()

    def end_early_streams(self) -> None:
        """Shutdown: close every stream opened early that no GET took."""
        for client_session_id in list(self._early_streams):
            self._drop_early_stream(client_session_id)

    async def _take_early_stream(
        self, client_headers: Mapping[str, str], record: SessionRecord
    ) -> aiohttp.ClientResponse | None:
        """The stream opened early for this session, if it still fits a GET with these headers."""
        cid = record.client_session_id
        opening = self._early_openings.get(cid)
        if opening is not None:
            # A GET racing the notification: it takes the stream being opened instead of a second one
            # (servers allow one GET stream per session).
            await asyncio.shield(opening)
        early = self._early_streams.pop(cid, None)
        if early is None:
            return None
        early.expiry.cancel()
        if client_headers.get(LAST_EVENT_ID) is not None or early.upstream_session_id != record.upstream_session_id:
            # A resume asks for events after an id, and a heal since made the stream's session a dead one.
            early.response.close()
            return None
        return early.response

    async def open_stream(self, client_headers: Mapping[str, str], record: SessionRecord) -> Sent:
        """Open the session's server-to-client stream (GET), healing first if the session is gone; the
        stream opened at notifications/initialized, when there is one."""
        # Opened at notifications/initialized (or by a heal); taken over now.
        early = await self._take_early_as("attach", record, client_headers)
        if early is not None:
            await self._track_stream(record, early)
            return Sent(AnswerStream(early), record)
        response = await self._traced_get("attach", self.headers(client_headers, record), record)
        expired, prefetched = await self.check_expiry(response)
        if not expired:
            await self._track_stream(record, response)
            return Sent(AnswerStream(response, (), prefetched), record)
        healing = self._heal_trace(record, f"http_{response.status}")
        try:
            record = await self.heal(record, client_headers, reason=f"http_{response.status}", trace=healing)
            response = await self._stream_after_heal("attach", client_headers, record)
        finally:
            if healing is not None:
                healing.close()
        await self._track_stream(record, response)
        return Sent(AnswerStream(response), record, healed=True)

    async def _stream_after_heal(
        self, kind: str, client_headers: Mapping[str, str], record: SessionRecord
    ) -> aiohttp.ClientResponse:
        """The healed session's server stream: the one the heal opened, else a new GET (servers allow one
        GET stream per session, so never both)."""
        early = await self._take_early_as(kind, record)
        if early is not None:
            return early
        return await self._traced_get(kind, self.headers(client_headers, record, fresh_stream=True), record)

    async def _take_early_as(
        self, kind: str, record: SessionRecord, client_headers: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse | None:
        """The stream opened early on this record's session, taken over as an attach or a reattach (its span,
        with OpenTelemetry on, as the client sees it); None if there is none or it does not fit."""
        early = await self._take_early_stream(client_headers or {}, record)
        if early is not None and self._otel is not None and self._peer is not None:
            taken = self._otel.stream(kind, self._peer, record.client_session_id, generation=record.generation)
            taken.answered(early.status)
        return early

    async def _track_stream(self, record: SessionRecord, response: aiohttp.ClientResponse) -> None:
        """Keep a server stream just opened on ``record``'s upstream session, for a heal to end; end it now
        if the session moved on while its GET was on its way (a heal here, or in another proxy process:
        read fresh, past a cache that may still hold the old record)."""
        cid = record.client_session_id
        self._server_streams.opened(cid, record.upstream_session_id, response)
        try:
            current = await self.store.get(cid, fresh=True)
        except BaseException:
            response.release()  # the front never gets it (the store failed, or the caller was cancelled)
            raise
        if current is None:
            self._server_streams.forget(cid)  # ended meanwhile: the front's stream ends with it
        elif current.upstream_session_id != record.upstream_session_id:
            self._server_streams.healed(current)

    async def resume(
        self,
        client_headers: Mapping[str, str],
        record: SessionRecord,
        generation: int,
        request_ids: tuple[RequestId, ...],
    ) -> AnswerStream | None:
        """Ask the upstream to resume an answer stream (the client's Last-Event-ID is in its headers) on the
        session it was on, still owing ``request_ids``; None when it cannot (the session was healed since,
        it is down, or refuses)."""
        cid = record.client_session_id
        if record.generation != generation:
            return None
        try:
            response = await self.send("GET", self.headers(client_headers, record), stream=True)
        except ProxyError as exc:
            log.info("stream.resume_failed", upstream=self.name, client_session=cid[:8], error=exc.message)
            return None
        if response.status == 200 and response.headers.get("Content-Type", "").startswith("text/event-stream"):
            return AnswerStream(response, request_ids)
        log.info("stream.resume_refused", upstream=self.name, client_session=cid[:8], status=response.status)
        response.release()
        return None

    async def reattach(
        self, client_headers: Mapping[str, str], stale: SessionRecord, last_event_id: str | None
    ) -> aiohttp.ClientResponse | None:
        """The upstream ended a server stream the client still holds: open a new one, healing if need be.

        On the same upstream session the stream resumes after ``last_event_id`` (nothing the server sent
        meanwhile is lost); after a heal it starts fresh (event ids of a dead session mean nothing). A
        failure that every attempt would meet (a refused certificate, the outbound proxy's refusal) is
        raised at once instead of retried.
        """
        backoff = Backoff(first=_REATTACH_RETRY_FIRST, maximum=_REATTACH_RETRY_MAX)
        for _ in range(_REATTACH_ATTEMPTS):
            record = await self.store.get(stale.client_session_id)
            if record is None:
                try:
                    record = await self.restore(stale.client_session_id)  # the store lost it meanwhile
                except UnknownSession:
                    return None  # the client ended its session meanwhile
            headers = self.headers(client_headers, record, fresh_stream=True)
            resuming = last_event_id is not None and record.generation == stale.generation
            if resuming and last_event_id is not None:  # (the second test narrows the type for mypy)
                headers[LAST_EVENT_ID] = last_event_id
            try:
                # After a heal (here or by a call), the stream the heal opened for this moment, if any.
                early = None if resuming else await self._take_early_as("reattach", record)
                response = early if early is not None else await self._traced_get("reattach", headers, record)
                expired, _ = await self.check_expiry(response)
                if expired:
                    healing = self._heal_trace(record, "get_stream_lost")
                    try:
                        record = await self.heal(record, client_headers, reason="get_stream_lost", trace=healing)
                        response = await self._stream_after_heal("reattach", client_headers, record)
                    finally:
                        if healing is not None:
                            healing.close()
            except ProxyError as exc:
                if exc.lasting:
                    raise  # refused on every attempt: the caller ends the stream, naming why
                delay = backoff.next_delay()
                log.info("stream.reattach_retry", upstream=self.name, error=exc.message, delay_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            if response.status == 409:
                # One GET stream per session: this GET crossed the one a heal was opening. Take that one.
                early = await self._take_early_as("reattach", record)
                if early is not None:
                    response.release()
                    response = early
            if response.status == 200:
                log.info("stream.reattached", upstream=self.name, client_session=record.client_session_id[:8])
                await self._track_stream(record, response)
                return response
            response.release()
            if response.status in GET_REFUSED:
                return None
            await asyncio.sleep(backoff.next_delay())
        return None

    # --- the wire -------------------------------------------------------------------------------------

    def headers(
        self, client_headers: Mapping[str, str], record: SessionRecord, *, fresh_stream: bool = False
    ) -> dict[str, str]:
        """Headers for the upstream on this record's session (a new stream drops stale event ids)."""
        headers = upstream_request_headers(
            client_headers, record.upstream_session_id, drop=(LAST_EVENT_ID,) if fresh_stream else ()
        )
        version = record.version_to_send
        if version is not None:
            # A heal negotiated another version than the client's: speak the upstream's.
            headers = {k: v for k, v in headers.items() if k.lower() != "mcp-protocol-version"}
            headers["MCP-Protocol-Version"] = version
        return headers

    async def send(
        self, method: str, headers: dict[str, str], body: bytes | None = None, *, stream: bool = False
    ) -> aiohttp.ClientResponse:
        """Send one request upstream, timing it."""
        started = time.perf_counter()
        # GET and DELETE cannot run a tool: they may be resent over a connection that broke unanswered.
        response = await self.upstream.send(method, headers, body, stream=stream, resendable=method != "POST")
        # From the attempt that was answered: connect retries before it are not the upstream's latency.
        self._upstream_latency.observe(time.perf_counter() - max(started, attempt_started()))
        return response

    async def check_expiry(self, response: aiohttp.ClientResponse) -> tuple[bool, bytes]:
        """Read the body of a possible expiry answer; say whether it is one.

        Returns the bytes read, so that an answer that is not an expiry is still relayed whole.
        """
        if response.status not in EXPIRY_STATUSES:
            return False, b""
        try:
            body = await read_capped(response)
        except BaseException:
            response.release()
            raise
        readable = decoded(body, response.headers.get(CONTENT_ENCODING))
        challenge = response.headers.get("WWW-Authenticate")
        if is_session_expired(
            response.status, readable, sent_session_id=True, heal_on=self.config.heal_on, www_authenticate=challenge
        ):
            response.release()
            return True, b""
        return False, body


def lost_upstream_session_id() -> str:
    """The upstream session id of a restored record: one no upstream issued, so that the first request on
    it is answered as an expired session's and heals (SessionEngine.restore)."""
    return f"mcp-heal-proxy-restored-{secrets.token_hex(16)}"


def refuse_garbage(response: aiohttp.ClientResponse, body: PostBody, upstream_url: str) -> None:
    """An answer to requests must be a JSON-RPC answer; anything else becomes a JSON-RPC error with the
    requests' ids instead of confusing the client: a success that is not JSON or SSE (an HTML page from a
    captive portal or a misrouted load balancer), or a failure status that is not JSON (a wrong upstream
    path's bare 404, a gateway's 502 page). 401 and 403 pass through as they are: their challenge is for
    the client's OAuth."""
    status = response.status
    if not body.request_ids or status == 202 or status in (401, 403) or 300 <= status < 400:
        return
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("application/json") or (status < 300 and content_type.startswith("text/event-stream")):
        return
    response.release()
    what = f"{status} {response.reason or ''}".strip() + f" with {content_type or 'no content type'}"
    if status < 300:
        raise UpstreamUnavailable(f"upstream MCP server answered {what}")
    hint = (
        ": check that the upstream URL is the server's MCP endpoint (it often ends in /mcp)"
        if status in (404, 405)
        else ""
    )
    message = f"upstream {mask_url(upstream_url)} answered {what}, not a JSON-RPC answer{hint}"
    log.warning("upstream.not_mcp", url=mask_url(upstream_url), status=status, content_type=content_type or None)
    raise UpstreamUnavailable(message)


def protocol_version(initialize_answer: Mapping[str, Any] | None) -> str | None:
    """``result.protocolVersion`` of an initialize's response, if it has one."""
    result = initialize_answer.get("result") if initialize_answer is not None else None
    if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
        return str(result["protocolVersion"])
    return None
