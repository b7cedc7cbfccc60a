"""Turn a batch of Kafka records into state updates and rejections.

The same ``Processor`` runs inside the Faust worker and inside replay, so live processing and
rebuilds apply exactly the same rules. It is synchronous (the worker calls it in a thread):
one Redis round trip applies a whole batch of user events through one script call.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

from streamrec.infra import metrics
from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.registry import RegistryView
from streamrec.infra.retry import RetryPolicy
from streamrec.infra.settings import Settings
from streamrec.infra.state import Offsets, StateStore
from streamrec.models.errors import InvalidEvent
from streamrec.models.events import Click, Event, Impression, Item, decode
from streamrec.models.learners import BetaBandit, ItemCF, Learners, Trending, Update
from streamrec.models.session import Status, UserEventRow

log = logging.getLogger(__name__)


class Record(NamedTuple):
    """A Kafka record, independent of the client library that fetched it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int  # the record timestamp (producer create time)


class Rejection(NamedTuple):
    record: Record
    code: str
    reason: str

    def headers(self) -> list[tuple[str, bytes]]:
        """Dead-letter headers (the record value travels unchanged)."""
        r = self.record
        return [
            ("streamrec.error.code", self.code.encode()),
            ("streamrec.error.reason", self.reason.encode()[:2000]),
            ("streamrec.source.topic", r.topic.encode()),
            ("streamrec.source.partition", str(r.partition).encode()),
            ("streamrec.source.offset", str(r.offset).encode()),
            ("streamrec.source.timestamp", str(r.timestamp_ms).encode()),
        ]


@dataclass
class Stats:
    """Counters of one processor (monotonic; reset only with the process)."""

    read: int = 0
    applied: int = 0
    redelivered: int = 0
    rejected: int = 0
    skipped: int = 0  # before the replay's event-time floor
    facts_missing: int = 0  # redelivered long after it was applied: learner updates not re-sent
    items: int = 0
    batches: int = 0
    dead_letters_repeated: int = 0  # rejections of redelivered records already dead-lettered
    incarnations: int = 0  # partitions found restarted from offset 0 (topic recreated, broker lost it)
    coalesced: int = 0  # clicks whose list refresh was merged into another one's (refreshes saved)
    by_code: dict[str, int] = field(default_factory=dict)

    def merge(self, other: "Stats") -> None:
        for name in ("read", "applied", "redelivered", "rejected", "skipped", "facts_missing", "items",
                     "batches", "dead_letters_repeated", "incarnations", "coalesced"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for code, n in other.by_code.items():
            self.by_code[code] = self.by_code.get(code, 0) + n

    def as_dict(self) -> dict[str, object]:
        return {
            "read": self.read, "applied": self.applied, "redelivered": self.redelivered,
            "rejected": self.rejected, "skipped": self.skipped, "items": self.items,
            "facts_missing": self.facts_missing, "dead_letters_repeated": self.dead_letters_repeated,
            "incarnations": self.incarnations, "coalesced": self.coalesced,
            "batches": self.batches, "rejected_by_code": dict(self.by_code),
        }


@dataclass
class BatchResult:
    rejections: list[Rejection]  # to dead-letter (those delivered before are left out)
    latencies_ms: list[float]
    namespace: Namespace | None = None  # where the batch was applied
    positions: dict[str, int] = field(default_factory=dict)  # tp -> effective offset after the batch
    epoch: str | None = None  # the state epoch it was applied under (live workers)


class Processor:
    """Validate, de-duplicate and apply records to one or more namespaces.

    ``process`` applies a whole batch or, when Redis is unavailable, waits (``retry``) and
    applies it again from the start: every step is idempotent, and the first step checks that
    the state is still there (see ``_target``), so a Redis that came back empty is noticed
    rather than written into."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        *,
        namespace: str | None = None,
        since_ms: int | None = None,
        worker_id: str = "worker",
        learn: bool = True,
        retry: RetryPolicy | None = None,
        epoch: str | None = None,
        on_lost: Callable[[str], None] | None = None,
        lanes: int | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.fixed = store.keys.ns(namespace) if namespace else None
        self.since_ms = since_ms
        self.worker_id = worker_id
        self.stats = Stats()
        self.retry = retry or RetryPolicy()
        self.epoch = epoch  # the state epoch a live worker writes under (None: adopt the current one)
        self.on_lost = on_lost  # called (repeatedly) while the state is found gone
        self.lost: str | None = None  # why the state is gone, while it is
        self._lock = threading.Lock()  # held while a batch is applied
        self._stats_lock = threading.Lock()  # lanes merge their counters
        # A batch's partitions go in this many lanes at once (threads; the caller's thread is
        # one): the lanes' Redis round trips overlap each other's Python work. Records of one
        # partition stay in one lane, in offset order; lanes touch item state concurrently as
        # separate workers would (per-source watermarks, atomic scripts).
        self.lanes = max(1, lanes if lanes is not None else settings.worker.apply_lanes)
        self._pool = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix="streamrec-lane") if self.lanes > 1 else None
        self._decode_args = settings.validation.limits()
        self._events_topic = settings.kafka.events_topic
        self._items_topic = settings.kafka.items_topic
        self.learn = learn
        self.learners = Learners(ItemCF(store.cf), Trending(store.trending_config), BetaBandit(store.bandit))
        # Live processing tells serving what changed; a replay rebuilds state nobody serves yet.
        self.notify = settings.serving.notify and namespace is None
        self.recstore = RecStore(store, settings.kafka.partitions)

    # -- where the batch goes -----------------------------------------------------------------

    def _target(self) -> Namespace:
        """Where this batch goes: the replay's namespace, or the live one.

        A live worker that finds a replay's handoff pending pauses here until the switch is
        done, so it never writes to a namespace that readers are leaving or one it has not
        caught up. One that finds the state gone (no registry, or another epoch than the one
        it writes under) stops here too: it reports the loss and waits, confirming any
        handoff, until a restore has rebuilt the state, then writes under the new epoch."""
        if self.fixed is not None:
            return self.fixed
        registry = self.store.registry
        paused = False
        while True:
            view = registry.view()
            if not self._observe(view):
                self.retry.sleep(0.2)
                continue
            assert view.live is not None
            if view.handoff is None:
                if paused:
                    log.info("worker %s resumed into namespace %s", self.worker_id, view.live.name)
                return view.live
            if not paused:
                log.info("worker %s paused for a namespace switch", self.worker_id)
                paused = True
            registry.confirm_paused(self.worker_id, view.handoff)
            self.retry.sleep(0.05)

    def _observe(self, view: RegistryView) -> bool:
        """Whether the state is there to write to. A healthy registry under another epoch is
        adopted (a restore finished, or the registry was created); a missing or lost one is
        reported (logged and marked once, ``on_lost`` every time) and a pending handoff is
        confirmed so that the restore can switch."""
        registry = self.store.registry
        if view.healthy and view.epoch != self.epoch:
            if self.epoch is not None:
                log.warning("worker %s: state restored (epoch %s); resuming into %s", self.worker_id,
                            view.epoch, view.live.name if view.live else "?")
            self.epoch, self.lost = view.epoch, None
        if view.healthy and view.epoch == self.epoch:
            return True
        reason = ("no registry in Redis (it restarted empty or was flushed)" if view.live is None
                  else "the state is marked lost" if view.lost
                  else f"the state's epoch changed from {self.epoch} to {view.epoch}")
        if self.lost is None:
            log.error("worker %s: STATE LOST: %s; not applying anything until it is restored",
                      self.worker_id, reason)
            registry.mark_lost(self.worker_id, reason)
        self.lost = reason
        if view.handoff is not None:
            registry.confirm_paused(self.worker_id, view.handoff)  # let the restore hand off
        if self.on_lost is not None:
            self.on_lost(reason)
        return False

    def confirm_if_idle(self) -> None:
        """Called between batches (heartbeat): an idle worker notices a lost state (reported
        as a batch would, without waiting for an event to arrive) and confirms a pending
        handoff."""
        if self.fixed is not None or not self._lock.acquire(blocking=False):
            return
        try:
            if not self._observe(self.store.registry.view()):
                return
            token = self.store.registry.handoff_token()
            if token is not None:
                self.store.registry.confirm_paused(self.worker_id, token)
        finally:
            self._lock.release()

    # -- a batch ------------------------------------------------------------------------------

    def process(self, records: Sequence[Record], highwaters: dict[str, int] | None = None) -> BatchResult:
        """Apply ``records`` (in offset order per partition). ``highwaters``: the fetch
        high-water mark per "<topic>:<partition>" (live workers), to notice a partition that
        restarted from offset 0."""
        with self._lock:
            return self.retry.call(lambda: self._fan_out(records, highwaters or {}), "applying a batch")

    def _fan_out(self, records: Sequence[Record], highwaters: dict[str, int]) -> BatchResult:
        """``_process`` per lane, at once. The target namespace is resolved once, before any
        lane writes: a lane never pauses (and confirms a handoff) while another is writing."""
        ns = self._target()
        offsets = self.store.offsets(ns)  # one read for all lanes (a lane rebases only its own)
        if self._pool is None or not records:  # (an empty batch: one lane does nothing)
            return self._process(records, highwaters, ns, offsets)
        split: dict[int, list[Record]] = {}
        for rec in records:
            split.setdefault(rec.partition % self.lanes, []).append(rec)
        parts = list(split.values())
        if len(parts) == 1:
            return self._process(parts[0], highwaters, ns, offsets)
        futures = [self._pool.submit(self._process, part, highwaters, ns, offsets) for part in parts[1:]]
        try:
            first = self._process(parts[0], highwaters, ns, offsets)
        finally:
            wait(futures)  # no lane still writing when this returns or raises (and is retried)
        results = [first] + [f.result() for f in futures]
        with self._stats_lock:
            self.stats.batches -= len(parts) - 1  # one batch, however many lanes
        out = BatchResult([], [], ns, {}, results[0].epoch)
        for r in results:
            out.rejections += r.rejections
            out.latencies_ms += r.latencies_ms
            out.positions.update(r.positions)
        return out

    def settle(self, result: BatchResult, records: Sequence[Record],
               highwaters: dict[str, int] | None = None) -> BatchResult:
        """After the batch's dead letters were delivered, just before it is acknowledged.

        A batch applied under an epoch that is gone by now (Redis restarted empty after it was
        applied) is applied again, into the restored state: nothing is acknowledged that the
        restore might not hold (a restore rebuilds up to the committed offsets). Then the
        batch's dead letters are remembered, so a redelivery does not send them again."""
        def once() -> BatchResult:
            current = result
            if self.fixed is None and result.epoch is not None:
                view = self.store.registry.view()
                if not (view.healthy and view.epoch == result.epoch):
                    log.warning("worker %s: a batch was applied to state that is gone since; applying it again",
                                self.worker_id)
                    # Applied again after later batches may have been: its high-water marks
                    # are older than their progress, so they must not be read as a restart.
                    current = self._fan_out(records, {})  # waits for the restore
                    current.rejections = []  # their dead letters were delivered already
            if current.namespace is not None and current.positions:
                self.store.record_dead_letters(current.namespace, current.positions)
            return current

        with self._lock:
            return self.retry.call(once, "settling a batch")

    def _incarnations(self, ns: Namespace, offsets: Offsets, records: Sequence[Record],
                      highwaters: dict[str, int], delta: Stats) -> Offsets:
        """Partitions whose high-water mark is below what was applied from them restarted from
        offset 0 (the topic was recreated, or an in-memory broker restarted): continue their
        effective offsets from the progress reached, so nothing new looks already applied."""
        rebased = False
        newest: dict[str, int] = {}
        for r in records:
            tp = f"{r.topic}:{r.partition}"
            newest[tp] = max(newest.get(tp, -1), r.offset)
        for tp, top in newest.items():
            high, done = highwaters.get(tp), offsets.progress.get(tp)
            if high is None or done is None or high >= done - offsets.base.get(tp, 0):
                continue
            if high <= top:
                continue  # a mark older than this batch's own records: it says nothing

            log.warning("worker %s: partition %s restarted (high-water mark %d, %d applied before): "
                        "a new incarnation; its offsets continue from %d", self.worker_id, tp, high,
                        done - offsets.base.get(tp, 0), done)
            self.store.rebase(ns, tp, done)
            delta.incarnations += 1
            rebased = True
        return self.store.offsets(ns) if rebased else offsets

    def _process(self, records: Sequence[Record], highwaters: dict[str, int], ns: Namespace,
                 offsets: Offsets) -> BatchResult:
        delta = Stats(batches=1, read=len(records))
        rejections: list[Rejection] = []
        offsets = self._incarnations(ns, offsets, records, highwaters, delta)

        def at(rec: Record) -> int:  # the record's effective offset
            return offsets.effective(f"{rec.topic}:{rec.partition}", rec.offset)

        rows: list[UserEventRow] = []
        row_records: list[Record] = []
        items: list[Item] = []
        item_records: list[Record] = []
        now_ms = int(time.time() * 1000)
        for rec in records:
            try:
                event: Event = decode(rec.value, now_ms=now_ms, **self._decode_args)  # type: ignore[arg-type]
                self._check_topic(event, rec.topic)
            except InvalidEvent as exc:
                rejections.append(Rejection(rec, exc.code, exc.reason))
                continue
            if self.since_ms is not None and event.timestamp < self.since_ms:
                delta.skipped += 1
                continue
            if isinstance(event, Click):
                rows.append(UserEventRow(event.user, "c", event.id, event.item, event.timestamp,
                                         at(rec), event.request_id or "", event.segment or ""))
                row_records.append(rec)
            elif isinstance(event, Impression):
                rows.append(UserEventRow(event.user, "i", event.id, "", event.timestamp, at(rec),
                                         event.request_id, event.segment or "",
                                         tuple((s.item, s.position) for s in event.items)))
                row_records.append(rec)
            else:
                items.append(event)
                item_records.append(rec)

        # Facts floors: progress is recorded only after a batch's learner updates were all
        # applied, so the user script may drop facts of offsets below it.
        floors = [offsets.progress.get(f"{rec.topic}:{rec.partition}", 0) for rec in row_records]
        statuses = self.store.apply_user_events(ns, rows, floors)
        won = self.store.apply_items(ns, items)
        learned: list[tuple[str, int, str, str, int, str]] = []  # (source, offset, user, item, ts, facts)
        changed: dict[str, tuple[int, int, int, int]] = {}
        for rec, row, (status, first, facts) in zip(row_records, rows, statuses):
            if row.kind == "c" and status is not Status.DUPLICATE:
                prev = changed.get(row.user)
                if prev is None or prev[1] < row.offset:
                    changed[row.user] = (rec.partition, row.offset, row.ts, rec.timestamp_ms)
            if status is Status.DUPLICATE:
                rejections.append(Rejection(
                    rec, "duplicate",
                    f"event id {row.event_id!r} of user {row.user!r} was already applied at offset {first}",
                ))
                continue
            if status is Status.REDELIVERED:
                delta.redelivered += 1
                if not facts and self.learn:
                    delta.facts_missing += 1
            else:
                delta.applied += 1
            if self.learn and facts:
                # Redelivered records yield their original facts again; the item-level
                # scripts skip what was applied before (per source partition watermark).
                learned.append((f"{rec.topic}:{rec.partition}", row.offset, row.user, row.item, row.ts, facts))
        if self.notify:
            # Serving is told as soon as the sessions are written; it does not wait for the
            # learner updates below (CF, trending and posteriors move slowly, a session does not).
            # A user with several clicks is marked dirty once: coalesced here within the batch,
            # and in Redis with what is still waiting from earlier batches.
            clicks = sum(1 for row, (status, _, _) in zip(rows, statuses)
                         if row.kind == "c" and status is not Status.DUPLICATE)
            delta.coalesced += clicks - len(changed) + self.recstore.mark_dirty(changed)
            new_items = [(rec.partition, it.item) for rec, it, w in zip(item_records, items, won) if w]
            self.recstore.announce_items(new_items, self.settings.serving.stream_maxlen)
        if self.learn:
            if self.store.aggregate:
                # summed per item and field in one pass (the record-by-record updates are
                # derived only should an item straddle its watermark)
                deltas, trending = self.learners.summed(learned)
                self.store.apply_item_deltas(ns, deltas, lambda: self._updates(learned)[0])
            else:
                groups, trending = self._updates(learned)
                self.store.apply_item_updates(ns, groups)
            for rec, it, w in zip(item_records, items, won):
                if w:
                    trending.append((f"{rec.topic}:{rec.partition}", at(rec), "i", it.item, it.category or ""))
            self.store.apply_trending(ns, trending)
        delta.items += len(items)
        delta.applied += len(items)
        delta.rejected += len(rejections)
        for rej in rejections:
            delta.by_code[rej.code] = delta.by_code.get(rej.code, 0) + 1

        positions: dict[str, int] = {}
        for rec in records:
            tp = f"{rec.topic}:{rec.partition}"
            positions[tp] = max(positions.get(tp, -1), at(rec) + 1)
        self.store.record_progress(ns, positions)
        # A redelivered bad record whose dead letter was delivered before is not sent again.
        fresh = [r for r in rejections if at(r.record) >= offsets.dead_letters.get(f"{r.record.topic}:{r.record.partition}", 0)]
        delta.dead_letters_repeated += len(rejections) - len(fresh)
        with self._stats_lock:
            self.stats.merge(delta)

        done_ms = time.time() * 1000
        latencies = [done_ms - rec.timestamp_ms for rec in row_records] if row_records else []
        metrics.count_batch(delta.applied, delta.redelivered, delta.skipped, delta.by_code, delta.coalesced,
                            [lat for lat, rec, (status, _, _) in zip(latencies, row_records, statuses)
                             if rec.timestamp_ms > 0 and status is Status.APPLIED])
        return BatchResult(fresh, latencies, ns, positions, self.epoch if self.fixed is None else None)

    def _updates(self, learned: Sequence[tuple[str, int, str, str, int, str]]
                 ) -> tuple[list[tuple[str, int, list[Update]]], list[tuple[str, int, str, str, str]]]:
        """The learner updates of each record (the reference rule, ``Learners.updates``) and
        the trending ops."""
        groups: list[tuple[str, int, list[Update]]] = []
        trending: list[tuple[str, int, str, str, str]] = []
        for source, offset, user, item, ts, facts in learned:
            updates, trend = self.learners.updates(user, item, ts, facts)
            if updates:
                groups.append((source, offset, updates))
            if trend is not None:
                trending.append((source, offset, "c", item, repr(trend)))
        return groups, trending

    def _check_topic(self, event: Event, topic: str) -> None:
        is_item = isinstance(event, Item)
        if is_item and topic == self._events_topic:
            raise InvalidEvent("wrong_topic", f"item events belong on {self._items_topic}, not {topic}")
        if not is_item and topic == self._items_topic:
            raise InvalidEvent("wrong_topic", f"{type(event).__name__.lower()} events belong on {self._events_topic}")
