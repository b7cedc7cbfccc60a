"""Shared fixtures: real services only.

Kafka: the broker named by STREAMREC_KAFKA__BOOTSTRAP when set, else an embedded Tansu broker
started once for the session. Redis: STREAMREC_REDIS__URL (default 127.0.0.1:6379) when it
answers, else an embedded redis-server. Every test gets its own topic and key prefixes, so
tests never see each other's data, and its keys are deleted afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from infra.embedded import EmbeddedKafka
from infra.kafka import delete_topics, ensure_topics
from infra.services import ensure_services
from infra.settings import Settings, env_for
from infra.state import StateStore

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


@pytest.fixture(scope="session")
def base_settings() -> Iterator[Settings]:
    settings = Settings()
    broker = None
    if not settings.kafka.bootstrap:
        broker = EmbeddedKafka(0)
        broker.start()
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap": broker.bootstrap})}
        )
    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"embedded_port": 0})}
    )
    services = ensure_services(settings, start=True)
    try:
        yield services.settings
    finally:
        services.close()
        if broker is not None:
            broker.stop()


@pytest.fixture
def settings(base_settings: Settings) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    s = base_settings.model_copy(update={
        "kafka": base_settings.kafka.model_copy(update={
            "topic_prefix": f"t{tag}", "group_id": f"g{tag}", "partitions": 4,
        }),
        "redis": base_settings.redis.model_copy(update={"prefix": f"test{tag}"}),
        "worker": base_settings.worker.model_copy(update={"heartbeat_s": 0.5}),
    })
    ensure_topics(s.kafka)
    yield s
    client = redis.Redis.from_url(s.redis.url)
    keys = list(client.scan_iter(match=f"test{tag}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i : i + 1000])
    client.close()
    delete_topics(s.kafka)


@pytest.fixture
def store(settings: Settings) -> StateStore:
    return StateStore.from_settings(settings)


class WorkerProcess:
    """A `streamrec worker` child process with the test's settings."""

    def __init__(self, settings: Settings, worker_id: str, log_dir: Path) -> None:
        env = {**os.environ, **env_for(settings), "PYTHONUNBUFFERED": "1"}
        self.log = log_dir / f"worker-{worker_id}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "worker", "--id", worker_id, "--loglevel", "WARNING"],
            env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(worker_id: str = "w1", **overrides: object) -> WorkerProcess:
        s = settings
        if overrides:
            s = settings.model_copy(update={"worker": settings.worker.model_copy(update=overrides)})
        w = WorkerProcess(s, worker_id, tmp_path)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def wait_applied(store: StateStore, total: int, namespace: str | None = None,
                 timeout_s: float = 90.0, workers: list[WorkerProcess] | None = None) -> None:
    """Wait until the workers' progress covers ``total`` records (offsets are contiguous)."""
    deadline = time.monotonic() + timeout_s
    ns = store.keys.ns(namespace) if namespace else store.live()
    done = 0
    while time.monotonic() < deadline:
        done = sum(store.progress(ns).values())
        if done >= total:
            return
        for w in workers or []:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.output()}")
        time.sleep(0.1)
    detail = "\n".join(w.output() for w in workers or [])
    raise AssertionError(f"only {done}/{total} records applied after {timeout_s} s\n{detail}")
