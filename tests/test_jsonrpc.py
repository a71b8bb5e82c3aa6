"""Classifying POST bodies: one parse, clear errors, nothing else ever raised."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_heal_proxy.errors import InvalidRequest, ParseError, ProxyError
from mcp_heal_proxy.wire.jsonrpc import Kind, error_body, parse_post_body

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def test_request_notification_and_response_are_told_apart() -> None:
    body = parse_post_body(
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}},'
        b'{"jsonrpc":"2.0","method":"notifications/progress"},'
        b'{"jsonrpc":"2.0","id":"s1","result":{}}]'
    )
    assert body.is_batch
    assert [m.kind for m in body.messages] == [Kind.REQUEST, Kind.NOTIFICATION, Kind.RESPONSE]
    assert body.request_ids == (1,)
    assert body.method_label == "batch"
    assert body.initialize is None


def test_initialize_is_recognized_only_alone() -> None:
    single = parse_post_body(b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"x"}}')
    assert single.initialize is not None
    assert single.initialize.params == {"protocolVersion": "x"}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", ParseError),
        (b"\xff\xfe", ParseError),
        (b"[" * 100_000 + b"]" * 100_000, ParseError),
        (b"[]", InvalidRequest),
        (b'{"jsonrpc":"1.0","id":1,"method":"x"}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":true,"method":"x"}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":1}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":1,"method":5}', InvalidRequest),
        (b"42", InvalidRequest),
    ],
)
def test_bad_bodies_raise_our_own_errors(body: bytes, error: type[ProxyError]) -> None:
    with pytest.raises(error):
        parse_post_body(body)


def assert_classified_or_refused(raw: bytes) -> None:
    """Either a classified body or one of our 400 errors; any other exception fails the test."""
    refused: ProxyError | None = None
    try:
        body = parse_post_body(raw)
    except ProxyError as exc:
        refused = exc
    if refused is not None:
        assert refused.http_status == 400
        assert refused.code in (-32700, -32600)
        return
    assert body.messages
    assert all(message.kind in Kind for message in body.messages)


@given(json_values)
def test_classifying_arbitrary_json_raises_nothing_but_our_errors(value: object) -> None:
    assert_classified_or_refused(json.dumps(value).encode())


@given(st.binary(max_size=64))
def test_classifying_arbitrary_bytes_raises_nothing_but_our_errors(raw: bytes) -> None:
    assert_classified_or_refused(raw)


def test_error_bodies_carry_every_request_id_of_a_batch() -> None:
    assert json.loads(error_body((1, "a"), -32002, "down", is_batch=True)) == [
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32002, "message": "down"}},
        {"jsonrpc": "2.0", "id": "a", "error": {"code": -32002, "message": "down"}},
    ]
    assert json.loads(error_body((), -32700, "bad", is_batch=False))["id"] is None
