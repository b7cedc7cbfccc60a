"""Prometheus metrics of every streamrec process (prometheus-client).

The series are defined once here, on prometheus-client's default registry (which also
carries the library's own ``process_*`` and ``python_*`` series); the stream worker, the
serving worker and the trainer update the ones of their role, and ``serve_metrics`` starts
the ``/metrics`` endpoint on ``metrics.port`` (0: off). Gauges read from Redis (memory, model
versions and age, dirty users) are refreshed every ``metrics.redis_every_s`` by a daemon
thread, never on the scrape itself: a slow Redis must not make scrapes time out.

The README's "Metrics" section lists every series; the Grafana dashboard in
``infra/deploy/grafana`` draws them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from streamrec.infra.redisconn import used_memory
from streamrec.infra.settings import MetricsSettings

log = logging.getLogger(__name__)

# Freshness spans a few ms (an idle pipeline) to minutes (a backlog being worked off).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# -- stream worker ------------------------------------------------------------------------
EVENTS = Counter(
    "streamrec_events", "Records taken from the events and items topics, by outcome: applied (first "
    "time), redelivered (applied before; idempotent no-op), duplicate (an event id seen before: "
    "dead-lettered), dead_lettered (invalid), skipped (before a replay's event-time floor)",
    ["outcome"])
DEAD_LETTERS = Counter("streamrec_dead_letters", "Dead letters delivered to the dead-letter topic, by reason code",
                       ["code"])
CONSUMER_LAG = Gauge(
    "streamrec_consumer_lag_records", "Records of a partition not applied yet: the fetch high-water "
    "mark minus the next offset to apply (the broker's end offsets are not used: Tansu's are wrong)",
    ["topic", "partition"])
BATCH_APPLY = Histogram("streamrec_batch_apply_seconds", "Time to apply one batch of records to Redis",
                        buckets=_APPLY_BUCKETS)
EVENT_TO_STATE = Histogram(
    "streamrec_event_to_state_seconds", "From a record's publish time (its Kafka timestamp) to its "
    "event being applied to the session state", buckets=_LATENCY_BUCKETS)
COALESCED = Counter(
    "streamrec_refreshes_coalesced", "Clicks whose list refresh was folded into one already pending "
    "for the same user (refreshes saved)")

# -- serving worker -----------------------------------------------------------------------
REFRESHES = Counter("streamrec_refreshes", "Users' lists recomputed and written by serving")
REFRESHES_FAILED = Counter("streamrec_refreshes_failed",
                           "Users whose refresh raised (left dirty, retried with backoff)")
REFRESH_SECONDS = Histogram("streamrec_refresh_seconds", "Time to recompute and write one batch of lists",
                            buckets=_APPLY_BUCKETS)
EVENT_TO_RECS = Histogram(
    "streamrec_event_to_recs_seconds", "From the publish time of the oldest click behind a refresh "
    "to the user's new list being written", buckets=_LATENCY_BUCKETS)
DIRTY_USERS = Gauge("streamrec_dirty_users", "Users waiting for their list to be refreshed")

# -- trainer ------------------------------------------------------------------------------
TRAININGS = Counter("streamrec_trainings", "Training rounds, by outcome (published, skipped, failed) and "
                    "reason (schedule: every_s or after_events; drift: the served lists' click-through "
                    "rate changed; models-gone: the published models vanished from Redis)", ["outcome", "reason"])
TRAINING_SECONDS = Histogram("streamrec_training_seconds", "Wall time of one training round",
                             buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600))

# -- every role ---------------------------------------------------------------------------
MODEL_AGE = Gauge("streamrec_model_age_seconds", "Age of the live model of each kind (since it was published)",
                  ["kind"])
MODEL_INFO = Gauge("streamrec_model_info", "The live model version of each kind (value 1)", ["kind", "version"])
REDIS_MEMORY = Gauge("streamrec_redis_used_memory_bytes", "Memory Redis uses (INFO memory used_memory, "
                     "summed over a cluster's primaries)")

MODEL_KINDS = ("seq", "ranker", "retrieval")
FAMILIES = (
    "streamrec_events_total", "streamrec_dead_letters_total", "streamrec_consumer_lag_records",
    "streamrec_batch_apply_seconds", "streamrec_event_to_state_seconds", "streamrec_refreshes_coalesced_total",
    "streamrec_refreshes_total", "streamrec_refreshes_failed_total", "streamrec_refresh_seconds",
    "streamrec_event_to_recs_seconds", "streamrec_dirty_users", "streamrec_trainings_total",
    "streamrec_training_seconds", "streamrec_model_age_seconds", "streamrec_model_info",
    "streamrec_redis_used_memory_bytes",
)
"""Every series family streamrec exports, as scraped (the README lists them; the compose check
asks the dashboard for each)."""


def count_batch(applied: int, redelivered: int, skipped: int, by_code: dict[str, int], coalesced: int,
                latencies_ms: Iterable[float]) -> None:
    """One applied batch's records (``streams.processor.Stats`` of the batch)."""
    if applied:
        EVENTS.labels("applied").inc(applied)
    if redelivered:
        EVENTS.labels("redelivered").inc(redelivered)
    if skipped:
        EVENTS.labels("skipped").inc(skipped)
    for code, n in by_code.items():
        EVENTS.labels("duplicate" if code == "duplicate" else "dead_lettered").inc(n)
    if coalesced:
        COALESCED.inc(coalesced)
    observe_many(EVENT_TO_STATE, [max(ms, 0.0) / 1000.0 for ms in latencies_ms])


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, in one pass: exactly the same bucket counts
    and count; the sum equal to float rounding (the batch is summed, then added once).

    prometheus-client observes one value at a time (1.8 us each here, a batch's freshness is
    2,000 of them), and has no bulk call; so the values are counted per bucket with numpy and
    each bucket incremented once, through the library's own bucket objects. Should those
    internals change, it falls back to ``observe``."""
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None or len(bounds) != len(buckets) or len(values) < 8:
        for v in values:
            histogram.observe(v)
        return
    xs = np.asarray(values, dtype=np.float64)
    # observe puts v in the first bucket with v <= bound (the last bound is +Inf)
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), xs, side="left"),
                         minlength=len(bounds))
    histogram._sum.inc(float(xs.sum()))
    for bucket, n in zip(buckets, counts.tolist()):
        if n:
            bucket.inc(n)


def set_lag(lags: dict[tuple[str, int], int]) -> None:
    """The lag of each partition this worker holds; partitions it gave up are removed."""
    for labels in list(_lag_labels - set(lags)):
        CONSUMER_LAG.remove(labels[0], str(labels[1]))
        _lag_labels.discard(labels)
    for (topic, partition), lag in lags.items():
        CONSUMER_LAG.labels(topic, str(partition)).set(max(lag, 0))
        _lag_labels.add((topic, partition))


_lag_labels: set[tuple[str, int]] = set()


def refresh_models(infos: dict[str, dict[str, Any] | None], now_s: float | None = None) -> None:
    """``RecStore.model_info`` of each kind: version (info series) and age."""
    now_s = time.time() if now_s is None else now_s
    for kind, info in infos.items():
        for labels in list(_model_labels.get(kind, set())):
            if info is None or labels != info["version"]:
                MODEL_INFO.remove(kind, labels)
                _model_labels[kind].discard(labels)
        if info is None:
            continue
        MODEL_INFO.labels(kind, info["version"]).set(1)
        _model_labels.setdefault(kind, set()).add(info["version"])
        MODEL_AGE.labels(kind).set(max(now_s - info["created_at"] / 1000.0, 0.0))


_model_labels: dict[str, set[str]] = {}


class MetricsServer:
    """The ``/metrics`` endpoint of this process and the thread that refreshes the gauges read
    from Redis (``poll``: called every ``redis_every_s``; its failures are logged once per
    outage, never raised: metrics must not stop a worker)."""

    def __init__(self, cfg: MetricsSettings, poll: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.port = 0
        self._poll = poll
        self._stop = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> "MetricsServer":
        if not self.cfg.port:
            return self
        self._server, self._thread = start_http_server(self.cfg.port, addr=self.cfg.host)
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", self.cfg.host, self.port)
        if self._poll is not None:
            threading.Thread(target=self._refresh, name="streamrec-metrics", daemon=True).start()
        return self

    def _refresh(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self._poll()  # type: ignore[misc]
                failing = False
            except Exception as exc:  # noqa: BLE001 - an outage is the worker's to handle
                if not failing:
                    log.warning("metrics: reading gauges from Redis failed: %s", exc)
                failing = True
            self._stop.wait(self.cfg.redis_every_s)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def redis_poller(recstore: Any, used_memory: Callable[[Any], int], dirty: Callable[[], int] | None = None
                 ) -> Callable[[], None]:
    """The gauges every role reads from Redis: used memory, live models (and dirty users)."""
    def poll() -> None:
        REDIS_MEMORY.set(used_memory(recstore.client))
        refresh_models({kind: recstore.model_info(kind) for kind in MODEL_KINDS})
        if dirty is not None:
            DIRTY_USERS.set(dirty())
    return poll


__all__ = ["EVENTS", "DEAD_LETTERS", "CONSUMER_LAG", "BATCH_APPLY", "EVENT_TO_STATE", "COALESCED", "REFRESHES",
           "REFRESHES_FAILED", "REFRESH_SECONDS", "EVENT_TO_RECS", "DIRTY_USERS", "TRAININGS",
           "TRAINING_SECONDS", "MODEL_AGE", "MODEL_INFO", "REDIS_MEMORY", "FAMILIES", "MetricsServer",
           "count_batch", "observe_many", "set_lag", "used_memory", "refresh_models", "redis_poller"]
