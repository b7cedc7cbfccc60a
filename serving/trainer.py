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
``serving.model_poll_s``. ``--every`` / ``--after-events`` keep retraining as a service.
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
from streamrec.models.errors import ConfigError, StateLost
from streamrec.models.events import Click, decode
from streamrec.models.index import VectorIndex
from streamrec.models.ranking import RankerConfig, TrainedRanker, train_ranker
from streamrec.models.seqtrain import SeqModel, TrainConfig
from streamrec.models.seqtrain import train as train_seq_model
from streamrec.models.servedlog import LabelledLists, ServedLog, label_lists, served_decoder
from streamrec.serving.modelio import pack_seq

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
    cfg = TrainConfig(epochs=epochs or t.seq_epochs, max_seconds=t.seq_max_seconds)
    model = train_seq_model(sequences, cfg, progress, max_len=t.seq_max_len, dim=t.seq_dim)
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


def fit_ranker(settings: Settings, data: LabelledLists, seed: int = 0) -> TrainedRanker:
    if len(data.groups) < settings.trainer.ranker_min_lists:
        raise ConfigError(
            f"only {len(data.groups)} served lists were followed by a click on one of their candidates "
            f"(trainer.ranker_min_lists = {settings.trainer.ranker_min_lists}); serve more traffic first")
    t = settings.trainer
    return train_ranker(data.X, data.y, data.groups, seed=seed, params=RankerConfig(
        n_trees=t.ranker_trees, num_leaves=t.ranker_leaves, min_data_in_leaf=t.ranker_min_leaf,
        learning_rate=t.ranker_learning_rate, early_stopping_rounds=t.ranker_early_stopping))


def read_clicks(settings: Settings) -> list[Click]:
    out = []
    for rec in kafka_wiring.read_to_end(settings.kafka, settings.kafka.events_topic):
        try:
            ev = decode(rec.value)
        except Exception:  # invalid records are the worker's business (dead letters)
            continue
        if isinstance(ev, Click):
            out.append(ev)
    return out


def read_served(settings: Settings) -> list[ServedLog]:
    out = []
    for rec in kafka_wiring.read_to_end(settings.kafka, settings.kafka.served_topic):
        try:
            out.append(served_decoder.decode(rec.value))
        except Exception:
            log.warning("unreadable served log record at %s:%s", rec.partition, rec.offset)
    return out


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
        model, index, content = fit_seq(settings, sequences, catalog=catalog_tokens(recstore, state),
                                        progress=_progress("seq"), epochs=epochs)
        version = version_tag()
        info = {"users": len(sequences), "clicks": len(clicks), "items": len(model.vocab.items),
                "index": index.kind, "indexed": len(index), "seconds": round(time.monotonic() - t0, 1)}
        recstore.publish_model("seq", version, pack_seq(model, index, content), info, keep)
        report["seq"] = {"version": version, **info}
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


def _train_loop(settings: Settings, state: StateStore, status: dict[str, Any], every_s: float,
                after_events: int, epochs: int | None, stop: Callable[[], bool]) -> None:
    last_count = -1
    last_time = 0.0
    lost = False
    while not stop():
        try:
            # events the stream workers applied so far (their progress in Redis: cheap to read)
            count = sum(state.progress(state.live()).values())
            lost = False
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
        if due and count > 0:
            status["state"] = "training"
            t0 = time.monotonic()
            try:
                report: dict[str, Any] = train_once(settings, epochs=epochs)
            except (ConfigError, StateLost) as exc:  # not enough data yet, or no state: next turn
                report = {"skipped": str(exc)}
            except Exception as exc:
                if not is_transient(exc):
                    metrics.TRAININGS.labels("failed").inc()
                    raise
                report = {"skipped": f"service unavailable: {exc}"}
            metrics.TRAINING_SECONDS.observe(time.monotonic() - t0)
            published = any(isinstance(v, dict) and "version" in v for v in report.values())
            metrics.TRAININGS.labels("published" if published else "skipped").inc()
            status.update(state="waiting", rounds=status["rounds"] + 1, last_round={
                "at": time.time(), "published": published, "seconds": round(time.monotonic() - t0, 1)})
            print(json.dumps(report), file=sys.stderr, flush=True)
            last_count, last_time = count, time.monotonic()
        elif status["state"] == "lost":
            status["state"] = "waiting"
        time.sleep(1.0)


__all__ = ["sequences_of", "fit_seq", "fit_ranker", "train_once",
           "train_service", "read_clicks", "read_served"]
