"""The event contract: every kind of bad input gets its own code; valid events round-trip."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.models.errors import InvalidEvent, StreamrecError
from streamrec.models.events import (
    Click,
    Impression,
    Item,
    Shown,
    decode,
    encode,
    json_schema,
    key_of,
)

NOW = 1_800_000_000_000
GOOD = {"type": "click", "id": "e1", "timestamp": 1_700_000_000_000, "user": "u1", "item": "i1"}


def _raw(**changes: object) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


BAD = [
    (b"", "empty"),
    (b"x" * 70_000, "too_large"),
    (b"\xff\xfe{}", "not_utf8"),
    (b'{"type": "click", "id": "\xe9"}', "not_utf8"),
    (b"not json", "not_json"),
    (b'{"type": "click",', "not_json"),
    (b"[1, 2]", "not_object"),
    (b'"click"', "not_object"),
    (_raw(type="purchase"), "unknown_type"),
    (_raw(type=...), "unknown_type"),
    (_raw(item=...), "schema"),
    (_raw(user=42), "schema"),
    (_raw(timestamp="yesterday"), "schema"),
    (_raw(timestamp=1.5e12), "schema"),
    (_raw(timestamp=-1), "bad_timestamp"),
    (_raw(timestamp=1_700_000_000), "bad_timestamp"),  # seconds, not milliseconds
    (_raw(timestamp=32_503_680_000_000), "bad_timestamp"),  # year 3000
    (_raw(timestamp=NOW + 2 * 86_400_000), "bad_timestamp"),  # two days in the future
    (_raw(user="u1}:x"), "bad_id"),
    (_raw(user="{u1}"), "bad_id"),
    (_raw(user="a b"), "bad_id"),
    (_raw(user="u*"), "bad_id"),
    (_raw(user="u\n1"), "bad_id"),
    (_raw(user="u1\n"), "bad_id"),
    (_raw(item="i|1"), "bad_id"),
    (_raw(id=""), "bad_id"),
    (_raw(id="x" * 129), "bad_id"),
    (_raw(user="ü"), "bad_id"),
    (b'{"type":"impression","id":"e","timestamp":1700000000000,"user":"u","request_id":"r","items":[]}',
     "schema"),
    (b'{"type":"impression","id":"e","timestamp":1700000000000,"user":"u","request_id":"r",'
     b'"items":[{"item":"a{b}","position":0}]}', "bad_id"),
    # a category becomes part of Redis key names (per-category trending): validated like ids
    *[(json.dumps({"type": "item", "id": "c1", "timestamp": 1_700_000_000_000, "item": "sku-1",
                   "category": category}).encode(), "bad_id")
      for category in ["a{b}", "x}", "{t}", "*", "cat*", "two words", " ", "", "a|b", "é"]],
]


@pytest.mark.parametrize("depth", [1_000, 10_000])
def test_deep_nesting_is_a_rejection_not_a_crash(depth: int) -> None:
    """A few KB of nested objects exceed the decoder's stack: it is dead-lettered, never a
    RecursionError that would stop the worker on every restart."""
    for raw in (b'{"type":"click","a":' * 1 + b'{"a":' * depth + b"1" + b"}" * (depth + 1),
                b'{"a":' * depth + b"1" + b"}" * depth,
                b'{"type":"click","x":' + b"[" * depth + b"]" * depth + b"}"):
        with pytest.raises(InvalidEvent) as info:
            decode(raw, now_ms=NOW)
        assert info.value.code in ("too_deep", "schema", "unknown_type"), info.value


def test_every_byte_value_is_a_rejection_or_an_event() -> None:
    import streamrec.models.events as events
    payloads = [bytes([b]) for b in range(256)] + [bytes(range(256)), bytes(range(256)) * 200,
                _raw(title=bytes(range(1, 128)).decode())]
    for raw in payloads:
        try:
            decode(raw, now_ms=NOW)
        except InvalidEvent as exc:
            assert exc.code in events.REJECT_CODES


@pytest.mark.parametrize(("raw", "code"), BAD)
def test_bad_input_gets_a_named_reason(raw: bytes, code: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(raw, now_ms=NOW)
    assert info.value.code == code
    assert info.value.reason
    assert isinstance(info.value, StreamrecError)


def test_valid_events_round_trip() -> None:
    events = [
        Click(id="e1", timestamp=1_700_000_000_000, user="user@example.com", item="sku:42", request_id="r1"),
        Impression(id="e2", timestamp=1_700_000_000_001, user="u1", request_id="r1",
                   items=[Shown(item="a", position=0), Shown(item="b", position=1)]),
        Item(id="e3", timestamp=1_700_000_000_002, item="sku:42", title="A film, with commas",
             tags=["drama"], category="film", created_at=1_690_000_000_000),
    ]
    for event in events:
        assert decode(encode(event), now_ms=NOW) == event
    assert key_of(events[0]) == b"user@example.com"
    assert key_of(events[2]) == b"sku:42"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode(_raw(extra={"nested": True}), now_ms=NOW) == decode(_raw(), now_ms=NOW)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_invalid_event(raw: bytes) -> None:
    try:
        decode(raw, now_ms=NOW)
    except InvalidEvent:
        pass


def test_json_schema_describes_the_contract() -> None:
    schema = json_schema()
    assert schema["discriminator"]["mapping"].keys() == {"click", "impression", "item"}  # type: ignore[index]
    click = schema["$defs"]["Click"]  # type: ignore[index]
    assert set(click["required"]) == {"type", "id", "timestamp", "user", "item"}
    assert "pattern" in click["properties"]["user"]
    json.dumps(schema)  # serialisable
    assert msgspec.json.decode(msgspec.json.encode(schema)) == schema


def test_exported_schema_file_is_current() -> None:
    """docs/event.schema.json is what `streamrec schema` prints; regenerate it when events change."""
    from pathlib import Path
    exported = json.loads((Path(__file__).resolve().parents[1] / "docs" / "event.schema.json").read_text())
    assert exported == json_schema()
