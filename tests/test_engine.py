"""The vectorised refresh against real Redis state: every feature of every candidate equals a
per-candidate reference computed from the state's own reads and the reference formulas; a
batch refresh equals refreshing each user alone; the coarse stage keeping every candidate
serves exactly what the full ranker serves, and otherwise scores what it keeps exactly as the
full ranker would.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Iterator

import msgspec
import numpy as np
import pytest

from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.content import content_similarity, session_tokens, tokens
from streamrec.models.decay import value_at
from streamrec.models.learners import cosine_similarity, neighbour_scores
from streamrec.models.ranking import FEATURES, RANKED_SOURCES, RankerConfig, TrainedRanker, train_ranker
from streamrec.serving.engine import ABSENT_RANK, COL, Engine, ModelSet, Request, Served
from streamrec.serving.worker import served_log
from tests.support import synthetic_world

NAMESPACE = "eng"


@pytest.fixture(scope="module")
def world(base_settings: Settings) -> Iterator[dict[str, Any]]:
    s = base_settings.model_copy(update={
        "redis": base_settings.redis.model_copy(update={"prefix": f"test{uuid.uuid4().hex[:10]}"}),
        "serving": base_settings.serving.model_copy(update={
            "stats_ttl_s": 0.0, "neighbours_ttl_s": 0.0, "explore_pool": 60, "candidates": 80, "seq_candidates": 40,
            "cf_candidates": 40, "trending_candidates": 30, "k": 10, "log_top": 200}),
        "trainer": base_settings.trainer.model_copy(update={"seq_epochs": 3, "seq_dim": 8, "seq_max_len": 10}),
    })
    world = synthetic_world(s, NAMESPACE, n_items=200, seed=5, n_events=3000)
    try:
        yield world
    finally:
        world["store"].drop_everything()


def ranker(seed: int = 0) -> TrainedRanker:
    """A 40-tree LambdaMART on synthetic lists with a learnable click (its scores vary)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4000, len(FEATURES)))
    y = np.zeros(4000)
    utility = X[:, COL["seq_score"]] + X[:, COL["content_sim"]] - 0.01 * X[:, COL["cf_rank"]]
    for g in range(200):
        y[g * 20 + int(np.argmax(utility[g * 20 : (g + 1) * 20]))] = 1
    return train_ranker(X, y, [20] * 200, params=RankerConfig(n_trees=40, num_threads=1), valid_fraction=0.0)


def engine(world: dict[str, Any], models_ranker: Any = None, **serving: Any) -> Engine:
    s: Settings = world["settings"]
    s = s.model_copy(update={"serving": s.serving.model_copy(update=serving)})
    store: StateStore = world["store"]
    models = ModelSet(seq=world["seq"], index=world["index"], content=world["content"], seq_version="t")
    if models_ranker is not None:
        models = ModelSet(models_ranker, world["seq"], world["index"], world["content"], "t")
    e = Engine(s, store, RecStore(store, s.kafka.partitions), models)
    e.keep_sources = True
    return e


def users(world: dict[str, Any], n: int = 8) -> list[str]:
    return sorted({c.user for c in world["clicks"]})[:n]


def refresh(e: Engine, who: list[str | None]) -> list[Served]:
    return e.refresh([Request(u) for u in who], e.state.keys.ns(NAMESPACE))


def reference_features(world: dict[str, Any], e: Engine, served: Served) -> np.ndarray:
    """The features of ``served.candidates``, one candidate at a time, from the state's own
    reads (sessions, posteriors, item hashes, trending) and the reference formulas; the
    sources' ranks and scores from the list's own ``by_source`` (exploration draws are
    random: taken as served)."""
    s: Settings = world["settings"]
    store: StateStore = world["store"]
    recstore = RecStore(store, s.kafka.partitions)
    ns = store.keys.ns(NAMESPACE)
    items = served.candidates
    X = np.zeros((len(items), len(FEATURES)))
    view = store.session_view(served.user, NAMESPACE) if served.user else None
    history = [x.item for x in view.entries] if view else []
    times = [x.ts for x in view.entries] if view else []
    at = served.as_of
    seen = set(history)
    ranked: dict[str, list[str]] = {}  # each source's whole ranking, the user's clicks left out
    trend = dict(recstore.trending_scores(max(s.serving.trending_candidates * 5, 1000), ns))
    ranked["trend"] = [it for it in trend if it not in seen]
    X[:, COL["explore_draw"]] = served.features[:, COL["explore_draw"]]
    # CF scores: the reference blend (neighbour_scores) over each recent item's strongest
    # co-occurrences in Redis, cosine-normalised with the counts read now
    per_item = max(50, s.serving.cf_candidates // 2)
    rows = []
    for item in reversed(history[-s.serving.recent :]):
        pairs = recstore.neighbours([item], per_item, ns)[0]
        names = [j for j, _ in pairs]
        counts = [n for n, _, _ in recstore.item_stats([item, *names], ns)]
        rows.append((names, cosine_similarity(np.array([c for _, c in pairs]), counts[0], np.array(counts[1:]))))
    cf_items, cf_scores = neighbour_scores(rows)
    ranked["cf"] = [it for it in cf_items if it not in seen]
    cf = dict(zip(cf_items, cf_scores.tolist()))
    ranked["seq"] = []
    if history:
        index = world["index"]
        query = world["seq"].session_embedding(history[-s.serving.seq_len :])
        dots, known = index.dots(query, items)
        X[:, COL["seq_score"]] = np.where(known, dots, 0.0)
        ranked["seq"] = [it for it in index.search(query[None, :], len(index))[0][0] if it not in seen]
    limits = {name: type(src).limit(e.settings) for name, src in e.sources.items()}
    proposed = {name: set(ranked[name][: limits[name]]) for name in ("seq", "cf", "trend")}
    proposed["explore"] = set(served.by_source.get("explore", []))  # random draws: as served
    for name in ("seq", "cf", "trend"):
        rank = {it: r for r, it in enumerate(ranked[name][: limits[name]])}
        X[:, COL[f"{name}_rank"]] = [rank.get(it, ABSENT_RANK) for it in items]
    for name in RANKED_SOURCES:  # sources this engine does not run: absent
        if name not in e.sources:
            X[:, COL[f"{name}_rank"]] = ABSENT_RANK
    X[:, COL["n_sources"]] = [sum(it in p for p in proposed.values()) for it in items]
    X[:, COL["cf_score"]] = [cf[it] if it in proposed["cf"] else 0.0 for it in items]
    posts = store.posteriors(items, at, namespace=NAMESPACE)
    X[:, COL["post_mean"]] = [p.mean for p in posts]
    X[:, COL["post_std"]] = [p.std for p in posts]
    stats = recstore.item_stats(items, ns)
    X[:, COL["popularity"]] = [math.log1p(float(value_at(n, at, store.cf.half_life_ms))) for n, _, _ in stats]
    X[:, COL["trend_score"]] = [math.log1p(float(value_at(trend.get(it, -math.inf), at, store.trending_config.half_life_ms)))
                                for it in items]
    meta = recstore.item_meta(items, ns)
    X[:, COL["item_age_h"]] = [(at - c) / 3.6e6 if c is not None else -1.0 for c, _, _, _ in meta]
    toks = {it: tokens(t, g, c) for it, (_, t, g, c) in zip(items, meta)}
    recent_toks = [tokens(t, g, c) for _, t, g, c in recstore.item_meta(history[-5:], ns)]
    weights = session_tokens(recent_toks)
    X[:, COL["content_sim"]] = [content_similarity(toks[it], weights) for it in items]
    cf_col = X[:, COL["cf_score"]]
    X[:, COL["cf_rel"]] = cf_col / cf_col.max() if len(items) and cf_col.max() > 0 else 0.0
    seq_col = X[:, COL["seq_score"]]
    X[:, COL["seq_rel"]] = seq_col - seq_col.max() if history else -1.0
    pop = X[:, COL["popularity"]]
    X[:, COL["pop_rel"]] = pop / pop.max() if len(items) and pop.max() > 0 else 0.0
    X[:, COL["session_len"]] = len(history)
    X[:, COL["since_last_s"]] = (times[-1] - times[-2]) / 1000.0 if len(times) >= 2 else -1.0
    X[:, COL["user_clicks"]] = view.clicks if view else 0
    return X


def test_the_new_retrievers_features_are_their_own_ranks_and_scores(world: dict[str, Any]) -> None:
    """With mf, users and tower configured, each candidate's {source}_rank and {source}_score
    are its place and score in that source's own answer (ABSENT_RANK and 0 where the source
    did not propose it), and the served lists name them as sources."""
    from streamrec.serving.sources import Batch

    e = engine(world, sources=["seq", "cf", "trend", "mf", "users", "tower", "explore"],
               mf_candidates=30, users_candidates=30, tower_candidates=30)
    e.swap(ModelSet(seq=world["seq"], index=world["index"], content=world["content"], seq_version="t",
                    retrieval=world["retrieval"]))
    ns = e.state.keys.ns(NAMESPACE)
    proposed_by_new = 0
    for served in refresh(e, users(world)):
        sessions = e.reads.sessions.read([served.user], ns)
        batch = Batch(ns, [served.user], sessions.items, sessions.last_ts, e.models)
        for name in ("mf", "users", "tower"):
            own = e.sources[name].retrieve(batch, e.limits[name])[0]
            place = {item: r for r, item in enumerate(e.items.ids[own.rows].tolist())}
            for j, item in enumerate(served.candidates):
                r = place.get(item)
                assert served.features[j, COL[f"{name}_rank"]] == (ABSENT_RANK if r is None else r)
                # FAISS's float32 products differ in the last bits between a batch of 8 and of 1
                assert served.features[j, COL[f"{name}_score"]] == (0.0 if r is None else pytest.approx(own.scores[r], rel=1e-6))
            proposed_by_new += len(place)
        assert served.model.endswith(";retrieval=")  # the bundle of the test world has no version
    assert proposed_by_new > 0
    assert any(src in p for s in refresh(e, users(world)) for p in s.sources for src in ("mf", "users", "tower"))


def test_every_feature_equals_the_per_candidate_reference(world: dict[str, Any]) -> None:
    e = engine(world)
    who: list[str | None] = [*users(world), "nobody-ever", None]
    for served in refresh(e, who):
        assert served.features.shape == (len(served.candidates), len(FEATURES))
        assert served.features.dtype == np.float64 and np.isfinite(served.features).all()
        expected = reference_features(world, e, served)
        for name, j in COL.items():
            # float32 session embeddings: dot products agree to float rounding; the rest exactly
            # or to the last bits of a few float operations
            tol = 1e-5 if name in ("seq_score", "seq_rel") else 1e-12
            np.testing.assert_allclose(served.features[:, j], expected[:, j], rtol=tol, atol=tol,
                                       err_msg=f"{name} of {served.user}")
        # every candidate of the list is logged (log_top covers them) and unique
        assert len(set(served.candidates)) == len(served.candidates)
        # what is logged is what was served: the served log's matrix is these rows in float32
        assert np.array_equal(served_log(served).matrix(), served.features.astype(np.float32))


def test_a_batch_is_refreshed_as_each_user_alone(world: dict[str, Any]) -> None:
    """Vectorising over the batch changes nothing: the same lists and feature rows (without
    exploration, whose draws depend on the order the generator is used in)."""
    who: list[str | None] = [*users(world, 10), None, "nobody-ever"]
    options = {"sources": ["seq", "cf", "trend"], "explore_slots": 0}
    together = refresh(engine(world, **options), who)
    for user, got in zip(who, together):
        (alone,) = refresh(engine(world, **options), [user])  # a fresh worker: same clock for the default list
        assert got.items == alone.items and got.candidates == alone.candidates, user
        assert got.sources == alone.sources and got.scores == alone.scores, user
        np.testing.assert_allclose(got.features, alone.features, rtol=1e-6, atol=1e-6)


def test_three_stages_keeping_every_candidate_serve_what_the_full_ranker_serves(world: dict[str, Any]) -> None:
    trained = ranker()
    who: list[str | None] = [*users(world), None]
    full = refresh(engine(world, trained, coarse_candidates=0), who)
    kept_all = refresh(engine(world, trained, coarse_candidates=10_000, coarse_trees=5), who)
    for a, b in zip(full, kept_all):
        assert a.items == b.items and a.scores == b.scores and a.candidates == b.candidates
        assert np.array_equal(a.features, b.features)


def test_the_coarse_stage_cuts_and_scores_what_it_keeps_exactly(world: dict[str, Any]) -> None:
    trained = ranker(1)
    e = engine(world, trained, coarse_candidates=12, coarse_trees=5)
    e.keep_unpruned = True
    full_engine = engine(world, trained, coarse_candidates=0)
    who: list[str | None] = [*users(world), None]
    cut_any = False
    for served, full in zip(refresh(e, who), refresh(full_engine, who)):
        X = served.features
        assert set(served.candidates) == set(full.candidates)  # the cut keeps every candidate logged
        n = len(served.candidates)
        explore = {j for j, it in enumerate(served.candidates) if it in served.by_source.get("explore", [])}
        # the served list's scores are the full model's, bit for bit
        picked = [served.candidates.index(it) for it in served.items]
        assert np.array_equal(np.array(served.scores), trained.score(X[picked]))
        # the candidates in order: the m kept ones (the best 12 by the head's sums, and every
        # exploration candidate) best first by the full model, then the dropped ones
        scores = trained.score(X)
        head = e.models.ranker.staged(5).coarse(X)  # type: ignore[union-attr]

        def cut_at(m: int) -> bool:
            ranked = [j for j in range(m) if j not in explore]
            return (explore <= set(range(m)) and bool(np.all(np.diff(scores[:m]) <= 0))
                    and (m == n or head[m:].max() <= head[ranked].min()))

        assert any(cut_at(m) for m in range(min(n, 12), min(n, 12 + len(explore)) + 1)), served.user
        cut_any |= n > 12 + len(explore)
        # the list without the cut is what the full ranker serves
        assert served.unpruned == full.items
    assert cut_any


def test_native_trees_serve_exactly_what_the_numpy_trees_serve(world: dict[str, Any]) -> None:
    """serving.tree_evaluator changes the cost, not the lists: with and without the coarse
    stage, the same items with the same scores, bit for bit."""
    who: list[str | None] = [*users(world), None]
    for coarse in (12, 0):
        numpy_ranker, native_ranker = ranker(2), ranker(2)
        e = engine(world, native_ranker, coarse_candidates=coarse, coarse_trees=5)
        e.prepare(e.models)
        assert native_ranker.evaluator == "native"
        if coarse:
            assert type(native_ranker.staged(5)).__name__ == "NativeStages"
        plain = engine(world, numpy_ranker, coarse_candidates=coarse, coarse_trees=5)
        assert numpy_ranker.evaluator == "compiled"
        for a, b in zip(refresh(e, who), refresh(plain, who)):
            assert a.items == b.items and a.scores == b.scores and a.candidates == b.candidates


def test_coarse_stage_is_off_with_the_heuristic_blend(world: dict[str, Any]) -> None:
    a = refresh(engine(world, coarse_candidates=5), users(world, 4))
    b = refresh(engine(world, coarse_candidates=0), users(world, 4))
    assert [x.items for x in a] == [x.items for x in b]
    assert [x.candidates for x in a] == [x.candidates for x in b]


# -- exploration policies, diversity, experiments, explanations (issue 13) -------------------


def test_logged_propensities_of_epsilon_greedy_are_exact(world: dict[str, Any]) -> None:
    """Every exploration pick's logged propensity is epsilon / (items left) + (1 - epsilon) when
    it is the best posterior mean left, computed here from the logged action set; ranked and
    cold-start slots are deterministic (1)."""
    from streamrec.models.learners import beta_moments

    e = engine(world, policy="epsilon-greedy", epsilon=0.4, explore_slots=3)
    seen_random = False
    for s in refresh(e, [*users(world), None]):
        assert len(s.kinds) == len(s.propensities) == len(s.items)
        for kind, p in zip(s.kinds, s.propensities):
            assert kind in ("rank", "cold", "explore", "fill") and (p == 1.0 or kind == "explore")
        d = s.decision
        if d is None:
            continue
        mean = beta_moments(np.array(d.alpha), np.array(d.beta))[0]
        left = list(np.lexsort((np.arange(len(mean)), -mean)))
        for pick, slot, p in zip(d.picks, d.slots, d.propensities):
            assert s.items[slot] == d.items[pick] and s.kinds[slot] == "explore" and s.propensities[slot] == p
            expected = 0.4 / len(left) + (0.6 if pick == left[0] else 0.0)
            assert p == pytest.approx(expected, abs=1e-15)
            seen_random |= pick != left[0]
            left.remove(pick)
        logged = served_log(s)
        assert logged.decision is not None and logged.decision.propensities == d.propensities
        assert np.array_equal(logged.slot_matrix(), s.slot_features)
    assert seen_random


def test_every_policy_serves_full_distinct_lists(world: dict[str, Any]) -> None:
    for policy in ("greedy", "ucb", "thompson", "epsilon-greedy"):
        for s in refresh(engine(world, policy=policy), [*users(world, 4), None]):
            assert len(s.items) == 10 and len(set(s.items)) == 10, policy
            assert s.policy == policy


def test_diversity_rerank_spreads_categories_and_zero_weight_changes_nothing(world: dict[str, Any]) -> None:
    from streamrec.models.simworld import concentration

    who = users(world)
    plain = refresh(engine(world, explore_slots=0), who)
    again = refresh(engine(world, explore_slots=0, diversity=0.0), who)
    assert [s.items for s in plain] == [s.items for s in again]
    diverse = refresh(engine(world, explore_slots=0, diversity=0.7, diversity_by="categories"), who)
    store: StateStore = world["store"]

    def spread(lists: list[Served]) -> float:
        cats = [[(store.item(i, NAMESPACE) or {}).get("category") or "" for i in s.items] for s in lists]
        return float(np.mean([concentration(np.array(c)) for c in cats]))

    assert spread(diverse) < spread(plain)
    vectors = refresh(engine(world, explore_slots=0, diversity=0.7, diversity_by="vectors"), who)
    assert [s.items for s in vectors] != [s.items for s in plain]


def test_interleaving_drafts_both_rankers_and_ab_serves_the_treatment(world: dict[str, Any]) -> None:
    from streamrec.models.interleave import team_draft
    from streamrec.models.ranking import HeuristicBlend

    control, treatment = ranker(1), HeuristicBlend()
    who = users(world)
    for mode in ("interleave", "ab"):
        e = engine(world, control, explore_slots=0)
        e.settings = e.settings.model_copy(update={"experiment": e.settings.experiment.model_copy(
            update={"mode": mode, "treatment": treatment.version, "share": 1.0})})
        e.swap(ModelSet(control, world["seq"], world["index"], world["content"], "t", treatment=treatment))
        alone_c = refresh(engine(world, control, explore_slots=0), who)
        alone_t = refresh(engine(world, treatment, explore_slots=0), who)
        for s, c, t in zip(refresh(e, who), alone_c, alone_t):
            assert s.arm in ("control", "treatment")
            if mode == "ab":
                assert s.items == (t.items if s.arm == "treatment" else c.items) and not s.teams
                continue
            assert len(s.teams) == 10 and set(s.teams) <= {"a", "b"}
            assert abs(s.teams.count("a") - s.teams.count("b")) <= 1
            assert s.model.endswith(f";treatment={treatment.version}")
            for item, team, score in zip(s.items, s.teams, s.scores):  # each team placed its own ranker's items
                assert item in (c.items if team == "a" else t.items)
                own = c if team == "a" else t  # the slot's score is its ranker's
                assert score == pytest.approx(own.scores[own.items.index(item)], rel=1e-9, abs=1e-12)
            assert all(p in (0.5, 1.0) for p in s.propensities)
            # the same draft from the two lists, replayed with a coin per tied round
            a, b = c.items, t.items
            assert set(s.items) <= set(a) | set(b) and len(team_draft(a, b, 10, np.random.default_rng(0))[0]) == 10


def test_explanations_sum_to_the_served_score(world: dict[str, Any]) -> None:
    """For every served item: at least one source, and the ranker's contributions plus bias
    equal its served score (LightGBM's pred_contrib: within 1e-9; the blend: its own terms)."""
    from streamrec.infra.recstore import RecStore
    from streamrec.streams.explain import explain_log

    from streamrec.models.deepfm import DeepFMConfig, train_deepfm
    from tests.test_ranking import synthetic_lists

    trained = ranker(2)
    neural = train_deepfm(*synthetic_lists(200, 20, seed=2), config=DeepFMConfig(threads=1, epochs=3))
    store: StateStore = world["store"]
    recstore = RecStore(store, 1)
    versions = {}
    for r in (trained, neural):
        versions[id(r)] = f"explain-{uuid.uuid4().hex[:8]}"
        recstore.publish_model("ranker", versions[id(r)], r.to_bytes(), {}, keep=3)
    for r in (trained, neural, None):
        version = versions.get(id(r), "")
        for s in refresh(engine(world, r), users(world, 4)):
            log = served_log(s)
            if r is not None:  # as serving labels it: the version the registry holds
                log = msgspec.structs.replace(log, model=f"ranker={version};seq=t")
            for item in s.items:
                why = explain_log(log, item, recstore)
                assert why["sources"], (item, why)
                assert why["ranker"] == (version if r is not None else "heuristic-rrf")
                total = sum(why["contributions"].values()) + why["bias"]
                assert total == pytest.approx(why["score"], abs=1e-9)
                assert why["sum_error"] < 1e-9
                assert why["position"] == s.items.index(item) and why["propensity"] == s.propensities[why["position"]]


def test_explanations_of_an_interleaved_list_use_the_ranker_that_placed_each_slot(world: dict[str, Any]) -> None:
    """Team "b" slots were placed (and scored) by the treatment: their contributions are the
    treatment's and sum to the logged score, as the control's do for team "a"."""
    from streamrec.infra.recstore import RecStore
    from streamrec.models.ranking import HeuristicBlend
    from streamrec.streams.explain import explain_log

    control, treatment = ranker(2), HeuristicBlend()
    recstore = RecStore(world["store"], 1)
    version = f"explain-{uuid.uuid4().hex[:8]}"
    recstore.publish_model("ranker", version, control.to_bytes(), {}, keep=3)
    e = engine(world, control, explore_slots=0)
    e.settings = e.settings.model_copy(update={"experiment": e.settings.experiment.model_copy(
        update={"mode": "interleave", "treatment": treatment.version, "share": 1.0})})
    e.swap(ModelSet(control, world["seq"], world["index"], world["content"], "t", treatment=treatment))
    seen = set()
    for s in refresh(e, users(world, 4)):
        log = msgspec.structs.replace(served_log(s), model=f"ranker={version};seq=t;treatment={treatment.version}")
        for item, team in zip(s.items, s.teams):
            why = explain_log(log, item, recstore)
            expected = "treatment" if team == "b" else "control"
            assert (why["team"], why["ranked_by"]) == (expected, expected)
            assert why["ranker"] == (treatment.version if team == "b" else version)
            assert sum(why["contributions"].values()) + why["bias"] == pytest.approx(why["score"], abs=1e-9)
            seen.add(team)
    assert seen == {"a", "b"}
