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
"""

from __future__ import annotations

import random
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kafka import TopicPartition

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.errors import ReplayError
from streamrec.streams.processor import Processor, Record, Stats

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
    pause_s: float = 0.0  # how long live workers were paused for the handoff

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_version(store: StateStore) -> str:
    numbers = [int(m.group(1)) for name, _ in store.registry.namespaces() if (m := re.fullmatch(r"v(\d+)", name))]
    live = re.fullmatch(r"v(\d+)", store.registry.live_name())
    if live:
        numbers.append(int(live.group(1)))
    return f"v{max(numbers, default=0) + 1}"


def _records(polled: dict[Any, list[Any]]) -> list[Record]:
    """Records of one poll, in offset order within each partition."""
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
    handoff_lag: int = 5_000,
    pause_timeout_s: float = 30.0,
) -> ReplaySummary:
    """Rebuild into ``namespace`` (default: the next ``vN``) and switch to it when verified.

    ``since_ms`` keeps only events whose event time is at or after it (Tansu's time index
    uses write time, so the filter reads each event's own timestamp). ``require_match``
    refuses to switch when a full rebuild differs from the live state for any user.
    ``handoff_lag``: how many records behind the replay may be when it asks workers to pause.
    """
    store = StateStore.from_settings(settings)
    previous = store.registry.live_name()
    name = namespace or next_version(store)
    store.registry.begin_rebuild(name, {"since_ms": since_ms, "started_ms": int(time.time() * 1000)})
    k = settings.kafka
    token = uuid.uuid4().hex
    try:
        start = time.monotonic()
        consumer = kafka_wiring.reader(k, [k.events_topic, k.items_topic])
        partitions = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        processor = Processor(settings, store, namespace=name, since_ms=since_ms)
        report = _Reporter(processor, progress, start)
        pause_s = 0.0
        try:
            # The replay applies exactly the records below the live namespace's progress
            # (next offset to apply, per partition), so that once workers pause both
            # namespaces hold the same records and compare equal. Records the workers have
            # not applied yet are theirs: after the switch they apply them to the new one.
            live_ns = store.keys.ns(previous)

            def step(targets: dict[TopicPartition, int]) -> int:
                records = _records(consumer.poll(timeout_ms=100, max_records=5000))
                mine = []
                rewind: dict[TopicPartition, int] = {}
                for r in records:
                    tp = TopicPartition(r.topic, r.partition)
                    if r.offset < targets.get(tp, 0) and tp not in rewind:
                        mine.append(r)
                    elif tp not in rewind:
                        rewind[tp] = r.offset
                for tp, offset in rewind.items():
                    consumer.seek(tp, offset)  # not ours yet: read it again later
                if mine:
                    processor.process(mine)
                behind = sum(max(0, targets.get(tp, 0) - consumer.position(tp)) for tp in partitions)
                report(behind)
                return behind

            # Offsets the worker group committed count as applied too: after Redis lost the
            # live state, they are what the workers will not read again.
            committed = kafka_wiring.committed_offsets(k, [k.events_topic, k.items_topic])

            def live_progress() -> dict[TopicPartition, int]:
                done = store.progress(live_ns)
                return {
                    tp: max(done.get(key, 0), committed.get(key, 0))
                    for tp in partitions if (key := f"{tp.topic}:{tp.partition}")
                }

            # 1. catch up with the live workers while they carry on
            while step(live_progress()) > handoff_lag:
                pass
            # 2. hand off: every live worker pauses before its next batch
            paused_at = time.monotonic()
            store.registry.begin_handoff(token, ttl_s=pause_timeout_s * 4)
            _wait_for_workers(store, token, pause_timeout_s, settings.worker.heartbeat_s)
            # 3. finish: exactly what the paused workers applied to the live namespace
            committed = kafka_wiring.committed_offsets(k, [k.events_topic, k.items_topic])
            final = live_progress()
            while step(final) > 0:
                pass
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
        store.registry.set_info(name, stats=stats.as_dict(), seconds=round(seconds, 3), verification=verification)
        if switch:
            store.registry.switch(name)  # also releases the workers, into the new namespace
        else:
            store.registry.abort_rebuild(name)  # releases the workers, into the old one
            store.registry.set_info(name, status="built")
        pause_s = time.monotonic() - paused_at
        return ReplaySummary(
            namespace=name, previous=previous, since_ms=since_ms, read=stats.read,
            applied=stats.applied, redelivered=stats.redelivered, rejected=stats.rejected,
            skipped=stats.skipped, seconds=round(seconds, 3), users=verification["users"],
            switched=switch, verification=verification, pause_s=round(pause_s, 3),
        )
    except BaseException:
        store.registry.abort_rebuild(name)
        raise


class _Reporter:
    def __init__(self, processor: Processor, progress: ProgressFn | None, start: float) -> None:
        self.processor, self.progress, self.start, self.last = processor, progress, start, 0.0

    def __call__(self, behind: int | None) -> None:
        now = time.monotonic()
        if self.progress and (now - self.last > 1.0 or behind == 0):
            self.progress(self.processor.stats, behind if behind is not None else -1, now - self.start)
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
