"""The exploration policies' contract (every policy) and their propensities: exact for
epsilon-greedy (hand-computed), deterministic ones 1, Thompson's Monte Carlo estimate close
to the frequency observed over many independent choices."""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.models.policies import POLICIES, EpsilonGreedy, Greedy, Policy, Thompson, UCB, make_policy

ALPHA = np.array([1.0, 5.0, 2.0, 9.0, 1.5, 3.0])
BETA = np.array([10.0, 6.0, 12.0, 20.0, 2.0, 30.0])


@pytest.fixture(params=sorted(POLICIES))
def policy(request: pytest.FixtureRequest) -> Policy:
    return make_policy(request.param, epsilon=0.3, draws=4000)


def test_contract_distinct_picks_valid_propensities_reproducible(policy: Policy) -> None:
    assert isinstance(policy, Policy)
    for slots in (0, 1, 3, 6, 10):
        picks = policy.choose(ALPHA, BETA, slots, np.random.default_rng(7))
        n = min(slots, len(ALPHA))
        assert len(picks.index) == len(picks.propensity) == n
        assert len(set(picks.index.tolist())) == n and all(0 <= i < len(ALPHA) for i in picks.index)
        assert np.all(picks.propensity > 0) and np.all(picks.propensity <= 1)
        again = policy.choose(ALPHA, BETA, slots, np.random.default_rng(7))
        assert again.index.tolist() == picks.index.tolist()  # the same generator state, the same picks
        if policy.deterministic:
            assert np.all(picks.propensity == 1.0)
            other = policy.choose(ALPHA, BETA, slots, np.random.default_rng(99))
            assert other.index.tolist() == picks.index.tolist()


def test_first_slot_propensity_matches_the_observed_frequency(policy: Policy) -> None:
    """Slot 0 has no earlier picks, so its propensity is the plain probability of the pick:
    over 3,000 independent choices each picked item's frequency is its logged propensity (within
    five binomial standard errors plus the Monte Carlo error of Thompson's estimate)."""
    rng = np.random.default_rng(3)
    runs = 3000
    seen: dict[int, int] = {}
    logged: dict[int, list[float]] = {}
    for _ in range(runs):
        picks = policy.choose(ALPHA, BETA, 1, rng)
        i = int(picks.index[0])
        seen[i] = seen.get(i, 0) + 1
        logged.setdefault(i, []).append(float(picks.propensity[0]))
    for i, count in seen.items():
        p = float(np.mean(logged[i]))
        freq = count / runs
        tolerance = 5 * np.sqrt(p * (1 - p) / runs) + (0.02 if isinstance(policy, Thompson) else 0.0)
        assert abs(freq - p) <= tolerance + 1e-12, (policy.name, i, freq, p)


def test_epsilon_greedy_propensities_are_exact() -> None:
    # means: 0.0909, 0.4545, 0.1429, 0.3103, 0.4286, 0.0909 -> best first: 1, 4, 3, 2, 0, 5
    policy = EpsilonGreedy(0.3)
    picks = policy.choose(ALPHA, BETA, 3, np.random.default_rng(0))
    left = [1, 4, 3, 2, 0, 5]
    for s, (i, p) in enumerate(zip(picks.index.tolist(), picks.propensity.tolist())):
        expected = 0.3 / len(left) + (0.7 if i == left[0] else 0.0)
        assert p == pytest.approx(expected, abs=1e-15), (s, i)
        left.remove(i)
    always = EpsilonGreedy(0.0).choose(ALPHA, BETA, 3, np.random.default_rng(0))
    assert always.index.tolist() == [1, 4, 3] and always.propensity.tolist() == [1.0, 1.0, 1.0]
    uniform = EpsilonGreedy(1.0).choose(ALPHA, BETA, 3, np.random.default_rng(0))
    assert uniform.propensity.tolist() == pytest.approx([1 / 6, 1 / 5, 1 / 4])


def test_greedy_and_ucb_orders() -> None:
    assert Greedy().choose(ALPHA, BETA, 2, np.random.default_rng(0)).index.tolist() == [1, 4]
    # little evidence widens the bound: item 4 (3.5 pseudo-trials) passes item 1 (11)
    assert UCB(c=3.0).choose(ALPHA, BETA, 1, np.random.default_rng(0)).index.tolist() == [4]
    with pytest.raises(ValueError):
        make_policy("softmax")
    with pytest.raises(ValueError):
        EpsilonGreedy(1.5)


def test_propensities_of_own_picks_equal_what_choose_logged(policy: Policy) -> None:
    """``propensities`` (scoring a logged list under a policy) gives ``choose``'s own numbers
    for its own picks: exactly for the closed-form policies, within Monte Carlo error for
    Thompson (two independent estimates of the same probability)."""
    for seed in range(20):
        picks = policy.choose(ALPHA, BETA, 3, np.random.default_rng(seed))
        again = policy.propensities(ALPHA, BETA, picks.index, np.random.default_rng(seed + 100))
        if isinstance(policy, Thompson):
            assert np.allclose(again, picks.propensity, atol=0.05)
        else:
            assert again.tolist() == picks.propensity.tolist()


def test_propensities_of_other_lists() -> None:
    """A list a deterministic policy would not serve has probability 0 under it; under
    epsilon-greedy every list has a positive, hand-computed probability."""
    other = np.array([5, 0, 1])  # greedy's list is [1, 4, 3]; given 5 and 0, greedy picks 1 next
    assert Greedy().propensities(ALPHA, BETA, other, np.random.default_rng(0)).tolist() == [0.0, 0.0, 1.0]
    assert Greedy().propensities(ALPHA, BETA, np.array([1, 4, 2]), np.random.default_rng(0)).tolist() == [1.0, 1.0, 0.0]
    p = EpsilonGreedy(0.3).propensities(ALPHA, BETA, other, np.random.default_rng(0))
    # best left: 1 (slot 0), 1 (slot 1: 5 taken), 1 -> picked at slot 2: 0.3/4 + 0.7
    assert p.tolist() == pytest.approx([0.3 / 6, 0.3 / 5, 0.3 / 4 + 0.7], abs=1e-15)


def test_thompson_later_slot_propensity_matches_the_conditional_frequency() -> None:
    """Slot 1's propensity is the probability of the pick given slot 0's: among choices whose
    slot 0 was item 4, the frequency of each slot-1 item matches its logged propensity."""
    policy = Thompson(draws=4000)
    rng = np.random.default_rng(11)
    counts: dict[int, int] = {}
    logged: dict[int, list[float]] = {}
    total = 0
    for _ in range(4000):
        picks = policy.choose(ALPHA, BETA, 2, rng)
        if int(picks.index[0]) != 4:
            continue
        total += 1
        i = int(picks.index[1])
        counts[i] = counts.get(i, 0) + 1
        logged.setdefault(i, []).append(float(picks.propensity[1]))
    assert total > 500
    for i, c in counts.items():
        p = float(np.mean(logged[i]))
        assert abs(c / total - p) <= 5 * np.sqrt(p * (1 - p) / total) + 0.02, (i, c / total, p)
