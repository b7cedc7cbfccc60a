"""The Redis apply script against the pure reference model, on a real Redis.

For any event sequence (out of order, duplicated ids, redelivered records), applying it in
any batching equals the batch recomputation; redelivering any suffix changes nothing. The
bounds bite here (a short join horizon, a short facts span, facts floors), so the pruning is
checked against the reference too.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streamrec.infra.keys import Keys
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore, trend_bucket
from streamrec.models.learners import Learners, OnlineLearner
from streamrec.models.session import (
    FACTS_DONE,
    SessionConfig,
    Status,
    UserEventRow,
    UserState,
    derive_meta,
)
from tests.support import close, expected_snapshot
from tests.test_learners import LEARNERS

# Event times span 1,000 ms: a join horizon of 300 + 200 ms forgets requests within a stream.
CONFIG = SessionConfig(max_length=8, gap_ms=100, dedupe_window=16, cf_window=3,
                       attribution_ms=300, max_requests=2, facts_span=4, join_lateness_ms=200)
USERS = ["a", "b", "c"]
ITEMS = ["x", "y", "z", "w"]


@st.composite
def streams(draw: st.DrawFn) -> list[UserEventRow]:
    """Rows in offset order: clicks (some answering a request), impressions with shown lists,
    some reusing an earlier event id (true duplicates)."""
    n = draw(st.integers(1, 60))
    rows: list[UserEventRow] = []
    for offset in range(n):
        user = draw(st.sampled_from(USERS))
        kind = draw(st.sampled_from(["c", "c", "c", "i"]))
        earlier = [r.event_id for r in rows if r.user == user]
        if earlier and draw(st.integers(0, 9)) == 0:
            event_id = draw(st.sampled_from(earlier))
        else:
            event_id = f"e{offset}"
        ts = draw(st.integers(1_000, 2_000))
        request = draw(st.sampled_from(["", "r1", "r2", "r3"])) if kind == "c" else draw(st.sampled_from(["r1", "r2", "r3"]))
        segment = draw(st.sampled_from(["", "web"]))
        if kind == "c":
            item = draw(st.sampled_from(ITEMS))
            rows.append(UserEventRow(user, kind, event_id, item, ts, offset, request, segment))
        else:
            shown = draw(st.lists(st.sampled_from(ITEMS), min_size=1, max_size=3, unique=True))
            rows.append(UserEventRow(user, kind, event_id, "", ts, offset, request, segment,
                                     tuple((i, p) for p, i in enumerate(shown))))
    return rows


@pytest.fixture(scope="module")
def module_store(base_settings: Settings) -> Iterator[StateStore]:
    client = redis.Redis.from_url(base_settings.redis.url)
    store = StateStore(client, Keys(f"test{uuid.uuid4().hex[:8]}"), CONFIG)
    yield store
    store.drop_everything()


def _fresh_ns(store: StateStore) -> str:
    return f"p{uuid.uuid4().hex[:12]}"


def _drop(store: StateStore, name: str) -> None:
    ns = store.keys.ns(name)
    store.client.delete(*[k for u in USERS for k in ns.user_keys(u)])


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=streams(), cuts=st.lists(st.integers(1, 60), max_size=5), per_user=st.booleans())
def test_script_equals_batch_recomputation(module_store: StateStore, rows: list[UserEventRow],
                                           cuts: list[int], per_user: bool) -> None:
    module_store.per_user_calls = per_user
    name = _fresh_ns(module_store)
    ns = module_store.keys.ns(name)
    try:
        bounds = sorted({0, len(rows), *[c for c in cuts if c < len(rows)]})
        statuses = []
        for lo, hi in zip(bounds, bounds[1:]):
            statuses += module_store.apply_user_events(ns, rows[lo:hi])
        assert module_store.snapshot(name, USERS) == expected_snapshot(rows, CONFIG)

        # The reference model's per-event statuses and learner facts match the script's.
        states: dict[str, UserState] = {}
        for row, (status, first, facts) in zip(rows, statuses):
            state = states.setdefault(row.user, UserState(CONFIG))
            got = state.apply(row.kind, row.event_id, row.item, row.ts, row.offset,
                              row.request_id, row.segment, row.shown)
            assert (got, state.last_facts) == ((status, first), facts)

        # Redelivering a suffix (a crash before offsets were committed) gives the statuses and
        # facts the model gives: no-ops inside the dedupe window, and the state still equals
        # the model's.
        start = max(0, len(rows) - CONFIG.dedupe_window // 2)
        again = module_store.apply_user_events(ns, rows[start:])
        for row, (status, first, facts) in zip(rows[start:], again):
            state = states[row.user]
            got = state.apply(row.kind, row.event_id, row.item, row.ts, row.offset,
                              row.request_id, row.segment, row.shown)
            assert (got, state.last_facts) == ((status, first), facts)
        want = {u: {"entries": st_.entries(), "meta": st_.meta(), "clicks": st_.clicks}
                for u, st_ in states.items() if st_.seq}
        assert module_store.snapshot(name, USERS) == want
    finally:
        _drop(module_store, name)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=streams(), data=st.data())
def test_order_of_arrival_does_not_matter_without_duplicates(
    module_store: StateStore, rows: list[UserEventRow], data: st.DataObject
) -> None:
    """Two writers (live worker and replay) may apply the same records in different orders."""
    unique = {(r.user, r.event_id): r for r in reversed(rows)}  # first occurrence of each id
    rows = sorted(unique.values(), key=lambda r: r.offset)
    shuffled = data.draw(st.permutations(rows))
    name = _fresh_ns(module_store)
    try:
        ns = module_store.keys.ns(name)
        for row in shuffled:
            module_store.apply_user_events(ns, [row])
        got = module_store.snapshot(name, USERS)
        want = expected_snapshot(rows, CONFIG)
        assert {u: (v["entries"], v["meta"]) for u, v in got.items()} == {
            u: (v["entries"], v["meta"]) for u, v in want.items()
        }
    finally:
        _drop(module_store, name)


def test_superseded_duplicate_keeps_the_earliest_offset(module_store: StateStore) -> None:
    """If a later duplicate was applied first, the earlier record replaces it."""
    name = _fresh_ns(module_store)
    ns = module_store.keys.ns(name)
    try:
        late = UserEventRow("u", "c", "e1", "late", 1500, 9)
        early = UserEventRow("u", "c", "e1", "early", 1000, 3)
        assert module_store.apply_user_events(ns, [late])[0][:2] == (Status.APPLIED, 9)
        assert module_store.apply_user_events(ns, [early])[0][:2] == (Status.SUPERSEDED, 9)
        view = module_store.session_view("u", name)
        assert [e.item for e in view.entries] == ["early"]
        assert view.clicks == 1
    finally:
        _drop(module_store, name)


def test_session_meta_follows_the_gap() -> None:
    from streamrec.models.session import Entry
    entries = [Entry("a", 0, "1"), Entry("b", 50, "2"), Entry("c", 500, "3"), Entry("d", 580, "4")]
    meta = derive_meta(entries, gap_ms=100)
    assert (meta.last_ts, meta.session_start, meta.session_len) == (580, 500, 2)
    assert derive_meta(entries, gap_ms=1000).session_len == 4


def test_an_id_back_after_leaving_the_window_does_not_lengthen_the_session(module_store: StateStore) -> None:
    """The same click (item, time, id) applied again once its id left the dedupe window."""
    name = _fresh_ns(module_store)
    ns = module_store.keys.ns(name)
    try:
        rows = [UserEventRow("a", "c", "p", "x", 1000, 0), UserEventRow("a", "c", "X", "y", 2000, 1)]
        rows += [UserEventRow("a", "i", f"imp{n}", "", 2000, 2 + n) for n in range(CONFIG.dedupe_window + 2)]
        rows.append(UserEventRow("a", "c", "X", "y", 2000, 100))
        for row in rows:
            module_store.apply_user_events(ns, [row])
        assert module_store.snapshot(name, USERS) == expected_snapshot(rows, CONFIG)
        assert module_store.session_view("a", name).meta.session_len == 1
    finally:
        _drop(module_store, name)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=streams(), cuts=st.lists(st.integers(1, 60), max_size=4))
def test_learner_state_in_redis_equals_the_reference_learners(
    module_store: StateStore, rows: list[UserEventRow], cuts: list[int]
) -> None:
    """Facts from the user script, applied to item-level state by the learner scripts in any
    batching, with every batch delivered twice, equal the pure learners fed the same facts.
    (The dedupe window here exceeds the stream, so no id can come back as new: that limit is
    the session state's, tested above.)"""
    import dataclasses
    module_store = StateStore(module_store.client, module_store.keys,
                              dataclasses.replace(CONFIG, dedupe_window=64))
    name = _fresh_ns(module_store)
    ns = module_store.keys.ns(name)
    reference = Learners()
    learners = Learners()
    learned_up_to = -1  # the reference's watermark: what the item scripts do per source
    try:
        bounds = sorted({0, len(rows), *[c for c in cuts if c < len(rows)]})
        for lo, hi in zip(bounds, bounds[1:]):
            batch = rows[lo:hi]
            for attempt in range(2):  # the second attempt is a redelivery
                results = module_store.apply_user_events(ns, batch)
                groups, trending = [], []
                for row, (status, _, facts) in zip(batch, results):
                    if status in (Status.APPLIED, Status.REDELIVERED) and facts:
                        updates, trend = learners.updates(row.user, row.item, row.ts, facts)
                        groups.append(("t:0", row.offset, updates))
                        if trend is not None:
                            trending.append(("t:0", row.offset, "c", row.item, repr(trend)))
                        if row.offset > learned_up_to:
                            reference.learn_facts(row.user, row.item, row.ts, facts)
                            learned_up_to = row.offset
                module_store.apply_item_updates(ns, groups)
                module_store.apply_trending(ns, trending)
        got = module_store.learner_snapshot(name, ITEMS)
        want = reference.snapshot()
        assert close(got, want, rel=1e-12)
    finally:
        _drop(module_store, name)
        module_store.client.delete(*[k for i in ITEMS for k in (ns.item_neighbours(i), ns.item_stats(i))],
                                   ns.trending(), ns.trending_meta())


@hsettings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=streams(), data=st.data(), per_user=st.booleans())
def test_facts_floor_keeps_what_redelivery_needs(module_store: StateStore, rows: list[UserEventRow],
                                                 data: st.DataObject, per_user: bool) -> None:
    """One partition through a worker that crashes at any step of a batch (after the user
    script, after the item updates, after trending, after recording progress) and restarts
    from any committed offset at or below its progress. Each batch passes the progress as it
    was before it as the facts floor. The script's statuses and facts equal the reference
    model's under the same floors; records redelivered below the floor yield FACTS_DONE; the
    learner state equals the reference learners fed each record once; the session equals the
    batch recomputation; and no more facts are kept than the last batch needs."""
    import dataclasses
    module_store = StateStore(module_store.client, module_store.keys,
                              dataclasses.replace(CONFIG, dedupe_window=64, facts_span=100_000),
                              per_user_calls=per_user)
    config = module_store.session
    name = _fresh_ns(module_store)
    ns = module_store.keys.ns(name)
    states: dict[str, UserState] = {}
    reference, learners = Learners(), Learners()
    progress = committed = position = 0
    crashes = 0
    last_floor: dict[str, int] = {}
    try:
        while position < len(rows):
            size = data.draw(st.integers(1, 12), label="batch size")
            batch = rows[position : position + size]
            floor = progress
            last_floor.update((row.user, floor) for row in batch)
            # the step after which the worker dies (None: it does not)
            crash = data.draw(st.sampled_from([None, None, 0, 1, 2, 3]), label="crash") if crashes < 4 else None
            results = module_store.apply_user_events(ns, batch, [floor] * len(batch))
            groups, trending = [], []
            for row, (status, first, facts) in zip(batch, results):
                state = states.setdefault(row.user, UserState(config))
                got = state.apply(row.kind, row.event_id, row.item, row.ts, row.offset,
                                  row.request_id, row.segment, row.shown, facts_floor=floor)
                assert (got, state.last_facts) == ((status, first), facts)
                if status is Status.REDELIVERED:
                    # below the floor nothing is needed again; at or above it, the facts are kept
                    assert facts == FACTS_DONE if row.offset < floor else facts not in ("", FACTS_DONE)
                if status is Status.APPLIED:
                    reference.learn_facts(row.user, row.item, row.ts, facts)
                if status in (Status.APPLIED, Status.REDELIVERED) and facts:
                    updates, trend = learners.updates(row.user, row.item, row.ts, facts)
                    groups.append(("t:0", row.offset, updates))
                    if trend is not None:
                        trending.append(("t:0", row.offset, "c", row.item, repr(trend)))
            done = 3 if crash is None else crash  # the steps after the user script that ran
            if done >= 1:
                module_store.apply_item_updates(ns, groups)
            if done >= 2:
                module_store.apply_trending(ns, trending)
            if done >= 3:
                progress = max(progress, batch[-1].offset + 1)
            if crash is None:
                position += len(batch)
                committed = data.draw(st.integers(committed, position), label="committed")
            else:  # restart from the committed offset: everything after it comes again
                crashes += 1
                position = committed
        assert module_store.snapshot(name, USERS) == expected_snapshot(rows, config)
        assert close(module_store.learner_snapshot(name, ITEMS), reference.snapshot(), rel=1e-12)
        # The facts kept are the reference's, none below the floor of the user's last batch.
        for user, state in states.items():
            kept = {int(score) for _, score in module_store.client.zrange(ns.facts(user), 0, -1, withscores=True)}
            assert kept == set(state.factlog)
            assert all(offset >= last_floor[user] for offset in kept)
    finally:
        _drop(module_store, name)
        module_store.client.delete(*[k for i in ITEMS for k in (ns.item_neighbours(i), ns.item_stats(i))],
                                   ns.trending(), ns.trending_meta())


# -- the Redis-backed learners pass the learners' contract ----------------------------------------


def _redis_learner(store: StateStore, kind: str) -> Any:
    from streamrec.infra.learners import RedisBandit, RedisItemCF, RedisTrending
    name = _fresh_ns(store)
    return {"item_cf": RedisItemCF, "trending": RedisTrending, "bandit": RedisBandit}[kind](store, name)


@pytest.mark.parametrize("kind", ["item_cf", "trending", "bandit"])
@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_redis_learners_follow_the_contract_and_equal_the_reference(
    module_store: StateStore, kind: str, data: st.DataObject
) -> None:
    make, facts = LEARNERS[kind]
    stream = data.draw(st.lists(facts, max_size=20))
    shuffled = data.draw(st.permutations(stream))
    store = StateStore(module_store.client, module_store.keys, CONFIG, cf=make().config
                       if kind == "item_cf" else module_store.cf)
    a, b = _redis_learner(store, kind), _redis_learner(store, kind)
    reference = make()
    assert isinstance(a, OnlineLearner) and a.name == reference.name
    try:
        for fact in stream:
            a.learn_one(fact)
            reference.learn_one(fact)
        for fact in shuffled:
            b.learn_one(fact)
        if kind == "trending" and stream:  # a catalog record after the clicks, as the worker sends
            a.learn_item(stream[0].item, "c1")
            b.learn_item(stream[0].item, "c1")
            reference.learn_item(stream[0].item, "c1")
        assert close(a.snapshot(), reference.snapshot(), rel=1e-12)
        assert close(b.snapshot(), a.snapshot(), rel=1e-9)
    finally:
        for learner in (a, b):
            keys = list(store.client.scan_iter(match=learner.ns.pattern(), count=1000))
            if keys:
                store.client.delete(*keys)


def test_the_trending_script_writes_no_key_it_was_not_given(module_store: StateStore) -> None:
    """Every key a script writes is passed in KEYS (Redis Cluster routes by them): the
    trending script, missing the set of a category it would touch, names it and writes
    nothing; ``apply_trending`` then calls it again with that key."""
    store = module_store
    ns = store.keys.ns(_fresh_ns(store))
    assert store.apply_trending(ns, [("s:0", 1, "i", "a", "cat1"), ("s:0", 2, "c", "a", "1.0")]) == 2
    before = {k: store.client.dump(k) for k in (ns.trending(), ns.trending_meta(), ns.trending("cat1"))}
    assert store.client.zscore(ns.trending("cat1"), "a") == 1.0
    # the item's current category is cat1, whose set is not among the keys: nothing is written
    cap = store.trending_config.max_items
    bucket = trend_bucket("a")
    reply = store._trending(keys=[ns.trending(), ns.trending_meta()],
                            args=[cap, 0, 1, "s:0", 3, "c", "a", "2.0", bucket, 0])
    assert reply == [b"missing", b"cat1"]
    # the same through a summed group of the item's bucket
    reply = store._trending(keys=[ns.trending(), ns.trending_meta()],
                            args=[cap, 0, 0, 1, bucket, 1, 1, "s:0", 3, 3, 1, "a", "2.0"])
    assert reply == [b"missing", b"cat1"]
    reply = store._trending(keys=[ns.trending(), ns.trending_meta(), ns.trending("cat1")],
                            args=[cap, 1, "cat1", 1, "s:0", 3, "i", "a", "cat2", bucket, 0])  # moving it to cat2
    assert reply == [b"missing", b"cat2"]
    assert {k: store.client.dump(k) for k in before} == before
    # through the store the keys are found: the click lands in the item's category
    assert store.apply_trending(ns, [("s:0", 3, "i", "a", "cat2"), ("s:0", 4, "c", "a", "2.0")]) == 2
    assert store.client.zcard(ns.trending("cat1")) == 0
    assert store.client.zscore(ns.trending("cat2"), "a") == store.client.zscore(ns.trending(), "a") > 2.0
