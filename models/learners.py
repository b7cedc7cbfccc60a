"""Online learners as pure functions of the event stream (the reference implementations).

Every learner follows one protocol (river's style): ``learn_one(fact)`` folds one derived fact
into the state, reads never change it, and ``snapshot()`` returns the state in a canonical
form for comparisons. The Redis-backed learners must equal these.

Facts are derived from events by the pipeline:

* ``Interaction``: a click, with the user's recent items *before* it (from the session state)
  and the item's category when the catalog knows it.
* ``Feedback``: one shown item of an impression (``clicked=False``), or the click that an
  impression's item received within the attribution window (``clicked=True``).

All decayed quantities use forward decay (``models.decay``): sums that commute, so the state
does not depend on the order in which facts arrive, only on which facts arrived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from models.decay import NEG_INF, contribution, log_add, value_at

DAY_MS = 86_400_000


class Interaction(NamedTuple):
    user: str
    item: str
    ts: int  # event time, ms
    recent: tuple[tuple[str, int], ...] = ()  # (item, ts) clicked before, most recent last
    category: str | None = None


class Feedback(NamedTuple):
    item: str
    position: int  # 0-based rank at which the item was shown
    ts: int  # event time of the impression (ms)
    clicked: bool
    segment: str | None = None


@runtime_checkable
class OnlineLearner(Protocol):
    """The one protocol of online learners."""

    name: str

    def learn_one(self, fact: Any) -> None:
        """Fold one fact into the state."""

    def snapshot(self) -> dict[str, Any]:
        """Canonical state (plain dicts and floats) for equality checks."""


# -- item-to-item collaborative filtering ---------------------------------------------------


@dataclass(frozen=True)
class ItemCFConfig:
    window: int = 5  # recent items of the session a click co-occurs with
    pair_half_life_ms: float = 3_600_000.0  # weight of a pair halves per hour between the clicks
    half_life_ms: float = 30 * DAY_MS  # evidence halves per 30 days of event time
    max_neighbours: int = 200  # per item; the weakest pair is dropped beyond it


@dataclass
class ItemCF:
    """Incremental item-to-item CF: decayed co-occurrence, cosine-normalised.

    ``C[i][j]`` is the decayed sum of pair weights of clicks on i and j close together in one
    user's sequence; ``N[i]`` the decayed click count of i. ``sim(i, j) = C[i][j] /
    sqrt(N[i] * N[j])`` (cosine over binary co-occurrence vectors, with decay): it discounts
    items that co-occur with everything merely because they are popular. All three decay at
    the same rate, so the ratio does not depend on when it is read.
    """

    config: ItemCFConfig = field(default_factory=ItemCFConfig)
    name: str = "item_cf"
    pairs: dict[str, dict[str, float]] = field(default_factory=dict)  # log2 sums
    counts: dict[str, float] = field(default_factory=dict)  # log2 sums

    def learn_one(self, fact: Interaction) -> None:
        c = self.config
        i = fact.item
        self.counts[i] = log_add(self.counts.get(i, NEG_INF), contribution(1.0, fact.ts, c.half_life_ms))
        seen: set[str] = set()
        for j, tj in reversed(fact.recent[-c.window :]):
            if j == i or j in seen:
                continue
            seen.add(j)
            # log2 of the pair weight 2 ** (-gap / pair_half_life), kept in log space: a gap of
            # years must not underflow to a zero weight.
            x = -abs(fact.ts - tj) / c.pair_half_life_ms + max(fact.ts, tj) / c.half_life_ms
            self._add(i, j, x)
            self._add(j, i, x)

    def _add(self, a: str, b: str, x: float) -> None:
        row = self.pairs.setdefault(a, {})
        row[b] = log_add(row.get(b, NEG_INF), x)
        if len(row) > self.config.max_neighbours:
            weakest = min(row.items(), key=lambda kv: (kv[1], kv[0]))[0]
            del row[weakest]

    def similarity(self, i: str, j: str) -> float:
        c_ij = self.pairs.get(i, {}).get(j)
        if c_ij is None:
            return 0.0
        # A count is never below a pair sum it is part of; an item whose own clicks predate
        # the learner (a replay from a later time) falls back to that bound.
        n_i = max(self.counts.get(i, NEG_INF), c_ij)
        n_j = max(self.counts.get(j, NEG_INF), c_ij)
        return 2.0 ** (c_ij - (n_i + n_j) / 2.0)

    def similar_items(self, item: str, k: int) -> list[tuple[str, float]]:
        row = self.pairs.get(item, {})
        scored = [(j, self.similarity(item, j)) for j in row]
        scored.sort(key=lambda js: (-js[1], js[0]))
        return scored[:k]

    def recommend(self, recent: Sequence[str], k: int, exclude: set[str] | None = None) -> list[str]:
        """Items most similar to the recent ones (more recent items weigh more)."""
        scores: dict[str, float] = {}
        for age, item in enumerate(reversed(recent[-self.config.window :])):
            for j, s in self.similar_items(item, 50):
                scores[j] = scores.get(j, 0.0) + s / (1.0 + age)
        blocked = exclude or set()
        ranked = sorted((j for j in scores if j not in blocked), key=lambda j: (-scores[j], j))
        return ranked[:k]

    def snapshot(self) -> dict[str, Any]:
        return {"pairs": {i: dict(row) for i, row in self.pairs.items()}, "counts": dict(self.counts)}


# -- trending ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrendingConfig:
    half_life_ms: float = DAY_MS


@dataclass
class Trending:
    """Decayed click counters per item, globally and per category."""

    config: TrendingConfig = field(default_factory=TrendingConfig)
    name: str = "trending"
    scores: dict[str, float] = field(default_factory=dict)  # log2 sums
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)

    def learn_one(self, fact: Interaction) -> None:
        x = contribution(1.0, fact.ts, self.config.half_life_ms)
        self.scores[fact.item] = log_add(self.scores.get(fact.item, NEG_INF), x)
        if fact.category:
            row = self.by_category.setdefault(fact.category, {})
            row[fact.item] = log_add(row.get(fact.item, NEG_INF), x)

    def top(self, n: int, category: str | None = None, exclude: set[str] | None = None) -> list[str]:
        table = self.scores if category is None else self.by_category.get(category, {})
        blocked = exclude or set()
        ranked = sorted((i for i in table if i not in blocked), key=lambda i: (-table[i], i))
        return ranked[:n]

    def count_at(self, item: str, at_ms: int) -> float:
        return value_at(self.scores.get(item, NEG_INF), at_ms, self.config.half_life_ms)

    def snapshot(self) -> dict[str, Any]:
        return {"scores": dict(self.scores),
                "by_category": {c: dict(r) for c, r in self.by_category.items()}}


# -- bandit posteriors ------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditConfig:
    """Beta-Bernoulli posteriors with a position-based examination model.

    Position-based model: a user examines position p with probability ``examination(p) =
    1 / (1 + p) ** eta`` (``eta = 0`` switches the correction off) and clicks an examined item
    with its click-through rate. An impression at position p therefore counts as
    ``examination(p)`` of a trial, not a whole one: ``alpha = prior + clicks`` and ``beta = prior
    + examined - clicks`` where ``examined`` sums the examination probabilities of every time
    the item was shown, so the posterior mean estimates the rate per examination. A click at
    position 8 (examination 1/9) is stronger evidence than one at position 0 (examination 1).
    Evidence halves every ``half_life_ms`` of event time.
    """

    prior_alpha: float = 1.0
    prior_beta: float = 1.0
    eta: float = 1.0
    half_life_ms: float = 7 * DAY_MS

    def examination(self, position: int) -> float:
        return float((1.0 + position) ** -self.eta)


class Posterior(NamedTuple):
    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def std(self) -> float:
        a, b = self.alpha, self.beta
        return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))


@dataclass
class BetaBandit:
    """Discounted, position-corrected Beta posteriors per item and per (item, segment).

    Two forward-decayed sums per arm, so arrival order does not matter: ``examined`` (the
    examination probabilities of its impressions; every shown item, clicked or not, arrives
    as one ``clicked=False`` fact) and ``clicks`` (the joined clicks, ``clicked=True``). At
    time T: ``alpha = prior_alpha + clicks``, ``beta = prior_beta + max(0, examined - clicks)``.
    """

    config: BanditConfig = field(default_factory=BanditConfig)
    name: str = "bandit"
    arms: dict[str, list[float]] = field(default_factory=dict)  # arm -> [examined, clicks] (log2)

    @staticmethod
    def arm(item: str, segment: str | None = None) -> str:
        return item if segment is None else f"{item}|{segment}"

    def learn_one(self, fact: Feedback) -> None:
        c = self.config
        e = c.examination(fact.position)
        x = contribution(1.0, fact.ts, c.half_life_ms) if fact.clicked else contribution(e, fact.ts, c.half_life_ms)
        index = 1 if fact.clicked else 0
        for arm in {self.arm(fact.item), self.arm(fact.item, fact.segment)}:
            sums = self.arms.setdefault(arm, [NEG_INF, NEG_INF])
            sums[index] = log_add(sums[index], x)

    def posterior(self, item: str, at_ms: int, segment: str | None = None) -> Posterior:
        c = self.config
        examined, clicks = self.arms.get(self.arm(item, segment), [NEG_INF, NEG_INF])
        h = c.half_life_ms
        n_clicks = value_at(clicks, at_ms, h)
        failures = max(0.0, value_at(examined, at_ms, h) - n_clicks)
        return Posterior(c.prior_alpha + n_clicks, c.prior_beta + failures)

    def sample_scores(self, items: Sequence[str], at_ms: int, rng: np.random.Generator,
                      segment: str | None = None) -> np.ndarray:
        """One Thompson draw per item from its posterior."""
        post = [self.posterior(i, at_ms, segment) for i in items]
        return rng.beta([p.alpha for p in post], [p.beta for p in post])

    def snapshot(self) -> dict[str, Any]:
        return {arm: list(v) for arm, v in self.arms.items()}
