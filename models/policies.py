"""Exploration policies: which pool items fill a list's exploration slots, and with what
probability (issue 13, part 1: the policies and their propensities; serving's wiring comes next).

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
- ``Thompson``: one draw per item from its posterior, the highest draws fill the slots. Its
  propensity has no closed form; it is estimated by Monte Carlo over ``draws`` fresh posterior
  draws, conditioned like the others: the share of draws in which, among the items left, the
  picked one has the highest draw (at least ``1 / (draws + 1)``, never 0).
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
        """Fill ``min(slots, len(alpha))`` slots from the pool."""
        ...


def _by_key(key: np.ndarray, slots: int) -> Picks:
    """The ``slots`` highest keys (ties to the lower index), propensity 1 each."""
    n = min(slots, len(key))
    order = np.lexsort((np.arange(len(key)), -key))[:n]
    return Picks(order.astype(np.int64), np.ones(n))


@dataclass(frozen=True)
class Greedy:
    name: str = "greedy"
    deterministic: bool = True

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        return _by_key(beta_moments(alpha, beta)[0], slots)


@dataclass(frozen=True)
class UCB:
    c: float = 2.0  # standard deviations above the mean
    name: str = "ucb"
    deterministic: bool = True

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        mean, sd = beta_moments(alpha, beta)
        return _by_key(mean + self.c * sd, slots)


@dataclass(frozen=True)
class EpsilonGreedy:
    epsilon: float = 0.1
    name: str = "epsilon-greedy"
    deterministic: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1] (got {self.epsilon})")

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        mean = beta_moments(alpha, beta)[0]
        left = list(np.lexsort((np.arange(len(mean)), -mean)))  # best first
        index, propensity = [], []
        for _ in range(min(slots, len(left))):
            best = left[0]
            pick = left[int(rng.integers(len(left)))] if rng.random() < self.epsilon else best
            p = self.epsilon / len(left) + (1.0 - self.epsilon) * (pick == best)
            left.remove(pick)
            index.append(pick)
            propensity.append(p)
        return Picks(np.asarray(index, dtype=np.int64), np.asarray(propensity, dtype=np.float64))


@dataclass(frozen=True)
class Thompson:
    draws: int = 1000  # Monte Carlo draws behind each propensity
    name: str = "thompson"
    deterministic: bool = False

    def choose(self, alpha: np.ndarray, beta: np.ndarray, slots: int, rng: np.random.Generator) -> Picks:
        n = min(slots, len(alpha))
        theta = rng.beta(alpha, beta)
        index = np.lexsort((np.arange(len(theta)), -theta))[:n].astype(np.int64)
        if n == 0:
            return Picks(index, np.ones(0))
        sims = rng.beta(alpha, beta, size=(self.draws, len(alpha)))
        left = np.ones(len(alpha), dtype=bool)
        propensity = np.empty(n)
        for s, pick in enumerate(index):
            masked = np.where(left, sims, -np.inf)
            wins = int(np.count_nonzero(masked.argmax(axis=1) == pick))
            propensity[s] = max(wins, 1) / (self.draws + (wins == 0))
            left[pick] = False
        return Picks(index, propensity)


POLICIES = {"greedy": Greedy, "epsilon-greedy": EpsilonGreedy, "ucb": UCB, "thompson": Thompson}


def make_policy(name: str, *, epsilon: float = 0.1, ucb_c: float = 2.0, draws: int = 1000) -> Policy:
    """The policy a setting names (``thompson`` is what serving does today)."""
    if name == "greedy":
        return Greedy()
    if name == "epsilon-greedy":
        return EpsilonGreedy(epsilon)
    if name == "ucb":
        return UCB(ucb_c)
    if name == "thompson":
        return Thompson(draws)
    raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICIES)})")


__all__ = ["Picks", "Policy", "Greedy", "UCB", "EpsilonGreedy", "Thompson", "POLICIES", "make_policy"]
