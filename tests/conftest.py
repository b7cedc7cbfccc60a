"""Shared fixtures: real services only.

Kafka: the broker named by STREAMREC_KAFKA__BOOTSTRAP when set, else an embedded Tansu broker
started once for the session; with STREAMREC_TEST_DOCKER=1, Apache Kafka and Redis containers
(testcontainers) instead. Redis: STREAMREC_REDIS__URL (default 127.0.0.1:6379) when it
answers, else an embedded redis-server. Every test gets its own topic and key prefixes, so
tests never see each other's data, and its keys are deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from streamrec.infra.embedded import EmbeddedKafka
from streamrec.infra.kafka import delete_topics, ensure_topics
from streamrec.infra.services import ensure_services
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.streams.launch import WorkerProcess, wait_applied

__all__ = ["WorkerProcess", "wait_applied"]

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


# Opt-in (a Docker engine is needed): the service-crossing tests run against Apache Kafka and
# Redis containers started by testcontainers instead of the embedded broker and redis-server.
DOCKER = os.environ.get("STREAMREC_TEST_DOCKER", "") in ("1", "true", "yes")
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # Apache Kafka (Confluent's build), KRaft mode
REDIS_IMAGE = "redis:7.2"


@contextmanager
def docker_services() -> Iterator[tuple[str, str]]:
    """(bootstrap, redis URL) of a Kafka and a Redis container, removed afterwards."""
    try:
        from testcontainers.community.kafka import KafkaContainer
        from testcontainers.community.redis import RedisContainer
        kafka = KafkaContainer(KAFKA_IMAGE).with_kraft()
        redis_container = RedisContainer(REDIS_IMAGE)
    except Exception as exc:  # noqa: BLE001 - no engine: say so, once, and stop
        pytest.exit(f"STREAMREC_TEST_DOCKER=1 but no Docker engine answers ({type(exc).__name__}: {exc})",
                    returncode=4)
    with kafka, redis_container:
        host = redis_container.get_container_host_ip()
        port = redis_container.get_exposed_port(6379)
        yield kafka.get_bootstrap_server(), f"redis://{host}:{port}/0"


@pytest.fixture(scope="session")
def base_settings() -> Iterator[Settings]:
    if DOCKER:
        with docker_services() as (bootstrap, url):
            settings = Settings()
            settings = settings.model_copy(update={
                "kafka": settings.kafka.model_copy(update={"bootstrap": bootstrap}),
                "redis": settings.redis.model_copy(update={"url": url, "embedded": False}),
            })
            yield ensure_services(settings, start=False).settings
        return
    settings = Settings()
    broker = None
    if not settings.kafka.bootstrap:
        broker = EmbeddedKafka(0)
        broker.start()
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap": broker.bootstrap})}
        )
    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"embedded_port": 0})}
    )
    services = ensure_services(settings, start=True)
    try:
        yield services.settings
    finally:
        services.close()
        if broker is not None:
            broker.stop()


@pytest.fixture
def settings(base_settings: Settings) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    s = base_settings.model_copy(update={
        "kafka": base_settings.kafka.model_copy(update={
            "topic_prefix": f"t{tag}", "group_id": f"g{tag}", "partitions": 4,
        }),
        "redis": base_settings.redis.model_copy(update={"prefix": f"test{tag}"}),
        "worker": base_settings.worker.model_copy(update={"heartbeat_s": 0.5}),
        # Large enough that no neighbour list is ever trimmed: then learner state does not
        # depend on how partitions interleave, and equals the reference exactly.
        "learners": base_settings.learners.model_copy(update={"cf_max_neighbours": 10_000}),
    })
    ensure_topics(s.kafka)
    yield s
    client = redis.Redis.from_url(s.redis.url)
    keys = list(client.scan_iter(match=f"test{tag}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i : i + 1000])
    client.close()
    delete_topics(s.kafka)


@pytest.fixture
def store(settings: Settings) -> StateStore:
    return StateStore.from_settings(settings)


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(worker_id: str = "w1", **overrides: object) -> WorkerProcess:
        s = settings
        if overrides:
            s = settings.model_copy(update={"worker": settings.worker.model_copy(update=overrides)})
        w = WorkerProcess(s, worker_id, tmp_path / f"worker-{worker_id}-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
