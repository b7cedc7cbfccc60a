"""``seq``: the nearest items (FAISS, inner product) of the session embedding that the
sequence model computes from each user's recent clicks."""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, NearestItems, Retrieved, SourceContext


class SeqSource:
    name = "seq"

    def __init__(self, context: SourceContext) -> None:
        self.seq_len = context.settings.serving.seq_len
        self.reads = context.reads
        self.nearest = NearestItems(context.reads, self.name)

    @property
    def searched_again(self) -> int:
        """Users whose own clicks filled more than the first search's margin."""
        return self.nearest.searched_again

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.seq_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        models = batch.models
        want = [i for i, h in enumerate(batch.histories) if len(h)]
        if models.seq is None or models.index is None or limit <= 0 or not want:
            return [Retrieved.empty() for _ in range(len(batch))]
        # one batched model pass and one batched search
        ids = self.reads.items.ids
        emb = models.seq.session_embeddings([ids[batch.histories[i][-self.seq_len :]].tolist() for i in want])  # (B', D)
        queries = np.zeros((len(batch), emb.shape[1]), np.float32)
        queries[want] = emb
        batch.embeddings = queries  # the engine's seq_score feature reuses them
        return self.nearest(batch, models.index, want, emb, limit)
