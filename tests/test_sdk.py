"""The SDK as an application uses it, against real services: events are validated when sent,
every field of the contract travels, service failures surface as streamrec's service errors
(never a client library's), and Publisher/Reader close cleanly and within their bounds."""

from __future__ import annotations

import json
import time

import pytest

import streamrec
from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.embedded import EmbeddedKafka, EmbeddedRedis
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.session import UserEventRow

T0 = 1_700_000_000_000


def read_values(settings: Settings, topic: str, expect: int, timeout_s: float = 20.0) -> list[dict]:
    consumer = kafka_wiring.reader(settings.kafka, [topic])
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                out += [json.loads(r.value) for r in records]
    finally:
        consumer.close()
    return out


def test_an_invalid_event_raises_when_sent_and_nothing_is_published(settings: Settings) -> None:
    with streamrec.Publisher.from_settings(settings) as pub:
        with pytest.raises(streamrec.InvalidEvent) as info:
            pub.click("bad{user}", "i1")
        assert info.value.code == "bad_id" and isinstance(info.value, streamrec.StreamrecError)
        for bad in [lambda: pub.click("u1", "i 1"), lambda: pub.click("u1", "i1", segment="a*b"),
                    lambda: pub.click("u1", "i1", timestamp=1_700_000_000),  # seconds, not ms
                    lambda: pub.impression("u1", "r1", []), lambda: pub.item("sku", category="a b"),
                    lambda: pub.impression("u1", "r1", ["a", "b"], positions=[0])]:
            with pytest.raises(streamrec.StreamrecError):
                bad()
        pub.click("u1", "i1", timestamp=T0, event_id="ok")  # the only valid one
        assert pub.sent == 1
    assert [v["id"] for v in read_values(settings, settings.kafka.events_topic, 1)] == ["ok"]


def test_every_field_of_the_contract_travels(settings: Settings) -> None:
    with streamrec.Publisher.from_settings(settings) as pub:
        pub.impression("u1", "req-1", ["a", "b"], positions=[10, 11], segment="mobile", timestamp=T0,
                       event_id="imp-1")
        pub.click("u1", "b", request_id="req-1", segment="mobile", timestamp=T0 + 1, event_id="clk-1")
        pub.item("b", title="Blue mug", tags=["kitchen"], category="home", created_at=T0 - 5, timestamp=T0,
                 event_id="it-1")
        delivery = pub.send(streamrec.Click(id="clk-2", timestamp=T0 + 2, user="u1", item="a"))
        where = delivery.get(timeout_s=30)
        assert where.topic == settings.kafka.events_topic and where.offset >= 0
    events = read_values(settings, settings.kafka.events_topic, 3)
    by_id = {e["id"]: e for e in events}
    assert by_id["imp-1"] == {"type": "impression", "id": "imp-1", "timestamp": T0, "user": "u1",
                              "request_id": "req-1", "segment": "mobile",
                              "items": [{"item": "a", "position": 10}, {"item": "b", "position": 11}]}
    assert by_id["clk-1"] == {"type": "click", "id": "clk-1", "timestamp": T0 + 1, "user": "u1", "item": "b",
                              "request_id": "req-1", "segment": "mobile"}
    (item,) = read_values(settings, settings.kafka.items_topic, 1)
    assert item == {"type": "item", "id": "it-1", "timestamp": T0, "item": "b", "title": "Blue mug",
                    "tags": ["kitchen"], "category": "home", "created_at": T0 - 5}


def test_a_publisher_whose_broker_died_closes_within_its_bound(base_settings: Settings) -> None:
    broker = EmbeddedKafka(0)
    broker.start()
    try:
        settings = base_settings.model_copy(update={"kafka": base_settings.kafka.model_copy(update={
            "bootstrap": broker.bootstrap, "topic_prefix": "sdk"})})
        kafka_wiring.ensure_topics(settings.kafka)
        pub = streamrec.Publisher.from_settings(settings)
        pub.click("u1", "i1", timestamp=T0)
        pub.flush(10)
    finally:
        broker.stop()
    pub.click("u1", "i2", timestamp=T0 + 1)  # queued: nothing can deliver it now
    started = time.monotonic()
    with pytest.raises(streamrec.KafkaServiceError) as info:
        pub.close(timeout_s=2.0)
    assert time.monotonic() - started < 15.0
    assert "Kafka" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(streamrec.ClosedError):
        pub.click("u1", "i3")
    pub.close()  # a second close does nothing


def test_a_redis_outage_is_a_redis_service_error_not_a_client_exception(base_settings: Settings) -> None:
    server = EmbeddedRedis(0)
    server.start()
    settings = base_settings.model_copy(update={"redis": base_settings.redis.model_copy(update={
        "url": server.url, "prefix": "sdk"})})
    try:
        store = StateStore.from_settings(settings)
        store.registry.ensure()
        store.apply_user_events(store.live(), [UserEventRow("u1", "c", "e1", "i1", T0, 0, "", "")])
        with streamrec.Reader.from_settings(settings) as reader:
            assert [e.item for e in reader.session("u1").entries] == ["i1"]
            with pytest.raises(streamrec.InvalidArgument):
                reader.session("u 1")
            server.stop()
            for call in (lambda: reader.session("u1"), lambda: reader.recommendations("u1"),
                         lambda: reader.item("i1")):
                with pytest.raises(streamrec.RedisServiceError) as info:
                    call()
                assert info.value.service == "redis" and "Redis" in str(info.value)
                assert info.value.__cause__ is not None  # the client's exception, kept as the cause
        with pytest.raises(streamrec.ClosedError):
            reader.session("u1")
        with pytest.raises(streamrec.RedisServiceError):
            streamrec.Reader.from_settings(settings)  # nothing answers at all
    finally:
        server.stop()


def test_an_unusable_setting_is_a_config_error_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__PARTITIONS", "0")
    with pytest.raises(streamrec.ConfigError, match="STREAMREC_KAFKA__PARTITIONS"):
        streamrec.Settings()
    monkeypatch.setenv("STREAMREC_KAFKA__PARTITIONS", "4")
    monkeypatch.setenv("STREAMREC_SERVING__SOURCES", "not a JSON list")
    with pytest.raises(streamrec.ConfigError, match="serving"):
        streamrec.Settings()
