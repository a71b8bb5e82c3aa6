"""When is an upstream answer a dead session? Pure rules, tested without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_heal_proxy.engine.healing import is_session_expired

PYTHON_SDK_404 = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'
TS_SDK_404 = b'{"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":null}'
EVERYTHING_400 = (
    b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}'
)
METHOD_NOT_FOUND_404 = b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"Method not found"}}'


@pytest.mark.parametrize(
    ("status", "body"),
    [(404, PYTHON_SDK_404), (404, TS_SDK_404), (404, b"session not found"), (400, EVERYTHING_400), (404, b"")],
)
def test_expiry_answers_seen_in_the_wild_are_recognized(status: int, body: bytes) -> None:
    assert is_session_expired(status, body, sent_session_id=True)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, METHOD_NOT_FOUND_404),
        (400, b'{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"Invalid params"}}'),
        (500, b"session exploded"),
        (401, b"Unauthorized"),
    ],
)
def test_other_errors_are_not_expiry(status: int, body: bytes) -> None:
    assert not is_session_expired(status, body, sent_session_id=True)


@given(st.integers(min_value=100, max_value=599), st.binary(max_size=200))
def test_a_request_without_a_session_id_never_heals(status: int, body: bytes) -> None:
    assert not is_session_expired(status, body, sent_session_id=False)


@given(
    st.integers(min_value=100, max_value=599),
    st.text(max_size=50),
    st.one_of(st.none(), st.integers(), st.text(max_size=5)),
)
def test_method_not_found_never_heals(status: int, message: str, request_id: object) -> None:
    import json

    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": message}}).encode()
    assert not is_session_expired(status, body, sent_session_id=True)
