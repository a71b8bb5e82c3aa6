"""One client request and the answer to it, as the HTTP handlers see them, whichever server carries them.

The MCP endpoint's handlers (front/http.py) and the relay (front/relay.py) read the request and write the
answer only through an ``Exchange``. Two servers carry exchanges: aiohttp's (``AiohttpExchange``: every
route, the status page, OAuth) and the proxy's own HTTP/1.1 server for the hot path (front/http1.py:
``FastExchange``), which costs a fifth of aiohttp's server per request.

An answer is either whole (``answer``: status, headers and body at once) or streamed (``start``, then
``write`` as the upstream's bytes arrive, then ``end``). A write to a client that hung up raises
``ConnectionError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from aiohttp import web

from mcp_heal_proxy.errors import BodyTooLarge

# Header pairs of an answer, in order; a name may repeat.
HeaderPairs = Iterable[tuple[str, str]]


class Exchange(Protocol):
    """What the MCP endpoint's handlers need of a client's request and its answer."""

    @property
    def method(self) -> str:
        """The request's HTTP method."""

    @property
    def headers(self) -> Mapping[str, str]:
        """The request's headers (case-insensitive names)."""

    @property
    def status(self) -> int | None:
        """The status of the answer once given or started (None before)."""

    async def read_body(self, limit: int) -> bytes:
        """The request body; BodyTooLarge beyond ``limit`` bytes (refused without reading it all)."""

    async def answer(self, status: int, body: bytes, headers: HeaderPairs = (), reason: str | None = None) -> None:
        """Answer with a whole body."""

    async def start(
        self, status: int, reason: str | None, headers: HeaderPairs, *, hold: bool = False, length: int | None = None
    ) -> None:
        """Start a streamed answer. With ``hold`` the headers wait for the first ``write`` or the ``end``,
        to go out with it in one write: only when the caller makes that write at once. With ``length``
        the answer is that many bytes (Content-Length, as the upstream gave it), else chunked."""

    async def write(self, data: bytes) -> None:
        """Write part of a streamed answer (waits while the client reads slower than it is written)."""

    async def end(self, tail: bytes = b"") -> None:
        """End a streamed answer, ``tail`` being its last bytes."""

    def abort(self) -> None:
        """Close the client's connection without ending the streamed answer: what the client got is
        then visibly incomplete (no last chunk, or short of its length), never a whole answer."""


class _WithFirstBytes(web.StreamResponse):
    """A streamed answer whose first bytes are written right after prepare: its headers go out with
    them in one write (aiohttp's StreamResponse writes headers on their own at prepare; its Response
    does not, by this same class attribute).

    The attribute is private: aiohttp has no public way to hold a StreamResponse's headers for its
    first write (a Response needs its whole body first). Guarded by tests/test_relay_writes.py::
    test_a_complete_sse_answer_goes_to_the_client_in_one_write on aiohttp's server, which counts writes."""

    _send_headers_immediately = False


class AiohttpExchange:
    """An exchange carried by aiohttp's server: the handler returns ``response`` when done."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def headers(self) -> Mapping[str, str]:
        return self.request.headers

    @property
    def status(self) -> int | None:
        return self.response.status if self.response is not None else None

    async def read_body(self, limit: int) -> bytes:
        request = self.request
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"request body over the {limit}-byte limit")
        chunks: list[bytes] = []
        size = 0
        content = request.content
        # readany, not iter_any: the same reads without an iterator and its frames (a body usually
        # arrives in one piece, with the headers).
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body over the {limit}-byte limit")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def answer(self, status: int, body: bytes, headers: HeaderPairs = (), reason: str | None = None) -> None:
        # Sent by aiohttp once the handler returns it.
        # An empty body is None to aiohttp: Content-Length 0 and no Content-Type of its choosing.
        self.response = web.Response(status=status, reason=reason, headers=list(headers), body=body or None)

    async def start(
        self, status: int, reason: str | None, headers: HeaderPairs, *, hold: bool = False, length: int | None = None
    ) -> None:
        response_class = _WithFirstBytes if hold else web.StreamResponse
        response = response_class(status=status, reason=reason, headers=list(headers))
        if length is not None:
            response.content_length = length
        self.response = response
        await response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self, tail: bytes = b"") -> None:
        assert self.response is not None
        await self.response.write_eof(tail)

    def abort(self) -> None:
        # aiohttp then fails to end the response on the closed transport and closes the connection.
        transport = self.request.transport
        if transport is not None:
            transport.abort()
