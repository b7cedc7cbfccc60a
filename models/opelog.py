"""Logged exploration choices as off-policy decisions (``models.ope``) for a candidate policy.

Each served list's exploration choice (``models.servedlog.PolicyDecision``: the action set with
its Beta posteriors, the picks and their sequential propensities) is one decision:

* reward: the clicks on the picked slots per picked slot (clicks per exploration slot);
* ``logged_p``: the product of the logged propensities (the probability of the picks in that
  order: the sequential propensities multiply to it);
* ``target_p``: the same product under the candidate (``Policy.propensities``);
* reward model (for DR and DM): ``rhat(a, j) = c_j * mean_a``, the item's posterior mean scaled
  per exploration slot j by ``c_j = clicks at j / sum of the logged picks' means at j`` (the
  position's examination and the calibration of the posteriors, fitted on the log);
  ``q_logged`` is its mean over the logged picks, ``v_target`` its mean over the candidate's own
  picks, averaged over ``samples`` slates the candidate draws (one when it is deterministic);
* ``mismatch``: a deterministic logger (greedy, UCB) gives probability 0 to every other slate,
  so the candidate's mass off the logged slate, ``1 - target_p``, is unsupported; a randomising
  logger (epsilon-greedy with epsilon > 0, Thompson sampling) supports every slate: 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from streamrec.models.learners import beta_moments
from streamrec.models.ope import Decisions
from streamrec.models.policies import Policy


@dataclass(frozen=True)
class LoggedChoice:
    alpha: np.ndarray  # (m,) the action set's posteriors at serving time
    beta: np.ndarray
    picks: np.ndarray  # (s,) indices into the action set, slot order
    propensities: np.ndarray  # (s,) logged, sequential
    clicks: np.ndarray  # (s,) 0/1 per picked slot
    deterministic: bool  # the logging policy does not randomise


def decisions_for(choices: list[LoggedChoice], candidate: Policy, rng: np.random.Generator,
                  samples: int = 20) -> Decisions:
    """The ``Decisions`` of ``choices`` under ``candidate``."""
    width = max(len(c.picks) for c in choices)
    hits = np.zeros(width)
    mass = np.zeros(width)
    for c in choices:
        mean = beta_moments(c.alpha, c.beta)[0]
        hits[: len(c.picks)] += c.clicks
        mass[: len(c.picks)] += mean[c.picks]
    scale = np.divide(hits, mass, out=np.zeros(width), where=mass > 0)
    sampler = replace(candidate, draws=10) if hasattr(candidate, "draws") else candidate  # slates only, not propensities
    n = len(choices)
    reward, logged_p, target_p, q, v, mismatch = (np.zeros(n) for _ in range(6))
    for i, c in enumerate(choices):
        s = len(c.picks)
        mean = beta_moments(c.alpha, c.beta)[0]
        reward[i] = c.clicks.sum() / s
        logged_p[i] = float(np.prod(c.propensities))
        target_p[i] = float(np.prod(candidate.propensities(c.alpha, c.beta, c.picks, rng)))
        q[i] = float((scale[:s] * mean[c.picks]).mean())
        draws = 1 if candidate.deterministic else samples
        v[i] = float(np.mean([(scale[:s] * mean[sampler.choose(c.alpha, c.beta, s, rng).index]).mean()
                              for _ in range(draws)]))
        mismatch[i] = 1.0 - target_p[i] if c.deterministic else 0.0
    return Decisions(reward=reward, logged_p=logged_p, target_p=target_p, q_logged=q, v_target=v, mismatch=mismatch)


__all__ = ["LoggedChoice", "decisions_for"]
