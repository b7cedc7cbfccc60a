"""Where the client libraries' exceptions become streamrec's service errors.

Every SDK call that talks to Redis or Kafka runs inside one of these, so a caller catches
``streamrec.ServiceError`` (or ``StreamrecError``) and never a ``redis.exceptions.*`` or
``kafka.errors.*``; the original exception stays attached as ``__cause__``. Both work as
context managers and as decorators.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import redis
from kafka.errors import KafkaError

from streamrec.models.errors import KafkaServiceError, RedisServiceError


def describe(exc: BaseException) -> str:
    """One line naming the client's exception type and message."""
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text}"


@contextmanager
def redis_errors(operation: str) -> Iterator[None]:
    """Translate Redis client errors raised inside into ``RedisServiceError``."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise RedisServiceError(operation, describe(exc)) from exc


@contextmanager
def kafka_errors(operation: str) -> Iterator[None]:
    """Translate Kafka client errors raised inside into ``KafkaServiceError``."""
    try:
        yield
    except KafkaError as exc:
        raise KafkaServiceError(operation, describe(exc)) from exc


__all__ = ["redis_errors", "kafka_errors", "describe"]
