"""Online learners as pure functions of the event stream (the reference implementations).

Every learner follows one protocol (river's style): ``learn_one(fact)`` folds one derived fact
into the state, reads never change it, and ``snapshot()`` returns the state in a canonical
form for comparisons. The Redis-backed learners must equal these.

Facts are derived from events by the pipeline:

* ``Interaction``: a click, with the user's recent items *before* it (from the session state).
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

from streamrec.models.decay import NEG_INF, contribution, log_add, log_sum_by, value_at
from streamrec.models.session import RS, US

DAY_MS = 86_400_000


class Update(NamedTuple):
    """One change to item-level state: ``op`` "n" (click count), "p" (pair with ``arg``),
    "b" (bandit sum ``arg``); ``x`` is a log2 contribution added in log space."""

    item: str
    op: str
    arg: str
    x: float


class Interaction(NamedTuple):
    user: str
    item: str
    ts: int  # event time, ms
    recent: tuple[tuple[str, int], ...] = ()  # (item, ts) clicked before, most recent last


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

CF_PER_ITEM = 50  # neighbours each recent item contributes to a CF recommendation


def cosine_similarity(c_ij: Any, n_i: Any, n_j: Any) -> Any:
    """``sim(i, j) = C(i, j) / sqrt(N(i) N(j))`` from log2 decayed sums (floats or arrays that
    broadcast): ``C`` the pair's co-occurrence, ``N`` each item's click count.

    A count is never below a pair sum it is part of; an item whose own clicks predate the
    learner (a replay from a later time) falls back to that bound. All three sums decay at
    one rate, so the ratio does not depend on when it is read. The one home of this formula:
    the reference learner, the Redis reads and serving all call it.
    """
    c = np.asarray(c_ij, dtype=np.float64)
    return np.exp2(c - (np.maximum(n_i, c) + np.maximum(n_j, c)) / 2.0)


def best_first(items: Sequence[str] | np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices ordering ``items`` by score, highest first, ties by item id."""
    if not len(items):
        return np.zeros(0, dtype=np.int64)
    return np.lexsort((np.asarray(items, dtype=str), -np.asarray(scores, dtype=np.float64)))


def neighbour_scores(rows: Sequence[tuple[Sequence[str], np.ndarray]],
                     per_item: int | None = None) -> tuple[list[str], np.ndarray]:
    """CF scores from a user's recent items, newest first: ``rows[a]`` is the a-th newest
    item's neighbours and similarities, and ``score(j) = sum_a sim(item_a, j) / (1 + a)``
    over each item's ``per_item`` most similar neighbours (all when None). Returns the items
    and scores, best first (ties by item id)."""
    names: list[str] = []
    weights: list[np.ndarray] = []
    for age, (items, sims) in enumerate(rows):
        sims = np.asarray(sims, dtype=np.float64)
        order = best_first(items, sims)[:per_item] if per_item is not None else np.arange(len(items))
        names += [items[int(j)] for j in order]
        weights.append(sims[order] / (1.0 + age))
    if not names:
        return [], np.zeros(0)
    unique, inverse = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    scores = np.bincount(inverse, weights=np.concatenate(weights), minlength=len(unique))
    order = best_first(unique, scores)
    return [str(unique[j]) for j in order], scores[order]



@dataclass(frozen=True)
class ItemCFConfig:
    window: int = 5  # recent items of the session a click co-occurs with
    pair_half_life_ms: float = 3_600_000.0  # weight of a pair halves per hour between the clicks
    half_life_ms: float = 30 * DAY_MS  # evidence halves per 30 days of event time
    max_neighbours: int = 200  # per item; the weakest pair is dropped beyond it
    # Redis only (wall clock): an item's learner keys (neighbours, statistics) expire this
    # long after its last update (0 = never).
    item_ttl_ms: int = 90 * DAY_MS


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

    def updates(self, fact: Interaction) -> list[Update]:
        """The state changes one click makes (log2 contributions), shared with Redis."""
        c = self.config
        i = fact.item
        out = [Update(i, "n", "", contribution(1.0, fact.ts, c.half_life_ms))]
        seen: set[str] = set()
        for j, tj in reversed(fact.recent[-c.window :]):
            if j == i or j in seen:
                continue
            seen.add(j)
            # log2 of the pair weight 2 ** (-gap / pair_half_life), kept in log space: a gap of
            # years must not underflow to a zero weight.
            x = -abs(fact.ts - tj) / c.pair_half_life_ms + max(fact.ts, tj) / c.half_life_ms
            out.append(Update(i, "p", j, x))
            out.append(Update(j, "p", i, x))
        return out

    def learn_one(self, fact: Interaction) -> None:
        self.learn_many([fact])

    def learn_many(self, facts: Sequence[Interaction]) -> None:
        """Fold a batch of facts: the sums exactly as one at a time; the neighbour bound is
        applied once per item at the end of the batch (the weakest pairs beyond
        ``max_neighbours`` dropped, ties by neighbour id), as the Redis scripts do per batch."""
        touched: set[str] = set()
        for fact in facts:
            for u in self.updates(fact):
                if u.op == "n":
                    self.counts[u.item] = log_add(self.counts.get(u.item, NEG_INF), u.x)
                else:
                    row = self.pairs.setdefault(u.item, {})
                    row[u.arg] = log_add(row.get(u.arg, NEG_INF), u.x)
                    touched.add(u.item)
        for item in touched:
            self._trim(self.pairs[item])

    def _trim(self, row: dict[str, float]) -> None:
        excess = len(row) - self.config.max_neighbours
        if excess > 0:
            for weakest, _ in sorted(row.items(), key=lambda kv: (kv[1], kv[0]))[:excess]:
                del row[weakest]

    def similarity(self, i: str, j: str) -> float:
        c_ij = self.pairs.get(i, {}).get(j)
        if c_ij is None:
            return 0.0
        return float(cosine_similarity(c_ij, self.counts.get(i, NEG_INF), self.counts.get(j, NEG_INF)))

    def neighbours(self, item: str) -> tuple[list[str], np.ndarray]:
        """Every neighbour of ``item`` and its similarity (in no particular order)."""
        row = self.pairs.get(item, {})
        names = list(row)
        c_ij = np.fromiter(row.values(), float, len(row))
        n_j = np.fromiter((self.counts.get(j, NEG_INF) for j in names), float, len(names))
        return names, cosine_similarity(c_ij, self.counts.get(item, NEG_INF), n_j)

    def similar_items(self, item: str, k: int) -> list[tuple[str, float]]:
        names, sims = self.neighbours(item)
        order = best_first(names, sims)[:k]
        return [(names[j], float(sims[j])) for j in order]

    def recommend(self, recent: Sequence[str], k: int, exclude: set[str] | None = None) -> list[str]:
        """Items most similar to the recent ones (more recent items weigh more)."""
        rows = [self.neighbours(item) for item in reversed(recent[-self.config.window :])]
        items, _ = neighbour_scores(rows, per_item=CF_PER_ITEM)
        blocked = exclude or set()
        return [j for j in items if j not in blocked][:k]

    def snapshot(self) -> dict[str, Any]:
        return {"pairs": {i: dict(row) for i, row in self.pairs.items()}, "counts": dict(self.counts)}


# -- trending ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrendingConfig:
    half_life_ms: float = DAY_MS
    # Redis only: each trending set (all items, each category) keeps this many highest-scored
    # items; an item trimmed away starts again from its next click.
    max_items: int = 10_000


@dataclass
class Trending:
    """Decayed click counters per item; per category, the same scores of the items whose
    catalog record names that category (so a category list never depends on whether the
    catalog record arrived before or after the clicks)."""

    config: TrendingConfig = field(default_factory=TrendingConfig)
    name: str = "trending"
    scores: dict[str, float] = field(default_factory=dict)  # log2 sums
    categories: dict[str, str] = field(default_factory=dict)  # item -> category

    def contribution(self, fact: Interaction) -> float:
        return contribution(1.0, fact.ts, self.config.half_life_ms)

    def learn_one(self, fact: Interaction) -> None:
        self.scores[fact.item] = log_add(self.scores.get(fact.item, NEG_INF), self.contribution(fact))

    def learn_item(self, item: str, category: str | None) -> None:
        """A catalog record (the winning one) sets or clears the item's category."""
        if category:
            self.categories[item] = category
        else:
            self.categories.pop(item, None)

    def by_category(self, category: str) -> dict[str, float]:
        return {i: v for i, v in self.scores.items() if self.categories.get(i) == category}

    def top(self, n: int, category: str | None = None, exclude: set[str] | None = None) -> list[str]:
        table = self.scores if category is None else self.by_category(category)
        blocked = exclude or set()
        ranked = sorted((i for i in table if i not in blocked), key=lambda i: (-table[i], i))
        return ranked[:n]

    def count_at(self, item: str, at_ms: int) -> float:
        return value_at(self.scores.get(item, NEG_INF), at_ms, self.config.half_life_ms)

    def snapshot(self) -> dict[str, Any]:
        cats = sorted(set(self.categories.values()))
        return {"scores": dict(self.scores), "by_category": {c: self.by_category(c) for c in cats}}


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
    max_segments: int = 32  # per item: feedback of a segment beyond the first this many is not recorded

    def examination(self, position: int) -> float:
        return float((1.0 + position) ** -self.eta)


def beta_posterior(examined: Any, clicks: Any, at_ms: float, config: BanditConfig) -> tuple[Any, Any]:
    """``(alpha, beta)`` of the Beta posterior at event time ``at_ms`` from the log2 decayed
    sums of examinations and joined clicks (floats or arrays; ``-inf``: no evidence):
    ``alpha = prior_alpha + clicks``, ``beta = prior_beta + max(0, examined - clicks)``.
    The one home of this formula: the reference bandit, the Redis reads and serving (features
    and Thompson draws) all call it."""
    n_clicks = value_at(clicks, at_ms, config.half_life_ms)
    n_examined = value_at(examined, at_ms, config.half_life_ms)
    return config.prior_alpha + n_clicks, config.prior_beta + np.maximum(n_examined - n_clicks, 0.0)


def beta_moments(alpha: Any, beta: Any) -> tuple[Any, Any]:
    """Mean and standard deviation of Beta(alpha, beta) (floats or arrays)."""
    total = np.add(alpha, beta)
    mean = np.divide(alpha, total)
    # a b / ((a + b)^2 (a + b + 1)) written as mean (1 - mean) / (a + b + 1): no overflow for
    # the huge sums a read long before the evidence gives
    return mean, np.sqrt(mean * np.divide(beta, total) / (total + 1.0))


class Posterior(NamedTuple):
    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        return float(beta_moments(self.alpha, self.beta)[0])

    @property
    def std(self) -> float:
        return float(beta_moments(self.alpha, self.beta)[1])


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
    segments: dict[str, int] = field(default_factory=dict)  # item -> segments with an arm (capped)

    @staticmethod
    def arm(item: str, segment: str | None = None) -> str:
        return item if segment is None else f"{item}|{segment}"

    def updates(self, fact: Feedback) -> list[Update]:
        """Bandit sums touched by one feedback: fields "e" (examined) and "c" (clicks), and
        "e|<segment>", "c|<segment>" when a segment is given."""
        c = self.config
        # log2 of the weight, computed directly: (1 + p) ** -eta underflows for large eta
        log_weight = 0.0 if fact.clicked else -c.eta * math.log2(1.0 + fact.position)
        x = log_weight + fact.ts / c.half_life_ms
        kind = "c" if fact.clicked else "e"
        fields = [kind] if not fact.segment else [kind, f"{kind}|{fact.segment}"]
        return [Update(fact.item, "b", f, x) for f in fields]

    def learn_one(self, fact: Feedback) -> None:
        for u in self.updates(fact):
            kind, _, segment = u.arg.partition("|")
            arm = self.arm(u.item, segment or None)
            if segment and arm not in self.arms:
                # A new segment beyond the cap is not recorded: which segments an item keeps
                # then depends on arrival order (the item-wide arm is always updated).
                if self.segments.get(u.item, 0) >= self.config.max_segments:
                    continue
                self.segments[u.item] = self.segments.get(u.item, 0) + 1
            sums = self.arms.setdefault(arm, [NEG_INF, NEG_INF])
            index = 1 if kind == "c" else 0
            sums[index] = log_add(sums[index], u.x)

    def posterior(self, item: str, at_ms: int, segment: str | None = None) -> Posterior:
        examined, clicks = self.arms.get(self.arm(item, segment), [NEG_INF, NEG_INF])
        alpha, beta = beta_posterior(examined, clicks, at_ms, self.config)
        return Posterior(float(alpha), float(beta))

    def sample_scores(self, items: Sequence[str], at_ms: int, rng: np.random.Generator,
                      segment: str | None = None) -> np.ndarray:
        """One Thompson draw per item from its posterior."""
        post = [self.posterior(i, at_ms, segment) for i in items]
        return rng.beta([p.alpha for p in post], [p.beta for p in post])

    def snapshot(self) -> dict[str, Any]:
        return {arm: list(v) for arm, v in self.arms.items()}


# -- a batch's updates, summed per state field ----------------------------------------------------


class ItemDelta(NamedTuple):
    """The summed updates of one item from a batch of records: each field's and each pair's
    log2 contributions added in log space (``log_sum_by``), and per source partition the
    lowest and highest offset of the records behind them. Applying it where every range lies
    above the item's watermark for its source equals applying the records one by one (to
    float rounding: the sums are formed in another order)."""

    item: str
    ranges: dict[str, tuple[int, int]]  # source ("topic:partition") -> (lowest, highest offset)
    fields: list[tuple[str, float]]  # statistics field ("n", "e", "c", "e|<segment>", ...) -> log2 sum,
    #                                  in the order the batch first touched them (segments are
    #                                  admitted in that order, as one at a time)
    pairs: list[tuple[str, float]]  # neighbour -> log2 sum


def aggregate_updates(groups: Sequence[tuple[str, int, Sequence[Update]]]) -> list[ItemDelta]:
    """Sum a batch's learner updates ``(source, offset, updates)`` per (item, field) and per
    (item, neighbour): one log-space add each, carrying per item the offset range of the
    records behind it per source. Items in the order the batch first touched them."""
    slots: dict[tuple[str, str, str], int] = {}
    index: list[int] = []
    xs: list[float] = []
    ranges: dict[str, dict[str, tuple[int, int]]] = {}
    for source, offset, updates in groups:
        for u in updates:
            key = (u.item, u.op, u.arg)
            slot = slots.get(key)
            if slot is None:
                slot = slots[key] = len(slots)
            index.append(slot)
            xs.append(u.x)
            per_source = ranges.get(u.item)
            if per_source is None:
                per_source = ranges[u.item] = {}
            span = per_source.get(source)
            if span is None:
                per_source[source] = (offset, offset)
            elif offset > span[1]:
                per_source[source] = (span[0], offset)
            elif offset < span[0]:
                per_source[source] = (offset, span[1])
    return _deltas(slots, index, xs, ranges)


def _deltas(slots: dict[tuple[str, str, str], int], index: list[int], xs: list[float],
            ranges: dict[str, dict[str, tuple[int, int]]]) -> list[ItemDelta]:
    """The summed deltas: ``xs[k]`` is a contribution to slot ``index[k]``, the slots being
    (item, op, arg) in first-touch order."""
    if not slots:
        return []
    sums = log_sum_by(np.asarray(index), np.asarray(xs), len(slots)).tolist()
    out: dict[str, ItemDelta] = {}
    for (item, op, arg), total in zip(slots, sums):
        delta = out.get(item)
        if delta is None:
            delta = out[item] = ItemDelta(item, ranges[item], [], [])
        if op == "p":
            delta.pairs.append((arg, total))
        else:
            delta.fields.append(("n" if op == "n" else arg, total))
    return list(out.values())


# -- from the session state machine's facts to learner updates ----------------------------------


def parse_facts(user: str, item: str, ts: int, facts: str) -> tuple[Interaction | None, list[Feedback]]:
    """Decode the facts an event yielded (``models.session``): the click as an
    ``Interaction`` (None for an impression, or when the facts are unknown) and the
    impression/click feedback for the bandit."""
    interaction: Interaction | None = None
    window: list[tuple[str, int]] = []
    feedback: list[Feedback] = []
    for record in facts.split("\x1e") if facts else ():
        kind, *fields = record.split("\x1f")
        if kind == "C":
            interaction = Interaction(user, item, ts)
        elif kind == "W":
            window.append((fields[0], int(fields[1])))
        elif kind in ("S", "K"):
            feedback.append(Feedback(fields[0], int(fields[1]), int(fields[2]), kind == "K",
                                     fields[3] or None))
    if interaction is not None:
        interaction = interaction._replace(recent=tuple(reversed(window)))
    return interaction, feedback


@dataclass
class Learners:
    """The three online learners fed from the pipeline's facts (reference implementation of
    what the worker writes to Redis)."""

    cf: ItemCF = field(default_factory=ItemCF)
    trending: Trending = field(default_factory=Trending)
    bandit: BetaBandit = field(default_factory=BetaBandit)

    def updates(self, user: str, item: str, ts: int, facts: str) -> tuple[list[Update], float | None]:
        """Item-level updates of one event, and its trending contribution (clicks only)."""
        interaction, feedback = parse_facts(user, item, ts, facts)
        out: list[Update] = []
        trend = None
        if interaction is not None:
            out += self.cf.updates(interaction)
            trend = self.trending.contribution(interaction)
        for fb in feedback:
            out += self.bandit.updates(fb)
        return out, trend

    def learn_facts(self, user: str, item: str, ts: int, facts: str) -> None:
        self.learn_batch([(user, item, ts, facts)])

    def learn_batch(self, events: Sequence[tuple[str, str, int, str]]) -> None:
        """The facts of a batch of events ``(user, item, ts, facts)``: what the worker applies
        per batch (the neighbour bound is applied at the end of the batch, ``ItemCF.learn_many``)."""
        interactions = []
        for user, item, ts, facts in events:
            interaction, feedback = parse_facts(user, item, ts, facts)
            if interaction is not None:
                interactions.append(interaction)
                self.trending.learn_one(interaction)
            for fb in feedback:
                self.bandit.learn_one(fb)
        self.cf.learn_many(interactions)

    def snapshot(self) -> dict[str, Any]:
        return {"item_cf": self.cf.snapshot(), "bandit": self.bandit.snapshot(),
                "trending": dict(self.trending.scores)}

    def summed(self, events: Sequence[tuple[str, int, str, str, int, str]]
               ) -> tuple[list[ItemDelta], list[tuple[str, int, str, str, str]]]:
        """A batch's item-level updates summed per field and pair, and its trending ops, from
        the events ``(source, offset, user, item, ts, facts)`` in offset order per source.

        The worker's path: exactly ``aggregate_updates`` over ``updates()`` of each event
        (the same contributions, formed by the same float operations, in the same order; a
        test checks equality, not closeness), without building an ``Update`` per change."""
        cf, bandit = self.cf.config, self.bandit.config
        window, pair_h, cf_h, b_h, eta = cf.window, cf.pair_half_life_ms, cf.half_life_ms, bandit.half_life_ms, bandit.eta
        trend_h = self.trending.config.half_life_ms
        slots: dict[tuple[str, str, str], int] = {}
        index: list[int] = []
        xs: list[float] = []
        ranges: dict[str, dict[str, tuple[int, int]]] = {}
        trending: list[tuple[str, int, str, str, str]] = []

        # Per (item, source): the lowest and highest offset behind the item's sums. Written
        # out inline rather than as helpers: this loop runs for every change of every event.
        lows: dict[tuple[str, str], int] = {}
        highs: dict[tuple[str, str], int] = {}
        get = slots.get
        for source, offset, _user, item, ts, facts in events:
            if not facts:
                continue
            clicked = False
            recent: list[tuple[str, int]] = []
            feedback: list[list[str]] = []
            for record in facts.split(RS):
                kind = record[0]
                if kind == "C":
                    clicked = True
                elif kind == "W":
                    _, j, tj = record.split(US)
                    recent.append((j, int(tj)))
                elif kind in "SK":
                    feedback.append(record.split(US))
            touched = []
            changes: list[tuple[tuple[str, str, str], float]] = []  # in Learners.updates' order
            if clicked:
                # ItemCF.updates: the count, then both directions of each pair with the
                # window's newest distinct items (the facts list them newest first)
                changes.append(((item, "n", ""), math.log2(1.0) + ts / cf_h))
                touched.append(item)
                seen: set[str] = set()
                for j, tj in recent[:window]:
                    if j == item or j in seen:
                        continue
                    seen.add(j)
                    x = -abs(ts - tj) / pair_h + max(ts, tj) / cf_h
                    changes += [((item, "p", j), x), ((j, "p", item), x)]
                    touched.append(j)
                trending.append((source, offset, "c", item, repr(math.log2(1.0) + ts / trend_h)))
            for kind, shown, position, at, segment in feedback:
                # BetaBandit.updates
                hit = kind == "K"
                log_weight = 0.0 if hit else -eta * math.log2(1.0 + int(position))
                x = log_weight + int(at) / b_h
                name = "c" if hit else "e"
                changes.append(((shown, "b", name), x))
                if segment:
                    changes.append(((shown, "b", f"{name}|{segment}"), x))
                touched.append(shown)
            for key, x in changes:
                slot = get(key)
                if slot is None:
                    slot = slots[key] = len(slots)
                index.append(slot)
                xs.append(x)
            for it in touched:
                span = (it, source)
                low = lows.get(span)
                if low is None or offset < low:
                    lows[span] = offset
                if offset > highs.get(span, -1):
                    highs[span] = offset
        for (it, source), low in lows.items():
            ranges.setdefault(it, {})[source] = (low, highs[(it, source)])
        return _deltas(slots, index, xs, ranges), trending
