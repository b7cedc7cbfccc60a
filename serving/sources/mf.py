"""``mf``: the nearest items (FAISS, inner product) of the user's matrix-factorisation vector.

The vector is folded in from the user's recent clicks at serving time
(``models.mf.MFModel.fold_in``: the ALS user step against the trained item factors), so a
click a moment ago moves it without refitting; the item factors are the ones ``streamrec
train`` fitted (ALS or BPR from ``implicit``, ``trainer.mf_model``).
"""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, NearestItems, Retrieved, SourceContext


def mf_vectors(batch: Batch, ids: np.ndarray, recent: int) -> tuple[list[int], np.ndarray]:
    """The batch positions with a folded-in MF vector (a known recent click) and those vectors,
    computed once per batch (the mf and users sources both ask)."""
    if batch.mf_queries is not None:
        return batch.mf_queries
    retrieval = batch.models.retrieval
    want = [i for i, h in enumerate(batch.histories) if len(h)]
    if retrieval is None or retrieval.mf is None or not want:
        return [], np.zeros((0, 1), np.float32)
    vectors = retrieval.mf.fold_in([ids[batch.histories[i][-recent:]].tolist() for i in want])
    known = np.abs(vectors).sum(axis=1) > 0
    batch.mf_queries = ([i for i, k in zip(want, known) if k], vectors[known])
    return batch.mf_queries


class MFSource:
    name = "mf"

    def __init__(self, context: SourceContext) -> None:
        self.reads = context.reads
        self.recent = context.settings.serving.seq_len
        self.nearest = NearestItems(context.reads, self.name)

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.mf_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        retrieval = batch.models.retrieval
        if retrieval is None or retrieval.mf_items is None or limit <= 0:
            return [Retrieved.empty() for _ in range(len(batch))]
        users, queries = mf_vectors(batch, self.reads.items.ids, self.recent)
        return self.nearest(batch, retrieval.mf_items, users, queries, limit)
