"""Tokens of proxy-managed logins: one file per upstream under the state directory.

``login`` writes the file, ``serve`` reads it and writes refreshed tokens back, ``logout`` deletes it.
Files are created with mode 0600 in a 0700 directory, and replaced atomically (write, fsync, rename),
so that a reader never sees half a file. A lock file per upstream keeps two processes (two proxies, or
a proxy and a ``login``) from refreshing or logging in at the same time: the one that waited re-reads
the file and uses what the other one obtained, instead of spending a rotated refresh token twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Final

from mcp_heal_proxy.config import MEMORY_STATE, default_state_path
from mcp_heal_proxy.display import mask_url

try:
    import fcntl
except ImportError:  # Windows: one process at a time is the user's to ensure
    fcntl = None  # type: ignore[assignment]

# Refuse to wait forever for another process's login or refresh.
LOCK_TIMEOUT: Final = 60.0
_LOCK_POLL: Final = 0.05


class TokenFileError(Exception):
    """The token file or its lock could not be used (reported in one line)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What one login obtained, and what refreshing it needs. Every ``*token`` and the secret are secrets."""

    upstream_url: str
    token_endpoint: str
    client_id: str
    # client_secret_basic, client_secret_post or none (RFC 7591 names).
    auth_method: str
    access_token: str
    client_secret: str | None = None
    resource: str | None = None
    issuer: str | None = None
    refresh_token: str | None = None
    # Seconds since the epoch; None when the authorization server did not say.
    expires_at: float | None = None
    obtained_at: float = 0.0
    scope: str | None = None
    # A scope an upstream asked for (403 insufficient_scope) that this grant lacks: the next login
    # asks for it too.
    wanted_scope: str | None = None
    # When the login that started this grant finished (refreshes keep it): tells a login that waited
    # for another one that the other one succeeded.
    logged_in_at: float = 0.0
    # The authorization server's RFC 7009 revocation endpoint, when it has one: ``logout`` tells it.
    revocation_endpoint: str | None = None

    def __repr__(self) -> str:
        # Never print tokens, even in a traceback or a debugger.
        return (
            f"Grant(upstream_url={mask_url(self.upstream_url)!r}, client_id={self.client_id!r}, scope={self.scope!r})"
        )

    def expires_soon(self, now: float | None = None) -> bool:
        """Whether the access token is expired or about to: refreshed before use then."""
        if self.expires_at is None:
            return False
        now = time.time() if now is None else now
        lifetime = max(self.expires_at - self.obtained_at, 0.0)
        # A margin for the request's own flight time, never more than a tenth of a short lifetime.
        margin = min(30.0, lifetime / 10)
        return now >= self.expires_at - margin

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Grant | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError:
            return None


def tokens_directory(state: str) -> Path:
    """Where logins are kept: beside the session store when it is a file, else the default state directory."""
    if state != MEMORY_STATE and "://" not in state:
        base = Path(state).expanduser().parent
    else:
        base = Path(default_state_path()).parent
    return base / "oauth"


class TokenFile:
    """The login of one upstream on disk."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.path = directory / f"{name}.json"
        self._name = name

    def load(self, upstream_url: str) -> Grant | None:
        """The stored grant for this upstream URL; None when there is none (or it was for another URL)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenFileError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        grant = Grant.from_json(text)
        if grant is None or grant.upstream_url != upstream_url:
            return None
        return grant

    def stamp(self) -> int | None:
        """Changes whenever the file is replaced (another process refreshed, or a new login)."""
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def save(self, grant: Grant) -> None:
        """Replace the file atomically; mode 0600 from the first byte."""
        self._ensure_directory()
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(grant.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise TokenFileError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def remember_wanted_scope(self, upstream_url: str, scope: str) -> None:
        """Note a scope the upstream asked for, so that the next login requests it."""
        grant = self.load(upstream_url)
        if grant is not None and grant.wanted_scope != scope:
            self.save(replace(grant, wanted_scope=scope))

    def delete(self) -> bool:
        """Forget the login; whether there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise TokenFileError(f"cannot delete {self.path}: {exc.strerror or exc}") from None
        return True

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise TokenFileError(f"cannot create {self.directory}: {exc.strerror or exc}") from None

    @contextlib.asynccontextmanager
    async def lock(self, patience: float = LOCK_TIMEOUT, purpose: str = "tokens") -> AsyncIterator[None]:
        """Hold one of this upstream's locks (across processes); waits at most ``patience`` seconds.

        "tokens" guards reading, refreshing and writing the file; "login" lets one login run at a time
        without holding up refreshes while a user takes their time in the browser.
        """
        if fcntl is None:
            yield
            return
        self._ensure_directory()
        lock_path = self.directory / (f"{self._name}.lock" if purpose == "tokens" else f"{self._name}.{purpose}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise TokenFileError(f"cannot open {lock_path}: {exc.strerror or exc}") from None
        try:
            give_up = time.monotonic() + patience
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= give_up:
                        raise TokenFileError(
                            f"another mcp-heal-proxy process holds {lock_path} (a {purpose} in progress)"
                        ) from None
                    # Polling instead of a blocking flock in a thread: a cancelled waiter leaves nothing behind.
                    await asyncio.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing releases the lock
