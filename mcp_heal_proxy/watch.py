"""``mcp-heal-proxy sessions`` and ``mcp-heal-proxy tail``: what a running proxy holds and sees.

``sessions`` reads the store directly (see inventory.py), so it works whether or not a proxy runs.
``sessions forget ID`` asks the running proxy to end the session (upstream DELETE, then the record);
when no proxy answers, it deletes the record only and says so. ``tail`` follows a running proxy's event
feed (``/_proxy/api/events``) and prints one line per request or heal, reconnecting with a bounded
backoff while the proxy restarts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from mcp_heal_proxy.config import DEFAULT_PORT, MEMORY_STATE, ProxyConfig
from mcp_heal_proxy.display import mask_url, terminal_safe
from mcp_heal_proxy.errors import connection_failure
from mcp_heal_proxy.inventory import (
    RedisReader,
    age,
    forget_sqlite,
    is_redis,
    read_state,
    resolve,
    summary,
)
from mcp_heal_proxy.status import API, EVENTS_PATH
from mcp_heal_proxy.wire.sse import Event, SSEParser

DEFAULT_PROXY_URL: Final = f"http://127.0.0.1:{DEFAULT_PORT}"
# tail: wait this long between reconnection attempts (doubling), and give up after this long without
# a connection (a proxy restart takes a second or two).
RECONNECT_FIRST: Final = 0.25
RECONNECT_MAX: Final = 5.0
DEFAULT_GIVE_UP: Final = 60.0


class WatchError(Exception):
    """A user-facing failure of ``sessions`` or ``tail``: one line, exit status 1."""


# --- sessions -----------------------------------------------------------------------------------------

_COLUMNS: Final = (
    ("SESSION", "id"),
    ("UPSTREAM", "upstream"),
    ("CLIENT", "client"),
    ("PROTOCOL", "protocol_version"),
    ("HEALS", "heals"),
    ("CREATED", "created"),
    ("LAST USED", "last_used"),
    ("SUBSCRIPTIONS", "subscriptions"),
    ("LOG LEVEL", "log_level"),
)


def _cell(key: str, row: Mapping[str, Any], now: float) -> str:
    # Client name and version, protocol version, log level and subscribed URIs are the client's
    # choice: terminal_safe keeps their control characters from acting on the terminal.
    return terminal_safe(_text(key, row, now))


def _text(key: str, row: Mapping[str, Any], now: float) -> str:
    value = row[key]
    if key == "id":
        return str(value)[:8]
    if key == "client":
        return f"{value} {row['client_version']}".strip() if value else "-"
    if key in ("created", "last_used"):
        return f"{age(value, now)} ago"
    if key == "subscriptions":
        return ", ".join(value) if value else "-"
    if key == "protocol_version" and row.get("bridged"):
        return f"{value} (bridged to 2026-07-28)"  # the proxy holds the session (bridge/)
    return "-" if value is None else str(value)


def format_sessions(rows: list[dict[str, Any]], now: float | None = None) -> str:
    """The sessions as an aligned table (what ``sessions`` prints on a terminal)."""
    if not rows:
        return "no sessions"
    moment = time.time() if now is None else now
    table = [[title for title, _ in _COLUMNS]] + [[_cell(key, row, moment) for _, key in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    return "\n".join(lines)


def list_sessions(state: str, *, as_json: bool, out: TextIO) -> int:
    """Print the sessions of a store; exit status."""
    records = asyncio.run(read_state(state))
    rows = [summary(record, full=True) for record in records]
    if as_json:
        out.write(json.dumps(rows, indent=2) + "\n")
    else:
        out.write(format_sessions(rows) + "\n")
    return 0


def _proxy_base(config: ProxyConfig | None, proxy_url: str | None) -> str:
    if proxy_url:
        return proxy_url.rstrip("/")
    if config is None:
        return DEFAULT_PROXY_URL
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.port}"


def token_hint(token: str | None, again: str) -> str:
    """What to do when the proxy refuses ``tail`` or ``sessions forget``: the token comes from the
    environment (a flag would show it in the process list), so the hint is the same command with it set."""
    if token:
        return (
            "it refused the token sent (MCP_HEAL_PROXY_TOKEN, else the config's [server] token); "
            f"set MCP_HEAL_PROXY_TOKEN to the running proxy's [server] token: `MCP_HEAL_PROXY_TOKEN=TOKEN {again}`"
        )
    return f"the proxy has a token: run `MCP_HEAL_PROXY_TOKEN=TOKEN {again}`, TOKEN being its [server] token"


def forget_session(
    state: str,
    session: str,
    *,
    config: ProxyConfig | None,
    proxy_url: str | None,
    token: str | None,
    out: TextIO,
    again: str = "mcp-heal-proxy sessions forget ID",
) -> int:
    """End one session: through the running proxy if it answers, else the record only. Exit status.
    ``again`` is the command as the user typed it (secrets masked), for hints."""
    return asyncio.run(_forget(state, session, _proxy_base(config, proxy_url), token, out, again))


async def _forget(state: str, prefix: str, base: str, token: str | None, out: TextIO, again: str) -> int:
    if state == MEMORY_STATE:
        records = []
    else:
        records = await read_state(state)
    try:
        record = resolve(records, prefix)
        client_session_id = record.client_session_id
    except LookupError as exc:
        if state != MEMORY_STATE or len(prefix) < 32:
            raise WatchError(str(exc)) from None
        client_session_id = prefix  # a :memory: store: only the proxy knows, so the full id is needed
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{base}{API}/sessions/{client_session_id}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.delete(url, headers=headers) as response,
        ):
            answer = await response.json(content_type=None) if response.status < 500 else None
            status = response.status
    except (aiohttp.ClientConnectionError, TimeoutError):
        answer, status = None, None
    short = client_session_id[:8]
    shown = mask_url(base)
    if status == 200 and isinstance(answer, dict):
        if answer.get("upstream_ended"):
            out.write(
                f"ended session {short}: the running proxy at {shown} sent DELETE to upstream "
                f"{terminal_safe(answer['upstream'])} "
                f"(it answered {answer['upstream_status']}) and forgot the session\n"
            )
        else:
            why = terminal_safe(answer.get("upstream_error") or f"it answered {answer.get('upstream_status')}")
            out.write(
                f"forgot session {short} through the running proxy at {shown}; the upstream did not end it ({why})\n"
            )
        return 0
    if status in (401, 403):
        raise WatchError(f"the proxy at {shown} refused the request ({status}): {token_hint(token, again)}")
    if status is not None and status != 404:
        raise WatchError(f"the proxy at {shown} answered {status}")
    # No proxy answers there (or it does not hold this session): the record only.
    if state == MEMORY_STATE:
        raise WatchError(f"no proxy at {shown} holds session {short}")
    if is_redis(state):
        reader = RedisReader(state)
        try:
            found = await reader.forget(client_session_id)
        finally:
            await reader.close()
    else:
        found = await asyncio.to_thread(forget_sqlite, state, client_session_id)
    if not found:
        raise WatchError(f"no session {short}")
    where = "no proxy answers at" if status is None else "the proxy does not hold it at"
    out.write(
        f"forgot session {short}: record deleted from the store only ({where} {shown}); "
        "the upstream session was not ended and expires on its own\n"
    )
    return 0


# --- tail ---------------------------------------------------------------------------------------------

_RESET: Final = "\x1b[0m"
_DIM: Final = "\x1b[2m"
_BOLD: Final = "\x1b[1m"
_GREEN: Final = "\x1b[32m"
_YELLOW: Final = "\x1b[33m"
_RED: Final = "\x1b[31m"
_CYAN: Final = "\x1b[36m"


def events_url(url: str | None) -> str:
    """The events endpoint of a proxy, given its base URL (a full events URL is kept as is)."""
    base = (url or DEFAULT_PROXY_URL).rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WatchError(f"not an http(s) URL: {mask_url(url or '')!r}")
    if parts.path.endswith(EVENTS_PATH):
        return base
    return urlunsplit(parts._replace(path=EVENTS_PATH))


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"


def format_event(kind: str, item: Mapping[str, Any], *, color: bool) -> str | None:
    """One line for a request or heal event (None for events not worth a line)."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    # Method and tool names are the client's choice, an error may quote the upstream: every string is
    # made terminal_safe before it is written (the colours above are the only escapes in a line).
    item = {key: terminal_safe(value) if isinstance(value, str) else value for key, value in item.items()}
    if kind == "request":
        status = int(item["status"])
        status_color = _GREEN if status < 300 else _CYAN if status < 400 else _YELLOW if status < 500 else _RED
        what = item["method"] + (f" {item['tool']}" if item.get("tool") else "")
        line = (
            f"{paint(_clock(item['at']), _DIM)}  {item['upstream']}  {item.get('session') or '-':8}  "
            f"{what:32}  {paint(str(status), status_color)}  {item['duration_ms']:9.1f} ms"
        )
        return line + ("  " + paint("HEALED", _BOLD + _YELLOW) if item.get("healed") else "")
    if kind == "heal":
        healed = item["outcome"] == "healed"
        tone = _YELLOW if healed else _RED
        what = f"HEAL {item['reason']}"
        detail = f"generation {item['generation']}" if healed else (item.get("error") or "")
        return (
            f"{paint(_clock(item['at']), _DIM)}  {item['upstream']}  {item['session']:8}  "
            f"{paint(f'{what:32}', _BOLD + tone)}  {paint(item['outcome'], tone)}  "
            f"{item['duration_ms']:9.1f} ms  {detail}".rstrip()
        )
    if kind == "dropped":
        return paint(f"... {item['count']} events dropped (this terminal reads too slowly)", _DIM)
    return None


async def tail(
    url: str | None,
    *,
    as_json: bool,
    token: str | None,
    out: TextIO,
    give_up: float = DEFAULT_GIVE_UP,
    color: bool | None = None,
    again: str = "mcp-heal-proxy tail",
) -> int:
    """Follow the proxy's events until interrupted; exit status 1 once it stayed unreachable ``give_up`` s.
    ``again`` is the command as the user typed it (secrets masked), for hints."""
    target = events_url(url)
    shown = mask_url(target)  # a ?token= in the URL given is a secret
    paint = out.isatty() if color is None else color
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    delay = RECONNECT_FIRST
    unreachable_since: float | None = None
    announced = False
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while True:
            try:
                async with http.get(target, headers=headers) as response:
                    if response.status in (401, 403):
                        raise WatchError(f"{shown} refused the request ({response.status}): {token_hint(token, again)}")
                    if response.status != 200:
                        raise aiohttp.ClientResponseError(
                            response.request_info, (), status=response.status, message="not the event feed"
                        )
                    verb = "reconnected to" if announced else "following"
                    print(f"{verb} {shown}", file=sys.stderr, flush=True)
                    unreachable_since, delay, announced = None, RECONNECT_FIRST, True
                    parser = SSEParser()
                    async for chunk in response.content.iter_any():
                        for item in parser.feed(chunk):
                            if isinstance(item, Event) and item.event != "hello":
                                _print_event(item, as_json=as_json, color=paint, out=out)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                if isinstance(exc, aiohttp.ClientResponseError):
                    reason = f"it answered HTTP {exc.status}, not a proxy's event feed"
                else:
                    reason = connection_failure(exc).words
                moment = time.monotonic()
                if unreachable_since is None:
                    unreachable_since = moment
                    # "lost" only for a proxy this tail had followed; one it never reached is not lost.
                    if announced:
                        print(f"lost {shown} ({reason}); reconnecting", file=sys.stderr, flush=True)
                    elif give_up > 0:
                        print(
                            f"cannot reach {shown} ({reason}); retrying for {give_up:g} s", file=sys.stderr, flush=True
                        )
                if moment - unreachable_since >= give_up:
                    if announced:
                        raise WatchError(
                            f"lost {shown} ({reason}) and could not reconnect within {give_up:g} s"
                        ) from None
                    raise WatchError(
                        f"cannot reach {shown} ({reason}); gave up after {give_up:g} s: is the proxy running there?"
                    ) from None
            else:
                # The proxy ended the stream (shutdown): it may be restarting.
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    print(f"{shown} closed the feed; reconnecting", file=sys.stderr, flush=True)
            # Backoff, never past the moment to give up.
            left = unreachable_since + give_up - time.monotonic() if unreachable_since is not None else delay
            await asyncio.sleep(max(0.0, min(delay, left)))
            delay = min(delay * 2, RECONNECT_MAX)


def _print_event(event: Event, *, as_json: bool, color: bool, out: TextIO) -> None:
    try:
        item = json.loads(event.data)
    except ValueError:
        return
    if as_json:
        out.write(json.dumps(item, separators=(",", ":")) + "\n")
    else:
        line = format_event(event.event, item, color=color)
        if line is None:
            return
        out.write(line + "\n")
    out.flush()
