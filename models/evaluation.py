"""Prequential (test-then-train) evaluation over a click stream in event-time order.

``test_then_train`` is the loop, written once: before an event is learned, the recommenders
produce the list they would have served just then and it is scored against the event; only
then do the learners see it. The reference evaluator below (pure learners), the pipeline's
evaluator (``streams.evaluate``: Redis-backed learners) and the two-stage evaluator
(``serving.evaluate``: the whole serving pipeline) all run it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

from sortedcontainers import SortedList

from streamrec.models.decay import NEG_INF
from streamrec.models.events import Click
from streamrec.models.learners import Interaction, ItemCF, ItemCFConfig, Trending, TrendingConfig
from streamrec.models.metrics import hit_at, ndcg_at, reciprocal_rank

E = TypeVar("E")
Hook = tuple[int, Callable[[int], None]]  # (every N events, called with the count so far)


def test_then_train(events: Iterable[E], predict: Callable[[E], None], learn: Callable[[list[E]], None], *,
                    every: int = 1, batch: int = 1, hooks: Sequence[Hook] = ()) -> int:
    """The prequential loop: ``predict(e)`` for every ``every``-th event, always before
    ``learn`` has seen that event (or any later one); ``learn`` takes events in order, in
    batches of at most ``batch`` (learning is flushed before every prediction and hook).
    ``hooks``: ``(n, fn)`` calls ``fn(count)`` after every n-th event has been learned (curves,
    progress, retraining). Returns the number of events."""
    pending: list[E] = []
    count = 0
    for count, event in enumerate(events, 1):
        if (count - 1) % every == 0:
            if pending:
                learn(pending)
                pending = []
            predict(event)
        pending.append(event)
        due = [fn for period, fn in hooks if period and count % period == 0]
        if due or len(pending) >= batch:
            learn(pending)
            pending = []
        for fn in due:
            fn(count)
    if pending:
        learn(pending)
    return count


test_then_train.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever pytest thinks


def random_items(catalog: Sequence[str], k: int, exclude: set[str], rng: random.Random) -> list[str]:
    """Up to k distinct catalog items outside ``exclude``, drawn uniformly (4k draws at most)."""
    out: list[str] = []
    if not catalog:
        return out
    for _ in range(k * 4):
        item = catalog[rng.randrange(len(catalog))]
        if item not in exclude and item not in out:
            out.append(item)
            if len(out) == k:
                break
    return out


class Context(Protocol):
    """What a recommender may look at before a click."""

    user: str
    ts: int
    recent: Sequence[str]  # the user's clicked items, oldest first
    seen: set[str]


@dataclass
class _Context:
    user: str
    ts: int
    recent: Sequence[str]
    seen: set[str]


Recommender = Callable[[Context, int], list[str]]


@dataclass
class Scores:
    """Running sums of the metrics of one recommender."""

    n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    rr: float = 0.0
    recommended: set[str] = field(default_factory=set)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (clicks, hit@k, ndcg@k)

    def add(self, ranked: list[str], target: str, k: int) -> None:
        self.n += 1
        self.hits += hit_at(ranked, target, k)
        self.ndcg += ndcg_at(ranked, target, k)
        self.rr += reciprocal_rank(ranked, target)
        self.recommended.update(ranked[:k])

    def mark(self, clicks: int) -> None:
        """A point of the learning curve: the running Hit@k and NDCG@k after ``clicks``."""
        self.curve.append((clicks, self.hits / max(self.n, 1), self.ndcg / max(self.n, 1)))

    def summary(self, catalog_size: int) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            "hit_at_10": round(self.hits / n, 4),
            "ndcg_at_10": round(self.ndcg / n, 4),
            "mrr": round(self.rr / n, 4),
            "coverage": round(len(self.recommended) / max(catalog_size, 1), 4),
        }


class TrendingIndex:
    """Trending with an ordered index, so that the top of a 10k-item catalog is cheap."""

    def __init__(self, config: TrendingConfig) -> None:
        self.learner = Trending(config)
        self._order: SortedList = SortedList()

    def learn_one(self, fact: Interaction) -> None:
        old = self.learner.scores.get(fact.item, NEG_INF)
        if old != NEG_INF:
            self._order.remove((-old, fact.item))
        self.learner.learn_one(fact)
        self._order.add((-self.learner.scores[fact.item], fact.item))

    def top(self, n: int, exclude: set[str]) -> list[str]:
        out = []
        for _, item in self._order:
            if item not in exclude:
                out.append(item)
                if len(out) == n:
                    break
        return out


@dataclass
class Prequential:
    """The built-in recommenders over pure learners, evaluated test-then-train."""

    cf_config: ItemCFConfig = field(default_factory=ItemCFConfig)
    trending_config: TrendingConfig = field(default_factory=TrendingConfig)
    k: int = 10
    seed: int = 0
    curve_every: int = 5000

    def __post_init__(self) -> None:
        self.cf = ItemCF(self.cf_config)
        self.trending = TrendingIndex(self.trending_config)
        self.history: dict[str, list[tuple[str, int]]] = {}
        self.catalog: list[str] = []
        self._known: set[str] = set()
        self._rng = random.Random(self.seed)
        self.recommenders: dict[str, Recommender] = {
            "random": self._random,
            "trending": lambda ctx, k: self.trending.top(k, ctx.seen),
            "cf_recent": lambda ctx, k: self.cf.recommend(ctx.recent, k, ctx.seen),
        }
        self.scores = {name: Scores() for name in self.recommenders}

    def _random(self, ctx: Context, k: int) -> list[str]:
        return random_items(self.catalog, k, ctx.seen, self._rng)

    def run(self, clicks: Iterable[Click]) -> dict[str, dict[str, float]]:
        test_then_train(clicks, self.predict, self.learn, hooks=[(self.curve_every, self._mark)])
        return self.summary()

    def predict(self, click: Click) -> None:
        past = self.history.get(click.user, [])
        ctx = _Context(click.user, click.timestamp, [i for i, _ in past], {i for i, _ in past})
        for name, recommend in self.recommenders.items():
            self.scores[name].add(recommend(ctx, self.k), click.item, self.k)

    def learn(self, clicks: list[Click]) -> None:
        for click in clicks:
            past = self.history.setdefault(click.user, [])
            fact = Interaction(click.user, click.item, click.timestamp, tuple(past[-self.cf_config.window :]))
            self.cf.learn_one(fact)
            self.trending.learn_one(fact)
            past.append((click.item, click.timestamp))
            if click.item not in self._known:
                self._known.add(click.item)
                self.catalog.append(click.item)

    def _mark(self, n: int) -> None:
        for s in self.scores.values():
            s.mark(n)

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: s.summary(len(self.catalog)) for name, s in self.scores.items()}
