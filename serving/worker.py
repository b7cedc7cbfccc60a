"""`streamrec serve`: keep every active user's list fresh in Redis.

The loop: claim dirty users (``infra.recstore``: at most one pending refresh per user however
many clicks, leased so that no user is refreshed by two workers at once), recompute their lists
in one batched pass (``serving.engine``) with the state as it is then, write them with a
no-going-back check, log them with their features to the served topic, then acknowledge. A
refresh that raises leaves its users dirty, retried with backoff; a worker that dies leaves
them leased, and they are claimed again when the lease (``serving.lease_s``) expires.
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

from streamrec.infra import metrics
from streamrec.infra.kafka import producer as kafka_producer
from streamrec.infra.recstore import Change, Pending, RecStore
from streamrec.infra.retry import RetryPolicy, is_transient
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.errors import StateLost, Stopped
from streamrec.models.ranking import FEATURES
from streamrec.models.servedlog import ServedLog, encode_log
from streamrec.serving.engine import Engine, Request, Served
from streamrec.serving.modelio import gone_models, live_versions, load_models

log = logging.getLogger(__name__)


def served_log(s: Served) -> ServedLog:
    """What is logged of a served list: the candidates' features (float32), and per served slot
    its kind, propensity, score, feature row (float64) and what brought it."""
    d = s.decision  # a PolicyDecision already
    return ServedLog(
        s.request_id, s.user, s.as_of, s.computed_at, s.model, s.items, s.candidates,
        np.ascontiguousarray(s.features, dtype=np.float32).tobytes(), list(FEATURES), s.tie_ids,
        kinds=s.kinds, propensities=s.propensities, scores=s.scores, via=s.via, policy=s.policy,
        slot_features=(np.ascontiguousarray(s.slot_features, dtype=np.float64).tobytes()
                       if s.slot_features is not None else b""),
        decision=d,
        teams=s.teams, arm=s.arm)


def encode_served(s: Served) -> bytes:
    return encode_log(served_log(s))


@dataclass
class ServeStats:
    refreshed: int = 0  # lists computed
    written: int = 0
    stale: int = 0  # a newer list was already there
    batches: int = 0
    items: int = 0
    swaps: int = 0
    errors: int = 0  # service outages waited out, models that failed to load
    failed: int = 0  # user refreshes that raised (the users stay dirty, retried with backoff)
    requeued: int = 0  # users who clicked again while being refreshed (refreshed again)
    reclaimed: int = 0  # users whose lease expired (their worker died): claimed again
    compute_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        c = sorted(self.compute_ms[-1000:])
        return {"refreshed": self.refreshed, "written": self.written, "stale": self.stale,
                "batches": self.batches, "items": self.items, "swaps": self.swaps, "errors": self.errors,
                "failed": self.failed, "requeued": self.requeued, "reclaimed": self.reclaimed,
                "batch_ms_p50": round(c[len(c) // 2], 2) if c else None}


class ServingWorker:
    def __init__(self, settings: Settings, worker_id: str | None = None, *, log_served: bool | None = None) -> None:
        self.settings = settings
        self.cfg = settings.serving
        self.worker_id = worker_id or f"serve-{socket.gethostname()}-{os.getpid()}"
        self.state = StateStore.from_settings(settings)
        self.recstore = RecStore(self.state, settings.kafka.partitions)
        self.engine = Engine(settings, self.state, self.recstore, load_models(self.recstore, treatment=self._treatment()))
        self.stats = ServeStats()
        # the first models serve at once; their trees are compiled meanwhile (same scores)
        threading.Thread(target=self._prepare_first, name="model-compiler", daemon=True).start()
        # users claimed per shard and turn: about two batches in all
        self._per_shard = max(1, -(-2 * self.cfg.batch // settings.kafka.partitions))
        self.log_served = self.cfg.log_features if log_served is None else log_served
        # the served log is training data: while Kafka is down a send gives up after 5 s (the
        # step is retried) instead of blocking the loop for the client's default minute
        self._producer = (kafka_producer(settings.kafka, acks=1, linger_ms=20, max_block_ms=5000)
                          if self.log_served else None)
        self._versions = live_versions(self.recstore)
        self._loading: threading.Thread | None = None
        self._ready: Any = None
        self.stop_event = threading.Event()
        self.lost: str | None = None  # why the state is gone, while it is
        self._next: dict[str, float] = {}

    # -- models -----------------------------------------------------------------------------

    def _treatment(self) -> str:
        """The experiment's treatment ranker version ("" outside an experiment)."""
        exp = self.settings.experiment
        return exp.treatment if exp.mode != "off" else ""

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
                self._ready = self.engine.prepare(load_models(self.recstore, self.engine.models, self._treatment()))
            except Exception:  # a broken model must not stop serving: keep the current one
                log.exception("could not load models %s; keeping %s", versions, self.engine.models.label)
                self.stats.errors += 1

        self._loading = threading.Thread(target=load, name="model-loader", daemon=True)
        self._loading.start()

    def _prepare_first(self) -> None:
        try:
            self.engine.prepare(self.engine.models)
        except Exception:  # serving goes on with the numpy trees
            log.exception("could not compile the ranker %s", self.engine.models.label)
            self.stats.errors += 1

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

    def add_items(self, changes: Sequence[Change]) -> None:
        """New catalog items: content vectors and the exploration pool (cold start)."""
        new_items = [c.item for c in changes if c.item]
        if new_items:
            self.engine.add_items(new_items)
            self.stats.items += len(new_items)
            self.refresh_default()

    def handle(self, pending: Sequence[Pending]) -> list[Served]:
        """Recompute and write the lists of claimed users, each once, with the state as it is
        now; returns what was written. The caller acknowledges (or fails) ``pending``."""
        requests = [Request(p.user, p.offset, p.publish_ms) for p in pending]
        served: list[Served] = []
        for lo in range(0, len(requests), self.cfg.batch):
            t0 = time.perf_counter()
            batch = self.engine.refresh(requests[lo : lo + self.cfg.batch])
            ok = self.recstore.write_recs([(s.user, s.version, s.fields()) for s in batch],
                                          int(self.cfg.recs_ttl_s * 1000))
            seconds = time.perf_counter() - t0
            metrics.REFRESH_SECONDS.observe(seconds)
            metrics.REFRESHES.inc(len(batch))
            written_s = time.time()
            for s, fresh in zip(batch, ok):
                if fresh and s.publish_ms > 0:
                    metrics.EVENT_TO_RECS.observe(max(written_s - s.publish_ms / 1000.0, 0.0))
            self.stats.compute_ms.append(seconds * 1000)
            del self.stats.compute_ms[:-5000]
            self.stats.refreshed += len(batch)
            self.stats.written += sum(ok)
            self.stats.stale += len(ok) - sum(ok)
            served += batch
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
        """Serve until ``stop_event`` (SIGTERM) or ``max_seconds``. Redis outages are waited
        out (the retry policy's backoff); while the state is lost nothing is refreshed, and
        the dirty users stay dirty for when it is back."""
        retry = RetryPolicy(stop=self.stop_event)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        self._next = {"default": 0.0, "models": 0.0, "status": 0.0}
        log.info("serving worker %s up (%s)", self.worker_id, self.engine.models.label)
        try:
            retry.call(lambda: self.recstore.ensure_group(self.cfg.group), "joining the change streams")
            while not self.stop_event.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    break
                retry.call(self._step, "serving", on_retry=self._outage)
        except Stopped:
            pass
        if self._producer is not None:
            self._producer.flush(10)
        return self.stats

    def _outage(self, exc: BaseException) -> None:
        self.stats.errors += 1

    def _step(self) -> None:
        """One turn of the loop: models, the default list, new items, dirty users, status."""
        cfg, nxt = self.cfg, self._next
        now = time.monotonic()
        try:
            if now >= nxt["models"]:
                self._poll_models()
                nxt["models"] = now + cfg.model_poll_s
            if now >= nxt["default"]:
                self.refresh_default()
                nxt["default"] = now + cfg.default_every_s
            items = self.recstore.read_items(cfg.group, self.worker_id, 1000)
            if items:
                self.add_items(items)
                self.recstore.ack_items(cfg.group, items)
            pending, reclaimed = self.recstore.claim(self._per_shard, int(cfg.lease_s * 1000))
            self.stats.reclaimed += reclaimed
            if pending:
                self.stats.batches += 1
                self._refresh(pending)
            elif not items:
                self.recstore.wait_for_work(cfg.block_ms / 1000)  # idle: until a user is marked dirty
            if self.lost is not None:
                log.warning("serving worker %s: state restored; serving again", self.worker_id)
                self.lost = None
        except StateLost as exc:
            if self.lost is None:
                log.error("serving worker %s: STATE LOST: %s; no list is refreshed until it is restored",
                          self.worker_id, exc)
            self.lost = str(exc)
            self.stop_event.wait(0.5)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.recstore.ensure_group(cfg.group)  # the streams went with the state: join again
        if now >= nxt["status"]:
            self.state.registry.write_worker_status(self.worker_id, {
                "worker": self.worker_id, "role": "serve", "host": socket.gethostname(), "pid": os.getpid(), "updated": time.time(),
                "state": "lost" if self.lost else "ok", "lost": self.lost,
                "models": self.engine.models.label,
                "models_gone": gone_models(self.recstore, self.engine.models),  # held in memory, not in Redis
                "tree_evaluator": getattr(self.engine.models.ranker, "evaluator", "blend"), **self.stats.as_dict(),
            }, ttl_s=10.0)
            nxt["status"] = now + 2.0

    def _refresh(self, pending: list[Pending]) -> None:
        """Refresh claimed users; on success acknowledge them (those who clicked again meanwhile
        stay dirty), on a failure put them back with a backoff. An outage or a state loss
        leaves them leased: the lease expires and they are claimed again."""
        try:
            self.handle(pending)
        except (StateLost, Stopped):
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("refresh of %d users failed; they stay dirty and are retried with backoff", len(pending))
            self.stats.failed += len(pending)
            metrics.REFRESHES_FAILED.inc(len(pending))
            self.recstore.failed(pending, int(self.cfg.retry_base_s * 1000), int(self.cfg.retry_cap_s * 1000))
            return
        self.stats.requeued += self.recstore.done(pending)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(5)
            self._producer = None


def serve(settings: Settings, worker_id: str | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:  # Redis or Kafka may not answer yet: wait for them (SIGTERM ends the wait)
        worker = RetryPolicy(stop=stop).call(lambda: ServingWorker(settings, worker_id), "starting")
    except Stopped:
        return 0
    worker.stop_event = stop
    server = metrics.MetricsServer(settings.metrics, metrics.redis_poller(
        worker.recstore, metrics.used_memory, worker.recstore.backlog)).start()
    try:
        worker.run()
    finally:
        server.stop()
        worker.close()
    return 0


__all__ = ["ServingWorker", "served_log", "encode_served", "serve"]
