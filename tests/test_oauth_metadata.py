"""The pure side of OAuth pass-through: dialed URLs, metadata rewriting, challenges, resource mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_heal_proxy.auth.metadata import (
    authorization_server_candidates,
    bearer_param,
    check_resource,
    dialed_origin,
    is_token_challenge,
    is_trusted,
    map_resource,
    parse_challenges,
    parse_networks,
    protected_resource_candidates,
    protected_resource_metadata_url,
    rewrite_authorization_server,
    rewrite_challenge,
    rewrite_protected_resource,
)
from mcp_heal_proxy.auth.standin import with_offline_consent
from mcp_heal_proxy.config import ConfigError, build_config
from mcp_heal_proxy.engine.healing import is_session_expired
from mcp_heal_proxy.observability import Redactor

OURS = "http://127.0.0.1:8787/.well-known/oauth-protected-resource/mcp"
UPSTREAM = "https://mcp.example.com/tenant/mcp"
SESSION_GONE = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'


def test_sdk_challenge_is_pointed_at_the_proxy_keeping_error_and_description() -> None:
    upstream = (
        'Bearer error="invalid_token", error_description="Authentication required", '
        'resource_metadata="http://127.0.0.1:9000/.well-known/oauth-protected-resource/mcp"'
    )
    rewritten = rewrite_challenge(upstream, OURS)
    assert bearer_param(rewritten, "resource_metadata") == OURS
    assert bearer_param(rewritten, "error") == "invalid_token"
    assert bearer_param(rewritten, "error_description") == "Authentication required"


def test_step_up_challenge_keeps_its_scope() -> None:
    upstream = 'Bearer error="insufficient_scope", scope="mcp extra", resource_metadata="https://u.example/x"'
    rewritten = rewrite_challenge(upstream, OURS)
    assert bearer_param(rewritten, "scope") == "mcp extra"
    assert bearer_param(rewritten, "error") == "insufficient_scope"
    assert bearer_param(rewritten, "resource_metadata") == OURS


def test_challenge_without_metadata_gets_it_and_other_schemes_stay() -> None:
    rewritten = rewrite_challenge('Basic realm="x", Bearer realm="mcp"', OURS)
    challenges = parse_challenges(rewritten)
    assert [scheme for scheme, _ in challenges] == ["Basic", "Bearer"]
    assert challenges[0][1] == {"realm": "x"}
    assert challenges[1][1] == {"realm": "mcp", "resource_metadata": OURS}
    assert rewrite_challenge('Basic realm="x"', OURS) == 'Basic realm="x"'


def test_quoted_values_with_commas_and_escapes_parse() -> None:
    value = r'Bearer error_description="a, b \"c\"", error="invalid_token"'
    assert parse_challenges(value) == [("Bearer", {"error_description": 'a, b "c"', "error": "invalid_token"})]
    assert bearer_param(rewrite_challenge(value, OURS), "error_description") == 'a, b "c"'


@given(st.text(max_size=200))
def test_any_challenge_text_parses_without_error_and_rewrites_to_one_line(value: str) -> None:
    rewritten = rewrite_challenge(value, OURS)
    parse_challenges(value)
    assert "\n" not in rewritten or "\n" in value


@given(
    st.dictionaries(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda k: k != "resource_metadata"),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
        max_size=4,
    )
)
def test_rewriting_keeps_every_bearer_parameter(params: dict[str, str]) -> None:
    quoted = ", ".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in params.items()
    )
    value = f"Bearer {quoted}".strip()
    challenges = parse_challenges(rewrite_challenge(value, OURS))
    assert challenges == [("Bearer", {**params, "resource_metadata": OURS})]


def test_token_errors_are_token_challenges() -> None:
    assert is_token_challenge('Bearer error="invalid_token"')
    assert not is_token_challenge('Bearer resource_metadata="x"')
    assert not is_token_challenge(None)
    assert not is_token_challenge('Basic realm="x"')


@pytest.mark.parametrize(
    ("challenge", "expired"),
    [
        ('Bearer error="invalid_token", error_description="Session token expired"', False),
        ('Bearer resource_metadata="https://u.example/prm"', True),
        (None, True),
    ],
)
def test_a_401_naming_the_session_is_expiry_unless_its_challenge_blames_the_token(
    challenge: str | None, expired: bool
) -> None:
    assert (
        is_session_expired(401, SESSION_GONE, sent_session_id=True, heal_on=(404, 401), www_authenticate=challenge)
        is expired
    )


def test_a_404_is_expiry_whatever_the_challenge() -> None:
    challenge = 'Bearer error="invalid_token"'
    assert is_session_expired(404, SESSION_GONE, sent_session_id=True, www_authenticate=challenge)


def test_dialed_origin_believes_forwarded_headers_only_when_trusted() -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mcp.example.com, inner", "X-Forwarded-Port": "8443"}
    assert dialed_origin("http", "127.0.0.1:8787", headers, trusted=False, fallback_host="h:1") == (
        "http://127.0.0.1:8787"
    )
    assert dialed_origin("http", "127.0.0.1:8787", headers, trusted=True, fallback_host="h:1") == (
        "https://mcp.example.com:8443"
    )
    assert dialed_origin("http", "[::1]:8787", {}, trusted=False, fallback_host="h:1") == "http://[::1]:8787"


@pytest.mark.parametrize("host", ['a"b', "a b", "a/b", "", None, "a\r\nb", "x:y:z"])
def test_a_host_that_is_not_host_and_port_is_replaced(host: str | None) -> None:
    assert dialed_origin("http", host, {}, trusted=False, fallback_host="127.0.0.1:8787") == "http://127.0.0.1:8787"


def test_trusted_networks() -> None:
    networks = parse_networks(["10.0.0.0/8", "::1"])
    assert is_trusted("10.1.2.3", networks)
    assert is_trusted("::1", networks)
    assert not is_trusted("127.0.0.1", networks)
    assert not is_trusted(None, networks)
    assert not is_trusted("not-an-ip", networks)
    with pytest.raises(ValueError, match="does not appear"):
        parse_networks(["nonsense"])


def test_metadata_urls() -> None:
    assert protected_resource_metadata_url("http://p:1", "/gh/mcp") == (
        "http://p:1/.well-known/oauth-protected-resource/gh/mcp"
    )
    assert protected_resource_candidates("https://u.example/v1/mcp") == [
        "https://u.example/.well-known/oauth-protected-resource/v1/mcp",
        "https://u.example/.well-known/oauth-protected-resource",
    ]
    assert authorization_server_candidates("https://as.example/tenant") == [
        "https://as.example/.well-known/oauth-authorization-server/tenant",
        "https://as.example/.well-known/openid-configuration/tenant",
        "https://as.example/tenant/.well-known/openid-configuration",
    ]
    assert authorization_server_candidates("https://as.example") == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration",
    ]


def test_protected_resource_rewrite_keeps_scopes() -> None:
    upstream = {
        "resource": "https://u.example/mcp",
        "authorization_servers": ["https://as.example"],
        "scopes_supported": ["read", "write"],
        "bearer_methods_supported": ["header"],
    }
    stand_in = rewrite_protected_resource(upstream, "http://p:1/mcp", "http://p:1/mcp")
    assert stand_in == {**upstream, "resource": "http://p:1/mcp", "authorization_servers": ["http://p:1/mcp"]}
    metadata_only = rewrite_protected_resource(upstream, "http://p:1/mcp", None)
    assert metadata_only["authorization_servers"] == ["https://as.example"]
    assert upstream["resource"] == "https://u.example/mcp", "the cached document is not changed"


def test_authorization_server_rewrite_moves_endpoints_and_keeps_the_rest() -> None:
    upstream = {
        "issuer": "https://as.example",
        "authorization_endpoint": "https://as.example/authorize",
        "token_endpoint": "https://as.example/token",
        "registration_endpoint": "https://as.example/register",
        "jwks_uri": "https://as.example/jwks",
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
    }
    rewritten = rewrite_authorization_server(upstream, "http://p:1", "/gh/mcp")
    assert rewritten["issuer"] == "http://p:1/gh/mcp"
    assert rewritten["authorization_endpoint"] == "http://p:1/oauth/gh/mcp/authorize"
    assert rewritten["token_endpoint"] == "http://p:1/oauth/gh/mcp/token"
    assert rewritten["registration_endpoint"] == "http://p:1/oauth/gh/mcp/register"
    assert "revocation_endpoint" not in rewritten
    assert rewritten["jwks_uri"] == "https://as.example/jwks"
    assert rewritten["code_challenge_methods_supported"] == ["S256"]
    assert rewritten["authorization_response_iss_parameter_supported"] is True


def test_the_stand_in_advertises_only_what_it_relays() -> None:
    """An OpenID provider's metadata (oidc-provider's shape): what the stand-in would not relay, or
    whose signed target would name the proxy, is not advertised in the proxy's name."""
    upstream = {
        "issuer": "https://op.example",
        "authorization_endpoint": "https://op.example/auth",
        "token_endpoint": "https://op.example/token",
        "registration_endpoint": "https://op.example/reg",
        "revocation_endpoint": "https://op.example/token/revocation",
        "pushed_authorization_request_endpoint": "https://op.example/request",
        "userinfo_endpoint": "https://op.example/me",
        "introspection_endpoint": "https://op.example/token/introspection",
        "end_session_endpoint": "https://op.example/session/end",
        "device_authorization_endpoint": "https://op.example/device/auth",
        "dpop_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_jwt", "client_secret_post"],
        "grant_types_supported": [
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:device_code",
        ],
        "response_types_supported": ["code", "id_token", "code id_token"],
        "scopes_supported": ["openid", "offline_access", "mcp"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
    }
    rewritten = rewrite_authorization_server(upstream, "http://p:1", "/mcp")
    for key in (
        "pushed_authorization_request_endpoint",
        "userinfo_endpoint",
        "introspection_endpoint",
        "end_session_endpoint",
        "device_authorization_endpoint",
        "dpop_signing_alg_values_supported",
        "token_endpoint_auth_signing_alg_values_supported",
        "id_token_signing_alg_values_supported",
    ):
        assert key not in rewritten, key
    assert rewritten["token_endpoint_auth_methods_supported"] == ["client_secret_basic", "none"]
    assert rewritten["revocation_endpoint_auth_methods_supported"] == ["client_secret_post"]
    assert rewritten["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert rewritten["response_types_supported"] == ["code"]
    assert rewritten["scopes_supported"] == ["offline_access", "mcp"]
    assert rewritten["request_uri_parameter_supported"] is False
    assert rewritten["revocation_endpoint"] == "http://p:1/oauth/mcp/revoke"
    assert rewritten["authorization_response_iss_parameter_supported"] is True
    assert "pushed_authorization_request_endpoint" in upstream, "the cached document is not changed"


def test_resource_maps_from_the_proxy_url_to_the_upstream_only() -> None:
    upstream = "https://u.example/v1/mcp"
    assert map_resource("http://127.0.0.1:8787/gh/mcp", "/gh/mcp", upstream) == upstream
    assert map_resource("https://proxy.example/gh/mcp/", "/gh/mcp", upstream) == upstream
    assert map_resource("https://other.example/else", "/gh/mcp", upstream) == "https://other.example/else"


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_config_reads_trusted_proxies_and_the_pass_through_mode(tmp_path: Path) -> None:
    text = (
        '[server]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n'
        '[upstreams.gh]\nurl = "https://u.example/mcp"\noauth_pass_through = "metadata"\n'
    )
    config = build_config(config_file=write_config(tmp_path, text), flags={}, environ={})
    assert config.trusted_proxies == ("10.0.0.0/8", "::1")
    assert config.upstreams[0].oauth_pass_through == "metadata"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\ntrusted_proxies = ["nonsense"]\n', "trusted_proxies must list IP addresses"),
        ("[server]\ntrusted_proxies = [10]\n", "trusted_proxies must list IP addresses"),
        ('[upstreams.gh]\nurl = "https://u.example/mcp"\noauth_pass_through = "on"\n', "oauth_pass_through must be"),
    ],
)
def test_config_refuses_bad_oauth_settings(tmp_path: Path, text: str, message: str) -> None:
    if "upstreams" not in text:
        text += '[upstreams.gh]\nurl = "https://u.example/mcp"\n'
    with pytest.raises(ConfigError, match=message):
        build_config(config_file=write_config(tmp_path, text), flags={}, environ={})


def test_bearer_tokens_are_redacted_from_log_events_by_shape() -> None:
    redact = Redactor()
    event = redact(None, "info", {"event": "x", "detail": "sent Authorization: Bearer eyJhbGciOi.abc-123_x~"})
    assert event["detail"] == "sent Authorization: Bearer [redacted]"
    assert redact(None, "info", {"detail": "missing bearer token"})["detail"] == "missing bearer token"
    assert redact(None, "info", {"refresh_token": "r" * 40, "client_secret": "s" * 40}) == {
        "refresh_token": "[redacted]",
        "client_secret": "[redacted]",
    }


@pytest.mark.parametrize(
    ("resource", "accepted"),
    [
        (UPSTREAM, True),
        (UPSTREAM + "/", True),
        ("https://mcp.example.com", True),
        ("https://mcp.example.com/", True),
        ("https://mcp.example.com/tenant", True),
        ("https://mcp.example.com:443/tenant/mcp", True),
        ("HTTPS://MCP.example.COM/tenant/mcp", True),
        ("https://mcp.example.com/ten", False),  # not a path segment boundary
        ("https://mcp.example.com/tenant/mcp2", False),
        ("https://mcp.example.com/other/mcp", False),
        ("https://mcp.example.com/tenant/mcp/deeper", False),
        ("http://mcp.example.com/tenant/mcp", False),
        ("https://mcp.example.com:8443/tenant/mcp", False),
        ("https://evil.example.com/tenant/mcp", False),
        ("https://mcp.example.com.evil.example/tenant/mcp", False),
        ("https://user@mcp.example.com/tenant/mcp", False),
        ("https://mcp.example.com/tenant/mcp#fragment", False),
        ("https://mcp.example.com/tenant/mcp?other=1", False),
        ("https://mcp.example.com:99999/tenant/mcp", False),
        ("ftp://mcp.example.com/tenant/mcp", False),
        ("/tenant/mcp", False),
        ("not a url", False),
        ("", False),
    ],
)
def test_resource_must_be_the_upstream_or_a_same_origin_prefix(resource: str, accepted: bool) -> None:
    """One rule for the pass-through and the managed login (RFC 9728 sections 3.3 and 7.3)."""
    assert check_resource(resource, UPSTREAM) is accepted


def test_offline_access_at_an_openid_provider_asks_for_consent() -> None:
    openid = {"scopes_supported": ["openid", "offline_access", "mcp"]}
    asked = [("scope", "mcp offline_access"), ("state", "s")]
    assert with_offline_consent(asked, openid) == [*asked, ("prompt", "consent")]
    # The client's own prompt stays; so does a request without offline_access.
    assert with_offline_consent([*asked, ("prompt", "none")], openid) == [*asked, ("prompt", "none")]
    assert with_offline_consent([("scope", "mcp")], openid) == [("scope", "mcp")]
    # A plain OAuth server grants offline_access as asked: nothing to add.
    assert with_offline_consent(asked, {"scopes_supported": ["offline_access", "mcp"]}) == asked
    assert with_offline_consent(asked, {}) == asked
