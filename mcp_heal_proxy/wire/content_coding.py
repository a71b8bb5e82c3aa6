"""Reading bodies an upstream compressed although the proxy asked for identity.

The proxy forwards such bodies untouched, with their ``Content-Encoding``; it only decodes what it
must read itself (an error body deciding whether the session expired, an initialize answer, the
responses on an SSE answer it watches). Codings it cannot decode are read as opaque bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Final

# zlib's window bits: 32 + 15 accepts a gzip or a zlib header; -15 is raw deflate.
_GZIP_OR_ZLIB: Final = 47
_RAW_DEFLATE: Final = -15
# Decoded bytes kept from one inspected body: a bound against a small compressed body that expands hugely.
DECODED_LIMIT: Final = 4 * 1024 * 1024

Decoder = Callable[[bytes], bytes]


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """An incremental decoder for this ``Content-Encoding``; None for identity or a coding not known here."""
    coding = (content_encoding or "").strip().lower()
    if coding in ("gzip", "x-gzip", "deflate"):
        return _ZlibDecoder(coding == "deflate")
    return None


class _ZlibDecoder:
    """gzip or deflate (zlib-wrapped, or raw as some servers send it), fed chunk by chunk."""

    __slots__ = ("_inner", "_raw_fallback", "_started")

    def __init__(self, deflate: bool) -> None:
        self._inner = zlib.decompressobj(_GZIP_OR_ZLIB)
        self._raw_fallback = deflate
        self._started = False

    def __call__(self, chunk: bytes) -> bytes:
        try:
            out = self._inner.decompress(chunk, DECODED_LIMIT)
        except zlib.error:
            if not self._raw_fallback or self._started:
                return b""
            self._inner = zlib.decompressobj(_RAW_DEFLATE)
            try:
                out = self._inner.decompress(chunk, DECODED_LIMIT)
            except zlib.error:
                return b""
        self._started = True
        return out


def decoded(body: bytes, content_encoding: str | None) -> bytes:
    """A whole body as the proxy should read it (undecodable bytes read as empty)."""
    decode = decoder_for(content_encoding)
    return body if decode is None else decode(body)
