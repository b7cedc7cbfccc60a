"""Off-policy evaluation: what a candidate policy would have earned, estimated from the
decisions a logging policy made (issue 13, part 2: the estimators; reading the served log comes
next).

A **decision** is one logged choice made with one known propensity: a served slate, or the
group of exploration slots in it (``models.policies`` logs, slot by slot, the sequential
propensities whose product is the group's). For decision ``i`` with context ``x_i`` the log
holds the logged action ``a_i`` and its reward ``r_i``, the logging probability
``mu_i = mu(a_i | x_i) > 0``, the candidate's probability ``pi_i = pi(a_i | x_i) >= 0``, and a
reward model's predictions ``q_i = rhat(x_i, a_i)`` and ``v_i = sum_a pi(a | x_i) rhat(x_i, a)``.
With the importance weight ``w_i = pi_i / mu_i`` and ``n`` decisions:

- ``ips`` (inverse propensity scoring): ``V = (1/n) sum_i w_i r_i``. Unbiased when the logged
  propensities are right and the logging policy covers every action the candidate takes;
  its variance grows with the weights.
- ``snips`` (self-normalised IPS): ``V = sum_i w_i r_i / sum_i w_i`` (nan when every weight
  is 0). Biased by O(1/n) but consistent, usually far less variable than IPS, and unchanged
  when every ``pi_i`` is scaled by one constant.
- ``dr`` (doubly robust): ``V = (1/n) sum_i [v_i + w_i (r_i - q_i)]``: the reward model's value
  corrected by the weighted residuals. Unbiased when *either* the propensities are correct (the
  correction removes the model's bias in expectation) *or* the reward model is correct (the
  residuals have mean 0 whatever the weights); with a fair model its variance is below IPS's.
- ``dm`` (direct method): ``V = (1/n) sum_i v_i``: the reward model alone. Low variance, no
  weights, and as biased as the model is; the interval below says nothing about that bias.

Every value is in the unit of ``reward`` (clicks per slot when the reward is the clicks in
the exploration slots divided by their number).

**Support.** ``mismatch_i`` is the probability mass the candidate puts, at ``x_i``, on actions
the logging policy never takes there. No weight can recover that mass, so IPS, SNIPS and DR
silently leave it out; ``check_support`` refuses the evaluation (``SupportMismatch``) when its
mean exceeds a tolerance. A deterministic (greedy, UCB) logger supports only itself: log with a
randomising policy.

**Bootstrap interval.** ``estimate`` resamples the ``n`` decisions with replacement ``n_boot``
times, recomputes the estimator on each resample (SNIPS: the ratio of the resampled sums; the
others: the mean of the resampled per-decision terms) and reports the ``(1 - level) / 2`` and
``(1 + level) / 2`` percentiles of the replicates as ``low`` and ``high``, and their standard
deviation as ``stderr``. It is the sampling uncertainty over decisions only: treating
decisions as independent, the propensities as exact and the reward model as fixed.

**Effective sample size.** ``ess = (sum_i w_i)^2 / sum_i w_i^2`` (0 when every weight is 0):
the number of on-policy decisions that would give a weighted mean as precise. It equals ``n``
on-policy (all weights equal) and falls as the candidate moves away from the logger; an ESS of
a few dozen means the interval is not to be trusted, whatever its width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import numpy as np

from streamrec.models.errors import InvalidArgument, StreamrecError

# Resampled indices held at once by the bootstrap (int64: 32 MiB); with n = 200,000 that is 20
# replicates per block. The result does not depend on it: blocks draw the same index stream.
_BLOCK_ELEMENTS = 1 << 22


class SupportMismatch(StreamrecError):
    """The logged propensities cannot support the candidate: it puts more than ``tolerance``
    of its probability mass (``share``, mean over ``n`` decisions) on choices the logging
    policy never makes, or gives probability > 0 to a logged choice the logger gave 0."""

    def __init__(self, message: str, *, share: float, tolerance: float, n: int) -> None:
        super().__init__(message)
        self.share = share
        self.tolerance = tolerance
        self.n = n


@dataclass(frozen=True)
class Decisions:
    """One row per logged decision; every field is float64 of shape (n,), n >= 1."""

    reward: np.ndarray  # observed reward of the logged action (any finite float)
    logged_p: np.ndarray  # mu(a_i | x_i) in [0, 1], > 0 for anything really logged
    target_p: np.ndarray  # pi(a_i | x_i) in [0, 1]
    q_logged: np.ndarray  # rhat(x_i, a_i)
    v_target: np.ndarray  # sum_a pi(a | x_i) rhat(x_i, a)
    mismatch: np.ndarray  # pi's mass on actions mu never takes at x_i, in [0, 1]

    def __post_init__(self) -> None:
        names = [f.name for f in fields(self)]
        for name in names:
            try:
                value = np.asarray(getattr(self, name), dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"Decisions.{name} must be numeric ({exc})") from None
            if value.ndim != 1:
                raise InvalidArgument(f"Decisions.{name} must be one-dimensional (got shape {value.shape})")
            if not np.all(np.isfinite(value)):
                raise InvalidArgument(f"Decisions.{name} holds {np.count_nonzero(~np.isfinite(value))} "
                                      f"non-finite values (nan or inf)")
            object.__setattr__(self, name, value)
        shapes = {name: getattr(self, name).shape for name in names}
        if len(set(shapes.values())) != 1:
            raise InvalidArgument("Decisions fields must all have the same shape (got "
                                  + ", ".join(f"{k} {v}" for k, v in shapes.items()) + ")")
        if len(self.reward) == 0:
            raise InvalidArgument("Decisions needs at least one logged decision (got 0)")
        for name in ("logged_p", "target_p", "mismatch"):
            value = getattr(self, name)
            bad = (value < 0.0) | (value > 1.0)
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise InvalidArgument(f"Decisions.{name} must lie in [0, 1]: {int(bad.sum())} values do not "
                                      f"(row {first}: {float(value[first])})")

    @property
    def n(self) -> int:
        return len(self.reward)

    @property
    def weight(self) -> np.ndarray:
        """Importance weights ``target_p / logged_p``, shape (n,); 0 where both are 0.
        Raises ``SupportMismatch`` where the candidate gives > 0 to a choice logged with 0."""
        _check_logged(self)
        w: np.ndarray = np.divide(self.target_p, self.logged_p, out=np.zeros(self.n), where=self.logged_p > 0.0)
        return w


def _check_logged(d: Decisions) -> None:
    """A logged choice has logging probability > 0; one with 0 that the candidate takes means
    the propensities were logged wrong, and no weight can be formed for it."""
    unsupported = (d.logged_p == 0.0) & (d.target_p > 0.0)
    if unsupported.any():
        k = int(unsupported.sum())
        raise SupportMismatch(
            f"the logged propensities cannot support this candidate: {k:,} of {d.n:,} logged "
            f"decisions have logging probability 0 but candidate probability > 0, so no importance "
            f"weight exists for them; check the propensities the serving policy logs",
            share=k / d.n, tolerance=0.0, n=d.n)


# --- the estimators: each one a ratio sum(num) / sum(den) of per-decision terms --------------
# den is None for a plain mean (den = 1 per row), which lets the bootstrap skip its gather.

Terms = tuple[np.ndarray, np.ndarray | None]


def _ips_terms(d: Decisions) -> Terms:
    return d.weight * d.reward, None


def _snips_terms(d: Decisions) -> Terms:
    w = d.weight
    return w * d.reward, w


def _dr_terms(d: Decisions) -> Terms:
    return d.v_target + d.weight * (d.reward - d.q_logged), None


def _dm_terms(d: Decisions) -> Terms:
    return d.v_target, None


_TERMS: dict[str, Callable[[Decisions], Terms]] = {
    "ips": _ips_terms, "snips": _snips_terms, "dr": _dr_terms, "dm": _dm_terms,
}


def _point(num: np.ndarray, den: np.ndarray | None) -> float:
    if den is None:
        return float(num.sum() / len(num))
    total = float(den.sum())
    return float(num.sum()) / total if total != 0.0 else math.nan


def ips(d: Decisions) -> float:
    """``mean(w r)``."""
    return _point(*_ips_terms(d))


def snips(d: Decisions) -> float:
    """``sum(w r) / sum(w)``; nan when every weight is 0."""
    return _point(*_snips_terms(d))


def dr(d: Decisions) -> float:
    """``mean(v_target + w (r - q_logged))``."""
    return _point(*_dr_terms(d))


def dm(d: Decisions) -> float:
    """``mean(v_target)``."""
    return _point(*_dm_terms(d))


ESTIMATORS: dict[str, Callable[[Decisions], float]] = {"ips": ips, "snips": snips, "dr": dr, "dm": dm}


def ess(d: Decisions) -> float:
    """Effective sample size ``(sum w)^2 / sum w^2``, in decisions; 0 when every weight is 0."""
    w = d.weight
    square = float(np.dot(w, w))
    return float(w.sum()) ** 2 / square if square > 0.0 else 0.0


def check_support(d: Decisions, tolerance: float = 0.01) -> None:
    """Raise ``SupportMismatch`` when ``mean(mismatch) > tolerance`` (a share, 0.01 = 1%)."""
    if not 0.0 <= tolerance < 1.0:
        raise InvalidArgument(f"the support tolerance must lie in [0, 1) (got {tolerance})")
    _check_logged(d)
    share = float(d.mismatch.mean())
    if share > tolerance:
        raise SupportMismatch(
            f"the logged propensities cannot support this candidate: {share:.1%} of its probability "
            f"mass (mean over {d.n:,} logged decisions; tolerance {tolerance:.1%}) falls on choices the "
            f"logging policy never makes; log with a randomising policy (serving.policy=epsilon-greedy "
            f"or thompson) or evaluate a candidate closer to it",
            share=share, tolerance=tolerance, n=d.n)


@dataclass(frozen=True)
class Estimate:
    """One estimator's value with its bootstrap percentile interval ``[low, high]`` at
    ``level``, the bootstrap standard deviation ``stderr``, the ESS and ``n`` decisions.
    Values are in the unit of the reward."""

    estimator: str
    value: float
    low: float
    high: float
    level: float
    stderr: float
    ess: float
    n: int

    def to_dict(self, digits: int = 6) -> dict[str, str | float | int | None]:
        """JSON-ready: floats rounded to ``digits`` decimals, nan (no value) as None."""
        def r(x: float) -> float | None:
            return round(x, digits) if math.isfinite(x) else None

        return {"estimator": self.estimator, "value": r(self.value), "low": r(self.low),
                "high": r(self.high), "level": self.level, "stderr": r(self.stderr),
                "ess": r(self.ess), "n": self.n}


def _bootstrap(num: np.ndarray, den: np.ndarray | None, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` replicates of ``sum(num) / sum(den)`` over resamples of the rows, shape
    (n_boot,); nan for a replicate whose ``sum(den)`` is 0. Holds at most ``_BLOCK_ELEMENTS``
    indices at a time."""
    n = len(num)
    out = np.empty(n_boot)
    block = max(1, min(n_boot, _BLOCK_ELEMENTS // n))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))  # (b, n) rows resampled per replicate
        top = num[idx].sum(axis=1)
        if den is None:
            out[start:start + b] = top / n
        else:
            bottom = den[idx].sum(axis=1)
            out[start:start + b] = np.divide(top, bottom, out=np.full(b, np.nan), where=bottom != 0.0)
    return out


def estimate(d: Decisions, estimator: str = "dr", *, level: float = 0.95, n_boot: int = 1000,
             seed: int = 0) -> Estimate:
    """One estimator with a bootstrap percentile interval over ``n_boot`` resamples of the
    decisions (``np.random.default_rng(seed)``: the same seed, the same interval). Does not
    check support: ``evaluate`` does."""
    terms = _TERMS.get(estimator)
    if terms is None:
        raise InvalidArgument(f"unknown estimator {estimator!r} (one of {', '.join(ESTIMATORS)})")
    if not 0.0 < level < 1.0:
        raise InvalidArgument(f"the interval level must lie in (0, 1) (got {level})")
    if n_boot < 2:
        raise InvalidArgument(f"the bootstrap needs at least 2 resamples (got n_boot={n_boot})")
    num, den = terms(d)
    reps = _bootstrap(num, den, n_boot, np.random.default_rng(seed))
    reps = reps[np.isfinite(reps)]
    if len(reps) >= 2:
        low, high = (float(x) for x in np.quantile(reps, [(1.0 - level) / 2.0, (1.0 + level) / 2.0]))
        stderr = float(reps.std(ddof=1))
    else:
        low = high = stderr = math.nan
    return Estimate(estimator, _point(num, den), low, high, level, stderr, ess(d), d.n)


def evaluate(d: Decisions, estimators: Iterable[str] = ("ips", "snips", "dr"), *, tolerance: float = 0.01,
             level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Check support (``SupportMismatch``), then each estimator by name, in the order given.
    Every estimator resamples the same decisions (one seed), so their intervals compare."""
    names = list(estimators)
    unknown = [name for name in names if name not in ESTIMATORS]
    if unknown:
        raise InvalidArgument(f"unknown estimator {', '.join(map(repr, unknown))} (one of {', '.join(ESTIMATORS)})")
    check_support(d, tolerance)
    return {name: estimate(d, name, level=level, n_boot=n_boot, seed=seed) for name in names}


__all__ = [
    "ESTIMATORS",
    "Decisions",
    "Estimate",
    "SupportMismatch",
    "check_support",
    "dm",
    "dr",
    "ess",
    "estimate",
    "evaluate",
    "ips",
    "snips",
]
