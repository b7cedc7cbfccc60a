"""Pure online learners: the shared contract, batch equality, and what each must learn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streamrec.models.decay import NEG_INF, log_add, value_at
from streamrec.models.evaluation import Prequential
from streamrec.models.learners import (
    BanditConfig,
    BetaBandit,
    Feedback,
    Interaction,
    ItemCF,
    ItemCFConfig,
    OnlineLearner,
    Trending,
    TrendingConfig,
)
from tests.support import close

HOUR = 3_600_000
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


items = st.sampled_from([f"i{n}" for n in range(8)])
times = st.integers(1_700_000_000_000, 1_700_000_000_000 + 60 * 24 * HOUR)
interactions = st.builds(
    Interaction,
    user=st.sampled_from(["a", "b"]),
    item=items,
    ts=times,
    recent=st.lists(st.tuples(items, times), max_size=6).map(tuple),
)
feedbacks = st.builds(Feedback, item=items, position=st.integers(0, 9), ts=times,
                      clicked=st.booleans(), segment=st.sampled_from([None, "web", "app"]))

LEARNERS: dict[str, tuple[Callable[[], Any], Any]] = {
    # max_neighbours above the 8-item alphabet: no pair is ever dropped, so sums commute exactly.
    "item_cf": (lambda: ItemCF(ItemCFConfig(max_neighbours=100)), interactions),
    "trending": (lambda: Trending(TrendingConfig()), interactions),
    "bandit": (lambda: BetaBandit(BanditConfig()), feedbacks),
}


# -- the contract every learner passes ----------------------------------------------------------


@pytest.mark.parametrize("name", LEARNERS)
def test_learner_follows_the_protocol(name: str) -> None:
    make, _ = LEARNERS[name]
    learner = make()
    assert isinstance(learner, OnlineLearner)
    assert learner.name == name
    assert learner.snapshot() == make().snapshot()  # a fresh learner is empty and equal


@pytest.mark.parametrize("name", LEARNERS)
@hsettings(max_examples=60, deadline=None)
@given(data=st.data())
def test_learner_state_does_not_depend_on_arrival_order(name: str, data: st.DataObject) -> None:
    make, facts = LEARNERS[name]
    stream = data.draw(st.lists(facts, max_size=30))
    shuffled = data.draw(st.permutations(stream))
    a, b = make(), make()
    for fact in stream:
        a.learn_one(fact)
    for fact in shuffled:
        b.learn_one(fact)
    assert close(a.snapshot(), b.snapshot())


@pytest.mark.parametrize("name", LEARNERS)
@hsettings(max_examples=30, deadline=None)
@given(data=st.data())
def test_learning_changes_state_only_through_learn_one(name: str, data: st.DataObject) -> None:
    make, facts = LEARNERS[name]
    learner = make()
    for fact in data.draw(st.lists(facts, min_size=1, max_size=10)):
        learner.learn_one(fact)
    before = learner.snapshot()
    if isinstance(learner, ItemCF):
        learner.similar_items("i1", 5)
        learner.recommend(["i1", "i2"], 5)
    elif isinstance(learner, Trending):
        learner.top(5)
        learner.top(5, category="c1")
    else:
        learner.sample_scores(["i1", "i2"], 1_700_000_000_000, np.random.default_rng(0))
    assert close(learner.snapshot(), before)


# -- incremental equals batch -----------------------------------------------------------------


@hsettings(max_examples=60, deadline=None)
@given(st.lists(interactions, max_size=40))
def test_item_cf_equals_the_batch_formula(stream: list[Interaction]) -> None:
    config = ItemCFConfig(max_neighbours=100)
    cf = ItemCF(config)
    for fact in stream:
        cf.learn_one(fact)
    at = 1_700_000_000_000 + 90 * 24 * HOUR
    h, ph = config.half_life_ms, config.pair_half_life_ms
    counts: dict[str, float] = {}
    pairs: dict[tuple[str, str], float] = {}
    for f in stream:  # linear-space sums, decayed to `at`
        counts[f.item] = counts.get(f.item, 0.0) + 2 ** (-(at - f.ts) / h)
        used: set[str] = set()
        for j, tj in reversed(f.recent[-config.window :]):
            if j == f.item or j in used:
                continue
            used.add(j)
            w = 2 ** (-abs(f.ts - tj) / ph) * 2 ** (-(at - max(f.ts, tj)) / h)
            pairs[(f.item, j)] = pairs.get((f.item, j), 0.0) + w
            pairs[(j, f.item)] = pairs.get((j, f.item), 0.0) + w
    for (i, j), c in pairs.items():
        if c == 0.0:
            continue
        expected = c / math.sqrt(counts.get(i, 0.0) * counts.get(j, 0.0)) if i in counts and j in counts else None
        # Values near the float minimum lose precision in the linear-space reference; and a
        # pair sum above a count (possible only when `recent` disagrees with the clicks,
        # which generated streams may do) is where ItemCF bounds the count on purpose.
        consistent = i in counts and j in counts and c <= min(counts[i], counts[j])
        if expected is not None and expected > 1e-100 and consistent and i in cf.counts and j in cf.counts:
            assert math.isclose(cf.similarity(i, j), expected, rel_tol=1e-6)


@hsettings(max_examples=60, deadline=None)
@given(st.lists(feedbacks, max_size=40))
def test_bandit_posterior_equals_the_batch_formula(stream: list[Feedback]) -> None:
    config = BanditConfig(eta=1.0)
    bandit = BetaBandit(config)
    for fact in stream:
        bandit.learn_one(fact)
    at = 1_700_000_000_000 + 90 * 24 * HOUR
    for item in {f.item for f in stream}:
        clicks = examined = 0.0
        for f in stream:
            if f.item != item:
                continue
            decay = 2 ** (-(at - f.ts) / config.half_life_ms)
            if f.clicked:
                clicks += decay
            else:
                examined += decay / (1 + f.position)
        post = bandit.posterior(item, at)
        assert math.isclose(post.alpha, 1.0 + clicks, rel_tol=1e-6)
        assert math.isclose(post.beta, 1.0 + max(0.0, examined - clicks), rel_tol=1e-6, abs_tol=1e-6)


def test_trending_decays_with_its_half_life_and_ranks_recent_over_stale() -> None:
    t0 = 1_700_000_000_000
    trending = Trending(TrendingConfig(half_life_ms=24 * HOUR))
    trending.learn_item("old", "c")
    for n in range(4):
        trending.learn_one(Interaction("u", "old", t0 + n))
    for n in range(3):
        trending.learn_one(Interaction("u", "new", t0 + 48 * HOUR + n))
    trending.learn_item("new", "c")  # a catalog record after the clicks counts them all
    assert math.isclose(trending.count_at("old", t0 + 24 * HOUR), 2.0, rel_tol=1e-6)
    assert trending.top(2) == ["new", "old"]  # 3 recent clicks beat 4 clicks two half-lives ago
    assert trending.top(2, category="c") == ["new", "old"]
    assert trending.top(2, category="none") == []


def test_log_space_sums_do_not_overflow_over_decades() -> None:
    h = HOUR
    total = NEG_INF
    for year in range(30):
        total = log_add(total, (1_000_000_000_000 + year * 365 * 24 * HOUR) / h)
    assert math.isfinite(total)
    assert math.isclose(value_at(total, 1_000_000_000_000 + 29 * 365 * 24 * HOUR, h), 1.0, rel_tol=1e-6)


def test_item_cf_keeps_a_bounded_neighbour_list() -> None:
    cf = ItemCF(ItemCFConfig(max_neighbours=3, window=10))
    recent = tuple((f"j{n}", 1_700_000_000_000 + n) for n in range(10))
    cf.learn_one(Interaction("u", "i", 1_700_000_000_100, recent))
    assert len(cf.pairs["i"]) == 3
    # The strongest (closest in time) pairs are the ones kept.
    assert set(cf.pairs["i"]) == {"j9", "j8", "j7"}


def test_position_bias_makes_a_deep_click_stronger_evidence() -> None:
    t = 1_700_000_000_000
    top, deep = BetaBandit(BanditConfig(eta=1.0)), BetaBandit(BanditConfig(eta=1.0))
    for learner, position in ((top, 0), (deep, 7)):
        for n in range(10):  # ten impressions, one of them clicked
            learner.learn_one(Feedback("x", position, t + n, clicked=False))
        learner.learn_one(Feedback("x", position, t + 9, clicked=True))
    assert deep.posterior("x", t).mean > top.posterior("x", t).mean
    flat = BetaBandit(BanditConfig(eta=0.0))
    for n in range(9):
        flat.learn_one(Feedback("x", 7, t + n, clicked=False))
    assert math.isclose(flat.posterior("x", t).beta, 10.0, rel_tol=1e-6)  # no correction: 9 failures


# -- closed loop: Thompson sampling against greedy and epsilon-greedy ---------------------------


def _simulate(policy: str, rounds: int = 20_000, seed: int = 0) -> tuple[float, BetaBandit, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_items, slate = 30, 5
    true_ctr = rng.beta(1.0, 12.0, n_items)  # a few good arms among many weak ones
    # A prior near the base rate (not an optimistic 0.5, which would make greedy explore too).
    config = BanditConfig(prior_alpha=1.0, prior_beta=10.0, eta=1.0, half_life_ms=1e15)
    exam = np.array([config.examination(p) for p in range(slate)])
    best = np.sort(true_ctr)[::-1][:slate] @ exam
    bandit = BetaBandit(config)
    ids = [f"i{n}" for n in range(n_items)]
    regret = 0.0
    for r in range(rounds):
        t = 1_700_000_000_000 + r
        if policy == "thompson":
            scores = bandit.sample_scores(ids, t, rng)
        else:
            scores = np.array([bandit.posterior(i, t).mean for i in ids]) + rng.random(n_items) * 1e-9
            if policy == "epsilon" and rng.random() < 0.1:
                scores = rng.random(n_items)
        chosen = np.argsort(-scores)[:slate]
        regret += best - true_ctr[chosen] @ exam
        clicks = rng.random(slate) < exam * true_ctr[chosen]
        # As the pipeline does: the impression shows every item, then each click is joined.
        for position, (arm, clicked) in enumerate(zip(chosen, clicks)):
            bandit.learn_one(Feedback(ids[arm], position, t, clicked=False))
            if clicked:
                bandit.learn_one(Feedback(ids[arm], position, t, clicked=True))
    return regret, bandit, true_ctr


@pytest.mark.slow
def test_thompson_sampling_has_lower_regret_and_learns_the_rates() -> None:
    thompson, bandit, true_ctr = _simulate("thompson")
    greedy, _, _ = _simulate("greedy")
    epsilon, _, _ = _simulate("epsilon")
    assert thompson < greedy
    assert thompson < epsilon
    # The posterior means of the best arms (the ones shown most) approach the true rates.
    t = 1_700_000_000_000 + 20_000
    best = np.argsort(-true_ctr)[:3]
    errors = [abs(bandit.posterior(f"i{a}", t).mean - true_ctr[a]) for a in best]
    assert max(errors) < 0.05, (errors, true_ctr[best])


# -- prequential on real data ---------------------------------------------------------------------


@pytest.mark.slow
def test_prequential_cf_beats_trending_beats_random_on_movielens() -> None:
    if not (DATA / "ratings.csv").exists():
        pytest.skip(f"{DATA} not present")
    from streamrec.streams.loaders import load_movielens
    clicks = load_movielens(DATA / "ratings.csv")[:30_000]
    result = Prequential().run(clicks)
    for metric in ("hit_at_10", "ndcg_at_10"):
        assert result["cf_recent"][metric] > result["trending"][metric] > result["random"][metric], result


@pytest.mark.slow
def test_streamrec_eval_through_redis_ranks_cf_over_trending_over_random(tmp_path: Path) -> None:
    """`streamrec eval` on the first 5,000 MovieLens clicks, through the pipeline's Redis state."""
    if not (DATA / "ratings.csv").exists():
        pytest.skip(f"{DATA} not present")
    import json
    import subprocess
    import sys
    proc = subprocess.run(
        [sys.executable, "-m", "streamrec", "eval", str(DATA / "ratings.csv"), "--limit", "5000",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for metric in ("hit_at_10", "ndcg_at_10"):
        assert result["cf_recent"][metric] > result["trending"][metric] > result["random"][metric], result
    assert (tmp_path / "prequential.png").stat().st_size > 10_000
