"""Sealed client session ids: a client session that outlives the loss of the session store.

The client-facing session id carries what a heal needs (the upstream's config name, the client's
initialize params, the negotiated protocol version), sealed with a key: any proxy that holds the key
(this one after a restart, every replica sharing one Redis) can re-create the session from the id alone
when the store no longer knows it (a Redis that restarted empty, ``--state :memory:`` across a restart, a
deleted SQLite file). The store keeps what changes (the upstream session id, the state the client set);
its loss costs one heal and that state, never the session.

The form is ``NONCE.PAYLOAD.TAG``, visible ASCII only (a header value):

* NONCE: 128 random bits as 32 hex digits, first, so that two sessions with the same initialize params
  differ from the first character on (logs, the status page and ``sessions forget`` show and take an id's
  first 8 characters: hex as before sealing, never a leading "-" that a command line would take for an
  option).
* PAYLOAD: the sealed session as compact JSON, raw-deflated, base64url without padding. Signed, not
  encrypted: it holds only what the client itself sent and the version it was answered.
* TAG: HMAC-SHA256 over ``NONCE.PAYLOAD`` with a key derived from the configured secret, truncated to
  128 bits, base64url. Checked in constant time before anything is decoded, so an id the proxy did not
  issue (forged, altered, issued under another key) is refused without decompressing a byte of it.

Everything here is pure except the key file helper (``key_from_file``), read once at start.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mcp_heal_proxy.wire.headers import MAX_SESSION_ID_LENGTH

# Bound into the derived key: ids of another format (or another use of the same secret) never open.
_KEY_LABEL: Final = b"mcp-heal-proxy client session id v1"
_NONCE_BYTES: Final = 16
_TAG_BYTES: Final = 16
_SEPARATOR: Final = "."
# The longest id the proxy issues, as long as it accepts (wire/headers.py): a header well inside every
# server's limits (aiohttp's 8190 per field). Initialize params that do not fit (a client whose clientInfo carries
# inline icons, say) get a random id instead: such a session works as before, it just does not outlive the
# store.
MAX_SEALED_ID: Final = MAX_SESSION_ID_LENGTH
# Raw deflate (no zlib header: the tag already guards the bytes) with a 512-byte window.
_WINDOW_BITS: Final = 9
# A payload inflates to at most this much: it is the proxy's own (the tag was checked first), so this only
# bounds the damage a leaked key could do.
_MAX_PAYLOAD: Final = 64 * 1024
# What a generated key file holds: 256 random bits as hex (a valid session_key, to copy to other replicas).
_KEY_FILE_BYTES: Final = 32
KEY_FILE_NAME: Final = "session.key"


@dataclass(frozen=True, slots=True)
class SealedSession:
    """What a sealed id carries: enough to re-create the session's record and heal it."""

    upstream: str
    initialize_params: Mapping[str, Any]
    protocol_version: str | None
    # A session the bridge holds itself in front of a 2026-07-28-only upstream (bridge/core.py).
    bridged: bool = False


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # validate=True is not offered for the urlsafe alphabet: map it to the standard one and check strictly.
    standard = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(standard + "=" * (-len(text) % 4), validate=True)


class SessionSealer:
    """Issues and opens sealed client session ids with one key."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("a session key must not be empty")
        # Derived, not used as it is: the configured secret never meets the ids directly.
        self._key = hmac.new(raw, _KEY_LABEL, hashlib.sha256).digest()

    @classmethod
    def ephemeral(cls) -> SessionSealer:
        """A sealer whose key dies with the process (the stdio bridge, whose client never sees an id)."""
        return cls(secrets.token_bytes(_KEY_FILE_BYTES))

    def _tag(self, sealed: str) -> str:
        digest = hmac.new(self._key, sealed.encode("ascii"), hashlib.sha256).digest()
        return _b64encode(digest[:_TAG_BYTES])

    def seal(self, session: SealedSession) -> str | None:
        """A new client session id carrying ``session``; None when it would exceed MAX_SEALED_ID."""
        document: dict[str, Any] = {
            "u": session.upstream,
            "p": dict(session.initialize_params),
            "v": session.protocol_version,
        }
        if session.bridged:
            document["b"] = 1
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        # Raw deflate with a small window and little memory: payloads are a few hundred bytes, and zlib's
        # defaults (a 32 KiB window, 256 KiB of state) cost eight times the time for the same size.
        deflater = zlib.compressobj(6, zlib.DEFLATED, -_WINDOW_BITS, 1)
        payload = deflater.compress(text) + deflater.flush()
        sealed = secrets.token_hex(_NONCE_BYTES) + _SEPARATOR + _b64encode(payload)
        session_id = sealed + _SEPARATOR + self._tag(sealed)
        return session_id if len(session_id) <= MAX_SEALED_ID else None

    def open(self, session_id: str) -> SealedSession | None:
        """What an id issued with this key carries; None for anything else (never raises)."""
        if len(session_id) > MAX_SEALED_ID or session_id.count(_SEPARATOR) != 2:
            return None
        sealed, _, tag = session_id.rpartition(_SEPARATOR)
        try:
            expected = self._tag(sealed)
        except UnicodeEncodeError:
            return None
        if not hmac.compare_digest(expected.encode("ascii"), tag.encode("utf-8", "replace")):
            return None
        # From here on the id is the proxy's own: a failure below means a format this version cannot read.
        try:
            inflater = zlib.decompressobj(-_WINDOW_BITS)
            text = inflater.decompress(_b64decode(sealed.partition(_SEPARATOR)[2]), _MAX_PAYLOAD)
            if inflater.unconsumed_tail:
                return None
            document = json.loads(text)
        except (binascii.Error, ValueError, zlib.error, RecursionError):
            return None
        if not isinstance(document, dict):
            return None
        upstream, params, version = document.get("u"), document.get("p"), document.get("v")
        if not isinstance(upstream, str) or not isinstance(params, dict):
            return None
        if version is not None and not isinstance(version, str):
            return None
        return SealedSession(upstream, params, version, bridged=document.get("b") == 1)


def key_from_file(directory: Path) -> str | None:
    """The session key kept in ``directory/session.key``, made there the first time (0600).

    Two proxies starting together agree on one key: the key is written to a private temporary file and
    linked into place, which fails for all but the first (``link`` does not replace), and the others read
    the first one's complete file. Returns None when the directory cannot hold a key (a read-only file
    system): the caller then uses a key that lives as long as the process. A file that exists but holds
    no key raises ValueError (the proxy must not silently replace a key other processes use).
    """
    path = directory / KEY_FILE_NAME
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    except OSError:
        return None  # unreadable, or not a directory
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = directory / f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                file.write(secrets.token_hex(_KEY_FILE_BYTES) + "\n")
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)  # another process came first: its key is the key
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        return _read_key(path)
    except OSError:
        return None


def _read_key(path: Path) -> str:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if len(text) != 2 * _KEY_FILE_BYTES or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{path} does not hold a session key: delete it (a new one is made) or set session_key")
    return text
