"""``explore``: the exploration pool (the newest catalog items and a sample of the trending
ones), ranked by the exploration policy's index of each item's bandit posterior (``serving.policy``,
``models.policies``: a Thompson draw, the UCB bound, or the posterior mean), highest first.
The engine's policy then fills the list's exploration slots from these candidates.

The newest pool item without any evidence (never shown, never clicked: cold start) is always
among a user's candidates, so that serving can give it an exploration slot.
"""

from __future__ import annotations

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.models.learners import beta_posterior
from streamrec.models.policies import Policy, make_policy
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext


def serving_policy(settings: Settings) -> Policy:
    """The exploration policy ``serving.policy`` names, with its settings."""
    s = settings.serving
    return make_policy(s.policy, epsilon=s.epsilon, ucb_c=s.ucb_c, draws=s.propensity_draws)


class ExploreSource:
    name = "explore"

    def __init__(self, context: SourceContext) -> None:
        self.reads = context.reads
        self.rng = context.rng
        self.bandit = context.state.bandit
        self.policy = serving_policy(context.settings)

    @staticmethod
    def limit(settings: Settings) -> int:
        s = settings.serving
        return max(s.explore_slots * 4, s.k) if s.explore_slots > 0 else 0

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        out = [Retrieved.empty() for _ in range(len(batch))]
        pool = self.reads.explore_pool(batch.ns) if limit > 0 and len(batch) else np.zeros(0, np.int64)
        if not len(pool):
            return out
        table = self.reads.items
        table.ensure(pool, batch.ns, batch.now)
        # the policy's index of each (user, pool item), from the posterior at the user's time: (B, P)
        alpha, beta = beta_posterior(table.examined[pool][None, :], table.clicks[pool][None, :],
                                     batch.as_of[:, None].astype(np.float64), self.bandit)
        draws = np.broadcast_to(self.policy.score(alpha, beta, self.rng), (len(batch), len(pool)))
        cold = np.flatnonzero(table.no_evidence(pool))
        created = table.created[pool]
        users = np.arange(len(batch))
        open_pool = batch.unseen(np.repeat(users, len(pool)), np.tile(pool, len(batch))).reshape(len(batch), -1)
        for i in users.tolist():
            open_i = np.flatnonzero(open_pool[i])
            if not len(open_i):
                continue
            d = draws[i, open_i]
            best = open_i[np.argsort(-d, kind="stable")[:limit]]
            cold_i = cold[open_pool[i, cold]]
            if len(cold_i):
                newest = cold_i[int(np.argmax(created[cold_i]))]
                if newest not in best:  # it takes the place of the lowest draw (and stays last: its draw is lower)
                    best = np.append(best[: limit - 1], newest)
            out[i] = Retrieved(pool[best], draws[i, best])
        return out
