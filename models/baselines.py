"""Batch-refit baselines: what a team without a streaming pipeline runs. A nightly (or hourly)
job refits a model from all clicks so far and writes every user's top-k; the app serves that
list until the next job.

    b = BatchRefit("als", every_ms=86_400_000, k=10)
    b.observe(click)                      every click, in event-time order, after it was scored
    b.recommend(user, now_ms)             the list the last job before now_ms wrote for user

The job runs at the first request past each boundary of event time (midnight, the hour:
multiples of ``every_ms``) on every click observed with an event time before the boundary; a list is what the job computes
for the user: their top-k by the model, the items they had clicked by then left out. A user
the job did not know gets the job's most-clicked items. Items a user clicked after the job are
not left out: the job's list does not know them (as in production).

Models: ``als`` (implicit's AlternatingLeastSquares) and ``itemknn`` (implicit's
CosineRecommender: item-item cosine over the click matrix, a user's score of an item the sum
of its similarities to the items they clicked).

Pure computation: imports nothing outside ``models``.
"""

from __future__ import annotations

import bisect
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.nearest_neighbours import CosineRecommender
from implicit.utils import ParameterWarning
from threadpoolctl import threadpool_limits

from streamrec.models.errors import ConfigError
from streamrec.models.mf import MFConfig

KINDS = ("als", "itemknn")


@dataclass
class _Job:
    """One refit: the model, the vocabularies and click matrix it saw, its lists so far."""

    at_ms: int
    users: dict[str, int]
    items: list[str]
    matrix: sp.csr_matrix
    model: AlternatingLeastSquares | CosineRecommender
    popular: list[str]
    lists: dict[str, list[str]] = field(default_factory=dict)


class BatchRefit:
    def __init__(self, kind: str, every_ms: int, k: int = 10, mf: MFConfig = MFConfig(),
                 neighbours: int = 100, seed: int = 0, num_threads: int = 0) -> None:
        if kind not in KINDS:
            raise ConfigError(f"baseline must be one of {', '.join(KINDS)}; got {kind!r}")
        if every_ms <= 0 or k < 1:
            raise ConfigError("a baseline's refit period and k must be positive")
        self.kind, self.every_ms, self.k = kind, every_ms, k
        self.mf, self.neighbours, self.seed, self.num_threads = mf, neighbours, seed, num_threads
        self._users: dict[str, int] = {}
        self._items: dict[str, int] = {}
        self._rows: list[int] = []
        self._cols: list[int] = []
        self._ts: list[int] = []
        self._last_ms = -(2**62)
        self.job: _Job | None = None
        self.refits = 0
        self.fit_seconds = 0.0

    @property
    def name(self) -> str:
        period = f"{self.every_ms / 3_600_000:g}h" if self.every_ms >= 3_600_000 else f"{self.every_ms / 1000:g}s"
        return f"batch_{self.kind}_{period}"

    def observe(self, user: str, item: str, ts_ms: int) -> None:
        if ts_ms < self._last_ms:
            raise ConfigError("a baseline observes clicks in event-time order")
        self._last_ms = ts_ms
        self._ts.append(ts_ms)
        self._rows.append(self._users.setdefault(user, len(self._users)))
        self._cols.append(self._items.setdefault(item, len(self._items)))

    def recommend(self, user: str, now_ms: int) -> list[str]:
        boundary = (now_ms // self.every_ms) * self.every_ms
        if self.job is None or self.job.at_ms < boundary:
            upto = bisect.bisect_left(self._ts, boundary)  # the clicks before the boundary
            if upto:
                self.job = self._refit(boundary, upto)
        job = self.job
        if job is None:
            return []
        if user not in job.lists:
            u = job.users.get(user)
            if u is None:
                job.lists[user] = job.popular
            else:
                ids, _ = job.model.recommend(u, job.matrix[u], N=self.k, filter_already_liked_items=True)
                job.lists[user] = [job.items[j] for j in np.asarray(ids).tolist() if j >= 0]
        return job.lists[user]

    def _refit(self, at_ms: int, upto: int) -> _Job:
        t0 = time.perf_counter()
        n_users, n_items = max(self._rows[:upto]) + 1, max(self._cols[:upto]) + 1  # ids are first-seen order
        m = sp.csr_matrix((np.ones(upto, np.float32), (self._rows[:upto], self._cols[:upto])),
                          shape=(n_users, n_items))
        m.sum_duplicates()
        with threadpool_limits(1, "blas"):
            if self.kind == "als":
                cfg = self.mf
                model: AlternatingLeastSquares | CosineRecommender = AlternatingLeastSquares(
                    factors=cfg.factors, regularization=cfg.regularization, alpha=cfg.alpha,
                    iterations=cfg.iterations, random_state=self.seed, num_threads=self.num_threads)
            else:
                model = CosineRecommender(K=self.neighbours, num_threads=self.num_threads)
            with warnings.catch_warnings():  # implicit's own all_pairs_knn hands itself a COO matrix and warns
                warnings.simplefilter("ignore", ParameterWarning)
                model.fit(m, show_progress=False)
        counts = np.asarray(m.sum(axis=0)).ravel()
        items: list[str] = [""] * n_items
        for item, j in self._items.items():
            if j < n_items:
                items[j] = item
        popular = [items[j] for j in np.argsort(-counts, kind="stable")[: self.k]]
        self.refits += 1
        self.fit_seconds += time.perf_counter() - t0
        users = {u: i for u, i in self._users.items() if i < n_users}
        return _Job(at_ms, users, items, m, model, popular)


__all__ = ["BatchRefit", "KINDS"]
