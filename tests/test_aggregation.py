"""Learner updates summed per batch (``aggregate_updates``, ``apply_item_batch.lua``, the
trending script's summed buckets) against the reference learners, on a real Redis.

Records from two source partitions, in any batching, with crashes that send any suffix again
from an earlier position (so a redelivered batch straddles watermarks): the Redis state
equals the reference learners fed each record once, to a relative 1e-12 (log-space sums
formed in another order round differently; they are not bit for bit equal). The segment bound
bites throughout; the neighbour bound (applied once per item per batch) is checked against the
reference fed the same batches.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Iterator

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streamrec.infra.keys import Keys
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.decay import log_add, log_sum_by
from streamrec.models.learners import (
    BanditConfig,
    BetaBandit,
    Feedback,
    Interaction,
    ItemCF,
    ItemCFConfig,
    Learners,
    Trending,
    Update,
    aggregate_updates,
)
from streamrec.models.session import SessionConfig
from tests.support import close
from tests.test_learners import feedbacks, interactions

ITEMS = [f"i{n}" for n in range(8)]
SOURCES = ["t:0", "t:1"]

# A record: its source and its facts (one click, or the feedback of one impression).
records = st.lists(
    st.tuples(st.sampled_from(SOURCES),
              st.one_of(interactions, st.lists(feedbacks, min_size=1, max_size=4))),
    min_size=1, max_size=40,
)


@pytest.fixture(scope="module")
def client(base_settings: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(base_settings.redis.url)
    yield c
    c.close()


def _store(client: redis.Redis, aggregate: bool, max_neighbours: int) -> StateStore:
    return StateStore(client, Keys(f"test{uuid.uuid4().hex[:8]}"), SessionConfig(),
                      cf=ItemCFConfig(max_neighbours=max_neighbours),
                      bandit=BanditConfig(max_segments=1), aggregate=aggregate)


def _reference(max_neighbours: int) -> Learners:
    return Learners(ItemCF(ItemCFConfig(max_neighbours=max_neighbours)), Trending(),
                    BetaBandit(BanditConfig(max_segments=1)))


def _with_offsets(stream: list[tuple[str, Any]]) -> list[tuple[str, int, Any]]:
    counters = dict.fromkeys(SOURCES, 0)
    out = []
    for source, fact in stream:
        out.append((source, counters[source], fact))
        counters[source] += 1
    return out


def _apply(store: StateStore, ns: Any, reference: Learners, batch: list[tuple[str, int, Any]]) -> None:
    """One batch through the store (as the processor sends it)."""
    groups: list[tuple[str, int, list[Update]]] = []
    trending = []
    for source, offset, fact in batch:
        if isinstance(fact, Interaction):
            groups.append((source, offset, reference.cf.updates(fact)))
            trending.append((source, offset, "c", fact.item, repr(reference.trending.contribution(fact))))
        else:
            groups.append((source, offset, [u for fb in fact for u in reference.bandit.updates(fb)]))
    store.apply_item_updates(ns, groups)
    store.apply_trending(ns, trending)


def _learn(reference: Learners, batch: list[tuple[str, int, Any]]) -> None:
    interactions_ = [fact for _, _, fact in batch if isinstance(fact, Interaction)]
    reference.cf.learn_many(interactions_)
    for fact in interactions_:
        reference.trending.learn_one(fact)
    for _, _, fact in batch:
        if not isinstance(fact, Interaction):
            for fb in fact:
                reference.bandit.learn_one(fb)


def _cleanup(store: StateStore) -> None:
    store.drop_everything()


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=records, data=st.data(), aggregate=st.booleans())
def test_summed_batches_with_redelivery_equal_the_reference(
    client: redis.Redis, stream: list[tuple[str, Any]], data: st.DataObject, aggregate: bool
) -> None:
    """Any batching, crashes after any batch that restart from any earlier position (so the
    redelivered batches straddle the watermarks in any way), two sources: equal to the
    reference fed each record once. Both paths (summed and one by one) are checked."""
    store = _store(client, aggregate, max_neighbours=100)  # no pair dropped: order-free sums
    ns = store.keys.ns("v1")
    reference = _reference(100)
    seq = _with_offsets(stream)
    learned = 0  # records the reference has learned (a prefix of seq)
    position, crashes = 0, 0
    try:
        while position < len(seq):
            size = data.draw(st.integers(1, 12), label="batch size")
            batch = seq[position : position + size]
            _apply(store, ns, reference, batch)
            if position + len(batch) > learned:
                _learn(reference, seq[learned : position + len(batch)])
                learned = position + len(batch)
            position += len(batch)
            if crashes < 4 and data.draw(st.booleans(), label="crash"):
                crashes += 1
                position = data.draw(st.integers(0, position), label="restart at")
        got = store.learner_snapshot("v1", ITEMS)
        assert close(got, reference.snapshot(), rel=1e-12)
    finally:
        _cleanup(store)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=records, cuts=st.lists(st.integers(1, 40), max_size=5), aggregate=st.booleans())
def test_the_neighbour_bound_is_applied_once_per_batch(
    client: redis.Redis, stream: list[tuple[str, Any]], cuts: list[int], aggregate: bool
) -> None:
    """With a bound of 2 neighbours on an 8-item alphabet, pairs are dropped all the time: the
    lists equal the reference's, which cuts each item's list once at the end of each batch."""
    store = _store(client, aggregate, max_neighbours=2)
    ns = store.keys.ns("v1")
    reference = _reference(2)
    seq = _with_offsets(stream)
    try:
        bounds = sorted({0, len(seq), *[c for c in cuts if c < len(seq)]})
        for lo, hi in zip(bounds, bounds[1:]):
            _apply(store, ns, reference, seq[lo:hi])
            _learn(reference, seq[lo:hi])
            _apply(store, ns, reference, seq[lo:hi])  # the same batch again: nothing changes
        got = store.learner_snapshot("v1", ITEMS)
        assert close(got, reference.snapshot(), rel=1e-12)
        assert all(len(row) <= 2 for row in got["item_cf"]["pairs"].values())
    finally:
        _cleanup(store)


def test_a_straddling_redelivery_is_applied_record_by_record(client: redis.Redis) -> None:
    """Records 0-9 applied, then 5-14 delivered as one batch: for an item every record touches,
    the summed group straddles its watermark, so the script leaves it to the record-by-record
    path, which applies exactly 10-14."""
    store = _store(client, True, max_neighbours=100)
    ns = store.keys.ns("v1")
    reference = _reference(100)
    t0 = 1_700_000_000_000
    seq = [("t:0", k, Interaction("u", "a", t0 + k * 1000, (("b", t0 + k * 1000 - 10),))) for k in range(15)]
    try:
        _apply(store, ns, reference, seq[:10])
        _learn(reference, seq[:10])
        calls: list[str] = []
        run = store._run_pipeline
        store._run_pipeline = lambda c: (calls.extend(x[0].sha for x in c), run(c))[1]  # type: ignore[method-assign]
        _apply(store, ns, reference, seq[5:])
        _learn(reference, seq[10:])
        assert store._item_facts.sha in calls  # the fallback ran
        assert close(store.learner_snapshot("v1", ["a", "b"]), reference.snapshot(), rel=1e-12)
        stats = client.hgetall(ns.item_stats("a"))
        assert stats[b"wm:t:0"] == b"14"
    finally:
        _cleanup(store)


@given(st.lists(st.tuples(st.integers(0, 5), st.floats(-1e3, 1e6)), min_size=1, max_size=50))
def test_log_sum_by_equals_the_sequential_fold(pairs: list[tuple[int, float]]) -> None:
    groups = np.array([g for g, _ in pairs])
    xs = np.array([x for _, x in pairs])
    got = log_sum_by(groups, xs, 6)
    for g in range(6):
        want = -math.inf
        for k, x in pairs:
            if k == g:
                want = log_add(want, x)
        assert got[g] == want if want == -math.inf else math.isclose(got[g], want, rel_tol=1e-13, abs_tol=1e-12)


def test_aggregate_updates_carries_offset_ranges_per_source() -> None:
    deltas = aggregate_updates([
        ("t:0", 3, [Update("a", "n", "", 1.0), Update("a", "p", "b", 2.0), Update("b", "p", "a", 2.0)]),
        ("t:1", 7, [Update("a", "b", "e|web", 0.5), Update("a", "n", "", 1.0)]),
        ("t:0", 9, [Update("a", "p", "b", 2.0)]),
    ])
    by_item = {d.item: d for d in deltas}
    assert [d.item for d in deltas] == ["a", "b"]
    assert by_item["a"].ranges == {"t:0": (3, 9), "t:1": (7, 7)}
    assert by_item["b"].ranges == {"t:0": (3, 3)}
    assert by_item["a"].fields == [("n", 2.0), ("e|web", 0.5)]  # 2**1 + 2**1 = 2**2
    assert by_item["a"].pairs == [("b", 3.0)]


@hsettings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_workers_summed_path_equals_summing_the_reference_updates(data: st.DataObject) -> None:
    """``Learners.summed`` (the worker's path, from the facts strings) equals
    ``aggregate_updates`` over the reference ``Learners.updates`` of each event: exactly equal
    (same floats, same order), and the same trending ops."""
    learners = Learners(ItemCF(ItemCFConfig(window=data.draw(st.integers(1, 6)))), Trending(),
                        BetaBandit(BanditConfig(eta=data.draw(st.sampled_from([0.0, 1.0, 1.7])))))
    events = []
    offsets = dict.fromkeys(SOURCES, 0)
    for _ in range(data.draw(st.integers(0, 30))):
        source = data.draw(st.sampled_from(SOURCES))
        offsets[source] += data.draw(st.integers(1, 3))
        item = data.draw(st.sampled_from(ITEMS))
        ts = data.draw(st.integers(1_700_000_000_000, 1_700_100_000_000))
        records = []
        if data.draw(st.booleans()):
            records.append("C")
            for j, tj in data.draw(st.lists(st.tuples(st.sampled_from(ITEMS), st.integers(1_699_000_000_000, 1_700_100_000_000)), max_size=7)):
                records.append(f"W\x1f{j}\x1f{tj}")
        for fb in data.draw(st.lists(feedbacks, max_size=4)):
            records.append(f"{'K' if fb.clicked else 'S'}\x1f{fb.item}\x1f{fb.position}\x1f{fb.ts}\x1f{fb.segment or ''}")
        facts = "\x1e".join(data.draw(st.permutations(records))) if records else data.draw(st.sampled_from(["", "D"]))
        events.append((source, offsets[source], "u", item, ts, facts))
    deltas, trending = learners.summed(events)
    groups, want_trending = [], []
    for source, offset, user, item, ts, facts in events:
        updates, trend = learners.updates(user, item, ts, facts)
        if updates:
            groups.append((source, offset, updates))
        if trend is not None:
            want_trending.append((source, offset, "c", item, repr(trend)))
    assert deltas == aggregate_updates(groups)
    assert trending == want_trending
