"""Constant-time comparison of a value a client sent with the one expected (tokens, OAuth state).

``secrets.compare_digest`` on two str raises TypeError when either holds a non-ASCII character, so a
client-chosen ``state=%C3%A9`` would end a login with a traceback or a request with a 500. Both sides
are compared as bytes instead: UTF-8, with surrogates passed through (aiohttp decodes header bytes
that are not UTF-8 into surrogates), which never raises and keeps distinct strings distinct.

No imports beyond the standard library: the CLI's fast paths import this too.
"""

from __future__ import annotations

import hmac


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


def same_secret(presented: str | bytes, expected: str | bytes) -> bool:
    """Whether ``presented`` equals ``expected``, in time that does not depend on where they differ."""
    return hmac.compare_digest(_bytes(presented), _bytes(expected))
