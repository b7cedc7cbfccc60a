"""Ranker scoring latency: LightGBM's Booster.predict against CompiledTrees, one thread.

A LambdaMART model of 200 trees (31 leaves, 16 features, depth <= 8) is trained with
``train_ranker`` on synthetic lists; then batches of 500 rows are scored by

* ``lightgbm``: ``Booster.predict(X, raw_score=True, num_threads=1)``
* ``compiled``: ``CompiledTrees.predict`` (what ``TrainedRanker.score`` runs)
* ``levelwise``: a per-row numpy traversal of all trees, one level at a time (flattened nodes,
  leaves as self-loops): the plain vectorised alternative, kept here for comparison

interleaved in one run, each batch a fresh random matrix. Prints p50/p99 in ms and ends with
one JSON line.

    .venv/bin/python scripts/bench_ranker.py [--reps 500] [--rows 500]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np

from streamrec.models.ranking import FEATURES, CompiledTrees, RankerConfig, train_ranker


def synthetic(n_groups: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Lists with one click each; the click shifts a few features, so trees grow full."""
    X = rng.normal(size=(n_groups * size, len(FEATURES)))
    y = np.zeros(n_groups * size, dtype=np.int64)
    clicked = np.arange(n_groups) * size + rng.integers(0, size, n_groups)
    y[clicked] = 1
    X[clicked, :6] += rng.normal(0.5, 1.0, size=(n_groups, 6))
    return X, y, [size] * n_groups


class LevelWise:
    """All rows x all trees, one level per step: node -> (feature, threshold, left, right)."""

    def __init__(self, booster: lgb.Booster) -> None:
        feat: list[int] = []
        thr: list[float] = []
        kids: list[int] = []
        value: list[float] = []
        roots: list[int] = []
        depth = 0

        def add(node: dict[str, Any], d: int) -> int:
            nonlocal depth
            i = len(feat)
            feat.append(0)
            thr.append(np.inf)
            kids.extend((i, i))  # leaves loop to themselves
            value.append(float(node.get("leaf_value", 0.0)))
            if "leaf_value" in node:
                depth = max(depth, d)
                return i
            feat[i], thr[i] = node["split_feature"], node["threshold"]
            kids[2 * i] = add(node["left_child"], d + 1)
            kids[2 * i + 1] = add(node["right_child"], d + 1)
            return i

        for info in booster.dump_model()["tree_info"]:
            roots.append(add(info["tree_structure"], 0))
        self.feat, self.thr = np.array(feat, dtype=np.intp), np.array(thr)
        self.kids, self.value = np.array(kids, dtype=np.intp), np.array(value)
        self.roots, self.depth = np.array(roots, dtype=np.intp), depth

    def predict(self, X: np.ndarray) -> np.ndarray:
        n, F = X.shape
        flat = X.ravel()
        row = (np.arange(n) * F)[None, :]
        node = np.repeat(self.roots[:, None], n, axis=1)  # (T, n)
        for _ in range(self.depth):
            x = flat.take(row + self.feat.take(node))
            node = self.kids.take(2 * node + (x > self.thr.take(node)))
        return np.add.reduce(self.value.take(node), axis=0)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "mean": round(float(ms.mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=500, help="timed batches per method (>= 300)")
    ap.add_argument("--rows", type=int, default=500, help="rows per batch")
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    X, y, groups = synthetic(2_000, 20, rng)
    ranker = train_ranker(X, y, groups, params=RankerConfig(n_trees=200, num_threads=1),
                          valid_fraction=0.0, seed=0)  # no early stopping: all 200 trees
    booster = ranker.booster
    compiled = CompiledTrees.from_booster(booster)
    levelwise = LevelWise(booster)
    leaves = [info["num_leaves"] for info in booster.dump_model()["tree_info"]]
    print(f"trained {booster.num_trees()} trees (leaves max {max(leaves)}, mean {np.mean(leaves):.1f}; "
          f"depth {compiled.depth}) in {time.perf_counter() - t0:.1f} s")

    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "lightgbm": lambda A: booster.predict(A, raw_score=True, num_threads=1),
        "compiled": compiled.predict,
        "levelwise": levelwise.predict,
    }
    batches = [rng.normal(size=(args.rows, len(FEATURES))) for _ in range(8)]
    equal = True
    for A in batches:  # warm up, and check the results agree exactly
        expected = methods["lightgbm"](A)
        equal &= all(np.array_equal(fn(A), expected) for fn in methods.values())
    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(args.reps):
        A = batches[rep % len(batches)] + rng.normal(scale=1e-3, size=batches[0].shape)
        order = list(methods.items())
        for name, fn in (order if rep % 2 == 0 else order[::-1]):  # alternate who goes first
            t = time.perf_counter()
            fn(A)
            times[name].append(time.perf_counter() - t)

    figures = {name: percentiles(ts) for name, ts in times.items()}
    for name, f in figures.items():
        print(f"{name:10s} p50 {f['p50']:7.3f} ms   p99 {f['p99']:7.3f} ms   mean {f['mean']:7.3f} ms")
    speedup = {q: round(figures["lightgbm"][q] / figures["compiled"][q], 2) for q in ("p50", "p99")}
    print(f"compiled vs lightgbm: {speedup['p50']}x at p50, {speedup['p99']}x at p99; "
          f"results bit-identical: {equal}")
    print(json.dumps({"bench": "ranker_score", "rows": args.rows, "trees": booster.num_trees(),
                      "max_leaves": max(leaves), "features": len(FEATURES), "reps": args.reps,
                      "threads": 1, "ms": figures, "speedup": speedup, "equal": equal}))


if __name__ == "__main__":
    main()
