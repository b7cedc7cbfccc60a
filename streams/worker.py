"""The stream worker: a Faust app whose agent applies batches of events to Redis.

Delivery is at-least-once: Faust acknowledges a batch only after it was applied and its
rejections were delivered to the dead-letter topic, and offsets are committed after that.
Redelivered records are no-ops in Redis (see ``infra/lua/apply_user_events.lua``), so a worker
killed at any point and restarted ends in the state of one clean pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.streams.processor import Processor, Record

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


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class _App(faust.App):
    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)


class StreamWorker:
    """Builds the Faust app for one worker process. ``run()`` blocks until stopped."""

    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store = StateStore.from_settings(settings)
        self.processor = Processor(settings, self.store, worker_id=self.worker_id,
                                   learn=settings.learners.enabled)
        self.started = time.time()
        self.app = self._build_app()

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
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            processing_guarantee="at_least_once",
            topic_partitions=k.partitions,
            topic_replication_factor=k.replication,
            topic_disable_leader=True,
            stream_recovery_delay=0.0,
            stream_wait_empty=False,
            producer_acks=-1,
            store="memory://",
            datadir=tempfile.mkdtemp(prefix="streamrec-faust-"),
            web_enabled=w.web_port > 0,
            web_port=w.web_port or 6066,
            web_in_thread=False,
        )
        events = app.topic(k.events_topic, k.items_topic, key_serializer="raw", value_serializer="raw")
        dlq = app.topic(k.dlq_topic, key_serializer="raw", value_serializer="raw")
        processor = self.processor
        store = self.store
        trace = w.trace_latency
        window = w.batch_window_ms / 1000.0

        # One thread applies batches in arrival order while the event loop buffers the next
        # batch. Batches are acknowledged strictly in order: Faust's commit cannot be trusted
        # to skip a hole left by an earlier batch that is still delivering dead letters.
        applier = ThreadPoolExecutor(1, thread_name_prefix="streamrec-apply")
        in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        state: dict[str, Any] = {"previous": None, "failed": False}

        async def finish(stream: faust.StreamT[Any], events: list[Any], records: list[Record],
                         previous: asyncio.Future[bool] | None, done: asyncio.Future[bool]) -> None:
            loop = asyncio.get_running_loop()
            ok = False
            try:
                result = await loop.run_in_executor(applier, processor.process, records)
                if result.rejections:
                    pending = [
                        await dlq.send(key=r.record.key, value=r.record.value or b"", headers=r.headers())
                        for r in result.rejections
                    ]
                    # Dead letters are delivered before the batch is acknowledged.
                    await asyncio.gather(*pending)
                    for r in result.rejections:
                        log.warning(
                            "dead-lettered %s[%d]@%d: %s: %s", r.record.topic, r.record.partition,
                            r.record.offset, r.code, r.reason,
                        )
                if trace and result.latencies_ms:
                    await loop.run_in_executor(applier, store.push_latencies, result.latencies_ms)
                if previous is None or await previous:
                    for event in events:
                        await stream.ack(event)
                    ok = True
            except Exception as exc:
                # Unacknowledged records are redelivered after a restart; carrying on past
                # them would leave a hole, so the worker stops instead.
                log.exception("applying a batch failed; stopping the worker")
                state["failed"] = True
                await app.crash(exc)
            finally:
                done.set_result(ok and not state["failed"])
                in_flight.release()

        @app.agent(events, name="apply")
        async def apply(stream: faust.StreamT[Any]) -> None:
            loop = asyncio.get_running_loop()
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
                await in_flight.acquire()
                done: asyncio.Future[bool] = loop.create_future()
                asyncio.ensure_future(finish(stream, events, records, state["previous"], done))
                state["previous"] = done

        @app.timer(w.heartbeat_s)
        async def heartbeat() -> None:
            await asyncio.get_running_loop().run_in_executor(None, self.write_status)

        return app

    def status(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            **self.processor.stats.as_dict(),
        }

    def write_status(self) -> None:
        self.store.registry.write_worker_status(self.worker_id, self.status(), ttl_s=self.settings.worker.heartbeat_s * 5)
        self.processor.confirm_if_idle()

    def run(self, loglevel: str = "WARNING") -> int:
        kafka_wiring.ensure_topics(self.settings.kafka)
        self.store.registry.live_name()  # create the registry on first start
        worker = faust.Worker(self.app, loglevel=loglevel, quiet=True, override_logging=False)
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            log.info("worker %s stopped: %s", self.worker_id, json.dumps(self.processor.stats.as_dict()))
        return 0
