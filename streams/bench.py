"""`streamrec bench ingest`: worker throughput and event-to-state latency.

Phase 1 publishes N click events, then starts one worker process and measures how fast it
applies them (first to last applied batch). Baselines measured in the same run, on the same
records: a plain kafka-python read of the topic (the broker's ceiling for one reader) and the
processor applying the records to Redis in-process (no Kafka, no Faust).

Phase 2 restarts the worker with latency tracing and publishes at a fixed rate; the worker
records, for every applied event, the time from the record's producer timestamp to the end
of the Redis write that made it visible.

Memory: ``used_memory`` of Redis before and after the learners-on worker of phase 1, per
million events, and that state broken down by key family (``MEMORY USAGE`` of every key of the
live namespace and of the change streams); the same for the in-process baseline with learners
(same run, same records; it writes no change streams).

Progress goes to stderr; the last line on stdout is one JSON object with the figures.
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.services import ensure_services
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Click, encode
from streamrec.streams.launch import WorkerProcess, applied, wait_applied
from streamrec.streams.processor import Processor, Record

T0 = 1_700_000_000_000


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _clicks(n: int, users: int, items: int = 50_000, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) of encoded clicks: users uniform, items Zipf-like, times 100 us apart."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    i = np.minimum(rng.zipf(1.2, n), items) - 1
    return [
        (f"u{u[k]}".encode(),
         encode(Click(id=f"b{k}", timestamp=T0 + k // 10, user=f"u{u[k]}", item=f"i{i[k]}")))
        for k in range(n)
    ]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def ingest(events: int = 200_000, rate: int = 1000, duration_s: float = 20.0,
           users: int = 10_000, partitions: int = 8) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    base = Settings()
    base = base.model_copy(update={
        "kafka": base.kafka.model_copy(update={
            "topic_prefix": f"bench{tag}", "group_id": f"bench{tag}", "partitions": partitions}),
        "redis": base.redis.model_copy(update={"prefix": f"bench{tag}"}),
    })
    logs = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    with ensure_services(base, start=True) as services:
        settings = services.settings
        k = settings.kafka
        kafka_wiring.ensure_topics(k)
        store = StateStore.from_settings(settings)
        try:
            return _run(settings, store, logs, events, rate, duration_s, users)
        finally:
            _cleanup(store, settings)


def _run(settings: Settings, store: StateStore, logs: Path, n: int, rate: int,
         duration_s: float, users: int) -> dict[str, Any]:
    k = settings.kafka
    payloads = _clicks(n, users)
    _say(f"publishing {n:,} clicks for {users:,} users to {k.partitions} partitions")
    producer = kafka_wiring.producer(k, linger_ms=20)
    started = time.monotonic()
    for key, value in payloads:
        producer.send(k.events_topic, key=key, value=value)
    producer.flush()
    publish_s = time.monotonic() - started
    _say(f"published in {publish_s:.1f} s ({n / publish_s:,.0f}/s)")

    # Baseline 1: one group-less kafka-python reader over the same records.
    consumer = kafka_wiring.reader(k, [k.events_topic])
    got, t = 0, time.monotonic()
    records: list[Record] = []
    while got < n and time.monotonic() - t < 120:
        for batch in consumer.poll(timeout_ms=500, max_records=10_000).values():
            got += len(batch)
            records += [Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in batch]
    consume_s = time.monotonic() - t
    consumer.close()

    # Baseline 2: the processor applying the same records to Redis in-process, into a
    # namespace of its own (2,000 records per batch, as the worker's default), without and
    # with the online learners.
    size = settings.worker.batch_size
    inprocess, inprocess_memory = {}, {}
    for learn in (False, True):
        processor = Processor(settings, store, namespace=f"benchbase{int(learn)}", learn=learn)
        before = int(store.client.info("memory")["used_memory"])
        t = time.monotonic()
        for lo in range(0, len(records), size):
            processor.process(records[lo : lo + size])
        inprocess[learn] = n / (time.monotonic() - t)
        inprocess_memory[learn] = int(store.client.info("memory")["used_memory"]) - before
    _say(f"baselines: kafka read {n / consume_s:,.0f}/s, in-process apply {inprocess[False]:,.0f}/s "
         f"(with learners {inprocess[True]:,.0f}/s, Redis memory "
         f"{inprocess_memory[True] / n * 1e6 / 2**20:,.0f} MiB per million events: no change streams)")

    # The worker, pipeline only, and (a baseline) on the other event loop than the setting's
    # (uvloop by default), learners on; each with a group and key prefix of its own. Then the
    # worker as configured, with every learner on.
    plain_rate = _measure_variant(settings, n, logs, "plain", learners={"enabled": False})
    _say(f"worker, pipeline only: {plain_rate:,.0f}/s")
    other = "asyncio" if settings.worker.event_loop == "uvloop" else "uvloop"
    other_rate = _measure_variant(settings, n, logs, "loop", worker={"event_loop": other})
    _say(f"worker, all learners on, {other} event loop: {other_rate:,.0f}/s")
    worker_rate, memory = _measure_worker(settings, store, n, logs / "worker-1.log")
    families = _memory_by_family(store, k.partitions)
    per_million = {name: round(b / n * 1e6 / 2**20, 1) for name, b in families.items()}
    _say(f"worker, all learners on: {worker_rate:,.0f}/s; Redis memory {memory / n * 1e6 / 2**20:,.0f} MiB "
         f"per million events (used_memory added); by key family (MEMORY USAGE, "
         f"{sum(families.values()) / n * 1e6 / 2**20:,.0f} MiB in all): "
         + ", ".join(f"{name} {v:,.1f}" for name, v in per_million.items()))

    # Phase 2: fixed-rate latency with tracing on.
    traced = settings.model_copy(update={"worker": settings.worker.model_copy(update={"trace_latency": True})})
    worker = WorkerProcess(traced, "bench-2", logs / "worker-2.log")
    lat: list[float] = []
    try:
        warm = Click(id="warm", timestamp=T0, user="warm", item="warm")
        producer = kafka_wiring.producer(k, linger_ms=0)
        producer.send(k.events_topic, key=b"warm", value=encode(warm))
        producer.flush()
        wait_applied(store, n + 1, timeout_s=120, workers=[worker])
        time.sleep(1.0)
        store.take_latencies()
        total = int(rate * duration_s)
        _say(f"latency phase: {total:,} events at {rate:,}/s")
        t0 = time.monotonic()
        for j in range(total):
            due = t0 + j / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            value = encode(Click(id=f"l{j}", timestamp=T0 + j, user=f"u{j % users}", item=f"i{j % 997}"))
            producer.send(k.events_topic, key=f"u{j % users}".encode(), value=value)
        producer.flush()
        achieved = total / (time.monotonic() - t0)
        wait_applied(store, n + 1 + total, timeout_s=120, workers=[worker])
        time.sleep(0.5)
        lat = store.take_latencies()
    finally:
        worker.stop()
    skip = int(len(lat) * 0.05)  # the first 5 % include the consumer settling in
    lat = lat[skip:]
    result = {
        "events": n,
        "events_per_s": round(worker_rate, 1),
        "latency_p50_ms": round(_percentile(lat, 50), 2),
        "latency_p99_ms": round(_percentile(lat, 99), 2),
        "latency_max_ms": round(max(lat), 2) if lat else None,
        "latency_samples": len(lat),
        "latency_rate_per_s": round(achieved, 1),
        "baseline_kafka_read_per_s": round(n / consume_s, 1),
        "baseline_inprocess_apply_per_s": round(inprocess[False], 1),
        "publish_per_s": round(n / publish_s, 1),
        "pipeline_only_events_per_s": round(plain_rate, 1),
        "event_loop": settings.worker.event_loop,
        f"events_per_s_{other}_loop": round(other_rate, 1),
        "baseline_inprocess_apply_learners_per_s": round(inprocess[True], 1),
        "redis_mib_per_million_events": round(memory / n * 1e6 / 2**20, 1),
        "redis_mib_per_million_events_by_family": per_million,
        "baseline_inprocess_learners_redis_mib_per_million_events": round(inprocess_memory[True] / n * 1e6 / 2**20, 1),
        "users": users,
        "partitions": k.partitions,
        "batch_size": settings.worker.batch_size,
        "target_events_per_s": 20_000,
        "target_latency_p99_ms": 50,
    }
    _say(f"latency p50 {result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms "
         f"over {len(lat):,} events (mean {statistics.fmean(lat) if lat else float('nan'):.2f} ms)")
    return result


def _measure_variant(settings: Settings, n: int, logs: Path, name: str, **sections: dict[str, Any]) -> float:
    """``_measure_worker`` on settings changed by ``sections`` (section -> field updates), with
    a consumer group and key prefix of its own (dropped afterwards): events/s."""
    update: dict[str, Any] = {
        "kafka": settings.kafka.model_copy(update={"group_id": f"{settings.kafka.group_id}-{name}"}),
        "redis": settings.redis.model_copy(update={"prefix": settings.redis.prefix + name}),
    }
    for section, fields in sections.items():
        update[section] = getattr(settings, section).model_copy(update=fields)
    variant = settings.model_copy(update=update)
    variant_store = StateStore.from_settings(variant)
    try:
        rate, _ = _measure_worker(variant, variant_store, n, logs / f"worker-{name}.log")
    finally:
        variant_store.drop_everything()
    return rate


def _measure_worker(settings: Settings, store: StateStore, n: int, log: Path) -> tuple[float, int]:
    """One worker process applying the n records already in the topic: (events/s from its
    first to its last applied batch, Redis memory added)."""
    memory_before = int(store.client.info("memory")["used_memory"])
    worker = WorkerProcess(settings, log.stem, log)
    try:
        first = None
        deadline = time.monotonic() + 300
        timeline: list[tuple[float, int]] = []
        while time.monotonic() < deadline:
            done = applied(store)
            timeline.append((time.monotonic(), done))
            if done > 0 and first is None:
                first = (time.monotonic(), done)
            if done >= n:
                break
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.output()}")
            time.sleep(0.01)
        end = time.monotonic()
        if first is None or applied(store) < n:
            raise RuntimeError(f"worker applied {applied(store)}/{n} in 300 s:\n{worker.output()}")
        span = end - first[0]
        marks = [f"{t - first[0]:.1f}s:{d}" for t, d in timeline[:: max(1, len(timeline) // 12)] if t >= first[0]]
        _say("applied over time: " + " ".join(marks))
        rate = (n - first[1]) / span if span > 0 else float("inf")
    finally:
        worker.stop()
    return rate, int(store.client.info("memory")["used_memory"]) - memory_before


def _memory_by_family(store: StateStore, partitions: int) -> dict[str, int]:
    """Bytes (``MEMORY USAGE``) per key family of the live namespace (``u:seq``, ``i:nbr``,
    ``trend:all:c:*``, ...: the key with its ids left out) and of the change streams
    (``chg``), largest first."""
    ns = store.live()
    base = ns.pattern()[:-1]  # "<prefix>:<namespace>:"
    names = [k.decode() for k in store.client.scan_iter(match=ns.pattern(), count=5000)]
    families = [re.sub(r":c:.*$", ":c:*", re.sub(r":\{[^}]*\}", "", name[len(base):])) for name in names]
    streams = [store.keys.changes(p) for p in range(partitions)]
    names += streams
    families += ["chg"] * len(streams)
    total: dict[str, int] = {}
    for lo in range(0, len(names), 5000):
        pipe = store.client.pipeline(transaction=False)
        for name in names[lo : lo + 5000]:
            pipe.memory_usage(name)
        for family, used in zip(families[lo : lo + 5000], pipe.execute()):
            total[family] = total.get(family, 0) + int(used or 0)
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _cleanup(store: StateStore, settings: Settings) -> None:
    store.drop_everything()
    kafka_wiring.delete_topics(settings.kafka)
