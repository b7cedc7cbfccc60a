"""streamrec: a streaming, event-driven recommender (Kafka events in, Faust workers, state and
recommendations in Redis).

What an application needs is here::

    import streamrec

    settings = streamrec.Settings()                 # STREAMREC_* environment variables
    with streamrec.Publisher.from_settings(settings) as pub:
        pub.click("u42", "sku-9", request_id="req-1")
    with streamrec.Reader.from_settings(settings) as reader:
        reader.recommendations("u42")

Everything streamrec raises derives from ``StreamrecError``; service failures are
``ServiceError`` (``KafkaServiceError``, ``RedisServiceError``). The layers live in
subpackages: ``streamrec.models`` (pure computation), ``streamrec.infra`` (settings, keys,
connections), ``streamrec.streams`` (the stream worker, replay, SDK), ``streamrec.serving``
(serving, training, evaluation, the command line).

``Settings``, ``Publisher``, ``Reader`` and the types they return are imported on first use,
so that ``import streamrec.models`` stays free of client libraries.
"""

from importlib import import_module as _import_module
from importlib import metadata as _metadata
from typing import TYPE_CHECKING as _TYPE_CHECKING

from streamrec.models.errors import (
    ClosedError,
    ConfigError,
    InvalidArgument,
    InvalidEvent,
    KafkaServiceError,
    RedisServiceError,
    ReplayError,
    ServiceError,
    StateLost,
    StreamrecError,
)
from streamrec.models.events import Click, Event, Impression, Item, Shown

if _TYPE_CHECKING:
    from streamrec.infra.settings import Settings
    from streamrec.infra.state import SessionView
    from streamrec.streams.sdk import Delivered, Delivery, Publisher, Reader

try:
    __version__ = _metadata.version("streamrec")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "Settings": "streamrec.infra.settings",
    "Publisher": "streamrec.streams.sdk",
    "Reader": "streamrec.streams.sdk",
    "Delivery": "streamrec.streams.sdk",
    "Delivered": "streamrec.streams.sdk",
    "SessionView": "streamrec.infra.state",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamrec' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Click",
    "ClosedError",
    "ConfigError",
    "Delivered",
    "Delivery",
    "Event",
    "Impression",
    "InvalidArgument",
    "InvalidEvent",
    "Item",
    "KafkaServiceError",
    "Publisher",
    "Reader",
    "RedisServiceError",
    "ReplayError",
    "ServiceError",
    "SessionView",
    "Settings",
    "StateLost",
    "Shown",
    "StreamrecError",
    "__version__",
]
