"""Operating streamrec: the /metrics endpoints of running workers, `streamrec health`, JSON
logs and progress output.

The metrics test runs a real stream worker and a real serving worker (child processes, each
with its own metrics port), publishes with a plain kafka-python producer (valid clicks, a
duplicate, records that are not events), and reads what Prometheus would scrape."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from streamrec.infra import metrics
from streamrec.infra.console import JsonFormatter, Progress, setup_logging
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings, env_for
from streamrec.infra.state import StateStore
from streamrec.models.events import Click, encode
from streamrec.serving.health import check_role
from streamrec.streams.launch import WorkerProcess, wait_applied
from tests.support import wait_for

T0 = 1_700_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def family(samples: dict[Any, float], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def health(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_for(settings)}
    return subprocess.run([sys.executable, "-m", "streamrec", "health", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_metrics_of_a_running_worker_and_serving_and_their_health(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker_port, serve_port = free_port(), free_port()
    s = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"redis_every_s": 0.5})})
    with_port = lambda port: s.model_copy(update={"metrics": s.metrics.model_copy(update={"port": port})})  # noqa: E731
    store = StateStore.from_settings(s)
    worker = WorkerProcess(with_port(worker_port), "mw1", tmp_path / "worker.log")
    server = WorkerProcess(with_port(serve_port), "ms1", tmp_path / "serve.log", command="serve")
    try:
        n = 300
        clicks = [Click(id=f"e{k}", timestamp=T0 + k * 1000, user=f"u{k % 30}", item=f"i{k % 17}")
                  for k in range(n)]
        producer = KafkaProducer(bootstrap_servers=s.kafka.bootstrap)
        for c in clicks:
            producer.send(s.kafka.events_topic, key=c.user.encode(), value=encode(c))
        producer.send(s.kafka.events_topic, key=b"u0", value=encode(clicks[0]))  # a duplicate
        producer.send(s.kafka.events_topic, key=b"u1", value=b"\xff\xfe not utf-8")
        producer.send(s.kafka.events_topic, key=b"u2", value=b'{"type": "click"}')
        producer.flush()
        producer.close()
        wait_applied(store, n + 3, workers=[worker], timeout_s=120)
        recstore = RecStore(store, s.kafka.partitions)
        wait_for(lambda: recstore.read_recs("u29", fallback=False) is not None and recstore.backlog() == 0,
                 timeout_s=90, what="every user's list written")

        def worker_done() -> dict[Any, float]:
            got = scrape(worker_port)
            lags = family(got, "streamrec_consumer_lag_records")
            return got if lags and all(v == 0 for v in lags.values()) else {}

        got = wait_for(worker_done, timeout_s=30, what="lag 0 on every partition")
        assert value(got, "streamrec_events_total", outcome="applied") == n
        assert value(got, "streamrec_events_total", outcome="duplicate") == 1
        assert value(got, "streamrec_events_total", outcome="dead_lettered") == 2
        codes = family(got, "streamrec_dead_letters_total")
        assert sum(codes.values()) == 3 and (("code", "duplicate"),) in codes, codes
        events_lag = {labels for labels in family(got, "streamrec_consumer_lag_records")
                      if ("topic", s.kafka.events_topic) in labels}
        assert len(events_lag) == s.kafka.partitions, events_lag
        assert value(got, "streamrec_event_to_state_seconds_count") == n
        assert 0 < value(got, "streamrec_event_to_state_seconds_sum") < 120 * n
        assert value(got, "streamrec_batch_apply_seconds_count") >= 1
        wait_for(lambda: value(scrape(worker_port), "streamrec_redis_used_memory_bytes") > 0, timeout_s=10,
                 what="Redis memory gauge")
        assert "streamrec_events" in {f.name for f in text_string_to_metric_families(
            urllib.request.urlopen(f"http://127.0.0.1:{worker_port}/metrics").read().decode())}

        served = scrape(serve_port)
        assert value(served, "streamrec_refreshes_total") >= 30  # every user at least once
        assert value(served, "streamrec_event_to_recs_seconds_count") >= 30
        assert value(served, "streamrec_refreshes_failed_total") == 0
        wait_for(lambda: value(scrape(serve_port), "streamrec_dirty_users") == 0
                 and value(scrape(serve_port), "streamrec_redis_used_memory_bytes") > 0,
                 timeout_s=10, what="dirty users 0")
        status = {w["worker"]: w for w in store.registry.workers()}
        assert status["mw1"]["lag"] == 0

        for role in ("worker", "serve"):
            ok = health(s, "--role", role)
            assert ok.returncode == 0, ok.stderr
            assert ok.stdout.strip().startswith(f"{role} healthy") and ok.stdout.count("\n") == 1
        both = health(s)
        assert both.returncode == 0 and "worker healthy" in both.stdout and "serve healthy" in both.stdout
        for role in ("worker", "serve"):  # this host's workers (a container's healthcheck)
            assert health(s, "--role", role, "--here").returncode == 0
    finally:
        worker.stop()
        server.stop()
    # stopped: their heartbeats expire (worker: 5 x heartbeat_s; serving: 10 s)
    def down(role: str) -> subprocess.CompletedProcess[str] | None:
        r = health(s, "--role", role)
        return r if r.returncode == 1 else None

    for role, name in (("worker", "stream worker"), ("serve", "serving worker")):
        r = wait_for(lambda: down(role), timeout_s=30, what=f"{role} unhealthy after the stop")
        assert r.stdout == "" and r.stderr.count("\n") == 1 and f"no {name}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def _status(role: str, age_s: float, now: float, **extra: Any) -> dict[str, Any]:
    return {"worker": f"host-{role}-1", "role": role, "host": "host", "updated": now - age_s, "lost": None,
            **extra}


def test_health_verdicts_from_heartbeats() -> None:
    s = Settings()
    now = 1_000_000.0
    h = s.health
    fresh = [_status("stream", 1.0, now, lag=10)]
    assert check_role("worker", fresh, settings=s, now=now).healthy
    behind = [_status("stream", 1.0, now, lag=h.max_lag_records // 2), _status("stream", 1.0, now, lag=h.max_lag_records)]
    v = check_role("worker", behind, settings=s, now=now)
    assert not v.healthy and "records behind" in v.line and "\n" not in v.line
    stale = [_status("stream", h.max_heartbeat_age_s + 5, now, lag=0)]
    v = check_role("worker", stale, settings=s, now=now)
    assert not v.healthy and "no live stream worker" in v.line
    assert not check_role("worker", [], settings=s, now=now).healthy
    lost = [_status("stream", 1.0, now, lag=0, lost="registry gone")]
    assert "state lost" in check_role("worker", lost, settings=s, now=now).line
    # a worker of another host does not count with --here
    assert not check_role("worker", fresh, settings=s, now=now, host="elsewhere").healthy
    assert check_role("worker", fresh, settings=s, now=now, host="host").healthy

    serve = [_status("serve", 1.0, now)]
    assert check_role("serve", serve, settings=s, now=now, oldest_dirty_s=1.0).healthy
    v = check_role("serve", serve, settings=s, now=now, oldest_dirty_s=h.max_dirty_age_s + 1)
    assert not v.healthy and "waited" in v.line

    trainer = [_status("trainer", 1.0, now)]
    assert check_role("trainer", trainer, settings=s, now=now, model_created_s=None).healthy
    assert check_role("trainer", trainer, settings=s, now=now, model_created_s=now - 60).healthy
    v = check_role("trainer", trainer, settings=s, now=now, model_created_s=now - h.max_model_age_s - 1)
    assert not v.healthy and "model" in v.line


def test_health_rejects_a_bad_role_in_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "streamrec", "health", "--role", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid choice" in r.stderr


def test_metric_families_have_help_and_conventional_names() -> None:
    from prometheus_client import REGISTRY
    exported = {f"{fam.name}_total" if fam.type == "counter" else fam.name: fam for fam in REGISTRY.collect()}
    for name in metrics.FAMILIES:
        assert name in exported, f"{name} is not exported"
        fam = exported[name]
        assert fam.documentation and len(fam.documentation) > 20, name
        assert fam.type != "counter" or name.endswith("_total"), name
        assert fam.type != "histogram" or name.endswith("_seconds"), name


def test_observe_many_equals_one_observe_per_value() -> None:
    from prometheus_client import CollectorRegistry, Histogram
    registry = CollectorRegistry()
    one = Histogram("one_seconds", "one by one", buckets=(0.01, 0.1, 1.0), registry=registry)
    many = Histogram("many_seconds", "in one pass", buckets=(0.01, 0.1, 1.0), registry=registry)
    values = [0.0, 0.005, 0.01, 0.010000001, 0.1, 0.5, 1.0, 1.5, 99.0] * 7  # every bound, either side
    for v in values:
        one.observe(v)
    metrics.observe_many(many, values)
    samples = {(s.name.split("_")[0], s.name.split("_", 1)[1], s.labels.get("le")): s.value
               for f in registry.collect() for s in f.samples if not s.name.endswith("_created")}
    for (name, kind, le), v in samples.items():
        if name == "one" and kind != "seconds_sum":
            assert samples[("many", kind, le)] == v, (kind, le)  # bucket counts and count exactly
    # the sum: the batch is summed first, then added (another order of float additions)
    assert samples[("many", "seconds_sum", None)] == pytest.approx(samples[("one", "seconds_sum", None)], rel=1e-12)
    assert samples[("many", "seconds_count", None)] == len(values)


def test_lag_and_model_gauges_drop_series_that_are_gone() -> None:
    metrics.set_lag({("t", 0): 5, ("t", 1): 0})
    metrics.set_lag({("t", 1): 3})  # partition 0 given away in a rebalance
    samples = {tuple(sorted(s.labels.items())): s.value
               for f in metrics.CONSUMER_LAG.collect() for s in f.samples}
    assert samples == {(("partition", "1"), ("topic", "t")): 3.0}
    metrics.refresh_models({"seq": {"version": "a", "created_at": 1000_000}}, now_s=1060.0)
    metrics.refresh_models({"seq": {"version": "b", "created_at": 1050_000}}, now_s=1060.0)
    info = {tuple(sorted(s.labels.items())) for f in metrics.MODEL_INFO.collect() for s in f.samples}
    assert info == {(("kind", "seq"), ("version", "b"))}
    ages = {s.labels["kind"]: s.value for f in metrics.MODEL_AGE.collect() for s in f.samples}
    assert ages["seq"] == pytest.approx(10.0)
    metrics.set_lag({})


def test_json_log_lines_and_progress_lines() -> None:
    record = logging.LogRecord("streamrec.x", logging.WARNING, __file__, 1, "broker %s down", ("b1",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["logger"] == "streamrec.x" and line["message"] == "broker b1 down"

    plain = io.StringIO()
    with Progress("load", total=3, unit="clicks", every_s=0.0, stream=plain, tty=False) as p:
        for _ in range(3):
            p.update(1)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("load: 3/3 clicks") and "\r" not in plain.getvalue()
    try:
        setup_logging("json")
        out = io.StringIO()
        with Progress("replay", total=None, every_s=0.0, stream=out, tty=True) as p:  # JSON: never a bar
            p.set(7, note="behind 0")
        objects = [json.loads(x) for x in out.getvalue().splitlines()]
        assert objects[-1]["done"] == 7 and objects[-1]["message"].startswith("replay: 7 events")
    finally:
        setup_logging("text")


def test_cli_logs_json_with_log_format_json(settings: Settings) -> None:
    """A worker started with --log-format json writes only JSON lines (Faust's own included)."""
    env = {**os.environ, **env_for(settings), "STREAMREC_REDIS__URL": "redis://127.0.0.1:1/0",
           "STREAMREC_REDIS__EMBEDDED": "false"}
    r = subprocess.run([sys.executable, "-m", "streamrec", "--log-format", "json", "-v", "status"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = [json.loads(x) for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1]["level"] == "ERROR" and lines[-1]["message"].startswith("streamrec: error:")
    text = subprocess.run([sys.executable, "-m", "streamrec", "status"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert text.returncode == 1 and text.stderr.count("\n") == 1 and text.stderr.startswith("streamrec: error:")
