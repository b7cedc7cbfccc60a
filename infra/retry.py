"""One retry policy for the long-running roles (stream worker, serving worker, trainer, replay).

A Redis or Kafka outage is waited out: the failed unit of work (a whole batch, one serving
step, one training round) is tried again after a capped exponential backoff with jitter, until
the service answers. The unit is retried whole, not the single failed call, because what it
checked first (the namespace, the state epoch) may no longer hold when the service is back: a
Redis that restarted empty must be noticed, not written into.

The clients' own retries (redis-py's ``Retry`` on the connection, kafka-python's producer
retries) absorb blips of a few hundred milliseconds; this policy handles outages of any length.
A stop request (``stop``, set by SIGTERM handlers) ends the wait at once with ``Stopped``, so
every role stops within seconds even while a service is down.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import redis
from kafka import errors as kafka_errors
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from streamrec.infra.guard import describe
from streamrec.models.errors import ServiceError, Stopped

log = logging.getLogger(__name__)

T = TypeVar("T")

# What an outage looks like from the clients. BusyLoadingError (Redis loading its data after a
# restart) is a ConnectionError; ReadOnlyError is a replica that has not been promoted yet.
REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
)
KAFKA_TRANSIENT: tuple[type[BaseException], ...] = (
    kafka_errors.BrokerNotAvailableError, kafka_errors.KafkaConnectionError, kafka_errors.KafkaTimeoutError,
    kafka_errors.NodeNotReadyError, kafka_errors.RequestTimedOutError,
)


# Refused credentials or permissions: redis-py makes them ConnectionErrors, but no wait cures them.
REDIS_REFUSED: tuple[type[BaseException], ...] = (
    redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
)


def is_transient(exc: BaseException) -> bool:
    """An error that a wait can cure: the service is down, restarting or unreachable."""
    if isinstance(exc, REDIS_REFUSED) or isinstance(exc.__cause__, REDIS_REFUSED):
        return False
    if isinstance(exc, redis.exceptions.RedisClusterException):  # not a RedisError: a cluster
        # whose slots are moving, or whose nodes all failed to answer (the cause says which)
        return isinstance(exc, redis.exceptions.SlotNotCoveredError) or isinstance(
            exc.__cause__, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
    if isinstance(exc, REDIS_TRANSIENT + KAFKA_TRANSIENT + (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, kafka_errors.KafkaError) and getattr(exc, "retriable", False):
        return True
    # streamrec's own service errors (a broker that does not answer at start-up, say)
    return isinstance(exc, ServiceError) and isinstance(exc.__cause__, (type(None), *REDIS_TRANSIENT,
                                                                         *KAFKA_TRANSIENT))


def client_retry() -> Retry:
    """redis-py's own retry for every connection: three quick attempts (about 0.35 s) for a
    blip; anything longer surfaces to ``RetryPolicy``."""
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=3)


@dataclass
class RetryPolicy:
    """Waits out outages; ``stop`` ends the wait. Counts what it waited for."""

    base_s: float = 0.1
    cap_s: float = 5.0
    stop: threading.Event = field(default_factory=threading.Event)
    waits: int = 0  # failed attempts so far
    _last_log: float = 0.0

    def sleep(self, seconds: float) -> None:
        """Sleep unless stopped; raises ``Stopped`` when a stop was requested."""
        if self.stop.wait(seconds):
            raise Stopped("stopping while waiting for a service")

    def call(self, fn: Callable[[], T], what: str, *, on_retry: Callable[[BaseException], None] | None = None) -> T:
        """``fn()`` until it succeeds; transient service errors are waited out."""
        delay = self.base_s
        failures = 0
        while True:
            if self.stop.is_set():
                raise Stopped(f"stopping before {what}")
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                self.waits += 1
                if on_retry is not None:
                    on_retry(exc)
                now = time.monotonic()
                if failures == 1 or now - self._last_log > 10.0:  # one line, then every 10 s
                    log.warning("%s: service unavailable (%s); retrying with backoff (up to %.0f s)",
                                what, describe(exc), self.cap_s)
                    self._last_log = now
                self.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2.0, self.cap_s)

    async def acall(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """``call`` for coroutines (the stream worker's Kafka sends): the same policy."""
        delay = self.base_s
        while True:
            if self.stop.is_set():
                raise Stopped(f"stopping before {what}")
            try:
                return await fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.waits += 1
                log.warning("%s: service unavailable (%s); retrying in %.1f s", what, describe(exc), delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2.0, self.cap_s)


__all__ = ["RetryPolicy", "is_transient", "client_retry", "REDIS_TRANSIENT", "KAFKA_TRANSIENT"]
