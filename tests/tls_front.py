"""A TLS terminator in front of a plain-HTTP test server, for the handshake failures a server reports itself.

It is the standard library's blocking ``ssl`` server socket, one thread per connection, relaying bytes to
the server behind it. Blocking matters: a refused handshake (no client certificate) sends its TLS alert
before the socket closes, as nginx, Go or Envoy do, whereas an asyncio server (uvicorn) drops the
connection without flushing the alert, which leaves the client nothing to name.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
from typing import Any

_CHUNK = 64 * 1024


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        raw: socket.socket = self.request
        raw.settimeout(10)
        client = self.server.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            client.do_handshake()
        except (OSError, ssl.SSLError):
            # The handshake failed and its alert went out. Close as nginx does (lingering): the client's
            # request, sent meanwhile, is read first, else the kernel answers it with a reset that may
            # destroy the alert before the client reads it.
            _linger(client)
            return
        rotated, self.server.rotated = self.server.rotated, None
        if rotated is not None:
            self.server.context = rotated
        try:
            client.settimeout(None)
            with socket.create_connection(("127.0.0.1", self.server.target_port), timeout=10) as backend:
                backend.settimeout(None)
                back = threading.Thread(target=_pump, args=(backend, client), daemon=True)
                back.start()
                _pump(client, backend)
                back.join(10)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()


def _linger(client: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_WR)
        client.settimeout(2)
        while socket.socket.recv(client, _CHUNK):  # the raw bytes: TLS is over
            pass
    client.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until ``source`` ends, then end ``sink``'s writing side too (every error ends the copy)."""
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, context: ssl.SSLContext, target_port: int) -> None:
        self.context = context
        # Served from the handshake after the next successful one on (see TLSFront.rotate).
        self.rotated: ssl.SSLContext | None = None
        self.target_port = target_port
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that left mid-relay is no test failure


class TLSFront:
    """``https://127.0.0.1:{port}`` in front of ``http://127.0.0.1:{target_port}``, in a thread of the test
    process; ``close`` stops it."""

    def __init__(self, context: ssl.SSLContext, target_port: int) -> None:
        self._server = _Server(context, target_port)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def rotate(self, context: ssl.SSLContext) -> None:
        """Serve ``context`` (another certificate) once the next handshake succeeded with the current one."""
        self._server.rotated = context

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
