"""Incremental Server-Sent Events parsing and writing, pure and without I/O.

The proxy forwards SSE bytes untouched (never re-encoded, so ids, ``retry``, comments and priming
events survive as the upstream wrote them). It parses a stream only where it must read a message:
the upstream's answer to a re-``initialize`` during a heal, and the client's original initialize
answer (to learn the negotiated protocol version). Parsing follows the WHATWG rules: lines end in
``\\r\\n``, ``\\n`` or ``\\r``; a leading BOM is skipped; a blank line dispatches the event.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Final

_LINE_END = re.compile(r"\r\n|\r|\n")
# The type of an event the proxy had to cut short (see SSEParser.abandon_event): no MCP client listens
# for it, so its partial data is never dispatched as a message.
ABANDONED_EVENT: Final = "mcp-heal-proxy-abandoned"


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched SSE event."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


@dataclass(frozen=True, slots=True)
class Oversized:
    """An event dropped for being larger than the parser's limit (its size in characters, at least)."""

    size: int


@dataclass(frozen=True, slots=True)
class Comment:
    """A comment line (``: text``), kept so writers and tests can see keep-alives."""

    text: str


class SSEParser:
    """Feed it bytes as they arrive, in chunks split anywhere; it returns what completed."""

    __slots__ = (
        "_buffer",
        "_data",
        "_decoder",
        "_event",
        "_fields",
        "_id",
        "_last_id",
        "_oversized",
        "_pending_cr",
        "_reconnection_time",
        "_retry",
        "_size",
        "_skip_line",
        "_started",
        "limit",
    )

    def __init__(self, max_event_chars: int | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # With a limit, an event larger than it is never held whole: its data is dropped as it comes, and
        # its dispatch is an Oversized marker instead of the event (the stdio bridge, which must hold
        # each message whole to write it as a line). Characters of the event's data and of the line
        # being read count.
        self.limit = max_event_chars
        self._size = 0
        self._oversized = False
        self._skip_line = False
        # The pieces of the line still incomplete (joined once, when its end arrives).
        self._buffer: list[str] = []
        self._pending_cr = False
        self._started = False
        self._data: list[str] = []
        # Whether a field line came since the last blank line: the stream is then inside an event.
        self._fields = False
        self._event = ""
        self._id: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None
        self._reconnection_time: int | None = None

    def feed(self, chunk: bytes) -> list[Event | Comment | Oversized]:
        """Parse a chunk; return the events and comments it completed, in order.

        Linear in the bytes fed: a line still incomplete is kept as a list of pieces and joined once,
        when its end arrives, so one huge event split over thousands of chunks costs one copy, not one
        copy per chunk (which made a 20 MiB answer cost seconds of CPU).
        """
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._pending_cr and text.startswith("\n"):
            # The "\r" that ended the previous chunk and this "\n" are one line ending.
            text = text[1:]
        self._pending_cr = False
        out: list[Event | Comment | Oversized] = []
        start = 0
        # The regex engine finds line ends in C, over the new text only.
        limit = self.limit
        for match in _LINE_END.finditer(text):
            piece = text[start : match.start()]
            start = match.end()
            if self._skip_line:
                self._skip_line = False  # the rest of a line of an oversized event: dropped with it
                continue
            if limit is not None and piece:
                self._count(len(piece))
            if self._buffer:
                self._buffer.append(piece)
                piece = "".join(self._buffer)
                self._buffer = []
            if self._oversized and piece:
                continue  # the lines of an oversized event are dropped; its blank line still ends it
            self._line(piece, out)
        if start < len(text):
            if not self._skip_line:
                rest = text[start:]
                if limit is not None:
                    self._count(len(rest))
                if self._oversized:
                    self._buffer = []
                    self._skip_line = True
                else:
                    self._buffer.append(rest)
        elif start and text[-1] == "\r":
            # Only a "\r" at the very end may be the first half of a "\r\n" split between chunks.
            self._pending_cr = True
        return out

    def _line(self, line: str, out: list[Event | Comment | Oversized]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line.startswith(":"):
            if not self._fields:
                self._size = 0  # a comment between events is no part of the next one
            out.append(Comment(line[1:].removeprefix(" ")))
            return
        self._fields = True
        field, sep, value = line.partition(":")
        if sep:
            value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._id = value
        elif field == "retry" and value.isdigit():
            self._retry = int(value)
            # As in browsers, the reconnection time changes when the field is read, event or not.
            self._reconnection_time = self._retry

    def _count(self, chars: int) -> None:
        """Count characters toward the event's limit; past it, drop what the event holds."""
        self._size += chars
        assert self.limit is not None
        if self._size > self.limit and not self._oversized:
            self._oversized = True
            self._fields = True
            self._data = []
            self._buffer = []

    def _dispatch(self, out: list[Event | Comment | Oversized]) -> None:
        if self._id is not None:
            self._last_id = self._id
        if self._oversized:
            out.append(Oversized(self._size))
        # As in browsers, an event without data lines only updates the last event id.
        elif self._data:
            out.append(Event("\n".join(self._data), self._event or "message", self._id, self._retry))
        self._data = []
        self._fields = False
        self._size = 0
        self._oversized = False
        self._event = ""
        self._id = None
        self._retry = None

    @property
    def between_events(self) -> bool:
        """Whether the bytes fed so far end between events: no line half read, no field of an event that
        its blank line has not dispatched yet. Decided by the parse, never by how the bytes were chunked:
        only here may a keep-alive comment go, and only here did a stream that stops lose no event."""
        return not self._buffer and not self._fields and not self._skip_line

    def abandon_event(self) -> bytes:
        """Bytes that make a reader who was fed the same stream drop the event it is in the middle of.

        SSE has no way to cancel an event, but a reader dispatches only events of the types it listens
        for (MCP clients listen for ``message``): the half event is finished under a type nobody
        listens for, and with the last event id the reader had before it, so that a resume with
        Last-Event-ID starts where the last whole event ended. Returns b"" between events. The parser
        is fed the bytes too, so that it and the reader stay in step.
        """
        if self.between_events:
            return b""
        # Ends a half line first (a field name cut short becomes an unknown field, which is ignored).
        ending = "\n" if self._buffer or self._skip_line else ""
        last_id = self._last_id if self._last_id is not None else ""
        closing = f"{ending}event: {ABANDONED_EVENT}\nid: {last_id}\n\n".encode()
        self.feed(closing)
        return closing

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event that set one (what a client would resume from); an empty id, as in
        browsers, means none."""
        return self._last_id or None

    @property
    def reconnection_time(self) -> int | None:
        """The last ``retry:`` the stream sent, in milliseconds (how long to wait before reconnecting)."""
        return self._reconnection_time


def encode_event(event: Event) -> bytes:
    """Serialize an event so that SSEParser reads back the same event."""
    lines: list[str] = []
    if event.event != "message":
        lines.append(f"event: {event.event}")
    if event.id is not None:
        lines.append(f"id: {event.id}")
    if event.retry is not None:
        lines.append(f"retry: {event.retry}")
    for data_line in event.data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append(f"data: {data_line}")
    return ("\n".join(lines) + "\n\n").encode()


def encode_comment(text: str) -> bytes:
    """Serialize a comment line (used for keep-alives)."""
    return f": {text}\n\n".encode()
