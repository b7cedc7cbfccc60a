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
from streamrec.models import synthetic
from streamrec.models.events import Click, Item
from streamrec.serving import sources
from streamrec.serving.engine import Engine, ModelSet, Request
from streamrec.serving.reads import SharedReads
from streamrec.serving.sources import REGISTRY, Batch, Retrieved, SourceContext
from streamrec.serving.trainer import fit_seq, sequences_of
from streamrec.streams.evaluate import Feeder

NAMESPACE = "src"


@pytest.fixture(scope="module")
def world(base_settings: Settings) -> Iterator[dict[str, Any]]:
    s = base_settings.model_copy(update={
        "redis": base_settings.redis.model_copy(update={"prefix": f"test{uuid.uuid4().hex[:10]}"}),
        "serving": base_settings.serving.model_copy(update={"stats_ttl_s": 0.0, "explore_pool": 60}),
        "trainer": base_settings.trainer.model_copy(update={"seq_epochs": 3, "seq_dim": 8, "seq_max_len": 10}),
    })
    config = synthetic.SyntheticConfig(n_users=40, n_items=150, seed=3)
    catalog = synthetic.catalog(config)
    events = list(synthetic.events(config, 2500))
    store = StateStore.from_settings(s)
    feeder = Feeder(s, store, NAMESPACE)
    # items nobody has clicked or been shown yet (cold start), the newest of the catalog
    last = max(e.timestamp for e in events)
    cold = [Item(id=f"cold-{n}", timestamp=last, item=f"cold-{n}", title=f"new arrival {n}",
                 tags=["new"], created_at=last - 1000 + n) for n in range(3)]
    catalog = [*catalog, *cold]
    feeder.items(catalog)
    feeder.clicks(events)  # clicks and impressions
    clicks = [e for e in events if isinstance(e, Click)]
    seq, index, content = fit_seq(s, sequences_of(clicks))
    models = ModelSet(seq=seq, index=index, content=content, seq_version="test")
    known = {i.item for i in catalog} | {c.item for c in clicks}
    try:
        yield {"settings": s, "store": store, "models": models, "known": known, "clicks": clicks}
    finally:
        store.drop_everything()


def make_batch(world: dict[str, Any], users: list[str | None]) -> Batch:
    store: StateStore = world["store"]
    ns = store.keys.ns(NAMESPACE)
    named = [u for u in users if u is not None]
    views = dict(zip(named, store.session_views(named, NAMESPACE)))
    histories = [[e.item for e in views[u].entries] if u is not None else [] for u in users]
    clock = max(c.timestamp for c in world["clicks"])
    as_of = [views[u].entries[-1].ts if u is not None and views[u].entries else clock for u in users]
    return Batch(ns, users, histories, [set(h) for h in histories], as_of, world["models"])


def make_source(world: dict[str, Any], name: str, seed: int = 0) -> Any:
    s: Settings = world["settings"]
    store: StateStore = world["store"]
    recstore = RecStore(store, s.kafka.partitions)
    context = SourceContext(s, store, recstore, SharedReads(recstore, s.serving, seed), np.random.default_rng(seed))
    return REGISTRY[name](context)


def active_users(world: dict[str, Any], n: int = 6) -> list[str]:
    return sorted({c.user for c in world["clicks"]})[:n]


@pytest.fixture(params=sorted(REGISTRY))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_answers_one_list_per_user_under_the_contract(world: dict[str, Any], name: str) -> None:
    users: list[str | None] = [*active_users(world), "nobody-ever", None]
    batch = make_batch(world, users)
    limit = 15
    got = make_source(world, name).retrieve(batch, limit)
    assert len(got) == len(users)
    for user, seen, found in zip(users, batch.seen, got):
        assert isinstance(found, Retrieved)
        assert found.items.dtype == object and found.scores.dtype == np.float64
        assert len(found.items) == len(found.scores) <= limit
        items = list(found.items)
        assert all(isinstance(i, str) for i in items)
        assert len(set(items)) == len(items), (user, items)  # no duplicates
        assert not set(items) & seen, user  # never an item the user clicked
        assert set(items) <= world["known"]
        assert all(math.isfinite(x) for x in found.scores)
        assert np.all(np.diff(found.scores) <= 0), (user, found.scores)  # best first
    # every source has something for users with a history (the state is rich enough)
    assert all(len(found.items) > 0 for found in got[: len(active_users(world))]), name


def test_limit_zero_and_an_empty_batch_give_nothing(world: dict[str, Any], name: str) -> None:
    source = make_source(world, name)
    batch = make_batch(world, [*active_users(world, 3), None])
    assert all(len(found.items) == 0 for found in source.retrieve(batch, 0))
    assert source.retrieve(make_batch(world, []), 10) == []


def test_same_batch_and_seed_give_the_same_answer_and_a_smaller_limit_a_subset(
    world: dict[str, Any], name: str
) -> None:
    batch = make_batch(world, [*active_users(world), None])
    one = make_source(world, name, seed=7).retrieve(batch, 12)
    two = make_source(world, name, seed=7).retrieve(batch, 12)
    assert [list(f.items) for f in one] == [list(f.items) for f in two]
    assert [f.scores.tolist() for f in one] == [f.scores.tolist() for f in two]
    small = make_source(world, name, seed=7).retrieve(batch, 4)
    for a, b in zip(small, one):
        assert len(a.items) <= 4 and set(a.items) <= set(b.items)


def test_exploration_always_proposes_the_newest_item_without_evidence(world: dict[str, Any]) -> None:
    batch = make_batch(world, [*active_users(world), None])
    for found in make_source(world, "explore").retrieve(batch, 3):
        assert "cold-2" in list(found.items)


def test_every_source_has_a_limit_setting(world: dict[str, Any], name: str) -> None:
    limit = REGISTRY[name].limit(world["settings"])
    assert isinstance(limit, int) and limit > 0


class _Newest:
    """A retriever written for this test: the newest catalog items."""

    name = "newest"

    def __init__(self, context: SourceContext) -> None:
        self.recstore = context.recstore

    @staticmethod
    def limit(settings: Settings) -> int:
        return 5

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        rows = self.recstore.newest_items(limit + 200, batch.ns)
        return [sources.base.drop_seen([i for i, _ in rows], np.array([float(t) for _, t in rows]), seen, limit)
                for seen in batch.seen]


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
