"""`streamrec simulate`: a closed loop of synthetic users (``models.simworld``) and streamrec
itself: the real processor (sessions, CF, trending, bandit posteriors in Redis), the real
serving engine (sources, features, ranker, exploration policy) and the clicks the served lists
draw, fed back as impression and click events.

Per window of event time it reports, for each policy configuration, over the lists served in
that window:

* ``ctr``: clicks per served list;
* ``regret``: the oracle slate's expected clicks minus the served list's (true probabilities);
* ``coverage``: the share of the catalog (items existing at the window's end) shown at all;
* ``gini``: the Gini coefficient of exposure (impressions per catalog item);
* ``new_item_share``: the share of impressions that went to items younger than two windows;
* ``echo_index``: the mean over users of the concentration (Herfindahl index) of the
  categories recommended to them in the window: 1/categories when spread evenly, 1 when
  every recommended item shares one category.

Every configuration starts from an empty namespace and faces the same seeded users, items,
arrivals, drift and request order (``models.simworld``); only the clicks differ, since they
depend on what was served. The final JSON line holds, per configuration, the means over the
late windows (the second half).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Click, Impression, Item, Shown
from streamrec.models.ranking import HeuristicBlend, Ranker
from streamrec.models.simworld import World, WorldConfig, concentration, gini
from streamrec.serving.engine import Engine, ModelSet, Request, Served
from streamrec.streams.evaluate import Feeder

NAMESPACE = "sim"
METRICS = ("ctr", "regret", "coverage", "gini", "new_item_share", "echo_index")


@dataclass(frozen=True)
class SimConfig:
    windows: int = 16
    lists_per_window: int = 400
    batch: int = 50  # lists computed together (one engine refresh)
    window_ms: int = 3_600_000  # event time per window
    k: int = 10
    explore_slots: int = 2
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass(frozen=True)
class Variant:
    """One policy configuration: the exploration policy, position correction (the bandit's
    examination model, ``learners.bandit_eta``; off = every impression a whole trial) and the
    diversity re-rank weight."""

    policy: str
    position_correction: bool = True
    diversity: float = 0.0
    epsilon: float = 0.1

    @property
    def name(self) -> str:
        return (f"{self.policy}{'' if self.position_correction else '-nocorr'}"
                f"{f'-div{self.diversity:g}' if self.diversity else ''}")


def sim_settings(base: Settings, cfg: SimConfig, v: Variant) -> Settings:
    """Settings of one simulated run: a private key prefix, the variant's policy, sources
    without a sequence model (the world has no content to train one on), nothing cached."""
    tag = uuid.uuid4().hex[:8]
    return base.model_copy(update={
        "redis": base.redis.model_copy(update={"prefix": f"sim{tag}"}),
        "serving": base.serving.model_copy(update={
            "sources": ["cf", "trend", "explore"], "k": cfg.k, "explore_slots": cfg.explore_slots,
            "policy": v.policy, "epsilon": v.epsilon, "diversity": v.diversity, "diversity_by": "categories",
            "candidates": 200, "cf_candidates": 100, "trending_candidates": 100, "log_top": 50,
            "stats_ttl_s": 0.0, "neighbours_ttl_s": 0.0, "fresh_items_s": 2 * cfg.window_ms / 1000}),
        # evidence fades on the simulation's time scale (windows of an hour): trending over 2
        # hours, bandit posteriors over 12 (the defaults, a day and a week, suit real traffic)
        "learners": base.learners.model_copy(update={
            "bandit_eta": cfg.world.eta if v.position_correction else 0.0,
            "trending_half_life_s": 2 * cfg.window_ms / 1000, "bandit_half_life_s": 12 * cfg.window_ms / 1000,
            "cf_half_life_s": 12 * cfg.window_ms / 1000}),
    })


@dataclass
class Window:
    lists: int = 0
    clicks: int = 0
    regret: float = 0.0
    shown: dict[int, int] = field(default_factory=dict)  # item -> impressions
    new_shown: int = 0
    per_user: dict[int, list[int]] = field(default_factory=dict)  # user -> categories recommended

    def summary(self, world: World, catalog: int) -> dict[str, float]:
        impressions = sum(self.shown.values())
        counts = np.zeros(catalog)
        for i, c in self.shown.items():
            counts[i] = c
        return {
            "ctr": self.clicks / max(self.lists, 1),
            "regret": self.regret / max(self.lists, 1),
            "coverage": len(self.shown) / max(catalog, 1),
            "gini": gini(counts),
            "new_item_share": self.new_shown / max(impressions, 1),
            "echo_index": float(np.mean([concentration(np.array(c)) for c in self.per_user.values()]))
            if self.per_user else 0.0,
        }


class Loop:
    """One closed loop: a world, a private namespace, the processor and an engine."""

    def __init__(self, base: Settings, cfg: SimConfig, variant: Variant, *, ranker: Ranker | None = None,
                 seed: int = 0) -> None:
        self.cfg, self.variant = cfg, variant
        self.settings = sim_settings(base, cfg, variant)
        self.store = StateStore.from_settings(self.settings)
        self.recstore = RecStore(self.store, self.settings.kafka.partitions)
        self.ns = self.store.keys.ns(NAMESPACE)
        self.feeder = Feeder(self.settings, self.store, NAMESPACE)
        self.start_ms = int(time.time() * 1000) - 60 * 86_400_000
        self.world = World(cfg.world, self.start_ms)
        self.engine = Engine(self.settings, self.store, self.recstore, ModelSet(ranker or HeuristicBlend()), seed=seed)
        self.engine.explain = False
        self.now_ms = self.start_ms
        self.events = 0
        self.learn = True  # feed the served lists' impressions and clicks back
        self.on_served: Callable[[Served, int, np.ndarray], None] | None = None
        self._add(self._initial())

    def _initial(self) -> list[Item]:
        w = self.world
        return [Item(id=f"item-{i}", timestamp=self.start_ms, item=w.item_id(i), title=f"item {i}",
                     category=f"c{int(w.category[i])}", tags=[f"c{int(w.category[i])}"], created_at=int(w.created[i]))
                for i in range(w.n_items)]

    def _add(self, items: list[Item]) -> None:
        self.feeder.items(items)
        self.engine.add_items([i.item for i in items], self.ns)

    def close(self) -> None:
        self.store.drop_everything()

    def window(self, w: int, lists: int | None = None, after_step: Callable[[], None] | None = None) -> Window:
        """Serve one window of lists; returns its tallies. New items arrive at its start; the
        tastes move at its end. ``after_step`` runs after each engine refresh's feedback."""
        cfg, world = self.cfg, self.world
        if w > 0:
            self._add(world.arrivals(self.now_ms))
        out = Window()
        total = cfg.lists_per_window if lists is None else lists
        steps = max(1, total // cfg.batch)
        step_ms = cfg.window_ms // steps
        new_after = self.now_ms - 2 * cfg.window_ms
        self.serve(steps, step_ms, out, new_after, after_step)
        world.step(w)
        return out

    def serve(self, steps: int, step_ms: int, out: Window, new_after: int,
              after_step: Callable[[], None] | None = None) -> None:
        """``steps`` engine refreshes of ``cfg.batch`` asking users each, their clicks drawn
        and (while ``learn``) fed back; the tallies go to ``out``."""
        cfg, world = self.cfg, self.world
        for _ in range(steps):
            users = world.askers(cfg.batch)
            served = self.engine.refresh([Request(world.user_id(int(u))) for u in users], self.ns)
            events: list[Click | Impression] = []
            for u, s in zip(users.tolist(), served):
                items = np.array([int(i[1:]) for i in s.items], dtype=np.int64)
                out.regret += world.oracle_value(u, cfg.k) - world.value(u, items)
                hit = world.clicks(u, items)
                if self.on_served is not None:
                    self.on_served(s, u, hit)
                out.lists += 1
                out.clicks += int(hit.sum())
                for i in items.tolist():
                    out.shown[i] = out.shown.get(i, 0) + 1
                out.new_shown += int((world.created[items] > new_after).sum())
                out.per_user.setdefault(u, []).extend(world.category[items].tolist())
                if self.learn:
                    self.events += 1
                    t = self.now_ms
                    events.append(Impression(id=f"i{self.events}", timestamp=t, user=s.user or "", request_id=s.request_id,
                                             items=[Shown(item=it, position=p) for p, it in enumerate(s.items)]))
                    for p in np.flatnonzero(hit).tolist():
                        self.events += 1
                        events.append(Click(id=f"c{self.events}", timestamp=t + 1000 * (p + 1), user=s.user or "",
                                            item=s.items[p], request_id=s.request_id))
            if events:
                events.sort(key=lambda e: e.timestamp)
                self.feeder.clicks(events)
            self.now_ms += step_ms
            if after_step is not None:
                after_step()


def run_variant(base: Settings, cfg: SimConfig, variant: Variant, *, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    loop = Loop(base, cfg, variant, seed=seed)
    windows = []
    started = time.monotonic()
    try:
        for w in range(cfg.windows):
            tally = loop.window(w)
            windows.append({k: round(v, 5) for k, v in tally.summary(loop.world, loop.world.n_items).items()})
            if progress:
                progress(f"{variant.name} window {w + 1}/{cfg.windows}: " + ", ".join(f"{k} {v:.4f}" for k, v in windows[-1].items()))
    finally:
        loop.close()
    late = windows[len(windows) // 2 :]
    return {"late": {m: round(float(np.mean([x[m] for x in late])), 5) for m in METRICS},
            "windows": windows, "seconds": round(time.monotonic() - started, 1)}


# -- off-policy evaluation against the simulator's ground truth ----------------------------------


def validate_ope(base: Settings, cfg: SimConfig, *, logging: Variant = Variant("epsilon-greedy", epsilon=0.3),
                 candidates: tuple[Variant, ...] = (Variant("greedy"), Variant("ucb"), Variant("thompson"),
                                                    Variant("epsilon-greedy", epsilon=0.1)),
                 warm_windows: int = 4, lists: int = 4000, truth_lists: int = 8000, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Warm the loop up with the logging policy, then freeze it (no feedback, no drift, no
    arrivals: a stationary world) and serve ``lists`` lists with the logging policy, logging
    each list's exploration choice and the clicks on its picks. Each candidate is then run
    online in the same frozen world for ``truth_lists`` lists: its true value, clicks per
    exploration slot. The off-policy estimates from the log are compared with it."""
    from streamrec.models.ope import SupportMismatch, evaluate
    from streamrec.models.opelog import LoggedChoice, decisions_for
    from streamrec.serving.sources.explore import serving_policy

    say = progress or (lambda _: None)
    loop = Loop(base, cfg, logging, seed=seed)
    try:
        for w in range(warm_windows):
            loop.window(w)
        loop.learn = False
        choices: list[LoggedChoice] = []
        logger = loop.engine.policy

        def log(s: Served, u: int, hit: np.ndarray) -> None:
            d = s.decision
            if d is not None and d.picks:
                choices.append(LoggedChoice(np.array(d.alpha), np.array(d.beta), np.array(d.picks),
                                            np.array(d.propensities), hit[d.slots].astype(float),
                                            logger.deterministic))

        loop.on_served = log
        loop.serve(max(1, lists // cfg.batch), 0, Window(), 0)
        say(f"ope: logged {len(choices):,} exploration choices with {logging.name} (epsilon {logging.epsilon})")
        out: dict[str, Any] = {"logging": logging.name, "epsilon": logging.epsilon, "decisions": len(choices),
                               "candidates": {}}
        for v in candidates:
            settings = loop.settings.model_copy(update={"serving": loop.settings.serving.model_copy(
                update={"policy": v.policy, "epsilon": v.epsilon})})
            candidate = serving_policy(settings)
            try:
                est = {k: e.to_dict() for k, e in evaluate(decisions_for(choices, candidate, np.random.default_rng(seed)),
                                                          ("ips", "snips", "dr"), seed=seed).items()}
            except SupportMismatch as exc:
                est = {"refused": str(exc)}
            truth: list[float] = []

            def online(s: Served, u: int, hit: np.ndarray) -> None:
                d = s.decision
                if d is not None and d.picks:
                    truth.append(float(hit[d.slots].mean()))

            loop.engine.policy = candidate
            loop.on_served = online
            loop.serve(max(1, truth_lists // cfg.batch), 0, Window(), 0)
            loop.engine.policy = logger
            t = float(np.mean(truth))
            t_se = float(np.std(truth, ddof=1) / np.sqrt(len(truth)))
            row = {"true": round(t, 5), "true_stderr": round(t_se, 5), "online_decisions": len(truth), **est}
            for k in ("ips", "snips", "dr"):
                if k in est:
                    row[f"{k}_covers"] = bool(est[k]["low"] <= t <= est[k]["high"])
            out["candidates"][v.name if v.policy != "epsilon-greedy" else f"epsilon-greedy-{v.epsilon:g}"] = row
            say(f"ope: {v.name}: true {t:.4f} +- {t_se:.4f}; " + ", ".join(
                f"{k} {est[k]['value']:.4f} [{est[k]['low']:.4f}, {est[k]['high']:.4f}]" for k in ("ips", "snips", "dr") if k in est))
    finally:
        loop.close()
    return out


# -- interleaving against the simulator's ground truth -----------------------------------------


class NoisyRanker:
    """A ranker made worse on purpose: the heuristic blend plus seeded noise per candidate
    (a hash of the feature row, so the same row always scores the same). The simulator's
    "truly worse" ranker for validating interleaving."""

    def __init__(self, noise: float, version: str = "noisy-rrf") -> None:
        self.base = HeuristicBlend()
        self.noise = noise
        self.version = version

    def score(self, X: np.ndarray) -> np.ndarray:
        h = np.frombuffer(np.ascontiguousarray(X, dtype=np.float64).tobytes(), dtype=np.uint64).reshape(len(X), -1)
        u = ((h.sum(axis=1) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)).astype(np.float64) / 2.0**53
        return self.base.score(X) + self.noise * u

    def staged(self, first_trees: int) -> None:
        return None

    def contributions(self, X: np.ndarray) -> np.ndarray:
        return self.base.contributions(X)


def validate_interleaving(base: Settings, cfg: SimConfig, *, noise: float = 0.05, warm_windows: int = 4,
                          impressions: int = 10_000, truth_lists: int = 10_000, aa_runs: int = 200,
                          aa_impressions: int = 400, seed: int = 0,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """In a warmed-up, frozen loop: each ranker's true value (clicks per list, online), then a
    team-draft interleaving experiment (control: the worse ranker, treatment: the better one)
    with the p-value tracked as impressions accrue, and ``aa_runs`` A/A experiments (the same
    ranker on both sides) whose share of p < 0.05 should be near the nominal rate: the sign test
    is exact, so on few non-tied impressions its actual size is below 5%; ``expected_share`` is
    that size, averaged over the runs' numbers of non-tied impressions."""
    from streamrec.models.interleave import credit, interleave_report

    say = progress or (lambda _: None)
    v = Variant("thompson")
    loop = Loop(base, cfg, v, seed=seed)
    good, bad = HeuristicBlend(), NoisyRanker(noise)
    try:
        for w in range(warm_windows):
            loop.window(w)
        loop.learn = False
        truth = {}
        for name, r in (("control", bad), ("treatment", good)):
            loop.engine.swap(ModelSet(r))
            tally = Window()
            loop.serve(max(1, truth_lists // cfg.batch), 0, tally, 0)
            truth[name] = round(tally.clicks / tally.lists, 5)
        say(f"interleaving: true clicks per list: control (noisy) {truth['control']}, treatment {truth['treatment']}")

        def experiment(control: Any, treatment: Any, n: int, salt: str) -> tuple[list[int], list[float]]:
            exp = loop.settings.experiment.model_copy(update={"mode": "interleave", "share": 1.0, "salt": salt,
                                                              "treatment": treatment.version})
            loop.engine.settings = loop.settings.model_copy(update={"experiment": exp})
            loop.engine.swap(ModelSet(control, treatment=treatment))
            outcomes: list[int] = []
            p_values: list[float] = []

            def on(s: Served, u: int, hit: np.ndarray) -> None:
                drafted = [j for j, t in enumerate(s.teams) if t in ("a", "b")]
                outcomes.append(credit([s.teams[j] for j in drafted], hit[drafted].tolist()))
                if len(outcomes) % 200 == 0:
                    p_values.append(interleave_report(outcomes).p_value)

            loop.on_served = on
            loop.serve(max(1, n // cfg.batch), 0, Window(), 0)
            loop.on_served = None
            return outcomes, p_values

        outcomes, p_curve = experiment(bad, good, impressions, "better")
        report = interleave_report(outcomes).to_dict()
        first = next((200 * (i + 1) for i, p in enumerate(p_curve) if p < 0.05), None)
        say(f"interleaving: {report}; p < 0.05 first after {first} impressions")
        aa, sizes = [], []
        twin = HeuristicBlend(version="heuristic-rrf-twin")
        for run in range(aa_runs):
            o, _ = experiment(good, twin, aa_impressions, f"aa{run}")
            rep = interleave_report(o)
            aa.append(rep.p_value)
            sizes.append(_sign_test_size(rep.treatment_wins + rep.control_wins))
        share = float(np.mean(np.array(aa) < 0.05))
        expected = float(np.mean(sizes))
        say(f"interleaving: A/A p < 0.05 in {share:.1%} of {aa_runs} runs of {aa_impressions} impressions "
            f"(the exact test's size at their non-tied counts: {expected:.1%})")
    finally:
        loop.close()
    return {"true_clicks_per_list": truth, "report": report, "p_below_0_05_after": first,
            "p_curve": [round(p, 6) for p in p_curve],
            "aa": {"runs": aa_runs, "impressions": aa_impressions, "share_significant": round(share, 4),
                   "expected_share": round(expected, 4),
                   "share_stderr": round(float(np.sqrt(expected * (1 - expected) / aa_runs)), 4)}}


def _sign_test_size(n: int, alpha: float = 0.05) -> float:
    """P(p < alpha) under the null for the exact two-sided sign test on n non-tied outcomes."""
    from scipy.stats import binom

    from streamrec.models.interleave import sign_test

    if n == 0:
        return 0.0
    k = np.arange(n + 1)
    rejects = np.array([sign_test(int(w), n - int(w)) < alpha for w in k])
    return float(binom.pmf(k, n, 0.5)[rejects].sum())


# -- retraining on drift ----------------------------------------------------------------------


def run_retraining(base: Settings, cfg: SimConfig, *, drift: bool, retrain_every: int = 6, max_lists: int = 4000,
                   seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The loop with a LambdaMART ranker trained as the trainer trains it (``label_lists`` of
    the logged lists joined with the clicks that followed, ``fit_ranker`` on the newest
    ``max_lists``): on a fixed schedule (the end of every ``retrain_every``-th window) and,
    with ``drift``, also as soon as the trainer's drift monitor (``models.drift``, the
    configured river detector) fires on the served lists' clicked-or-not stream."""
    from streamrec.models.drift import DriftMonitor
    from streamrec.models.servedlog import label_lists
    from streamrec.serving.trainer import fit_ranker
    from streamrec.serving.worker import served_log

    say = progress or (lambda _: None)
    loop = Loop(base, cfg, Variant("thompson"), seed=seed)
    t = loop.settings.trainer
    settings = loop.settings.model_copy(update={"trainer": t.model_copy(update={"ranker_min_lists": 30, "ranker_trees": 100,
                                                                                  "ranker_min_leaf": 50})})
    monitor = DriftMonitor(t.drift if t.drift != "off" else "adwin", t.drift_delta, t.drift_min_lists)
    logs: list[Any] = []
    clicks: list[Click] = []
    retrains: list[dict[str, Any]] = []
    fire = False

    def on(s: Served, u: int, hit: np.ndarray) -> None:
        nonlocal fire
        logs.append(served_log(s))
        for p in np.flatnonzero(hit).tolist():
            clicks.append(Click(id=f"k{len(clicks)}", timestamp=loop.now_ms + 1000 * (p + 1), user=s.user or "",
                                item=s.items[p], request_id=s.request_id))
        if drift and monitor.update(float(hit.any())):
            fire = True

    def retrain(window: int, why: str) -> None:
        window_ms = int(settings.learners.attribution_window_s * 1000)
        data = label_lists(logs[-max_lists:], clicks, window_ms, negatives=settings.trainer.ranker_negatives, seed=seed)
        try:
            ranker = fit_ranker(settings, data, seed=seed)
        except Exception as exc:  # too few labelled lists yet: keep serving what serves
            say(f"retraining ({why}) in window {window}: {exc}")
            return
        loop.engine.swap(ModelSet(ranker))
        monitor.reset()
        retrains.append({"window": window, "reason": why, "lists": len(data.groups)})

    loop.on_served = on
    windows = []
    try:
        for w in range(cfg.windows):
            def on_drift(w: int = w) -> None:
                nonlocal fire
                if fire:
                    fire = False
                    retrain(w, "drift")

            tally = loop.window(w, after_step=on_drift)
            if (w + 1) % retrain_every == 0:
                retrain(w, "schedule")
            windows.append({k: round(v, 5) for k, v in tally.summary(loop.world, loop.world.n_items).items()})
            say(f"{'drift+schedule' if drift else 'schedule'} window {w + 1}/{cfg.windows}: ctr {windows[-1]['ctr']:.4f}"
                f" ({len(retrains)} retrainings)")
    finally:
        loop.close()
    return {"ctr": [w["ctr"] for w in windows], "retrains": retrains}


def validate_drift(base: Settings, cfg: SimConfig, *, shift_at: int | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every taste jumps at ``shift_at`` (default: the middle window); the same loop retrained on
    the schedule alone and on the schedule plus drift. Recovery: windows after the jump until
    a window's CTR is back to 90% of the mean CTR of the windows before it (None: never)."""
    shift = cfg.windows // 2 if shift_at is None else shift_at
    cfg = replace(cfg, world=replace(cfg.world, shift_at=shift))
    out: dict[str, Any] = {"shift_at": shift}
    for name, drift in (("schedule", False), ("drift", True)):
        r = run_retraining(base, cfg, drift=drift, seed=seed, progress=progress)
        before = float(np.mean(r["ctr"][2 : shift + 1]))
        after = r["ctr"][shift + 1 :]
        back = next((i + 1 for i, c in enumerate(after) if c >= 0.9 * before), None)
        out[name] = {**r, "ctr_before": round(before, 5), "ctr_after": round(float(np.mean(after)), 5),
                     "recovery_windows": back}
    return out


DEFAULT_VARIANTS = tuple(
    [Variant(p) for p in ("greedy", "epsilon-greedy", "ucb", "thompson")]
    + [Variant(p, position_correction=False) for p in ("greedy", "epsilon-greedy", "ucb", "thompson")]
    + [Variant(p, diversity=0.3) for p in ("greedy", "epsilon-greedy", "ucb", "thompson")]
)


def compare(base: Settings, cfg: SimConfig, variants: tuple[Variant, ...] = DEFAULT_VARIANTS, *, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    return {v.name: run_variant(base, cfg, v, seed=seed, progress=progress) for v in variants}


def plot(results: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: every variant its own
    styles = ("-", "--", ":", "-.")
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, (name, r) in enumerate(results.items()):
            ys = [w[metric] for w in r["windows"]]
            ax.plot(range(1, len(ys) + 1), ys, label=name, linewidth=1,
                    color=colours[k % len(colours)], linestyle=styles[(k // len(colours)) % len(styles)])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("window")
        ax.set_ylabel(metric)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out / f"simulate-{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["SimConfig", "Variant", "Loop", "validate_ope", "validate_interleaving", "NoisyRanker", "run_variant", "compare", "DEFAULT_VARIANTS", "METRICS", "plot"]


def run(*, windows: int = 16, lists: int = 400, seed: int = 0, seeds: int = 1, out: Path = Path("simulate-out"),
        variants: tuple[Variant, ...] = DEFAULT_VARIANTS, ope: bool = False, interleaving: bool = False,
        aa_runs: int = 200, drift: bool = False) -> int:
    """The command: every variant on the same seeded worlds (``seeds`` of them, averaged), a
    table, PNG plots, one JSON line: per policy the late-window means of each metric, averaged
    over the seeds, and their standard errors across seeds (``stderr``, with two seeds or more)."""
    from streamrec.infra.services import ensure_services

    say = lambda m: print(f"simulate: {m}", file=sys.stderr, flush=True)  # noqa: E731
    started = time.monotonic()
    cfg = replace(SimConfig(), windows=windows, lists_per_window=lists, world=replace(WorldConfig(), seed=seed))
    with ensure_services(Settings(), start=True, kafka=False) as services:
        base = services.settings
        runs = [compare(base, replace(cfg, world=replace(cfg.world, seed=seed + i)), variants, seed=seed + i,
                        progress=say) for i in range(seeds)]
        extra: dict[str, Any] = {}
        if ope:
            extra["ope"] = validate_ope(base, cfg, seed=seed, progress=say)
        if interleaving:
            extra["interleaving"] = validate_interleaving(base, cfg, seed=seed, aa_runs=aa_runs, progress=say)
        if drift:
            extra["drift"] = validate_drift(base, cfg, seed=seed, progress=say)
    policies: dict[str, dict[str, Any]] = {}
    for name in runs[0]:
        late = np.array([[r[name]["late"][m] for m in METRICS] for r in runs])
        policies[name] = {m: round(float(late[:, j].mean()), 5) for j, m in enumerate(METRICS)}
        if seeds > 1:
            policies[name]["stderr"] = {m: round(float(late[:, j].std(ddof=1) / np.sqrt(seeds)), 5)
                                        for j, m in enumerate(METRICS)}
    print(f"{'policy (late windows)':<28}" + "".join(f"{m:>15}" for m in METRICS))
    for name, r in policies.items():
        print(f"{name:<28}" + "".join(f"{r[m]:>15.4f}" for m in METRICS))
    for path in plot(runs[0], out):
        print(f"plot: {path}")
    print(json.dumps({"policies": policies, "windows": windows, "lists_per_window": lists, "seed": seed,
                      "seeds": seeds, **extra, "seconds": round(time.monotonic() - started, 1)}))
    return 0
