"""Find or start the services streamrec needs.

Kafka: the configured bootstrap when one is given; otherwise the embedded broker's address
when something answers there; otherwise (where allowed) a new embedded Tansu broker.
Redis: the configured URL when it answers PING; otherwise the embedded Redis address, started
if needed (``redis.embedded``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import TracebackType

import redis

from streamrec.infra.embedded import EmbeddedKafka, EmbeddedRedis, _Child, port_open
from streamrec.infra.redisconn import auth_failed, connect, redact, scrub, secrets_of
from streamrec.infra.settings import RedisSettings, Settings
from streamrec.models.errors import ConfigError, KafkaServiceError, RedisServiceError

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = RedisSettings().url


def redis_answers(rs: RedisSettings | str) -> bool:
    """Whether Redis (or the Redis Cluster) of ``rs`` answers PING, connected as every
    component connects (``infra.redisconn.connect``: credentials, TLS). A server that answers
    but refuses the credentials raises ``RedisServiceError`` saying so (the URL's password
    masked, no secret in the message). A bare URL stands for the default settings with it."""
    rs = RedisSettings(url=rs) if isinstance(rs, str) else rs
    try:
        client = connect(rs, socket_connect_timeout=0.5, socket_timeout=1.0)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except ConfigError:  # a URL or setting that cannot work: say so, not "does not answer"
        raise
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, ValueError) as exc:
        if auth_failed(exc):
            who = f" as user {rs.username!r}" if rs.username else ""
            hint = ("no password was given: set STREAMREC_REDIS__PASSWORD (and STREAMREC_REDIS__USERNAME for "
                    "an ACL user) or put them in the URL" if not secrets_of(rs) else
                    "the server refused the credentials: check STREAMREC_REDIS__USERNAME, "
                    "STREAMREC_REDIS__PASSWORD or the URL's")
            said = scrub(" ".join(str(exc).split()), rs).split(", ")[0].rstrip(".")[:120] or type(exc).__name__
            raise RedisServiceError(
                "connect", f"authentication failed at {redact(rs.url)}{who}: {hint} (server: {said})") from exc
        return False


@dataclass
class Services:
    """Resolved service addresses, and the embedded children this process owns."""

    settings: Settings
    owned: list[_Child] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka.bootstrap

    @property
    def redis_url(self) -> str:
        return self.settings.redis.url

    def close(self) -> None:
        while self.owned:
            self.owned.pop().stop()

    def __enter__(self) -> "Services":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def ensure_services(settings: Settings, *, start: bool = True, kafka: bool = True) -> Services:
    """Resolve Kafka (unless ``kafka`` is false) and Redis, starting embedded ones when
    ``start`` and nothing answers.

    Returns a ``Services`` whose ``settings`` carry the addresses actually in use.
    """
    owned: list[_Child] = []
    need_kafka = kafka
    kafka = settings.kafka
    try:
        if need_kafka and not kafka.bootstrap:
            port = kafka.embedded_port
            if port and port_open("127.0.0.1", port):
                bootstrap = f"127.0.0.1:{port}"
            elif start:
                broker = EmbeddedKafka(port)
                broker.start()
                owned.append(broker)
                bootstrap = broker.bootstrap
                log.info("started embedded Kafka (Tansu, in-memory) at %s", bootstrap)
            else:
                raise KafkaServiceError(
                    "connect", "no broker: set STREAMREC_KAFKA__BOOTSTRAP or start the embedded services "
                    "with `streamrec up`"
                )
            kafka = kafka.model_copy(update={"bootstrap": bootstrap})

        rset = settings.redis
        if not redis_answers(rset):
            shown = redact(rset.url)
            if not rset.embedded:
                raise RedisServiceError("connect", f"{shown} does not answer (redis.embedded is off)")
            if rset.url != DEFAULT_REDIS_URL:
                # A URL someone chose must not be replaced silently by a private server whose
                # state nobody else reads.
                raise RedisServiceError("connect", f"{shown} does not answer")
            if rset.cluster or rset.tls or rset.username or secrets_of(rset):
                # neither is the embedded Redis (standalone, plain TCP, no credentials)
                raise RedisServiceError("connect", f"{shown} does not answer (no embedded Redis in its place: "
                                                   "redis.cluster, redis.tls or credentials are set)")
            port = rset.embedded_port
            url = f"redis://127.0.0.1:{port}/0"
            if not (port and redis_answers(url)):
                if not start:
                    raise RedisServiceError(
                        "connect", f"{shown} does not answer; start one or run `streamrec up`"
                    )
                server = EmbeddedRedis(port)
                server.start()
                owned.append(server)
                url = server.url
                log.info("started embedded Redis at %s", url)
            rset = rset.model_copy(update={"url": url})
    except BaseException:
        for child in reversed(owned):
            child.stop()
        raise
    resolved = settings.model_copy(update={"kafka": kafka, "redis": rset})
    return Services(resolved, owned)
