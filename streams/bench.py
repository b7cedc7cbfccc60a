"""`streamrec bench ingest`: worker throughput, event-to-state latency, cost per event, replay.

Phase 1 publishes N click events, then starts one worker process and measures how fast it
applies them (first to last applied batch). Baselines measured in the same run, on the same
records: a plain kafka-python read of the topic (the broker's ceiling for one reader); the
processor applying the records to Redis in-process (no Kafka, no Faust), pipeline only, with
the learners' updates sent record by record, and with them summed per batch (the worker's
path); the worker as a no-op Faust agent (``worker.apply`` off: the stream framework's ceiling
with the worker's own settings); the worker pipeline only; and the worker on the other event
loop. For the worker as configured it reports the CPU microseconds per event of its process
(``/proc``) and of Redis (``INFO cpu``), and the durations of script calls (Redis's slow log,
every call above 0.25 ms, against ``INFO commandstats``'s count of all calls). Then a replay
of the same events into a new namespace, learners on.

Phase 2 restarts the worker with latency tracing and publishes at a fixed rate; the worker
records, for every applied event, the time from the record's producer timestamp to the end
of the Redis write that made it visible.

Memory: ``used_memory`` of Redis before and after the learners-on worker of phase 1, per
million events, and that state broken down by key family (``MEMORY USAGE`` of every key of the
live namespace and of the change streams); the same for the in-process baseline with learners
(same run, same records; it writes no change streams).

Redis CPU and script durations are Redis's own: run it against a Redis nothing else uses
(``STREAMREC_REDIS__URL``), or they count other clients too.

Progress goes to stderr; the last line on stdout is one JSON object with the figures.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.services import ensure_services
from streamrec.infra.console import Progress, emit
from streamrec.infra.redisconn import used_memory
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Click, encode
from streamrec.streams.launch import WorkerProcess, applied, wait_applied
from streamrec.streams.processor import Processor, Record
from streamrec.streams.replay import replay

T0 = 1_700_000_000_000


def _say(message: str) -> None:
    emit(f"bench: {message}")


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
    # namespace of its own (2,000 records per batch, as the worker's default): pipeline only,
    # with the learners' updates sent record by record (the reference path), and with them
    # summed per batch (the worker's path).
    size = settings.worker.batch_size
    inprocess: dict[str, float] = {}
    inprocess_memory: dict[str, int] = {}
    inprocess_cpu: dict[str, tuple[float, float]] = {}
    for name, learn, summed in (("plain", False, True), ("per_record", True, False), ("summed", True, True)):
        store.aggregate = summed
        processor = Processor(settings, store, namespace=f"benchbase-{name.replace('_', '-')}", learn=learn)
        before = used_memory(store.client)
        t, cpu, redis_cpu = time.monotonic(), time.process_time(), _redis_cpu_s(store)
        for lo in range(0, len(records), size):
            processor.process(records[lo : lo + size])
        inprocess[name] = n / (time.monotonic() - t)
        inprocess_cpu[name] = ((time.process_time() - cpu) / n * 1e6, (_redis_cpu_s(store) - redis_cpu) / n * 1e6)
        inprocess_memory[name] = used_memory(store.client) - before
    store.aggregate = True
    _say(f"baselines: kafka read {n / consume_s:,.0f}/s; in-process apply: pipeline only {inprocess['plain']:,.0f}/s, "
         f"learners record by record {inprocess['per_record']:,.0f}/s, learners summed per batch "
         f"{inprocess['summed']:,.0f}/s (CPU us per event, Python/Redis: "
         + ", ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in inprocess_cpu.items())
         + f"); Redis memory {inprocess_memory['summed'] / n * 1e6 / 2**20:,.0f} MiB per million events "
         "(no change streams)")

    # The worker as a no-op agent (the stream framework's ceiling with the worker's own
    # settings), pipeline only, and (a baseline) on the other event loop than the setting's
    # (uvloop by default), learners on; each with a group and key prefix of its own. Then the
    # worker as configured, with every learner on.
    ceiling = _measure_variant(settings, n, logs, "noop", worker={"apply": False})
    _say(f"worker, no-op agent (Faust's ceiling): {ceiling:,.0f}/s")
    plain_rate = _measure_variant(settings, n, logs, "plain", learners={"enabled": False})
    _say(f"worker, pipeline only: {plain_rate:,.0f}/s")
    other = "asyncio" if settings.worker.event_loop == "uvloop" else "uvloop"
    other_rate = _measure_variant(settings, n, logs, "loop", worker={"event_loop": other})
    _say(f"worker, all learners on, {other} event loop: {other_rate:,.0f}/s")
    scripts = _ScriptTimes(store)
    main = _measure_worker(settings, store, n, logs / "worker-1.log", scripts)
    worker_rate, memory = main["rate"], main["memory"]
    families = _memory_by_family(store, k.partitions)
    per_million = {name: round(b / n * 1e6 / 2**20, 1) for name, b in families.items()}
    _say(f"worker, all learners on: {worker_rate:,.0f}/s ({worker_rate / ceiling:.2f} of the no-op ceiling); "
         f"CPU per event: worker {main['worker_cpu_us']:.1f} us, Redis {main['redis_cpu_us']:.1f} us; "
         f"script calls {scripts.calls:,}, p99 {scripts.percentile_ms(99):.2f} ms, longest "
         f"{(scripts.durations_us[0] / 1000 if scripts.durations_us else 0):.2f} ms; Redis memory "
         f"{memory / n * 1e6 / 2**20:,.0f} MiB per million events (used_memory added); by key family "
         f"(MEMORY USAGE, {sum(families.values()) / n * 1e6 / 2**20:,.0f} MiB in all): "
         + ", ".join(f"{name} {v:,.1f}" for name, v in per_million.items()))

    # Backfill: a replay of the same events into a new namespace, learners on (no switch).
    summary = replay(settings, namespace="benchreplay", switch=False)
    replay_rate = summary.read / summary.seconds if summary.seconds > 0 else float("inf")
    _say(f"replay into a new namespace: {summary.read:,} records in {summary.seconds:.1f} s "
         f"({replay_rate:,.0f}/s), {summary.verification.get('mismatched_users')} users differ from live")

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
        "faust_ceiling_events_per_s": round(ceiling, 1),
        "ratio_to_faust_ceiling": round(worker_rate / ceiling, 3),
        "inprocess_events_per_s": round(inprocess["summed"], 1),
        "inprocess_per_record_events_per_s": round(inprocess["per_record"], 1),
        "inprocess_pipeline_only_events_per_s": round(inprocess["plain"], 1),
        "inprocess_cpu_us_per_event": {k: {"python": round(a, 2), "redis": round(b, 2)}
                                       for k, (a, b) in inprocess_cpu.items()},
        "script_p99_ms": round(scripts.percentile_ms(99), 3),
        "script_max_ms": round(scripts.durations_us[0] / 1000, 3) if scripts.durations_us else None,
        "script_calls": scripts.calls,
        "script_threshold_ms": scripts.threshold_us / 1000,
        "worker_cpu_us_per_event": round(main["worker_cpu_us"], 2),
        "redis_cpu_us_per_event": round(main["redis_cpu_us"], 2),
        "redis_bytes_per_event": round(memory / n, 1),
        "replay_events_per_s": round(replay_rate, 1),
        "replay_records": summary.read,
        "replay_mismatched_users": summary.verification.get("mismatched_users"),
        "latency_p50_ms": round(_percentile(lat, 50), 2),
        "latency_p99_ms": round(_percentile(lat, 99), 2),
        "latency_max_ms": round(max(lat), 2) if lat else None,
        "latency_samples": len(lat),
        "latency_rate_per_s": round(achieved, 1),
        "baseline_kafka_read_per_s": round(n / consume_s, 1),
        "baseline_inprocess_apply_per_s": round(inprocess["plain"], 1),
        "publish_per_s": round(n / publish_s, 1),
        "pipeline_only_events_per_s": round(plain_rate, 1),
        "event_loop": settings.worker.event_loop,
        f"events_per_s_{other}_loop": round(other_rate, 1),
        "baseline_inprocess_apply_learners_per_s": round(inprocess["summed"], 1),
        "redis_mib_per_million_events": round(memory / n * 1e6 / 2**20, 1),
        "redis_mib_per_million_events_by_family": per_million,
        "baseline_inprocess_learners_redis_mib_per_million_events": round(inprocess_memory["summed"] / n * 1e6 / 2**20, 1),
        "users": users,
        "partitions": k.partitions,
        "batch_size": settings.worker.batch_size,
        "target_events_per_s": 20_000,
        "target_ratio_to_faust_ceiling": 0.85,
        "target_inprocess_events_per_s": 40_000,
        "target_latency_p99_ms": 50,
        "target_script_p99_ms": 5,
        "target_replay_events_per_s": 25_000,
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
        return _measure_worker(variant, variant_store, n, logs / f"worker-{name}.log")["rate"]
    finally:
        variant_store.drop_everything()


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_cpu_s(store: StateStore) -> float:
    """CPU seconds Redis has used (``INFO cpu``: its main thread and the others)."""
    info = store.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class _ScriptTimes:
    """Durations of script calls (EVALSHA) while it is active, from Redis's own slow log: every
    call above ``threshold_us`` is logged with its duration, and ``INFO commandstats`` counts
    all calls, so a percentile above the threshold is exact (one below it reads as the
    threshold, an upper bound). Redis's settings are put back afterwards."""

    def __init__(self, store: StateStore, threshold_us: int = 250) -> None:
        self.client, self.threshold_us = store.client, threshold_us

    @staticmethod
    def _calls(client: Any) -> int:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    def __enter__(self) -> "_ScriptTimes":
        c = self.client
        self.saved = {k: c.config_get(k)[k] for k in ("slowlog-log-slower-than", "slowlog-max-len")}
        c.config_set("slowlog-log-slower-than", self.threshold_us)
        c.config_set("slowlog-max-len", 1_000_000)
        c.slowlog_reset()
        self.calls0 = self._calls(c)
        return self

    def __exit__(self, *exc: Any) -> None:
        c = self.client
        self.calls = self._calls(c) - self.calls0
        entries = c.slowlog_get(1_000_000)
        for key, value in self.saved.items():
            c.config_set(key, value)
        self.durations_us = sorted((int(e["duration"]) for e in entries
                                    if e["command"][:8].upper() == b"EVALSHA "), reverse=True)

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile of call durations, ms (the threshold when it lies below it)."""
        above = int(np.ceil(self.calls * (100.0 - q) / 100.0))
        if above < 1 or above > len(self.durations_us):
            return self.threshold_us / 1000.0
        return self.durations_us[above - 1] / 1000.0


def _measure_worker(settings: Settings, store: StateStore, n: int, log: Path,
                    scripts: _ScriptTimes | None = None) -> dict[str, float]:
    """One worker process applying the n records already in the topic: events/s from its
    first to its last applied batch, Redis memory added, and the CPU seconds the worker process
    and Redis used over that span (script call durations into ``scripts``, when given)."""
    memory_before = used_memory(store.client)
    worker = WorkerProcess(settings, log.stem, log)
    try:
        first = None
        deadline = time.monotonic() + 300
        timeline: list[tuple[float, int]] = []
        cpu0 = (0.0, 0.0)
        shown = Progress(f"bench: {log.stem} applied", total=n, every_s=10.0)
        while time.monotonic() < deadline:
            done = applied(store)
            shown.set(done)
            timeline.append((time.monotonic(), done))
            if done > 0 and first is None:
                first = (time.monotonic(), done)
                cpu0 = (_proc_cpu_s(worker.proc.pid), _redis_cpu_s(store))
                if scripts is not None:
                    scripts.__enter__()
            if done >= n:
                break
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.output()}")
            time.sleep(0.01)
        end = time.monotonic()
        shown.close()
        cpu1 = (_proc_cpu_s(worker.proc.pid), _redis_cpu_s(store))
        if scripts is not None and first is not None:
            scripts.__exit__(None, None, None)
        if first is None or applied(store) < n:
            raise RuntimeError(f"worker applied {applied(store)}/{n} in 300 s:\n{worker.output()}")
        span = end - first[0]
        marks = [f"{t - first[0]:.1f}s:{d}" for t, d in timeline[:: max(1, len(timeline) // 12)] if t >= first[0]]
        _say("applied over time: " + " ".join(marks))
        measured = n - first[1]
        rate = measured / span if span > 0 else float("inf")
    finally:
        worker.stop()
    store.client.delete(store.keys.worker(log.stem))  # its heartbeat: no live worker any more
    return {
        "rate": rate,
        "memory": used_memory(store.client) - memory_before,
        "worker_cpu_us": (cpu1[0] - cpu0[0]) / max(measured, 1) * 1e6,
        "redis_cpu_us": (cpu1[1] - cpu0[1]) / max(measured, 1) * 1e6,
    }


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
