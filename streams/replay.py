"""Rebuild state from the topics into a fresh namespace, verify it, switch readers over.

While a rebuild runs, live workers write every batch to the live namespace *and* to the one
being rebuilt (``sr:{reg}:rebuild``), so the new namespace misses nothing that arrives
during the replay. Writes are idempotent and order-independent, so a record applied by both
the replay and a live worker counts once. The switch is one Redis transaction on the
pointer that readers resolve on every read: a reader sees the old namespace or the new one,
never a mixture.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kafka import TopicPartition

from infra import kafka as kafka_wiring
from infra.settings import Settings
from infra.state import StateStore
from models.errors import ReplayError
from streams.processor import Processor, Record, Stats

ProgressFn = Callable[[Stats, int, float], None]  # stats, records behind, seconds elapsed


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_version(store: StateStore) -> str:
    numbers = [int(m.group(1)) for name, _ in store.namespaces() if (m := re.fullmatch(r"v(\d+)", name))]
    live = re.fullmatch(r"v(\d+)", store.live_name())
    if live:
        numbers.append(int(live.group(1)))
    return f"v{max(numbers, default=0) + 1}"


def _records(polled: dict[Any, list[Any]]) -> list[Record]:
    return [
        Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
        for batch in polled.values() for r in batch
    ]


def replay(
    settings: Settings,
    *,
    namespace: str | None = None,
    since_ms: int | None = None,
    switch: bool = True,
    require_match: bool = False,
    progress: ProgressFn | None = None,
    notice_s: float = 1.0,
) -> ReplaySummary:
    """Rebuild into ``namespace`` (default: the next ``vN``) and switch to it when verified.

    ``since_ms`` keeps only events whose event time is at or after it (Tansu's time index
    uses write time, so the filter reads each event's own timestamp). ``require_match``
    refuses to switch when a full rebuild differs from the live state for any user.
    """
    store = StateStore.from_settings(settings)
    previous = store.live_name()
    name = namespace or next_version(store)
    store.begin_rebuild(name, {"since_ms": since_ms, "started_ms": int(time.time() * 1000)})
    k = settings.kafka
    try:
        # Live workers refresh their write targets every 0.5 s; anything they apply before
        # noticing the rebuild is below the high-water mark the replay reads up to.
        time.sleep(notice_s)
        start = time.monotonic()
        consumer = kafka_wiring.reader(k, [k.events_topic, k.items_topic])
        partitions = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        processor = Processor(settings, store, namespace=name, since_ms=since_ms)
        last_report = 0.0
        try:
            # The end is frozen at the high-water marks seen once live workers write to the
            # new namespace too: they apply every record from there on, the replay every
            # record before it. Under steady traffic the replay still ends.
            buffered: list[Record] = []
            targets: dict[TopicPartition, int] = {}
            deadline = time.monotonic() + 30
            while len(targets) < len(partitions):
                buffered += _records(consumer.poll(timeout_ms=200, max_records=5000))
                targets = {tp: hw for tp in partitions if (hw := consumer.highwater(tp)) is not None}
                if time.monotonic() > deadline:
                    raise ReplayError("the broker reported no high-water mark for some partitions")
            store.set_info(name, targets={f"{tp.topic}:{tp.partition}": hw for tp, hw in targets.items()})
            while True:
                records = [r for r in buffered if r.offset < targets[TopicPartition(r.topic, r.partition)]]
                buffered = []
                if records:
                    processor.process(records)
                behind = sum(max(0, targets[tp] - consumer.position(tp)) for tp in partitions)
                now = time.monotonic()
                if progress and (now - last_report > 1.0 or behind == 0):
                    progress(processor.stats, behind, now - start)
                    last_report = now
                if behind == 0:
                    break
                buffered = _records(consumer.poll(timeout_ms=200, max_records=5000))
        finally:
            consumer.close()
        seconds = time.monotonic() - start
        stats = processor.stats
        verification = verify(store, name, previous, stats, compare=since_ms is None)
        if require_match and verification.get("mismatched_users"):
            raise ReplayError(
                f"rebuild {name} differs from live {previous} for "
                f"{verification['mismatched_users']} users; not switching"
            )
        if not verification["accounted"]:
            raise ReplayError(f"rebuild {name} lost records: {verification}")
        store.set_info(name, stats=stats.as_dict(), seconds=round(seconds, 3), verification=verification)
        if switch:
            store.switch(name)
        else:
            store.abort_rebuild(name)
            store.set_info(name, status="built")
        return ReplaySummary(
            namespace=name, previous=previous, since_ms=since_ms, read=stats.read,
            applied=stats.applied, redelivered=stats.redelivered, rejected=stats.rejected,
            skipped=stats.skipped, seconds=round(seconds, 3), users=verification["users"],
            switched=switch, verification=verification,
        )
    except BaseException:
        store.abort_rebuild(name)
        raise


def verify(store: StateStore, name: str, live: str, stats: Stats, *, compare: bool,
           sample: int = 20_000) -> dict[str, Any]:
    """Accounting (every record read is applied, redelivered, rejected or skipped) and, for a
    full rebuild, a comparison with the live namespace: every user's state when there are at
    most ``sample`` users, else a fixed pseudo-random sample of them."""
    accounted = stats.read == stats.applied + stats.redelivered + stats.rejected + stats.skipped
    new_users = store.users(name)
    out: dict[str, Any] = {"accounted": accounted, "users": len(new_users)}
    if compare and live != name:
        old_users = store.users(live)
        union = sorted(set(old_users) | set(new_users))
        chosen = union if len(union) <= sample else random.Random(0).sample(union, sample)
        old, new = store.snapshot(live, chosen), store.snapshot(name, chosen)
        out["live_users"] = len(old_users)
        out["compared_users"] = len(chosen)
        out["mismatched_users"] = sum(1 for u in chosen if old.get(u) != new.get(u))
    return out
