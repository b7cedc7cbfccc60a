"""``tower``: the nearest items (FAISS, inner product of unit vectors) of the two-tower model's
user vector, computed from the user's recent clicks (``models.twotower``). Catalog items
nobody clicked yet are in the index from their content alone."""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, NearestItems, Retrieved, SourceContext


class TowerSource:
    name = "tower"

    def __init__(self, context: SourceContext) -> None:
        self.reads = context.reads
        self.nearest = NearestItems(context.reads, self.name)

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.tower_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        retrieval = batch.models.retrieval
        want = [i for i, h in enumerate(batch.histories) if len(h)]
        if retrieval is None or retrieval.tower is None or retrieval.tower_items is None or limit <= 0 or not want:
            return [Retrieved.empty() for _ in range(len(batch))]
        ids = self.reads.items.ids
        tower = retrieval.tower
        vectors = tower.user_vectors([ids[batch.histories[i][-tower.config.max_len :]].tolist() for i in want])
        known = np.abs(vectors).sum(axis=1) > 0
        users = [i for i, k in zip(want, known) if k]
        return self.nearest(batch, retrieval.tower_items, users, vectors[known], limit)
