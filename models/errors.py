"""The exception hierarchy, drawn once.

    StreamrecError                  root: catch this to catch everything streamrec raises
    ├── InvalidEvent                an event failed validation (carries a machine-readable code)
    ├── InvalidArgument             a value given to an SDK call or a command is unusable
    │   └── ConfigError             a setting or command-line value is unusable
    ├── ServiceError                a backing service failed: says which one and what failed
    │   ├── KafkaServiceError       Kafka could not be reached, or refused or lost a request
    │   └── RedisServiceError       Redis could not be reached, or refused a command
    ├── StateLost                   the state in Redis is gone (Redis restarted empty, flushed):
    │                               reported, never answered with empty results
    ├── Stopped                     a stop was requested while waiting for a service
    ├── ClosedError                 a Publisher or Reader used after ``close()``
    └── ReplayError                 a replay could not complete or failed verification

It lives in ``models`` (the bottom layer) so that every layer can raise and catch it. The
client libraries' own exceptions (``redis.exceptions.*``, ``kafka.errors.*``) are translated
into the service errors at the boundary (``streamrec.infra.guard``); the original one is kept as
``__cause__``.
"""

from __future__ import annotations


class StreamrecError(Exception):
    """Root of every exception streamrec raises on purpose."""


class InvalidEvent(StreamrecError, ValueError):
    """An event that must not be applied. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class InvalidArgument(StreamrecError, ValueError):
    """A value given to an SDK call or a command that cannot be used (an id outside the id
    alphabet, a negative count)."""


class ConfigError(InvalidArgument):
    """A setting or argument that cannot be used as given."""


class ServiceError(StreamrecError):
    """A backing service failed. ``service`` is "kafka" or "redis"; ``operation`` says what
    streamrec was doing ("publish", "read session"); the message says both and why."""

    service = "service"
    label = "service"  # how messages name it

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"{self.label}: {operation} failed: {detail}")
        self.operation = operation
        self.detail = detail


class KafkaServiceError(ServiceError):
    """Kafka could not be reached, or refused or lost a request."""

    service = "kafka"
    label = "Kafka"


class RedisServiceError(ServiceError):
    """Redis could not be reached, or refused a command."""

    service = "redis"
    label = "Redis"


class StateLost(StreamrecError):
    """The state streamrec keeps in Redis is gone: no registry where there was one, or another
    epoch than the one a worker was writing (Redis restarted without persistence, was flushed,
    or failed over to an empty replica). Rebuild it from the topics: ``streamrec replay
    --restore`` (stream workers start it themselves with ``worker.restore_on_loss``)."""


class Stopped(StreamrecError):
    """A stop (SIGTERM, Ctrl-C) was requested while waiting for a service to come back."""


class ClosedError(StreamrecError):
    """A Publisher or Reader used after ``close()``."""


class ReplayError(StreamrecError):
    """A replay or namespace switch that could not be completed safely."""
