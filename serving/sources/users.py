"""``users``: user-user CF. The user's nearest users (cosine of matrix-factorisation user
vectors: the user's own folded in from their recent clicks, the neighbours' as fitted) and
what those neighbours clicked recently, read live from their sessions in Redis:

    score(j) = sum over neighbours v who recently clicked j of cos(u, v) / (1 + age of j in v's session)

(age 0: v's newest click), ties by item id (``cf.blend``). A neighbour's session is its state
now, not at training time: the neighbours are fixed by the last training, what they bring is
as fresh as the stream.
"""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext
from streamrec.serving.sources.cf import blend
from streamrec.serving.sources.mf import mf_vectors


class UserCFSource:
    name = "users"

    def __init__(self, context: SourceContext) -> None:
        self.reads = context.reads
        cfg = context.settings.serving
        self.recent_own = cfg.seq_len  # the user's clicks folded in
        self.recent = max(cfg.recent, 20)  # each neighbour's newest clicks proposed
        self.neighbours = cfg.users_neighbours

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.users_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        empty = [Retrieved.empty() for _ in range(len(batch))]
        retrieval = batch.models.retrieval
        if retrieval is None or retrieval.mf_users is None or not len(retrieval.mf_users) or limit <= 0:
            return empty
        users, queries = mf_vectors(batch, self.reads.items.ids, self.recent_own)
        if not users:
            return empty
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        index = retrieval.mf_users
        k = min(self.neighbours + 1, len(index))  # one more: the user may be among the fitted users
        found, sims = index.search(queries, k)
        owner, names, weights = [], [], []
        for w, i in enumerate(users):
            me = batch.users[i]
            picked = [(v, s) for v, s in zip(found[w], sims[w].tolist()) if v != me and s > 0][: self.neighbours]
            owner += [i] * len(picked)
            names += [v for v, _ in picked]
            weights += [s for _, s in picked]
        if not names:
            return empty
        distinct = list(dict.fromkeys(names))  # a neighbour of several users is read once
        sessions = self.reads.sessions.read(distinct, batch.ns)  # the neighbours' clicks now, one round trip
        newest = {v: h[-self.recent :][::-1] for v, h in zip(distinct, sessions.items)}  # newest first
        recents = [newest[v] for v in names]
        sizes = np.array([len(r) for r in recents], dtype=np.int64)
        if not sizes.sum():
            return empty
        age = np.concatenate([np.arange(n) for n in sizes.tolist()])
        entry_weight = np.repeat(np.asarray(weights, np.float64), sizes) / (1.0 + age)
        u, item, scores = blend(np.repeat(np.asarray(owner, np.int64), sizes), np.concatenate(recents),
                                entry_weight, self.reads.items.ids)
        return batch.drop_seen(u, item, scores, limit)
