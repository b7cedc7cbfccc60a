"""``explore``: Thompson draws from the bandit posteriors of the exploration pool (the newest
catalog items and a sample of the trending ones), highest first.

The newest pool item without any evidence (never shown, never clicked: cold start) is always
among a user's candidates, so that serving can give it an exploration slot.
"""

from __future__ import annotations

import math

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.models.learners import beta_posterior
from streamrec.serving.reads import ItemRow
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext


def no_evidence(row: ItemRow) -> bool:
    """A catalog item nobody has clicked or been shown yet."""
    return row.n == -math.inf and row.examined == -math.inf and row.created_at is not None


class ExploreSource:
    name = "explore"

    def __init__(self, context: SourceContext) -> None:
        self.reads = context.reads
        self.rng = context.rng
        self.bandit = context.state.bandit

    @staticmethod
    def limit(settings: Settings) -> int:
        s = settings.serving
        return max(s.explore_slots * 4, s.k) if s.explore_slots > 0 else 0

    def draws(self, items: list[str], cache: dict[str, ItemRow], at_ms: int) -> np.ndarray:
        """One Thompson draw per item from its Beta posterior at ``at_ms``."""
        n = len(items)
        examined = np.fromiter((cache[i].examined for i in items), float, n)
        clicks = np.fromiter((cache[i].clicks for i in items), float, n)
        alpha, beta = beta_posterior(examined, clicks, at_ms, self.bandit)
        return self.rng.beta(alpha, beta)

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        out = [Retrieved.empty() for _ in range(len(batch))]
        pool = self.reads.explore_pool(batch.ns) if limit > 0 and len(batch) else []
        if not pool:
            return out
        cache = self.reads.items.get(pool, batch.ns)
        for i, (seen, at_ms) in enumerate(zip(batch.seen, batch.as_of)):
            open_pool = [it for it in pool if it not in seen]
            if not open_pool:
                continue
            draws = self.draws(open_pool, cache, at_ms)
            best = list(np.argsort(-draws, kind="stable")[:limit])
            cold = [j for j in range(len(open_pool)) if no_evidence(cache[open_pool[j]])]
            if cold:
                newest = max(cold, key=lambda j: cache[open_pool[j]].created_at or 0)
                if newest not in best:  # it takes the place of the lowest draw (and stays last: its draw is lower)
                    best = best[: limit - 1] + [newest]
            out[i] = Retrieved.of([open_pool[j] for j in best], draws[best])
        return out
