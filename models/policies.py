"""Exploration policies: which pool items fill a list's exploration slots, and with what
probability (serving's exploration slots, ``serving.policy``).

One protocol (``Policy``), one contract suite (``tests/test_policies.py``) run on every policy.
A policy sees the pool's Beta posteriors (``alpha``, ``beta``: ``models.learners.beta_posterior``)
and fills ``slots`` positions one after another. ``choose`` returns the picked pool indices,
slot by slot, with each pick's **propensity**: the probability that the policy puts that item in
that slot given the items it put in the earlier slots (the sequential definition off-policy
estimators use for slates filled slot by slot).

- ``Greedy``: the highest posterior mean (deterministic: propensity 1).
- ``EpsilonGreedy``: per slot, with probability epsilon a uniform draw among the items left,
  else the best mean left: the propensity is exact, ``epsilon / left + (1 - epsilon) [best]``.
- ``UCB``: the highest upper confidence bound ``mean + c sd`` (deterministic: propensity 1).
- ``Thompson``: per slot, one fresh draw per remaining item from its posterior; the highest
  fills the slot. Its propensity has no closed form; it is estimated by Monte Carlo over
  ``draws`` fresh posterior draws: the share of draws in which, among the items left, the
  picked one has the highest draw (at least ``1 / (draws + 1)``, never 0).

``propensities`` scores given picks (a logged list) under a policy, which is what off-policy
evaluation needs (``models.ope``); ``choose`` reports the same numbers for its own picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from streamrec.models.learners import beta_moments


@dataclass(frozen=True)
class Picks:
    """Pool indices in slot order and, per slot, the propensity of that pick."""

    index: np.ndarray  # int64, distinct
    propensity: np.ndarray  # float64 in (0, 1]


@runtime_checkable
class Policy(Protocol):
    name: str
    deterministic: bool  # the same posteriors always give the same picks

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        """Fill ``min(slots, len(alpha))`` slots from the pool, each pick with its propensity."""
        ...

    def score(self, alpha: np.ndarray, beta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Each item's index under this policy (any shape, elementwise): a Thompson draw, the
        UCB bound, or the posterior mean. The explore source ranks the pool by it."""
        ...

    def propensities(self, alpha: np.ndarray, beta: np.ndarray, index: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        """For given picks (pool indices in slot order, distinct), the probability that this
        policy makes each pick given the earlier ones: how a logged list is scored under a
        candidate policy (off-policy evaluation). (len(index),) float64 in [0, 1]."""
        ...


def _best_left(key: np.ndarray, index: np.ndarray) -> np.ndarray:
    """For each slot s, the pool index with the highest key among the items not in
    ``index[:s]`` (ties to the lower index). (len(index),)"""
    order = np.lexsort((np.arange(len(key)), -key))  # best first
    taken = np.zeros(len(key), dtype=bool)
    best = np.empty(len(index), dtype=np.int64)
    at = 0
    for s, pick in enumerate(index.tolist()):
        while taken[order[at]]:
            at += 1
        best[s] = order[at]
        taken[pick] = True
    return best


def _by_key(key: np.ndarray, slots: int) -> Picks:
    """The ``slots`` highest keys (ties to the lower index), propensity 1 each."""
    n = min(slots, len(key))
    order = np.lexsort((np.arange(len(key)), -key))[:n]
    return Picks(order.astype(np.int64), np.ones(n))


@dataclass(frozen=True)
class Greedy:
    name: str = "greedy"
    deterministic: bool = True

    def key(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        return beta_moments(alpha, beta)[0]

    def score(self, alpha: np.ndarray, beta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.key(alpha, beta)

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        return _by_key(self.key(alpha, beta), slots)

    def propensities(self, alpha: np.ndarray, beta: np.ndarray, index: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        return (_best_left(self.key(alpha, beta), index) == index).astype(np.float64)


@dataclass(frozen=True)
class UCB(Greedy):
    c: float = 2.0  # standard deviations above the mean
    name: str = "ucb"
    deterministic: bool = True

    def key(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        mean, sd = beta_moments(alpha, beta)
        return mean + self.c * sd


@dataclass(frozen=True)
class EpsilonGreedy:
    epsilon: float = 0.1
    name: str = "epsilon-greedy"
    deterministic: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1] (got {self.epsilon})")

    def score(self, alpha: np.ndarray, beta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return beta_moments(alpha, beta)[0]

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        mean = beta_moments(alpha, beta)[0]
        left = list(np.lexsort((np.arange(len(mean)), -mean)))  # best first
        index = []
        for _ in range(min(slots, len(left))):
            pick = left[int(rng.integers(len(left)))] if rng.random() < self.epsilon else left[0]
            left.remove(pick)
            index.append(pick)
        index_a = np.asarray(index, dtype=np.int64)
        return Picks(index_a, self.propensities(alpha, beta, index_a, rng))

    def propensities(self, alpha: np.ndarray, beta: np.ndarray, index: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        best = _best_left(beta_moments(alpha, beta)[0], index)
        left = len(alpha) - np.arange(len(index))
        return self.epsilon / left + (1.0 - self.epsilon) * (best == index)


@dataclass(frozen=True)
class Thompson:
    """Per slot, a fresh draw from every remaining item's posterior; the highest fills it.

    (A fresh draw per slot, not one draw for the whole list, so that each slot is one
    Thompson decision and its propensity, estimated by Monte Carlo, is the probability of
    exactly the rule applied.)"""

    draws: int = 1000  # Monte Carlo draws behind each propensity
    name: str = "thompson"
    deterministic: bool = False

    def score(self, alpha: np.ndarray, beta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.beta(alpha, beta)

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        n = min(slots, len(alpha))
        left = np.ones(len(alpha), dtype=bool)
        index = np.empty(n, dtype=np.int64)
        for s in range(n):
            theta = np.where(left, rng.beta(alpha, beta), -np.inf)
            index[s] = int(np.argmax(theta))
            left[index[s]] = False
        return Picks(index, self.propensities(alpha, beta, index, rng))

    def propensities(self, alpha: np.ndarray, beta: np.ndarray, index: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        """The share of ``draws`` fresh posterior draws in which, among the items left, the
        pick has the highest draw (at least ``1 / (draws + 1)``: never 0)."""
        index = np.asarray(index, dtype=np.int64)
        if not len(index):
            return np.ones(0)
        sims = rng.beta(alpha, beta, size=(self.draws, len(alpha)))
        left = np.ones(len(alpha), dtype=bool)
        out = np.empty(len(index))
        for s, pick in enumerate(index.tolist()):
            wins = int(np.count_nonzero(np.where(left, sims, -np.inf).argmax(axis=1) == pick))
            out[s] = max(wins, 1) / (self.draws + (wins == 0))
            left[pick] = False
        return out


POLICIES = {"greedy": Greedy, "epsilon-greedy": EpsilonGreedy, "ucb": UCB, "thompson": Thompson}


def make_policy(name: str, *, epsilon: float = 0.1, ucb_c: float = 2.0, draws: int = 1000) -> Policy:
    """The policy a setting names (``thompson`` is what serving does today)."""
    if name == "greedy":
        return Greedy()
    if name == "epsilon-greedy":
        return EpsilonGreedy(epsilon)
    if name == "ucb":
        return UCB(c=ucb_c)
    if name == "thompson":
        return Thompson(draws)
    raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICIES)})")


__all__ = ["Picks", "Policy", "Greedy", "UCB", "EpsilonGreedy", "Thompson", "POLICIES", "make_policy"]
