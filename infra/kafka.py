"""Kafka wiring shared by the SDK, the worker, replay and benchmarks (kafka-python clients).

Tansu differences handled here (see the README): group joins are slow unless the session
timeout is short, and ListOffsets(LATEST) is wrong, so end positions come from the high-water
mark carried in fetch responses, never from ``end_offsets``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streamrec.infra.embedded import port_open
from streamrec.infra.settings import KafkaSettings
from streamrec.models.errors import KafkaServiceError

log = logging.getLogger(__name__)


def _reachable(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        if port.isdigit() and port_open(host.strip("[]") or "127.0.0.1", int(port), timeout=1.0):
            return True
    return False


def admin(kafka: KafkaSettings, timeout_s: float = 20.0) -> KafkaAdminClient:
    deadline = time.monotonic() + timeout_s
    while not _reachable(kafka.bootstrap):
        if time.monotonic() > deadline:
            raise KafkaServiceError("connect", f"no broker answers at {kafka.bootstrap}")
        time.sleep(0.2)
    while True:
        try:
            return KafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id="streamrec-admin")
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise KafkaServiceError("connect", f"no broker answers at {kafka.bootstrap}: {exc}") from exc
            time.sleep(0.2)


def ensure_topics(kafka: KafkaSettings) -> None:
    """Create the events, items and dead-letter topics if they do not exist."""
    client = admin(kafka)
    try:
        existing = set(client.list_topics())
        wanted = [
            NewTopic(name, kafka.partitions, kafka.replication)
            for name in (kafka.events_topic, kafka.items_topic, kafka.dlq_topic, kafka.served_topic)
            if name not in existing
        ]
        if wanted:
            try:
                client.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
            log.info("created topics %s", [t.name for t in wanted])
    finally:
        client.close()
    _wait_for_metadata(kafka)


def _wait_for_metadata(kafka: KafkaSettings, timeout_s: float = 20.0) -> None:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap)
    try:
        deadline = time.monotonic() + timeout_s
        for topic in (kafka.events_topic, kafka.items_topic, kafka.dlq_topic, kafka.served_topic):
            while not consumer.partitions_for_topic(topic):
                if time.monotonic() > deadline:
                    raise KafkaServiceError("create topics", f"topic {topic} has no partitions after {timeout_s:.0f} s")
                time.sleep(0.1)
                consumer.topics()  # refresh metadata
    finally:
        consumer.close()


def delete_topics(kafka: KafkaSettings) -> None:
    client = admin(kafka)
    try:
        names = [kafka.events_topic, kafka.items_topic, kafka.dlq_topic, kafka.served_topic]
        present = [n for n in names if n in set(client.list_topics())]
        if present:
            client.delete_topics(present)
    except KafkaError as exc:
        log.warning("could not delete topics: %s", exc)
    finally:
        client.close()


def producer(kafka: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer of raw bytes. Records keep their order per key (one in flight, retries)."""
    config: dict[str, Any] = dict(
        bootstrap_servers=kafka.bootstrap,
        client_id="streamrec-producer",
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        max_in_flight_requests_per_connection=1,
        retries=10,
    )
    config.update(overrides)
    deadline = time.monotonic() + 10
    while not _reachable(kafka.bootstrap):
        if time.monotonic() > deadline:
            raise KafkaServiceError("connect", f"no broker answers at {kafka.bootstrap}")
        time.sleep(0.2)
    try:
        return KafkaProducer(**config)
    except KafkaError as exc:
        raise KafkaServiceError("connect", f"no broker answers at {kafka.bootstrap}: {exc}") from exc


def reader(kafka: KafkaSettings, topics: list[str], **overrides: Any) -> KafkaConsumer:
    """A group-less consumer assigned every partition of ``topics`` from the beginning."""
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        client_id="streamrec-reader",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
        max_poll_records=5000,
        fetch_max_wait_ms=100,
        **overrides,
    )
    partitions = []
    for topic in topics:
        deadline = time.monotonic() + 20
        parts = consumer.partitions_for_topic(topic)
        while not parts:
            if time.monotonic() > deadline:
                consumer.close()
                raise KafkaServiceError("read", f"topic {topic} does not exist at {kafka.bootstrap}")
            time.sleep(0.1)
            consumer.topics()
            parts = consumer.partitions_for_topic(topic)
        partitions += [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    return consumer


def read_to_end(kafka: KafkaSettings, topic: str, timeout_s: float = 120.0) -> list[Any]:
    """Every record of ``topic`` up to its high-water marks as first seen by this reader.

    The marks come from fetch responses: Tansu answers ListOffsets(LATEST) wrongly (see
    KAFKA-NOTES), so ``end_offsets()`` is not used."""
    consumer = reader(kafka, [topic])
    try:
        parts = list(consumer.assignment())
        target: dict[Any, int] = {}
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while True:
            for tp, records in consumer.poll(timeout_ms=200, max_records=10_000).items():
                out += [r for r in records if tp not in target or r.offset < target[tp]]
            for tp in parts:
                hw = consumer.highwater(tp)
                if hw is not None and tp not in target:
                    target[tp] = hw
            if len(target) == len(parts) and all(consumer.position(tp) >= target[tp] for tp in parts):
                return [r for r in out if r.offset < target[TopicPartition(r.topic, r.partition)]]
            if time.monotonic() > deadline:
                raise KafkaServiceError("read", f"reading {topic} took over {timeout_s:.0f} s")
    finally:
        consumer.close()


def committed_offsets(kafka: KafkaSettings, topics: list[str]) -> dict[str, int]:
    """The worker group's committed offsets, as ``"<topic>:<partition>" -> offset`` (without
    joining the group)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=kafka.group_id,
                             enable_auto_commit=False, client_id="streamrec-offsets")
    try:
        out: dict[str, int] = {}
        for topic in topics:
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                offset = consumer.committed(TopicPartition(topic, partition))
                if offset is not None:
                    out[f"{topic}:{partition}"] = int(offset)
        return out
    finally:
        consumer.close()


async def aio_reader(kafka: KafkaSettings, topics: list[str], timeout_s: float = 20.0,
                     **overrides: Any) -> Any:
    """A started group-less aiokafka consumer assigned every partition of ``topics`` from the
    beginning (the bulk reader of replay: its ``getmany`` reads several times faster than
    kafka-python's ``poll`` here). Call it in the event loop that will use it; ``stop()`` it.

    A consumer learns the topics when it starts (a full metadata fetch), so one that does not
    see them yet is stopped and started again, up to ``timeout_s``."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka import TopicPartition as AioTopicPartition
    from aiokafka.errors import KafkaError as AioKafkaError

    config: dict[str, Any] = dict(
        bootstrap_servers=kafka.bootstrap,
        client_id="streamrec-reader",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        max_poll_records=5000,
    )
    config.update(overrides)

    async def close(consumer: Any) -> None:
        # Let the consumer's tasks begin first: aiokafka (0.14) fails to stop one whose
        # group-less coordinator task was cancelled before it ever ran (CancelledError).
        await asyncio.sleep(0)
        await consumer.stop()

    deadline = time.monotonic() + timeout_s
    while True:
        consumer = AIOKafkaConsumer(**config)
        try:
            await consumer.start()
        except AioKafkaError as exc:
            await close(consumer)
            if time.monotonic() > deadline:
                raise KafkaServiceError("connect",
                                        f"no broker answers at {kafka.bootstrap}: {exc}") from exc
            await asyncio.sleep(0.2)
            continue
        found = {topic: consumer.partitions_for_topic(topic) for topic in topics}
        missing = [topic for topic, parts in found.items() if not parts]
        if not missing:
            break
        await close(consumer)
        if time.monotonic() > deadline:
            raise KafkaServiceError("read", f"topic {missing[0]} does not exist at {kafka.bootstrap}")
        await asyncio.sleep(0.1)
    try:
        partitions = [AioTopicPartition(topic, p)
                      for topic in topics for p in sorted(found[topic] or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        return consumer
    except BaseException:
        await close(consumer)
        raise
