"""OAuth metadata and challenges rewritten for the URL the client dialed: pure functions, no I/O.

A client that logs in through the proxy checks that the protected-resource metadata (RFC 9728) names
the URL it dialed, and follows the ``resource_metadata`` of a 401 challenge. The upstream's own
metadata names the upstream, so both are rewritten. When the proxy stands in as the authorization
server (for upstreams that bind tokens to their own URL), its metadata points the client's OAuth
endpoints at the proxy, which maps the ``resource`` it is given back to the upstream's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

PROTECTED_RESOURCE_WELL_KNOWN: Final = "/.well-known/oauth-protected-resource"
AUTHORIZATION_SERVER_WELL_KNOWN: Final = "/.well-known/oauth-authorization-server"
OPENID_WELL_KNOWN: Final = "/.well-known/openid-configuration"
# The stand-in authorization server's endpoints live under this prefix plus the upstream's path.
STAND_IN_PREFIX: Final = "/oauth"
STAND_IN_ENDPOINTS: Final = ("authorize", "callback", "token", "register", "revoke")

# Host[:port] as a client may send it: a name, an IPv4 address or a bracketed IPv6 address. Anything
# else (quotes, spaces, slashes) would let a client inject text into metadata or a challenge header.
_HOST: Final = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_SCHEMES: Final = frozenset({"http", "https"})

# RFC 9110 section 11: challenges are `scheme [token68 | auth-param *(, auth-param)]`, auth-param is
# `token BWS = BWS (token | quoted-string)`; several challenges may share one header value.
_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM: Final = re.compile(rf'\s*({_TOKEN})\s*=\s*({_TOKEN}|"(?:[^"\\]|\\.)*")\s*(?:,|$)')
_SCHEME: Final = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


def parse_networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Trusted proxy addresses or networks (``10.0.0.1``, ``10.0.0.0/8``); ValueError on a bad one."""
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def is_trusted(remote: str | None, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether a peer address lies in one of the trusted networks."""
    if not remote or not networks:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _first(value: str | None) -> str | None:
    """The first of a comma-separated forwarded list (the hop nearest the client)."""
    if not value:
        return None
    return value.split(",")[0].strip() or None


def dialed_origin(
    scheme: str,
    host: str | None,
    headers: Mapping[str, str],
    *,
    trusted: bool,
    fallback_host: str,
) -> str:
    """``scheme://host[:port]`` as the client dialed it.

    ``X-Forwarded-Proto``, ``-Host`` and ``-Port`` are believed only from a trusted proxy: from anyone
    else they would let a client make the proxy advertise another server's URL. A Host that is not a
    plain host[:port] is replaced by the proxy's own address.
    """
    if trusted:
        scheme = _first(headers.get("X-Forwarded-Proto")) or scheme
        host = _first(headers.get("X-Forwarded-Host")) or host
        port = _first(headers.get("X-Forwarded-Port"))
        if host and port and port.isdigit() and not re.search(r":\d+$", host):
            host = f"{host}:{port}"
    scheme = scheme.lower() if scheme.lower() in _SCHEMES else "http"
    if not host or not _HOST.match(host):
        host = fallback_host
    return f"{scheme}://{host}"


def protected_resource_metadata_url(origin: str, path: str) -> str:
    """RFC 9728's path-aware metadata URL for the resource at ``origin`` + ``path``."""
    return origin + PROTECTED_RESOURCE_WELL_KNOWN + ("" if path == "/" else path)


def stand_in_endpoint(origin: str, path: str, endpoint: str) -> str:
    """A stand-in authorization server endpoint for the upstream served at ``path``."""
    return f"{origin}{STAND_IN_PREFIX}{path}/{endpoint}"


def protected_resource_candidates(upstream_url: str) -> list[str]:
    """Where an upstream may publish its protected-resource metadata: path-aware first, then root."""
    parts = urlsplit(upstream_url)
    root = urlunsplit((parts.scheme, parts.netloc, PROTECTED_RESOURCE_WELL_KNOWN, "", ""))
    path = parts.path.rstrip("/")
    if not path:
        return [root]
    return [urlunsplit((parts.scheme, parts.netloc, PROTECTED_RESOURCE_WELL_KNOWN + path, "", "")), root]


def authorization_server_candidates(issuer: str) -> list[str]:
    """RFC 8414 path-inserted, then OpenID path-inserted, then OpenID path-appended metadata URLs.

    The root is asked only when the issuer has no path: an issuer with a path is a tenant of a
    shared host, and the root's metadata belongs to someone else.
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")

    def at(p: str) -> str:
        return urlunsplit((parts.scheme, parts.netloc, p, "", ""))

    if not path:
        return [at(AUTHORIZATION_SERVER_WELL_KNOWN), at(OPENID_WELL_KNOWN)]
    return [at(AUTHORIZATION_SERVER_WELL_KNOWN + path), at(OPENID_WELL_KNOWN + path), at(path + OPENID_WELL_KNOWN)]


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme)


def check_resource(resource: str, upstream_url: str) -> bool:
    """Whether protected-resource metadata naming ``resource`` may speak for ``upstream_url`` (RFC 9728
    sections 3.3 and 7.3): the one rule of the pass-through and the managed login.

    After normalization (scheme and host case, default port, trailing slash), the scheme, host and port
    must be the upstream's exactly, and the path the upstream's or a prefix of it on a segment boundary
    (a server's root metadata names its origin; the MCP SDKs accept that too). A fragment, user
    information, or a query other than the upstream's refuses it. Anything else is metadata for another
    server: a client would be sent to get tokens for it, and they would be sent there.
    """
    try:
        ours, theirs = urlsplit(upstream_url), urlsplit(resource)
        ours_port = ours.port or _default_port(ours.scheme.lower())
        theirs_port = theirs.port or _default_port(theirs.scheme.lower())
    except ValueError:
        return False
    if theirs.fragment or theirs.username is not None or theirs.password is not None:
        return False
    if theirs.scheme.lower() not in _SCHEMES or not theirs.hostname:
        return False
    if (ours.scheme.lower(), ours.hostname, ours_port) != (theirs.scheme.lower(), theirs.hostname, theirs_port):
        return False
    if theirs.query and theirs.query != ours.query:
        return False
    prefix = theirs.path.rstrip("/")
    path = ours.path.rstrip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def rewrite_protected_resource(
    metadata: Mapping[str, Any], resource: str, authorization_server: str | None
) -> dict[str, Any]:
    """The upstream's protected-resource metadata as the proxy serves it.

    ``resource`` becomes the URL the client dialed (clients refuse metadata naming another URL);
    ``authorization_server``, when the proxy stands in, replaces the list of authorization servers.
    Scopes and every other field are kept.
    """
    rewritten = dict(metadata)
    rewritten["resource"] = resource
    if authorization_server is not None:
        rewritten["authorization_servers"] = [authorization_server]
    return rewritten


# What the stand-in does not relay, or cannot relay correctly, and so must not advertise in its own
# name: endpoints it does not serve (pushed authorization requests, userinfo, introspection, logout,
# device and backchannel authorization), and mechanisms whose signed or bound target names the issuer
# or the endpoint the client talked to, which is the proxy (DPoP proofs, JWT client authentication,
# signed request objects, mutual TLS). The ID token of an OpenID login names the real server as its
# issuer, so ``openid`` and the ID token's parameters are not advertised either.
_NOT_RELAYED: Final = frozenset(
    {
        "pushed_authorization_request_endpoint",
        "require_pushed_authorization_requests",
        "userinfo_endpoint",
        "userinfo_signing_alg_values_supported",
        "userinfo_encryption_alg_values_supported",
        "userinfo_encryption_enc_values_supported",
        "introspection_endpoint",
        "introspection_endpoint_auth_methods_supported",
        "introspection_endpoint_auth_signing_alg_values_supported",
        "end_session_endpoint",
        "check_session_iframe",
        "frontchannel_logout_supported",
        "frontchannel_logout_session_supported",
        "backchannel_logout_supported",
        "backchannel_logout_session_supported",
        "device_authorization_endpoint",
        "backchannel_authentication_endpoint",
        "backchannel_token_delivery_modes_supported",
        "backchannel_authentication_request_signing_alg_values_supported",
        "backchannel_user_code_parameter_supported",
        "dpop_signing_alg_values_supported",
        "token_endpoint_auth_signing_alg_values_supported",
        "revocation_endpoint_auth_signing_alg_values_supported",
        "request_object_signing_alg_values_supported",
        "request_object_encryption_alg_values_supported",
        "request_object_encryption_enc_values_supported",
        "mtls_endpoint_aliases",
        "tls_client_certificate_bound_access_tokens",
        "id_token_signing_alg_values_supported",
        "id_token_encryption_alg_values_supported",
        "id_token_encryption_enc_values_supported",
    }
)
# Client authentication the stand-in relays as it is (the credentials do not name the endpoint).
_RELAYED_AUTH_METHODS: Final = ("client_secret_basic", "client_secret_post", "none")
# Grants whose requests the stand-in relays (the device code grant has no relayed endpoint).
_RELAYED_GRANTS: Final = ("authorization_code", "refresh_token")


def rewrite_authorization_server(metadata: Mapping[str, Any], origin: str, path: str) -> dict[str, Any]:
    """The upstream authorization server's metadata with the proxy standing in for it.

    ``issuer`` is the proxy's URL for this upstream (clients compare it with the URL they were sent
    to, character for character); the endpoints that take a ``resource`` or must see the client's
    registration move to the proxy; what the proxy does not relay is left out (``_NOT_RELAYED``, and
    the auth methods, grants, response types and scopes it cannot carry); the rest (scopes, PKCE
    methods, RFC 9207 ``iss`` support: the proxy then relays the redirect and sends its own ``iss``)
    stays.
    """
    rewritten = {key: value for key, value in metadata.items() if key not in _NOT_RELAYED}
    for key, relayed in (
        ("token_endpoint_auth_methods_supported", _RELAYED_AUTH_METHODS),
        ("revocation_endpoint_auth_methods_supported", _RELAYED_AUTH_METHODS),
        ("grant_types_supported", _RELAYED_GRANTS),
    ):
        if isinstance(rewritten.get(key), list):
            rewritten[key] = [value for value in rewritten[key] if value in relayed]
    if isinstance(rewritten.get("scopes_supported"), list):
        rewritten["scopes_supported"] = [scope for scope in rewritten["scopes_supported"] if scope != "openid"]
    if isinstance(rewritten.get("response_types_supported"), list):
        rewritten["response_types_supported"] = [
            kind for kind in rewritten["response_types_supported"] if kind == "code"
        ]
    # Defaults of OpenID discovery that would otherwise promise signed request objects by reference.
    rewritten["request_parameter_supported"] = False
    rewritten["request_uri_parameter_supported"] = False
    rewritten["issuer"] = origin + path
    rewritten["authorization_endpoint"] = stand_in_endpoint(origin, path, "authorize")
    rewritten["token_endpoint"] = stand_in_endpoint(origin, path, "token")
    for key, endpoint in (("registration_endpoint", "register"), ("revocation_endpoint", "revoke")):
        if metadata.get(key):
            rewritten[key] = stand_in_endpoint(origin, path, endpoint)
    return rewritten


def map_resource(value: str, proxy_path: str, upstream_resource: str) -> str:
    """The ``resource`` to send the upstream's authorization server for one the client sent.

    The client names the proxy's URL for this upstream (that is what the metadata told it); the
    authorization server must see the upstream's, or the token it mints is for the wrong audience.
    Any other value is left for the authorization server to judge.
    """
    parts = urlsplit(value)
    if parts.scheme in _SCHEMES and parts.path.rstrip("/") == proxy_path.rstrip("/"):
        return upstream_resource
    return value


# --- WWW-Authenticate ------------------------------------------------------------------------------


def parse_challenges(value: str) -> list[tuple[str, dict[str, str]]]:
    """The challenges in a ``WWW-Authenticate`` value: scheme and auth-params (quotes removed).

    Parsing stops at the first thing that is not a well-formed challenge; a token68 is skipped.
    """
    challenges: list[tuple[str, dict[str, str]]] = []
    position = 0
    while position < len(value):
        scheme = _SCHEME.match(value, position)
        if scheme is None:
            break
        position = scheme.end()
        params: dict[str, str] = {}
        while position < len(value):
            param = _PARAM.match(value, position)
            if param is None:
                break
            raw = param.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params[param.group(1).lower()] = raw
            position = param.end()
        if params or position >= len(value) or value[position:].lstrip().startswith(","):
            challenges.append((scheme.group(1), params))
        else:
            # A token68 (Basic xyz==) or garbage: skip to the next comma-separated challenge.
            comma = value.find(",", position)
            challenges.append((scheme.group(1), params))
            if comma < 0:
                break
            position = comma + 1
        while position < len(value) and value[position] in " ,":
            position += 1
    return challenges


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bearer_param(value: str | None, name: str) -> str | None:
    """One auth-param of the Bearer challenge in a ``WWW-Authenticate`` value."""
    if not value:
        return None
    for scheme, params in parse_challenges(value):
        if scheme.lower() == "bearer":
            return params.get(name)
    return None


def is_token_challenge(value: str | None) -> bool:
    """Whether a 401's challenge says the token is at fault (``error="invalid_token"`` and kin).

    Such a 401 is about the credentials, never about the session: healing would replay with the same
    token and fail again, and the client must see it to refresh its token.
    """
    return bearer_param(value, "error") is not None


def rewrite_challenge(value: str, metadata_url: str) -> str:
    """A ``WWW-Authenticate`` value whose Bearer challenge names the proxy's resource metadata.

    Every other parameter (``error``, ``scope`` for step-up, ``realm``) and every other challenge is
    kept. A Bearer challenge without ``resource_metadata`` gets one.
    """
    challenges = parse_challenges(value)
    if not any(scheme.lower() == "bearer" for scheme, _ in challenges):
        return value
    rendered = []
    for scheme, params in challenges:
        if scheme.lower() == "bearer":
            params = {k: v for k, v in params.items() if k != "resource_metadata"}
            params["resource_metadata"] = metadata_url
        pairs = ", ".join(f"{k}={_quote(v)}" for k, v in params.items())
        rendered.append(f"{scheme} {pairs}" if pairs else scheme)
    return ", ".join(rendered)
