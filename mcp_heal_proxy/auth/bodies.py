"""Reading the small bodies of OAuth traffic whole, with a cap.

``StreamReader.read(n)`` returns what happens to be buffered, which on a real network is often the
first TCP segment only: a metadata document, a registration or a token answer read that way arrives
cut. These read to the end of the body (or past the cap, which refuses it) in both directions: the
client's requests to the stand-in and the answers of the upstream's servers.
"""

from __future__ import annotations

from typing import Final

import aiohttp
from aiohttp import web

# Metadata, registrations, token and revocation requests and answers are a few kilobytes at most.
OAUTH_BODY_LIMIT: Final = 64 * 1024


class BodyTooLarge(Exception):
    """The body is larger than the cap: not an OAuth document."""


async def read_whole(stream: aiohttp.StreamReader, limit: int = OAUTH_BODY_LIMIT) -> bytes:
    """The whole body, read until its end; BodyTooLarge past ``limit`` bytes (the rest is left unread)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body larger than {limit} bytes")


async def request_body(request: web.Request, limit: int = OAUTH_BODY_LIMIT) -> bytes:
    """A client's request body, whole; BodyTooLarge when its Content-Length or its bytes exceed ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body larger than {limit} bytes")
    return await read_whole(request.content, limit)


async def response_body(response: aiohttp.ClientResponse, limit: int = OAUTH_BODY_LIMIT) -> bytes:
    """A server's answer body, whole; BodyTooLarge past ``limit`` (aiohttp errors and timeouts propagate)."""
    if response.content_length is not None and response.content_length > limit:
        raise BodyTooLarge(f"body larger than {limit} bytes")
    return await read_whole(response.content, limit)
