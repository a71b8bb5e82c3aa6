"""The SSE parser reads back what the writer wrote, however the bytes are split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_heal_proxy.wire.sse import Comment, Event, Oversized, SSEParser, encode_comment, encode_event

# Field values cannot contain line breaks (they end the field); data may, and is split into lines.
line_text = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), max_size=20)
events = st.builds(
    Event,
    data=st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=40),
    event=line_text.filter(lambda name: name.strip() == name and name != "").map(lambda n: n) | st.just("message"),
    id=st.none() | line_text.filter(lambda value: value.strip() == value),
    retry=st.none() | st.integers(min_value=0, max_value=10**6),
)


def normalized(event: Event) -> Event:
    """What a reader sees: every line break in data becomes \\n."""
    return Event(event.data.replace("\r\n", "\n").replace("\r", "\n"), event.event, event.id, event.retry)


def feed_split(stream: bytes, cuts: list[int]) -> list[Event | Comment | Oversized]:
    parser = SSEParser()
    out: list[Event | Comment | Oversized] = []
    previous = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        out += parser.feed(stream[previous:cut])
        previous = cut
    return out


@given(
    st.lists(events, max_size=5),
    st.lists(st.integers(min_value=0), max_size=10),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
)
def test_events_round_trip_across_arbitrary_chunk_boundaries(
    written: list[Event], cuts: list[int], newline: str, bom: bool
) -> None:
    stream = b"".join(encode_event(event) for event in written).decode().replace("\n", newline).encode()
    if bom:
        stream = "\ufeff".encode() + stream
    parsed = [item for item in feed_split(stream, cuts) if isinstance(item, Event)]
    assert parsed == [normalized(event) for event in written]


@given(st.lists(st.integers(min_value=0), max_size=6))
def test_comments_and_priming_events_survive(cuts: list[int]) -> None:
    stream = encode_comment("keep-alive") + b"id: prime-1\ndata: \n\n" + b"retry: 3000\ndata: {}\n\n"
    assert feed_split(stream, cuts) == [
        Comment("keep-alive"),
        Event(data="", id="prime-1"),
        Event(data="{}", retry=3000),
    ]


def test_multi_byte_characters_split_between_chunks() -> None:
    stream = encode_event(Event(data="héllo ✓"))
    parser = SSEParser()
    out = [item for index in range(len(stream)) for item in parser.feed(stream[index : index + 1])]
    assert out == [Event(data="héllo ✓")]


def test_last_event_id_tracks_the_most_recent_id() -> None:
    parser = SSEParser()
    parser.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\ndata: c\n\n")
    assert parser.last_event_id == "2"


_BOUNDED = (
    b'data: {"small": 1}\n\n'
    + b"id: big\ndata: " + b"x" * 5000 + b"\ndata: more\n: a comment inside\n\n"
    + b"data: " + b"y" * 990 + b"\r\n\r\n"
    + b": keep-alive\n\n" * 50
    + b'data: {"after": 2}\n\n'
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=10))
def test_a_bounded_parser_drops_events_over_its_limit_whatever_the_chunking(cuts: list[int]) -> None:
    parser = SSEParser()
    parser.limit = 1000
    seen: list[object] = []
    previous = 0
    for cut in [*sorted({c % (len(_BOUNDED) + 1) for c in cuts}), len(_BOUNDED)]:
        seen += [item for item in parser.feed(_BOUNDED[previous:cut]) if not isinstance(item, Comment)]
        previous = cut
        # Never more than the limit held, however the bytes came.
        assert sum(len(piece) for piece in parser._buffer) + sum(len(d) for d in parser._data) <= 1000
    assert [type(item) for item in seen] == [Event, Oversized, Event, Event]
    assert isinstance(seen[0], Event)
    assert seen[0].data == '{"small": 1}'
    assert isinstance(seen[2], Event)
    assert seen[2].data == "y" * 990
    assert isinstance(seen[3], Event)
    assert seen[3].data == '{"after": 2}'
    assert parser.between_events
