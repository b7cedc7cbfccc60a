"""``seq``: the nearest items (FAISS, inner product) of the session embedding that the
sequence model computes from each user's recent clicks."""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext


class SeqSource:
    name = "seq"

    def __init__(self, context: SourceContext) -> None:
        self.seq_len = context.settings.serving.seq_len
        self.reads = context.reads
        self.searched_again = 0  # users whose own clicks filled more than the first search's margin

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.seq_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        out = [Retrieved.empty() for _ in range(len(batch))]
        models = batch.models
        want = [i for i, h in enumerate(batch.histories) if len(h)]
        if models.seq is None or models.index is None or limit <= 0 or not want:
            return out
        # one batched model pass and one batched search
        ids = self.reads.items.ids
        emb = models.seq.session_embeddings([ids[batch.histories[i][-self.seq_len :]].tolist() for i in want])  # (B', D)
        queries = np.zeros((len(batch), emb.shape[1]), np.float32)
        queries[want] = emb
        batch.embeddings = queries
        # The user's own clicks are among the nearest items and are dropped: the search asks
        # for a margin beyond the limit, and users who lost more than the margin to their
        # clicks are searched again with room for all of them (a few, with long histories).
        margin = min(limit // 8, max(len(batch.seen[i]) for i in want))
        got = self._search(batch, want, emb, limit + margin, limit)
        n_index = len(models.index)
        short = [w for w, i in enumerate(want) if len(got[i].rows) < limit and len(batch.seen[i]) > margin
                 and limit + margin < n_index]
        if short:
            self.searched_again += len(short)
            room = limit + max(len(batch.seen[want[w]]) for w in short)
            again = self._search(batch, [want[w] for w in short], emb[short], room, limit)
            for w in short:
                got[want[w]] = again[want[w]]
        return got

    def _search(self, batch: Batch, users: list[int], emb: np.ndarray, k: int, limit: int) -> list[Retrieved]:
        index = batch.models.index
        assert index is not None
        k = min(k, len(index))
        scores, found = index.index.search(np.ascontiguousarray(emb, dtype=np.float32), k)  # (b, k) each
        valid = found >= 0  # fewer results than k: padded with -1
        owner = np.repeat(np.asarray(users, dtype=np.int64), k).reshape(len(users), k)[valid]
        rows = self.reads.index_rows(index).item_of[found[valid]]
        return batch.drop_seen(owner, rows, scores[valid].astype(np.float64), limit)
