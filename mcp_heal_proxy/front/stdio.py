"""The stdio front: a bridge a client launches as a command, speaking newline-delimited JSON-RPC on
stdin/stdout (the MCP stdio transport) and Streamable HTTP upstream, with the proxy's healing.

It is the second face of the session engine (engine/session.py), beside the HTTP front: one client, one
session, kept in memory (no port, no state file). Every message from stdin is POSTed upstream; requests
run concurrently, notifications and responses in the order they came. Answers (JSON or SSE) are
written to stdout message by message as they arrive; the session's GET stream carries the server's own
requests and notifications. stdout carries protocol messages only, one per line; logs go to stderr.
When stdin closes (or on SIGTERM/SIGINT) the upstream session is ended and the bridge exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import structlog

from mcp_heal_proxy.backoff import Backoff
from mcp_heal_proxy.bridge import stdio as bridged
from mcp_heal_proxy.bridge.core import BridgedOpen, is_bridged
from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.engine.answers import AnswerEvent, AnswerStream, Ending
from mcp_heal_proxy.engine.healing import Healer
from mcp_heal_proxy.engine.housekeeping import SessionActivity
from mcp_heal_proxy.engine.session import GET_REFUSED, SessionEngine
from mcp_heal_proxy.errors import AnswerTooLarge, InvalidRequest, ProxyError, UpstreamUnavailable, unexpected_failure
from mcp_heal_proxy.observability import Metrics
from mcp_heal_proxy.store.records import MemorySessionStore, SessionRecord
from mcp_heal_proxy.tasks import TaskOwner
from mcp_heal_proxy.upstream.client import Upstream
from mcp_heal_proxy.wire import jsonrpc
from mcp_heal_proxy.wire.headers import LAST_EVENT_ID, MCP_PROTOCOL_VERSION
from mcp_heal_proxy.wire.jsonrpc import Kind, PostBody, RequestId

if TYPE_CHECKING:
    from mcp_heal_proxy.otel import Telemetry

log = structlog.get_logger("mcp_heal_proxy.front.stdio")

_READ_CHUNK: Final = 64 * 1024
# One client per bridge; a client that initializes again gets a fresh session, the old one is ended.
_MAX_SESSIONS: Final = 16
# The server stream (GET) is reopened with backoff when the upstream ends it, never sooner than its retry:.
_STREAM_FIRST: Final = 0.25
_STREAM_MAX: Final = 30.0
_STREAM_LIVED: Final = 30.0
_BROKEN: Final = "upstream MCP server broke the answer before it came; the request was not replayed (it may have run)"
_ENDED: Final = "upstream MCP server ended its answer without a response to this request"
# Reads up to n bytes of stdin (b"" at its end); writes bytes to stdout.
Reader = Callable[[int], Awaitable[bytes]]
Writer = Callable[[bytes], Awaitable[None]]
_BASE_HEADERS: Final = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def _line(message: Any) -> bytes:
    """One JSON-RPC message as one line (JSON never needs a raw line break). A lone surrogate (what
    JavaScript writes for a cut emoji, as the escape ``\\ud83d``) has no UTF-8 form: such a message
    is written with every non-ASCII character escaped, which is the same JSON."""
    try:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Bridge:
    """One client on stdin/stdout, one upstream session through the engine."""

    def __init__(self, engine: SessionEngine, write: Writer, *, max_line_bytes: int) -> None:
        self._engine = engine
        self._out = write
        self._max_line = max_line_bytes
        self._record: SessionRecord | None = None
        self._headers: dict[str, str] = dict(_BASE_HEADERS)
        self._tasks = TaskOwner()
        self._stream: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        # OpenTelemetry (mcp_heal_proxy/otel.py), None when off.
        self._otel = engine.otel

    # --- stdin ----------------------------------------------------------------------------------------

    async def run(self, stdin: Reader, stop: asyncio.Event) -> None:
        """Read messages until stdin closes or ``stop`` is set, then end the session."""
        reading = asyncio.get_running_loop().create_task(self._read(stdin), name="stdin")
        stopping = asyncio.get_running_loop().create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reading, stopping):
                task.cancel()
            await asyncio.gather(reading, stopping, return_exceptions=True)
            await self.close()

    async def _read(self, stdin: Reader) -> None:
        pending: list[bytes] = []
        size = 0
        overlong = False
        while True:
            chunk = await stdin(_READ_CHUNK)
            if not chunk:
                break
            start = 0
            while (end := chunk.find(b"\n", start)) != -1:
                piece = chunk[start:end]
                start = end + 1
                if overlong:
                    overlong = False
                    pending, size = [], 0
                    log.warning("stdio.line_too_long", limit_bytes=self._max_line)
                    continue
                pending.append(piece)
                line = b"".join(pending)
                pending, size = [], 0
                await self._receive(line)
            rest = chunk[start:]
            if rest and not overlong:
                pending.append(rest)
                size += len(rest)
                if size > self._max_line:
                    # Dropped as it comes: a line over the limit is never held whole.
                    overlong, pending, size = True, [], 0
        if overlong:
            log.warning("stdio.line_too_long", limit_bytes=self._max_line)
        elif pending:
            # stdin closed mid-line: the transport ends each message with a newline, so this is not one.
            log.warning("stdio.incomplete_line_at_eof", bytes=sum(len(p) for p in pending))

    async def _receive(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            body = jsonrpc.parse_post_body(line)
        except ProxyError as exc:
            if exc.request_id is not None:
                await self._write_error(exc.request_id, exc)
            else:
                log.warning("stdio.bad_message", error=exc.message)
            return
        if body.is_batch:
            # MCP's stdio transport carries one message per line; batches left the protocol in 2025-06-18.
            refusal = InvalidRequest("batches are not supported over stdio: send one message per line")
            if body.request_ids:
                for request_id in body.request_ids:
                    await self._write_error(request_id, refusal)
            else:
                log.warning("stdio.bad_message", error=refusal.message)
            return
        message = body.messages[0]
        if body.initialize is not None:
            # The client waits for this answer before anything else: handled before the next line is read.
            await self._guarded(self._initialize(body), body)
        elif message.kind is Kind.REQUEST:
            # Requests run concurrently: a long tool call never holds up a ping or a second call.
            self._tasks.spawn(self._guarded(self._post(body), body), name="request")
        else:
            # Notifications and responses keep their order (notifications/initialized first of all).
            await self._guarded(self._post(body), body)
            if message.method == jsonrpc.INITIALIZED and self._record is not None and self._stream is None:
                self._stream = self._tasks.spawn(self._follow_server_stream(), name="server-stream")

    async def _guarded(self, handling: Any, body: PostBody) -> None:
        """Run the handling of one message; a failure becomes a JSON-RPC error for its request. With
        OpenTelemetry on, under the message's SERVER span (ended here, with the error it was answered)."""
        traced = None
        if self._otel is not None:
            record = self._record
            traced = self._otel.server_request(
                body,
                None,
                session_id=record.client_session_id if record is not None else None,
                protocol_version=self._headers.get(MCP_PROTOCOL_VERSION),
            )
        try:
            await handling
        except ProxyError as exc:
            await self._fail(body, exc)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.exception("stdio.unexpected_error")
            await self._fail(body, unexpected_failure(exc))
        finally:
            if traced is not None:
                traced.leave()
                traced.end()

    async def _fail(self, body: PostBody, exc: ProxyError) -> None:
        if body.request_ids:
            for request_id in body.request_ids:
                await self._write_error(request_id, exc)
        else:
            log.warning("stdio.message_not_delivered", method=body.method_label, error=exc.message)

    # --- upstream -------------------------------------------------------------------------------------

    async def _initialize(self, body: PostBody) -> None:
        opened = await self._engine.bridge.open(self._headers, body)
        if isinstance(opened, BridgedOpen):  # a modern-only upstream: the bridge holds the session
            self._record = opened.record
            await self._write(_line(opened.answer))
            return
        if opened.record is not None:
            self._record = opened.record
            if opened.record.protocol_version is not None:
                self._headers[MCP_PROTOCOL_VERSION] = opened.record.protocol_version
        await self._relay(opened.answer, body)

    async def _post(self, body: PostBody) -> None:
        engine = self._engine
        if self._record is None:
            await self._relay(await engine.post_without_session(self._headers, body), body)
            return
        record = await engine.session(self._record.client_session_id)
        if is_bridged(record):
            await bridged.post(engine.bridge, self._headers, record, body, self._write_message)
            current = await engine.store.get(record.client_session_id)
            if current is not None and not is_bridged(current):
                # The upstream speaks the handshake era again (bridge unbridge): so does the server stream.
                self._record = current
                if current.protocol_version is not None:
                    self._headers[MCP_PROTOCOL_VERSION] = current.protocol_version
                self._follow_again()
            return
        sent = await engine.post(self._headers, body, record)
        if sent.answer is not None and sent.answer.status == 400 and engine.bridge.era.may_bridge:
            # Refused unrun: the upstream may have turned 2026-07-28-only under the session.
            adopted = await engine.bridge.adopt(self._headers, sent.record, sent.answer)
            if not isinstance(adopted, AnswerStream):
                self._record = adopted
                # The session's server stream is now the bridge's (the upstream has no GET stream).
                self._follow_again()
                await bridged.post(engine.bridge, self._headers, adopted, body, self._write_message)
                return
            sent.answer = adopted
        if sent.answer is not None:
            await self._relay(sent.answer, body, record=sent.record)

    def _follow_again(self) -> None:
        """Follow the session's server stream anew (it changed era)."""
        if self._stream is not None:
            self._stream.cancel()
        self._stream = self._tasks.spawn(self._follow_server_stream(), name="server-stream")

    async def _relay(self, answer: AnswerStream, body: PostBody, *, record: SessionRecord | None = None) -> None:
        """Write the messages of an upstream answer to stdout as they arrive; then an error for each
        request of the message whose response never came."""
        try:
            if answer.is_sse:
                # Each message is held whole to be written as a line: no larger than the bridge's limit.
                answer.bound_events(self._max_line)
                await self._relay_events(answer, record)
            else:
                await self._write_answer(answer, body.request_ids)
        finally:
            answer.release()

    async def _write_answer(self, answer: AnswerStream, request_ids: tuple[RequestId, ...]) -> None:
        """A JSON answer: read whole (up to the longest line the bridge takes), its messages written one a
        line, then an error for each request it did not answer."""
        try:
            raw = answer.decoded(await answer.read_whole(self._max_line))
        except AnswerTooLarge as exc:
            log.warning("stdio.answer_too_large", upstream=self._engine.name, limit_bytes=self._max_line)
            for request_id in request_ids:
                await self._write_error(request_id, exc)
            return
        status = answer.status
        why = UpstreamUnavailable(f"upstream MCP server answered {status} without a response to this request")
        try:
            payload = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):
            payload = None
        owed = list(answer.unanswered)
        if isinstance(payload, dict) and "error" in payload and payload.get("id") is None and len(request_ids) == 1:
            # An HTTP-level refusal (id null) of the one request on the line: the client waits for its id.
            payload = {**payload, "id": request_ids[0]}
            owed = []
        if payload is not None:
            for message in payload if isinstance(payload, list) else [payload]:
                await self._write(_line(message))
        elif raw.strip():
            log.warning("upstream.answer_not_json", upstream=self._engine.name, status=status, bytes=len(raw))
        for request_id in owed:
            await self._write_error(request_id, why)

    async def _relay_events(self, answer: AnswerStream, record: SessionRecord | None) -> None:
        """An SSE answer, message by message; resumed (Last-Event-ID) when it stops between numbered events
        still owing responses, else an error for each response it owed."""
        current = answer
        try:
            while True:
                written = await self._pump_events(current)
                owed = current.unanswered
                if not owed:
                    return
                last_event_id = current.last_event_id
                resumed: AnswerStream | None = None
                # Over stdio the client cannot resume by itself: the bridge does, on the same session, as
                # long as each resume brings something (a server that keeps ending empty streams is not
                # asked forever).
                if current.resumable and last_event_id is not None and record is not None and written:
                    headers = {**self._headers, LAST_EVENT_ID: last_event_id}
                    resumed = await self._engine.resume(headers, record, record.generation, owed)
                if resumed is None:
                    log.warning("stream.unrecovered", upstream=self._engine.name, unanswered=len(owed))
                    why: ProxyError = UpstreamUnavailable(_BROKEN if current.ending is Ending.BROKEN else _ENDED)
                    if current.oversized:
                        # Its response may have been the message too large to hold: say so.
                        why = AnswerTooLarge(
                            f"upstream MCP server sent a message over the {self._max_line}-byte limit "
                            "(max_body_bytes); it was not relayed"
                        )
                    for request_id in owed:
                        await self._write_error(request_id, why)
                    return
                resumed.bound_events(self._max_line)
                if current is not answer:
                    current.release()
                current = resumed
        finally:
            if current is not answer:
                current.release()  # a resumed stream (the first is released by the caller)

    async def _pump_events(self, answer: AnswerStream) -> int:
        """Write each message event as it completes; the number of events the stream brought."""
        events = 0
        while (piece := await answer.next()) is not None:
            for event in piece.events:
                events += 1
                await self._write_event(event)
        if answer.ending is Ending.BROKEN:
            # Info: a resume or a reattach follows (a healed restart breaks every stream); what cannot be
            # recovered is a warning where it is found (stream.unrecovered, stream.reattach_failed).
            log.info("upstream.stream_broken", upstream=self._engine.name, error=answer.failure)
        if answer.oversized:
            log.warning("stdio.answer_too_large", upstream=self._engine.name, limit_bytes=self._max_line)
        return events

    async def _write_event(self, event: AnswerEvent) -> None:
        """One event's message as one line. A message event that is not JSON is skipped (and said in the
        log): no single message can end the stream it came on."""
        if event.event.event != "message":
            return  # MCP messages come as message events; others (the proxy's abandoned ones) are not
        data = event.event.data
        payload = event.payload
        if payload is None:
            if data.strip():
                log.warning("upstream.event_not_json", upstream=self._engine.name, bytes=len(data))
            return
        if "\n" in data or "\r" in data:
            await self._write(_line(payload))  # data over several lines: one line of the same JSON
        else:
            # Written as the upstream wrote it: parsed only to classify, never serialized again.
            await self._write(data.encode() + b"\n")

    async def _follow_server_stream(self) -> None:
        """The session's GET stream: the server's own requests and notifications, kept open across heals."""
        assert self._record is not None
        engine = self._engine
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=_STREAM_FIRST, maximum=_STREAM_MAX)
        if is_bridged(self._record):
            await bridged.follow(engine.bridge, self._headers, self._record, self._write_message)
            return
        try:
            record = await engine.session(self._record.client_session_id)
            sent = await engine.open_stream(self._headers, record)
        except ProxyError as exc:
            log.info("stream.not_opened", upstream=engine.name, error=exc.message)
            return
        answer = sent.answer
        record = sent.record
        last_event_id: str | None = None
        while answer is not None:
            answer.bound_events(self._max_line)
            if answer.status != 200 or not answer.is_sse:
                if answer.status not in GET_REFUSED:
                    log.info("stream.refused", upstream=engine.name, status=answer.status)
                answer.release()
                return
            opened = loop.time()
            try:
                await self._pump_events(answer)
            finally:
                answer.release()
            # Ended or broken, between events or not: a half event was never written (only whole messages
            # are), and the resume asks the server for what followed the last whole one.
            last_event_id = answer.last_event_id or last_event_id
            if loop.time() - opened >= _STREAM_LIVED:
                backoff.reset()
            retry = answer.reconnection_time
            await asyncio.sleep(backoff.next_delay(at_least=retry / 1000 if retry is not None else 0.0))
            try:
                response = await engine.reattach(self._headers, record, last_event_id)
                current = await engine.store.get(record.client_session_id)
            except ProxyError as exc:
                log.warning("stream.reattach_failed", upstream=engine.name, error=exc.message)
                return
            if current is not None:
                if current.generation != record.generation:
                    last_event_id = None  # event ids of a healed-over session mean nothing
                record = current
            answer = AnswerStream(response) if response is not None else None

    # --- stdout ---------------------------------------------------------------------------------------

    async def _write_error(self, request_id: RequestId, exc: ProxyError) -> None:
        if self._otel is not None:
            self._otel.note_error(exc)  # the request being answered in this task failed
        await self._write(_line(jsonrpc.error_object(request_id, exc.code, exc.message)))

    async def _write_message(self, message: Any) -> None:
        await self._write(_line(message))

    async def _write(self, line: bytes) -> None:
        async with self._write_lock:
            await self._out(line)

    # --- the end --------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop everything in flight, then end the upstream session (bounded: the client is leaving)."""
        await self._tasks.close()
        record, self._record = self._record, None
        if record is None:
            return
        with contextlib.suppress(ProxyError):
            # The session as it is now: a heal since the initialize moved it to another upstream session.
            current = await self._engine.store.get(record.client_session_id)
            if is_bridged(record):
                await self._engine.bridge.end(record)
                return
            await self._engine.end(self._headers, current or record)


class _Stdout:
    """Where protocol lines go: a non-blocking pipe writer (a client that reads slowly never blocks the
    loop), or plain writes when stdout is a regular file (pipe transports refuse files)."""

    def __init__(self, writer: asyncio.StreamWriter | None, fd: int) -> None:
        self._writer = writer
        self._fd = fd

    async def write(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)
            await self._writer.drain()
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]


def _is_pipe_like(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


async def _stdio_streams() -> tuple[Reader, _Stdout]:
    """stdin and stdout for the running loop: pipe transports where they can be had, else plain reads and
    writes (a file redirected to the bridge) off the loop's thread."""
    loop = asyncio.get_running_loop()
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    read: Reader
    if _is_pipe_like(in_fd):
        reader = asyncio.StreamReader(limit=_READ_CHUNK)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
        read = reader.read
    else:

        async def read(size: int) -> bytes:
            return await asyncio.to_thread(os.read, in_fd, size)

    writer: asyncio.StreamWriter | None = None
    if _is_pipe_like(out_fd):
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return read, _Stdout(writer, out_fd)


async def open_engine(
    upstream_config: UpstreamConfig, state: str = ":memory:", otel: Telemetry | None = None
) -> tuple[SessionEngine, contextlib.AsyncExitStack]:
    """The engine for one client's session: the upstream's pools, a healer, records in memory, and the
    upstream's managed login (tokens beside ``state``'s store, or in the default state directory);
    ``otel``, OpenTelemetry's hooks when on."""
    resources = contextlib.AsyncExitStack()
    store = MemorySessionStore()
    metrics = Metrics(otel)
    auth = None
    if upstream_config.auth == "oauth":
        from mcp_heal_proxy.auth.managed import managed_auth

        auth = managed_auth(upstream_config, state)
    upstream = Upstream(upstream_config, auth=auth)
    resources.push_async_callback(upstream.close)
    healer = Healer(upstream, store, metrics)
    resources.push_async_callback(healer.close)
    engine = SessionEngine(upstream, store, healer, metrics, SessionActivity(), max_sessions=_MAX_SESSIONS)
    return engine, resources


async def serve_stdio(
    upstream_config: UpstreamConfig, *, max_line_bytes: int, state: str = ":memory:", otel: Telemetry | None = None
) -> int:
    """Run the bridge on this process's stdin/stdout until stdin closes or a signal asks to stop; with
    ``otel``, what it traced is exported before it exits."""
    engine, resources = await open_engine(upstream_config, state, otel)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        read, stdout = await _stdio_streams()
        bridge = Bridge(engine, stdout.write, max_line_bytes=max_line_bytes)
        await bridge.run(read, stop)
    finally:
        await resources.aclose()
        if otel is not None:
            await asyncio.to_thread(otel.shutdown)  # last: the session's end is traced too
    return 0


def stdio_upstream(
    *,
    url: str | None,
    config_file: str | None,
    name: str | None,
    header_flags: list[str],
    environ: Mapping[str, str],
    settings: list[str] | tuple[str, ...] = (),
) -> tuple[UpstreamConfig, int, str]:
    """The upstream the bridge talks to, the longest line it reads, and the store path its managed login's
    tokens sit beside: from ``--upstream`` (with ``--header`` flags), or ``--name`` of a config file (its
    headers, timeouts, heal_on, replay, auth). ``settings`` are ``--set KEY=VALUE`` texts of upstream keys;
    ``MCP_HEAL_PROXY_CA_FILE`` is the CA file of an ``--upstream`` that sets none, as for serve."""
    from dataclasses import replace

    from mcp_heal_proxy.config import (
        DEFAULT_MAX_BODY_BYTES,
        MEMORY_STATE,
        UPSTREAM_OPTIONS,
        ConfigError,
        build_config,
        check_option,
        check_proxy_environment,
        upstream_settings,
    )

    headers = header_pairs(header_flags, environ)
    options = upstream_settings(settings, environ if config_file is None else {})
    if config_file is not None:
        if url is not None:
            raise ConfigError("give --upstream URL or --config FILE --name NAME, not both")
        config = build_config(config_file=config_file, flags={}, environ=environ)
        chosen = [u for u in config.upstreams if u.name == name] if name else list(config.upstreams)
        if len(chosen) != 1:
            names = ", ".join(u.name for u in config.upstreams)
            raise ConfigError(f"{config_file}: name one upstream with --name (it has: {names})")
        upstream = chosen[0]
        upstream = replace(upstream, headers={**upstream.headers, **headers}, **options)
        return upstream, config.max_body_bytes, config.state
    if url is None:
        raise ConfigError("stdio needs --upstream URL (or --config FILE --name NAME)")
    checked = check_option(UPSTREAM_OPTIONS, "url", url, "--upstream")
    single = UpstreamConfig(url=checked, headers=headers, **options)
    check_proxy_environment([single], environ)
    return single, DEFAULT_MAX_BODY_BYTES, MEMORY_STATE


def header_pairs(values: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``--header "Name: value"`` flags as a mapping, with ``${NAME}`` read from the environment."""
    from mcp_heal_proxy.config import UPSTREAM_OPTIONS, ConfigError, check_option, expand_env

    headers: dict[str, str] = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f'--header must look like "Name: value", not {value!r}')
        headers[name.strip()] = expand_env(text.strip(), f"--header {name.strip()}", "command line", environ)
    checked: dict[str, str] = check_option(UPSTREAM_OPTIONS, "headers", headers, "--header")
    return checked
