"""`streamrec train`: fit the sequence model and the ranker, and publish them to serving.

* Sequence model: click sequences (a dataset file, or a replay of the events topic) train the
  SASRec model (``models.seqtrain``); its item vectors become the FAISS index; the catalog's
  titles and tags fit the content model, which also places catalog items without clicks in
  the index (cold start).
* Ranker: served lists logged on the served topic, each labelled by the user's next click
  (positive = the clicked candidate; lists whose next click is not among their logged
  candidates, or that is later than the attribution window, teach nothing and are dropped),
  train LambdaMART on exactly the features serving computed.

Published models go to Redis (``infra.recstore``); serving workers pick them up within
``serving.model_poll_s``. ``--every`` / ``--after-events`` keep retraining as a service; between
those rounds, with ``trainer.drift`` on, a drift detector on the click-through rate of the lists
served since the last round retrains the ranker at once when the rate changes (``DriftWatch``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra import metrics
from streamrec.infra.console import Progress
from streamrec.infra.recstore import RecStore
from streamrec.infra.retry import is_transient
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.content import ContentModel, tokens
from streamrec.models.drift import DriftMonitor, list_rewards, outcome_known
from streamrec.models.errors import ConfigError, StateLost
from streamrec.models.events import Click, decode
from streamrec.models.index import VectorIndex
from streamrec.models.mf import MFConfig, fit_mf
from streamrec.models.deepfm import DeepFMConfig, train_deepfm
from streamrec.models.ranking import Ranker, RankerConfig, train_ranker
from streamrec.models.retrieval import RetrievalSet
from streamrec.models.seqloss import LossConfig
from streamrec.models.seqtrain import SeqModel, TrainConfig
from streamrec.models.seqtrain import train as train_seq_model
from streamrec.models.servedlog import LabelledLists, ServedLog, label_lists, served_decoder
from streamrec.models.twotower import TwoTowerConfig, train_two_tower
from streamrec.serving.modelio import pack_retrieval, pack_seq

log = logging.getLogger(__name__)


def sequences_of(clicks: Iterable[Click]) -> dict[str, list[str]]:
    """Each user's clicked items in event-time order (ties: arrival order)."""
    rows = sorted(((c.user, c.timestamp, n, c.item) for n, c in enumerate(clicks)))
    out: dict[str, list[str]] = {}
    for user, _, _, item in rows:
        out.setdefault(user, []).append(item)
    return out


def fit_seq(settings: Settings, sequences: Mapping[str, Sequence[str]], *,
            catalog: Mapping[str, frozenset[str]] | None = None,
            progress: Callable[[dict], None] | None = None,
            epochs: int | None = None) -> tuple[SeqModel, VectorIndex, ContentModel]:
    t = settings.trainer
    cfg = TrainConfig(epochs=epochs or t.seq_epochs, max_seconds=t.seq_max_seconds,
                      loss=LossConfig(t.seq_loss, negatives=t.seq_negatives, gbce_t=t.seq_gbce_t))
    model = train_seq_model(sequences, cfg, progress, family=t.seq_model, max_len=t.seq_max_len, dim=t.seq_dim)
    items = list(model.vocab.items)
    matrix = model.item_matrix()
    vectors = dict(zip(items, matrix))
    content = ContentModel.fit(catalog or {}, vectors, matrix.shape[1])
    index = VectorIndex.build(items, matrix, exact_below=t.index_exact_below)
    cold = [(i, content.vector(toks)) for i, toks in (catalog or {}).items() if i not in vectors]
    cold = [(i, v) for i, v in cold if v is not None]
    if cold:
        index.add([i for i, _ in cold], np.stack([v for _, v in cold]))
    return model, index, content


MF_SOURCES = ("mf", "users")  # the sources that serve from matrix factorisation
TOWER_SOURCES = ("tower",)


def mf_config(settings: Settings, kind: str | None = None) -> MFConfig:
    t = settings.trainer
    return MFConfig(kind=kind or t.mf_model, factors=t.mf_factors, regularization=t.mf_regularization,
                    alpha=t.mf_alpha, iterations=t.mf_iterations, bpr_iterations=10 * t.mf_iterations,
                    recent=settings.serving.seq_len)


def fit_retrieval(settings: Settings, sequences: Mapping[str, Sequence[str]], *,
                  catalog: Mapping[str, frozenset[str]] | None = None, sources: Sequence[str] | None = None,
                  mf_kind: str | None = None, progress: Callable[[dict], None] | None = None,
                  seed: int = 0) -> RetrievalSet | None:
    """The models of the configured sources besides seq (``serving.sources``, or ``sources``):
    matrix factorisation for mf and users, the two-tower model for tower. None: none configured."""
    names = list(settings.serving.sources if sources is None else sources)
    t = settings.trainer
    want_mf = any(n in names for n in MF_SOURCES)
    want_tower = any(n in names for n in TOWER_SOURCES)
    if not (want_mf or want_tower):
        return None
    mf = fit_mf(sequences, mf_config(settings, mf_kind), seed=seed) if want_mf else None
    tower = None
    if want_tower:
        tower = train_two_tower(sequences, catalog or {}, TwoTowerConfig(
            dim=t.tower_dim, epochs=t.tower_epochs, max_seconds=t.tower_max_seconds, seed=seed), progress)
    return RetrievalSet.build(mf, tower, catalog, exact_below=t.index_exact_below)


def fit_ranker(settings: Settings, data: LabelledLists, seed: int = 0) -> Ranker:
    """The ranker of ``trainer.ranker_model`` (LightGBM with ``trainer.ranker_objective``, or
    DeepFM) trained on the labelled served lists."""
    if len(data.groups) < settings.trainer.ranker_min_lists:
        raise ConfigError(
            f"only {len(data.groups)} served lists were followed by a click on one of their candidates "
            f"(trainer.ranker_min_lists = {settings.trainer.ranker_min_lists}); serve more traffic first")
    t = settings.trainer
    if t.ranker_model == "deepfm":
        return train_deepfm(data.X, data.y, data.groups, seed=seed,
                            config=DeepFMConfig(max_seconds=t.ranker_max_seconds))
    return train_ranker(data.X, data.y, data.groups, seed=seed, params=RankerConfig(
        n_trees=t.ranker_trees, num_leaves=t.ranker_leaves, min_data_in_leaf=t.ranker_min_leaf,
        learning_rate=t.ranker_learning_rate, early_stopping_rounds=t.ranker_early_stopping,
        objective=t.ranker_objective))


def events_of(records: Iterable[Any], types: type | tuple[type, ...]) -> list[Any]:
    """The events of ``types`` among Kafka records of the events topic."""
    out = []
    for rec in records:
        try:
            ev = decode(rec.value)
        except Exception:  # invalid records are the worker's business (dead letters)
            continue
        if isinstance(ev, types):
            out.append(ev)
    return out


def clicks_of(records: Iterable[Any]) -> list[Click]:
    """The clicks among Kafka records of the events topic."""
    return events_of(records, Click)


def served_of(records: Iterable[Any]) -> list[ServedLog]:
    """The served lists among Kafka records of the served topic."""
    out = []
    for rec in records:
        try:
            out.append(served_decoder.decode(rec.value))
        except Exception:
            log.warning("unreadable served log record at %s:%s", rec.partition, rec.offset)
    return out


def read_clicks(settings: Settings) -> list[Click]:
    return clicks_of(kafka_wiring.read_to_end(settings.kafka, settings.kafka.events_topic))


def read_served(settings: Settings) -> list[ServedLog]:
    return served_of(kafka_wiring.read_to_end(settings.kafka, settings.kafka.served_topic))


def catalog_tokens(recstore: RecStore, state: StateStore) -> dict[str, frozenset[str]]:
    ns = state.live()
    items = recstore.catalog(ns)
    out = {}
    for lo in range(0, len(items), 2000):
        chunk = items[lo : lo + 2000]
        for item, (_, title, tags, category) in zip(chunk, recstore.item_meta(chunk, ns)):
            out[item] = tokens(title, tags, category)
    return out


def version_tag() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{int(time.time() * 1000) % 1000:03d}"


def _progress(what: str) -> Callable[[dict], None]:
    """Epochs as a bar on a terminal, a line per epoch otherwise (``infra.console``)."""
    shown: dict[str, Progress] = {}

    def show(p: dict) -> None:
        if "bar" not in shown:
            shown["bar"] = Progress(f"train {what}", total=p.get("epochs"), unit="epochs", every_s=0.0)
        bar = shown["bar"]
        bar.set(p["epoch"], note=f"loss {p['loss']:.4f} ({p['seq_per_s']:.0f} seq/s, {p['seconds']:.0f} s)")
        if bar.total is not None and bar.done >= bar.total:
            bar.close()
    return show


def train_once(settings: Settings, *, data: str | None = None, fmt: str = "auto", seq: bool = True,
               ranker: bool = True, epochs: int | None = None) -> dict[str, Any]:
    """One training round; publishes what it trained. Returns a report."""
    from streamrec.streams import loaders

    state = StateStore.from_settings(settings)
    recstore = RecStore(state, settings.kafka.partitions)
    keep = settings.trainer.keep_versions
    report: dict[str, Any] = {}
    clicks: list[Click] | None = None
    if seq:
        t0 = time.monotonic()
        clicks = loaders.load_any(data, fmt) if data else read_clicks(settings)
        sequences = sequences_of(clicks)
        if not sequences:
            raise ConfigError("no clicks to train the sequence model on")
        catalog = catalog_tokens(recstore, state)
        model, index, content = fit_seq(settings, sequences, catalog=catalog,
                                        progress=_progress("seq"), epochs=epochs)
        version = version_tag()
        info = {"users": len(sequences), "clicks": len(clicks), "items": len(model.vocab.items),
                "index": index.kind, "indexed": len(index), "seconds": round(time.monotonic() - t0, 1)}
        recstore.publish_model("seq", version, pack_seq(model, index, content), info, keep)
        report["seq"] = {"version": version, **info}
        t0 = time.monotonic()
        retrieval = fit_retrieval(settings, sequences, catalog=catalog, progress=_progress("tower"))
        if retrieval is not None:
            version = version_tag()
            info = {"mf": retrieval.mf.report if retrieval.mf else None,
                    "tower": retrieval.tower.report if retrieval.tower else None,
                    "seconds": round(time.monotonic() - t0, 1)}
            recstore.publish_model("retrieval", version, pack_retrieval(retrieval), info, keep)
            report["retrieval"] = {"version": version, **info}
    if ranker:
        t0 = time.monotonic()
        if clicks is None or data:
            clicks = read_clicks(settings)
        labelled = label_lists(read_served(settings), clicks, int(settings.learners.attribution_window_s * 1000),
                               negatives=settings.trainer.ranker_negatives)
        try:
            trained = fit_ranker(settings, labelled)
        except ConfigError as exc:
            report["ranker"] = {"skipped": str(exc), "lists": labelled.lists}
        else:
            version = version_tag()
            info = {**trained.report, "lists": labelled.lists, "dropped": labelled.dropped,
                    "seconds": round(time.monotonic() - t0, 1)}
            recstore.publish_model("ranker", version, trained.to_bytes(), info, keep)
            report["ranker"] = {"version": version, **info}
    return report


def train_service(settings: Settings, *, every_s: float, after_events: int, epochs: int | None = None,
                  stop: Callable[[], bool] = lambda: False) -> None:
    """Retrain whenever ``every_s`` passed or ``after_events`` new events arrived. Outages of
    Redis or Kafka are waited out; while the state is lost, nothing is trained."""
    state = StateStore.from_settings(settings)
    recstore = RecStore(state, settings.kafka.partitions)
    status: dict[str, Any] = {"worker": f"{socket.gethostname()}-{os.getpid()}", "role": "trainer",
                              "host": socket.gethostname(),
                              "pid": os.getpid(), "started": time.time(), "state": "waiting",
                              "rounds": 0, "last_round": None}
    halt = threading.Event()

    def heartbeat() -> None:  # in a thread: a training round takes minutes
        while True:
            try:
                state.registry.write_worker_status(status["worker"], {**status, "updated": time.time()},
                                                   ttl_s=10.0)
            except Exception as exc:  # noqa: BLE001 - a heartbeat must never stop the trainer
                if not is_transient(exc):
                    log.warning("trainer heartbeat failed: %s", exc)
            if halt.wait(2.0):
                return

    threading.Thread(target=heartbeat, name="streamrec-trainer-heartbeat", daemon=True).start()
    server = metrics.MetricsServer(settings.metrics, metrics.redis_poller(recstore, metrics.used_memory)).start()
    try:
        _train_loop(settings, state, status, every_s, after_events, epochs, stop)
    finally:
        halt.set()
        server.stop()


class DriftWatch:
    """Between scheduled rounds: the click-through rate of the lists served since the last
    round (``models.drift.list_rewards``), fed to a drift monitor; ``poll`` says when the
    ranker should be retrained at once.

    The events and served topics are read incrementally, by one group-less reader kept open
    (a new one, after an outage, starts again from the beginning: what is held is dropped and
    read again). Held: the clicks of the last attribution window of event time
    (``learners.attribution_window_s``) and the lists whose window is still open (their
    candidates' features dropped), so at most one window of each. Lists computed before the
    last round ended were served by the previous model and are not judged; nor are lists whose
    state is older than the clicks held (their outcome cannot be known)."""

    def __init__(self, settings: Settings, since_ms: int | None = None) -> None:
        t = settings.trainer
        self.settings = settings
        self.monitor = DriftMonitor(t.drift, t.drift_delta, t.drift_min_lists)
        self.window_ms = int(settings.learners.attribution_window_s * 1000)
        self.pending: list[ServedLog] = []  # lists whose outcome is not known yet
        self.clicks: list[Click] = []  # clicks at or after horizon_ms
        self.now_ms = 0  # event time of the newest click seen
        self.horizon_ms = 0  # clicks before this were let go
        self.since_ms = _wall_ms() if since_ms is None else since_ms  # judge lists computed from here on
        self._reader: Any = None
        self._failing = False

    def restart(self, since_ms: int | None = None) -> None:
        """A round was trained: judge the lists served from now on, with a new detector."""
        self.monitor.reset()
        self.pending.clear()
        self.since_ms = _wall_ms() if since_ms is None else since_ms

    def poll(self, budget_s: float = 0.5) -> bool:
        """Read what arrived (for at most about ``budget_s``) and judge the lists whose window
        closed; True when the monitor fired. A Kafka outage is waited out (False)."""
        try:
            clicks, lists = self._read(budget_s)
            self._failing = False
        except Exception as exc:
            if not is_transient(exc):
                raise
            if not self._failing:
                log.warning("trainer: drift watch cannot read the topics (%s); waiting", exc)
            self._failing = True
            self.close()
            return False
        return self.observe(lists, clicks)

    def observe(self, lists: Sequence[ServedLog], clicks: Sequence[Click]) -> bool:
        """Take newly read lists and clicks (any order); True when the monitor fired (the
        lists judged after the one that fired are dropped: the ranker is retrained)."""
        self.clicks += clicks
        self.now_ms = max([self.now_ms, *(c.timestamp for c in clicks)])
        self.pending += [_outcome_fields(s) for s in lists if s.user is not None
                         and s.computed_at >= self.since_ms and s.as_of >= self.horizon_ms]
        ripe = [s for s in self.pending if outcome_known(s, self.window_ms, self.now_ms)]
        fired = False
        if ripe:
            self.pending = [s for s in self.pending if not outcome_known(s, self.window_ms, self.now_ms)]
            for _, reward in list_rewards(ripe, self.clicks, self.window_ms, self.now_ms):
                if self.monitor.update(reward):
                    fired = True
                    break
        # a list not judged yet has as_of above now - window: it needs no older click
        self.horizon_ms = max(self.horizon_ms, self.now_ms - self.window_ms)
        self.clicks = [c for c in self.clicks if c.timestamp >= self.horizon_ms]
        return fired

    def report(self) -> dict[str, Any]:
        """For the trainer's status: the detector, lists judged since the last round, their
        recent click-through rate, detections so far."""
        m = self.monitor
        return {"detector": m.kind, "lists": m.observed, "ctr": round(m.recent_mean, 4),
                "detections": m.detections, "pending": len(self.pending)}

    def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                reader.close()
            except Exception as exc:  # noqa: BLE001 - closing a reader of a broker that is gone
                log.debug("drift watch: closing the reader: %s", exc)

    def _read(self, budget_s: float) -> tuple[list[Click], list[ServedLog]]:
        k = self.settings.kafka
        if self._reader is None:
            self._reader = kafka_wiring.reader(k, [k.events_topic, k.served_topic])
            self.pending.clear()
            self.clicks.clear()
        clicks: list[Click] = []
        lists: list[ServedLog] = []
        deadline = time.monotonic() + budget_s
        while True:
            batch = self._reader.poll(timeout_ms=100, max_records=10_000)
            for tp, records in batch.items():
                if tp.topic == k.served_topic:
                    lists += served_of(records)
                    continue
                clicks += clicks_of(records)
            if not batch or time.monotonic() >= deadline:
                return clicks, lists


def _outcome_fields(s: ServedLog) -> ServedLog:
    """The list without what judging its outcome does not need (the feature rows: kilobytes)."""
    return ServedLog(request_id=s.request_id, user=s.user, as_of=s.as_of, computed_at=s.computed_at,
                     model=s.model, items=s.items, candidates=[], features=b"", feature_names=[],
                     tie_ids=s.tie_ids)


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _round(settings: Settings, status: dict[str, Any], reason: str, **train: Any) -> dict[str, Any]:
    """One round of the service (``train_once(settings, **train)``), counted in
    ``metrics.TRAININGS`` by outcome and reason (schedule, drift) and reported in the status."""
    status["state"] = "training"
    t0 = time.monotonic()
    try:
        report: dict[str, Any] = train_once(settings, **train)
    except (ConfigError, StateLost) as exc:  # not enough data yet, or no state: next turn
        report = {"skipped": str(exc)}
    except Exception as exc:
        if not is_transient(exc):
            metrics.TRAININGS.labels("failed", reason).inc()
            raise
        report = {"skipped": f"service unavailable: {exc}"}
    metrics.TRAINING_SECONDS.observe(time.monotonic() - t0)
    published = any(isinstance(v, dict) and "version" in v for v in report.values())
    metrics.TRAININGS.labels("published" if published else "skipped", reason).inc()
    status.update(state="waiting", rounds=status["rounds"] + 1, last_round={
        "at": time.time(), "reason": reason, "published": published,
        "seconds": round(time.monotonic() - t0, 1)})
    print(json.dumps(report), file=sys.stderr, flush=True)
    return report


def _train_loop(settings: Settings, state: StateStore, status: dict[str, Any], every_s: float,
                after_events: int, epochs: int | None, stop: Callable[[], bool]) -> None:
    last_count = -1
    last_time = 0.0
    lost = False
    watch = DriftWatch(settings) if settings.trainer.drift != "off" else None
    recstore = RecStore(state, settings.kafka.partitions)
    published: set[str] = set()  # model kinds that were live (published by this trainer or before it)
    try:
        while not stop():
            try:
                # events the stream workers applied so far (their progress in Redis: cheap to read)
                count = sum(state.progress(state.live()).values())
                lost = False
                live = {kind for kind in metrics.MODEL_KINDS if recstore.model_version(kind) is not None}
                gone, published = sorted(published - live), published | live
            except StateLost as exc:
                if not lost:
                    log.error("trainer: %s; not training until it is restored", exc)
                lost = True
                status["state"] = "lost"
                time.sleep(1.0)
                continue
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("trainer: service unavailable (%s); waiting", exc)
                time.sleep(2.0)
                continue
            due = last_count < 0 or count - last_count >= after_events or time.monotonic() - last_time >= every_s
            if gone and count > 0:
                # Redis lost them (restarted empty, flushed): serving holds them in memory only
                log.error("trainer: the published models (%s) are gone from Redis; retraining now", ", ".join(gone))
                report = _round(settings, status, "models-gone", epochs=epochs)
                published -= {kind for kind in gone if "version" not in report.get(kind, {})}
                last_count, last_time = count, time.monotonic()
                if watch is not None:
                    watch.restart()
            elif due and count > 0:
                _round(settings, status, "schedule", epochs=epochs)
                last_count, last_time = count, time.monotonic()
                if watch is not None:
                    watch.restart()
            elif watch is not None and count > 0 and watch.poll():
                d = watch.monitor.last
                assert d is not None
                log.warning("trainer: drift (%s) in the click-through rate of served lists after %d lists "
                            "(CTR %.4f since the last round, %.4f over the last %d); retraining the ranker",
                            watch.monitor.kind, d.observed, d.mean, d.recent,
                            min(d.observed, watch.monitor.recent))
                _round(settings, status, "drift", seq=False, ranker=True)
                watch.restart()
            elif status["state"] == "lost":
                status["state"] = "waiting"
            if watch is not None:
                status["drift"] = watch.report()
            time.sleep(1.0)
    finally:
        if watch is not None:
            watch.close()


__all__ = ["events_of", "sequences_of", "fit_seq", "fit_retrieval", "fit_ranker", "train_once",
           "train_service", "read_clicks", "read_served", "DriftWatch"]
