"""Maximal marginal relevance (Carbonell and Goldstein 1998): the diversity re-rank of a
list's ranked slots (``serving.diversity``).

Slots are filled one after another; each takes the candidate maximising

    (1 - w) * relevance(j) - w * max over already placed i of similarity(i, j)

with ``relevance`` the ranker's scores min-max scaled to [0, 1] within the list and ``w`` the
diversity weight (0: the ranker's order exactly; 1: only novelty). Similarities are cosines
of item vectors (``cosine_matrix``) or Jaccard overlaps of content tokens, categories and tags
(``jaccard_matrix``); an item without a vector or tokens is similar to nothing (0).
"""

from __future__ import annotations

import numpy as np


def mmr(relevance: np.ndarray, similarity: np.ndarray, n: int, weight: float) -> np.ndarray:
    """Indices of ``min(n, len(relevance))`` candidates in slot order. ``relevance`` (m,) any
    scale (scaled here), ``similarity`` (m, m). Ties: the better-ranked (lower index) first."""
    m = len(relevance)
    n = min(n, m)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.zeros(m)
    closest = np.zeros(m)  # max similarity to the placed items
    free = np.ones(m, dtype=bool)
    out = np.empty(n, dtype=np.int64)
    for s in range(n):
        value = np.where(free, (1.0 - weight) * rel - weight * closest, -np.inf)
        j = int(np.argmax(value))  # first maximum: the lower index wins ties
        out[s] = j
        free[j] = False
        closest = np.maximum(closest, similarity[j])
    return out


def cosine_matrix(vectors: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(m, m) cosines of the rows of ``vectors`` (m, d); rows where ``known`` is False: 0."""
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=1)
    ok = known & (norm > 0)
    unit = np.zeros_like(v)
    unit[ok] = v[ok] / norm[ok, None]
    return unit @ unit.T


def jaccard_matrix(tokens: np.ndarray, missing: int) -> np.ndarray:
    """(m, m) Jaccard overlaps of token-id rows (m, w), padded with ``missing``."""
    t = np.asarray(tokens)
    valid = t != missing
    same = (t[:, None, :, None] == t[None, :, None, :]) & valid[:, None, :, None] & valid[None, :, None, :]
    inter = same.any(axis=3).sum(axis=2).astype(np.float64)  # distinct shared tokens (rows hold each once)
    size = valid.sum(axis=1).astype(np.float64)
    union = size[:, None] + size[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


__all__ = ["mmr", "cosine_matrix", "jaccard_matrix"]
