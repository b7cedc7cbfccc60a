"""Kafka wiring shared by the SDK, the worker, replay and benchmarks (kafka-python clients).

Tansu differences handled here (see the README): group joins are slow unless the session
timeout is short, and ListOffsets(LATEST) is wrong, so end positions come from the high-water
mark carried in fetch responses, never from ``end_offsets``.

Security (``kafka.security_protocol``, SASL, TLS): ``kafka_python_options``, ``aiokafka_options``
and ``faust_options`` are the one mapping from ``KafkaSettings`` to each client's options; every
client streamrec builds (here and the Faust app of ``streams.worker``) takes them. PLAINTEXT maps
to no options at all. Secrets are read from their ``SecretStr`` only into those options, as
strings that ``repr()`` as ``'**********'`` (kafka-python's admin client logs its options at
DEBUG); error messages built here pass through ``scrub``.
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
from streamrec.infra.guard import describe
from streamrec.infra.settings import KafkaSettings
from streamrec.models.errors import ConfigError, KafkaServiceError

log = logging.getLogger(__name__)

SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")


class _Secret(str):
    """A secret handed to a client library: the value itself (``str()``, ``encode()`` and
    joins see it), but ``repr()`` shows the mask, so a logged options dict does not show it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'**********'"


def _env(field: str) -> str:
    return f"STREAMREC_KAFKA__{field.upper()}"


def _check_security(kafka: KafkaSettings) -> None:
    """``ConfigError`` for security settings that no client can use as given, rather than a
    client quietly connecting without them. Messages name settings, never a secret."""
    protocol = kafka.security_protocol
    if protocol in SASL_PROTOCOLS:
        for field, value in (("sasl_username", kafka.sasl_username),
                             ("sasl_password", kafka.sasl_password.get_secret_value())):
            if not value:
                raise ConfigError(f"{_env(field)} is empty: security_protocol {protocol} logs in "
                                  f"with SASL {kafka.sasl_mechanism}")
    elif kafka.sasl_username or kafka.sasl_password.get_secret_value():
        raise ConfigError(f"{_env('sasl_username')}/{_env('sasl_password')} are set but "
                          f"security_protocol {protocol} does not use SASL (SASL_PLAINTEXT or SASL_SSL does)")
    tls_set = [f for f in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(kafka, f)]
    if kafka.ssl_key_password.get_secret_value():
        tls_set.append("ssl_key_password")
    if protocol not in TLS_PROTOCOLS:
        if tls_set:
            raise ConfigError(f"{', '.join(_env(f) for f in tls_set)} set but security_protocol "
                              f"{protocol} does not use TLS (SSL or SASL_SSL does)")
        return
    if not kafka.ssl_certfile:
        for field in ("ssl_keyfile", "ssl_key_password"):
            if field in tls_set:
                raise ConfigError(f"{_env(field)} is set without {_env('ssl_certfile')} "
                                  "(the client certificate it belongs to)")


def _protocol_and_sasl(kafka: KafkaSettings) -> dict[str, Any]:
    """The options kafka-python and aiokafka name alike: the protocol and the SASL login
    (``{}`` for PLAINTEXT), after ``_check_security``."""
    _check_security(kafka)
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol in SASL_PROTOCOLS:
        out.update(sasl_mechanism=kafka.sasl_mechanism,
                   sasl_plain_username=kafka.sasl_username,
                   sasl_plain_password=_Secret(kafka.sasl_password.get_secret_value()))
    return out


def kafka_python_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Security options of kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient
    (``{}`` for PLAINTEXT; unset files are left to kafka-python: the system's CAs, no client
    certificate)."""
    out = _protocol_and_sasl(kafka)
    if out.get("security_protocol") in TLS_PROTOCOLS:
        out["ssl_check_hostname"] = kafka.ssl_check_hostname
        for field in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(kafka, field):
                out[field] = getattr(kafka, field)
        if kafka.ssl_key_password.get_secret_value():
            out["ssl_password"] = _Secret(kafka.ssl_key_password.get_secret_value())
    return out


def ssl_context(kafka: KafkaSettings) -> Any:
    """The TLS context of aiokafka and Faust clients: the CA bundle (else the system's), the
    client certificate if any, and ``ssl_check_hostname``. An unreadable file or a wrong key
    password is a ``ConfigError`` naming the file."""
    from aiokafka.helpers import create_ssl_context

    _check_security(kafka)
    password = kafka.ssl_key_password.get_secret_value()
    try:
        context = create_ssl_context(cafile=kafka.ssl_cafile or None,
                                     certfile=kafka.ssl_certfile or None,
                                     keyfile=kafka.ssl_keyfile or None,
                                     password=_Secret(password) if password else None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        files = ", ".join(f"{_env(f)}={getattr(kafka, f)}" for f in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
                          if getattr(kafka, f))
        raise ConfigError(f"Kafka TLS files unusable ({files or 'system CAs'}): "
                          f"{scrub(describe(exc), kafka)}") from None
    context.check_hostname = kafka.ssl_check_hostname
    return context


def aiokafka_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Security options of aiokafka's consumer, producer and admin client (``{}`` for
    PLAINTEXT). aiokafka takes TLS only as an ``ssl_context``."""
    out = _protocol_and_sasl(kafka)
    if out.get("security_protocol") in TLS_PROTOCOLS:
        out["ssl_context"] = ssl_context(kafka)
    return out


def faust_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Security options of ``faust.App`` (``{}`` for PLAINTEXT): ``broker_credentials``.

    Faust 0.15.3 turns credentials into aiokafka options in
    ``faust.transport.drivers.aiokafka.credentials_to_aiokafka_auth`` for every client it builds
    (worker and client consumers, producers, the topic-creating admin): ``SSLCredentials(context)``
    gives SSL; ``SASLCredentials(mechanism=...)`` gives SASL_PLAINTEXT, or SASL_SSL when it has an
    ``ssl_context``, with the mechanism passed through (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 all
    exist in ``faust.types.auth.SASLMechanism``), so every combination of the settings is
    expressible. Were one not (a mechanism Faust lacks), this raises ``ConfigError`` instead of
    connecting with less."""
    _check_security(kafka)
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    import faust
    from faust.types.auth import SASLMechanism

    context = ssl_context(kafka) if protocol in TLS_PROTOCOLS else None
    if protocol == "SSL":
        return {"broker_credentials": faust.SSLCredentials(context)}
    try:
        mechanism = SASLMechanism(kafka.sasl_mechanism)
    except ValueError:
        raise ConfigError(f"{_env('sasl_mechanism')}={kafka.sasl_mechanism}: Faust "
                          f"(faust-streaming) has no such SASL mechanism") from None
    credentials = faust.SASLCredentials(username=kafka.sasl_username,
                                        password=_Secret(kafka.sasl_password.get_secret_value()),
                                        ssl_context=context, mechanism=mechanism)
    if credentials.protocol.value != protocol:  # Faust derives the protocol from ssl_context
        raise ConfigError(f"{_env('security_protocol')}={protocol}: Faust would connect with "
                          f"{credentials.protocol.value}")
    return {"broker_credentials": credentials}


def scrub(text: str, kafka: KafkaSettings) -> str:
    """``text`` with the Kafka secrets of ``kafka`` masked (client error messages are shown
    and logged)."""
    for secret in (kafka.sasl_password.get_secret_value(), kafka.ssl_key_password.get_secret_value()):
        if secret:
            text = text.replace(secret, "**********")
    return text


def _no_broker(kafka: KafkaSettings, exc: BaseException | None = None) -> str:
    """The detail of a connection failure: where, and, with security on, what else it may be
    (brokers refusing a login or a TLS handshake look like silent brokers to the clients)."""
    text = f"no broker answers at {kafka.bootstrap}"
    protocol = kafka.security_protocol
    if protocol in SASL_PROTOCOLS:
        text += f" (or it refused the SASL {kafka.sasl_mechanism} login of user {kafka.sasl_username!r})"
    elif protocol == "SSL":
        text += " (or the TLS handshake failed)"
    if exc is not None:
        text += f": {describe(exc)}"
    return scrub(text, kafka)


def _reachable(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        if port.isdigit() and port_open(host.strip("[]") or "127.0.0.1", int(port), timeout=1.0):
            return True
    return False


def admin(kafka: KafkaSettings, timeout_s: float = 20.0) -> KafkaAdminClient:
    deadline = time.monotonic() + timeout_s
    options = kafka_python_options(kafka)
    while not _reachable(kafka.bootstrap):
        if time.monotonic() > deadline:
            raise KafkaServiceError("connect", f"no broker answers at {kafka.bootstrap}")
        time.sleep(0.2)
    while True:
        try:
            return KafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id="streamrec-admin", **options)
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise KafkaServiceError("connect", _no_broker(kafka, exc)) from exc
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


def _consumer(kafka: KafkaSettings, **config: Any) -> KafkaConsumer:
    """A kafka-python consumer with the security options (``config`` wins); one that cannot
    bootstrap (no broker, a refused login) is a ``KafkaServiceError``."""
    try:
        return KafkaConsumer(**{"bootstrap_servers": kafka.bootstrap, **kafka_python_options(kafka), **config})
    except KafkaError as exc:
        raise KafkaServiceError("connect", _no_broker(kafka, exc)) from exc


def _wait_for_metadata(kafka: KafkaSettings, timeout_s: float = 20.0) -> None:
    consumer = _consumer(kafka)
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
    config.update(kafka_python_options(kafka))
    config.update(overrides)
    deadline = time.monotonic() + 10
    while not _reachable(kafka.bootstrap):
        if time.monotonic() > deadline:
            raise KafkaServiceError("connect", f"no broker answers at {kafka.bootstrap}")
        time.sleep(0.2)
    try:
        return KafkaProducer(**config)
    except KafkaError as exc:
        raise KafkaServiceError("connect", _no_broker(kafka, exc)) from exc


def reader(kafka: KafkaSettings, topics: list[str], **overrides: Any) -> KafkaConsumer:
    """A group-less consumer assigned every partition of ``topics`` from the beginning."""
    config: dict[str, Any] = dict(
        bootstrap_servers=kafka.bootstrap,
        client_id="streamrec-reader",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
        max_poll_records=5000,
        fetch_max_wait_ms=100,
    )
    config.update(overrides)
    consumer = _consumer(kafka, **config)
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
    consumer = _consumer(kafka, group_id=kafka.group_id, enable_auto_commit=False,
                         client_id="streamrec-offsets")
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
    config.update(aiokafka_options(kafka))
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
                raise KafkaServiceError("connect", _no_broker(kafka, exc)) from exc
            await asyncio.sleep(0.2)
            continue
        except (KeyError, ValueError) as exc:
            # aiokafka's SCRAM exchange raises these on a server's final message without a
            # signature (Tansu's answer to a failed login) or with a wrong one: a refused login
            await close(consumer)
            if kafka.security_protocol not in SASL_PROTOCOLS:
                raise
            raise KafkaServiceError("authenticate", scrub(
                f"the broker at {kafka.bootstrap} refused the SASL {kafka.sasl_mechanism} login of "
                f"user {kafka.sasl_username!r} ({describe(exc)})", kafka)) from exc
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
