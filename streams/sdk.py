"""The Python SDK: publish events to Kafka, read state from Redis.

    from streams.sdk import Publisher, Reader
    with Publisher.from_settings(settings) as pub:
        pub.click(user="u1", item="i42")
    Reader.from_settings(settings).session("u1")

Any Kafka client can publish instead: the contract is the JSON documented in the README
(``streamrec schema`` prints its JSON Schema), keyed by user (items: by item).
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import Any, Iterable

from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from infra import kafka as kafka_wiring
from infra.recstore import RecStore
from infra.settings import Settings
from infra.state import SessionView, StateStore
from models.events import Click, Event, Impression, Item, Shown, encode, key_of


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


class Publisher:
    """Publishes typed events, keyed so that each user's events stay in order."""

    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self.producer = producer or kafka_wiring.producer(settings.kafka)
        self.sent = 0

    @classmethod
    def from_settings(cls, settings: Settings, **producer_overrides: Any) -> "Publisher":
        return cls(settings, kafka_wiring.producer(settings.kafka, **producer_overrides))

    def topic_for(self, event: Event) -> str:
        k = self.settings.kafka
        return k.items_topic if isinstance(event, Item) else k.events_topic

    def send(self, event: Event, timestamp_ms: int | None = None) -> FutureRecordMetadata:
        """Queue one event. ``flush()`` waits for delivery; the future gives its offset."""
        future = self.producer.send(self.topic_for(event), key=key_of(event), value=encode(event),
                                    timestamp_ms=timestamp_ms)
        self.sent += 1
        return future

    def send_raw(self, topic: str, key: bytes | None, value: bytes,
                 timestamp_ms: int | None = None) -> FutureRecordMetadata:
        """Queue bytes as they are (for bridges and tests of bad input)."""
        future = self.producer.send(topic, key=key, value=value, timestamp_ms=timestamp_ms)
        self.sent += 1
        return future

    def send_all(self, events: Iterable[Event]) -> int:
        n = 0
        for event in events:
            self.send(event)
            n += 1
        return n

    def click(self, user: str, item: str, *, request_id: str | None = None,
              timestamp: int | None = None, event_id: str | None = None) -> Click:
        event = Click(id=event_id or new_id(), timestamp=timestamp or _now_ms(), user=user,
                      item=item, request_id=request_id)
        self.send(event)
        return event

    def impression(self, user: str, request_id: str, items: list[str], *,
                   timestamp: int | None = None, event_id: str | None = None) -> Impression:
        event = Impression(
            id=event_id or new_id(), timestamp=timestamp or _now_ms(), user=user,
            request_id=request_id, items=[Shown(item=i, position=p) for p, i in enumerate(items)],
        )
        self.send(event)
        return event

    def item(self, item: str, title: str = "", tags: list[str] | None = None,
             category: str | None = None, *, timestamp: int | None = None) -> Item:
        event = Item(id=new_id(), timestamp=timestamp or _now_ms(), item=item, title=title,
                     tags=tags or [], category=category)
        self.send(event)
        return event

    def flush(self, timeout_s: float | None = 60.0) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Reader:
    """Reads state from the live namespace (resolved on every call, so a switch is seen)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.recstore = RecStore(store, 1)  # reads only: the shard count does not matter

    @classmethod
    def from_settings(cls, settings: Settings) -> "Reader":
        return cls(StateStore.from_settings(settings))

    def session(self, user: str) -> SessionView:
        return self.store.session_view(user)

    def item(self, item: str) -> dict[str, Any] | None:
        return self.store.item(item)

    def recommendations(self, user: str, fallback: bool = True) -> dict[str, Any] | None:
        """The user's served list: ``items``, ``scores``, ``sources``, ``request_id`` (send it
        back with the impression and clicks), ``model``, ``computed_at``, ``as_of``. Users
        without a list of their own get the default list (``"default": true``) unless
        ``fallback`` is off; None when there is nothing at all."""
        return self.recstore.read_recs(user, fallback=fallback)
