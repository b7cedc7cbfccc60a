"""Turn a batch of Kafka records into state updates and rejections.

The same ``Processor`` runs inside the Faust worker and inside replay, so live processing and
rebuilds apply exactly the same rules. It is synchronous (the worker calls it in a thread):
one Redis round trip applies a whole batch of user events through one script call.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
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
    by_code: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "read": self.read, "applied": self.applied, "redelivered": self.redelivered,
            "rejected": self.rejected, "skipped": self.skipped, "items": self.items,
            "facts_missing": self.facts_missing,
            "batches": self.batches, "rejected_by_code": dict(self.by_code),
        }


@dataclass
class BatchResult:
    rejections: list[Rejection]
    latencies_ms: list[float]


class Processor:
    """Validate, de-duplicate and apply records to one or more namespaces."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        *,
        namespace: str | None = None,
        since_ms: int | None = None,
        worker_id: str = "worker",
        learn: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.fixed = store.keys.ns(namespace) if namespace else None
        self.since_ms = since_ms
        self.worker_id = worker_id
        self.stats = Stats()
        self._lock = threading.Lock()  # held while a batch is applied
        self._decode_args = settings.validation.limits()
        self._events_topic = settings.kafka.events_topic
        self._items_topic = settings.kafka.items_topic
        self.learn = learn
        self.learners = Learners(ItemCF(store.cf), Trending(store.trending_config), BetaBandit(store.bandit))
        # Live processing tells serving what changed; a replay rebuilds state nobody serves yet.
        self.notify = settings.serving.notify and namespace is None
        self.recstore = RecStore(store, settings.kafka.partitions)

    def _target(self) -> Namespace:
        """Where this batch goes: the replay's namespace, or the live one. A live worker
        that finds a replay's handoff pending pauses here until the switch is done, so it
        never writes to a namespace that readers are leaving or one it has not caught up."""
        if self.fixed is not None:
            return self.fixed
        ns, token = self.store.registry.live_and_handoff()
        if token is None:
            return ns
        log.info("worker %s paused for a namespace switch", self.worker_id)
        while token is not None:
            self.store.registry.confirm_paused(self.worker_id, token)
            time.sleep(0.05)
            ns, token = self.store.registry.live_and_handoff()
        log.info("worker %s resumed into namespace %s", self.worker_id, ns.name)
        return ns

    def confirm_if_idle(self) -> None:
        """Called between batches (heartbeat): an idle worker confirms a pending handoff."""
        if self.fixed is not None or not self._lock.acquire(blocking=False):
            return
        try:
            token = self.store.registry.handoff_token()
            if token is not None:
                self.store.registry.confirm_paused(self.worker_id, token)
        finally:
            self._lock.release()

    def process(self, records: Sequence[Record]) -> BatchResult:
        with self._lock:
            return self._process(records)

    def _process(self, records: Sequence[Record]) -> BatchResult:
        stats = self.stats
        stats.batches += 1
        stats.read += len(records)
        rejections: list[Rejection] = []
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
                stats.skipped += 1
                continue
            if isinstance(event, Click):
                rows.append(UserEventRow(event.user, "c", event.id, event.item, event.timestamp,
                                         rec.offset, event.request_id or "", event.segment or ""))
                row_records.append(rec)
            elif isinstance(event, Impression):
                rows.append(UserEventRow(event.user, "i", event.id, "", event.timestamp, rec.offset,
                                         event.request_id, event.segment or "",
                                         tuple((s.item, s.position) for s in event.items)))
                row_records.append(rec)
            else:
                items.append(event)
                item_records.append(rec)

        ns = self._target()
        statuses = self.store.apply_user_events(ns, rows)
        won = self.store.apply_items(ns, items)
        groups: list[tuple[str, int, list[Update]]] = []
        trending: list[tuple[str, int, str, str, str]] = []
        changed: dict[str, tuple[int, int, int, int]] = {}
        for rec, row, (status, first, facts) in zip(row_records, rows, statuses):
            if row.kind == "c" and status is not Status.DUPLICATE:
                prev = changed.get(row.user)
                if prev is None or prev[1] < rec.offset:
                    changed[row.user] = (rec.partition, rec.offset, row.ts, rec.timestamp_ms)
            if status is Status.DUPLICATE:
                rejections.append(Rejection(
                    rec, "duplicate",
                    f"event id {row.event_id!r} of user {row.user!r} was already applied at offset {first}",
                ))
                continue
            if status is Status.REDELIVERED:
                stats.redelivered += 1
                if not facts and self.learn:
                    stats.facts_missing += 1
            else:
                stats.applied += 1
            if self.learn and facts:
                # Redelivered records yield their original facts again; the item-level
                # scripts skip what was applied before (per source partition watermark).
                source = f"{rec.topic}:{rec.partition}"
                updates, trend = self.learners.updates(row.user, row.item, row.ts, facts)
                if updates:
                    groups.append((source, rec.offset, updates))
                if trend is not None:
                    trending.append((source, rec.offset, "c", row.item, repr(trend)))
        if self.notify:
            # Serving is told as soon as the sessions are written; it does not wait for the
            # learner updates below (CF, trending and posteriors move slowly, a session does not).
            new_items = [(rec.partition, it.item) for rec, it, w in zip(item_records, items, won) if w]
            self.recstore.notify(changed, new_items, self.settings.serving.stream_maxlen)
        if self.learn:
            for rec, it, w in zip(item_records, items, won):
                if w:
                    trending.append((f"{rec.topic}:{rec.partition}", rec.offset, "i", it.item, it.category or ""))
            self.store.apply_item_updates(ns, groups)
            self.store.apply_trending(ns, trending)
        stats.items += len(items)
        stats.applied += len(items)
        stats.rejected += len(rejections)
        for rej in rejections:
            stats.by_code[rej.code] = stats.by_code.get(rej.code, 0) + 1

        positions: dict[str, int] = {}
        for rec in records:
            tp = f"{rec.topic}:{rec.partition}"
            positions[tp] = max(positions.get(tp, -1), rec.offset + 1)
        self.store.record_progress(ns, positions)

        done_ms = time.time() * 1000
        latencies = [done_ms - rec.timestamp_ms for rec in row_records] if row_records else []
        return BatchResult(rejections, latencies)

    def _check_topic(self, event: Event, topic: str) -> None:
        is_item = isinstance(event, Item)
        if is_item and topic == self._events_topic:
            raise InvalidEvent("wrong_topic", f"item events belong on {self._items_topic}, not {topic}")
        if not is_item and topic == self._items_topic:
            raise InvalidEvent("wrong_topic", f"{type(event).__name__.lower()} events belong on {self._events_topic}")
