"""Header rewriting between client and upstream."""

from __future__ import annotations

from multidict import CIMultiDict

from mcp_heal_proxy.headers import client_response_headers, upstream_request_headers


def test_upstream_headers_carry_the_upstream_session_and_drop_hop_by_hop() -> None:
    client = CIMultiDict(
        {
            "Host": "127.0.0.1:8787",
            "Mcp-Session-Id": "client-id",
            "Connection": "keep-alive, X-Private",
            "X-Private": "hop",
            "Transfer-Encoding": "chunked",
            "Authorization": "Bearer t",
            "MCP-Protocol-Version": "2025-11-25",
            "Accept-Encoding": "gzip",
        }
    )
    out = upstream_request_headers(client, "upstream-id")
    assert out == {
        "Authorization": "Bearer t",
        "MCP-Protocol-Version": "2025-11-25",
        "Mcp-Session-Id": "upstream-id",
        # The client's gzip is replaced: the proxy asks for an answer it can read and stream as it comes.
        "Accept-Encoding": "identity",
    }


def test_client_headers_never_leak_the_upstream_session_id() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "text/event-stream"),
            ("mcp-session-id", "upstream-id"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]
    )
    out = client_response_headers(upstream, "client-id")
    assert ("Mcp-Session-Id", "client-id") in out
    assert ("mcp-session-id", "upstream-id") not in out
    assert [value for name, value in out if name == "Set-Cookie"] == ["a=1", "b=2"]
    assert client_response_headers(upstream, None) == [
        ("Content-Type", "text/event-stream"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_an_upstream_content_encoding_reaches_the_client_with_its_body() -> None:
    upstream = CIMultiDict([("Content-Type", "application/json"), ("Content-Encoding", "gzip")])
    assert ("Content-Encoding", "gzip") in client_response_headers(upstream, "client-id")
