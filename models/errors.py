"""The exception hierarchy, drawn once.

    StreamrecError                  root: catch this to catch everything streamrec raises
    ├── InvalidEvent                an event failed validation (carries a machine-readable code)
    ├── ConfigError                 a setting or command-line value is unusable
    ├── ServiceError                Kafka or Redis could not be reached or started
    └── ReplayError                 a replay could not complete or failed verification

It lives in ``models`` (the bottom layer) so that every layer can raise and catch it.
"""

from __future__ import annotations


class StreamrecError(Exception):
    """Root of every exception streamrec raises on purpose."""


class InvalidEvent(StreamrecError):
    """An event that must not be applied. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class ConfigError(StreamrecError):
    """A setting or argument that cannot be used as given."""


class ServiceError(StreamrecError):
    """A backing service (Kafka, Redis) is unreachable or failed to start."""


class ReplayError(StreamrecError):
    """A replay or namespace switch that could not be completed safely."""
