"""`streamrec bench serve`: per-user refresh time and click-to-list freshness.

Set-up (measured, not timed): a catalog of ``items`` items; a sequence model of that size
(untrained weights: inference costs the same) with its HNSW index; a LambdaMART ranker
(200 trees, 31 leaves) trained on synthetic lists; and Redis learner state built by the
worker's own processor from ``clicks`` Zipf-distributed clicks.

Phase 1, refresh compute on one core (torch, FAISS and BLAS limited to one thread): one user
at a time, the full refresh as the serving worker runs it (Redis reads, session embedding,
FAISS, CF, trending, exploration, features, the coarse stage and the ranker over
``candidates`` candidates, the Redis write). Measured twice in the same run: with item
statistics and neighbour lists read fresh from Redis for every refresh (``stats_ttl_s = 0``,
``neighbours_ttl_s = 0``) and with the default caches. Then batches of ``serving.batch`` (64)
users refreshed back to back, as the serving worker does (``batch_ms_per_user``,
``users_per_s``), with the time per stage. Baselines from the same run: the final ranker alone on every candidate row of the same batches
(``ranker_ms_per_user``, with the evaluator serving uses), the same batches with the numpy
trees (``batch_ms_per_user_numpy_trees``), and the tree evaluators (native trees, numpy
trees, LightGBM's ``predict``, lleaves with its default blocks and treelite when installed)
on those rows, per batch and per user.

Phase 2, freshness: a stream worker process and a serving worker process run; clicks are
published at ``rate``/s; each written list records the time from the oldest click it is the
first list after (its publish time, the Kafka record timestamp) to the end of its Redis write.

Phase 3, overload: the same at ``overload_rate``/s, or, when the stream worker cannot apply
that many here, at the highest rate it sustains: publishing pauses while it is more than a
second of clicks behind (``overload_rate_basis`` says which). ``overload_freshness_p99_ms`` is
over the lists written while the last third of the clicks was published; the dirty-user
backlog is sampled every second.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.recstore import RecStore
from streamrec.infra.services import ensure_services
from streamrec.infra.console import emit
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.content import ContentModel
from streamrec.models.events import Click, Item, encode
from streamrec.models.index import VectorIndex
from streamrec.models.ranking import FEATURES, RankerConfig, TrainedRanker, train_ranker
from streamrec.models.sasrec import SASRec, SASRecConfig
from streamrec.models.seqtrain import ItemVocab, SeqModel
from streamrec.serving.engine import (  # Engine limits torch/FAISS to one thread
    Engine,
    ModelSet,
    Request,
)
from streamrec.serving.modelio import pack_seq
from streamrec.streams.launch import WorkerProcess, applied, wait_applied
from streamrec.streams.processor import Processor, Record

T0 = 1_700_000_000_000


def _say(message: str) -> None:
    emit(f"bench: {message}")


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3) if values else float("nan")


def synthetic_ranker(seed: int = 0, groups: int = 3000, per: int = 50) -> Any:
    """LambdaMART on synthetic lists where the clicked candidate has a learnable signal."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(groups * per, len(FEATURES)))
    X[:, FEATURES.index("seq_rank")] = rng.integers(0, 200, groups * per)
    utility = X[:, 0] + 0.5 * X[:, 2] - 0.01 * X[:, 1] + rng.normal(scale=1.0, size=len(X))
    y = np.zeros(len(X))
    for g in range(groups):
        block = utility[g * per : (g + 1) * per]
        y[g * per + int(np.argmax(block))] = 1.0
    # no validation split: all 200 trees are kept, the size the latency target is about
    return train_ranker(X, y, [per] * groups, params=RankerConfig(n_trees=200, num_leaves=31, num_threads=1),
                        seed=seed, valid_fraction=0.0)


def _time_refresh(settings: Settings, store: StateStore, recstore: RecStore, models: ModelSet,
                  rng: np.random.Generator, users: int, requests: int, candidates: int) -> dict[str, Any]:
    """Phase 1: refresh compute. Single users (uncached and cached item statistics), then
    batches of ``serving.batch`` users back to back, with where the time goes; the ranker alone
    on the same rows, and the tree evaluators on the real batch shapes."""
    ranker = models.ranker
    # the serving worker's evaluator (native trees when lleaves is installed), and the numpy
    # trees for the baseline batches (the same model: the same scores)
    plain = TrainedRanker(ranker.model_text, ranker.report, ranker.version)
    t = time.perf_counter()
    Engine(settings, store, recstore, models).prepare(models)
    _say(f"tree evaluator: {ranker.evaluator} (compiled in {time.perf_counter() - t:.1f} s)")
    sample = [f"u{x}" for x in rng.integers(0, users, requests)]
    results: dict[str, Any] = {}
    stages: dict[str, dict[str, float]] = {}
    engine = None
    cached = {"stats_ttl_s": settings.serving.stats_ttl_s, "neighbours_ttl_s": settings.serving.neighbours_ttl_s}
    for label, ttls in (("uncached", {"stats_ttl_s": 0.0, "neighbours_ttl_s": 0.0}), ("cached", cached)):
        s = settings.model_copy(update={"serving": settings.serving.model_copy(update=ttls)})
        engine = Engine(s, store, recstore, models)
        for user in sample[:50]:  # warm-up: first-call costs
            engine.refresh([Request(user)])
        engine.timings.clear()
        times, writes = [], 0.0
        for k, user in enumerate(sample):
            t0 = time.perf_counter()
            served = engine.refresh([Request(user, k)])[0]
            t1 = time.perf_counter()
            recstore.write_recs([(user, k, served.fields())], 3_600_000)
            writes += time.perf_counter() - t1
            times.append((time.perf_counter() - t0) * 1000)
        results[label] = times
        stages[label] = _per_user(engine.timings, writes, len(sample))
        _say(f"refresh ({label} item stats): p50 {_pct(times, 50)} ms, p99 {_pct(times, 99)} ms; "
             f"per stage (ms): {stages[label]}")
    assert engine is not None

    # Batches as the serving worker refreshes them, back to back, by the cached engine
    size = settings.serving.batch
    n_batches = max(10, requests // size)
    batches = [[f"u{x}" for x in rng.choice(users, min(size, users), replace=False)] for _ in range(n_batches)]
    engine.timings.clear()
    per_user, writes = [], 0.0
    version = requests
    started = time.perf_counter()
    for who in batches:
        t0 = time.perf_counter()
        out = engine.refresh([Request(u, version + k) for k, u in enumerate(who)])
        t1 = time.perf_counter()
        recstore.write_recs([(x.user, x.version, x.fields()) for x in out], 3_600_000)
        t2 = time.perf_counter()
        writes += t2 - t1
        per_user.append((t2 - t0) * 1000 / len(who))
        version += len(who)
    users_per_s = sum(len(b) for b in batches) / (time.perf_counter() - started)
    batch_stages = _per_user(engine.timings, writes, sum(len(b) for b in batches))
    _say(f"batches of {size}: {_pct(per_user, 50)} ms per user (median), {users_per_s:,.0f} users/s; "
         f"per stage (ms per user): {batch_stages}")
    # baseline, same batches: the numpy trees instead
    base = Engine(settings, store, recstore, ModelSet(plain, models.seq, models.index, models.content, models.seq_version))
    base.refresh([Request(u) for u in batches[0]])  # warm-up
    base_per_user = []
    for who in batches:
        t0 = time.perf_counter()
        base.refresh([Request(u) for u in who])
        base_per_user.append((time.perf_counter() - t0) * 1000 / len(who))
    _say(f"baseline, the same batches with the numpy trees (no write): {_pct(base_per_user, 50)} ms per user")

    # The same batches' rows: every candidate, as one ranking stage would score them
    everything = settings.model_copy(update={"serving": settings.serving.model_copy(
        update={"log_top": 2 * candidates + 100})})
    rows = Engine(everything, store, recstore, models)
    rows.refresh([Request(u) for u in batches[0]])  # warm-up
    matrices = [[x.features for x in rows.refresh([Request(u) for u in who])] for who in batches[:10]]
    evaluators = _tree_evaluators(ranker, plain, matrices)
    ranker_ms = evaluators[ranker.evaluator]["batch_ms_per_user"]
    _say(f"the final ranker alone on the same rows (all candidates, one call per batch): {ranker_ms} ms per user")
    _say(f"tree evaluators: {evaluators}")

    # the ranker alone, LightGBM's predict vs compiled trees, on 500 random rows
    X = rng.normal(size=(candidates, len(FEATURES)))
    lgb, comp, native = [], [], []
    for _ in range(300):
        t0 = time.perf_counter()
        ranker.booster.predict(X, num_threads=1, raw_score=True)  # type: ignore[attr-defined]
        lgb.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        plain.score(X)
        comp.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        ranker.score(X)
        native.append((time.perf_counter() - t0) * 1000)
    _say(f"ranker alone on {candidates} rows: LightGBM predict p50 {_pct(lgb, 50)} / p99 {_pct(lgb, 99)} ms; "
         f"compiled (numpy) p50 {_pct(comp, 50)} / p99 {_pct(comp, 99)} ms; "
         f"{ranker.evaluator} p50 {_pct(native, 50)} / p99 {_pct(native, 99)} ms")
    seq_source = engine.sources.get("seq")
    return {
        "_single": results, "_lgb": lgb, "_comp": comp,
        "batch_ms_per_user": _pct(per_user, 50), "batch_ms_per_user_p99": _pct(per_user, 99),
        "batch_users": size, "batches": n_batches, "users_per_s": round(users_per_s, 1),
        "ranker_ms_per_user": ranker_ms, "tree_evaluator": ranker.evaluator,
        "batch_ms_per_user_numpy_trees": _pct(base_per_user, 50),
        "ranker_native_p50_ms": _pct(native, 50), "ranker_native_p99_ms": _pct(native, 99),
        "refresh_stages_ms": stages["cached"], "batch_stages_ms_per_user": batch_stages,
        "tree_evaluators": evaluators,
        "coarse_candidates": settings.serving.coarse_candidates, "coarse_trees": settings.serving.coarse_trees,
        "item_cache_hit_rate": round(engine.items.hits / max(engine.items.hits + engine.items.misses, 1), 3),
        "seq_searched_again": getattr(seq_source, "searched_again", None),
        "target_batch_ms_per_user": 1.0,
    }


def _per_user(timings: dict[str, float], write_s: float, n_users: int) -> dict[str, float]:
    """Engine stage seconds (summed) and the write, as ms per user."""
    out = {stage: round(seconds * 1000 / n_users, 3) for stage, seconds in timings.items()}
    out["write"] = round(write_s * 1000 / n_users, 3)
    return out


def _tree_evaluators(ranker: Any, plain: Any, batches: list[list[np.ndarray]]) -> dict[str, Any]:
    """Tree evaluators on real feature rows: batches (one matrix of all users' candidates) and
    single users (one user's candidates): ms per user, p50, and whether they equal LightGBM's
    scores bit for bit. ``native`` is what serving runs (lleaves, one tree per block),
    ``compiled`` the numpy trees; lleaves with its default blocks and treelite for comparison,
    when installed."""
    booster = ranker.booster
    tiles = [np.ascontiguousarray(np.concatenate(b)) for b in batches]
    singles = [np.ascontiguousarray(m) for b in batches for m in b[:5] if len(m)]
    methods: dict[str, Any] = {
        "compiled": plain.score,
        "lightgbm_1_thread": lambda X: booster.predict(X, raw_score=True, num_threads=1),
    }
    if ranker.evaluator == "native":
        methods["native"] = ranker.score
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import lleaves  # noqa: PLC0415 (optional: only measured when installed)

            booster.save_model(f"{tmp}/model.txt")
            ll = lleaves.Model(model_file=f"{tmp}/model.txt")
            ll.compile(cache=f"{tmp}/lleaves.so")  # default: blocks of 34 trees
            methods["lleaves_default_blocks"] = lambda X: ll.predict(X, n_jobs=1)
        except Exception as exc:  # not installed, or its LLVM binding does not match
            notes["lleaves_default_blocks"] = f"not measured: {type(exc).__name__}: {exc}"[:200]
        try:
            import tl2cgen  # noqa: PLC0415
            import treelite  # noqa: PLC0415

            tl2cgen.export_lib(treelite.frontend.from_lightgbm(booster), toolchain="gcc",
                               libpath=f"{tmp}/treelite.so", params={"parallel_comp": 8})
            predictor = tl2cgen.Predictor(f"{tmp}/treelite.so", nthread=1)
            methods["treelite"] = lambda X: predictor.predict(tl2cgen.DMatrix(X, dtype="float64")).ravel()
        except Exception as exc:
            notes["treelite"] = f"not measured: {type(exc).__name__}: {exc}"[:200]
        out: dict[str, Any] = {}
        for name, fn in methods.items():
            diffs = [np.abs(fn(X) - booster.predict(X, raw_score=True, num_threads=1)) for X in tiles[:3] + singles[:3]]
            exact = all(not d.any() for d in diffs)
            per_batch = []
            for X, b in zip(tiles, batches):
                t0 = time.perf_counter()
                fn(X)
                per_batch.append((time.perf_counter() - t0) * 1000 / len(b))
            per_single = []
            for X in singles * max(1, 300 // max(len(singles), 1)):
                t0 = time.perf_counter()
                fn(X)
                per_single.append((time.perf_counter() - t0) * 1000)
            out[name] = {"batch_ms_per_user": _pct(per_batch, 50), "single_p50_ms": _pct(per_single, 50),
                         "single_p99_ms": _pct(per_single, 99), "exact": exact,
                         "max_abs_diff": float(max(d.max(initial=0.0) for d in diffs)),
                         "rows_differing": round(float(np.mean(np.concatenate(diffs) > 0)), 4)}
    out.update(notes)
    out["rows_per_user"] = round(float(np.mean([len(m) for b in batches for m in b])), 1)
    return out


def run(items: int = 100_000, candidates: int = 500, users: int = 5000, rate: int = 1000,
        duration_s: float = 20.0, requests: int = 2000, clicks: int = 200_000,
        overload_rate: int = 5000) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    base = Settings()
    base = base.model_copy(update={
        "kafka": base.kafka.model_copy(update={"topic_prefix": f"sbench{tag}", "group_id": f"sbench{tag}"}),
        "redis": base.redis.model_copy(update={"prefix": f"sbench{tag}"}),
        "serving": base.serving.model_copy(update={
            "candidates": candidates, "seq_candidates": min(200, candidates), "cf_candidates": min(200, candidates),
            "trending_candidates": min(100, candidates), "log_features": False}),
    })
    logs = Path(tempfile.mkdtemp(prefix="streamrec-bench-serve-"))
    with ensure_services(base, start=True) as services:
        settings = services.settings
        kafka_wiring.ensure_topics(settings.kafka)
        store = StateStore.from_settings(settings)
        try:
            return _run(settings, store, logs, items, candidates, users, rate, duration_s, requests, clicks,
                        overload_rate)
        finally:
            store.drop_everything()
            kafka_wiring.delete_topics(settings.kafka)


def _run(settings: Settings, store: StateStore, logs: Path, n_items: int, candidates: int, users: int,
         rate: int, duration_s: float, requests: int, n_clicks: int, overload_rate: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    item_ids = [f"i{j}" for j in range(n_items)]
    _say(f"learner state: {n_clicks:,} clicks of {users:,} users over {n_items:,} items (in-process)")
    store.registry.ensure()
    processor = Processor(settings, store)
    # Seeded under topic names of their own: their offsets and watermarks never meet the
    # real topics' (the workers of phase 2 read those from offset 0).
    topic, parts = settings.kafka.events_topic, settings.kafka.partitions
    seed_topic, seed_items = f"{topic}-seed", f"{settings.kafka.items_topic}-seed"
    offsets = [0] * parts
    cat = [Item(id=f"c{j}", timestamp=T0, item=item_ids[j], title=f"title {j % 977}", tags=[f"g{j % 20}"],
                created_at=T0 - j * 1000) for j in range(n_items)]
    for lo in range(0, n_items, 5000):
        processor.process([Record(seed_items, 0, lo + k, it.item.encode(), encode(it), T0)
                           for k, it in enumerate(cat[lo : lo + 5000])])
    u = rng.integers(0, users, n_clicks)
    i = np.minimum(rng.zipf(1.15, n_clicks), n_items) - 1
    batch: list[Record] = []
    t = time.monotonic()
    for k in range(n_clicks):
        user = f"u{u[k]}"
        p = hash(user) % parts
        batch.append(Record(seed_topic, p, offsets[p], user.encode(),
                            encode(Click(id=f"s{k}", timestamp=T0 + k * 10, user=user, item=item_ids[i[k]])), T0))
        offsets[p] += 1
        if len(batch) == 2000:
            processor.process(batch)
            batch = []
    processor.process(batch)
    _say(f"state built in {time.monotonic() - t:.0f} s")

    _say("models: sequence model and HNSW index over the catalog, LambdaMART ranker")
    config = SASRecConfig(n_items=n_items, max_len=settings.trainer.seq_max_len, dim=settings.trainer.seq_dim)
    import torch

    torch.manual_seed(0)
    seq = SeqModel(ItemVocab(item_ids), config, SASRec(config))
    t = time.monotonic()
    index = VectorIndex.build(item_ids, seq.item_matrix(), exact_below=settings.trainer.index_exact_below)
    index_s = time.monotonic() - t
    ranker = synthetic_ranker()
    ranker.version = "bench"
    models = ModelSet(ranker, seq, index, ContentModel(config.dim), "bench")
    recstore = RecStore(store, parts)

    timing = _time_refresh(settings, store, recstore, models, rng, users, requests, candidates)
    results, lgb, comp = timing.pop("_single"), timing.pop("_lgb"), timing.pop("_comp")

    # Phase 2: freshness with a stream worker and a serving worker process.
    recstore.publish_model("seq", "bench", pack_seq(seq, index, models.content), {}, 2)
    recstore.publish_model("ranker", "bench", ranker.to_bytes(), {}, 2)
    traced = settings.model_copy(update={"serving": settings.serving.model_copy(update={"trace_latency": True})})
    worker = WorkerProcess(traced, "sbench-w", logs / "worker.log")
    server = WorkerProcess(traced, "sbench-s", logs / "serve.log", command="serve")
    producer = kafka_wiring.producer(settings.kafka, linger_ms=0)
    try:
        time.sleep(3.0)
        producer.send(topic, key=b"warm", value=encode(Click(id="warm", timestamp=T0, user="warm", item="i1")))
        producer.flush()
        applied_before = sum(offsets) + n_items + 1
        wait_applied(store, applied_before, timeout_s=120, workers=[worker])
        deadline = time.monotonic() + 60
        while not recstore.read_recs("warm", fallback=False) and time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"serving worker exited:\n{server.output()}")
            time.sleep(0.1)
        # and its trees compiled (it serves with the numpy trees until then)
        want = ranker.evaluator
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(
                w.get("worker") == "sbench-s" and w.get("tree_evaluator") == want for w in store.registry.workers()):
            time.sleep(0.2)

        def clicks(total: int, first: int) -> Iterator[tuple[bytes, bytes]]:
            for j in range(first, first + total):
                user = f"u{rng.integers(0, users)}"
                click = Click(id=f"f{j}", timestamp=T0 + n_clicks * 10 + j, user=user,
                              item=item_ids[int(i[j % n_clicks])])
                yield user.encode(), encode(click)

        phase = _Phase(store, recstore, producer, topic, worker)
        normal = phase.run(rate, duration_s, clicks(int(rate * duration_s), 0), applied_before)
        _say(f"freshness at {normal['rate']:,.0f} clicks/s: p50 {normal['p50']} ms, p99 {normal['p99']} ms "
             f"over {normal['samples']:,} lists; backlog at the end {normal['backlog_end']}")
        applied_before += normal["clicks"]
        # Overload: the asked-for rate, or the highest the stream worker sustains here if that is
        # lower: publishing is held back whenever the stream worker is more than a second of
        # clicks behind (clicks it cannot apply would pile up in Kafka, and their lag, not
        # serving's, would be measured).
        over = phase.run(overload_rate, duration_s, clicks(int(overload_rate * duration_s), 10**7), applied_before,
                         max_lag_s=1.0)
        _say(f"overload: published {over['rate']:,.0f} clicks/s, the stream worker applied {over['applied_rate']:,.0f}/s; "
             f"freshness p99 over the last third {over['p99_last_third']} ms; backlog max {over['backlog_max']}, "
             f"at the end {over['backlog_end']} (sampled each second: {over['backlog_samples']})")
        coalesced = next((w.get("coalesced", 0) for w in store.registry.workers() if w["worker"] == "sbench-w"), None)
    finally:
        producer.close()
        worker.stop()
        server.stop()
    fresh_keys = {
        "freshness_p50_ms": normal["p50"], "freshness_p99_ms": normal["p99"],
        "freshness_samples": normal["samples"], "freshness_rate_per_s": round(normal["rate"], 1),
        "overload_rate": round(min(over["rate"], over["applied_rate"]), 1),
        "overload_rate_basis": (f"asked for ({overload_rate}/s)" if over["rate"] >= overload_rate * 0.98 else
                                f"the stream worker's ceiling here (publishing held back to keep it within 1 s "
                                f"of clicks; {overload_rate}/s asked for)"),
        "overload_held_back_s": over["held_back_s"],
        "overload_published_per_s": round(over["rate"], 1), "overload_applied_per_s": round(over["applied_rate"], 1),
        "overload_freshness_p50_ms": over["p50"], "overload_freshness_p99_ms": over["p99_last_third"],
        "overload_backlog_end": over["backlog_end"], "overload_backlog_max": over["backlog_max"],
        "overload_backlog_samples": over["backlog_samples"], "coalesced": coalesced,
    }
    return {
        "items": n_items, "candidates": candidates, "users": users, "requests": requests,
        "refresh_p50_ms": _pct(results["cached"], 50), "refresh_p99_ms": _pct(results["cached"], 99),
        "refresh_uncached_p50_ms": _pct(results["uncached"], 50),
        "refresh_uncached_p99_ms": _pct(results["uncached"], 99),
        "ranker_lightgbm_p50_ms": _pct(lgb, 50), "ranker_lightgbm_p99_ms": _pct(lgb, 99),
        "ranker_compiled_p50_ms": _pct(comp, 50), "ranker_compiled_p99_ms": _pct(comp, 99),
        **timing,
        **fresh_keys,
        "index": index.kind, "index_build_s": round(index_s, 1),
        "target_refresh_p99_ms": 10, "target_freshness_p99_ms": 250, "target_overload_freshness_p99_ms": 5000,
    }


class _Phase:
    """Clicks published at a fixed rate while the stream and serving workers run; freshness
    (oldest click behind a list published -> list written) from the serving worker's samples."""

    def __init__(self, store: StateStore, recstore: RecStore, producer: Any, topic: str, worker: Any) -> None:
        self.store, self.recstore, self.producer, self.topic, self.worker = store, recstore, producer, topic, worker

    def run(self, rate: int, duration_s: float, clicks: Iterator[tuple[bytes, bytes]],
            applied_before: int, max_lag_s: float | None = None) -> dict[str, Any]:
        """Publish at ``rate``/s for ``duration_s``. With ``max_lag_s``, publishing pauses while
        the stream worker is more than ``rate * max_lag_s`` clicks behind (and the run lasts
        until every click is published)."""
        store = self.store
        store.client.delete(store.keys.serve_latency())
        t0 = time.monotonic()
        next_sample, third = t0 + 1.0, None
        backlog: list[int] = []
        sent = 0
        total = int(rate * duration_s)  # clicks to publish (``clicks`` yields that many)
        due = t0  # when the next click is due
        next_check, held = t0, 0.0
        for key, value in clicks:
            now = time.monotonic()
            if max_lag_s is not None and now >= next_check:
                next_check = now + 0.1
                while sent - (applied(store) - applied_before) > rate * max_lag_s:
                    time.sleep(0.02)
                    held += 0.02
                due = max(due, time.monotonic())
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            due += 1.0 / rate
            self.producer.send(self.topic, key=key, value=value)
            sent += 1
            now = time.monotonic()
            if now >= next_sample:
                backlog.append(self.recstore.backlog())
                next_sample = now + 1.0
            if third is None and sent >= total * 2 / 3:
                third = store.client.llen(store.keys.serve_latency())
        self.producer.flush()
        published = time.monotonic() - t0
        backlog_end = self.recstore.backlog()
        end = store.client.llen(store.keys.serve_latency())  # lists written while clicks arrived
        wait_applied(store, applied_before + sent, timeout_s=300, workers=[self.worker])
        applied_s = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while self.recstore.backlog() > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        fresh = [float(x) for x in store.client.lrange(store.keys.serve_latency(), 0, -1)]
        # the last third of the publishing window (not the drain after it)
        last = fresh[third or 0 : end] if third is not None else fresh[:end]
        fresh = fresh[int(len(fresh) * 0.05):]
        return {"clicks": sent, "rate": sent / published, "applied_rate": sent / applied_s,
                "p50": _pct(fresh, 50), "p99": _pct(fresh, 99), "samples": len(fresh),
                "p99_last_third": _pct(last, 99), "backlog_end": backlog_end,
                "backlog_max": max(backlog, default=backlog_end), "backlog_samples": backlog,
                "held_back_s": round(held, 1)}


__all__ = ["run", "synthetic_ranker"]
