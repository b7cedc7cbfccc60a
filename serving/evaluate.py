"""`streamrec eval --two-stage`: the whole serving pipeline, evaluated test-then-train.

The clicks (event-time order) are split in three spans:

1. ``[0, seq_frac)``: applied to a private Redis namespace through the worker's processor
   (sessions, CF, trending, bandit), and used to train the sequence model and its index.
2. ``[seq_frac, log_frac)``: before every ``log_every``-th click the serving engine computes the
   user's list with the heuristic blend and logs it (``ServedLog``, exactly as the serving
   worker does); after the span, ``serving.trainer.label_lists`` joins the logs with the
   clicks that followed and the LambdaMART ranker is trained on them.
3. ``[log_frac, 1]``: before every ``every``-th click, the list the full pipeline serves, the
   list it would serve without the coarse stage (``no_coarse_stage``: the full ranker over
   every candidate; the same as the pipeline's while the ranker has no more trees than
   ``serving.coarse_trees``), the heuristic blend over the same candidates and each source's
   own ranking (seq, cf, trend, mf, users, tower, explore: every retriever alone) are scored
   against the clicked item; only then is the click applied. Scored with them on the same
   clicks:

   * ``pipeline_without_new``: a second pipeline on the same state without the retrievers
     mf, users and tower, which serves, logs and retrains its own ranker alongside;
   * ``ranker_<option>``: every ranker option (LightGBM lambdarank, rank_xendcg, binary;
     DeepFM) trained on the pipeline's logged lists at every retrain, ranking the same
     candidates (as ``heuristic_blend`` does: no exploration slots, no coarse cut);
   * ``batch_<model>_<period>``: batch-refit baselines without a streaming pipeline
     (``models.baselines``): implicit ALS and item-KNN refit from all clicks before each
     boundary of event time (every 24 hours, every hour), serving each user the top-k of the
     last refit until the next.

   The learners keep learning throughout. As the trainer would on its schedule, every
   ``retrain_every`` clicks the rankers are retrained on the newest ``max_lists`` logged lists
   (the evaluated lists are logged too, and labelled only with clicks already seen), and
   every ``seq_retrain_every`` clicks the sequence and retrieval models on all clicks so far.

Every alternative is reported against the pipeline as the mean paired NDCG@10 difference over
the scored clicks with its standard error.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from streamrec.infra.recstore import RecStore
from streamrec.infra.services import ensure_services
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.content import tokens
from streamrec.models.evaluation import Scores, test_then_train
from streamrec.models.events import Click, Item
from streamrec.models.metrics import ndcg_at
from streamrec.models.ranking import HeuristicBlend
from streamrec.models.servedlog import LabelledLists, ServedLog, label_lists
from streamrec.serving.engine import Engine, ModelSet, Request, Served
from streamrec.models.errors import ConfigError
from streamrec.serving.trainer import fit_ranker, fit_retrieval, fit_seq, mf_config, sequences_of
from streamrec.serving.worker import served_log
from streamrec.streams.evaluate import Feeder, format_table

NAMESPACE = "eval"
NEW_SOURCES = ("mf", "users", "tower")  # the retrievers the pipeline is compared with and without
# the ranker options trained on the same logged lists at every retrain: trainer settings each
RANKER_OPTIONS: dict[str, dict[str, Any]] = {
    "lambdarank": {"ranker_model": "lightgbm", "ranker_objective": "lambdarank"},
    "rank_xendcg": {"ranker_model": "lightgbm", "ranker_objective": "rank_xendcg"},
    "binary": {"ranker_model": "lightgbm", "ranker_objective": "binary"},
    "deepfm": {"ranker_model": "deepfm"},
}
DAY_MS, HOUR_MS = 86_400_000, 3_600_000
BASELINES: tuple[tuple[str, int], ...] = (("als", DAY_MS), ("itemknn", DAY_MS), ("als", HOUR_MS), ("itemknn", HOUR_MS))


@dataclass
class TwoStageResult:
    summary: dict[str, dict[str, float]]
    curves: dict[str, list[tuple[int, float, float]]]
    clicks: int
    evaluated: int
    ranker: dict
    seq: dict
    seconds: float
    paired: dict = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)  # per pipeline: its sources
    baselines: dict[str, dict] = field(default_factory=dict)  # per baseline: refits, fit seconds


@dataclass
class _Arm:
    """One serving pipeline of the comparison: its engine, the lists it logged and the ranker
    trained on them."""

    name: str
    engine: Engine
    logs: list[ServedLog] = field(default_factory=list)
    parts: list[LabelledLists] = field(default_factory=list)
    ranker: Any = field(default_factory=HeuristicBlend)
    retrains: list[dict] = field(default_factory=list)


def with_new_sources(sources: Sequence[str]) -> list[str]:
    """``sources`` with the new retrievers added before exploration (if not already there)."""
    out = [n for n in sources if n != "explore"]
    out += [n for n in NEW_SOURCES if n not in out]
    return out + (["explore"] if "explore" in sources else [])


def two_stage(settings: Settings, clicks: Sequence[Click], items: Sequence[Item] = (), *, k: int = 10,
              seq_frac: float = 0.3, log_frac: float = 0.5, every: int = 5, log_every: int = 1,
              retrain_every: int = 10_000, seq_retrain_every: int = 30_000, max_lists: int = 20_000, epochs: int | None = None,
              curve_every: int = 2000, seed: int = 0, compare_sources: bool = True,
              ranker_options: Sequence[str] = tuple(RANKER_OPTIONS), deepfm_seconds: float = 60.0,
              baselines: Sequence[tuple[str, int]] = BASELINES,
              progress: Callable[[str], None] | None = None) -> TwoStageResult:
    """The prequential run (module docstring). ``settings.serving.sources`` is the pipeline's;
    with ``compare_sources`` and new retrievers (mf, users, tower) among them, a second
    pipeline without them (``pipeline_without_new``) serves, logs and retrains alongside on the
    same state. ``ranker_options`` (``RANKER_OPTIONS``) are trained on the pipeline's logged
    lists at every retrain and rank the same candidates; ``baselines`` are batch refits
    ``(kind, period in ms of event time)`` (``models.baselines.BatchRefit``)."""
    say = progress or (lambda _: None)
    tag = uuid.uuid4().hex[:8]
    settings = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"prefix": f"eval{tag}"}),
        "serving": settings.serving.model_copy(update={"log_top": settings.serving.candidates,
                                                       "stats_ttl_s": 0.0, "neighbours_ttl_s": 0.0}),
    })
    unknown = [r for r in ranker_options if r not in RANKER_OPTIONS]
    if unknown:
        raise ConfigError(f"unknown ranker option(s) {unknown}; known: {', '.join(RANKER_OPTIONS)}")
    sources = list(settings.serving.sources)
    arm_sources = {"pipeline": sources}
    if compare_sources and any(n in sources for n in NEW_SOURCES):
        arm_sources["pipeline_without_new"] = [n for n in sources if n not in NEW_SOURCES]
    store = StateStore.from_settings(settings)
    recstore = RecStore(store, settings.kafka.partitions)
    ns = store.keys.ns(NAMESPACE)
    apply = Feeder(settings, store, NAMESPACE)
    started = time.monotonic()
    n = len(clicks)
    a, b = int(seq_frac * n), int(log_frac * n)
    # The batch baselines need no services: they run beside the pipeline in a process of their
    # own (the pipeline keeps one core busy; the refits, two thirds of the work, take the other)
    # on the very clicks the pipeline scores, and are joined to it click by click at the end.
    side, pool = None, ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if baselines else None
    if pool is not None:
        side = pool.submit(
            score_baselines, [(c.user, c.item, c.timestamp) for c in clicks], b, every, list(baselines), k,
            mf_config(settings, "als"), seed)
    option_settings = {name: settings.model_copy(update={"trainer": settings.trainer.model_copy(
        update={**RANKER_OPTIONS[name], "ranker_max_seconds": deepfm_seconds})}) for name in ranker_options}
    try:
        apply.items(list(items))
        for lo in range(0, a, 2000):
            apply.clicks(clicks[lo : min(lo + 2000, a)])
        say(f"applied {a:,} clicks; training the sequence model")
        catalog = {i.item: tokens(i.title, i.tags, i.category) for i in items}
        first_sequences = sequences_of(clicks[:a])
        seq, index, content = fit_seq(settings, first_sequences, catalog=catalog, epochs=epochs,
                                      progress=lambda p: say(f"seq epoch {p['epoch']} loss {p['loss']:.4f}"))
        retrieval = fit_retrieval(settings, first_sequences, catalog=catalog, seed=seed)
        if retrieval is not None:
            say(f"retrieval models: mf {retrieval.mf.report if retrieval.mf else None}, "
                f"tower {retrieval.tower.report if retrieval.tower else None}")

        def models(ranker: Any) -> ModelSet:
            return ModelSet(ranker, seq, index, content, "eval", retrieval=retrieval)

        arms: list[_Arm] = []
        for name, names in arm_sources.items():
            arm_settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"sources": names})})
            engine = Engine(arm_settings, store, recstore, models(HeuristicBlend()), seed=seed)
            engine.keep_sources = name == "pipeline"
            engine.keep_unpruned = name == "pipeline"  # the list the full ranker over every candidate would serve
            arms.append(_Arm(name, engine))
        main = arms[0]

        # Served lists are labelled with the clicks seen so far (never a later one), a
        # thousand at a time with sampled negatives, so that the full candidate features of
        # every logged list are never all in memory.
        window_ms = int(settings.learners.attribution_window_s * 1000)

        def label(arm: _Arm, upto: int) -> None:
            if arm.logs:
                arm.parts.append(label_lists(arm.logs, clicks[a:upto], window_ms,
                                             negatives=settings.trainer.ranker_negatives, seed=seed + len(arm.parts)))
                arm.logs.clear()
                if arm is arms[0] and len(arm.parts) % 5 == 0:
                    say(f"{arm.name}: {sum(p.lists for p in arm.parts):,} lists logged, at click {upto:,} of {n:,}")

        def training_data(arm: _Arm) -> LabelledLists:
            recent = arm.parts[-max(1, max_lists // 1000) :]  # a sliding window of the newest lists
            return LabelledLists(np.concatenate([p.X for p in recent]), np.concatenate([p.y for p in recent]),
                                 [g for p in recent for g in p.groups], sum(p.lists for p in recent),
                                 sum(p.dropped for p in recent))

        options: dict[str, Any] = {}

        def retrain_rankers(at: int) -> None:
            for arm in arms:
                data = training_data(arm)
                arm.ranker = fit_ranker(settings, data, seed=seed)
                arm.retrains.append({"at": at, "lists": len(data.groups), **_size(arm.ranker)})
                arm.engine.swap(models(arm.ranker))
            data = training_data(main)
            own = (settings.trainer.ranker_model, settings.trainer.ranker_objective)
            for name, opt in option_settings.items():
                same = (opt.trainer.ranker_model, opt.trainer.ranker_objective) == own and opt.trainer.ranker_model == "lightgbm"
                options[name] = main.ranker if same else fit_ranker(opt, data, seed=seed)

        def run_span(lo: int, hi: int, every: int, on_sample: Callable[[int, Click, dict[str, Served]], None],
                     retrain: bool = False) -> None:
            def predict(event: tuple[int, Click]) -> None:
                j, c = event
                served = {}
                for arm in arms:
                    served[arm.name] = s = arm.engine.refresh([Request(c.user)], ns)[0]
                    arm.logs.append(served_log(s))
                    if len(arm.logs) >= 1000:
                        label(arm, j + 1)
                on_sample(j, c, served)

            def learn(batch: list[tuple[int, Click]]) -> None:
                apply.clicks([c for _, c in batch])

            def retrain_models(count: int) -> None:
                # The trainer's schedule: new rankers from the newest logged lists, and, every
                # seq_retrain_every clicks, new sequence and retrieval models from all clicks so far.
                nonlocal seq, index, content, retrieval
                j = lo + count - 1
                for arm in arms:
                    label(arm, j + 1)
                if seq_retrain_every and count % seq_retrain_every == 0:
                    say(f"retraining the sequence and retrieval models on {j + 1:,} clicks")
                    so_far = sequences_of(clicks[: j + 1])
                    seq, index, content = fit_seq(settings, so_far, catalog=catalog, epochs=epochs)
                    retrieval = fit_retrieval(settings, so_far, catalog=catalog, seed=seed)
                retrain_rankers(j + 1)

            test_then_train(list(enumerate(clicks[lo:hi], lo)), predict, learn, every=every, batch=2000,
                            hooks=[(retrain_every, retrain_models)] if retrain else [])

        run_span(a, b, log_every, lambda j, c, s: None)
        for arm in arms:
            label(arm, b)
        retrain_rankers(b)
        say(f"logged {sum(p.lists for p in main.parts):,} lists; the first ranker learned from "
            f"{len(training_data(main).groups):,} whose next click was among the candidates")

        names = ["pipeline", *[arm.name for arm in arms[1:]], "no_coarse_stage", "heuristic_blend",
                 *main.engine.sources, *[f"ranker_{o}" for o in ranker_options]]
        scores = {name: Scores() for name in names}
        blend = HeuristicBlend()
        count = 0
        per_click: dict[str, list[float]] = {name: [] for name in names}

        def reranked(s: Served, ranker: Any) -> list[str]:
            order = np.argsort(-ranker.score(s.features), kind="stable")
            return [s.candidates[j] for j in order[:k]]

        def evaluate(j: int, c: Click, served: dict[str, Served]) -> None:
            nonlocal count
            s = served["pipeline"]
            lists = {"pipeline": s.items, **{arm.name: served[arm.name].items for arm in arms[1:]},
                     "no_coarse_stage": s.unpruned, "heuristic_blend": reranked(s, blend),
                     **{src: s.by_source.get(src, [])[:k] for src in main.engine.sources},
                     **{f"ranker_{o}": reranked(s, options[o]) for o in ranker_options}}
            for name, ranked in lists.items():
                scores[name].add(ranked, c.item, k)
                per_click[name].append(ndcg_at(ranked, c.item, k))
            count += 1
            if count % curve_every == 0:
                for sc in scores.values():
                    sc.mark(count)
                say(f"evaluated {count:,} clicks: " + ", ".join(
                    f"{name} {sc.ndcg / sc.n:.4f}" for name, sc in scores.items()))

        run_span(b, n, every, evaluate, retrain=True)
        refit_report: dict[str, dict] = {}
        if side is not None:
            say("joining the batch baselines")
            for name, (ranked_lists, report) in side.result().items():
                scores[name], per_click[name] = Scores(), []
                for done, (ranked, c) in enumerate(zip(ranked_lists, clicks[b:n:every]), 1):
                    scores[name].add(ranked, c.item, k)
                    per_click[name].append(ndcg_at(ranked, c.item, k))
                    if done % curve_every == 0:
                        scores[name].mark(done)
                refit_report[name] = report
    finally:
        store.drop_everything()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    # paired comparison of the pipeline with each alternative: mean NDCG@10 difference and
    # its standard error over the evaluated clicks
    base = np.array(per_click["pipeline"])
    paired = {}
    for name, values in per_click.items():
        if name != "pipeline" and len(values) > 1:
            d = base - np.array(values)
            paired[name] = {"ndcg_diff": round(float(d.mean()), 5),
                            "stderr": round(float(d.std(ddof=1) / np.sqrt(len(d))), 5)}
    catalog_size = len({c.item for c in clicks})
    return TwoStageResult(
        summary={name: sc.summary(catalog_size) for name, sc in scores.items()},
        curves={name: sc.curve for name, sc in scores.items()},
        clicks=n, evaluated=count, paired=paired,
        ranker={**main.ranker.report, "retrains": main.retrains,
                **{f"{arm.name}_retrains": arm.retrains for arm in arms[1:]}},
        seq={"items": len(seq.vocab.items), "users": len(first_sequences)},
        seconds=round(time.monotonic() - started, 1), sources=arm_sources,
        baselines=refit_report,
    )


def score_baselines(clicks: Sequence[tuple[str, str, int]], start: int, every: int,
                    baselines: Sequence[tuple[str, int]], k: int, mf: Any, seed: int,
                    ) -> dict[str, tuple[list[list[str]], dict]]:
    """Each batch baseline's list before every ``every``-th click from ``start`` on (the clicks
    the pipeline scores), having observed every click before it; (lists, refit report) per
    baseline. Pure of services (``two_stage`` runs it in a process of its own)."""
    from streamrec.models.baselines import BatchRefit

    refits = [BatchRefit(kind, period, k=k, mf=mf, seed=seed, num_threads=1) for kind, period in baselines]
    lists: dict[str, list[list[str]]] = {r.name: [] for r in refits}
    for j, (user, item, ts) in enumerate(clicks):
        if j >= start and (j - start) % every == 0:
            for r in refits:
                lists[r.name].append(r.recommend(user, ts))
        for r in refits:
            r.observe(user, item, ts)
    return {r.name: (lists[r.name], {"refits": r.refits, "fit_seconds": round(r.fit_seconds, 1)}) for r in refits}


def _size(ranker: Any) -> dict:
    report = getattr(ranker, "report", {}) or {}
    return {key: report[key] for key in ("trees", "epochs") if key in report}


def table(result: TwoStageResult) -> str:
    return format_table(result.summary, width=22)


def run(path: str, fmt: str = "auto", limit: int | None = None, items_path: str | None = None,
        every: int = 5, epochs: int | None = None, out: Path = Path("eval-out"), *,
        sources: Sequence[str] | None = None, rankers: Sequence[str] = tuple(RANKER_OPTIONS),
        baselines: Sequence[tuple[str, int]] = BASELINES) -> int:
    from streamrec.streams import loaders
    from streamrec.streams.evaluate import EvalResult, plot

    settings = Settings()
    names = list(sources) if sources is not None else with_new_sources(settings.serving.sources)
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"sources": names})})
    clicks = loaders.load_any(path, fmt, **({"limit": limit} if limit else {}))
    clicks.sort(key=lambda c: c.timestamp)
    if items_path is None:
        guess = Path(path).with_name("movies.csv")
        items_path = str(guess) if guess.exists() else None
    items = loaders.load_movielens_items(items_path) if items_path else []
    with ensure_services(settings, start=True, kafka=False) as services:
        result = two_stage(services.settings, clicks, items, every=every, epochs=epochs, ranker_options=rankers,
                           baselines=baselines, progress=lambda m: print(f"eval: {m}", file=sys.stderr, flush=True))
    print(table(result))
    png = plot(EvalResult(result.summary, result.curves, result.clicks, result.seconds), out / "two-stage.png")
    print(f"plot: {png}")
    for name, p in result.paired.items():
        print(f"pipeline - {name:<22} NDCG@10 {p['ndcg_diff']:+.5f} (paired standard error {p['stderr']:.5f})")
    print(json.dumps({"summary": result.summary, "evaluated": result.evaluated, "clicks": result.clicks,
                      "paired": result.paired, "ranker": result.ranker, "seconds": result.seconds,
                      "sources": result.sources, "baselines": result.baselines}))
    return 0




# per family, the settings the comparison trains with besides dim and max_len (the papers'
# defaults where they fit two cores: SASRec's pmixer settings, BERT4Rec's two heads and 0.2
# mask probability, GRU4Rec's one layer)
SEQ_DEFAULTS: dict[str, dict[str, Any]] = {
    "sasrec": {"n_blocks": 2, "n_heads": 1, "dropout": 0.2},
    "gru4rec": {"dropout": 0.1},
    "bert4rec": {"n_blocks": 2, "n_heads": 2, "dropout": 0.2, "mask_prob": 0.2},
}


def seq_loo(path: str, fmt: str = "auto", *, epochs: int = 200, max_seconds: float | None = None,
            dim: int = 50, max_len: int = 200, dropout: float | None = None, seed: int = 0,
            family: str = "sasrec", loss: str = "bce", negatives: int = 256, gbce_t: float = 0.75,
            data: tuple[dict[str, list[str]], list[str], int] | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """A sequence model under the SASRec paper's protocol: per user, the last item is the
    test item and the one before it the validation item; train on the rest, rank the test item
    (input: train + validation items) among 100 sampled items the user never touched, and
    among the whole catalog (the user's own items excluded). ``data``: the file already read
    (sequences, catalog, interactions). Pure of services."""
    from streamrec.models.seqloss import LossConfig
    from streamrec.models.seqtrain import TrainConfig, evaluate, leave_one_out, train

    say = progress or (lambda _: None)
    sequences, catalog, interactions = data or read_sequences(path, fmt)
    split = leave_one_out(sequences)
    say(f"{family} / {loss}: {len(sequences):,} users, {len(catalog):,} items, {interactions:,} interactions; "
        f"{len(split.test):,} test users")
    started = time.monotonic()
    last: dict = {}
    rates: list[float] = []

    def show(p: dict) -> None:
        last.update(p)
        rates.append(p["seq_per_s"])
        if p["epoch"] == 1 or p["epoch"] % 10 == 0:
            say(f"{family} / {loss} epoch {p['epoch']} loss {p['loss']:.4f} ({p['seq_per_s']:.0f} seq/s, "
                f"{p['seconds']:.0f} s)")

    settings = {**SEQ_DEFAULTS[family], **({"dropout": dropout} if dropout is not None else {})}
    model = train(split.train, TrainConfig(epochs=epochs, seed=seed, max_seconds=max_seconds,
                                           loss=LossConfig(loss, negatives=negatives, gbce_t=gbce_t)), show,
                  catalog=catalog, family=family, max_len=max_len, dim=dim, **settings)
    seconds = time.monotonic() - started
    sampled = evaluate(model, split, negatives=100, seed=seed)
    full = evaluate(model, split, negatives=None, seed=seed)
    return {"model": family, "loss": loss, "users": len(sequences), "items": len(catalog),
            "interactions": interactions, "test_users": sampled["users"], "epochs": int(last.get("epoch", 0)),
            "train_seconds": round(seconds, 1), "seq_per_s": round(float(np.median(rates)), 1) if rates else 0.0,
            "sampled_100": {"hr@10": round(sampled["hr@10"], 4), "ndcg@10": round(sampled["ndcg@10"], 4)},
            "full": {"hr@10": round(full["hr@10"], 4), "ndcg@10": round(full["ndcg@10"], 4)},
            "settings": {"dim": dim, "max_len": max_len, **settings,
                         **({"negatives": negatives} if loss in ("sampled", "gbce") else {}),
                         **({"gbce_t": gbce_t} if loss == "gbce" else {})}}


def read_sequences(path: str, fmt: str = "auto") -> tuple[dict[str, list[str]], list[str], int]:
    """Per-user sequences in event-time order, the catalog in first-seen order, interactions."""
    from streamrec.streams import loaders

    clicks = loaders.load_any(path, fmt)
    return sequences_of(clicks), list(dict.fromkeys(c.item for c in clicks)), len(clicks)


def seq_table(results: Sequence[dict]) -> str:
    head = (f"{'model':<9} {'loss':<8} {'epochs':>6} {'train s':>8} {'seq/s':>7} "
            f"{'HR@10 s100':>10} {'NDCG@10 s100':>12} {'HR@10 full':>10} {'NDCG@10 full':>12}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['model']:<9} {r['loss']:<8} {r['epochs']:>6} {r['train_seconds']:>8.1f} {r['seq_per_s']:>7.0f} "
                     f"{r['sampled_100']['hr@10']:>10.4f} {r['sampled_100']['ndcg@10']:>12.4f} "
                     f"{r['full']['hr@10']:>10.4f} {r['full']['ndcg@10']:>12.4f}")
    return "\n".join(lines)


def run_seq(path: str, fmt: str = "auto", epochs: int | None = None, max_seconds: float | None = None,
            models: Sequence[str] = ("sasrec",), losses: Sequence[str] = ("bce",), negatives: int = 256,
            gbce_t: float = 0.75, dim: int = 50, max_len: int = 200) -> int:
    """Every model with every loss on one file, the same budget each: a table, then one JSON
    line with ``runs`` (each run's figures) and ``best`` (the run with the highest full-ranking
    NDCG@10, and its ratio to SASRec-bce's when that ran too)."""
    say = lambda m: print(f"eval: {m}", file=sys.stderr, flush=True)  # noqa: E731
    data = read_sequences(path, fmt)
    results = [seq_loo(path, fmt, epochs=epochs or 200, max_seconds=max_seconds, family=m, loss=l,
                       negatives=negatives, gbce_t=gbce_t, dim=dim, max_len=max_len, data=data, progress=say)
               for m in models for l in losses]
    print(seq_table(results))
    best = max(results, key=lambda r: r["full"]["ndcg@10"])
    summary: dict[str, Any] = {"model": best["model"], "loss": best["loss"], "full_ndcg@10": best["full"]["ndcg@10"],
                               "sampled_ndcg@10": best["sampled_100"]["ndcg@10"]}
    base = next((r for r in results if r["model"] == "sasrec" and r["loss"] == "bce"), None)
    if base is not None and base["full"]["ndcg@10"] > 0:
        summary["full_ratio_to_sasrec_bce"] = round(best["full"]["ndcg@10"] / base["full"]["ndcg@10"], 3)
        summary["sampled_ratio_to_sasrec_bce"] = round(best["sampled_100"]["ndcg@10"] / max(base["sampled_100"]["ndcg@10"], 1e-12), 3)
        print(f"best: {best['model']} / {best['loss']}: full-ranking NDCG@10 {best['full']['ndcg@10']:.4f} = "
              f"{summary['full_ratio_to_sasrec_bce']:.2f} x SASRec-bce's; sampled-100 NDCG@10 "
              f"{summary['sampled_ratio_to_sasrec_bce']:.2f} x")
    print(json.dumps({"runs": results, "best": summary, "max_seconds": max_seconds}))
    return 0


__all__ = ["two_stage", "TwoStageResult", "with_new_sources", "NEW_SOURCES", "RANKER_OPTIONS", "BASELINES", "run", "table", "seq_loo", "read_sequences", "seq_table", "run_seq",
           "SEQ_DEFAULTS"]
