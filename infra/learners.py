"""The online learners backed by Redis, behind the same ``OnlineLearner`` protocol as the
reference implementations in ``models.learners``.

The worker does not go through these classes (it applies a whole batch of facts in a few
script calls, ``streams.processor``); they exist so that the Redis state machinery passes the
same contract suite as the reference learners, one fact at a time, and as a small API for
tools that want to feed facts directly.
"""

from __future__ import annotations

from typing import Any

from streamrec.infra.state import StateStore
from streamrec.models.learners import BetaBandit, Feedback, Interaction, ItemCF, Trending

SOURCE = "direct:0"  # the watermark source of facts fed through these classes


class _RedisLearner:
    name = "redis"

    def __init__(self, store: StateStore, namespace: str) -> None:
        self.store = store
        self.ns = store.keys.ns(namespace)
        self.offset = 0
        self.items: set[str] = set()

    def _next(self) -> int:
        self.offset += 1
        return self.offset


class RedisItemCF(_RedisLearner):
    name = "item_cf"

    def __init__(self, store: StateStore, namespace: str) -> None:
        super().__init__(store, namespace)
        self.reference = ItemCF(store.cf)  # only for its update rule

    def learn_one(self, fact: Interaction) -> None:
        updates = self.reference.updates(fact)
        self.items.update(u.item for u in updates)
        self.store.apply_item_updates(self.ns, [(SOURCE, self._next(), updates)])

    def snapshot(self) -> dict[str, Any]:
        state = self.store.learner_snapshot(self.ns.name, self.items)["item_cf"]
        return {"pairs": state["pairs"], "counts": state["counts"]}


class RedisTrending(_RedisLearner):
    name = "trending"

    def __init__(self, store: StateStore, namespace: str) -> None:
        super().__init__(store, namespace)
        self.reference = Trending(store.trending_config)

    def learn_one(self, fact: Interaction) -> None:
        x = self.reference.contribution(fact)
        self.store.apply_trending(self.ns, [(SOURCE, self._next(), "c", fact.item, repr(x))])

    def learn_item(self, item: str, category: str | None) -> None:
        self.store.apply_trending(self.ns, [(SOURCE, self._next(), "i", item, category or "")])

    def snapshot(self) -> dict[str, Any]:
        client, ns = self.store.client, self.ns
        scores = {m.decode(): float(v) for m, v in client.zrange(ns.trending(), 0, -1, withscores=True)}
        cats = sorted({v.decode() for k, v in client.hgetall(ns.trending_meta()).items()
                       if k.startswith(b"cat:")})
        by_category = {
            c: {m.decode(): float(v) for m, v in client.zrange(ns.trending(c), 0, -1, withscores=True)}
            for c in cats
        }
        return {"scores": scores, "by_category": by_category}


class RedisBandit(_RedisLearner):
    name = "bandit"

    def __init__(self, store: StateStore, namespace: str) -> None:
        super().__init__(store, namespace)
        self.reference = BetaBandit(store.bandit)

    def learn_one(self, fact: Feedback) -> None:
        self.items.add(fact.item)
        self.store.apply_item_updates(self.ns, [(SOURCE, self._next(), self.reference.updates(fact))])

    def snapshot(self) -> dict[str, Any]:
        arms = self.store.learner_snapshot(self.ns.name, self.items)["bandit"]
        return {arm: list(v) for arm, v in arms.items()}
