"""``cf``: item-to-item CF neighbours of each user's recent clicks (newer clicks weigh more).

Similarities and the per-user blend are ``models.learners``' (``cosine_similarity``,
``neighbour_scores``): the same formulas as the reference learner and the state reads.
"""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.models.learners import cosine_similarity, neighbour_scores
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext, drop_seen


class CFSource:
    name = "cf"

    def __init__(self, context: SourceContext) -> None:
        self.recstore = context.recstore
        self.reads = context.reads
        self.recent = context.settings.serving.recent

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.cf_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        recents = [list(reversed(h[-self.recent :])) for h in batch.histories]  # newest first
        distinct = list(dict.fromkeys(i for r in recents for i in r))
        if limit <= 0 or not distinct:
            return [Retrieved.empty() for _ in range(len(batch))]
        per_item = max(50, limit // 2)
        rows = dict(zip(distinct, self.recstore.neighbours(distinct, per_item, batch.ns)))
        cache = self.reads.items.get(distinct + [j for r in rows.values() for j, _ in r], batch.ns)
        sims: dict[str, tuple[list[str], np.ndarray]] = {}
        for item, row in rows.items():
            names = [j for j, _ in row]
            c_ij = np.fromiter((c for _, c in row), float, len(row))
            n_j = np.fromiter((cache[j].n for j in names), float, len(row))
            sims[item] = (names, cosine_similarity(c_ij, cache[item].n, n_j))
        out = []
        for recent, seen in zip(recents, batch.seen):
            items, scores = neighbour_scores([sims[i] for i in recent if i in sims])
            out.append(drop_seen(items, scores, seen, limit))
        return out
