"""Online experiments between two rankers: team-draft interleaving and A/B splits (pure).

Throughout, ranker **a** is the *control* (what serves today) and ranker **b** the *treatment*
(the candidate). Every sign below is "positive means the treatment is better".

**Team-draft interleaving** (Radlinski, Kurup and Joachims, 2008). One list of up to ``k``
items is built from both rankings and shown to one user. The two rankers are teams picking
players: the team with fewer picks so far picks next; when both have picked equally often, a
fair coin (one ``rng.random() < 0.5`` per such round: below 0.5, a picks first) decides. A team
picks its highest-ranked item not yet in the list. When every item of one team's ranking is
already in the list, the other team keeps picking; the list ends at ``k`` items or when both are
exhausted. Each slot remembers the team that placed it. While both teams have items left, their
pick counts in every prefix differ by at most one, so neither ranker is favoured by position.

**Credit.** A click on a slot is a vote for the team that placed it. ``credit`` is +1 when the
treatment's slots got more clicks than the control's, -1 when fewer, 0 on a tie (no clicks
included). Over ``n`` impressions with ``W`` treatment wins, ``L`` control wins and ``T`` ties,
the preference score is ``delta = (W - L) / n`` in [-1, 1] (0: no preference).

**Sign test.** Ties carry no information about which ranker is better and are dropped. Under
the null hypothesis that neither ranker is preferred, each non-tied impression is a fair coin,
so ``W ~ Binomial(W + L, 1/2)``; the two-sided exact p-value is the probability, under that
null, of a split at least as lopsided as the one seen. A small p (below 0.05, say) means such a
lopsided split would be rare if the rankers were equally good. In an A/A experiment (the same
model on both sides) the null is true, so p < 0.05 happens in about 5% of runs, a little less
in practice because the binomial is discrete and the exact test is conservative (its true size
is 3-5% for 20-80 non-tied impressions). A run that stops the first time p dips below 0.05
inflates that rate: fix the number of impressions beforehand.

**A/B split.** ``assign_arm`` sends a fixed ``share`` of users into the experiment and splits
them evenly into control and treatment, from a keyed hash of the user id (blake2b, not Python's
``hash``, which is salted per process): the same user and salt give the same arm in every
process, on every machine, across restarts. Per arm, ``ArmStats`` holds the lists shown
(``impressions``), the lists with at least one click (``clicked``), the slots shown and the
clicks; ``list_ctr = clicked / impressions`` with its 95% Wilson score interval

    (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),      z = 1.95996...

which, unlike the normal approximation, stays inside [0, 1] and behaves near 0 and 1.
``ab_report`` compares the arms' ``list_ctr``: the difference ``d = p_t - p_c`` with the
unpooled normal 95% interval ``d ± z sqrt(p_t(1-p_t)/n_t + p_c(1-p_c)/n_c)`` and the two-sided
two-proportion z-test, whose standard error pools both arms under the null ``p_t = p_c``:
``z = d / sqrt(p(1-p)(1/n_t + 1/n_c))`` with ``p = (x_t + x_c) / (n_t + n_c)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from streamrec.models.errors import InvalidArgument

CONTROL = "control"
TREATMENT = "treatment"
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


def team_draft(
    a: Sequence[str], b: Sequence[str], k: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Interleave rankings ``a`` (control) and ``b`` (treatment) into up to ``k`` items.

    Returns ``(items, teams)``: the list in slot order and, per slot, "a" or "b", the team
    that placed it. ``len(items) == min(k, len(set(a) | set(b)))``. Uses exactly one
    ``rng.random()`` per round in which both teams have picked equally often and both still
    have items left (so a stub with a scripted ``random()`` can stand in for the generator).
    """
    if k < 0:
        raise InvalidArgument(f"team_draft: k must be at least 0 (got {k})")
    ranking = {"a": list(dict.fromkeys(a)), "b": list(dict.fromkeys(b))}  # duplicates: first kept
    cursor = {"a": 0, "b": 0}  # every item of a ranking before its cursor is already placed
    picks = {"a": 0, "b": 0}
    placed: set[str] = set()
    items: list[str] = []
    teams: list[str] = []

    def left(team: str) -> bool:
        ranks, i = ranking[team], cursor[team]
        while i < len(ranks) and ranks[i] in placed:
            i += 1
        cursor[team] = i
        return i < len(ranks)

    while len(items) < k:
        a_left, b_left = left("a"), left("b")
        if not (a_left or b_left):
            break
        if not b_left:
            team = "a"
        elif not a_left:
            team = "b"
        elif picks["a"] != picks["b"]:
            team = "a" if picks["a"] < picks["b"] else "b"
        else:
            team = "a" if rng.random() < 0.5 else "b"
        item = ranking[team][cursor[team]]
        placed.add(item)
        items.append(item)
        teams.append(team)
        picks[team] += 1
    return items, teams



def draft_propensities(a: Sequence[str], b: Sequence[str], items: Sequence[str], teams: Sequence[str]) -> list[float]:
    """The probability of each slot of a team-draft list given the earlier slots (and their
    teams): 0.5 where a coin decided which team picked and the two teams' next items differed,
    else 1 (the rules decide). Replays ``team_draft``'s rules on its output."""
    ranking = {"a": list(dict.fromkeys(a)), "b": list(dict.fromkeys(b))}
    picks = {"a": 0, "b": 0}
    placed: set[str] = set()
    out = []
    for item, team in zip(items, teams):
        nxt = {t: next((x for x in ranking[t] if x not in placed), None) for t in ("a", "b")}
        coin = nxt["a"] is not None and nxt["b"] is not None and picks["a"] == picks["b"]
        out.append(0.5 if coin and nxt["a"] != nxt["b"] else 1.0)
        placed.add(item)
        picks[team] += 1
    return out

def credit(teams: Sequence[str], clicked: Sequence[bool]) -> int:
    """+1 when team b's (the treatment's) slots got more clicks than team a's, -1 when fewer,
    0 on a tie (no clicks included). ``teams`` and ``clicked`` are per slot, equally long."""
    if len(teams) != len(clicked):
        raise InvalidArgument(
            f"credit: {len(teams)} teams but {len(clicked)} click flags (one of each per slot)"
        )
    score = 0  # clicks on b's slots minus clicks on a's
    for slot, (team, click) in enumerate(zip(teams, clicked)):
        if team not in ("a", "b"):
            raise InvalidArgument(f"credit: slot {slot} has team {team!r} (expected 'a' or 'b')")
        if click:
            score += 1 if team == "b" else -1
    return (score > 0) - (score < 0)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial sign test of ``wins`` against ``losses`` (ties left out): the
    p-value of a split at least this lopsided when each is a fair coin; 1.0 with no data."""
    if wins < 0 or losses < 0:
        raise InvalidArgument(f"sign_test: counts must be at least 0 (got {wins}, {losses})")
    if wins + losses == 0:
        return 1.0
    from scipy.stats import binomtest  # here, not at the top: importing scipy.stats takes ~1 s

    return min(1.0, float(binomtest(wins, wins + losses, 0.5).pvalue))


@dataclass(frozen=True)
class InterleaveReport:
    """The outcome of an interleaving experiment; positive ``delta`` favours the treatment (b)."""

    impressions: int
    treatment_wins: int  # impressions credited +1
    control_wins: int  # impressions credited -1
    ties: int  # impressions credited 0 (no clicks, or as many on each side)
    p_value: float  # sign test of treatment_wins against control_wins
    delta: float  # (treatment_wins - control_wins) / impressions, in [-1, 1]; 0 when none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def interleave_report(outcomes: Iterable[int]) -> InterleaveReport:
    """Summarise per-impression credits (``credit``'s +1 / -1 / 0) into one report."""
    counts = {1: 0, -1: 0, 0: 0}
    for i, outcome in enumerate(outcomes):
        if outcome not in counts:
            raise InvalidArgument(
                f"interleave_report: outcome {i} is {outcome!r} (expected +1, -1 or 0)"
            )
        counts[int(outcome)] += 1
    wins, losses, ties = counts[1], counts[-1], counts[0]
    n = wins + losses + ties
    return InterleaveReport(
        impressions=n,
        treatment_wins=wins,
        control_wins=losses,
        ties=ties,
        p_value=sign_test(wins, losses),
        delta=(wins - losses) / n if n else 0.0,
    )


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``; (0, 1) when ``n == 0``."""
    if n < 0 or not 0 <= successes <= n:
        raise InvalidArgument(f"wilson_interval: need 0 <= successes <= n (got {successes}, {n})")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ArmStats:
    """One arm's counts; the rates and the interval derive from them."""

    name: str  # "control" or "treatment"
    impressions: int  # lists shown
    clicked: int  # lists with at least one click
    slots: int  # slots shown, over all lists
    clicks: int  # clicks, over all lists

    def __post_init__(self) -> None:
        if min(self.impressions, self.clicked, self.slots, self.clicks) < 0:
            raise InvalidArgument(f"arm {self.name!r}: counts must be at least 0 ({self})")
        if self.clicked > self.impressions:
            raise InvalidArgument(
                f"arm {self.name!r}: {self.clicked} clicked lists of {self.impressions} shown"
            )
        if self.clicked > self.clicks:
            raise InvalidArgument(
                f"arm {self.name!r}: {self.clicked} clicked lists but only {self.clicks} clicks"
            )

    @property
    def list_ctr(self) -> float:
        """Share of lists with at least one click (0 with no lists)."""
        return self.clicked / self.impressions if self.impressions else 0.0

    @property
    def slot_ctr(self) -> float:
        """Clicks per slot shown (0 with no slots)."""
        return self.clicks / self.slots if self.slots else 0.0

    @property
    def low(self) -> float:
        """Lower end of the 95% Wilson interval for ``list_ctr``."""
        return wilson_interval(self.clicked, self.impressions)[0]

    @property
    def high(self) -> float:
        """Upper end of the 95% Wilson interval for ``list_ctr``."""
        return wilson_interval(self.clicked, self.impressions)[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "impressions": self.impressions,
            "clicked": self.clicked,
            "slots": self.slots,
            "clicks": self.clicks,
            "list_ctr": self.list_ctr,
            "slot_ctr": self.slot_ctr,
            "low": self.low,
            "high": self.high,
        }


@dataclass(frozen=True)
class ABReport:
    """Treatment against control on ``list_ctr``; positive ``diff`` favours the treatment."""

    control: ArmStats
    treatment: ArmStats
    diff: float  # treatment.list_ctr - control.list_ctr
    low: float  # 95% normal-approximation interval for diff (unpooled standard error)
    high: float
    p_value: float  # two-sided two-proportion z-test (pooled standard error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "control": self.control.to_dict(),
            "treatment": self.treatment.to_dict(),
            "diff": self.diff,
            "low": self.low,
            "high": self.high,
            "p_value": self.p_value,
        }


def ab_report(control: ArmStats, treatment: ArmStats) -> ABReport:
    """Compare two arms' ``list_ctr``. With no lists in an arm there is no evidence: diff 0,
    interval (-1, 1), p 1. With no spread at all (both arms 0%, or both 100%) p is 1."""
    n_c, n_t = control.impressions, treatment.impressions
    if n_c == 0 or n_t == 0:
        return ABReport(control, treatment, 0.0, -1.0, 1.0, 1.0)
    p_c, p_t = control.list_ctr, treatment.list_ctr
    diff = p_t - p_c
    se = math.sqrt(p_t * (1 - p_t) / n_t + p_c * (1 - p_c) / n_c)
    pooled = (control.clicked + treatment.clicked) / (n_c + n_t)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    if se0 == 0.0:
        p_value = 1.0
    else:
        from scipy.stats import norm  # here, not at the top: importing scipy.stats takes ~1 s

        p_value = min(1.0, float(2.0 * norm.sf(abs(diff) / se0)))
    return ABReport(control, treatment, diff, diff - Z95 * se, diff + Z95 * se, p_value)


def assign_arm(user: str, salt: str, share: float) -> str | None:
    """The arm of ``user`` in the experiment named by ``salt``: None for the ``1 - share`` of
    users left out, else "control" or "treatment", half each. Stable across processes and
    machines (blake2b of ``f"{salt}:{user}"``, never Python's per-process ``hash``); a new salt
    draws a new, independent split."""
    if not 0.0 <= share <= 1.0:
        raise InvalidArgument(f"assign_arm: share must lie in [0, 1] (got {share})")
    digest = hashlib.blake2b(f"{salt}:{user}".encode(), digest_size=16).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # in the experiment or not
    v = int.from_bytes(digest[8:], "big") / 2**64  # which arm: independent of u
    if u >= share:
        return None
    return CONTROL if v < 0.5 else TREATMENT


__all__ = [
    "draft_propensities",
    "CONTROL",
    "TREATMENT",
    "Z95",
    "ABReport",
    "ArmStats",
    "InterleaveReport",
    "ab_report",
    "assign_arm",
    "credit",
    "interleave_report",
    "sign_test",
    "team_draft",
    "wilson_interval",
]
