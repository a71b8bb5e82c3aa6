"""Header rewriting between client and upstream."""

from __future__ import annotations

from multidict import CIMultiDict

from mcp_heal_proxy.wire.headers import client_response_headers, upstream_request_headers


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


def test_each_connection_value_and_drop_list_skips_its_own_headers() -> None:
    """The skip sets are remembered per Connection value and dropped names; none leaks into another."""
    base = {"X-A": "a", "X-B": "b", "Last-Event-ID": "7", "Accept": "*/*"}
    for round_ in range(2):  # the second round is served from what the first remembered
        assert set(upstream_request_headers(CIMultiDict(base, Connection="X-A"), None)) == {
            "X-B",
            "Last-Event-ID",
            "Accept",
            "Accept-Encoding",
        }, round_
        assert set(upstream_request_headers(CIMultiDict(base, Connection="x-b"), None)) == {
            "X-A",
            "Last-Event-ID",
            "Accept",
            "Accept-Encoding",
        }
        assert set(upstream_request_headers(CIMultiDict(base), None, drop=("Last-Event-ID",))) == {
            "X-A",
            "X-B",
            "Accept",
            "Accept-Encoding",
        }
        assert set(upstream_request_headers(CIMultiDict(base), None)) == {*base, "Accept-Encoding"}
        upstream = CIMultiDict({"Content-Type": "application/json", "X-A": "a"})
        assert client_response_headers(CIMultiDict(upstream, Connection="X-A"), None) == [
            ("Content-Type", "application/json")
        ]
        assert client_response_headers(upstream, None) == [("Content-Type", "application/json"), ("X-A", "a")]


def test_many_distinct_connection_values_are_each_still_honoured() -> None:
    """Past the number of remembered skip sets, each value is still applied (just not remembered)."""
    for n in range(600):
        client = CIMultiDict({f"X-H{n}": "hop", "X-Keep": "end-to-end", "Connection": f"X-H{n}"})
        assert upstream_request_headers(client, None) == {"X-Keep": "end-to-end", "Accept-Encoding": "identity"}
