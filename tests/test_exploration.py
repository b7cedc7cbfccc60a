"""Issue 13 beyond the engine: the experiment report and off-policy estimates from hand-made
served logs (hand-computed), the simulator's metrics, a short closed loop against Redis, and
`streamrec explain` through the real served topic."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import pytest

from streamrec.infra.settings import Settings
from streamrec.models.events import Click, Impression, Shown
from streamrec.models.errors import StreamrecError
from streamrec.models.ope import SupportMismatch
from streamrec.models.policies import EpsilonGreedy, Greedy, make_policy
from streamrec.models.servedlog import PolicyDecision, ServedLog
from streamrec.models.simworld import World, WorldConfig, concentration, gini
from streamrec.serving import analysis

WINDOW = 1_800_000


def served(rid: str, user: str, items: list[str], *, teams: list[str] | None = None, arm: str = "",
           decision: PolicyDecision | None = None, policy: str = "", as_of: int = 1000) -> ServedLog:
    return ServedLog(rid, user, as_of, as_of, "ranker=heuristic-rrf;seq=none", items, [], b"", [],
                     teams=teams or [], arm=arm, decision=decision, policy=policy)


def click(n: int, user: str, item: str, rid: str | None, ts: int = 2000) -> Click:
    return Click(id=f"c{n}", timestamp=ts, user=user, item=item, request_id=rid)


def test_experiment_report_counts_wins_losses_ties_and_arms() -> None:
    logs = [
        served("r1", "u1", ["x", "y", "z"], teams=["a", "b", "a"]),  # click on y (b): treatment wins
        served("r2", "u2", ["x", "y", "z"], teams=["b", "a", "b"]),  # click on y (a): control wins
        served("r3", "u3", ["x", "y", "z"], teams=["a", "b", ""]),  # clicks x (a) and y (b): tie
        served("r4", "u4", ["x", "y"], teams=["a", "b"]),  # no click: tie
        served("r5", "u5", ["p", "q"], teams=["b", "a"]),  # click without request id, after as_of: b wins
        served("r6", "u6", ["p", "q"], arm="control"),
        served("r7", "u7", ["p", "q"], arm="treatment"),
        served("r8", "u8", ["p", "q"], arm="treatment"),
    ]
    clicks = [click(1, "u1", "y", "r1"), click(2, "u2", "y", "r2"), click(3, "u3", "x", "r3"),
              click(4, "u3", "y", "r3"), click(5, "u5", "p", None), click(6, "u7", "p", "r7"),
              click(7, "u7", "q", "r7"), click(8, "u4", "x", "other-request"),
              click(9, "u5", "q", None, ts=1000 + WINDOW + 1)]  # too late to count
    r = analysis.experiment(logs, clicks, window_ms=WINDOW)
    i = r["interleaving"]
    assert (i["impressions"], i["treatment_wins"], i["control_wins"], i["ties"]) == (5, 2, 1, 2)
    assert i["p_value"] == pytest.approx(1.0)  # 2 vs 1: two-sided exact binomial = 1
    ab = r["ab"]
    assert (ab["control"]["impressions"], ab["control"]["clicked"], ab["control"]["clicks"]) == (1, 0, 0)
    assert (ab["treatment"]["impressions"], ab["treatment"]["clicked"], ab["treatment"]["clicks"]) == (2, 1, 2)
    assert ab["diff"] == pytest.approx(0.5)


def test_experiment_counts_only_what_the_impressions_showed() -> None:
    """A list served but never shown is no impression of either ranker; of a list shown in
    part, only the shown slots count (their teams, their clicks)."""
    logs = [served("r1", "u1", ["x", "y", "z"], teams=["a", "b", "a"]),  # x, y shown; click z (a): unseen
            served("r2", "u2", ["x", "y"], teams=["a", "b"]),  # never shown; click y (b)
            served("r3", "u3", ["p", "q"], arm="control"),  # p shown; click q: unseen
            served("r4", "u4", ["p", "q"], arm="treatment")]  # both shown; click p
    clicks = [click(1, "u1", "z", "r1"), click(2, "u2", "y", "r2"), click(3, "u3", "q", "r3"),
              click(4, "u4", "p", "r4")]
    imps = [Impression(id="i1", timestamp=1500, user="u1", request_id="r1",
                       items=[Shown(item="x", position=0), Shown(item="y", position=1)]),
            Impression(id="i3", timestamp=1500, user="u3", request_id="r3", items=[Shown(item="p", position=0)]),
            Impression(id="i4", timestamp=1500, user="u4", request_id="r4",
                       items=[Shown(item="p", position=0), Shown(item="q", position=1)])]
    r = analysis.experiment(logs, clicks, window_ms=WINDOW, impressions=imps)
    i, ab = r["interleaving"], r["ab"]
    assert (r["shown_from"], r["not_shown"]) == ("impressions", 1)
    assert (i["impressions"], i["treatment_wins"], i["control_wins"], i["ties"]) == (1, 0, 0, 1)
    c, t = ab["control"], ab["treatment"]
    assert (c["impressions"], c["clicked"], c["clicks"], t["impressions"], t["clicked"], t["clicks"]) == (1, 0, 0, 1, 1, 1)
    every = analysis.experiment(logs, clicks, window_ms=WINDOW)  # no impressions: every served slot shown
    assert (every["shown_from"], every["interleaving"]["impressions"], every["interleaving"]["control_wins"],
            every["interleaving"]["treatment_wins"], every["ab"]["control"]["clicks"]) == ("served", 2, 1, 1, 1)


ALPHA = [1.0, 3.0, 2.0]
BETA = [9.0, 7.0, 18.0]  # means 0.1, 0.3, 0.1: best first 1, 0, 2


def test_ope_from_a_hand_made_epsilon_greedy_log() -> None:
    """Two logged single-slot choices of epsilon-greedy (epsilon 0.5, 3 items): item 1 (the best,
    p = 0.5/3 + 0.5) clicked, item 2 (p = 0.5/3) not. Greedy picks item 1 in both: IPS =
    (1 / (2/3) * 1 + 0) / 2 = 0.75; SNIPS = 1.5 / 1.5 = 1; on-policy IPS = the logged mean."""
    logs = [served("r1", "u1", ["a", "b", "c"], policy="epsilon-greedy",
                   decision=PolicyDecision(["x0", "x1", "x2"], ALPHA, BETA, [1], [2], [0.5 / 3 + 0.5])),
            served("r2", "u2", ["a", "b", "c"], policy="epsilon-greedy",
                   decision=PolicyDecision(["x0", "x1", "x2"], ALPHA, BETA, [2], [2], [0.5 / 3]))]
    clicks = [click(1, "u1", "c", "r1")]
    r = analysis.ope(logs, clicks, Greedy(), window_ms=WINDOW)
    assert r["decisions"] == 2 and r["logged_value"] == 0.5
    assert r["estimates"]["ips"]["value"] == pytest.approx(0.75, abs=1e-6)
    assert r["estimates"]["snips"]["value"] == pytest.approx(1.0, abs=1e-6)
    same = analysis.ope(logs, clicks, EpsilonGreedy(0.5), window_ms=WINDOW)
    assert same["estimates"]["ips"]["value"] == pytest.approx(0.5, abs=1e-6)
    assert same["estimates"]["ips"]["ess"] == pytest.approx(2.0, abs=1e-6)
    # with impressions, a choice whose slot was never displayed does not count: r2 showed a, b only
    imps = [Impression(id="i1", timestamp=1500, user="u1", request_id="r1",
                       items=[Shown(item=x, position=k) for k, x in enumerate("abc")]),
            Impression(id="i2", timestamp=1500, user="u2", request_id="r2",
                       items=[Shown(item=x, position=k) for k, x in enumerate("ab")])]
    shown = analysis.ope(logs, clicks, Greedy(), window_ms=WINDOW, impressions=imps)
    assert (shown["decisions"], shown["not_shown"], shown["shown_from"]) == (1, 1, "impressions")
    assert shown["estimates"]["ips"]["value"] == pytest.approx(1.5, abs=1e-6)  # 1 / (2/3)
    with pytest.raises(StreamrecError, match="none of the 2 logged exploration choices was shown"):
        analysis.ope(logs, clicks, Greedy(), window_ms=WINDOW, impressions=imps[1:])


def test_ope_refuses_a_candidate_a_greedy_log_cannot_support() -> None:
    logs = [served(f"r{n}", f"u{n}", ["a", "b"], policy="greedy",
                   decision=PolicyDecision(["x0", "x1", "x2"], ALPHA, BETA, [1], [1], [1.0])) for n in range(50)]
    analysis.ope(logs, [], Greedy(), window_ms=WINDOW)  # itself: supported
    with pytest.raises(SupportMismatch, match="cannot support"):
        analysis.ope(logs, [], make_policy("epsilon-greedy", epsilon=0.5), window_ms=WINDOW)


def test_simulator_metrics_by_hand() -> None:
    assert gini(np.array([1, 1, 1, 1])) == 0.0
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)  # (n - 1) / n when one item gets all
    assert concentration(np.array([1, 1, 2, 2])) == pytest.approx(0.5)
    assert concentration(np.array([3, 3, 3])) == 1.0
    w = World(WorldConfig(users=5, items=20, seed=1), 10**12)
    again = World(WorldConfig(users=5, items=20, seed=1), 10**12)
    assert np.array_equal(w.tastes, again.tastes) and np.array_equal(w.vectors, again.vectors)
    items = np.arange(10)
    assert w.oracle_value(0, 10) >= w.value(0, items)  # the oracle slate is the best list
    assert np.array_equal(w.examination(3), [1.0, 0.5, 1 / 3])


@pytest.mark.slow
def test_a_short_closed_loop_serves_learns_and_reports(base_settings: Settings) -> None:
    from streamrec.serving.simulate import METRICS, SimConfig, Variant, run_variant

    cfg = SimConfig(windows=3, lists_per_window=200, world=WorldConfig(users=100, items=80, new_items=5))
    r = run_variant(base_settings, cfg, Variant("epsilon-greedy", diversity=0.3))
    assert set(r["late"]) == set(METRICS) and len(r["windows"]) == 3
    for w in r["windows"]:
        assert 0 < w["ctr"] < 10 and w["regret"] >= 0 and 0 < w["coverage"] <= 1 and 0 <= w["gini"] < 1
        assert 0 <= w["new_item_share"] <= 1 and 1 / 8 <= w["echo_index"] <= 1
    assert r["windows"][-1]["new_item_share"] > 0  # arrivals are shown (cold start)


@pytest.fixture
def live(settings: Settings, start_worker: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    from tests.test_serving import running_pipeline

    s = settings.model_copy(update={"serving": settings.serving.model_copy(update={
        "k": 10, "explore_slots": 2, "cf_candidates": 30, "trending_candidates": 20, "explore_pool": 50,
        "stats_ttl_s": 0.0, "default_every_s": 0.3, "model_poll_s": 0.1, "block_ms": 20,
        "sources": ["cf", "trend", "explore"], "policy": "epsilon-greedy", "epsilon": 0.5})})
    with running_pipeline(s, start_worker, "serve-explain") as p:
        yield p


@pytest.mark.slow
def test_explain_reads_the_served_topic_and_ope_reads_the_log(live: dict[str, Any]) -> None:
    from streamrec.serving.trainer import read_served
    from streamrec.streams.sdk import Reader
    from tests.support import wait_for
    from tests.test_serving import item_of

    s: Settings = live["settings"]
    with Reader.from_settings(s) as reader:
        recs = wait_for(lambda: reader.recommendations("u1", fallback=False), what="u1's list")
        wait_for(lambda: any(log.request_id == recs["request_id"] for log in read_served(s)), what="the served log")
        recs = reader.recommendations("u1", fallback=False)
        for item in recs["items"]:
            try:
                why = reader.explain("u1", item)
            except Exception as exc:  # the list was recomputed meanwhile: read it again
                pytest.skip(f"u1's list changed while explaining: {exc}")
            assert why["sources"] and why["request_id"] == recs["request_id"]
            assert sum(why["contributions"].values()) + why["bias"] == pytest.approx(why["score"], abs=1e-9)
        with pytest.raises(Exception, match="not in"):
            reader.explain("u1", item_of(3, 9) if item_of(3, 9) not in recs["items"] else "nope")
    logs = read_served(s)
    assert any(log.decision is not None and log.policy == "epsilon-greedy" for log in logs)
    r = analysis.ope(logs, [], Greedy(), window_ms=WINDOW)  # no clicks yet: every estimate 0
    assert r["estimates"]["dr"]["value"] == pytest.approx(0.0, abs=1e-12) and r["decisions"] > 0
