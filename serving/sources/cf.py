"""``cf``: item-to-item CF neighbours of each user's recent clicks (newer clicks weigh more).

The similarities are ``models.learners.cosine_similarity``, kept per item by the shared reads
(``NeighbourCache``) for ``serving.stats_ttl_s``. The per-user blend is
``models.learners.neighbour_scores`` (``score(j) = sum_a sim(item_a, j) / (1 + a)`` over the
recent items, newest first, ties by item id), computed here for the whole batch at once on
item rows; ``tests/test_sources.py`` checks that the two agree.
"""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext


def blend(users: np.ndarray, rows: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the weights of each (user, item row) and order each user's items best first, ties
    by item id (``ids[row]``). Returns (users non-decreasing, rows, scores), each (m,)."""
    key = (users.astype(np.int64) << 32) | rows
    unique, inverse = np.unique(key, return_inverse=True)
    scores = np.bincount(inverse, weights=weights, minlength=len(unique))
    owner, item = unique >> 32, unique & 0xFFFF_FFFF
    order = np.lexsort((-scores, owner))
    owner, item, scores = owner[order], item[order], scores[order]
    tied = np.flatnonzero((scores[1:] == scores[:-1]) & (owner[1:] == owner[:-1]))
    if len(tied):  # equal scores of one user: by item id, as the reference orders them
        run_starts = tied[np.concatenate([[True], np.diff(tied) > 1])]
        run_ends = tied[np.concatenate([np.diff(tied) > 1, [True]])] + 2
        for lo, hi in zip(run_starts.tolist(), run_ends.tolist()):
            item[lo:hi] = sorted(item[lo:hi].tolist(), key=lambda r: ids[r])
    return owner, item, scores


class CFSource:
    name = "cf"

    def __init__(self, context: SourceContext) -> None:
        self.reads = context.reads
        self.recent = context.settings.serving.recent

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.cf_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        recents = [h[-self.recent :][::-1] for h in batch.histories]  # newest first
        distinct = list(dict.fromkeys(r for rec in recents for r in rec.tolist()))
        if limit <= 0 or not distinct:
            return [Retrieved.empty() for _ in range(len(batch))]
        per_item = max(50, limit // 2)
        nbrs = self.reads.neighbours.get(distinct, per_item, batch.ns, batch.now)
        # one entry per (user, recent item a, neighbour j): weight sim(a, j) / (1 + age of a)
        lists = [nbrs[item] for rec in recents for item in rec.tolist()]
        sizes = np.array([len(r) for r, _ in lists], dtype=np.int64)
        if not sizes.sum():
            return [Retrieved.empty() for _ in range(len(batch))]
        owner = np.repeat(np.arange(len(batch)), [len(r) for r in recents])
        age = np.concatenate([np.arange(len(r)) for r in recents])
        weights = np.concatenate([sims for _, sims in lists]) / np.repeat(1.0 + age, sizes)
        users, item, scores = blend(np.repeat(owner, sizes), np.concatenate([r for r, _ in lists]), weights,
                                    self.reads.items.ids)
        return batch.drop_seen(users, item, scores, limit)
