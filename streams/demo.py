"""`streamrec demo`: the whole pipeline on embedded services, end to end.

Starts (or reuses) Kafka and Redis, creates the topics, starts a worker process, streams a
synthetic catalog and click stream at a fixed rate (with a few invalid records mixed in),
shows sessions changing while events flow, then rebuilds the state by replay and switches
readers to it. Ends with one JSON line of what happened.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from infra import kafka as kafka_wiring
from infra.services import ensure_services
from infra.settings import Settings
from infra.state import StateStore
from models import synthetic
from models.events import Click
from streams.launch import WorkerProcess, applied, wait_applied
from streams.replay import replay
from streams.sdk import Publisher, Reader

BAD_RECORDS = [b"not json at all", b'{"type":"purchase","id":"x1"}', b'{"type":"click","id":"x2"}']


def _out(line: str) -> None:
    print(line, flush=True)


def run(clicks: int = 20_000, users: int = 200, rate: int = 2000) -> int:
    base = Settings()
    tag = uuid.uuid4().hex[:6]
    base = base.model_copy(update={
        "kafka": base.kafka.model_copy(update={"topic_prefix": f"demo{tag}", "group_id": f"demo{tag}"}),
        "redis": base.redis.model_copy(update={"prefix": f"demo{tag}"}),
    })
    with ensure_services(base, start=True) as services:
        settings = services.settings
        _out(f"kafka  {settings.kafka.bootstrap}"
             f"{'  (embedded Tansu, in-memory)' if services.owned else ''}")
        _out(f"redis  {settings.redis.url}")
        kafka_wiring.ensure_topics(settings.kafka)
        store = StateStore.from_settings(settings)
        logs = Path(tempfile.mkdtemp(prefix="streamrec-demo-"))
        worker = WorkerProcess(settings, "demo-1", logs / "worker.log")
        try:
            return _stream(settings, store, worker, clicks, users, rate)
        finally:
            worker.stop()
            _cleanup(store, settings)


def _stream(settings: Settings, store: StateStore, worker: WorkerProcess,
            clicks: int, users: int, rate: int) -> int:
    config = synthetic.SyntheticConfig(n_users=users, n_items=max(500, users * 10), seed=7,
                                       impressions=False)
    catalog = synthetic.catalog(config)
    events = list(synthetic.events(config, clicks))
    watch = sorted({e.user for e in events[:50]})[:3]
    sent = {"n": 0, "bad": 0}

    with Publisher.from_settings(settings) as pub:
        pub.send_all(catalog)
    _out(f"worker {worker.worker_id} starting; published {len(catalog):,} catalog records ...")
    wait_applied(store, len(catalog), timeout_s=120, workers=[worker])

    def publish() -> None:
        with Publisher.from_settings(settings, linger_ms=2) as pub:
            start = time.monotonic()
            for i, event in enumerate(events):
                due = start + i / rate
                if (delay := due - time.monotonic()) > 0:
                    time.sleep(delay)
                pub.send(event)
                if i % (len(events) // len(BAD_RECORDS) + 1) == 0:
                    bad = BAD_RECORDS[sent["bad"] % len(BAD_RECORDS)]
                    pub.send_raw(settings.kafka.events_topic, b"demo", bad)
                    sent["bad"] += 1
                sent["n"] += 1

    _out(f"worker joined and applied the catalog; streaming {len(events):,} clicks at {rate:,}/s "
         f"(a few invalid records mixed in); watching users {', '.join(watch)}")
    thread = threading.Thread(target=publish, daemon=True)
    started = time.monotonic()
    thread.start()
    reader = Reader(store)
    last: dict[str, str] = {}
    while thread.is_alive():
        time.sleep(1.0)
        if not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.output()}")
        done = applied(store)
        _out(f"[{time.monotonic() - started:5.1f}s] applied {done:,} records")
        for user in watch:
            view = reader.session(user)
            tail = " ".join(e.item for e in view.entries[-5:])
            if tail != last.get(user):
                last[user] = tail
                _out(f"         {user}: {view.clicks} clicks, session of {view.meta.session_len}, "
                     f"recent: {tail}")
    thread.join()
    total = len(catalog) + len(events) + sent["bad"]
    wait_applied(store, total, timeout_s=120, workers=[worker])
    elapsed = time.monotonic() - started
    _out(f"all {total:,} records applied in {elapsed:.1f} s")
    time.sleep(settings.worker.heartbeat_s + 0.5)
    status = {w["worker"]: w for w in store.workers()}
    rejected = status.get(worker.worker_id, {}).get("rejected_by_code", {})
    _out(f"dead-lettered: {json.dumps(rejected)}  (see `streamrec dlq`)")

    user = watch[0]
    _out(f"session of {user}: {json.dumps(reader.session(user).to_dict()['session'])}")
    top = store.trending(5)
    _out(f"trending now: {' '.join(top)}")
    if top:
        similar = store.similar_items(top[0], 5)
        _out(f"similar to {top[0]}: " + " ".join(f"{i} ({s:.2f})" for i, s in similar))
    _out("replaying the topics into a fresh namespace while the worker keeps running ...")
    summary = replay(settings, require_match=True,
                     progress=lambda s, behind, sec: None)
    _out(f"replay: {summary.read:,} read, {summary.applied:,} applied, {summary.rejected} rejected "
         f"in {summary.seconds:.1f} s; {summary.users} users, mismatches with live: "
         f"{summary.verification.get('mismatched_users')}; readers switched "
         f"{summary.previous} -> {summary.namespace}")
    # A click after the switch lands in the new namespace.
    with Publisher.from_settings(settings) as pub:
        pub.send(Click(id=f"demo-after-{uuid.uuid4().hex[:6]}", timestamp=int(time.time() * 1000),
                       user=user, item="i-after-switch"))
    wait_applied(store, total + 1, namespace=summary.namespace, timeout_s=60, workers=[worker])
    after = reader.session(user)
    _out(f"a new click for {user} after the switch: recent ends with {after.entries[-1].item} "
         f"(namespace {after.namespace})")
    result: dict[str, Any] = {
        "records": total, "seconds": round(elapsed, 2), "rejected": rejected,
        "replay_namespace": summary.namespace, "replay_mismatched_users":
        summary.verification.get("mismatched_users"), "users": summary.users,
    }
    print(json.dumps(result))
    return 0 if after.entries[-1].item == "i-after-switch" else 1


def _cleanup(store: StateStore, settings: Settings) -> None:
    store.drop_everything()
    kafka_wiring.delete_topics(settings.kafka)


if __name__ == "__main__":
    sys.exit(run())
