"""Ranking metrics for one recommendation list and one held-out item (leave-one-out style), and
graded NDCG of a ranked list of relevance labels."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def rank_of(recommended: Sequence[str], target: str) -> int | None:
    """0-based rank of ``target`` in the list, or None when absent."""
    for rank, item in enumerate(recommended):
        if item == target:
            return rank
    return None


def hit_at(recommended: Sequence[str], target: str, k: int) -> float:
    rank = rank_of(recommended[:k], target)
    return 1.0 if rank is not None else 0.0


def ndcg_at(recommended: Sequence[str], target: str, k: int) -> float:
    """With one relevant item the ideal DCG is 1, so NDCG = 1 / log2(rank + 2)."""
    rank = rank_of(recommended[:k], target)
    return 1.0 / math.log2(rank + 2) if rank is not None else 0.0


def graded_ndcg_at(ranked_relevance: Sequence[float], k: int) -> float:
    """NDCG@k of a ranked list with graded relevance (gain 2^rel - 1, LightGBM's): DCG over the
    ideal order's; 0 for a list with nothing relevant."""
    rel = np.asarray(ranked_relevance, dtype=np.float64)
    discount = 1.0 / np.log2(np.arange(2, min(k, len(rel)) + 2))
    ideal = float(((2.0 ** np.sort(rel)[::-1][:k] - 1.0) * discount).sum())
    return float(((2.0 ** rel[:k] - 1.0) * discount).sum()) / ideal if ideal > 0 else 0.0


def reciprocal_rank(recommended: Sequence[str], target: str) -> float:
    rank = rank_of(recommended, target)
    return 1.0 / (rank + 1) if rank is not None else 0.0
