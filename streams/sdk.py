"""The Python SDK: publish events to Kafka, read state and recommendations from Redis.

    import streamrec
    settings = streamrec.Settings()
    with streamrec.Publisher.from_settings(settings) as pub:
        pub.click("u1", "i42", request_id="req-1", segment="mobile")
    with streamrec.Reader.from_settings(settings) as reader:
        reader.recommendations("u1")

Events are validated when they are sent, by the very checks the worker applies (an invalid id
raises ``InvalidEvent`` at once instead of being dead-lettered later). Every failure of Kafka
or Redis surfaces as ``KafkaServiceError`` / ``RedisServiceError`` (both ``ServiceError``): no
client library exception escapes. Any Kafka client can publish instead: the contract is the
JSON documented in the README (``streamrec schema`` prints its JSON Schema), keyed by user
(items: by item).
"""

from __future__ import annotations

import threading
import time
import uuid
from types import TracebackType
from typing import Any, Iterable, NamedTuple, Sequence

from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.guard import describe, kafka_errors, redis_errors
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import SessionView, StateStore
from streamrec.models.errors import ClosedError, InvalidArgument, KafkaServiceError, StateLost
from streamrec.models.events import (
    Click,
    Event,
    Impression,
    Item,
    Shown,
    check_id,
    key_of,
    validate,
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


class Delivered(NamedTuple):
    """Where the broker stored a record."""

    topic: str
    partition: int
    offset: int


class Delivery:
    """A sent record; ``get()`` waits for the broker's acknowledgement."""

    def __init__(self, future: FutureRecordMetadata) -> None:
        self._future = future

    def get(self, timeout_s: float = 30.0) -> Delivered:
        """Wait for the acknowledgement; ``KafkaServiceError`` if it failed or timed out."""
        with kafka_errors("publish"):
            meta = self._future.get(timeout=timeout_s)
        return Delivered(meta.topic, meta.partition, meta.offset)


class Publisher:
    """Publishes typed events, keyed so that each user's events stay in order.

    Sending is asynchronous: ``flush()`` waits (at most ``timeout_s``) until everything sent
    so far is acknowledged and raises ``KafkaServiceError`` if any record could not be
    delivered; ``close()`` (or leaving the ``with`` block) flushes the same bounded way, then
    closes the producer. Thread-safe, like the producer under it.
    """

    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self.producer = producer or kafka_wiring.producer(settings.kafka)
        self.sent = 0
        self._limits = settings.validation.limits()
        self._failed: list[BaseException] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, **producer_overrides: Any) -> "Publisher":
        """A publisher with its own producer (kafka-python settings may be overridden)."""
        return cls(settings, kafka_wiring.producer(settings.kafka, **producer_overrides))

    def topic_for(self, event: Event) -> str:
        k = self.settings.kafka
        return k.items_topic if isinstance(event, Item) else k.events_topic

    def _failure(self, exc: BaseException) -> None:
        with self._lock:
            self._failed.append(exc)

    def _send(self, topic: str, key: bytes | None, value: bytes, timestamp_ms: int | None) -> Delivery:
        if self._closed:
            raise ClosedError("this Publisher is closed")
        with kafka_errors("publish"):
            future = self.producer.send(topic, key=key, value=value, timestamp_ms=timestamp_ms)
        future.add_errback(self._failure)
        self.sent += 1
        return Delivery(future)

    def send(self, event: Event, timestamp_ms: int | None = None) -> Delivery:
        """Validate and queue one event (``InvalidEvent`` if the worker would reject it)."""
        value = validate(event, **self._limits)
        return self._send(self.topic_for(event), key_of(event), value, timestamp_ms)

    def send_raw(self, topic: str, key: bytes | None, value: bytes,
                 timestamp_ms: int | None = None) -> Delivery:
        """Queue bytes as they are, unvalidated (bridges, and tests of bad input)."""
        return self._send(topic, key, value, timestamp_ms)

    def send_all(self, events: Iterable[Event]) -> int:
        n = 0
        for event in events:
            self.send(event)
            n += 1
        return n

    def click(self, user: str, item: str, *, request_id: str | None = None, segment: str | None = None,
              timestamp: int | None = None, event_id: str | None = None) -> Click:
        """A click of ``user`` on ``item`` (``request_id``: the recommendation request it
        answers; ``segment``: context such as the device, for per-segment learning)."""
        event = Click(id=event_id or new_id(), timestamp=_now_ms() if timestamp is None else timestamp,
                      user=user, item=item, request_id=request_id, segment=segment)
        self.send(event)
        return event

    def impression(self, user: str, request_id: str, items: Sequence[str], *,
                   positions: Sequence[int] | None = None, segment: str | None = None,
                   timestamp: int | None = None, event_id: str | None = None) -> Impression:
        """``items`` shown to ``user`` for one request, best first; ``positions`` default to
        0, 1, 2, ... (give them for a later page of results)."""
        ranks = range(len(items)) if positions is None else positions
        if len(ranks) != len(items):
            raise InvalidArgument(f"{len(items)} items but {len(ranks)} positions")
        event = Impression(
            id=event_id or new_id(), timestamp=_now_ms() if timestamp is None else timestamp, user=user,
            request_id=request_id, items=[Shown(item=i, position=p) for i, p in zip(items, ranks)],
            segment=segment,
        )
        self.send(event)
        return event

    def item(self, item: str, title: str = "", tags: Sequence[str] | None = None,
             category: str | None = None, *, created_at: int | None = None,
             timestamp: int | None = None, event_id: str | None = None) -> Item:
        """A catalog record (the newest by ``timestamp`` wins); ``created_at``: when the item
        was published, if not now."""
        event = Item(id=event_id or new_id(), timestamp=_now_ms() if timestamp is None else timestamp,
                     item=item, title=title, tags=list(tags or []), category=category, created_at=created_at)
        self.send(event)
        return event

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every record sent so far is acknowledged, at most ``timeout_s``;
        ``KafkaServiceError`` when that takes longer or some record failed."""
        with kafka_errors("flush"):
            self.producer.flush(timeout=timeout_s)
        with self._lock:
            failed, self._failed = self._failed, []
        if failed:
            raise KafkaServiceError("publish", f"{len(failed)} record(s) were not delivered; the first: "
                                               f"{describe(failed[0])}")

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush (bounded by ``timeout_s``) and close. Calling it again does nothing."""
        if self._closed:
            return
        try:
            self.flush(timeout_s)
        finally:
            self._closed = True
            with kafka_errors("close"):
                self.producer.close(timeout=timeout_s)

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Reader:
    """Reads state and recommendations from the live namespace (resolved on every call, so a
    replay's switch is seen at once)."""

    def __init__(self, store: StateStore, settings: Settings | None = None) -> None:
        self.store = store
        self.recstore = RecStore(store, 1)  # reads only: the shard count does not matter
        self.settings = settings
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "Reader":
        with redis_errors("connect"):
            return cls(StateStore.from_settings(settings), settings)

    def explain(self, user: str, item: str) -> dict[str, Any]:
        """Why ``item`` is in ``user``'s current list, from what serving logged for that list
        (``streams.explain``): sources with ranks, the session items that brought it, its
        posterior, the ranker's per-feature contributions and bias (summing to its score)."""
        from streamrec.streams.explain import explain

        self._check()
        check_id(user, "user id")
        check_id(item, "item id")
        if self.settings is None:
            raise ClosedError("explain needs the Kafka settings: build the Reader with Reader.from_settings")
        with redis_errors("explain"):
            return explain(self.settings, self.recstore, user, item, self.store.registry)

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("this Reader is closed")

    def session(self, user: str, namespace: str | None = None) -> SessionView:
        """The user's retained clicks and current session (of ``namespace``, default live);
        ``StateLost`` when there is no state to read (never an empty answer for lost state)."""
        self._check()
        check_id(user, "user id")
        with redis_errors("read session"):
            return self.store.session_view(user, namespace)

    def item(self, item: str) -> dict[str, Any] | None:
        """An item's catalog record, or None."""
        self._check()
        check_id(item, "item id")
        with redis_errors("read item"):
            return self.store.item(item)

    def recommendations(self, user: str, fallback: bool = True) -> dict[str, Any] | None:
        """The user's served list: ``items``, ``scores``, ``sources``, ``request_id`` (send it
        back with the impression and clicks), ``model``, ``computed_at``, ``as_of``. Users
        without a list of their own get the default list (``"default": true``) unless
        ``fallback`` is off; None when there is nothing at all."""
        self._check()
        check_id(user, "user id")
        with redis_errors("read recommendations"):
            recs = self.recstore.read_recs(user, fallback=fallback)
            if recs is None and self.store.registry.live_name() is None:
                raise StateLost(self.store.registry.missing_reason())  # not an empty answer
            return recs

    def close(self) -> None:
        """Release the Redis connections. Calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self.store.client.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Publisher", "Reader", "Delivery", "Delivered", "new_id"]
