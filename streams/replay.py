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
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kafka import TopicPartition

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.recstore import RecStore
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
    restored: bool = False  # a rebuild of lost state (``--restore``)
    lost: dict[str, Any] | None = None  # with ``restored``: when and how the loss was found

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_version(store: StateStore) -> str:
    live = store.registry.live_name() or ""
    names = [name for name, _ in store.registry.namespaces()] + [live]
    numbers = [int(m.group(1)) for name in names if (m := re.fullmatch(r"v(\d+)", name))]
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
    allow_mismatch: bool = False,
    restore: bool = False,
    progress: ProgressFn | None = None,
    handoff_lag: int = 5_000,
    pause_timeout_s: float = 30.0,
) -> ReplaySummary:
    """Rebuild into ``namespace`` (default: the next ``vN``) and switch to it when verified.

    ``since_ms`` keeps only events whose event time is at or after it (Tansu's time index
    uses write time, so the filter reads each event's own timestamp). A full rebuild that
    differs from the live state for any user is not switched to unless ``allow_mismatch``.
    ``restore``: the state is lost (no registry: Redis restarted empty or was flushed); the
    rebuild goes up to what the worker group committed, creates a new registry with a new
    epoch and switches to it; the workers, paused since they found the state gone, resume.
    ``handoff_lag``: how many records behind the replay may be when it asks workers to pause.
    """
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
            consumer.close()
        seconds = time.monotonic() - start
        stats = processor.stats
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
            restored=restore, lost=lost,
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
