"""The event contract, defined once.

Three event types travel as JSON objects with a ``type`` tag:

* ``click``       a user interacted with an item (optionally answering a recommendation request)
* ``impression``  a list of items was shown to a user, in order, for one request
* ``item``        a catalog record (title, tags, category) used for cold start

Every event carries an ``id`` (unique per user, used for de-duplication) and a ``timestamp``
(event time, Unix **milliseconds**). Clicks and impressions carry a ``user`` and are keyed by
it on Kafka; item events are keyed by ``item``.

``decode`` is the only way bytes become events. It raises ``InvalidEvent`` with a stable
``code`` (see ``REJECT_CODES``) and a human-readable reason.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Final, Union

import msgspec

from streamrec.models.errors import InvalidArgument, InvalidEvent

# Ids end up inside Redis keys and sorted-set members. The alphabet excludes everything that
# could escape a key namespace or a hash tag ("{", "}", "*", "?", "[", "]", whitespace, quotes,
# control characters) and "|" (the member separator).
# "(?!\n)$" rather than "$": in Python "$" also matches before a final newline.
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._~@:+=/-]{0,127}(?!\n)$"
MAX_TIMESTAMP_MS: Final = 4_102_444_800_000  # 2100-01-01: beyond it a value is a unit mistake

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description="1-128 chars of [A-Za-z0-9._~@:+=/-]")]
Timestamp = Annotated[
    int, msgspec.Meta(ge=0, le=MAX_TIMESTAMP_MS, description="Event time, Unix milliseconds")
]
Position = Annotated[int, msgspec.Meta(ge=0, le=10_000, description="0-based rank in the shown list")]
Title = Annotated[str, msgspec.Meta(max_length=1024)]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

REJECT_CODES: Final = (
    "empty",  # zero-length record value
    "too_large",  # record value above validation.max_payload_bytes
    "not_utf8",  # bytes that are not UTF-8
    "not_json",  # UTF-8 that is not a JSON document
    "not_object",  # JSON that is not an object
    "too_deep",  # JSON nested deeper than the decoder handles
    "unknown_type",  # missing or unrecognised "type"
    "schema",  # missing field or wrong type
    "bad_id",  # an id outside the allowed alphabet or length
    "bad_timestamp",  # event time absurd: before the configured floor, or in the future
    "duplicate",  # an event id already applied for this user at another offset
    "wrong_topic",  # a valid event on a topic that does not carry its type
    "undecodable",  # any other failure to decode (never expected; kept so no input can escape)
)


class Click(msgspec.Struct, tag="click", tag_field="type", frozen=True, kw_only=True):
    """A user interacted with an item."""

    id: Id
    timestamp: Timestamp
    user: Id
    item: Id
    request_id: Id | None = None  # the recommendation request this click answers, if any
    segment: Id | None = None  # context segment (device, surface, ...) for per-segment learning


class Shown(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of an impression list."""

    item: Id
    position: Position


class Impression(msgspec.Struct, tag="impression", tag_field="type", frozen=True, kw_only=True):
    """An ordered list of items shown to a user for one request."""

    id: Id
    timestamp: Timestamp
    user: Id
    request_id: Id
    items: Annotated[list[Shown], msgspec.Meta(min_length=1, max_length=1000)]
    segment: Id | None = None


class Item(msgspec.Struct, tag="item", tag_field="type", frozen=True, kw_only=True):
    """A catalog record."""

    id: Id
    timestamp: Timestamp
    item: Id
    title: Title = ""
    tags: Annotated[list[Tag], msgspec.Meta(max_length=64)] = []
    category: Id | None = None  # part of Redis key names (per-category trending): an id
    created_at: Timestamp | None = None  # when the item was published, if different from timestamp


Event = Union[Click, Impression, Item]
UserEvent = Union[Click, Impression]

_decoder: Final = msgspec.json.Decoder(Event)
_encoder: Final = msgspec.json.Encoder()

_ID: Final = re.compile(ID_PATTERN)
_ID_FIELDS: Final = ("`$.id`", "`$.user`", "`$.item`", "`$.request_id`", "`$.segment`", "`$.category`", "].item`")


def encode(event: Event) -> bytes:
    """JSON bytes of an event, with its ``type`` tag."""
    return _encoder.encode(event)


def key_of(event: Event) -> bytes:
    """The Kafka partitioning key: the user for user events, the item for catalog events."""
    return (event.item if isinstance(event, Item) else event.user).encode()


def is_id(value: object) -> bool:
    """Whether ``value`` is a valid id (user, item, request, segment, category, event)."""
    return isinstance(value, str) and _ID.match(value) is not None


def check_id(value: object, what: str = "id") -> str:
    """``value`` when it is a valid id, else ``InvalidArgument`` naming ``what`` it was."""
    if not is_id(value):
        raise InvalidArgument(f"{what} {value!r} is not a valid id (1-128 characters of "
                              f"A-Z a-z 0-9 . _ ~ @ : + = / -, starting with a letter or digit)")
    return value  # type: ignore[return-value]


def validate(event: Event, **limits: int) -> bytes:
    """The wire bytes of ``event`` once they pass exactly the checks the worker applies
    (``decode`` with the same ``limits``); raises ``InvalidEvent`` otherwise. Constructing a
    struct checks types only, so the SDK validates here before anything is sent."""
    raw = encode(event)
    decode(raw, **limits)
    return raw


def decode(
    raw: bytes | None,
    *,
    max_bytes: int = 65_536,
    min_time_ms: int = 631_152_000_000,
    max_future_skew_ms: int = 86_400_000,
    now_ms: int | None = None,
) -> Event:
    """Validate and decode one record value. Raises ``InvalidEvent`` naming what was wrong."""
    if not raw:
        raise InvalidEvent("empty", "record value is empty")
    if len(raw) > max_bytes:
        raise InvalidEvent("too_large", f"record value is {len(raw)} bytes, limit {max_bytes}")
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _classify(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise _classify_syntax(raw, str(exc)) from None
    except RecursionError:  # nesting deeper than the decoder's stack (a few KB can do it)
        raise InvalidEvent("too_deep", "JSON nested too deeply to decode") from None
    except Exception as exc:  # noqa: BLE001 - no input may escape as anything but a rejection
        raise InvalidEvent("undecodable", f"{type(exc).__name__}: {exc}"[:500]) from None
    if event.timestamp < min_time_ms:
        raise InvalidEvent(
            "bad_timestamp",
            f"timestamp {event.timestamp} is before {min_time_ms} (Unix milliseconds expected)",
        )
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if event.timestamp > now + max_future_skew_ms:
        raise InvalidEvent(
            "bad_timestamp", f"timestamp {event.timestamp} is more than {max_future_skew_ms} ms ahead of now"
        )
    if isinstance(event, Impression):
        seen: set[int] = set()
        for shown in event.items:
            if shown.position in seen:
                raise InvalidEvent("schema", f"impression positions must be distinct: position {shown.position} "
                                             f"appears twice (`$.items`)")
            seen.add(shown.position)
    return event


def _classify_syntax(raw: bytes, message: str) -> InvalidEvent:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidEvent("not_utf8", f"not UTF-8 at byte {exc.start}")
    return InvalidEvent("not_json", f"not JSON: {message}")


def _classify(message: str) -> InvalidEvent:
    if "at `$`" in message or message.startswith("Expected `object`"):
        return InvalidEvent("not_object", message)
    if "`$.type`" in message or "missing required field `type`" in message:
        return InvalidEvent("unknown_type", f"{message} (expected one of click, impression, item)")
    is_time = "`$.timestamp`" in message or "`$.created_at`" in message
    if is_time and ("<=" in message or ">=" in message):
        return InvalidEvent("bad_timestamp", message)
    if "matching regex" in message and any(f in message for f in _ID_FIELDS):
        return InvalidEvent("bad_id", message)
    return InvalidEvent("schema", message)


def json_schema() -> dict[str, object]:
    """The JSON Schema (2020-12) of the wire contract."""
    schema: dict[str, object] = msgspec.json.schema(Event)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "streamrec event"
    return schema
