"""TLS to upstreams: whom to trust, which certificate to show, and what a failed handshake means.

Trust is the system's (OpenSSL's default paths, which honour ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``)
plus, when set, the upstream's ``ca_file`` (or ``[server] ca_file``): a corporate or test CA is added,
never put in place of the public ones. Verification is always on; no setting turns it off.

Every outbound request of one upstream (both HTTP clients, GET streams, the OAuth requests) uses the
one context ``client_context`` returns for its settings, made once per process and then shared: loading
the system's CA store takes tens of milliseconds, and a context is safe to share between connections.

``tls_failure`` turns an ``ssl`` exception (wherever in a chain of causes it sits) into one sentence that
names the cause and the fix. A failed certificate check or handshake is not the network being down: it
will fail the same way on every attempt, so it is reported at once instead of retried.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Final

import aiohttp

from mcp_heal_proxy.config import UpstreamConfig

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that name a certificate nobody here vouches for.
_UNTRUSTED: Final = frozenset(
    {
        2,  # unable to get issuer certificate
        18,  # self-signed certificate
        19,  # self-signed certificate in certificate chain
        20,  # unable to get local issuer certificate
        21,  # unable to verify the first certificate
        27,  # certificate not trusted
    }
)
_EXPIRED: Final = 10
_NOT_YET_VALID: Final = 9
_WRONG_HOST: Final = frozenset({62, 64})  # hostname mismatch, IP address mismatch
# The alert that means "show me a client certificate" (TLS 1.3's certificate_required; a TLS 1.2 server
# sends a bare handshake_failure, which the generic message covers).
_CLIENT_CERT_WANTED: Final = ("CERTIFICATE_REQUIRED", "certificate required")
# What OpenSSL says when the other side's first bytes are not a TLS record: a plain HTTP server.
_NOT_TLS: Final = ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure", "http request")
# A connection that ended (or broke at the socket) under TLS: not a refusal.
_ENDED: Final = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


class HandshakeFailed(aiohttp.ClientConnectionError):
    """The lean client's TLS handshake failed (a certificate refused, a client certificate wanted, no TLS
    at all); the ``ssl`` exception is its cause. Not a ``ClientOSError``: never retried as a refused
    connection is."""


def client_context(ca_file: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    """The context for connections to an upstream with these settings (one per distinct settings and
    SSL_CERT_FILE / SSL_CERT_DIR, so that a changed variable is seen by upstreams made after it).

    Raises ``ssl.SSLError`` or ``OSError`` for files that cannot be loaded (config.py checks them first).
    """
    environ = os.environ
    return _context(ca_file, client_cert, client_key, environ.get("SSL_CERT_FILE"), environ.get("SSL_CERT_DIR"))


@functools.cache
def _context(
    ca_file: str | None, client_cert: str | None, client_key: str | None, _cert_file: str | None, _cert_dir: str | None
) -> ssl.SSLContext:
    # create_default_context loads OpenSSL's default verify paths: SSL_CERT_FILE / SSL_CERT_DIR if set.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    if client_cert is not None:
        # A password callback, so that an encrypted key fails with an error instead of prompting on a
        # terminal the proxy may not have.
        context.load_cert_chain(client_cert, client_key, password=_no_password)
    return context


def tls_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """The context for every outbound connection of one upstream (MCP requests, streams, OAuth)."""
    return client_context(upstream.ca_file, upstream.client_cert, upstream.client_key)


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give client_key an unencrypted PEM key")


def find_ssl_error(exc: BaseException | None) -> ssl.SSLError | ssl.CertificateError | None:
    """The ssl exception behind ``exc``: itself, or one of its causes (aiohttp keeps it in attributes)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # aiohttp's own classes derive from ssl's too, without its attributes (verify_code): not those.
        if isinstance(exc, ssl.SSLError | ssl.CertificateError) and not isinstance(exc, aiohttp.ClientError):
            return exc
        for attribute in ("certificate_error", "os_error"):
            inner = getattr(exc, attribute, None)
            if isinstance(inner, ssl.SSLError | ssl.CertificateError) and not isinstance(inner, aiohttp.ClientError):
                return inner
        exc = exc.__cause__ or exc.__context__
    return None


def is_refusal(exc: BaseException | None) -> bool:
    """Whether ``exc`` is TLS refusing the connection (a certificate, an alert, no TLS at all), as opposed
    to a connection that merely ended: an EOF without close_notify (a server killed mid-connection, as in
    a restart) is the network, retried as such."""
    return isinstance(exc, ssl.SSLError | ssl.CertificateError) and not isinstance(exc, _ENDED)


def tls_failure(exc: BaseException, host: str) -> str | None:
    """What a failed TLS connection to ``host`` means for the user, cause and fix; None if ``exc`` is not
    a TLS failure."""
    found = find_ssl_error(exc)
    if found is None or not is_refusal(found):
        return None
    if isinstance(found, ssl.SSLCertVerificationError):
        code = found.verify_code
        detail = found.verify_message or found.reason or str(found)
        if code in _UNTRUSTED:
            return (
                f"the upstream's certificate is not trusted ({detail}); set ca_file to the PEM file of the CA "
                "that issued it (a corporate or private CA), or add that CA to the system's trust (SSL_CERT_FILE)"
            )
        if code == _EXPIRED:
            return (
                f"the upstream's certificate has expired ({detail}); the server must renew it "
                "(or this machine's clock is wrong)"
            )
        if code == _NOT_YET_VALID:
            return f"the upstream's certificate is not valid yet ({detail}); check this machine's clock"
        if code in _WRONG_HOST:
            return (
                f"the upstream's certificate is not for {host} ({detail}); put a host name the certificate "
                "names in the upstream URL"
            )
        return f"the upstream's certificate was refused ({detail}); check the server's certificate"
    if isinstance(found, ssl.CertificateError):
        return f"the upstream's certificate was refused ({found}); check the server's certificate"
    reason = found.reason or str(found)
    text = f"{reason} {found}"
    if any(marker in text for marker in _CLIENT_CERT_WANTED):
        return (
            f"TLS handshake with the upstream failed ({reason}): it asks for a client certificate; "
            "set client_cert and client_key"
        )
    if any(marker in text for marker in _NOT_TLS):
        return (
            f"TLS handshake with the upstream failed ({reason}): it does not speak TLS on that port; "
            "use an http:// URL if it is a plain HTTP server, or the port of its https listener"
        )
    return (
        f"TLS handshake with the upstream failed ({reason}); check that the URL names the server's "
        "https port, that the server accepts TLS 1.2 or later, and whether it asks for a client "
        "certificate (set client_cert and client_key)"
    )
