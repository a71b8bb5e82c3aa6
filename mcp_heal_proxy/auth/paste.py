"""Lines pasted on stdin while ``login --no-browser`` waits for its loopback callback.

On a remote machine the browser's last redirect (to ``http://127.0.0.1:PORT/callback?code=...``) does
not reach the login; the user pastes that address instead, and the login checks its ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import AsyncIterator
from typing import Final, TextIO
from urllib.parse import parse_qsl, urlsplit

from mcp_heal_proxy.constant_time import same_secret

# A pasted line longer than this is not an authorization answer (StreamReader's line limit).
PASTE_LIMIT: Final = 16 * 1024


@contextlib.asynccontextmanager
async def stdin_lines(stream: TextIO | None = None) -> AsyncIterator[asyncio.StreamReader | None]:
    """A reader of ``stream`` (stdin) when it is a terminal or a pipe; None when nothing can be pasted
    there (a file, /dev/null, closed). Leaves stdin as it found it (blocking mode, still open)."""
    stream = sys.stdin if stream is None else stream
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        yield None
        return
    # A terminal or a pipe; not a file, nor another character device such as /dev/null (which the
    # event loop cannot watch: uvloop aborts the process on it).
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
        yield None
        return
    blocking = os.get_blocking(fd)
    # A duplicate, so that closing the transport leaves stdin itself open.
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    reader = asyncio.StreamReader(limit=PASTE_LIMIT)
    try:
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except (OSError, ValueError):  # cannot be watched after all
        pipe.close()
        os.set_blocking(fd, blocking)
        yield None
        return
    try:
        yield reader
    finally:
        transport.close()
        # The duplicate shares the terminal's flags: put blocking mode back for the shell.
        with contextlib.suppress(OSError):
            os.set_blocking(fd, blocking)


async def read_pasted(reader: asyncio.StreamReader, state: str, out: TextIO) -> dict[str, str]:
    """The query of the first pasted URL whose ``state`` is this login's, exactly; other lines are
    answered with what is wrong with them. At the end of the input, waits on (the callback may still
    come)."""
    while True:
        try:
            line = (await reader.readline()).decode(errors="replace").strip()
        except ValueError:  # a line over PASTE_LIMIT
            say(out, "That line is too long to be the address; paste the address the browser was sent to.")
            continue
        if not line:
            if reader.at_eof():
                await asyncio.Future()  # nothing more will be pasted: the callback or the timeout decides
            continue
        params = dict(parse_qsl(urlsplit(line).query, keep_blank_values=True))
        if not same_secret(params.get("state", ""), state):
            say(
                out,
                "That address is not the answer to this login (its state does not match); paste the address "
                "the browser was sent to after you logged in.",
            )
            continue
        return params


def say(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()
