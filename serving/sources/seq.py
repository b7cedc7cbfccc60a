"""``seq``: the nearest items (FAISS, inner product) of the session embedding that the
sequence model computes from each user's recent clicks."""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext, drop_seen


class SeqSource:
    name = "seq"

    def __init__(self, context: SourceContext) -> None:
        self.seq_len = context.settings.serving.seq_len

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.seq_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        out = [Retrieved.empty() for _ in range(len(batch))]
        models = batch.models
        want = [i for i, h in enumerate(batch.histories) if h]
        if models.seq is None or models.index is None or limit <= 0 or not want:
            return out
        # one batched model pass and one batched search
        emb = models.seq.session_embeddings([batch.histories[i][-self.seq_len :] for i in want])  # (B', D)
        queries = np.zeros((len(batch), emb.shape[1]), np.float32)
        queries[want] = emb
        batch.embeddings = queries
        # ask for more than the limit: the user's own items are among the nearest ones
        extra = min(max(len(batch.seen[i]) for i in want), 200)
        ids, scores = models.index.search(emb, limit + extra)
        for row, i in enumerate(want):
            out[i] = drop_seen(ids[row], scores[row], batch.seen[i], limit)
        return out
