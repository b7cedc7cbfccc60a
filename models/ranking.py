"""The re-ranking stage: one protocol, the heuristic blend, and a LambdaMART ranker.

Every ranker scores a feature matrix built by the serving code, one row per candidate:

    X: float64 (n, len(FEATURES))  ->  scores: float64 (n,), higher is better

Missing values arrive as finite sentinels (ranks 10_000, scores 0 or -1), never as NaN: the
trained trees are fitted with LightGBM's missing-value handling switched off, so a NaN would be
routed differently by LightGBM and by ``CompiledTrees``. Both ``train_ranker`` and ``score``
reject non-finite input with ``ConfigError``.

Serving evaluates the trees with ``NativeTrees`` (the model compiled to machine code by lleaves,
one tree per block, equal to ``Booster.predict`` bit for bit) once a serving worker has compiled
them, and with ``CompiledTrees`` (pure numpy, also equal bit for bit) until then or where
lleaves is not installed; LightGBM itself is slower than both at serving batch sizes
(``streamrec bench serve`` measures all of them on the real batch shape).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import lightgbm as lgb
import numpy as np

from streamrec.models.errors import ConfigError

FEATURES: tuple[str, ...] = (
    "seq_score", "seq_rank", "cf_score", "cf_rank", "trend_score", "trend_rank",
    "explore_draw", "n_sources", "post_mean", "post_std", "popularity", "item_age_h",
    "content_sim", "session_len", "since_last_s", "user_clicks",
    "cf_rel", "seq_rel", "pop_rel",
    "mf_score", "mf_rank", "users_score", "users_rank", "tower_score", "tower_rank",
)
# the candidate sources with a rank feature (``{name}_rank``; ABSENT_RANK where the source is
# not configured or did not propose the candidate), fused by the heuristic blend
RANKED_SOURCES: tuple[str, ...] = ("seq", "cf", "trend", "mf", "users", "tower")
_COL = {name: i for i, name in enumerate(FEATURES)}
ABSENT_RANK = 10_000.0  # a rank feature's value for a source that did not propose the candidate
FORMAT = "streamrec.ranker/1"  # the to_bytes envelope; bump when its fields change
MAX_LABEL = 30  # LightGBM's default label_gain covers relevance grades 0..30


@runtime_checkable
class Ranker(Protocol):
    """The one protocol of re-rankers. ``version`` names the model in logs and served lists."""

    version: str

    def score(self, X: np.ndarray) -> np.ndarray:
        """X float64 (n, len(FEATURES)) -> (n,) float64, higher is better."""
        ...

    def staged(self, first_trees: int) -> TreeStages | NativeStages | None:
        """The ranker split for a coarse stage after its first ``first_trees`` trees, or None
        when it has no such split (not a tree model, or no more trees than that)."""
        ...

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """(n, len(FEATURES) + 1): each feature's additive contribution to each row's score,
        the bias (expected value) last; a row's contributions and bias sum to its score
        (``streamrec explain``)."""
        ...


def check_features(X: Any, where: str) -> np.ndarray:
    """``X`` as a C-contiguous float64 (n, len(FEATURES)) array of finite values, or ConfigError."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(FEATURES):
        raise ConfigError(f"{where}: expected X of shape (n, {len(FEATURES)}), got {X.shape}")
    if not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ConfigError(
            f"{where}: non-finite value {X[bad[0], bad[1]]} at row {bad[0]}, feature "
            f"{FEATURES[bad[1]]!r}; encode missing values as finite sentinels")
    return X


# -- the heuristic blend -------------------------------------------------------------------


@dataclass
class HeuristicBlend:
    """The serving policy before any ranker is trained: reciprocal-rank fusion.

        score = sum over the rank features r of RANKED_SOURCES of 1 / (k + r)
                + tie_break * clip(post_mean, 0, 1)

    with k = 60 and ranks as the caller encodes them (0-based; 10_000 = absent, which adds
    ~1e-4). ``tie_break`` = 1e-9 is below the gap between two adjacent ranks of one source
    (1 / (10_060 * 10_061) ~ 1e-8 at worst), so ``post_mean`` orders candidates the fusion ties,
    such as those that no source ranked, and does not overturn a better rank.
    """

    k: float = 60.0
    tie_break: float = 1e-9
    version: str = "heuristic-rrf"

    def score(self, X: np.ndarray) -> np.ndarray:
        X = check_features(X, "HeuristicBlend.score")
        ranks = X[:, [_COL[f"{name}_rank"] for name in RANKED_SOURCES]]  # (n, sources)
        fused: np.ndarray = (1.0 / (self.k + ranks)).sum(axis=1)
        return fused + self.tie_break * np.clip(X[:, _COL["post_mean"]], 0.0, 1.0)

    def staged(self, first_trees: int) -> None:
        """No coarse stage: the blend is cheaper than any cut."""
        return None

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """The blend's own terms: each rank's ``1 / (k + r)``, the tie-break term on
        ``post_mean``; no bias."""
        X = check_features(X, "HeuristicBlend.contributions")
        out = np.zeros((len(X), len(FEATURES) + 1))
        for name in RANKED_SOURCES:
            out[:, _COL[f"{name}_rank"]] = 1.0 / (self.k + X[:, _COL[f"{name}_rank"]])
        out[:, _COL["post_mean"]] = self.tie_break * np.clip(X[:, _COL["post_mean"]], 0.0, 1.0)
        return out


# -- compiled trees ------------------------------------------------------------------------


_BLOCK = 512  # rows per pass (sorted splits): each feature's row sets are (BLOCK/64, BLOCK+1) words
_DIRECT_CELLS = 1 << 19  # rows x splits compared per pass (direct splits)
_DIRECT_MAX_SPLITS = 1000  # at most this many distinct splits: direct comparison beats sorting (measured)
MAX_TREE_DEPTH = 12  # leaf values are stored per path: (trees, 2**depth) floats
# _BIT[w, r]: row r's bit in word w of a row set (bit r % 64 of word r // 64)
_BIT = np.zeros((_BLOCK // 64, _BLOCK), dtype=np.uint64)
_BIT[np.arange(_BLOCK) >> 6, np.arange(_BLOCK)] = np.left_shift(
    np.uint64(1), (np.arange(_BLOCK) & 63).astype(np.uint64))
_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ZERO = float(np.float32(1e-35))  # LightGBM's kZeroThreshold (a float constant, read as double)


class CompiledTrees:
    """A LightGBM model flattened into numpy arrays and evaluated on row bitsets.

    Equal to ``Booster.predict(X, raw_score=True)`` bit for bit on finite input: every split
    is ``x <= threshold`` in float64 as in LightGBM (which first reads |x| <= 1e-35 as 0),
    and leaf values are summed tree by tree in
    LightGBM's order. Rows go in blocks of up to 512; a set of rows is W = ceil(n / 64) words,
    and arrays of sets are word-major, (W, m).

    1. Split sets. Sorted (models with many splits): per feature, rows sorted by value; a
       running OR of their bits gives "the k largest rows" for every k, and a split (f, t)
       sends right the k = #(x_f > t) largest (one searchsorted per feature). Direct (models
       with few splits, such as the first trees of a model, and blocks of any size): every row
       compared with every split, the results packed into bits. R: (W, n_splits).
    2. Descent, one level of all trees at a time: a node's set splits into ``set & R[split]``
       (right) and ``set ^ right`` (left). Per tree, the union of right sets at depth d is bit d
       of the row's leaf path; rows that stopped at a leaf take no further bits.
    3. The path bits, unpacked to (T, n) ids, index each tree's leaf values; sum over trees.

    Cost: O(n_nodes * W) word operations and F sorts of n values, instead of the
    O(n * T * depth) element gathers of a per-row traversal (see scripts/bench_ranker.py).
    """

    def __init__(self, dump: dict[str, Any], strategy: str = "auto") -> None:
        """``strategy``: how split sets are built, "sorted", "direct" or "auto" (by the number
        of distinct splits); the scores are the same."""
        if strategy not in ("auto", "sorted", "direct"):
            raise ConfigError(f"CompiledTrees: strategy must be auto, sorted or direct, got {strategy!r}")
        if int(dump.get("num_tree_per_iteration", 1)) != 1:
            raise ConfigError("CompiledTrees: only single-output models (one tree per iteration)")
        if dump.get("average_output"):
            raise ConfigError("CompiledTrees: averaged (random forest) models are not supported")
        self.n_features = int(dump["max_feature_idx"]) + 1
        for info in dump["tree_info"]:
            if info.get("num_cat", 0):
                raise ConfigError(f"CompiledTrees: tree {info['tree_index']} has categorical splits")
        trees = [info["tree_structure"] for info in dump["tree_info"]]
        self.n_trees = T = len(trees)

        # breadth-first levels over all trees; a node's "slot" is its place in the previous
        # level's child sets: left child of node i at i, right child at m + i (m nodes)
        splits: dict[tuple[int, float], int] = {}
        levels: list[tuple[list[int], list[tuple[int, float]], list[int]]] = []
        leaves: list[tuple[int, int, float]] = []  # (tree, path bits, value)
        frontier: list[tuple[int, dict[str, Any], int, int]] = [
            (t, tree, t, 0) for t, tree in enumerate(trees)]  # (tree, node, slot, path)
        depth = 0
        while frontier:
            internal = [f for f in frontier if "leaf_value" not in f[1]]
            for t, node, _, path in frontier:
                if "leaf_value" in node:
                    leaves.append((t, path, float(node["leaf_value"])))
            if not internal:
                break
            if depth >= MAX_TREE_DEPTH:
                raise ConfigError(f"CompiledTrees: trees deeper than {MAX_TREE_DEPTH} levels")
            for _, node, _, _ in internal:
                self._check_split(node)
                splits.setdefault((int(node["split_feature"]), float(node["threshold"])), len(splits))
            levels.append(([slot for _, _, slot, _ in internal],
                           [(int(nd["split_feature"]), float(nd["threshold"])) for _, nd, _, _ in internal],
                           [t for t, _, _, _ in internal]))
            m = len(internal)
            frontier = [(t, nd["left_child"], i, path) for i, (t, nd, _, path) in enumerate(internal)]
            frontier += [(t, nd["right_child"], m + i, path | (1 << depth))
                         for i, (t, nd, _, path) in enumerate(internal)]
            frontier.sort(key=lambda f: f[0])  # stable: each tree's nodes contiguous, trees ascending
            depth += 1
        self.depth = depth
        self.leaf_value = np.zeros(T << depth)  # (T * 2**depth,): tree t, path p at (t << depth) | p
        for t, path, value in leaves:
            self.leaf_value[(t << depth) | path] = value

        # distinct splits, grouped by feature and sorted by threshold
        keys = sorted(splits)
        number = {key: i for i, key in enumerate(keys)}
        self.split_feature = np.array([k[0] for k in keys], dtype=np.intp)  # (S,)
        self.split_threshold = np.array([k[1] for k in keys], dtype=np.float64)  # (S,)
        self.feature_bounds = np.searchsorted(self.split_feature, np.arange(self.n_features + 1))
        self.direct = strategy == "direct" or (strategy == "auto" and len(keys) <= _DIRECT_MAX_SPLITS)
        # rows per pass: direct passes hold (rows, splits) comparisons; a multiple of 64
        self.block = max(64, (_DIRECT_CELLS // max(len(keys), 1)) // 64 * 64) if self.direct else _BLOCK

        # Row sets of one block live in one (W, T + 2N) array, N internal nodes in level order:
        # [roots: every row | left children of all levels | right children of all levels].
        # A level's slot i (left child of node i, or right child m + i) maps to a column.
        n_nodes = sum(len(lv[0]) for lv in levels)
        self.n_nodes = n_nodes
        self.node_split = np.array([number[k] for lv in levels for k in lv[1]], dtype=np.intp)  # (N,)
        self.levels: list[tuple[np.ndarray, int, int]] = []  # (columns of the level's sets, first, end)
        first = 0
        prev = np.arange(T)  # slot -> column, for level 0
        segments: list[tuple[int, int]] = []  # (depth, tree) of each run of right sets
        seg_starts: list[int] = []
        for d, (slots, _, node_trees) in enumerate(levels):
            m = len(slots)
            self.levels.append((prev[np.array(slots, dtype=np.intp)], first, first + m))
            for i, t in enumerate(node_trees):
                if i == 0 or node_trees[i - 1] != t:
                    segments.append((d, t))
                    seg_starts.append(first + i)
            lefts = T + first + np.arange(m)
            prev = np.concatenate((lefts, lefts + n_nodes))
            first += m
        self.seg_starts = np.array(seg_starts, dtype=np.intp)  # into the N right sets
        self.seg_rows = np.array([d * T + t for d, t in segments], dtype=np.intp)  # into (D*T)
        self._id_dtype = np.uint8 if depth <= 8 else np.uint16

    @staticmethod
    def _check_split(node: dict[str, Any]) -> None:
        if node.get("decision_type") != "<=":
            raise ConfigError(f"CompiledTrees: unsupported decision type {node.get('decision_type')!r}"
                              f" (split {node.get('split_index')}); only numerical '<=' splits")
        if node.get("missing_type", "None") != "None":
            raise ConfigError(f"CompiledTrees: split {node.get('split_index')} handles missing values"
                              f" ({node['missing_type']}); train with use_missing=False")

    @classmethod
    def from_booster(cls, booster: lgb.Booster, num_iteration: int | None = None,
                     start_iteration: int = 0, strategy: str = "auto") -> CompiledTrees:
        """Trees ``start_iteration`` .. ``start_iteration + num_iteration`` (all when None)."""
        return cls(booster.dump_model(num_iteration=num_iteration, start_iteration=start_iteration), strategy)

    def predict(self, X: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        """Raw scores: X float64 (n, n_features), finite -> (n,) float64.

        ``init`` (n,): running sums to continue from, as if these trees followed trees that
        summed to ``init`` (the head's ``predict`` when these are the tail of one model: the
        result is then the whole model's, bit for bit)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ConfigError(f"CompiledTrees: expected X of shape (n, {self.n_features}), got {X.shape}")
        n = X.shape[0]
        if init is not None:
            init = np.asarray(init, dtype=np.float64)
            if init.shape != (n,):
                raise ConfigError(f"CompiledTrees: init must have shape ({n},), got {init.shape}")
        block = self.block
        if n <= block:
            return self._predict_block(X, init)
        return np.concatenate([self._predict_block(X[lo : lo + block], None if init is None else init[lo : lo + block])
                               for lo in range(0, n, block)])

    def _node_sets(self, X: np.ndarray, W: int) -> np.ndarray:
        """X (n, F) -> (W, N) uint64: bit r of column i set iff row r goes right at node i."""
        if self.direct:
            return self._node_sets_direct(X, W)
        n, F = X.shape
        XT = X.T.copy()  # (F, n), ours to change
        XT[np.abs(XT) <= _ZERO] = 0.0  # as LightGBM reads a row: |x| <= kZeroThreshold is 0
        order = np.argsort(XT, axis=1)  # (F, n) ascending
        xs = np.take_along_axis(XT, order, axis=1)
        top = np.empty((W, F, n + 1), dtype=np.uint64)  # top[:, f, k]: the k largest rows of f
        top[:, :, 0] = 0
        # distinct rows have distinct bits, so the running sum is the running OR
        np.cumsum(_BIT[:W].take(order[:, ::-1], axis=1), axis=2, out=top[:, :, 1:])
        column = self.split_feature * (n + 1)  # (S,): column of top for split s, once k is added
        b = self.feature_bounds
        for f in range(F):
            if b[f] < b[f + 1]:
                column[b[f] : b[f + 1]] += n - np.searchsorted(
                    xs[f], self.split_threshold[b[f] : b[f + 1]], side="right")
        return top.reshape(W, F * (n + 1)).take(column.take(self.node_split), axis=1)

    def _node_sets_direct(self, X: np.ndarray, W: int) -> np.ndarray:
        """``_node_sets`` by comparing every row with every split: (S, n) comparisons."""
        n, F = X.shape
        XT = np.zeros((F, W * 64))  # (F, 64W): rows past n go left
        XT[:, :n] = X.T
        XT[np.abs(XT) <= _ZERO] = 0.0  # as LightGBM reads a row: |x| <= kZeroThreshold is 0
        right = XT.take(self.split_feature, axis=0) > self.split_threshold[:, None]  # (S, 64W)
        # bytes 8w .. 8w+7 of a split's row are word w (little-endian: bit r is row 64w + r)
        words = np.packbits(right, axis=1, bitorder="little").view("<u8").astype(np.uint64, copy=False)  # (S, W)
        return np.ascontiguousarray(words.take(self.node_split, axis=0).T)  # (W, N)

    def _predict_block(self, X: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        n, T, D, N = X.shape[0], self.n_trees, self.depth, self.n_nodes
        if n == 0 or T == 0:
            return np.zeros(n) if init is None else init.copy()
        W = (n + 63) // 64
        goes_right = self._node_sets(X, W)  # (W, N)
        sets = np.empty((W, T + 2 * N), dtype=np.uint64)  # see __init__ for the layout
        sets[:, :T] = _ALL
        lefts, rights = sets[:, T : T + N], sets[:, T + N :]
        for columns, lo, hi in self.levels:
            here = sets.take(columns, axis=1)  # (W, m): rows at this level's nodes
            np.bitwise_and(here, goes_right[:, lo:hi], out=rights[:, lo:hi])
            np.bitwise_xor(here, rights[:, lo:hi], out=lefts[:, lo:hi])
        # bit d of a row's leaf path in tree t: it went right at depth d (rows already at a leaf
        # are in no deeper set, so their higher bits stay 0)
        paths = np.zeros((D * T, W), dtype=np.uint64)
        if N:
            paths[self.seg_rows] = np.bitwise_or.reduceat(rights, self.seg_starts, axis=1).T
        bits = np.unpackbits(paths.view(np.uint8), axis=1, bitorder="little")  # (D*T, 64W)
        bits = bits.reshape(D, T, 64 * W)[:, :, :n]
        ids = np.zeros((T, n), dtype=self._id_dtype)  # (T, n): leaf path of each row in each tree
        for d in range(D - 1, -1, -1):
            ids += ids
            ids |= bits[d]
        index = ids.astype(np.intp)
        index += (np.arange(T, dtype=np.intp) << D)[:, None]
        values = self.leaf_value.take(index)  # (T, n)
        if init is not None:  # the running sums go first: (T + 1, n)
            values = np.concatenate([init[None, :], values])
        # LightGBM adds tree by tree. Reducing axis 0 of (T, n >= 2) runs that order, column-wise;
        # for n == 1 the axis is contiguous and numpy would sum pairwise, so accumulate instead.
        out: np.ndarray = np.add.reduce(values, axis=0) if n > 1 else np.cumsum(values[:, 0])[-1:]
        return out


class NativeTrees:
    """The trees compiled to machine code by lleaves (LLVM), the fastest evaluator measured on
    serving's batches (``streamrec bench serve``, ``tree_evaluators``).

    Compiled with one tree per block (``fblocksize=1``), each row's sum runs tree by tree in
    LightGBM's order, so the scores are LightGBM's bit for bit (lleaves' default blocks of 34
    trees sum each block first: faster still, but a few ulps off; measured). Cells with
    ``|x| <= kZeroThreshold`` are zeroed first, as LightGBM reads a dense row. Compiling takes
    seconds (about 7 s for 200 trees here): serving does it in its model-loading thread.
    """

    def __init__(self, booster: lgb.Booster, num_iteration: int | None = None) -> None:
        import lleaves  # noqa: PLC0415 (optional: serving falls back to CompiledTrees without it)

        with tempfile.TemporaryDirectory(prefix="streamrec-trees-") as tmp:
            booster.save_model(f"{tmp}/model.txt", num_iteration=num_iteration)
            self._model = lleaves.Model(model_file=f"{tmp}/model.txt")
            self._model.compile(cache=f"{tmp}/model.so", fblocksize=1)  # loaded into memory: the file may go
        self.n_features = booster.num_feature()

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Raw scores: X float64 (n, n_features), finite -> (n,) float64."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ConfigError(f"NativeTrees: expected X of shape (n, {self.n_features}), got {X.shape}")
        tiny = np.abs(X) <= _ZERO
        if tiny.any():
            X = np.where(tiny, 0.0, X)
        if not len(X):
            return np.zeros(0)
        out: np.ndarray = self._model.predict(np.ascontiguousarray(X), n_jobs=1)
        return out


def native_trees_available() -> bool:
    """Whether lleaves (and an llvmlite it works with) can be imported."""
    try:
        import lleaves  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class NativeStages:
    """``TreeStages`` on native code: the head's sums for the cut, then the whole model on the
    rows that survive it (lleaves cannot continue given sums, so the head's trees run twice on
    those rows; the scores are the whole model's, bit for bit)."""

    head: NativeTrees
    whole: NativeTrees

    def coarse(self, X: np.ndarray) -> np.ndarray:
        return self.head.predict(X)

    def finish(self, X: np.ndarray, partial: np.ndarray) -> np.ndarray:
        return self.whole.predict(X)


@dataclass(frozen=True)
class TreeStages:
    """A tree model split after its first trees, for a coarse ranking stage.

    ``coarse`` scores many rows with the head (the first trees: a cheap approximation of the
    model); ``finish`` adds the tail to the head's sums for the rows that survive the cut, in
    LightGBM's order, so ``finish(X, coarse(X))`` equals the whole model's score bit for bit.
    """

    head: CompiledTrees
    tail: CompiledTrees

    def coarse(self, X: np.ndarray) -> np.ndarray:
        """X float64 (n, F) -> (n,) the head's sums."""
        return self.head.predict(X)

    def finish(self, X: np.ndarray, partial: np.ndarray) -> np.ndarray:
        """X (n, F), partial (n,) the head's sums of the same rows -> (n,) the model's scores."""
        return self.tail.predict(X, init=partial)


# -- LambdaMART ----------------------------------------------------------------------------


# LightGBM objectives the ranker trains with: LambdaMART (listwise, NDCG-weighted pairs), the
# cross-entropy NDCG surrogate rank_xendcg (listwise, cheaper), and binary log loss on
# clicked / not clicked rows (pointwise; a label above 0 counts as 1)
OBJECTIVES: tuple[str, ...] = ("lambdarank", "rank_xendcg", "binary")


@dataclass(frozen=True)
class RankerConfig:
    n_trees: int = 200  # boosting rounds, at most (early stopping may keep fewer)
    num_leaves: int = 31
    max_depth: int = 8
    learning_rate: float = 0.05
    min_data_in_leaf: int = 20
    early_stopping_rounds: int = 20  # rounds without a better valid NDCG@10 before stopping
    num_threads: int = 2  # LightGBM's OpenMP threads; 1 where the cores are busy (it spin-waits)
    objective: str = "lambdarank"  # one of OBJECTIVES: listwise lambdarank, rank_xendcg, or pointwise binary

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"RankerConfig.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name, low in (("n_trees", 1), ("num_leaves", 2), ("max_depth", 1),
                          ("min_data_in_leaf", 1), ("early_stopping_rounds", 1), ("num_threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"RankerConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.max_depth > MAX_TREE_DEPTH:
            raise ConfigError(f"RankerConfig.max_depth must be <= {MAX_TREE_DEPTH}, got {self.max_depth}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"RankerConfig.learning_rate must be > 0, got {self.learning_rate!r}")


@dataclass
class TrainedRanker:
    """A LambdaMART model: LightGBM's model text plus how it was trained. Scores with CompiledTrees.

    ``report``: n_groups, n_rows, positives (the groups and rows trained and validated on, after
    dropping groups without signal), dropped_groups, train_groups, valid_groups, trees,
    best_iteration, valid_ndcg@10 (None without a validation split).
    """

    model_text: str
    report: dict[str, Any]
    version: str = ""
    features: tuple[str, ...] = FEATURES
    _booster: lgb.Booster = field(init=False, repr=False, compare=False)
    _trees: CompiledTrees = field(init=False, repr=False, compare=False)
    _stages: dict[int, TreeStages] = field(init=False, repr=False, compare=False, default_factory=dict)
    _native: NativeTrees | None = field(init=False, repr=False, compare=False, default=None)
    _native_stages: dict[int, NativeStages] = field(init=False, repr=False, compare=False, default_factory=dict)
    _native_lock: threading.Lock = field(init=False, repr=False, compare=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if tuple(self.features) != FEATURES:
            raise ConfigError(f"ranker was trained on features {list(self.features)}, "
                              f"serving builds {list(FEATURES)}")
        self._booster = lgb.Booster(model_str=self.model_text)
        self._trees = CompiledTrees.from_booster(self._booster)
        if self._trees.n_features != len(FEATURES):
            raise ConfigError(f"ranker model has {self._trees.n_features} features, expected {len(FEATURES)}")
        if not self.version:
            digest = hashlib.sha256(self.model_text.encode()).hexdigest()[:12]
            self.version = f"lambdamart-{digest}"

    def score(self, X: np.ndarray) -> np.ndarray:
        """X float64 (n, len(FEATURES)) -> (n,) raw LambdaMART scores, higher is better."""
        X = check_features(X, "TrainedRanker.score")
        native = self._native
        return native.predict(X) if native is not None else self._trees.predict(X)

    def compile_native(self, coarse_trees: Sequence[int] = ()) -> bool:
        """Compile the model (and its heads of ``coarse_trees`` trees, for ``staged``) to native
        code with lleaves; from then on ``score`` and ``staged`` use it. The scores do not
        change (both evaluators equal LightGBM's bit for bit), only their cost. Idempotent and
        safe to call from a loading thread while another thread scores. False when lleaves is
        not installed."""
        if not native_trees_available():
            return False
        with self._native_lock:
            whole = self._native or NativeTrees(self._booster)
            for first in coarse_trees:
                if 0 < first < self._trees.n_trees and first not in self._native_stages:
                    self._native_stages[first] = NativeStages(NativeTrees(self._booster, num_iteration=first), whole)
            self._native = whole
        return True

    @property
    def evaluator(self) -> str:
        """What ``score`` runs on: "native" (lleaves) or "compiled" (numpy)."""
        return "native" if self._native is not None else "compiled"

    @property
    def n_trees(self) -> int:
        return self._trees.n_trees

    def staged(self, first_trees: int) -> TreeStages | NativeStages | None:
        """The model split after its first ``first_trees`` trees (None when it has no more);
        compiled once per split point (native when ``compile_native`` compiled that head)."""
        if first_trees <= 0 or first_trees >= self._trees.n_trees:
            return None
        if (native := self._native_stages.get(first_trees)) is not None:
            return native
        if first_trees not in self._stages:
            self._stages[first_trees] = TreeStages(
                CompiledTrees.from_booster(self._booster, num_iteration=first_trees),
                CompiledTrees.from_booster(self._booster, start_iteration=first_trees))
        return self._stages[first_trees]

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """LightGBM's own per-feature contributions (TreeSHAP, ``pred_contrib``), bias last;
        each row sums to LightGBM's raw score (equal to ``score`` within float64 rounding of
        the sum, about 1e-12)."""
        X = check_features(X, "TrainedRanker.contributions")
        return np.asarray(self._booster.predict(X, pred_contrib=True, raw_score=True), dtype=np.float64)

    def feature_importance(self, kind: str = "gain") -> dict[str, float]:
        """Total split gain (``kind="gain"``) or split count (``"split"``) per feature name."""
        if kind not in ("gain", "split"):
            raise ConfigError(f"feature_importance kind must be 'gain' or 'split', got {kind!r}")
        values = self._booster.feature_importance(importance_type=kind)
        return {name: float(v) for name, v in zip(FEATURES, values)}

    @property
    def booster(self) -> lgb.Booster:
        """The LightGBM booster (for comparisons and analysis; serving uses CompiledTrees)."""
        return self._booster

    def to_bytes(self) -> bytes:
        header = {"format": FORMAT, "version": self.version, "features": list(self.features),
                  "report": self.report, "model": self.model_text}
        return json.dumps(header).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> TrainedRanker:
        try:
            doc = json.loads(blob)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"ranker blob is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ConfigError(f"ranker blob has format {found!r}, expected {FORMAT!r}")
        if list(doc.get("features", [])) != list(FEATURES):
            raise ConfigError(f"ranker blob was trained on features {doc.get('features')}, "
                              f"serving builds {list(FEATURES)}")
        return cls(model_text=doc["model"], report=doc["report"], version=doc["version"],
                   features=tuple(doc["features"]))


def train_ranker(X: np.ndarray, labels: np.ndarray, groups: Sequence[int], *,
                 params: RankerConfig | None = None, seed: int = 0,
                 valid_fraction: float = 0.2) -> TrainedRanker:
    """Fit the ranker (LightGBM, ``params.objective``: LambdaMART by default; early stopping
    on NDCG@10 whatever the objective) on served lists.

    X float (n, len(FEATURES)), finite; labels (n,) integer relevance 0..30 (a click is 1);
    groups: the sizes of consecutive lists (one served list each), summing to n.

    Lists whose labels are all equal (no positive, or nothing but positives) give LambdaMART no
    pair to order, so they are dropped before training; ConfigError if none remains. A seeded
    ``valid_fraction`` of the remaining lists is held out for early stopping on NDCG@10 (none
    when it rounds to zero lists, and then all ``n_trees`` rounds are kept).
    """
    params = params or RankerConfig()
    X = check_features(X, "train_ranker")
    y = np.asarray(labels, dtype=np.float64).ravel()
    sizes = np.asarray(groups, dtype=np.int64).ravel()
    if y.shape[0] != X.shape[0]:
        raise ConfigError(f"train_ranker: {X.shape[0]} rows but {y.shape[0]} labels")
    if not np.isfinite(y).all() or (y != np.round(y)).any() or (y < 0).any() or (y > MAX_LABEL).any():
        raise ConfigError(f"train_ranker: labels must be integers in 0..{MAX_LABEL}")
    if (sizes <= 0).any() or int(sizes.sum()) != X.shape[0]:
        raise ConfigError(f"train_ranker: group sizes must be positive and sum to {X.shape[0]} rows, "
                          f"got {len(sizes)} groups summing to {int(sizes.sum())}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"train_ranker: valid_fraction must be in [0, 1), got {valid_fraction}")

    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    keep = [g for g in range(len(sizes))
            if y[starts[g] : starts[g] + sizes[g]].min() < y[starts[g] : starts[g] + sizes[g]].max()]
    if not keep:
        raise ConfigError(f"train_ranker: none of {len(sizes)} lists has both a positive and a negative "
                          "label; nothing to learn from")
    rng = np.random.default_rng(seed)
    shuffled = [keep[i] for i in rng.permutation(len(keep))]
    n_valid = min(round(valid_fraction * len(keep)), len(keep) - 1)
    valid_ids, train_ids = sorted(shuffled[:n_valid]), sorted(shuffled[n_valid:])

    def take(ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = np.concatenate([np.arange(starts[g], starts[g] + sizes[g]) for g in ids])
        return X[rows], y[rows].astype(np.int32), sizes[ids]

    if params.objective == "binary":
        y = (y > 0).astype(np.float64)
    lgb_params: dict[str, Any] = {
        "objective": params.objective, "metric": "ndcg", "eval_at": [10],
        "num_leaves": params.num_leaves, "max_depth": params.max_depth,
        "learning_rate": params.learning_rate, "min_data_in_leaf": params.min_data_in_leaf,
        "deterministic": True, "force_row_wise": True, "num_threads": params.num_threads, "seed": seed,
        # missing values never reach the ranker; plain "<=" splits are what CompiledTrees runs
        "use_missing": False, "zero_as_missing": False,
        "verbosity": -1,
    }
    Xt, yt, gt = take(train_ids)
    train_set = lgb.Dataset(Xt, yt, group=gt, feature_name=list(FEATURES), params=lgb_params,
                            free_raw_data=True)
    valid_sets: list[lgb.Dataset] = []
    callbacks: list[Any] = []
    if valid_ids:
        Xv, yv, gv = take(valid_ids)
        valid_sets = [lgb.Dataset(Xv, yv, group=gv, reference=train_set)]
        callbacks = [lgb.early_stopping(params.early_stopping_rounds, verbose=False)]
    booster = lgb.train(lgb_params, train_set, num_boost_round=params.n_trees,
                        valid_sets=valid_sets, valid_names=["valid"][: len(valid_sets)],
                        callbacks=callbacks)
    best = booster.best_iteration if valid_ids and booster.best_iteration > 0 else booster.current_iteration()
    valid_ndcg = float(booster.best_score["valid"]["ndcg@10"]) if valid_ids else None
    kept_rows = int(sizes[keep].sum())
    report = {
        "n_groups": len(keep), "n_rows": kept_rows,
        "positives": int(sum((y[starts[g] : starts[g] + sizes[g]] > 0).sum() for g in keep)),
        "dropped_groups": len(sizes) - len(keep),
        "train_groups": len(train_ids), "valid_groups": len(valid_ids),
        "trees": best, "best_iteration": best, "valid_ndcg@10": valid_ndcg, "objective": params.objective,
    }
    return TrainedRanker(model_text=booster.model_to_string(num_iteration=best), report=report)


__all__ = ["FEATURES", "RANKED_SOURCES", "CompiledTrees", "HeuristicBlend", "NativeStages", "NativeTrees", "Ranker",
           "OBJECTIVES", "RankerConfig", "TrainedRanker", "TreeStages", "check_features", "native_trees_available",
           "train_ranker"]
