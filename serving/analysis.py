"""What the served log says about policies and rankers: `streamrec eval --ope` (off-policy
estimates of a candidate exploration policy) and `streamrec experiment` (the interleaving or
A/B experiment's report), both from the served topic and the clicks on the events topic.

A served slot counts as clicked when the user clicked that item answering that list (the
click's ``request_id``) or, for clicks sent without one, when the user's click on the item
came after the list's state (event time above ``as_of``) within the attribution window.
"""

from __future__ import annotations

import bisect
import json
from typing import Any, Sequence

import numpy as np

from streamrec.infra.settings import Settings
from streamrec.models.events import Click, Impression
from streamrec.models.interleave import ArmStats, ab_report, credit, interleave_report
from streamrec.models.ope import evaluate
from streamrec.models.opelog import LoggedChoice, decisions_for
from streamrec.models.policies import Policy, Thompson, make_policy
from streamrec.models.errors import StreamrecError
from streamrec.models.servedlog import ServedLog


class Clicked:
    """Which served slots were clicked (see the module docstring)."""

    def __init__(self, clicks: Sequence[Click], window_ms: int) -> None:
        self.by_request = {(c.request_id, c.item) for c in clicks if c.request_id}
        self.by_user: dict[tuple[str, str], list[int]] = {}
        for c in clicks:
            if not c.request_id:
                self.by_user.setdefault((c.user, c.item), []).append(c.timestamp)
        for v in self.by_user.values():
            v.sort()
        self.window_ms = window_ms

    def slots(self, log: ServedLog) -> np.ndarray:
        out = np.zeros(len(log.items), dtype=bool)
        for j, item in enumerate(log.items):
            if (log.request_id, item) in self.by_request:
                out[j] = True
            elif log.user is not None and (times := self.by_user.get((log.user, item))):
                k = bisect.bisect_right(times, log.as_of)
                out[j] = k < len(times) and times[k] - log.as_of <= self.window_ms
        return out


def _has_choice(log: ServedLog) -> bool:
    """Whether the list logged an exploration choice (a user's list with picks)."""
    return log.decision is not None and bool(log.decision.picks) and log.user is not None


def logged_choices(logs: Sequence[ServedLog], clicked: Clicked, *, thompson_draws: int = 2000,
                   seed: int = 0, shown: dict[str, set[str]] | None = None) -> list[LoggedChoice]:
    """The logged exploration choices with the clicks on their picks. Thompson sampling's
    propensities (serving's Monte Carlo estimate over ``serving.propensity_draws``) are
    estimated again from the logged posteriors with ``thompson_draws`` draws: the same
    probability, a smaller Monte Carlo error (importance weights divide by it). With
    ``shown`` (request_id -> items its impressions showed), only choices whose every slot was
    shown count: a slot never displayed could not be clicked whatever the policy put there
    (which slots are displayed depends on their positions, not on the policy's choice)."""
    rng = np.random.default_rng(seed)
    redraw = Thompson(draws=thompson_draws)
    out = []
    for log in logs:
        d = log.decision
        if d is None or not _has_choice(log):
            continue
        if shown is not None and not all(log.items[j] in shown.get(log.request_id, ()) for j in d.slots):
            continue
        hit = clicked.slots(log)
        alpha, beta, picks = np.array(d.alpha), np.array(d.beta), np.array(d.picks)
        p = redraw.propensities(alpha, beta, picks, rng) if log.policy == "thompson" else np.array(d.propensities)
        out.append(LoggedChoice(alpha, beta, picks, p, hit[d.slots].astype(float),
                                make_policy(log.policy).deterministic if log.policy else True))
    return out


def ope(logs: Sequence[ServedLog], clicks: Sequence[Click], candidate: Policy, *, window_ms: int,
        estimators: Sequence[str] = ("ips", "snips", "dr"), tolerance: float = 0.01, seed: int = 0,
        impressions: Sequence[Impression] | None = None) -> dict[str, Any]:
    """Off-policy estimates of ``candidate``'s clicks per (shown) exploration slot from the
    logged exploration choices (``SupportMismatch`` when the log cannot support it). With
    ``impressions``, only the choices whose slots were shown count (``logged_choices``)."""
    logged = sum(1 for log in logs if _has_choice(log))
    if not logged:
        raise StreamrecError("the served log holds no exploration choices (serving.explore_slots 0, "
                             "or lists logged by an older streamrec)")
    choices = logged_choices(logs, Clicked(clicks, window_ms),
                             shown=shown_items(impressions) if impressions is not None else None)
    if not choices:
        raise StreamrecError(f"none of the {logged:,} logged exploration choices was shown: the impressions "
                             f"never include the exploration slots (serving.explore_slots sit at the end of "
                             f"the list); nothing can be estimated")
    d = decisions_for(choices, candidate, np.random.default_rng(seed))
    result = evaluate(d, estimators, tolerance=tolerance, seed=seed)
    logging = sorted({log.policy for log in logs if log.decision is not None})
    return {"candidate": candidate.name, "logging": logging, "decisions": len(choices), "not_shown": logged - len(choices),
            "shown_from": "served" if impressions is None else "impressions",
            "logged_value": round(float(d.reward.mean()), 6),
            "estimates": {k: e.to_dict() for k, e in result.items()}}


def shown_items(impressions: Sequence[Impression]) -> dict[str, set[str]]:
    """request_id -> the items its impressions showed (a later page adds to the earlier)."""
    out: dict[str, set[str]] = {}
    for imp in impressions:
        out.setdefault(imp.request_id, set()).update(s.item for s in imp.items)
    return out


def experiment(logs: Sequence[ServedLog], clicks: Sequence[Click], *, window_ms: int,
               impressions: Sequence[Impression] | None = None) -> dict[str, Any]:
    """The interleaving report (lists with teams) and the A/B report (lists with an arm).

    With ``impressions``, only what was shown counts: a list no impression names (served but
    never displayed) is not an impression of either ranker, and of a list shown in part only
    the shown slots count (their teams for interleaving, their clicks and slots for A/B).
    Without (None), every served slot counts as shown."""
    clicked = Clicked(clicks, window_ms)
    shown = shown_items(impressions) if impressions is not None else None
    outcomes: list[int] = []
    arms: dict[str, list[int]] = {"control": [0, 0, 0, 0], "treatment": [0, 0, 0, 0]}
    unshown = 0
    for log in logs:
        if log.user is None or not (log.teams or log.arm in arms):
            continue
        seen = np.ones(len(log.items), dtype=bool)
        if shown is not None:
            on_screen = shown.get(log.request_id, set())
            seen = np.array([item in on_screen for item in log.items], dtype=bool)
        if not seen.any():
            unshown += 1
            continue
        hit = clicked.slots(log) & seen
        if log.teams:
            drafted = [j for j, t in enumerate(log.teams) if t in ("a", "b") and seen[j]]
            if not drafted:
                unshown += 1
                continue
            outcomes.append(credit([log.teams[j] for j in drafted], hit[drafted].tolist()))
        else:
            a = arms[log.arm]
            a[0] += 1
            a[1] += int(hit.any())
            a[2] += int(seen.sum())
            a[3] += int(hit.sum())
    out: dict[str, Any] = {"shown_from": "served" if shown is None else "impressions", "not_shown": unshown}
    if outcomes:
        out["interleaving"] = interleave_report(outcomes).to_dict()
    if arms["control"][0] or arms["treatment"][0]:
        out["ab"] = ab_report(ArmStats("control", *arms["control"]), ArmStats("treatment", *arms["treatment"])).to_dict()
    if "interleaving" not in out and "ab" not in out:
        if unshown:
            raise StreamrecError(f"none of the {unshown:,} experiment lists served was shown (no impression "
                                 f"event names their request_id)")
        raise StreamrecError("the served log holds no experiment lists (set experiment.mode and experiment.treatment)")
    return out


def read(settings: Settings) -> tuple[list[ServedLog], list[Click], list[Impression] | None]:
    """The served lists, and the clicks and impressions on the events topic (None: the topic
    holds no impression at all, and every served slot counts as shown)."""
    from streamrec.infra import kafka as kafka_wiring
    from streamrec.serving.trainer import events_of, read_served

    events = events_of(kafka_wiring.read_to_end(settings.kafka, settings.kafka.events_topic), (Click, Impression))
    impressions = [e for e in events if isinstance(e, Impression)]
    return read_served(settings), [e for e in events if isinstance(e, Click)], impressions or None


def run_ope(settings: Settings, policy: str, epsilon: float, ucb_c: float, tolerance: float) -> int:
    logs, clicks, impressions = read(settings)
    candidate = make_policy(policy, epsilon=epsilon, ucb_c=ucb_c, draws=settings.serving.propensity_draws)
    r = ope(logs, clicks, candidate, window_ms=int(settings.learners.attribution_window_s * 1000), tolerance=tolerance,
            impressions=impressions)
    if r["shown_from"] == "served":
        print("no impression events on the topic: every served exploration slot counts as shown")
    elif r["not_shown"]:
        print(f"{r['not_shown']:,} exploration choices were not (all) shown: not counted")
    print(f"candidate {r['candidate']} against {len(logs):,} logged lists ({r['decisions']:,} exploration choices, "
          f"logged by {', '.join(r['logging'])}; logged clicks per exploration slot {r['logged_value']:.4f})")
    print(f"{'estimator':<10} {'value':>9} {'95% interval':>22} {'ESS':>10}")
    for k, e in r["estimates"].items():
        print(f"{k:<10} {e['value']:>9.5f} [{e['low']:>9.5f}, {e['high']:>9.5f}] {e['ess']:>10.1f}")
    print(json.dumps(r))
    return 0


def run_experiment(settings: Settings) -> int:
    logs, clicks, impressions = read(settings)
    r = experiment(logs, clicks, window_ms=int(settings.learners.attribution_window_s * 1000),
                   impressions=impressions)
    if r["shown_from"] == "served":
        print("no impression events on the topic: every served list counts as shown")
    elif r["not_shown"]:
        print(f"{r['not_shown']:,} experiment lists were served but never shown (no impression): not counted")
    if "interleaving" in r:
        i = r["interleaving"]
        print(f"interleaving: {i['impressions']:,} lists: treatment wins {i['treatment_wins']:,}, control wins "
              f"{i['control_wins']:,}, ties {i['ties']:,}; sign test p = {i['p_value']:.4g}")
    if "ab" in r:
        ab = r["ab"]
        for arm in ("control", "treatment"):
            a = ab[arm]
            print(f"A/B {arm:<9}: {a['impressions']:,} lists, CTR {a['list_ctr']:.4f} [{a['low']:.4f}, {a['high']:.4f}]")
        print(f"A/B difference {ab['diff']:+.4f} [{ab['low']:+.4f}, {ab['high']:+.4f}], p = {ab['p_value']:.4g}")
    print(json.dumps(r))
    return 0


__all__ = ["Clicked", "logged_choices", "ope", "experiment", "shown_items", "read", "run_ope",
           "run_experiment"]
