"""The re-ranking stage, as pure functions: compiled trees, the heuristic blend, LambdaMART."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from itertools import pairwise

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.models.errors import ConfigError
from streamrec.models.ranking import (
    FEATURES,
    RANKED_SOURCES,
    CompiledTrees,
    HeuristicBlend,
    NativeTrees,
    Ranker,
    RankerConfig,
    TrainedRanker,
    native_trees_available,
    train_ranker,
)

if TYPE_CHECKING:
    from streamrec.models.deepfm import DeepFMRanker

F = len(FEATURES)
COL = {name: i for i, name in enumerate(FEATURES)}
ABSENT = 10_000.0


def synthetic_lists(n_groups: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Lists of ``size`` candidates, one clicked; the click shows in content_sim and popularity
    (and their interaction), the source ranks are random, so the heuristic blend is blind."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * size, F))
    for g in range(n_groups):
        rows = slice(g * size, (g + 1) * size)
        for col in ("seq_rank", "cf_rank", "trend_rank"):
            ranks = rng.permutation(size).astype(float)
            ranks[rng.random(size) < 0.3] = ABSENT
            X[rows, COL[col]] = ranks
    y = np.zeros(n_groups * size, dtype=np.int64)
    clicked = np.arange(n_groups) * size + rng.integers(0, size, n_groups)
    y[clicked] = 1
    X[clicked, COL["content_sim"]] += 2.0
    X[clicked, COL["popularity"]] += 1.0 * (X[clicked, COL["session_len"]] > 0)
    return X, y, [size] * n_groups


# one thread: LightGBM's OpenMP threads spin-wait, and are many times slower on busy cores
ONE_THREAD = RankerConfig(n_trees=80, num_threads=1)


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    """A lambdarank model like the ranker's: 200 trees, 31 leaves, no missing-value handling."""
    X, y, groups = synthetic_lists(400, 20, seed=1)
    params = {"objective": "lambdarank", "num_leaves": 31, "max_depth": 8, "learning_rate": 0.1,
              "min_data_in_leaf": 5, "use_missing": False, "deterministic": True,
              "force_row_wise": True, "num_threads": 1, "seed": 1, "verbosity": -1}
    return lgb.train(params, lgb.Dataset(X, y, group=groups), num_boost_round=200)


@pytest.fixture(scope="module")
def compiled(booster: lgb.Booster) -> CompiledTrees:
    return CompiledTrees.from_booster(booster)


@pytest.fixture(scope="module")
def thresholds(booster: lgb.Booster) -> list[np.ndarray]:
    return split_values(booster)


@pytest.fixture(scope="module")
def trained() -> TrainedRanker:
    X, y, groups = synthetic_lists(600, 20, seed=2)
    return train_ranker(X, y, groups, params=ONE_THREAD, seed=0)


def split_values(booster: lgb.Booster) -> list[np.ndarray]:
    """Per feature: every threshold the model splits on (empty when the feature is unused)."""
    out: list[list[float]] = [[] for _ in range(F)]
    stack = [info["tree_structure"] for info in booster.dump_model()["tree_info"]]
    while stack:
        node = stack.pop()
        if "split_feature" in node:
            out[node["split_feature"]].append(node["threshold"])
            stack += [node["left_child"], node["right_child"]]
    return [np.array(v) for v in out]


def tricky_matrix(thresholds: list[np.ndarray], n: int, seed: int, on_threshold: float) -> np.ndarray:
    """Random rows where a fraction of the cells sit exactly on a split threshold or one ulp
    either side of it, the values where a wrong comparison would show."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, F)) * rng.choice([0.1, 1.0, 10.0], size=F)
    for f, values in enumerate(thresholds):
        if len(values) == 0:
            continue
        pick = rng.random(n) < on_threshold
        t = rng.choice(values, size=int(pick.sum()))
        nudge = rng.integers(-1, 2, size=t.shape)
        t = np.where(nudge < 0, np.nextafter(t, -np.inf), np.where(nudge > 0, np.nextafter(t, np.inf), t))
        X[pick, f] = t
    # LightGBM reads |x| <= 1e-35 (float32) as 0 and may split at +-1e-35: cells around zero
    tiny = float(np.float32(1e-35))
    near_zero = [0.0, -0.0, tiny, -tiny, np.nextafter(tiny, 1), -np.nextafter(tiny, 1), 1e-36, 5e-324]
    pick = rng.random((n, F)) < on_threshold / 10
    X[pick] = rng.choice(near_zero, size=int(pick.sum()))
    return X


# -- compiled trees ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 1100), seed=st.integers(0, 2**32 - 1),
       on_threshold=st.sampled_from([0.0, 0.5, 1.0]))
def test_compiled_trees_equal_lightgbm_bit_for_bit(booster: lgb.Booster, compiled: CompiledTrees,
                                                   thresholds: list[np.ndarray], n: int, seed: int,
                                                   on_threshold: float) -> None:
    X = tricky_matrix(thresholds, n, seed, on_threshold)
    expected = booster.predict(X, raw_score=True, num_threads=1)
    assert np.array_equal(compiled.predict(X), expected)


@pytest.fixture(scope="module")
def direct(booster: lgb.Booster) -> CompiledTrees:
    """The same model with split sets built by direct comparison (what small models use)."""
    return CompiledTrees.from_booster(booster, strategy="direct")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1),
       on_threshold=st.sampled_from([0.0, 0.5, 1.0]), trees=st.sampled_from([1, 5, 20, None]))
def test_direct_split_sets_equal_lightgbm_bit_for_bit(booster: lgb.Booster, direct: CompiledTrees,
                                                      thresholds: list[np.ndarray], n: int, seed: int,
                                                      on_threshold: float, trees: int | None) -> None:
    X = tricky_matrix(thresholds, n, seed, on_threshold)
    model = direct if trees is None else CompiledTrees.from_booster(booster, num_iteration=trees, strategy="direct")
    assert model.direct
    assert np.array_equal(model.predict(X), booster.predict(X, raw_score=True, num_threads=1, num_iteration=trees))


def test_small_models_compare_directly_and_large_ones_sort(booster: lgb.Booster) -> None:
    assert CompiledTrees.from_booster(booster, num_iteration=10).direct
    assert not CompiledTrees.from_booster(booster).direct
    with pytest.raises(ConfigError, match="strategy"):
        CompiledTrees.from_booster(booster, strategy="fast")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 1100), seed=st.integers(0, 2**32 - 1), first=st.integers(1, 199),
       on_threshold=st.sampled_from([0.0, 0.5]))
def test_head_then_tail_equals_the_whole_model_bit_for_bit(booster: lgb.Booster, thresholds: list[np.ndarray],
                                                           n: int, seed: int, first: int,
                                                           on_threshold: float) -> None:
    """The coarse stage's sums continued by the rest of the trees are LightGBM's scores exactly,
    on any subset of the rows (those the coarse stage kept)."""
    X = tricky_matrix(thresholds, n, seed, on_threshold)
    head = CompiledTrees.from_booster(booster, num_iteration=first)
    tail = CompiledTrees.from_booster(booster, start_iteration=first)
    assert head.n_trees + tail.n_trees == 200
    partial = head.predict(X)
    assert np.array_equal(partial, booster.predict(X, raw_score=True, num_iteration=first))
    kept = np.random.default_rng(seed).random(n) < 0.3
    assert np.array_equal(tail.predict(X[kept], init=partial[kept]),
                          booster.predict(X[kept], raw_score=True, num_threads=1))


def test_trained_ranker_stages(trained: TrainedRanker) -> None:
    X, _, _ = synthetic_lists(40, 20, seed=11)
    n = trained.n_trees
    stages = trained.staged(3)
    assert stages is not None and stages.head.n_trees == 3 and stages.tail.n_trees == n - 3
    assert trained.staged(3) is stages  # compiled once
    assert np.array_equal(stages.finish(X, stages.coarse(X)), trained.score(X))
    assert trained.staged(0) is None and trained.staged(n) is None
    assert HeuristicBlend().staged(3) is None
    with pytest.raises(ConfigError, match="init"):
        stages.tail.predict(X, init=np.zeros(3))


# -- native trees (lleaves) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def native(booster: lgb.Booster) -> NativeTrees:
    assert native_trees_available(), "lleaves (a declared dependency) does not import"
    return NativeTrees(booster)


@pytest.fixture(scope="module")
def native_head(booster: lgb.Booster) -> NativeTrees:
    return NativeTrees(booster, num_iteration=20)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1), on_threshold=st.sampled_from([0.0, 0.5, 1.0]))
def test_native_trees_equal_lightgbm_bit_for_bit(booster: lgb.Booster, native: NativeTrees, native_head: NativeTrees,
                                                 thresholds: list[np.ndarray], n: int, seed: int,
                                                 on_threshold: float) -> None:
    """Cells on every threshold, one ulp either side, and around LightGBM's zero threshold."""
    X = tricky_matrix(thresholds, n, seed, on_threshold)
    assert np.array_equal(native.predict(X), booster.predict(X, raw_score=True, num_threads=1))
    assert np.array_equal(native_head.predict(X), booster.predict(X, raw_score=True, num_threads=1, num_iteration=20))


def test_a_ranker_compiled_to_native_code_scores_the_same(trained: TrainedRanker) -> None:
    X, _, _ = synthetic_lists(60, 20, seed=12)
    plain = TrainedRanker(trained.model_text, trained.report, trained.version)
    before = plain.score(X)
    assert plain.evaluator == "compiled"
    assert plain.compile_native([3, 10_000]) and plain.evaluator == "native"
    assert plain.compile_native([3])  # again: nothing to do
    assert np.array_equal(plain.score(X), before)
    assert np.array_equal(plain.score(X), trained.booster.predict(X, raw_score=True, num_threads=1))
    stages = plain.staged(3)
    assert stages is not None and type(stages).__name__ == "NativeStages"
    assert np.array_equal(stages.coarse(X), trained.booster.predict(X, raw_score=True, num_threads=1, num_iteration=3))
    assert np.array_equal(stages.finish(X[:7], stages.coarse(X[:7])), before[:7])
    assert type(plain.staged(5)).__name__ == "TreeStages"  # a head not compiled natively: numpy
    with pytest.raises(ConfigError, match="shape"):
        plain._native.predict(X[:, :3])  # type: ignore[union-attr]


def test_compiled_trees_block_edges_and_ties(booster: lgb.Booster, compiled: CompiledTrees,
                                             thresholds: list[np.ndarray]) -> None:
    for n in (0, 1, 2, 63, 64, 65, 511, 512, 513, 1024, 1025):
        X = tricky_matrix(thresholds, n, seed=n, on_threshold=0.7)
        X[: n // 2] = X[:1]  # many identical rows
        assert np.array_equal(compiled.predict(X), booster.predict(X, raw_score=True)), n
    X = np.asfortranarray(tricky_matrix(thresholds, 100, seed=1, on_threshold=0.7))
    before = X.copy()
    assert np.array_equal(compiled.predict(X), booster.predict(X, raw_score=True))
    assert np.array_equal(X, before, equal_nan=True)  # the input is not changed


def test_compiled_trees_handle_stumps_and_early_iterations(booster: lgb.Booster,
                                                           thresholds: list[np.ndarray]) -> None:
    X = tricky_matrix(thresholds, 300, seed=5, on_threshold=0.5)
    for k in (1, 7):
        compiled = CompiledTrees.from_booster(booster, num_iteration=k)
        assert np.array_equal(compiled.predict(X), booster.predict(X, raw_score=True, num_iteration=k))
    # a tree that is a single leaf (no split)
    stump = booster.dump_model(num_iteration=1)
    stump["tree_info"][0]["tree_structure"] = {"leaf_value": 0.25, "leaf_index": 0}
    assert np.array_equal(CompiledTrees(stump).predict(X[:3]), np.full(3, 0.25))


@pytest.mark.parametrize("change", [{"decision_type": "=="}, {"missing_type": "NaN"},
                                    {"missing_type": "Zero"}])
def test_compiled_trees_refuse_unsupported_splits(booster: lgb.Booster, change: dict[str, str]) -> None:
    dump = booster.dump_model(num_iteration=3)
    dump["tree_info"][2]["tree_structure"]["left_child"].update(change)
    with pytest.raises(ConfigError, match="CompiledTrees"):
        CompiledTrees(dump)


def test_compiled_trees_check_the_width(compiled: CompiledTrees) -> None:
    with pytest.raises(ConfigError, match="shape"):
        compiled.predict(np.zeros((3, F - 1)))


# -- the heuristic blend -------------------------------------------------------------------


def rows(**columns: list[float]) -> np.ndarray:
    n = len(next(iter(columns.values())))
    X = np.zeros((n, F))
    X[:, [COL[f"{name}_rank"] for name in RANKED_SOURCES]] = ABSENT
    for name, values in columns.items():
        X[:, COL[name]] = values
    return X


def test_heuristic_blend_is_reciprocal_rank_fusion() -> None:
    X = rows(seq_rank=[0, 3, ABSENT], cf_rank=[5, ABSENT, ABSENT], trend_rank=[ABSENT, 1, 2],
             tower_rank=[ABSENT, ABSENT, 4], post_mean=[0.3, 0.9, 0.0])
    absent = 1 / 10_060  # each of the sources that did not rank the candidate
    assert len(RANKED_SOURCES) == 6
    expected = [1 / 60 + 1 / 65 + 4 * absent + 0.3e-9,
                1 / 63 + 1 / 61 + 4 * absent + 0.9e-9,
                1 / 62 + 1 / 64 + 4 * absent]
    np.testing.assert_allclose(HeuristicBlend().score(X), expected, rtol=1e-15, atol=0)


def test_heuristic_post_mean_breaks_ties_only() -> None:
    X = rows(seq_rank=[9_998, 9_999, ABSENT, ABSENT], post_mean=[0.0, 1.0, 0.2, 0.8])
    scores = HeuristicBlend().score(X)
    assert list(np.argsort(-scores)) == [0, 1, 3, 2]  # a better rank wins; post_mean orders ties


# -- LambdaMART ----------------------------------------------------------------------------


def top1_rate(ranker: Ranker, X: np.ndarray, y: np.ndarray, groups: list[int]) -> float:
    scores = ranker.score(X)
    bounds = np.cumsum([0, *groups])
    hits = [y[lo + int(np.argmax(scores[lo:hi]))] > 0 for lo, hi in pairwise(bounds)]
    return float(np.mean(hits))


def test_trained_ranker_learns_the_click_signal(trained: TrainedRanker) -> None:
    X, y, groups = synthetic_lists(300, 20, seed=3)  # fresh lists
    learned = top1_rate(trained, X, y, groups)
    heuristic = top1_rate(HeuristicBlend(), X, y, groups)
    rng = np.random.default_rng(0)
    random = float(np.mean([y[g * 20 + rng.integers(20)] for g in range(300)]))
    assert learned > 0.4, learned
    assert learned > 3 * max(heuristic, random, 0.05), (learned, heuristic, random)
    importance = trained.feature_importance()
    assert list(importance) == list(FEATURES)
    assert max(importance, key=importance.__getitem__) == "content_sim"


def test_trained_ranker_report_and_scores(trained: TrainedRanker) -> None:
    report = trained.report
    assert report["n_groups"] == 600 and report["n_rows"] == 12_000 and report["positives"] == 600
    assert report["train_groups"] + report["valid_groups"] == 600 and report["valid_groups"] == 120
    assert 1 <= report["best_iteration"] <= 80
    assert 0.5 < report["valid_ndcg@10"] <= 1.0
    assert trained.version.startswith("lambdamart-")
    assert isinstance(trained, Ranker) and isinstance(HeuristicBlend(), Ranker)
    X, _, _ = synthetic_lists(30, 20, seed=4)
    scores = trained.score(X)
    assert scores.shape == (600,) and scores.dtype == np.float64
    assert np.array_equal(scores, trained.booster.predict(X, raw_score=True))
    assert trained.score(np.zeros((0, F))).shape == (0,)


def test_round_trip_through_bytes(trained: TrainedRanker) -> None:
    blob = trained.to_bytes()
    back = TrainedRanker.from_bytes(blob)
    X, _, _ = synthetic_lists(25, 20, seed=5)
    assert np.array_equal(back.score(X), trained.score(X))
    assert (back.version, back.report) == (trained.version, trained.report)
    assert back.to_bytes() == blob


def test_from_bytes_refuses_another_feature_list(trained: TrainedRanker) -> None:
    doc = json.loads(trained.to_bytes())
    for features in (list(reversed(FEATURES)), list(FEATURES[:-1]), [*FEATURES, "extra"]):
        with pytest.raises(ConfigError, match="features"):
            TrainedRanker.from_bytes(json.dumps({**doc, "features": features}).encode())
    with pytest.raises(ConfigError, match="format"):
        TrainedRanker.from_bytes(json.dumps({**doc, "format": "other/9"}).encode())
    with pytest.raises(ConfigError, match="JSON"):
        TrainedRanker.from_bytes(b"\x00not json")


def test_lists_without_signal_are_dropped() -> None:
    X, y, groups = synthetic_lists(200, 10, seed=6)
    X2 = np.concatenate([X, np.zeros((30, F))])
    y2 = np.concatenate([y, np.zeros(20, dtype=np.int64), np.ones(10, dtype=np.int64)])
    ranker = train_ranker(X2, y2, [*groups, 20, 10], params=RankerConfig(n_trees=5, num_threads=1),
                          seed=1)
    assert ranker.report["dropped_groups"] == 2 and ranker.report["n_groups"] == 200


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(trained: TrainedRanker, bad: float) -> None:
    X, y, groups = synthetic_lists(20, 10, seed=7)
    X[13, COL["post_std"]] = bad
    with pytest.raises(ConfigError, match="post_std"):
        train_ranker(X, y, groups, params=ONE_THREAD)
    for ranker in (trained, HeuristicBlend()):
        with pytest.raises(ConfigError, match="non-finite"):
            ranker.score(X)


def test_nothing_to_learn_from_is_an_error() -> None:
    X, y, groups = synthetic_lists(20, 10, seed=8)
    with pytest.raises(ConfigError, match="nothing to learn"):
        train_ranker(X, np.zeros_like(y), groups, params=ONE_THREAD)
    with pytest.raises(ConfigError, match="nothing to learn"):
        train_ranker(X, np.ones_like(y), groups, params=ONE_THREAD)


@pytest.mark.parametrize("case", ["groups", "labels", "shape", "valid", "label_range"])
def test_bad_training_arguments(case: str) -> None:
    X, y, groups = synthetic_lists(20, 10, seed=9)
    args: dict[str, object] = {"X": X, "labels": y, "groups": groups}
    kwargs: dict[str, object] = {"params": ONE_THREAD}
    if case == "groups":
        args["groups"] = [*groups[:-1], 9]
    elif case == "labels":
        args["labels"] = y[:-1]
    elif case == "shape":
        args["X"] = X[:, :-1]
    elif case == "valid":
        kwargs["valid_fraction"] = 1.0
    else:
        args["labels"] = y * 0.5
    with pytest.raises(ConfigError):
        train_ranker(args["X"], args["labels"], args["groups"], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("field,value", [("n_trees", 0), ("num_leaves", 1), ("max_depth", 13),
                                         ("learning_rate", 0.0), ("min_data_in_leaf", 0),
                                         ("early_stopping_rounds", 0),
                                         ("num_threads", 0)])
def test_ranker_config_validates(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        RankerConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("objective", ["rank_xendcg", "binary"])
def test_every_objective_learns_the_click_signal_and_round_trips(objective: str) -> None:
    """The listwise rank_xendcg and the pointwise binary objective train the same Ranker from
    the same lists: it learns the signal, its contributions sum to its score, and it survives
    bytes (no pickle) exactly."""
    X, y, groups = synthetic_lists(600, 20, seed=2)
    ranker = train_ranker(X, y, groups, params=RankerConfig(num_threads=1, objective=objective), seed=0)
    assert ranker.report["objective"] == objective
    fresh, fy, fg = synthetic_lists(300, 20, seed=3)
    assert top1_rate(ranker, fresh, fy, fg) > 0.4
    back = TrainedRanker.from_bytes(ranker.to_bytes())
    assert np.array_equal(back.score(fresh), ranker.score(fresh))
    contrib = ranker.contributions(fresh[:50])
    assert np.allclose(contrib.sum(1), ranker.score(fresh[:50]), atol=1e-9)
    with pytest.raises(ConfigError, match="objective"):
        RankerConfig(objective="regression")


# -- DeepFM: the neural ranker behind the same protocol --------------------------------------


@pytest.fixture(scope="module")
def deepfm() -> "DeepFMRanker":
    from streamrec.models.deepfm import DeepFMConfig, train_deepfm

    X, y, groups = synthetic_lists(600, 20, seed=2)
    return train_deepfm(X, y, groups, config=DeepFMConfig(threads=1, epochs=30), seed=0)


def test_deepfm_learns_the_click_signal_and_keeps_the_ranker_contract(deepfm: "DeepFMRanker") -> None:
    from streamrec.models.rankers import is_trained, ranker_from_bytes

    X, y, groups = synthetic_lists(300, 20, seed=3)
    assert isinstance(deepfm, Ranker) and is_trained(deepfm) and deepfm.version.startswith("deepfm-")
    assert top1_rate(deepfm, X, y, groups) > 0.4
    assert top1_rate(deepfm, X, y, groups) > 3 * top1_rate(HeuristicBlend(), X, y, groups)
    assert deepfm.staged(10) is None and deepfm.score(np.zeros((0, F))).shape == (0,)
    scores = deepfm.score(X)
    assert scores.shape == (6000,) and scores.dtype == np.float64
    contrib = deepfm.contributions(X[:200])
    assert contrib.shape == (200, F + 1)
    assert np.abs(contrib.sum(1) - scores[:200]).max() < 1e-9  # linear + FM halves + deep IG + bias
    blob = deepfm.to_bytes()
    assert not blob.startswith(b"\x80")  # not a pickle: a JSON header, then raw float64 tensors
    back = ranker_from_bytes(blob)
    assert type(back) is type(deepfm) and back.version == deepfm.version and back.to_bytes() == blob
    assert np.array_equal(back.score(X), scores)
    lgbm = train_ranker(*synthetic_lists(100, 20, seed=9), params=ONE_THREAD)
    assert type(ranker_from_bytes(lgbm.to_bytes())) is TrainedRanker


def test_deepfm_refuses_foreign_bytes_and_empty_signal() -> None:
    from streamrec.models.deepfm import DeepFMRanker, train_deepfm

    with pytest.raises(ConfigError):
        DeepFMRanker.from_bytes(b"\x00\x00\x00\x02{}")
    with pytest.raises(ConfigError, match="positive and a negative"):
        X, y, groups = synthetic_lists(10, 5, seed=1)
        train_deepfm(X, np.zeros_like(y), groups)
