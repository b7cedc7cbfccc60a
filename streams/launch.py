"""Start `streamrec worker` child processes (demo, benchmarks, tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from streamrec.infra.keys import Namespace
from streamrec.infra.settings import Settings, env_for
from streamrec.infra.state import StateStore


class WorkerProcess:
    """A worker child process configured by ``settings`` (passed through the environment)."""

    def __init__(self, settings: Settings, worker_id: str, log_path: Path, command: str = "worker") -> None:
        env = {**os.environ, **env_for(settings), "PYTHONUNBUFFERED": "1"}
        self.worker_id = worker_id
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamrec", command, "--id", worker_id],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to commit offsets or flush anything."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]


def applied(store: StateStore, namespace: str | None = None) -> int:
    """Records applied so far in a namespace (offsets are contiguous from 0 per partition)."""
    if namespace is None and store.registry.live_name() is None:
        return 0  # no worker has created the registry yet
    ns = store.keys.ns(namespace) if namespace else store.live()
    return sum(store.progress(ns).values())


def wait_live(store: StateStore, timeout_s: float = 60.0, workers: list[WorkerProcess] | None = None) -> Namespace:
    """The live namespace, once a starting worker has created the registry."""
    deadline = time.monotonic() + timeout_s
    while (name := store.registry.live_name()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no registry after {timeout_s:.0f} s")
        for w in workers or []:
            if not w.alive():
                raise RuntimeError(f"worker {w.worker_id} exited with {w.proc.returncode}:\n{w.output()}")
        time.sleep(0.05)
    return store.keys.ns(name)


def wait_applied(store: StateStore, total: int, *, namespace: str | None = None,
                 timeout_s: float = 90.0, workers: list[WorkerProcess] | None = None,
                 poll_s: float = 0.05) -> float:
    """Block until ``total`` records are applied; returns the monotonic time it happened."""
    deadline = time.monotonic() + timeout_s
    done = 0
    while time.monotonic() < deadline:
        done = applied(store, namespace)
        if done >= total:
            return time.monotonic()
        for w in workers or []:
            if not w.alive():
                raise RuntimeError(f"worker {w.worker_id} exited with {w.proc.returncode}:\n{w.output()}")
        time.sleep(poll_s)
    detail = "\n".join(w.output() for w in workers or [])
    raise TimeoutError(f"only {done}/{total} records applied after {timeout_s:.0f} s\n{detail}")
