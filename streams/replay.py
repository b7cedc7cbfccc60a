"""Rebuild state from the topics into a fresh namespace, verify it, switch readers over.

1. **Catch up.** The replay alone writes the new namespace, reading every partition from the
   beginning while live workers keep applying new records to the live namespace.
2. **Hand off.** Close to the end, it asks the workers to pause (``sr:{reg}:handoff``); each
   confirms before its next batch (or at once when idle). Nothing is applied anywhere now.
3. **Finish.** It reads up to the high-water marks taken after every worker paused, so the
   new namespace holds every record published so far, and compares it with the frozen live
   namespace.
4. **Switch.** One Redis transaction points readers at the new namespace and releases the
   workers, which resume into it; records they had fetched but not applied are applied there
   (those the replay already applied are recognised as redeliveries).

Readers resolve the live namespace on every read, so each read sees the old state or the
new one, never a mixture. The pause lasts as long as step 3 (about a second under load).

Reading and applying overlap: a fetcher thread reads the topics ahead (aiokafka, in an event
loop of its own) into a small bounded queue, and ``appliers`` threads apply batches, each with
a ``Processor`` of its own and a fixed set of partitions (every n-th of the sorted list): one
partition's records are applied by one applier, in offset order (the per-user session script
needs a user's events in partition order); different partitions interleave, as they do across
live workers (the item and trending learner state is watermarked per source partition and
does not depend on the order). The calling thread hands each applier its records (at most
``DEPTH`` batches at a time) and counts a partition done up to a target only once its applier
has applied the records below it. Records at or above a partition's target wait in a bounded
buffer until the target passes them.

Applying dominates (about 97 % of a replay), and within it Python and Redis round trips
take turns: with several appliers one's Python work overlaps the others' Redis waits, and
Redis always has a script to run. Replaying 200,000 bench clicks (8 partitions, learners on,
2 cores shared with other work; appliers 1, 2, 4, 8 alternating in one run, 3 rounds) gave
12,131 / 7,174 / 6,617 events/s with one applier, 13,435 / 9,202 / 7,776 with two, 15,473 /
13,424 / 9,646 with four and 15,356 / 16,814 / 11,344 with eight (one per events
partition, the default). At eight the Redis server is close to saturated (in a quieter run
of 100,000 clicks at 20,800 events/s it was busy 4.2 s of the 5.1 s): it is then the limit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import re
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

from kafka import TopicPartition

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.recstore import RecStore
from streamrec.infra.retry import RetryPolicy
from streamrec.infra.settings import KafkaSettings, Settings
from streamrec.infra.state import StateStore
from streamrec.models.errors import ReplayError
from streamrec.streams.processor import Processor, Record, Stats

log = logging.getLogger(__name__)

ProgressFn = Callable[[Stats, int, float], None]  # stats, records behind, seconds elapsed

BATCH = 5_000  # records per fetch and (at most) per processor.process call
QUEUE_BATCHES = 4  # fetched batches the fetcher may read ahead of the appliers
DEPTH = 2  # batches handed to one applier at a time: the one it applies and the next
APPLIERS = 8  # applier threads (``replay(appliers=...)``), at most one per partition; see above
HOLD_LIMIT = 20_000  # records held per partition beyond its target before its fetching pauses


@dataclass
class ReplaySummary:
    namespace: str
    previous: str
    since_ms: int | None
    read: int
    applied: int
    redelivered: int
    rejected: int
    skipped: int
    seconds: float
    users: int
    switched: bool
    verification: dict[str, Any] = field(default_factory=dict)
    pause_s: float = 0.0  # how long live workers were paused for the handoff
    restored: bool = False  # a rebuild of lost state (``--restore``)
    lost: dict[str, Any] | None = None  # with ``restored``: when and how the loss was found
    # Seconds spent in processor.process, summed over the appliers: with n appliers it can
    # reach n times ``seconds`` (apply_s / (n * seconds) is how busy they were).
    apply_s: float = 0.0
    # Seconds the calling thread waited with an applier ready for more records and none to
    # give it: not fetched yet, or beyond the targets (so idle time is included).
    fetch_wait_s: float = 0.0
    fetcher_blocked_s: float = 0.0  # the fetcher waiting for room in its queue (appliers slower)
    appliers: int = 1  # applier threads

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_version(store: StateStore) -> str:
    live = store.registry.live_name() or ""
    names = [name for name, _ in store.registry.namespaces()] + [live]
    numbers = [int(m.group(1)) for name in names if (m := re.fullmatch(r"v(\d+)", name))]
    return f"v{max(numbers, default=0) + 1}"


# One fetched batch: per partition, its records in offset order and the position after them.
Batch = list[tuple[TopicPartition, list[Record], int]]


class _Fetcher:
    """Reads every partition of ``topics`` from the beginning, ahead of the appliers, in a
    thread with an asyncio loop of its own, into a queue of at most ``depth`` batches.

    aiokafka rather than kafka-python: reading 200,000 small records (bench clicks, 8
    partitions, Tansu, 2 shared cores, max 5,000 records a call), aiokafka's ``getmany`` gave
    482,000 to 528,000 records/s and kafka-python's ``poll`` 48,400 to 48,800/s, in the same run.

    A batch carries, per partition, the consumer's position after it: every offset below it
    was delivered (in this batch or an earlier one) or does not exist. ``hold`` pauses the
    fetching of partitions (too many of their records wait beyond their targets)."""

    def __init__(self, kafka: KafkaSettings, topics: list[str], *, batch: int = BATCH,
                 depth: int = QUEUE_BATCHES, wake: threading.Event | None = None) -> None:
        self.kafka, self.topics, self.batch = kafka, topics, batch
        self.wake = wake  # set after each batch queued, and when the thread ends
        self.partitions: list[TopicPartition] = []
        self.positions: dict[TopicPartition, int] = {}  # where reading starts (log start offsets)
        self.blocked_s = 0.0  # waiting for room in the queue
        self._queue: queue.Queue[Batch] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._hold: frozenset[TopicPartition] = frozenset()
        self._thread = threading.Thread(target=self._run, name="replay-fetcher", daemon=True)

    def start(self, timeout_s: float = 60.0) -> list[TopicPartition]:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise ReplayError(f"the replay's reader did not start within {timeout_s:.0f} s")
        if self._error is not None:
            raise self._error
        return self.partitions

    def get(self, timeout_s: float) -> Batch | None:
        """The next batch, or None when none came within ``timeout_s``."""
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            if not self._thread.is_alive():  # it failed (or was stopped): nothing more will come
                raise self._error or ReplayError("the replay's reader stopped") from self._error
            return None

    def hold(self, partitions: Iterable[TopicPartition]) -> None:
        self._hold = frozenset(partitions)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop reading and close the consumer (at the latest one ``getmany`` later)."""
        self._stop.set()
        if self._thread.ident is not None:  # it was started
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the replay's reader did not stop within %.0f s", timeout_s)
        while True:  # let go of what was read ahead
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def _run(self) -> None:
        try:
            asyncio.run(self._read())
        except BaseException as exc:  # handed to the caller by start() or get()
            self._error = exc
        finally:
            self._ready.set()
            if self.wake is not None:
                self.wake.set()

    async def _read(self) -> None:
        consumer = await kafka_wiring.aio_reader(self.kafka, self.topics,
                                                 max_poll_records=self.batch)
        try:
            ours = {TopicPartition(tp.topic, tp.partition): tp for tp in consumer.assignment()}
            self.partitions = sorted(ours, key=lambda tp: (tp.topic, tp.partition))
            self.positions = {tp: await consumer.position(ours[tp]) for tp in self.partitions}
            self._ready.set()
            held: frozenset[TopicPartition] = frozenset()
            while not self._stop.is_set():
                if (wanted := self._hold) != held:
                    if wanted - held:
                        consumer.pause(*(ours[tp] for tp in wanted - held))
                    if held - wanted:
                        consumer.resume(*(ours[tp] for tp in held - wanted))
                    held = wanted
                polled = await consumer.getmany(timeout_ms=100, max_records=self.batch)
                if not polled:
                    continue
                batch: Batch = []
                for atp, rs in polled.items():
                    records = [Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                               for r in rs]
                    position = await consumer.position(atp)
                    batch.append((TopicPartition(atp.topic, atp.partition), records, position))
                waited = time.monotonic()
                while not self._stop.is_set():
                    try:
                        self._queue.put_nowait(batch)
                        if self.wake is not None:
                            self.wake.set()
                        break
                    except queue.Full:
                        await asyncio.sleep(0.002)  # the loop stays live: aiokafka prefetches
                self.blocked_s += time.monotonic() - waited
        finally:
            await consumer.stop()


class _Pending:
    """Fetched records not applied yet, per partition in offset order, and how far each
    partition is done: below ``done_to(tp)`` every record was applied or does not exist (the
    first record being applied, else the first record held, else the fetcher's position).

    ``take`` hands records out; those marked ``started`` count as not done until ``applied``
    (a partition's records are applied by one applier, so its batches finish in order)."""

    def __init__(self, positions: Mapping[TopicPartition, int]) -> None:
        self.held: dict[TopicPartition, deque[Record]] = {tp: deque() for tp in positions}
        self.fetched: dict[TopicPartition, int] = dict(positions)
        # per partition, the first offset of each batch being applied, oldest first
        self.inflight: dict[TopicPartition, deque[int]] = {}

    def add(self, batch: Batch) -> None:
        for tp, records, position in batch:
            self.held.setdefault(tp, deque()).extend(records)
            top = max(position, records[-1].offset + 1) if records else position
            self.fetched[tp] = max(self.fetched.get(tp, 0), top)

    def take(self, targets: Mapping[TopicPartition, int], limit: int,
             only: Collection[TopicPartition] | None = None) -> list[Record]:
        """Up to ``limit`` records below their partition's target, in offset order per
        partition (of the partitions in ``only``, if given)."""
        out: list[Record] = []
        for tp, held in self.held.items():
            if only is not None and tp not in only:
                continue
            target = targets.get(tp, 0)
            while held and held[0].offset < target and len(out) < limit:
                out.append(held.popleft())
        return out

    def started(self, records: Sequence[Record]) -> list[tuple[TopicPartition, int]]:
        """``records`` (taken, in offset order per partition) are being applied: their
        partitions are done only up to the first of them until ``applied`` is called with
        what this returns."""
        firsts: dict[tuple[str, int], int] = {}
        for r in records:
            if (r.topic, r.partition) not in firsts:
                firsts[(r.topic, r.partition)] = r.offset
        marks = [(TopicPartition(topic, p), first) for (topic, p), first in firsts.items()]
        for tp, first in marks:
            self.inflight.setdefault(tp, deque()).append(first)
        return marks

    def applied(self, marks: Sequence[tuple[TopicPartition, int]]) -> None:
        for tp, first in marks:
            flying = self.inflight[tp]
            if not flying or flying[0] != first:  # batches of a partition finish in order
                raise AssertionError(f"{tp}: batch from {first} applied out of order ({list(flying)})")
            flying.popleft()

    def done_to(self, tp: TopicPartition) -> int:
        flying = self.inflight.get(tp)
        if flying:
            return flying[0]
        held = self.held.get(tp)
        return held[0].offset if held else self.fetched.get(tp, 0)

    def behind(self, targets: Mapping[TopicPartition, int]) -> int:
        """Records (offsets) between where each partition is done and its target."""
        return sum(max(0, target - self.done_to(tp)) for tp, target in targets.items())

    def size(self, tp: TopicPartition) -> int:
        return len(self.held.get(tp, ()))


class _Appliers:
    """``n`` threads, each applying the batches handed to it (``hand``) in order, with a
    processor of its own (``make(stop)``: the event stops the processor's retries too),
    for a fixed set of partitions: every n-th of ``partitions`` (sorted), ``partitions[k]``.

    ``collect`` (the calling thread) answers which batches were applied since and raises the
    first failure of any applier; after a failure the others stop at their next batch (or
    retry wait). ``close`` stops and joins them all."""

    def __init__(self, make: Callable[[threading.Event], Processor], partitions: Sequence[TopicPartition],
                 n: int, wake: threading.Event) -> None:
        if n < 1:
            raise ValueError(f"appliers must be at least 1, not {n}")
        self.n, self.wake = n, wake
        self.stop = threading.Event()
        self.processors = [make(self.stop) for _ in range(n)]
        ordered = sorted(partitions, key=lambda tp: (tp.topic, tp.partition))
        self.partitions = [frozenset(ordered[k::n]) for k in range(n)]
        self.outstanding = [0] * n  # batches handed and not applied yet (the calling thread's)
        self.busy_s = [0.0] * n  # in processor.process, each written by its own applier only
        self.snapshots = [Stats() for _ in range(n)]  # each processor's stats after its last batch
        self.error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._inboxes: list[queue.SimpleQueue[tuple[list[Record], Any] | None]] = [
            queue.SimpleQueue() for _ in range(n)]
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"replay-applier-{k}", daemon=True)
                         for k in range(n)]
        for thread in self._threads:
            thread.start()

    def hand(self, k: int, records: list[Record], token: Any) -> None:
        """Applier ``k`` applies ``records`` after what it was handed before; ``collect``
        answers ``token`` once it has."""
        self.outstanding[k] += 1
        self._inboxes[k].put((records, token))

    def collect(self) -> list[Any]:
        """The tokens of the batches applied since the last call; raises an applier's failure."""
        out = []
        while True:
            try:
                k, token = self._done.get_nowait()
            except queue.Empty:
                break
            self.outstanding[k] -= 1
            out.append(token)
        if self.error is not None:
            raise self.error
        return out

    def stats(self) -> Stats:
        """The processors' stats merged (as of their last batch applied)."""
        merged = Stats()
        for snapshot in self.snapshots:
            merged.merge(snapshot)
        return merged

    def close(self, timeout_s: float = 10.0) -> None:
        self.stop.set()
        for inbox in self._inboxes:
            inbox.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("replay applier %s did not stop within %.0f s", thread.name, timeout_s)

    def _run(self, k: int) -> None:
        processor, inbox = self.processors[k], self._inboxes[k]
        while True:
            item = inbox.get()
            if item is None or self.stop.is_set():
                return
            records, token = item
            started = time.monotonic()
            try:
                processor.process(records)
            except BaseException as exc:
                with self._error_lock:
                    if self.error is None:  # the first failure (the others may follow from it)
                        self.error = exc
                self.stop.set()
                self.wake.set()
                return
            self.busy_s[k] += time.monotonic() - started
            snapshot = Stats()
            snapshot.merge(processor.stats)
            self.snapshots[k] = snapshot
            self._done.put((k, token))
            self.wake.set()


def replay(
    settings: Settings,
    *,
    namespace: str | None = None,
    since_ms: int | None = None,
    switch: bool = True,
    allow_mismatch: bool = False,
    restore: bool = False,
    progress: ProgressFn | None = None,
    handoff_lag: int = 5_000,
    pause_timeout_s: float = 30.0,
    appliers: int = APPLIERS,
) -> ReplaySummary:
    """Rebuild into ``namespace`` (default: the next ``vN``) and switch to it when verified.

    ``since_ms`` keeps only events whose event time is at or after it (Tansu's time index
    uses write time, so the filter reads each event's own timestamp). A full rebuild that
    differs from the live state for any user is not switched to unless ``allow_mismatch``.
    ``restore``: the state is lost (no registry: Redis restarted empty or was flushed); the
    rebuild goes up to what the worker group committed, creates a new registry with a new
    epoch and switches to it; the workers, paused since they found the state gone, resume.
    ``handoff_lag``: how many records behind the replay may be when it asks workers to pause.
    ``appliers``: threads applying records, each for a fixed share of the partitions (no
    more than there are partitions).
    """
    if appliers < 1:
        raise ValueError(f"appliers must be at least 1, not {appliers}")
    store = StateStore.from_settings(settings)
    registry = store.registry
    if restore:
        name = namespace or f"r{uuid.uuid4().hex[:8]}"  # never a name stray writes may have used
        previous = None
        lost = registry.lost_marker()
        registry.begin_restore(name, {"since_ms": since_ms, "started_ms": int(time.time() * 1000),
                                      "restore": True})
    else:
        lost = None
        previous = registry.live_name()
        if previous is None:
            raise ReplayError(registry.missing_reason() + "; to rebuild lost state use `streamrec replay --restore`")
        name = namespace or next_version(store)
        registry.begin_rebuild(name, {"since_ms": since_ms, "started_ms": int(time.time() * 1000)})
    k = settings.kafka
    token = uuid.uuid4().hex
    try:
        start = time.monotonic()
        ns = store.keys.ns(name)
        live_ns = store.keys.ns(previous) if previous else None
        if live_ns is not None:
            store.copy_bases(live_ns, ns)  # the same incarnations: the same effective offsets

        def make(stop: threading.Event) -> Processor:
            return Processor(settings, store, namespace=name, since_ms=since_ms, retry=RetryPolicy(stop=stop),
                             lanes=1)  # the appliers are the replay's lanes

        pause_s = 0.0
        fetch_wait = 0.0
        wake = threading.Event()  # set by the fetcher (a batch queued) and the appliers (one applied)
        fetcher = _Fetcher(k, [k.events_topic, k.items_topic], wake=wake)
        pool: _Appliers | None = None
        try:
            partitions = fetcher.start()
            pending = _Pending(fetcher.positions)
            appliers = min(appliers, max(1, len(partitions)))  # one with no partitions has nothing to do
            pool = _Appliers(make, partitions, appliers, wake)
            report = _Reporter(pool.stats, progress, start)
            holding: set[TopicPartition] = set()
            # The replay applies exactly the records below the live namespace's progress
            # (next offset to apply, per partition), so that once workers pause both
            # namespaces hold the same records and compare equal. Records the workers have
            # not applied yet are theirs: after the switch they apply them to the new one.
            # Those fetched already wait in ``pending`` until the targets pass them.

            def feed(pool: _Appliers, targets: Mapping[TopicPartition, int]) -> bool:
                """Hand every applier with room what it may apply (up to BATCH records a
                batch), reading fetched batches as long as one lacks records that are not in
                ``pending`` yet. Whether anything was handed or read."""
                moved = False
                for n, mine in enumerate(pool.partitions):
                    while pool.outstanding[n] < DEPTH:
                        records = pending.take(targets, BATCH, mine)
                        while len(records) < BATCH and any(pending.fetched.get(tp, 0) < targets.get(tp, 0)
                                                           for tp in mine):
                            batch = fetcher.get(0)
                            if batch is None:
                                break
                            pending.add(batch)
                            moved = True
                            records += pending.take(targets, BATCH - len(records), mine)
                        if not records:
                            break
                        pool.hand(n, records, pending.started(records))
                        moved = True
                return moved

            def step(targets: dict[TopicPartition, int]) -> int:
                """Apply toward ``targets`` until a batch was applied, everything below them
                was, or 0.1 s went by (then the caller looks at the targets again); how many
                records are still behind them."""
                nonlocal fetch_wait
                assert pool is not None
                deadline = time.monotonic() + 0.1
                ours = {tp: targets.get(tp, 0) for tp in partitions}
                while True:
                    wake.clear()  # before looking: a wake-up after it is not lost
                    applied = pool.collect()  # raises an applier's failure
                    for marks in applied:
                        pending.applied(marks)
                    moved = feed(pool, ours)
                    # Memory stays flat: a partition far ahead of its target stops being
                    # fetched until its target comes closer.
                    for tp in partitions:
                        n = pending.size(tp)
                        if n >= HOLD_LIMIT:
                            holding.add(tp)
                        elif n < HOLD_LIMIT // 2:
                            holding.discard(tp)
                    fetcher.hold(holding)
                    behind = pending.behind(ours)
                    now = time.monotonic()
                    if behind == 0 or applied or now >= deadline:
                        break
                    if not moved:
                        wants = any(o < DEPTH for o in pool.outstanding)
                        wake.wait(deadline - now)
                        if wants:
                            fetch_wait += time.monotonic() - now
                report(behind)
                return behind

            # Offsets the worker group committed count as applied too: after Redis lost the
            # live state, they are what the workers will not read again.
            committed = kafka_wiring.committed_offsets(k, [k.events_topic, k.items_topic])

            def live_progress() -> dict[TopicPartition, int]:
                """Per partition, the Kafka offset up to which the workers applied."""
                done: dict[str, int] = {}
                if live_ns is not None:
                    got = store.offsets(live_ns)
                    done = {tp: n - got.base.get(tp, 0) for tp, n in got.progress.items()}
                return {
                    tp: max(done.get(key, 0), committed.get(key, 0))
                    for tp in partitions if (key := f"{tp.topic}:{tp.partition}")
                }

            # 1. catch up with the live workers while they carry on
            while step(live_progress()) > handoff_lag:
                if restore:
                    registry.keep_restoring(name)
            # 2. hand off: every live worker pauses before its next batch
            paused_at = time.monotonic()
            registry.begin_handoff(token, ttl_s=pause_timeout_s * 4)
            _wait_for_workers(store, token, pause_timeout_s, settings.worker.heartbeat_s)
            if restore:
                # Paused workers acknowledge nothing more; what they acknowledged before is
                # committed within a commit interval: read the committed offsets after that.
                time.sleep(2 * settings.worker.commit_interval_s + 0.5)
            # 3. finish: exactly what the paused workers applied to the live namespace
            committed = kafka_wiring.committed_offsets(k, [k.events_topic, k.items_topic])
            final = live_progress()
            while step(final) > 0:
                pass
        finally:
            if pool is not None:
                pool.close()
            fetcher.stop()
        seconds = time.monotonic() - start
        assert pool is not None
        stats = pool.stats()  # every batch was applied (nothing was behind): the final counts
        verification = verify(store, name, previous, stats, compare=since_ms is None)
        if verification.get("mismatched_users") and not allow_mismatch:
            raise ReplayError(
                f"rebuild {name} differs from live {previous} for {verification['mismatched_users']} of "
                f"{verification['compared_users']} users; not switching (--allow-mismatch switches anyway)"
            )
        if not verification["accounted"]:
            raise ReplayError(f"rebuild {name} lost records: {verification}")
        registry.set_info(name, stats=stats.as_dict(), seconds=round(seconds, 3), verification=verification)
        if switch or restore:
            registry.switch(name)  # also releases the workers, into the new namespace
        else:
            registry.abort_rebuild(name)  # releases the workers, into the old one
            registry.set_info(name, status="built")
        pause_s = time.monotonic() - paused_at
        if restore:
            # The served lists went with the state: every restored user is marked dirty, so
            # serving recomputes their lists without waiting for their next click.
            _mark_all_dirty(store, settings, name)
        return ReplaySummary(
            namespace=name, previous=previous or "", since_ms=since_ms, read=stats.read,
            applied=stats.applied, redelivered=stats.redelivered, rejected=stats.rejected,
            skipped=stats.skipped, seconds=round(seconds, 3), users=verification["users"],
            switched=switch or restore, verification=verification, pause_s=round(pause_s, 3),
            restored=restore, lost=lost, apply_s=round(sum(pool.busy_s), 3),
            fetch_wait_s=round(fetch_wait, 3), fetcher_blocked_s=round(fetcher.blocked_s, 3),
            appliers=appliers,
        )
    except BaseException:
        registry.abort_rebuild(name)
        raise


def _mark_all_dirty(store: StateStore, settings: Settings, namespace: str) -> None:
    recstore = RecStore(store, settings.kafka.partitions)
    users = store.users(namespace)
    for lo in range(0, len(users), 1000):
        # version -1: no list survived the loss, and the user's next click outranks it
        recstore.mark_dirty({u: (zlib.crc32(u.encode()), -1, 0, 0) for u in users[lo : lo + 1000]})


class _Reporter:
    """Calls ``progress`` with the merged stats of the appliers' processors (``stats()``) at
    most once a second, and whenever nothing is behind."""

    def __init__(self, stats: Callable[[], Stats], progress: ProgressFn | None, start: float) -> None:
        self.stats, self.progress, self.start, self.last = stats, progress, start, 0.0

    def __call__(self, behind: int | None) -> None:
        now = time.monotonic()
        if self.progress and (now - self.last > 1.0 or behind == 0):
            self.progress(self.stats(), behind if behind is not None else -1, now - self.start)
            self.last = now


def _wait_for_workers(store: StateStore, token: str, timeout_s: float, heartbeat_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [w["worker"] for w in store.registry.workers() if w.get("role", "stream") == "stream"]  # serving workers never write state
        waiting = set(alive) - store.registry.paused_for(alive, token)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ReplayError(f"workers {sorted(waiting)} did not pause within {timeout_s:.0f} s")
        time.sleep(min(0.05, heartbeat_s))


def verify(store: StateStore, name: str, live: str | None, stats: Stats, *, compare: bool,
           sample: int = 20_000) -> dict[str, Any]:
    """Accounting (every record read is applied, redelivered, rejected or skipped) and, for a
    full rebuild, a comparison with the live namespace over its users (all of them when there
    are at most ``sample``, else a fixed pseudo-random sample): a live user whose rebuilt state
    differs, or who is missing from the rebuild, is a mismatch. Users only the rebuild has are
    counted apart (``only_rebuilt``): their live keys expired (``session.ttl_s``) or were lost,
    and the rebuild brings them back from the topics."""
    accounted = stats.read == stats.applied + stats.redelivered + stats.rejected + stats.skipped
    new_users = store.users(name)
    out: dict[str, Any] = {"accounted": accounted, "users": len(new_users)}
    if compare and live is not None and live != name:
        old_users = store.users(live)
        chosen = old_users if len(old_users) <= sample else random.Random(0).sample(old_users, sample)
        old, new = store.snapshot(live, chosen), store.snapshot(name, chosen)
        out["live_users"] = len(old_users)
        out["compared_users"] = len(chosen)
        out["mismatched_users"] = sum(1 for u in chosen if old.get(u) != new.get(u))
        out["only_rebuilt"] = len(set(new_users) - set(old_users))
    return out
