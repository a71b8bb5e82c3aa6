"""The server streams (GET) the engine opened, by client session and generation.

A heal moves a client session to a new upstream session. A server stream still open on the old one (the
upstream forgot the session without closing its streams: a failover to a replica that never saw it, a
server whose session table lost the entry) would stay open for good and carry nothing: what the new
session sends on its own (resources/updated for the subscriptions the heal re-applied, the server's
requests) goes to the new session's stream, which nobody opened. So a heal ends the streams on the
upstream sessions it moved on from; the fronts see them end as superseded and reattach (with their
backoff) on the new session.

Streams are told apart by upstream session id, not generation: a session restored from its sealed id
starts again at generation 0. Per process: a heal in another proxy process (a shared store) ends no stream
here; the engine compares each stream it opens with the store's record, which catches that case and a
heal that ended while the stream's GET was on its way.
"""

from __future__ import annotations

import aiohttp
import structlog

from mcp_heal_proxy.engine.answers import supersede

log = structlog.get_logger("mcp_heal_proxy.engine.streams")


class ServerStreams:
    """Open upstream GET responses by client session id, each with the upstream session it is on."""

    def __init__(self) -> None:
        self._open: dict[str, list[tuple[str, aiohttp.ClientResponse]]] = {}

    def opened(self, client_session_id: str, upstream_session_id: str, response: aiohttp.ClientResponse) -> None:
        """A stream opened on this upstream session (the ones since closed are dropped here, so that the
        table holds no more than the streams open now)."""
        if response.status != 200:
            return  # no stream: the front releases the refusal
        streams = [entry for entry in self._open.get(client_session_id, ()) if not entry[1].closed]
        streams.append((upstream_session_id, response))
        self._open[client_session_id] = streams

    def healed(self, client_session_id: str, upstream_session_id: str) -> None:
        """The session now runs on ``upstream_session_id``: end its streams on any other."""
        streams = self._open.pop(client_session_id, [])
        kept = [(sid, response) for sid, response in streams if sid == upstream_session_id and not response.closed]
        if kept:
            self._open[client_session_id] = kept
        ending = [response for sid, response in streams if sid != upstream_session_id and not response.closed]
        for response in ending:
            supersede(response)
        if ending:
            log.info("stream.superseded", client_session=client_session_id[:8], streams=len(ending))

    def forget(self, client_session_id: str) -> None:
        """The session ended: its streams end with their fronts (nothing to keep for them here)."""
        self._open.pop(client_session_id, None)
