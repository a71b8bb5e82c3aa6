"""The server streams (GET) the engine opened, by client session and the upstream session each is on.

A heal moves a client session to a new upstream session. A server stream still open on the old one (the
upstream forgot the session without closing its streams: a failover to a replica that never saw it, a
server whose session table lost the entry) would stay open for good and carry nothing: what the new
session sends on its own (resources/updated for the subscriptions the heal re-applied, the server's
requests) goes to the new session's stream, which nobody opened. So a heal ends the streams on the
upstream sessions it moved on from; the fronts see them end as superseded and reattach (with their
backoff) on the new session.

Streams are told apart by upstream session id, not generation: a session restored from its sealed id
starts again at generation 0. Per process: a heal in another proxy process (a shared store) ends no stream
here unless the engine sees it: it compares each stream it opens with the store's record (read fresh),
which catches a heal that ended while the stream's GET was on its way, here or in another process. The
heal's own task tells the table (Healer.on_healed), so a heal whose callers all left still ends them.
"""

from __future__ import annotations

from typing import Final

import aiohttp
import structlog

from mcp_heal_proxy.engine.answers import supersede
from mcp_heal_proxy.store.records import SessionRecord

log = structlog.get_logger("mcp_heal_proxy.engine.streams")

# Below this many sessions in the table, no sweep of ended ones.
_SWEEP_FIRST: Final = 64


class ServerStreams:
    """Open upstream GET responses by client session id, each with the upstream session it is on."""

    def __init__(self) -> None:
        self._open: dict[str, list[tuple[str, aiohttp.ClientResponse]]] = {}
        self._sweep_at = _SWEEP_FIRST

    def opened(self, client_session_id: str, upstream_session_id: str, response: aiohttp.ClientResponse) -> None:
        """A stream opened on this upstream session (the ones since closed are dropped here, so that the
        table holds no more than the streams open now)."""
        if response.status != 200:
            return  # no stream: the front releases the refusal
        streams = [entry for entry in self._open.get(client_session_id, ()) if not entry[1].closed]
        streams.append((upstream_session_id, response))
        self._open[client_session_id] = streams
        if len(self._open) >= self._sweep_at:
            self._sweep()

    def _sweep(self) -> None:
        """Drop the sessions whose streams all ended: a session can end where no ``forget`` reaches this
        table (in another proxy process, or dropped from a full queue of endings). Amortized: run when the
        table doubled since the last sweep."""
        self._open = {
            cid: streams for cid, streams in self._open.items() if any(not response.closed for _, response in streams)
        }
        self._sweep_at = max(_SWEEP_FIRST, 2 * len(self._open))

    def healed(self, record: SessionRecord) -> None:
        """The session now runs on ``record``'s upstream session: end its streams on any other."""
        client_session_id, upstream_session_id = record.client_session_id, record.upstream_session_id
        streams = self._open.pop(client_session_id, [])
        kept = [(sid, response) for sid, response in streams if sid == upstream_session_id and not response.closed]
        if kept:
            self._open[client_session_id] = kept
        ending = [response for sid, response in streams if sid != upstream_session_id and not response.closed]
        for response in ending:
            supersede(response)
        if ending:
            log.info("stream.superseded", client_session=client_session_id[:8], streams=len(ending))

    def listening(self, client_session_id: str) -> bool:
        """Whether the session's client has had a server stream since it last opened one (open now, or
        ended and not yet reattached: a restart breaks it before the heal)."""
        return client_session_id in self._open

    def open_on(self, record: SessionRecord) -> bool:
        """Whether a stream is open on ``record``'s upstream session already (the heal a caller waited for
        was over before it asked, and the client's stream has moved)."""
        return any(
            sid == record.upstream_session_id and not response.closed
            for sid, response in self._open.get(record.client_session_id, ())
        )

    def forget(self, client_session_id: str) -> None:
        """The session ended: its streams end with their fronts (nothing to keep for them here)."""
        self._open.pop(client_session_id, None)
