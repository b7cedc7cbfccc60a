"""Replay at bulk speed: a fetcher thread reads ahead while applier threads apply.

The pending buffer without Kafka (records at or above a partition's target wait until the
target grows; none is applied twice or skipped; order per partition is kept; a partition is
done only once its records were applied, not when they were handed out), the appliers without
Kafka (each partition's batches go to one applier, in order; a failure is raised to the caller
and stops the others), then end to end against the real broker and Redis: a replay with several
appliers of events published with a plain producer equals the live worker's state, records
beyond the targets are applied only once they grow (each exactly once, in offset order, by one
applier), and the fetcher and applier threads are gone after success and after a failure.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Sequence

import pytest
from kafka import TopicPartition

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Item, encode
from streamrec.streams import replay as replay_module
from streamrec.models.errors import Stopped
from streamrec.streams.processor import Processor, Record, Stats
from streamrec.streams.replay import _Appliers, _Pending, replay
from tests.conftest import WorkerProcess, wait_applied
from tests.test_worker import T0, expected, make_events, users_of

A, B = TopicPartition("t.events", 0), TopicPartition("t.events", 1)


def rec(tp: TopicPartition, offset: int) -> Record:
    return Record(tp.topic, tp.partition, offset, None, None, 0)


def batch(tp: TopicPartition, offsets: range) -> tuple[TopicPartition, list[Record], int]:
    return tp, [rec(tp, o) for o in offsets], offsets.stop


def offsets(records: Sequence[Record], tp: TopicPartition) -> list[int]:
    return [r.offset for r in records if (r.topic, r.partition) == (tp.topic, tp.partition)]


def replay_threads() -> list[threading.Thread]:
    """The fetcher and the appliers of any replay still running."""
    return [t for t in threading.enumerate() if t.name == "replay-fetcher" or t.name.startswith("replay-applier")]


# -- the pending buffer -------------------------------------------------------------------------


def test_records_beyond_the_target_wait_until_it_grows() -> None:
    pending = _Pending({A: 0, B: 0})
    pending.add([batch(A, range(0, 10)), batch(B, range(0, 4))])
    assert offsets(pending.take({A: 6, B: 0}, 100), A) == [0, 1, 2, 3, 4, 5]
    assert pending.take({A: 6, B: 0}, 100) == []  # nothing more below the targets
    assert pending.size(A) == 4 and pending.done_to(A) == 6 and pending.done_to(B) == 0
    assert pending.behind({A: 6, B: 0}) == 0 and pending.behind({A: 8, B: 3}) == 5
    got = pending.take({A: 8, B: 3}, 100)  # the targets grew: held records are released
    assert offsets(got, A) == [6, 7] and offsets(got, B) == [0, 1, 2]
    assert pending.behind({A: 8, B: 3}) == 0
    # A target beyond what was fetched: behind counts up to it from the fetched position.
    assert offsets(pending.take({A: 15, B: 3}, 100), A) == [8, 9]
    assert pending.done_to(A) == 10 and pending.behind({A: 15, B: 3}) == 5
    pending.add([batch(A, range(10, 15))])
    assert offsets(pending.take({A: 15, B: 3}, 100), A) == [10, 11, 12, 13, 14]
    assert pending.behind({A: 15, B: 3}) == 0


def test_take_respects_the_limit_and_keeps_order() -> None:
    pending = _Pending({A: 0, B: 0})
    pending.add([batch(A, range(0, 7)), batch(B, range(0, 7))])
    first = pending.take({A: 7, B: 7}, 5)
    second = pending.take({A: 7, B: 7}, 5)
    third = pending.take({A: 7, B: 7}, 5)
    assert (len(first), len(second), len(third)) == (5, 5, 4)
    everything = first + second + third
    assert offsets(everything, A) == list(range(7)) and offsets(everything, B) == list(range(7))


def test_target_zero_and_a_log_starting_above_the_target_are_done_at_once() -> None:
    pending = _Pending({A: 0, B: 100})  # B's first record is at offset 100 (older ones are gone)
    assert pending.behind({A: 0, B: 50}) == 0
    assert pending.behind({A: 0, B: 120}) == 20
    pending.add([batch(B, range(100, 130))])
    assert offsets(pending.take({A: 0, B: 120}, 100), B) == list(range(100, 120))
    assert pending.behind({A: 0, B: 120}) == 0


def test_gaps_in_offsets_count_as_done() -> None:
    pending = _Pending({A: 0})
    # offsets 3 and 4 do not exist (control records): the position after the batch passes them
    pending.add([(A, [rec(A, 0), rec(A, 1), rec(A, 2)], 5), (A, [rec(A, 5)], 6)])
    assert offsets(pending.take({A: 4}, 100), A) == [0, 1, 2]
    assert pending.done_to(A) == 5 and pending.behind({A: 4}) == 0
    assert offsets(pending.take({A: 6}, 100), A) == [5] and pending.behind({A: 6}) == 0


def test_a_partition_is_done_only_once_its_records_were_applied() -> None:
    pending = _Pending({A: 0, B: 0})
    pending.add([batch(A, range(0, 10)), batch(B, range(0, 10))])
    first = pending.take({A: 10, B: 10}, 6, only={A})
    assert offsets(first, A) == list(range(6)) and not offsets(first, B)
    one = pending.started(first)
    assert pending.done_to(A) == 0 and pending.behind({A: 10, B: 10}) == 20  # handed out, not applied
    second = pending.take({A: 10, B: 10}, 100, only={A})
    two = pending.started(second)
    assert offsets(second, A) == [6, 7, 8, 9] and pending.done_to(A) == 0
    with pytest.raises(AssertionError, match="out of order"):
        pending.applied(two)  # the later batch of a partition cannot finish first
    pending.applied(one)
    assert pending.done_to(A) == 6 and pending.behind({A: 10, B: 10}) == 14
    pending.applied(two)
    assert pending.done_to(A) == 10 and pending.behind({A: 10, B: 10}) == 10


def test_random_batches_and_growing_targets_apply_each_record_once_in_order() -> None:
    rng = random.Random(7)
    parts = [TopicPartition("t.events", p) for p in range(4)]
    total = {tp: rng.randrange(200, 2000) for tp in parts}
    final = {tp: rng.randrange(0, total[tp] + 1) for tp in parts}
    fetched = {tp: 0 for tp in parts}
    targets = {tp: 0 for tp in parts}
    pending = _Pending(fetched)
    applied: list[Record] = []
    for _ in range(10_000):
        if all(pending.done_to(tp) >= final[tp] for tp in parts) and targets == final:
            break
        if rng.random() < 0.5:  # a fetched batch, from a few partitions
            chosen = [tp for tp in parts if fetched[tp] < total[tp] and rng.random() < 0.5]
            out = []
            for tp in chosen:
                n = rng.randrange(1, 300)
                top = min(total[tp], fetched[tp] + n)
                out.append(batch(tp, range(fetched[tp], top)))
                fetched[tp] = top
            pending.add(out)
        if rng.random() < 0.3:  # targets only grow
            for tp in parts:
                targets[tp] = min(final[tp], targets[tp] + rng.randrange(0, 200))
        got = pending.take(targets, rng.randrange(1, 500))
        for r in got:
            assert r.offset < targets[TopicPartition(r.topic, r.partition)]
        applied += got
        assert pending.behind(targets) == sum(max(0, t - pending.done_to(tp)) for tp, t in targets.items())
    else:
        pytest.fail("the simulation did not finish")
    for tp in parts:
        assert offsets(applied, tp) == list(range(final[tp])), tp


# -- the appliers --------------------------------------------------------------------------------


class FakeProcessor:
    """Records what it was given (and by which thread); ``fail`` / ``block`` on the n-th call
    (a failure waits for ``gate``, which a block opens)."""

    def __init__(self, stop: threading.Event, log: list[tuple[int, str, list[Record]]],
                 fail: int | None = None, block: int | None = None,
                 gate: threading.Event | None = None) -> None:
        from streamrec.infra.retry import RetryPolicy

        self.stats, self.log, self.fail, self.block = Stats(), log, fail, block
        self.gate = gate or threading.Event()
        self.retry = RetryPolicy(stop=stop)
        self.calls = 0

    def process(self, records: Sequence[Record]) -> None:
        self.calls += 1
        self.log.append((id(self), threading.current_thread().name, list(records)))
        if self.calls == self.fail:
            self.gate.wait(5)
            raise RuntimeError("redis went away")
        if self.calls == self.block:
            self.gate.set()
            self.retry.sleep(60)  # waiting out an outage: the stop event ends it (Stopped)
        time.sleep(0.002)  # a Redis round trip: lets the other appliers run
        self.stats.merge(Stats(read=len(records), applied=len(records), batches=1))


def test_each_partition_goes_to_one_applier_in_order_and_stats_are_merged() -> None:
    parts = [TopicPartition("t.events", p) for p in range(5)]
    log: list[tuple[int, str, list[Record]]] = []
    wake = threading.Event()
    pool = _Appliers(lambda stop: FakeProcessor(stop, log), parts, 2, wake)  # type: ignore[arg-type, return-value]
    try:
        assert [sorted(tp.partition for tp in mine) for mine in pool.partitions] == [[0, 2, 4], [1, 3]]
        pending = _Pending({tp: 0 for tp in parts})
        pending.add([batch(tp, range(0, 400)) for tp in parts])
        targets = {tp: 400 for tp in parts}
        handed = 0
        while pending.behind(targets):
            for marks in pool.collect():
                pending.applied(marks)
            for n, mine in enumerate(pool.partitions):
                while pool.outstanding[n] < 2 and (records := pending.take(targets, 70, mine)):
                    pool.hand(n, records, pending.started(records))
                    handed += 1
            wake.wait(0.05)
            wake.clear()
        assert pool.stats().read == 5 * 400 and pool.stats().batches == handed
    finally:
        pool.close()
    assert not replay_threads()
    owners: dict[int, set[tuple[int, str]]] = {}
    for proc, thread, records in log:
        for r in records:
            owners.setdefault(r.partition, set()).add((proc, thread))
    assert all(len(o) == 1 for o in owners.values()), owners  # one processor, one thread each
    assert len({o for os in owners.values() for o in os}) == 2
    flat = [r for _, _, records in log for r in records]
    for tp in parts:
        assert offsets(flat, tp) == list(range(400)), tp


def test_an_applier_failure_is_raised_and_stops_the_others() -> None:
    """Applier 0 fails on its second batch while applier 1 waits out an "outage" in its
    second: the caller gets the failure (not the other's ``Stopped``) at once, and no thread
    is left."""
    parts = [A, B]
    log: list[tuple[int, str, list[Record]]] = []
    made: list[FakeProcessor] = []
    gate = threading.Event()

    def make(stop: threading.Event) -> FakeProcessor:
        made.append(FakeProcessor(stop, log, gate=gate, **({"fail": 2} if not made else {"block": 2})))
        return made[-1]

    wake = threading.Event()
    pool = _Appliers(make, parts, 2, wake)  # type: ignore[arg-type]
    try:
        for n, tp in enumerate(parts):
            for lo in range(0, 30, 10):
                records = [rec(tp, o) for o in range(lo, lo + 10)]
                pool.hand(n, records, None)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="redis went away"):
            while time.monotonic() - started < 10:
                pool.collect()
                wake.wait(0.05)
                wake.clear()
        assert time.monotonic() - started < 5
    finally:
        pool.close(timeout_s=5)
    assert not replay_threads()
    assert [p.calls for p in made] == [2, 2]  # neither took its third batch
    assert isinstance(pool.error, RuntimeError) and not isinstance(pool.error, Stopped)


# -- against the broker and Redis ---------------------------------------------------------------


def publish_plain(settings: Settings, events: Sequence[Any],
                  items: Sequence[Item] = ()) -> list[tuple[Any, int, int]]:
    """Publish with a plain kafka-python producer (keyed by user or item): (event, partition,
    offset) of each."""
    k = settings.kafka
    producer = kafka_wiring.producer(k)
    try:
        futures = [(i, producer.send(k.items_topic, key=i.item.encode(), value=encode(i)))
                   for i in items]
        futures += [(e, producer.send(k.events_topic, key=e.user.encode(), value=encode(e)))
                    for e in events]
        producer.flush()
        return [(e, m.partition, m.offset) for e, f in futures if (m := f.get(timeout=30))]
    finally:
        producer.close()


def ends_of(published: list[tuple[Any, int, int]]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for _, p, o in published:
        ends[p] = max(ends.get(p, 0), o + 1)
    return ends


@pytest.mark.slow
def test_a_bulk_replay_equals_the_live_worker(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    events = make_events(25_000, users=500, seed=21, dup_every=301)
    items = [Item(id=f"item-{n}", timestamp=T0 + n, item=f"i{n}", title=f"item {n}",
                  category=f"c{n % 3}") for n in range(50)]
    total = len(publish_plain(settings, events, items))
    worker = start_worker()
    wait_applied(store, total, workers=[worker])
    live = store.registry.live_name()
    users = sorted(users_of(events))
    before = store.snapshot(live, users)
    summary = replay(settings, appliers=2)
    assert summary.switched and summary.read == total and summary.appliers == 2
    assert summary.verification["accounted"] and summary.verification["mismatched_users"] == 0
    assert summary.verification["compared_users"] == len(users) == summary.users
    assert summary.redelivered == 0
    assert store.registry.live_name() == summary.namespace != live
    assert store.snapshot(summary.namespace, users) == before
    assert summary.apply_s > 0 and summary.fetch_wait_s >= 0 and summary.fetcher_blocked_s >= 0
    assert not replay_threads()


@pytest.mark.slow
def test_records_beyond_the_targets_are_applied_once_they_grow(
    settings: Settings, store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No live worker: the live namespace's progress (the targets) is set by hand, first to
    a quarter of each partition, then, once the replay has caught up with that, to all but
    the last 100 records (one partition's target stays). The fetcher reads ahead at once, so
    what lies between is held and released when the targets grow; the rest is never applied.
    Small batches and a small hold limit make the appliers (three) go through many steps and
    pause the fetching of partitions that run ahead. Each partition's records are applied
    exactly once, in offset order, all by one applier (one processor, one thread), and the
    appliers do apply at the same time."""
    monkeypatch.setattr(replay_module, "BATCH", 700)
    monkeypatch.setattr(replay_module, "HOLD_LIMIT", 400)
    events = make_events(12_000, users=200, seed=22)
    k = settings.kafka
    published = publish_plain(settings, events)
    ends = ends_of(published)
    assert len(ends) == k.partitions
    store.registry.ensure()
    live = store.live()
    key = {p: f"{k.events_topic}:{p}" for p in ends}
    first = {p: n // 4 for p, n in ends.items()}
    second = {p: n - 100 for p, n in ends.items()}
    second[0] = first[0]  # one partition's target does not grow
    store.record_progress(live, {key[p]: n for p, n in first.items() if n})

    seen: list[list[Record]] = []
    calls: list[tuple[int, str, float, float, list[Record]]] = []  # processor, thread, start, end

    class Recording(Processor):
        def process(self, records: Sequence[Record], highwaters: dict[str, int] | None = None) -> Any:
            seen.append(list(records))
            started = time.monotonic()
            try:
                return super().process(records, highwaters)
            finally:
                calls.append((id(self), threading.current_thread().name, started, time.monotonic(),
                              list(records)))

    monkeypatch.setattr(replay_module, "Processor", Recording)
    holds: list[frozenset[TopicPartition]] = []
    hold = replay_module._Fetcher.hold

    def spy(self: Any, partitions: Any) -> None:
        holds.append(frozenset(partitions))
        hold(self, partitions)

    monkeypatch.setattr(replay_module._Fetcher, "hold", spy)
    grown = []

    def progress(stats: Any, behind: int, elapsed: float) -> None:
        if behind == 0 and not grown:
            applied = {p: 0 for p in ends}
            for batch_ in seen:
                for r in batch_:
                    applied[r.partition] = max(applied[r.partition], r.offset + 1)
            assert applied == first  # exactly up to the first targets so far
            grown.append(True)
            store.record_progress(live, {key[p]: n for p, n in second.items() if n})

    summary = replay(settings, switch=False, handoff_lag=0, progress=progress, appliers=3)
    assert grown and summary.appliers == 3
    assert all(len(b) <= 700 for b in seen) and len(seen) > 5
    # Partition 0 ran far beyond a target that never grew: its fetching paused until the end;
    # the others paused while far beyond the first targets, and resumed once they grew.
    p0, p1 = TopicPartition(k.events_topic, 0), TopicPartition(k.events_topic, 1)
    assert p0 in holds[-1] and p1 not in holds[-1] and any(p1 in h for h in holds)
    flat = [r for b in seen for r in b]
    for p, n in second.items():  # once each, in order
        assert [r.offset for r in flat if r.partition == p] == list(range(n)), p
    owners: dict[int, set[tuple[int, str]]] = {}
    for proc, thread, _, _, records in calls:
        for r in records:
            owners.setdefault(r.partition, set()).add((proc, thread))
    assert all(len(o) == 1 for o in owners.values()), owners  # one applier per partition
    appliers = {o for os in owners.values() for o in os}
    assert len(appliers) == 3 and len({proc for proc, _ in appliers}) == 3
    # every n-th partition of the sorted list (events then items) is the same applier's
    ordered = sorted(owners)
    assert all(owners[p] == owners[ordered[i % 3]] for i, p in enumerate(ordered))
    spans = sorted((start, end) for _, _, start, end, _ in calls)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "the appliers never overlapped"
    want = [(e, p, o) for e, p, o in published if o < second[p]]
    assert summary.read == len(want) and summary.redelivered == 0
    assert summary.verification["accounted"]
    assert store.snapshot(summary.namespace, users_of(events)) == expected(settings, want)
    assert store.registry.live_name() == live.name  # not switched
    assert not replay_threads()


@pytest.mark.slow
def test_nothing_to_replay_ends_at_once(settings: Settings, store: StateStore) -> None:
    store.registry.ensure()
    started = time.monotonic()
    summary = replay(settings, switch=False)
    assert summary.read == 0 and summary.verification["accounted"]
    assert time.monotonic() - started < 15
    assert not replay_threads()


@pytest.mark.slow
def test_the_fetcher_stops_when_applying_fails(
    settings: Settings, store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_module, "BATCH", 500)
    events = make_events(5_000, users=50, seed=23)
    published = publish_plain(settings, events)
    store.registry.ensure()
    live = store.live()
    topic = settings.kafka.events_topic
    store.record_progress(live, {f"{topic}:{p}": n for p, n in ends_of(published).items()})
    made: list[Processor] = []
    calls: dict[int, int] = {}
    blocking = threading.Event()

    class Failing(Processor):
        """The first applier's processor fails on its second batch, once the second applier's
        is waiting out an "outage" in its second batch (its retry wait, which the failure
        must end)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def process(self, records: Sequence[Record], highwaters: dict[str, int] | None = None) -> Any:
            n = calls[id(self)] = calls.get(id(self), 0) + 1
            if n == 2 and self is made[0]:
                blocking.wait(10)
                raise RuntimeError("redis went away")
            if n == 2:
                blocking.set()
                self.retry.sleep(60)
            return super().process(records, highwaters)

    monkeypatch.setattr(replay_module, "Processor", Failing)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="redis went away"):
        replay(settings, switch=False, appliers=2)
    assert time.monotonic() - started < 15  # not the 60 s the other applier would have waited
    assert blocking.is_set() and len(made) == 2
    assert [calls[id(p)] for p in made] == [2, 2]  # neither applied anything after the failure
    assert not replay_threads()
    assert store.registry.live_name() == live.name
    # The rebuild was aborted: a replay after it runs through.
    monkeypatch.setattr(replay_module, "Processor", Processor)
    summary = replay(settings, switch=False)
    assert summary.read == len(published) and summary.verification["accounted"]
    assert not replay_threads()


@pytest.mark.slow
def test_a_missing_topic_fails_cleanly(settings: Settings, store: StateStore,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from streamrec.models.errors import KafkaServiceError

    store.registry.ensure()
    kafka = settings.kafka.model_copy(update={"topic_prefix": "nosuch" + settings.kafka.topic_prefix})
    gone = settings.model_copy(update={"kafka": kafka})
    real = kafka_wiring.aio_reader

    async def quick(*args: Any, **kwargs: Any) -> Any:
        return await real(*args, **{**kwargs, "timeout_s": 1.0})

    monkeypatch.setattr(kafka_wiring, "aio_reader", quick)
    with pytest.raises(KafkaServiceError, match="does not exist"):
        replay(gone, switch=False)
    assert not replay_threads()
