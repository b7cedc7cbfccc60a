"""Off-policy estimators: hand-computed values on a four-decision log, the identities between
them (DR = IPS with a zero model, DR = DM with a perfect one, IPS on-policy = the mean reward,
SNIPS scale-free), the bootstrap interval (covers its point, narrows with data, reproducible,
independent of its block size), unbiasedness on a simulated bandit whose true value is known,
and the support check."""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.models import ope
from streamrec.models.errors import StreamrecError
from streamrec.models.ope import (
    ESTIMATORS,
    Decisions,
    Estimate,
    SupportMismatch,
    check_support,
    dm,
    dr,
    ess,
    estimate,
    evaluate,
    ips,
    snips,
)


def log(**over: object) -> Decisions:
    """Four decisions with chosen numbers (weights 2, 0.5, 0.5, 0)."""
    fields: dict[str, object] = {
        "reward": [1.0, 0.0, 1.0, 0.5],
        "logged_p": [0.25, 0.5, 0.8, 0.1],
        "target_p": [0.5, 0.25, 0.4, 0.0],
        "q_logged": [0.6, 0.2, 0.7, 0.3],
        "v_target": [0.55, 0.3, 0.65, 0.4],
        "mismatch": [0.0, 0.0, 0.0, 0.0],
    }
    fields.update(over)
    return Decisions(**{k: np.asarray(v, dtype=float) for k, v in fields.items()})


def bandit(n: int, seed: int) -> tuple[Decisions, float]:
    """A contextual bandit: 4 equally likely contexts, 3 actions, Bernoulli rewards with means
    ``MU``; logging uniform (1/3 each), the candidate deterministic (action ``PI[x]``). The
    reward model is deliberately off (+0.15 everywhere), so DR must lean on its propensities.
    Returns the decisions and the candidate's true value ``mean_x MU[x, PI[x]]``."""
    mu = np.array([[0.1, 0.5, 0.3], [0.7, 0.2, 0.4], [0.3, 0.3, 0.8], [0.05, 0.6, 0.2]])
    pi = np.array([1, 0, 2, 0])  # the candidate's action per context
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, n)
    a = rng.integers(0, 3, n)
    r = (rng.random(n) < mu[x, a]).astype(float)
    rhat = mu + 0.15  # at most 0.85: still a probability
    d = Decisions(reward=r, logged_p=np.full(n, 1.0 / 3.0), target_p=(a == pi[x]).astype(float),
                  q_logged=rhat[x, a], v_target=rhat[x, pi[x]], mismatch=np.zeros(n))
    truth = float(np.mean(mu[np.arange(4), pi]))  # (0.5 + 0.7 + 0.8 + 0.05) / 4
    return d, truth


# --- point estimators, by hand -------------------------------------------------------------


def test_ips_by_hand() -> None:
    expected = (0.5 / 0.25 * 1.0 + 0.25 / 0.5 * 0.0 + 0.4 / 0.8 * 1.0 + 0.0 / 0.1 * 0.5) / 4
    assert ips(log()) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.625, rel=1e-12)


def test_snips_by_hand() -> None:
    expected = ((0.5 / 0.25 * 1.0 + 0.25 / 0.5 * 0.0 + 0.4 / 0.8 * 1.0 + 0.0 / 0.1 * 0.5)
                / (0.5 / 0.25 + 0.25 / 0.5 + 0.4 / 0.8 + 0.0 / 0.1))
    assert snips(log()) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(2.5 / 3.0, rel=1e-12)


def test_dr_by_hand() -> None:
    expected = ((0.55 + 0.5 / 0.25 * (1.0 - 0.6))
                + (0.3 + 0.25 / 0.5 * (0.0 - 0.2))
                + (0.65 + 0.4 / 0.8 * (1.0 - 0.7))
                + (0.4 + 0.0 / 0.1 * (0.5 - 0.3))) / 4
    assert dr(log()) == pytest.approx(expected, rel=1e-12)


def test_dm_by_hand() -> None:
    assert dm(log()) == pytest.approx((0.55 + 0.3 + 0.65 + 0.4) / 4, rel=1e-12)


def test_ess_by_hand() -> None:
    w = (0.5 / 0.25, 0.25 / 0.5, 0.4 / 0.8, 0.0 / 0.1)
    expected = (w[0] + w[1] + w[2] + w[3]) ** 2 / (w[0] ** 2 + w[1] ** 2 + w[2] ** 2 + w[3] ** 2)
    assert ess(log()) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(2.0, rel=1e-12)


def test_all_weights_zero_gives_ess_zero_and_snips_nan() -> None:
    d = log(target_p=[0.0, 0.0, 0.0, 0.0])
    assert ess(d) == 0.0
    assert np.isnan(snips(d))
    assert ips(d) == 0.0


def test_the_registry_names_every_estimator() -> None:
    assert ESTIMATORS == {"ips": ips, "snips": snips, "dr": dr, "dm": dm}
    assert set(ope.__all__) >= {"Decisions", "Estimate", "SupportMismatch", "ESTIMATORS", "ips", "snips",
                                "dr", "dm", "ess", "check_support", "estimate", "evaluate"}


# --- identities -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.1, 0.5, 2.0])
def test_snips_is_invariant_to_scaling_the_target_probabilities(scale: float) -> None:
    base = log(target_p=[0.4, 0.2, 0.3, 0.1])
    scaled = log(target_p=[0.4 * scale, 0.2 * scale, 0.3 * scale, 0.1 * scale])
    assert snips(scaled) == pytest.approx(snips(base), rel=1e-12)
    assert ips(scaled) == pytest.approx(scale * ips(base), rel=1e-12)  # IPS is not


def test_dr_equals_ips_with_a_zero_reward_model() -> None:
    d = log(q_logged=[0.0] * 4, v_target=[0.0] * 4)
    assert dr(d) == pytest.approx(ips(d), rel=1e-12)


def test_dr_equals_dm_when_the_model_predicts_every_reward() -> None:
    d = log(q_logged=[1.0, 0.0, 1.0, 0.5])  # = reward: every residual is 0
    assert dr(d) == pytest.approx(dm(d), rel=1e-12)


def test_on_policy_ips_is_the_mean_reward_and_ess_is_n() -> None:
    p = [0.25, 0.5, 0.8, 0.1]
    d = log(target_p=p, logged_p=p)
    assert ips(d) == (1.0 + 0.0 + 1.0 + 0.5) / 4
    assert snips(d) == pytest.approx((1.0 + 0.0 + 1.0 + 0.5) / 4, rel=1e-12)
    assert ess(d) == pytest.approx(4.0, rel=1e-12)


# --- the bootstrap --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_interval_contains_the_point_and_is_reproducible(name: str) -> None:
    d, _ = bandit(3000, seed=1)
    est = estimate(d, name, n_boot=300, seed=5)
    assert isinstance(est, Estimate) and est.estimator == name and est.n == 3000
    assert est.value == ESTIMATORS[name](d)
    assert est.low <= est.value <= est.high
    assert est.stderr > 0 and est.level == 0.95
    assert est.ess == pytest.approx(ess(d), rel=1e-12)
    assert estimate(d, name, n_boot=300, seed=5) == est  # the same seed, the same interval
    assert estimate(d, name, n_boot=300, seed=6) != est


def test_interval_narrows_with_more_data() -> None:
    small = estimate(bandit(2000, seed=2)[0], "ips", n_boot=400)
    large = estimate(bandit(50000, seed=2)[0], "ips", n_boot=400)
    assert large.high - large.low < 0.5 * (small.high - small.low)  # ~ 1/sqrt(25) = 0.2
    assert large.stderr < 0.5 * small.stderr


def test_a_higher_level_gives_a_wider_interval() -> None:
    d, _ = bandit(3000, seed=3)
    narrow, wide = estimate(d, "dr", level=0.5, n_boot=500), estimate(d, "dr", level=0.99, n_boot=500)
    assert wide.low < narrow.low <= narrow.high < wide.high


def test_the_block_size_does_not_change_the_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = bandit(2000, seed=4)
    whole = estimate(d, "snips", n_boot=120, seed=9)
    monkeypatch.setattr(ope, "_BLOCK_ELEMENTS", 7 * 2000)  # 7 replicates per block: 17 blocks, one short
    assert estimate(d, "snips", n_boot=120, seed=9) == whole


def test_to_dict_rounds_and_maps_nan_to_none() -> None:
    est = Estimate("snips", 1 / 3, 0.1234567891, 0.5, 0.95, float("nan"), 2.0, 4)
    assert est.to_dict() == {"estimator": "snips", "value": 0.333333, "low": 0.123457, "high": 0.5,
                             "level": 0.95, "stderr": None, "ess": 2.0, "n": 4}


@pytest.mark.parametrize("seed", [11, 12])
def test_dr_and_ips_intervals_cover_the_true_value_of_a_simulated_bandit(seed: int) -> None:
    d, truth = bandit(20000, seed=seed)
    assert truth == pytest.approx((0.5 + 0.7 + 0.8 + 0.05) / 4, rel=1e-12)
    result = evaluate(d, ("ips", "snips", "dr", "dm"), n_boot=500, seed=seed)
    for name in ("ips", "snips", "dr"):
        assert result[name].low <= truth <= result[name].high, (name, result[name], truth)
    # the model is biased by +0.15 and DM, trusting it, misses the truth by that much
    assert result["dm"].value == pytest.approx(truth + 0.15, abs=0.01)
    assert not result["dm"].low <= truth <= result["dm"].high
    assert result["ips"].ess == pytest.approx(20000 / 3, rel=0.05)  # a third of the actions match


# --- support --------------------------------------------------------------------------------


def test_support_mismatch_says_how_much_mass_is_unsupported() -> None:
    n = 1200
    d = Decisions(reward=np.ones(n), logged_p=np.ones(n), target_p=np.full(n, 0.625),
                  q_logged=np.zeros(n), v_target=np.zeros(n), mismatch=np.full(n, 0.375))
    with pytest.raises(SupportMismatch) as info:
        check_support(d, tolerance=0.01)
    message = str(info.value)
    assert "37.5%" in message and "1,200 logged decisions" in message and "tolerance 1.0%" in message
    assert "epsilon-greedy" in message and "\n" not in message
    assert isinstance(info.value, StreamrecError)
    assert (info.value.share, info.value.tolerance, info.value.n) == (pytest.approx(0.375), 0.01, n)
    with pytest.raises(SupportMismatch):
        evaluate(d)  # checked before any estimator runs
    check_support(d, tolerance=0.4)  # below the tolerance: no error
    assert set(evaluate(d, tolerance=0.4, n_boot=50)) == {"ips", "snips", "dr"}


def test_support_below_tolerance_does_not_raise() -> None:
    check_support(log(mismatch=[0.0, 0.02, 0.0, 0.01]), tolerance=0.01)  # mean 0.0075


def test_a_logged_choice_with_probability_zero_that_the_candidate_takes_raises() -> None:
    d = log(logged_p=[0.25, 0.0, 0.8, 0.1])  # row 1: target 0.25
    with pytest.raises(SupportMismatch, match="1 of 4 logged decisions"):
        check_support(d)
    with pytest.raises(SupportMismatch):
        ips(d)
    assert ips(log(logged_p=[0.25, 0.5, 0.8, 0.0])) == pytest.approx(0.625)  # target 0 there: weight 0


# --- invalid input --------------------------------------------------------------------------


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        log(reward=[1.0, 0.0, 1.0])


@pytest.mark.parametrize("field", ["logged_p", "target_p", "mismatch"])
def test_probabilities_outside_zero_one_raise(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must lie in"):
        log(**{field: [0.5, -0.1, 0.5, 0.5]})
    with pytest.raises(ValueError, match=f"{field} must lie in"):
        log(**{field: [0.5, 0.5, 1.5, 0.5]})


@pytest.mark.parametrize("bad", [
    {"reward": [1.0, float("nan"), 0.0, 0.0]},
    {"q_logged": [[0.1, 0.2], [0.3, 0.4]]},
    {field: [] for field in ("reward", "logged_p", "target_p", "q_logged", "v_target", "mismatch")},
])
def test_non_finite_multidimensional_or_empty_input_raises(bad: dict[str, list[float]]) -> None:
    with pytest.raises(ValueError):
        log(**bad)


def test_bad_arguments_raise() -> None:
    d = log()
    with pytest.raises(ValueError, match="unknown estimator 'magic'"):
        estimate(d, "magic")
    with pytest.raises(ValueError, match="unknown estimator"):
        evaluate(d, ("ips", "magic"))
    with pytest.raises(ValueError, match="level"):
        estimate(d, level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        estimate(d, n_boot=1)
    with pytest.raises(ValueError, match="tolerance"):
        check_support(d, tolerance=-0.1)


def test_fields_are_converted_to_float64_arrays() -> None:
    one, zero = np.array([1, 1]), np.array([0, 0])  # int64
    d = Decisions(reward=np.array([1, 0]), logged_p=one, target_p=np.array([1, 0]), q_logged=zero,
                  v_target=zero, mismatch=zero)
    assert all(getattr(d, f).dtype == np.float64 for f in ("reward", "logged_p", "mismatch"))
    assert d.n == 2 and ips(d) == 0.5
