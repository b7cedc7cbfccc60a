"""`streamrec demo`: the whole system on embedded services, end to end.

Starts (or reuses) Kafka and Redis, a stream worker and a serving worker (child processes),
publishes a catalog and streams clicks (synthetic by default, or a dataset file) with a few
invalid records mixed in. Half-way it trains the sequence model from the events topic and
publishes it; serving swaps it in while clicks keep flowing, and the watched users'
recommendations are printed as they change. At the end it trains the ranker from the served
log, shows the swap, rebuilds the state by replay under traffic and switches readers to it,
and prints one JSON line of what happened.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.recstore import RecStore
from streamrec.infra.redisconn import redact
from streamrec.infra.services import ensure_services
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models import synthetic
from streamrec.models.events import Click, Item
from streamrec.serving import trainer
from streamrec.streams.launch import WorkerProcess, applied, wait_applied
from streamrec.streams.replay import replay
from streamrec.streams.sdk import Publisher, Reader

BAD_RECORDS = [b"not json at all", b'{"type":"purchase","id":"x1"}', b'{"type":"click","id":"x2"}']


def _out(line: str) -> None:
    print(line, flush=True)


def _dataset(data: str | None, clicks: int, users: int) -> tuple[list[Item], list[Click]]:
    if data is None:
        config = synthetic.SyntheticConfig(n_users=users, n_items=max(500, users * 10), seed=7, impressions=False)
        return synthetic.catalog(config), [e for e in synthetic.events(config, clicks) if isinstance(e, Click)]
    from streamrec.streams import loaders

    events = loaders.load_any(data)
    events.sort(key=lambda c: c.timestamp)
    movies = Path(data).with_name("movies.csv")
    items = loaders.load_movielens_items(movies) if movies.exists() else []
    return items, events[:clicks]


def run(clicks: int = 20_000, users: int = 200, rate: int = 1000, data: str | None = None,
        epochs: int = 10) -> int:
    base = Settings()
    tag = uuid.uuid4().hex[:6]
    base = base.model_copy(update={
        "kafka": base.kafka.model_copy(update={"topic_prefix": f"demo{tag}", "group_id": f"demo{tag}"}),
        "redis": base.redis.model_copy(update={"prefix": f"demo{tag}"}),
        "serving": base.serving.model_copy(update={"default_every_s": 1.0}),
        "trainer": base.trainer.model_copy(update={"ranker_min_lists": 20}),
    })
    with ensure_services(base, start=True) as services:
        settings = services.settings
        _out(f"kafka  {settings.kafka.bootstrap}{'  (embedded Tansu, in-memory)' if services.owned else ''}")
        _out(f"redis  {redact(settings.redis.url)}")
        kafka_wiring.ensure_topics(settings.kafka)
        store = StateStore.from_settings(settings)
        logs = Path(tempfile.mkdtemp(prefix="streamrec-demo-"))
        worker = WorkerProcess(settings, "demo-worker", logs / "worker.log")
        server = WorkerProcess(settings, "demo-serve", logs / "serve.log", command="serve")
        try:
            items, events = _dataset(data, clicks, users)
            return _stream(settings, store, [worker, server], items, events, rate, epochs)
        finally:
            server.stop()
            worker.stop()
            store.drop_everything()
            kafka_wiring.delete_topics(settings.kafka)
            _out(f"logs: {logs}")


def _publisher(settings: Settings, events: Sequence[Click], rate: int, sent: dict[str, int]) -> threading.Thread:
    def publish() -> None:
        with Publisher.from_settings(settings, linger_ms=2) as pub:
            start = time.monotonic()
            for i, event in enumerate(events):
                if (delay := start + i / rate - time.monotonic()) > 0:
                    time.sleep(delay)
                pub.send(event)
                if i % (len(events) // len(BAD_RECORDS) + 1) == 0:
                    pub.send_raw(settings.kafka.events_topic, b"demo", BAD_RECORDS[sent["bad"] % len(BAD_RECORDS)])
                    sent["bad"] += 1
                sent["n"] += 1

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread


def _watch(reader: Reader, users: Sequence[str], last: dict[str, str]) -> None:
    for user in users:
        recs = reader.recommendations(user)
        if recs is None:
            continue
        shown = " ".join(f"{i}[{s}]" for i, s in zip(recs["items"][:6], recs["sources"][:6]))
        if shown != last.get(user):
            last[user] = shown
            kind = "default list" if recs["default"] else f"as of click at {recs['as_of']}"
            _out(f"         {user}: {shown}  ({kind}; {recs['model']})")


def _stream(settings: Settings, store: StateStore, procs: list[WorkerProcess], items: list[Item],
            events: list[Click], rate: int, epochs: int) -> int:
    worker, server = procs
    recstore = RecStore(store, settings.kafka.partitions)
    reader = Reader(store)
    watch = sorted({e.user for e in events[:200]})[:3]
    with Publisher.from_settings(settings) as pub:
        pub.send_all(items)
    _out(f"published {len(items):,} catalog items; workers starting ...")
    wait_applied(store, len(items), timeout_s=120, workers=[worker])
    half = len(events) // 2
    sent = {"n": 0, "bad": 0}
    last: dict[str, str] = {}
    started = time.monotonic()
    for phase, chunk in (("first half", events[:half]), ("second half", events[half:])):
        _out(f"streaming the {phase}: {len(chunk):,} clicks at {rate:,}/s; watching {', '.join(watch)}")
        thread = _publisher(settings, chunk, rate, sent)
        while thread.is_alive():
            time.sleep(1.0)
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.worker_id} exited:\n{p.output()}")
            _out(f"[{time.monotonic() - started:5.1f}s] applied {applied(store):,} records")
            _watch(reader, watch, last)
        thread.join()
        wait_applied(store, len(items) + sent["n"] + sent["bad"], timeout_s=120, workers=[worker])
        if phase == "first half":
            _out(f"training the sequence model on the events topic ({epochs} epochs) ...")
            report = trainer.train_once(settings, seq=True, ranker=False, epochs=epochs)
            _out(f"published sequence model {report['seq']['version']}: {report['seq']['items']:,} items, "
                 f"index {report['seq']['index']}; serving swaps it in while clicks keep coming")
    time.sleep(2.0)
    _watch(reader, watch, last)
    _out("training the ranker on the served log joined with the clicks that followed ...")
    report = trainer.train_once(settings, seq=False, ranker=True)
    ranker = report["ranker"]
    _out(f"ranker: {json.dumps(ranker)}")
    if "version" in ranker:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = {w["worker"]: w for w in store.registry.workers()}.get(server.worker_id, {})
            if f"ranker={ranker['version']}" in status.get("models", ""):
                break
            time.sleep(0.5)
        with Publisher.from_settings(settings) as pub:
            pub.send(Click(id=f"demo-final-{uuid.uuid4().hex[:6]}", timestamp=events[-1].timestamp + 1000,
                           user=watch[0], item=events[-1].item))
        time.sleep(2.0)
        _watch(reader, watch, last)
    _out("replaying the topics into a fresh namespace while the workers keep running ...")
    summary = replay(settings, progress=lambda s, behind, sec: None)
    _out(f"replay: {summary.read:,} read, {summary.applied:,} applied, {summary.rejected} rejected "
         f"in {summary.seconds:.1f} s; mismatches with live: {summary.verification.get('mismatched_users')}; "
         f"readers switched {summary.previous} -> {summary.namespace}")
    time.sleep(settings.worker.heartbeat_s + 0.5)
    status = {w["worker"]: w for w in store.registry.workers()}
    rejected = status.get(worker.worker_id, {}).get("rejected_by_code", {})
    serving = status.get(server.worker_id, {})
    _out(f"dead-lettered: {json.dumps(rejected)}  (see `streamrec dlq`)")
    default = reader.recommendations("someone-new") or {"items": []}
    _out(f"a user never seen before reads the default list: {' '.join(default['items'][:8])}")
    result: dict[str, Any] = {
        "clicks": sent["n"], "invalid": sent["bad"], "seconds": round(time.monotonic() - started, 1),
        "rejected": rejected, "lists_written": serving.get("written"), "model_swaps": serving.get("swaps"),
        "models": serving.get("models"), "seq_model": recstore.model_version("seq"),
        "ranker": recstore.model_version("ranker"), "replay_namespace": summary.namespace,
        "replay_mismatched_users": summary.verification.get("mismatched_users"),
    }
    print(json.dumps(result))
    return 0 if serving.get("written") and recstore.model_version("seq") else 1


__all__ = ["run"]
