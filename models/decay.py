"""Forward exponential decay, kept in log space so it never overflows.

A decayed sum at reference time ``T`` is ``V(T) = sum_k w_k * 2 ** (-(T - t_k) / h)`` with
half-life ``h``. Rewritten as ``2 ** (-T / h) * sum_k w_k * 2 ** (t_k / h)``, the sum no longer
depends on ``T``: it is an ordinary sum, so updates commute (any arrival order gives the same
value) and two sums are compared at any common ``T`` by comparing them directly. We store
``L = log2(sum_k w_k * 2 ** (t_k / h))`` (units: half-lives), updated with ``log_add``; the
decayed value at ``T`` is ``2 ** (L - T / h)``. ``L`` grows by one per half-life of event time,
so doubles keep full precision for millennia.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

NEG_INF = -math.inf

F = TypeVar("F", float, np.ndarray)


def contribution(weight: float, t_ms: float, half_life_ms: float) -> float:
    """log2 of one term ``weight * 2 ** (t / h)``; ``weight`` must be positive."""
    return math.log2(weight) + t_ms / half_life_ms


def log_add(a: float, b: float) -> float:
    """log2(2**a + 2**b), exact to rounding for any magnitudes."""
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    hi, lo = (a, b) if a >= b else (b, a)
    return hi + math.log2(1.0 + 2.0 ** (lo - hi))


def value_at(log_sum: F, at_ms: float, half_life_ms: float) -> F:
    """The decayed sum at time ``at_ms``, for one log2 sum or an array of them (``-inf``, no
    evidence, reads as 0)."""
    # Reading long before the evidence (a time in seconds, say) must not overflow.
    return np.exp2(np.minimum(np.subtract(log_sum, at_ms / half_life_ms), 1000.0))  # type: ignore[return-value]


def log_sum_by(groups: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Per group ``g`` in ``range(size)``, log2 of the sum of ``2 ** x[k]`` over the k with
    ``groups[k] == g`` (``-inf`` for an empty group): ``log_add`` folded over each group, in
    one vectorised pass. Equal to the sequential fold to a relative 1e-15 or so (the sums are
    formed in another order), not bit for bit."""
    groups = np.asarray(groups, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    top = np.full(size, NEG_INF)
    np.maximum.at(top, groups, x)
    total = np.bincount(groups, weights=np.exp2(x - top[groups]), minlength=size)
    with np.errstate(divide="ignore"):
        return top + np.log2(total)
