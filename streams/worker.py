"""The stream worker: a Faust app whose agent applies batches of events to Redis.

Delivery is at-least-once: Faust acknowledges a batch only after it was applied and its
rejections were delivered to the dead-letter topic, and offsets are committed after that.
Redelivered records are no-ops in Redis (see ``infra/lua/apply_user_events.lua``), so a worker
killed at any point and restarted ends in the state of one clean pass.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT
from mode.services import WaitResults

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra import metrics
from streamrec.infra.retry import RetryPolicy, is_transient
from streamrec.infra.settings import Settings, env_for
from streamrec.infra.state import StateStore
from streamrec.models.errors import StateLost, Stopped
from streamrec.streams.processor import Processor, Record, Rejection

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2  # batches taken from the stream but not yet applied and acknowledged


def _broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(","))


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust hard-codes a 1.5 s fetch wait; brokers that hold an empty fetch for the full wait
    (Tansu does) then add up to that much latency. A short wait keeps event-to-state latency
    in milliseconds at the cost of more (cheap, local) fetch requests when idle."""

    fetch_max_wait_ms = 10

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # read by aiokafka at start()
        return consumer


class _Started:
    """An awaitable that carries on a coroutine already run up to its first suspension
    (``pending``, what it yielded there): awaiting it is awaiting the rest of the coroutine."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Any, pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def __await__(self) -> Any:
        coro, value = self.coro, self.pending
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown in (cancellation): passed on
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class _Consumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with a cheaper path from fetch to stream
    (``worker.consumer_fast_path``; measured with ``worker.apply`` off, docs/benchmarks.md):

    * Faust's fetch loop hands each message to its stream through
      ``wait_first(callback(message), suspend_flow.wait())``: four tasks and an
      ``asyncio.wait`` per message, about half of the no-op worker's CPU time per message.
      Here the callback runs eagerly (``wait_first``): one that completes without suspending
      (the stream buffer had room) costs a call; one that suspends (the buffer is full) goes on
      under Faust's own path, so a flow suspension (rebalance) or a stop still interrupts it.
    * While the stream buffer is under pressure Faust holds its partitions back and then
      waits up to 1 s for records of the others (sleeps 1 s when it held back all of them),
      although the buffer drains in milliseconds: the worker sat idle part of every second.
      Here it waits at most ``held_back_wait_s`` while a partition is held back, and, when
      all are, until the buffer has drained.

    Neither changes which messages reach the stream, their order, or their acknowledgement."""

    held_back_wait_s = 0.01
    _drained: asyncio.Event | None = None

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def _fast(self) -> bool:
        return bool(getattr(self.app, "consumer_fast_path", False))

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        first = coros[0] if coros else None
        if (not self._fast or not asyncio.iscoroutine(first) or self._stopped.is_set()
                or self._crashed.is_set()):
            return await super().wait_first(*coros, timeout=timeout)
        try:
            pending = first.send(None)
        except BaseException as exc:
            for other in coros[1:]:
                if asyncio.iscoroutine(other):
                    other.close()  # never started
            if isinstance(exc, StopIteration):
                return WaitResults([first], [exc.value], False)
            raise
        return await super().wait_first(_Started(first, pending), *coros[1:], timeout=timeout)

    def on_buffer_drop(self, tp: Any) -> None:
        super().on_buffer_drop(tp)
        if self._drained is not None:
            self._drained.set()

    async def _wait_next_records(self, timeout: float) -> Any:
        if self._fast and self._buffered_partitions and not self.app.client_only:
            if not self._get_active_partitions():  # Faust would sleep 1 s
                if self._drained is None:
                    self._drained = asyncio.Event()
                self._drained.clear()
                await self.wait_for_stopped(self._drained, timeout=timeout)
            timeout = min(timeout, self.held_back_wait_s)
        return await super()._wait_next_records(timeout)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class _App(faust.App):
    consumer_fast_path = True  # read by _Consumer (worker.consumer_fast_path)

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)


class StreamWorker:
    """Builds the Faust app for one worker process. ``run()`` blocks until stopped."""

    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store = StateStore.from_settings(settings)
        self.retry = RetryPolicy()
        self.processor = Processor(settings, self.store, worker_id=self.worker_id,
                                   learn=settings.learners.enabled, retry=self.retry, on_lost=self._on_lost)
        self.started = time.time()
        self.dead_letters = 0
        self.truncated = 0
        self.last_lag = 0
        self._restore: subprocess.Popen[bytes] | None = None
        self._restore_started = 0.0
        self.app = self._build_app()

    # -- state loss -----------------------------------------------------------------------------

    def _on_lost(self, reason: str) -> None:
        """While the state is gone: start the restore (``worker.restore_on_loss``), at most once
        a minute and only when no restore is running (whichever worker gets there first)."""
        if not self.settings.worker.restore_on_loss:
            return
        if self._restore is not None and self._restore.poll() is None:
            return
        if time.monotonic() - self._restore_started < 60.0:
            return
        if self.store.client.exists(self.store.keys.restoring()):
            return
        self._restore_started = time.monotonic()
        log_path = Path(tempfile.gettempdir()) / f"streamrec-restore-{self.worker_id}.log"
        log.warning("worker %s: starting `streamrec replay --restore` (log: %s)", self.worker_id, log_path)
        with open(log_path, "ab") as out:
            self._restore = subprocess.Popen(
                [sys.executable, "-m", "streamrec", "replay", "--restore"],
                env={**os.environ, **env_for(self.settings)}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    # -- dead letters ---------------------------------------------------------------------------

    def dead_letter(self, rejection: Rejection, limit: int) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The dead letter of a rejection, its value cut to ``limit`` bytes if longer: headers
        then say so, with the original size and the sha256 of the original bytes."""
        value = rejection.record.value or b""
        headers = rejection.headers()
        if len(value) > limit:
            headers += [("streamrec.dlq.truncated", b"1"),
                        ("streamrec.dlq.original_bytes", str(len(value)).encode()),
                        ("streamrec.dlq.sha256", hashlib.sha256(value).hexdigest().encode())]
            value = value[:limit]
        return value, headers

    def _build_app(self) -> faust.App:
        s = self.settings
        k = s.kafka
        w = s.worker
        app = _App(
            k.group_id,
            broker=_broker_url(k.bootstrap),
            broker_session_timeout=k.session_timeout_s,
            broker_heartbeat_interval=k.heartbeat_s,
            broker_max_poll_records=max(w.batch_size, 500),
            broker_commit_interval=w.commit_interval_s,
            consumer_auto_offset_reset="earliest",
            processing_guarantee="at_least_once",
            topic_partitions=k.partitions,
            topic_replication_factor=k.replication,
            topic_disable_leader=True,
            stream_recovery_delay=0.0,
            stream_wait_empty=False,
            stream_buffer_maxsize=w.stream_buffer_maxsize,
            producer_acks=-1,
            # dead letters are cut to dlq_max_bytes; headers and framing fit in the rest
            producer_max_request_size=w.dlq_max_bytes + 65_536,
            store="memory://",
            datadir=tempfile.mkdtemp(prefix="streamrec-faust-"),
            web_enabled=w.web_port > 0,
            web_port=w.web_port or 6066,
            web_in_thread=False,
            **kafka_wiring.faust_options(k),  # broker_credentials: SASL / TLS, none for PLAINTEXT
        )
        app.consumer_fast_path = w.consumer_fast_path
        events = app.topic(k.events_topic, k.items_topic, key_serializer="raw", value_serializer="raw")
        dlq = app.topic(k.dlq_topic, key_serializer="raw", value_serializer="raw")
        processor = self.processor
        store = self.store
        trace = w.trace_latency
        window = w.batch_window_ms / 1000.0
        apply_batches = w.apply

        # One thread applies batches in arrival order while the event loop buffers the next
        # batch. Batches are acknowledged strictly in order: Faust's commit cannot be trusted
        # to skip a hole left by an earlier batch that is still delivering dead letters.
        applier = ThreadPoolExecutor(1, thread_name_prefix="streamrec-apply")
        in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        state: dict[str, Any] = {"previous": None, "failed": False}

        async def deliver(r: Rejection) -> None:
            """One dead letter; one the broker refuses for its size is cut shorter until it fits."""
            limit = w.dlq_max_bytes
            while True:
                value, headers = self.dead_letter(r, limit)

                async def attempt() -> Any:  # sent again, whole, after a failure
                    return await (await dlq.send(key=r.record.key, value=value, headers=headers))

                try:
                    await self.retry.acall(attempt, "dead-lettering")
                except Exception as exc:
                    if not is_too_large(exc) or limit <= 1024:
                        raise
                    limit //= 2
                    continue
                self.dead_letters += 1
                metrics.DEAD_LETTERS.labels(r.code).inc()
                self.truncated += int(len(value) < len(r.record.value or b""))
                return

        def record_progress_only(records: list[Record]) -> None:
            """``worker.apply`` off: nothing is applied; only the progress ``applied(store)``
            counts, the next offset per partition (the registry exists: ``_start_registry``)."""
            positions: dict[str, int] = {}
            for r in records:
                tp = f"{r.topic}:{r.partition}"
                positions[tp] = max(positions.get(tp, -1), r.offset + 1)
            self.retry.call(lambda: store.record_progress(store.live(), positions), "recording progress")

        async def finish(stream: faust.StreamT[Any], events: list[Any], records: list[Record],
                         highwaters: dict[str, int], previous: asyncio.Future[bool] | None,
                         done: asyncio.Future[bool]) -> None:
            loop = asyncio.get_running_loop()
            ok = False
            try:
                if not apply_batches:  # worker.apply off: progress only (the framework's ceiling)
                    await loop.run_in_executor(applier, record_progress_only, records)
                else:
                    t0 = time.perf_counter()
                    result = await loop.run_in_executor(applier, processor.process, records, highwaters)
                    metrics.BATCH_APPLY.observe(time.perf_counter() - t0)
                    if result.rejections:
                        # Dead letters are delivered before the batch is acknowledged, and then
                        # remembered, so a redelivered batch does not dead-letter them again.
                        await asyncio.gather(*(deliver(r) for r in result.rejections))
                        for r in result.rejections:
                            log.warning(
                                "dead-lettered %s[%d]@%d: %s: %s", r.record.topic, r.record.partition,
                                r.record.offset, r.code, r.reason[:300],
                            )
                    await loop.run_in_executor(applier, processor.settle, result, records, highwaters)
                    if trace and result.latencies_ms:
                        await loop.run_in_executor(applier, lambda: self.retry.call(
                            lambda: store.push_latencies(result.latencies_ms), "recording latencies"))
                if previous is None or await previous:
                    for event in events:
                        await stream.ack(event)
                    ok = True
            except Stopped:
                pass  # stopping: nothing acknowledged, redelivered after the restart
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Unacknowledged records are redelivered after a restart; carrying on past
                # them would leave a hole, so the worker stops instead (and exits for sure).
                log.exception("applying a batch failed; stopping the worker")
                state["failed"] = True
                exit_soon(70, self.settings.worker.stop_timeout_s)
                await app.crash(exc)
            finally:
                done.set_result(ok and not state["failed"])
                in_flight.release()
                if pending["records"] and not state["failed"] and not in_flight.locked():
                    await in_flight.acquire()  # free: does not wait
                    launch(stream)

        # Batches taken while both in-flight slots are busy are merged (up to batch_size) and
        # go together once a slot frees: Faust's take returns what passed its per-message path
        # within the window (about 100 records at full speed), and a batch's fixed costs (its
        # Redis round trips) are then paid per batch_size records under a backlog instead of
        # per hundred. With a slot free a batch goes at once, so latency does not wait for it.
        pending: dict[str, Any] = {"events": [], "records": [], "highwaters": {}}

        def launch(stream: faust.StreamT[Any]) -> None:
            """Start applying what is pending (the caller holds an in-flight slot)."""
            if not pending["records"]:  # launched by another path meanwhile
                in_flight.release()
                return
            batch = dict(pending)
            pending.update(events=[], records=[], highwaters={})
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            asyncio.ensure_future(finish(stream, batch["events"], batch["records"], batch["highwaters"],
                                         state["previous"], done))
            state["previous"] = done

        @app.agent(events, name="apply")
        async def apply(stream: faust.StreamT[Any]) -> None:
            async for batch in stream.noack_take(w.batch_size, within=window):
                if state["failed"]:
                    continue  # never acknowledge anything after a failed batch
                events = list(batch)
                records = [
                    Record(
                        e.message.topic, e.message.partition, e.message.offset, e.message.key,
                        e.message.value, int((e.message.timestamp or 0) * 1000),
                    )
                    for e in events
                ]
                # fetch high-water marks (right on Tansu, unlike its end offsets): a partition
                # whose mark fell below what was applied from it restarted from offset 0
                highwaters = {}
                for tp in {e.message.tp for e in events}:
                    try:
                        highwaters[f"{tp.topic}:{tp.partition}"] = int(app.consumer.highwater(tp))
                    except Exception:  # noqa: BLE001 - not known yet (no fetch response): no check
                        pass
                if pending["records"] and len(pending["records"]) + len(records) > w.batch_size:
                    await in_flight.acquire()
                    launch(stream)
                pending["events"] += events
                pending["records"] += records
                pending["highwaters"].update(highwaters)
                if not in_flight.locked():
                    await in_flight.acquire()  # a slot is free: does not wait
                    launch(stream)

        @app.timer(w.heartbeat_s)
        async def heartbeat() -> None:
            marks = {}  # fetch high-water marks of the partitions this worker holds
            for tp in app.consumer.assignment():
                try:
                    marks[(tp.topic, tp.partition)] = int(app.consumer.highwater(tp))
                except Exception:  # noqa: BLE001 - no fetch response yet: unknown
                    pass
            await asyncio.get_running_loop().run_in_executor(None, self.write_status, marks)

        return app

    def status(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "role": "stream",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "state": "lost" if self.processor.lost else "ok",
            "lost": self.processor.lost,
            "dead_letters": self.dead_letters,
            "dead_letters_truncated": self.truncated,
            "redis_waits": self.retry.waits,
            "event_loop": type(self.app.loop).__module__.split(".")[0],  # uvloop or asyncio
            "apply": self.settings.worker.apply,  # False: batches taken and acknowledged, not applied
            "lag": self.last_lag,  # records behind the fetch high-water marks, held partitions
            **self.processor.stats.as_dict(),
        }

    def lag(self, marks: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Records not applied yet per held partition: its fetch high-water mark minus the next
        offset to apply (the live namespace's progress, whoever applied it, less the
        partition's incarnation base)."""
        if not marks:
            return {}
        offsets = self.store.offsets(self.store.live())
        out = {}
        for (topic, partition), mark in marks.items():
            tp = f"{topic}:{partition}"
            done = offsets.progress.get(tp, 0) - offsets.base.get(tp, 0)
            out[(topic, partition)] = max(mark - max(done, 0), 0)
        return out

    def write_status(self, marks: dict[tuple[str, int], int] | None = None) -> None:
        """The heartbeat: skipped (not fatal) while Redis is down. An idle worker notices a
        lost state here (and starts the restore), not only when the next event arrives; while
        the state is lost the lag is unknown and the last one stays reported."""
        try:
            self.processor.confirm_if_idle()
            if not self.processor.lost:
                lags = self.lag(marks or {})
                metrics.set_lag(lags)
                self.last_lag = sum(lags.values())
            self.store.registry.write_worker_status(self.worker_id, self.status(),
                                                    ttl_s=self.settings.worker.heartbeat_s * 5)
        except StateLost:  # gone between the check and the lag: reported by the next heartbeat
            pass
        except Exception as exc:  # noqa: BLE001 - the heartbeat must never stop the worker
            if not is_transient(exc):
                log.exception("heartbeat failed")

    def _start_registry(self) -> None:
        """On a deployment where nothing was applied yet, create the registry. Where the
        group has committed offsets but Redis has no registry, the state was lost while no
        worker ran: report it (the processor then waits for the restore) instead of silently
        starting over from empty state."""
        registry = self.store.registry
        if registry.live_name() is not None:
            self.processor.epoch = registry.epoch()
            return
        k = self.settings.kafka
        committed = kafka_wiring.committed_offsets(k, [k.events_topic, k.items_topic])
        if any(offset > 0 for offset in committed.values()):
            reason = (f"no registry in Redis, but the worker group has committed offsets "
                      f"({sum(committed.values()):,} records)")
            log.error("worker %s: STATE LOST: %s", self.worker_id, reason)
            registry.mark_lost(self.worker_id, reason)
            return
        self.processor.epoch = registry.ensure()

    def run(self, loglevel: str = "WARNING") -> int:
        retry = self.retry
        retry.call(lambda: kafka_wiring.ensure_topics(self.settings.kafka), "creating topics")
        retry.call(self._start_registry, "starting")
        worker = _Worker(self.app, loglevel=loglevel, quiet=True, override_logging=False)
        if not sys.stdout.isatty():  # Faust's start-up spinner writes terminal escapes into log files
            worker.spinner = None
        server = metrics.MetricsServer(self.settings.metrics, metrics.redis_poller(
            self.processor.recstore, metrics.used_memory)).start()
        # The latency tail: a full garbage collection of the start-up heap (modules, the app;
        # about 100,000 objects) takes 22 to 28 ms here and stops the event loop and the apply
        # thread alike. Frozen, those objects are never scanned again; collections then cover
        # only what the stream allocates.
        gc.freeze()
        worker.on_stop_signal = lambda: (retry.stop.set(), exit_soon(143, self.settings.worker.stop_timeout_s))
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            server.stop()
            log.info("worker %s stopped: %s", self.worker_id, json.dumps(self.processor.stats.as_dict()))
        return 0


class _Worker(faust.Worker):
    """Faust's worker, told when SIGTERM or SIGINT arrives: waits for Redis or Kafka end at
    once (``RetryPolicy.stop``), and a watchdog ends the process if shutting down takes longer
    than ``worker.stop_timeout_s``."""

    on_stop_signal: Callable[[], Any] = staticmethod(lambda: None)

    def _on_sigterm(self) -> None:
        self.on_stop_signal()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self.on_stop_signal()
        super()._on_sigint()


def use_event_loop(name: str) -> None:
    """Make ``name`` (``worker.event_loop``) the event loop of this process: call it first
    thing in a process that will run a worker, before any loop exists (``streamrec worker``
    does). uvloop through mode, the library Faust's services run on (``mode.loop.use``)."""
    if name == "uvloop":
        import mode.loop  # noqa: PLC0415

        mode.loop.use("uvloop")


def exit_soon(code: int, after_s: float) -> None:
    """End the process with ``code`` after ``after_s`` unless it ended by itself: a worker
    must stop in every state (a thread stuck on a dead service, a Faust shutdown that hangs)."""
    def watchdog() -> None:
        time.sleep(after_s)
        logging.getLogger(__name__).error("still running %.0f s after the stop; exiting", after_s)
        os._exit(code)

    threading.Thread(target=watchdog, name="streamrec-exit-watchdog", daemon=True).start()


def is_too_large(exc: BaseException) -> bool:
    """A producer or broker refusing a record for its size (aiokafka or the broker's answer)."""
    name = type(exc).__name__
    return name in ("MessageSizeTooLargeError", "RecordTooLargeError") or "too large" in str(exc).lower()
