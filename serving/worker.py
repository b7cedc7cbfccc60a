"""`streamrec serve`: keep every active user's list fresh in Redis.

The loop: read change notifications (consumer group on the change streams), recompute the
changed users' lists in one batched pass (``serving.engine``), write them with a
no-going-back check, log them with their features to the served topic, then acknowledge.
A worker that dies leaves its entries pending; another claims them after ``claim_idle_s``.
Newer models are loaded in a background thread and swapped in between two batches, so no
refresh ever fails or waits for a model load. The default list (users with no list of their
own) is recomputed every ``serving.default_every_s``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import redis

from streamrec.infra.kafka import producer as kafka_producer
from streamrec.infra.recstore import Change, RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.ranking import FEATURES
from streamrec.models.servedlog import ServedLog, encode_log
from streamrec.serving.engine import Engine, Request, Served
from streamrec.serving.modelio import live_versions, load_models

log = logging.getLogger(__name__)


def served_log(s: Served) -> ServedLog:
    """What is logged of a served list (float32 features)."""
    return ServedLog(s.request_id, s.user, s.as_of, s.computed_at, s.model, s.items, s.candidates,
                     np.ascontiguousarray(s.features, dtype=np.float32).tobytes(), list(FEATURES), s.tie_ids)


def encode_served(s: Served) -> bytes:
    return encode_log(served_log(s))


@dataclass
class ServeStats:
    refreshed: int = 0
    written: int = 0
    stale: int = 0  # a newer list was already there
    batches: int = 0
    changes: int = 0
    items: int = 0
    swaps: int = 0
    errors: int = 0
    compute_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        c = sorted(self.compute_ms[-1000:])
        return {"refreshed": self.refreshed, "written": self.written, "stale": self.stale,
                "batches": self.batches, "changes": self.changes, "items": self.items,
                "swaps": self.swaps, "errors": self.errors,
                "batch_ms_p50": round(c[len(c) // 2], 2) if c else None}


class ServingWorker:
    def __init__(self, settings: Settings, worker_id: str | None = None, *, log_served: bool | None = None,
                 claim_idle_s: float = 30.0) -> None:
        self.settings = settings
        self.cfg = settings.serving
        self.worker_id = worker_id or f"serve-{socket.gethostname()}-{os.getpid()}"
        self.state = StateStore.from_settings(settings)
        self.recstore = RecStore(self.state, settings.kafka.partitions)
        self.engine = Engine(settings, self.state, self.recstore, load_models(self.recstore))
        self.stats = ServeStats()
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.log_served = self.cfg.log_features if log_served is None else log_served
        self._producer = kafka_producer(settings.kafka, acks=1, linger_ms=20) if self.log_served else None
        self._versions = live_versions(self.recstore)
        self._loading: threading.Thread | None = None
        self._ready: Any = None
        self.stop_event = threading.Event()

    # -- models -----------------------------------------------------------------------------

    def _poll_models(self) -> None:
        if self._ready is not None:
            self.engine.swap(self._ready)
            self._ready = None
            self.stats.swaps += 1
            log.info("serving with %s", self.engine.models.label)
        if self._loading is not None and self._loading.is_alive():
            return
        versions = live_versions(self.recstore)
        if versions == self._versions:
            return
        self._versions = versions

        def load() -> None:
            try:
                self._ready = load_models(self.recstore, self.engine.models)
            except Exception:  # a broken model must not stop serving: keep the current one
                log.exception("could not load models %s; keeping %s", versions, self.engine.models.label)
                self.stats.errors += 1

        self._loading = threading.Thread(target=load, name="model-loader", daemon=True)
        self._loading.start()

    def wait_models(self, timeout_s: float = 60.0) -> None:
        """Block until a model load in progress is installed (tests, bench)."""
        self._poll_models()
        if self._loading is not None:
            self._loading.join(timeout_s)
        self._poll_models()

    # -- one step ---------------------------------------------------------------------------

    def refresh_default(self) -> Served:
        served = self.engine.refresh([Request(None)])[0]
        self.recstore.write_recs([(None, served.computed_at, served.fields())], 0)
        return served

    def handle(self, changes: Sequence[Change]) -> list[Served]:
        """Recompute and write the lists behind ``changes``; returns what was written."""
        self.stats.changes += len(changes)
        new_items = [c.item for c in changes if c.item]
        if new_items:
            self.engine.add_items(new_items)
            self.stats.items += len(new_items)
        latest: dict[str, Change] = {}
        for c in changes:
            if c.user and (c.user not in latest or latest[c.user].offset < c.offset):
                latest[c.user] = c
        requests = [Request(u, c.offset, c.publish_ms) for u, c in latest.items()]
        served: list[Served] = []
        for lo in range(0, len(requests), self.cfg.batch):
            t0 = time.perf_counter()
            batch = self.engine.refresh(requests[lo : lo + self.cfg.batch])
            ok = self.recstore.write_recs([(s.user, s.version, s.fields()) for s in batch],
                                          int(self.cfg.recs_ttl_s * 1000))
            self.stats.compute_ms.append((time.perf_counter() - t0) * 1000)
            del self.stats.compute_ms[:-5000]
            self.stats.refreshed += len(batch)
            self.stats.written += sum(ok)
            self.stats.stale += len(ok) - sum(ok)
            served += batch
        if new_items and not requests:
            self.refresh_default()
        if self.cfg.trace_latency and served:
            now = time.time() * 1000
            samples = [now - s.publish_ms for s in served if s.publish_ms > 0]
            if samples:
                pipe = self.state.client.pipeline(transaction=False)
                pipe.rpush(self.state.keys.serve_latency(), *[f"{x:.3f}" for x in samples])
                pipe.ltrim(self.state.keys.serve_latency(), -1_000_000, -1)
                pipe.execute()
        if self._producer is not None:
            topic = self.settings.kafka.served_topic
            for s in served:
                self._producer.send(topic, key=(s.user or "").encode(), value=encode_served(s),
                                    timestamp_ms=s.computed_at)
        return served

    # -- the loop ---------------------------------------------------------------------------

    def run(self, max_seconds: float | None = None) -> ServeStats:
        group = self.cfg.group
        self.recstore.ensure_group(group)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        next_default = next_models = next_claim = next_status = 0.0
        log.info("serving worker %s up (%s)", self.worker_id, self.engine.models.label)
        while not self.stop_event.is_set():
            now = time.monotonic()
            if deadline is not None and now > deadline:
                break
            if now >= next_models:
                self._poll_models()
                next_models = now + self.cfg.model_poll_s
            if now >= next_default:
                self.refresh_default()
                next_default = now + self.cfg.default_every_s
            changes: list[Change] = []
            if now >= next_claim:
                changes = self.recstore.claim_stale(group, self.worker_id, self.claim_idle_ms)
                next_claim = now + self.claim_idle_ms / 2000
            if not changes:
                changes = self.recstore.read_changes(group, self.worker_id, self.cfg.batch * 4, self.cfg.block_ms)
            if changes:
                self.stats.batches += 1
                try:
                    self.handle(changes)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    # Not acknowledged: the entries stay pending and are claimed again.
                    log.warning("Redis unavailable (%s); retrying", exc)
                    self.stats.errors += 1
                    time.sleep(1.0)
                    next_claim = 0.0
                    continue
                except Exception:  # a bug on some input must not stop serving everyone else
                    log.exception("refresh of %d changes failed; skipped", len(changes))
                    self.stats.errors += 1
                self.recstore.ack(group, changes)
            if now >= next_status:
                self.state.registry.write_worker_status(self.worker_id, {
                    "worker": self.worker_id, "role": "serve", "pid": os.getpid(),
                    "models": self.engine.models.label, **self.stats.as_dict(),
                }, ttl_s=10.0)
                next_status = now + 2.0
        if self._producer is not None:
            self._producer.flush(10)
        return self.stats

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(5)
            self._producer = None


def serve(settings: Settings, worker_id: str | None = None) -> int:
    worker = ServingWorker(settings, worker_id)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop_event.set())
    try:
        worker.run()
    finally:
        worker.close()
    return 0


__all__ = ["ServingWorker", "served_log", "encode_served", "serve"]
