"""The one contract every candidate source follows (``serving/sources/base.py``), run on every
registered source against real Redis state: synthetic clicks, impressions and catalog records
applied through the worker's processor, and a small trained sequence model.

A new source passes this suite by being registered; the last test shows that registering one
is all the engine needs.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Iterator

import numpy as np
import pytest

from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.learners import neighbour_scores
from streamrec.serving.engine import Engine, ModelSet, Request
from streamrec.serving.reads import SharedReads
from streamrec.serving.sources import REGISTRY, Batch, Retrieved, SourceContext, same_for_all
from streamrec.serving.sources.cf import blend
from tests.support import synthetic_world

NAMESPACE = "src"


@pytest.fixture(scope="module")
def world(base_settings: Settings) -> Iterator[dict[str, Any]]:
    s = base_settings.model_copy(update={
        "redis": base_settings.redis.model_copy(update={"prefix": f"test{uuid.uuid4().hex[:10]}"}),
        "serving": base_settings.serving.model_copy(update={"stats_ttl_s": 0.0, "neighbours_ttl_s": 0.0, "explore_pool": 60}),
        "trainer": base_settings.trainer.model_copy(update={"seq_epochs": 3, "seq_dim": 8, "seq_max_len": 10}),
    })
    w = synthetic_world(s, NAMESPACE, n_items=150, seed=3, n_events=2500)
    store, catalog, clicks = w["store"], w["catalog"], w["clicks"]
    seq, index, content = w["seq"], w["index"], w["content"]
    models = ModelSet(seq=seq, index=index, content=content, seq_version="test", retrieval=w["retrieval"])
    known = {i.item for i in catalog} | {c.item for c in clicks}
    try:
        yield {"settings": s, "store": store, "models": models, "known": known, "clicks": clicks}
    finally:
        store.drop_everything()


def make_reads(world: dict[str, Any], seed: int = 0) -> SharedReads:
    s: Settings = world["settings"]
    return SharedReads(RecStore(world["store"], s.kafka.partitions), s.serving, seed)


def make_batch(world: dict[str, Any], users: list[str | None], reads: SharedReads) -> Batch:
    """A batch as the engine builds it, from the sessions in Redis (read the way ``Engine``
    does not: through ``StateStore.session_views``, the readers' path)."""
    store: StateStore = world["store"]
    ns = store.keys.ns(NAMESPACE)
    named = [u for u in users if u is not None]
    views = dict(zip(named, store.session_views(named, NAMESPACE)))
    histories = [reads.items.rows([e.item for e in views[u].entries]) if u is not None else np.zeros(0, np.int64)
                 for u in users]
    clock = max(c.timestamp for c in world["clicks"])
    as_of = [views[u].entries[-1].ts if u is not None and views[u].entries else clock for u in users]
    return Batch(ns, users, histories, np.array(as_of), world["models"])


def make_source(world: dict[str, Any], name: str, reads: SharedReads, seed: int = 0) -> Any:
    s: Settings = world["settings"]
    store: StateStore = world["store"]
    context = SourceContext(s, store, reads.recstore, reads, np.random.default_rng(seed))
    return REGISTRY[name](context)


def active_users(world: dict[str, Any], n: int = 6) -> list[str]:
    return sorted({c.user for c in world["clicks"]})[:n]


@pytest.fixture(params=sorted(REGISTRY))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_answers_one_list_per_user_under_the_contract(world: dict[str, Any], name: str) -> None:
    users: list[str | None] = [*active_users(world), "nobody-ever", None]
    reads = make_reads(world)
    batch = make_batch(world, users, reads)
    limit = 15
    got = make_source(world, name, reads).retrieve(batch, limit)
    assert len(got) == len(users)
    for user, history, found in zip(users, batch.histories, got):
        assert isinstance(found, Retrieved)
        assert found.rows.dtype == np.int64 and found.scores.dtype == np.float64
        assert len(found.rows) == len(found.scores) <= limit
        assert ((found.rows >= 0) & (found.rows < len(reads.items))).all()
        items = reads.items.ids[found.rows].tolist()
        assert all(isinstance(i, str) for i in items)
        assert len(set(items)) == len(items), (user, items)  # no duplicates
        assert not set(items) & set(reads.items.ids[history].tolist()), user  # never an item the user clicked
        assert set(items) <= world["known"]
        assert all(math.isfinite(x) for x in found.scores)
        assert np.all(np.diff(found.scores) <= 0), (user, found.scores)  # best first
    # every source has something for users with a history (the state is rich enough)
    assert all(len(found.rows) > 0 for found in got[: len(active_users(world))]), name


def test_limit_zero_and_an_empty_batch_give_nothing(world: dict[str, Any], name: str) -> None:
    reads = make_reads(world)
    source = make_source(world, name, reads)
    batch = make_batch(world, [*active_users(world, 3), None], reads)
    assert all(len(found.rows) == 0 for found in source.retrieve(batch, 0))
    assert source.retrieve(make_batch(world, [], reads), 10) == []


def test_same_batch_and_seed_give_the_same_answer_and_a_smaller_limit_a_subset(
    world: dict[str, Any], name: str
) -> None:
    def answer(seed: int, limit: int) -> list[tuple[list[str], list[float]]]:
        reads = make_reads(world, seed)  # a fresh worker: its own rows, the same items
        batch = make_batch(world, [*active_users(world), None], reads)
        got = make_source(world, name, reads, seed=seed).retrieve(batch, limit)
        return [(reads.items.ids[f.rows].tolist(), f.scores.tolist()) for f in got]

    one, two = answer(7, 12), answer(7, 12)
    assert one == two
    for (a, _), (b, _) in zip(answer(7, 4), one):
        assert len(a) <= 4 and set(a) <= set(b)


def test_exploration_always_proposes_the_newest_item_without_evidence(world: dict[str, Any]) -> None:
    reads = make_reads(world)
    batch = make_batch(world, [*active_users(world), None], reads)
    for found in make_source(world, "explore", reads).retrieve(batch, 3):
        assert "cold-2" in reads.items.ids[found.rows].tolist()


def test_cf_blend_equals_the_reference_learner(world: dict[str, Any]) -> None:
    """The batch blend on item rows equals ``models.learners.neighbour_scores`` (per user, on
    item ids, with the similarities the reference formula gives): same items, same order
    (ties by item id), same scores."""
    reads = make_reads(world)
    users = active_users(world, 12)
    batch = make_batch(world, users, reads)
    limit = 1000  # everything: the order of the whole list is compared
    got = make_source(world, "cf", reads).retrieve(batch, limit)
    recent = world["settings"].serving.recent
    for user, history, found in zip(users, batch.histories, got):
        rows = []
        for item in reads.items.ids[history[-recent:][::-1]].tolist():  # newest first
            per_item = max(50, limit // 2)  # what the source asks for
            nbr, sims = reads.neighbours.get(reads.items.rows([item]).tolist(), per_item, batch.ns, batch.now)[
                reads.items.index[item]]
            rows.append((reads.items.ids[nbr].tolist(), sims))
        items, scores = neighbour_scores(rows)
        seen = set(reads.items.ids[history].tolist())
        keep = [j for j, it in enumerate(items) if it not in seen]
        assert reads.items.ids[found.rows].tolist() == [items[j] for j in keep], user
        assert np.array_equal(found.scores, scores[keep]), user


def test_cf_blend_orders_ties_by_item_id() -> None:
    ids = np.array(["b", "a", "d", "c"], dtype=object)
    users = np.array([0, 0, 0, 0, 1, 1], dtype=np.int64)
    rows = np.array([0, 1, 2, 3, 0, 1], dtype=np.int64)
    weights = np.array([0.5, 0.5, 0.25, 0.5, 0.1, 0.1])
    owner, item, scores = blend(users, rows, weights, ids)
    assert owner.tolist() == [0, 0, 0, 0, 1, 1]
    assert ids[item].tolist() == ["a", "b", "c", "d", "a", "b"]
    assert scores.tolist() == [0.5, 0.5, 0.5, 0.25, 0.1, 0.1]


@pytest.mark.parametrize("per_user", [False, True], ids=["one-script", "per-key-calls"])
def test_neighbour_similarities_are_the_reference_formula(world: dict[str, Any], per_user: bool) -> None:
    """What the neighbour cache keeps is ``cosine_similarity`` of the sums in Redis, the same
    as the state's own reads (``StateStore.similar_items``), whether read by one script or by
    one call per key (Redis Cluster)."""
    store: StateStore = world["store"]
    store.per_user_calls = per_user
    try:
        reads = make_reads(world)
        ns = store.keys.ns(NAMESPACE)
        item = world["clicks"][-1].item
        row = int(reads.items.rows([item])[0])
        nbr, sims = reads.neighbours.get([row], 1000, ns, 0.0)[row]
        created = reads.items.created[nbr]
    finally:
        store.per_user_calls = False
    expected = dict(store.similar_items(item, 1000, NAMESPACE))
    assert len(nbr) > 0
    assert dict(zip(reads.items.ids[nbr].tolist(), sims.tolist())) == pytest.approx(expected, rel=1e-12)
    assert not np.isnan(created).all()  # the neighbours' catalog records came along


def test_the_neighbour_cache_stays_bounded_and_answers_the_same(world: dict[str, Any]) -> None:
    reads = make_reads(world)
    ns = world["store"].keys.ns(NAMESPACE)
    cache = reads.neighbours
    cache.max_items = 3
    rows = [int(r) for r in reads.items.rows(sorted({c.item for c in world["clicks"]})[:12])]
    first = {r: v for r, v in cache.get(rows[:6], 100, ns, 0.0).items()}
    for k in range(6, 12):  # past the bound: expired lists are dropped, then all
        cache.get(rows[k : k + 1], 100, ns, 10.0 + k)
        assert len(cache._rows) <= cache.max_items + 1
    again = cache.get(rows[:6], 100, ns, 100.0)  # read again from Redis: the same lists
    for r in rows[:6]:
        assert np.array_equal(first[r][0], again[r][0]) and np.array_equal(first[r][1], again[r][1])


def test_every_source_has_a_limit_setting(world: dict[str, Any], name: str) -> None:
    limit = REGISTRY[name].limit(world["settings"])
    assert isinstance(limit, int) and limit > 0


class _Newest:
    """A retriever written for this test: the newest catalog items."""

    name = "newest"

    def __init__(self, context: SourceContext) -> None:
        self.recstore = context.recstore
        self.items = context.reads.items

    @staticmethod
    def limit(settings: Settings) -> int:
        return 5

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        newest = self.recstore.newest_items(limit + 200, batch.ns)
        rows = self.items.rows([i for i, _ in newest])
        return same_for_all(batch, rows, np.array([float(t) for _, t in newest]), limit)


def test_a_registered_source_is_all_the_engine_needs(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, _Newest.name, _Newest)
    s: Settings = world["settings"]
    s = s.model_copy(update={"serving": s.serving.model_copy(update={"sources": ["newest", "trend"], "k": 30,
                                                                      "explore_slots": 0})})
    store: StateStore = world["store"]
    engine = Engine(s, store, RecStore(store, s.kafka.partitions), world["models"])
    user = active_users(world, 1)[0]
    (served,) = engine.refresh([Request(user)], store.keys.ns(NAMESPACE))
    assert list(engine.sources) == ["newest", "trend"]
    assert any("newest" in src.split("+") for src in served.sources)
    assert {src for s_ in served.sources for src in s_.split("+")} <= {"newest", "trend"}
    with pytest.raises(Exception, match="unknown candidate source"):
        Engine(s.model_copy(update={"serving": s.serving.model_copy(update={"sources": ["nope"]})}),
               store, RecStore(store, s.kafka.partitions))
