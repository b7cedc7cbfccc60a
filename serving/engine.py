"""The two serving stages: candidates from several sources, then one ranker over all of them.

``Engine.refresh`` recomputes the lists of a batch of users in one pass:

1. **Candidates** from every configured ``CandidateSource`` (``serving.sources``; one file
   each under ``serving/sources/``), each keeping its source, rank and score:

   * ``seq``: nearest items (FAISS, inner product) of the session embedding the sequence
     model computes from the user's recent items;
   * ``cf``: item-to-item CF neighbours of the recent items (newer items weigh more);
   * ``trend``: the global trending list;
   * ``explore``: Thompson draws from the bandit posteriors of the exploration pool (the
     newest catalog items and a sample of the trending ones).

   Items already in the user's sequence are never candidates.
2. **Features** (``models.ranking.FEATURES``), built here and only here: the served lists
   are logged with exactly these rows, and the ranker is trained on them.
3. **Ranking**: the trained LambdaMART ranker, or the heuristic blend (reciprocal-rank fusion)
   before one exists. The best ``k - explore_slots`` items fill the list; the last
   ``explore_slots`` positions go to exploration picks: first the newest catalog item with no
   evidence at all (never shown, never clicked: cold start), then the highest draws.

Decayed quantities are read at the event time of the user's newest click, so a replayed
history is served as it would have been then.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import ServingSettings, Settings
from streamrec.infra.state import SessionView, StateStore
from streamrec.models.content import ContentModel, content_similarities
from streamrec.models.decay import value_at
from streamrec.models.errors import StateLost
from streamrec.models.index import VectorIndex
from streamrec.models.learners import beta_moments, beta_posterior
from streamrec.models.ranking import FEATURES, HeuristicBlend, Ranker
from streamrec.models.seqtrain import SeqModel
from streamrec.serving import sources as source_registry
from streamrec.serving.reads import ItemRow, SharedReads
from streamrec.serving.sources import Batch, CandidateSource, Retrieved, SourceContext, no_evidence

ABSENT_RANK = 10_000.0
COL = {name: i for i, name in enumerate(FEATURES)}


@dataclass(frozen=True)
class ModelSet:
    """The models one refresh uses; replaced as a whole when a newer model is loaded."""

    ranker: Ranker = field(default_factory=HeuristicBlend)
    seq: SeqModel | None = None
    index: VectorIndex | None = None
    content: ContentModel | None = None
    seq_version: str | None = None

    @property
    def label(self) -> str:
        return f"ranker={self.ranker.version};seq={self.seq_version or 'none'}"


@dataclass(frozen=True)
class Request:
    user: str | None  # None: the default list
    version: int = -1  # Kafka offset of the newest click behind the change (-1: unknown)
    publish_ms: int = 0


@dataclass
class Served:
    """One computed list, plus what is logged for ranker training."""

    user: str | None
    request_id: str
    items: list[str]
    scores: list[float]
    sources: list[str]
    as_of: int
    computed_at: int
    version: int
    model: str
    candidates: list[str]  # best first (logged prefix of the ranked candidates)
    features: np.ndarray  # (len(candidates), len(FEATURES)) float64, same order
    publish_ms: int = 0
    by_source: dict[str, list[str]] = field(default_factory=dict)  # each source's own ranking
    tie_ids: list[str] = field(default_factory=list)  # event ids of the state's clicks at as_of exactly

    def fields(self) -> dict[str, str]:
        return {
            "items": json.dumps(self.items), "scores": json.dumps([round(s, 6) for s in self.scores]),
            "sources": json.dumps(self.sources), "request_id": self.request_id, "model": self.model,
            "computed_at": str(self.computed_at), "as_of": str(self.as_of),
        }


@dataclass
class _Candidates:
    order: list[str] = field(default_factory=list)
    info: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # item -> source -> (rank, score)

    def add(self, source: str, found: Retrieved, limit: int) -> None:
        for rank, (item, score) in enumerate(zip(found.items, found.scores)):
            slot = self.info.get(item)
            if slot is None:
                if len(self.order) >= limit:
                    continue
                slot = self.info[item] = {}
                self.order.append(item)
            slot.setdefault(source, (float(rank), float(score)))


def _one_thread() -> None:
    """Inference on tiny inputs: one thread. Under load, torch's and FAISS's thread pools
    spin-wait for cores and a 0.4 ms session embedding takes over 100 ms (measured)."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


class Engine:
    """Computes lists; thread-safe for one caller at a time (the serving loop)."""

    def __init__(self, settings: Settings, state: StateStore, recstore: RecStore,
                 models: ModelSet | None = None, seed: int = 0) -> None:
        self.settings = settings
        self.cfg: ServingSettings = settings.serving
        self.state = state
        self.recstore = recstore
        self.models = models or ModelSet()
        self.reads = SharedReads(recstore, self.cfg, seed)
        self.items = self.reads.items
        self.rng = np.random.default_rng(seed)
        self.sources: dict[str, CandidateSource] = source_registry.build(
            self.cfg.sources, SourceContext(settings, state, recstore, self.reads, self.rng))
        self.limits = {name: type(src).limit(settings) for name, src in self.sources.items()}
        self.clock_ms = 0  # newest event time served so far (the default list's clock)
        self.keep_sources = False  # fill Served.by_source (each source's own ranking; evaluation)
        self._lock = threading.Lock()
        self.epoch: str | None = None  # of the state served from (see _live)
        self.h_n = state.cf.half_life_ms
        self.h_trend = state.trending_config.half_life_ms
        _one_thread()

    # -- model swaps ------------------------------------------------------------------------

    def swap(self, models: ModelSet) -> None:
        """Install new models; the refresh in progress finishes with the ones it started with."""
        for item in self.reads.cold:
            self._add_cold(models, item, None)
        self.models = models

    def add_items(self, items: Sequence[str], ns: Namespace | None = None) -> int:
        """New catalog items: give each a content vector in the index (cold start) and a
        place in the exploration pool."""
        ns = ns or self._live()
        self.items.forget(items)
        cache = self.items.get(items, ns)
        self.reads.add_cold(items)
        return sum(self._add_cold(self.models, item, cache[item].tokens) for item in items)

    def _add_cold(self, models: ModelSet, item: str, toks: frozenset[str] | None) -> int:
        if models.index is None or models.content is None or item in models.index:
            return 0
        if toks is None:
            entry = self.items.peek(item)
            toks = entry.tokens if entry else frozenset()
        vec = models.content.vector(toks)
        if vec is None:
            return 0
        return models.index.add([item], vec[None, :])

    # -- refresh ----------------------------------------------------------------------------

    def _live(self) -> Namespace:
        """The live namespace, checked before every refresh: a list is never computed from
        state that is gone (``StateLost``); after a restore (a new epoch) the caches are
        dropped and serving continues from the restored state."""
        view = self.state.registry.view()
        if not view.healthy:
            raise StateLost(self.state.registry.missing_reason())
        if view.epoch != self.epoch:
            if self.epoch is not None:
                self.items.clear()
                self.reads.reset()
            self.epoch = view.epoch
        assert view.live is not None
        return view.live

    def refresh(self, requests: Sequence[Request], ns: Namespace | None = None) -> list[Served]:
        with self._lock:
            return self._refresh(requests, ns or self._live())

    def _refresh(self, requests: Sequence[Request], ns: Namespace) -> list[Served]:
        cfg, models = self.cfg, self.models
        users = [r.user for r in requests if r.user is not None]
        views = dict(zip(users, self.state.session_views(users, ns.name))) if users else {}
        metas = [views.get(r.user) if r.user is not None else None for r in requests]
        histories = [[e.item for e in view.entries] if view else [] for view in metas]
        times = [[e.ts for e in view.entries] if view else [] for view in metas]
        as_of = [t[-1] if t else self.clock_ms for t in times]
        ties = [[e.event_id for e in view.entries if e.ts == view.entries[-1].ts] if view and view.entries else []
                for view in metas]
        if any(times):
            self.clock_ms = max(self.clock_ms, max(t[-1] for t in times if t))
        batch = Batch(ns, [r.user for r in requests], histories, [set(h) for h in histories], as_of, models)

        # candidates: every source over the whole batch, merged in the sources' order
        found = {name: src.retrieve(batch, self.limits[name]) for name, src in self.sources.items()}
        cands = [_Candidates() for _ in requests]
        for name, per_user in found.items():
            limit = cfg.candidates + (self.limits[name] if name == "explore" else 0)  # exploration always fits
            for c, got in zip(cands, per_user):
                c.add(name, got, limit)
        cache = self.items.get([it for c in cands for it in c.order], ns)
        trend_score = self.reads.trending_score(ns)

        queries = batch.embeddings
        feats = [self._features(c, cache, trend_score, metas[i], histories[i], times[i], as_of[i],
                                queries[i] if queries is not None else None, models)
                 for i, c in enumerate(cands)]
        sizes = [len(c.order) for c in cands]
        X = np.concatenate(feats) if sum(sizes) else np.zeros((0, len(FEATURES)))
        scores = models.ranker.score(X) if len(X) else np.zeros(0)
        out: list[Served] = []
        now_ms = int(time.time() * 1000)
        lo = 0
        for i, (r, c) in enumerate(zip(requests, cands)):
            s = scores[lo : lo + sizes[i]]
            f = X[lo : lo + sizes[i]]
            lo += sizes[i]
            order = np.argsort(-s, kind="stable")
            n_main = max(cfg.k - cfg.explore_slots, 0)
            main = [j for j in order[: n_main]]
            chosen = set(main)
            by_draw = [j for j in np.argsort(-f[:, COL["explore_draw"]], kind="stable")
                       if "explore" in c.info[c.order[j]] and j not in chosen]
            # Cold start: the first exploration slot goes to the newest item nobody has seen
            # or clicked yet (no evidence at all), so every new item gets shown.
            unseen = [j for j in by_draw if no_evidence(cache[c.order[j]])]
            if unseen:
                newest = max(unseen, key=lambda j: cache[c.order[j]].created_at or 0)
                by_draw = [newest] + [j for j in by_draw if j != newest]
            explore = by_draw[: cfg.k - len(main)]
            picks = main + explore
            if len(picks) < cfg.k:
                chosen.update(explore)
                picks += [j for j in order if j not in chosen][: cfg.k - len(picks)]
            logged = list(order[: cfg.log_top])
            out.append(Served(
                user=r.user, request_id=uuid.uuid4().hex, items=[c.order[j] for j in picks],
                scores=[float(s[j]) for j in picks],
                sources=["+".join(src for src in self.sources if src in c.info[c.order[j]]) for j in picks],
                as_of=as_of[i], computed_at=now_ms, version=r.version, model=models.label,
                candidates=[c.order[j] for j in logged], features=f[logged], publish_ms=r.publish_ms,
                by_source=self._by_source(c) if self.keep_sources else {}, tie_ids=ties[i],
            ))
        return out

    def _by_source(self, c: _Candidates) -> dict[str, list[str]]:
        return {src: [it for it, _ in sorted(((it, c.info[it][src][0]) for it in c.order if src in c.info[it]),
                                            key=lambda x: x[1])] for src in self.sources}

    def _features(self, c: _Candidates, cache: dict[str, ItemRow], trend_score: dict[str, float],
                  view: SessionView | None, history: list[str], times: list[int], at_ms: int,
                  query: np.ndarray | None, models: ModelSet) -> np.ndarray:
        items = c.order
        n = len(items)
        X = np.zeros((n, len(FEATURES)))
        if n == 0:
            return X
        info = c.info
        seq_rank, cf_rank, trend_rank = np.full(n, ABSENT_RANK), np.full(n, ABSENT_RANK), np.full(n, ABSENT_RANK)
        cf_score, draw, n_sources = np.zeros(n), np.zeros(n), np.zeros(n)
        for j, it in enumerate(items):
            d = info[it]
            n_sources[j] = len(d)
            if (hit := d.get("seq")) is not None:
                seq_rank[j] = hit[0]
            if (hit := d.get("cf")) is not None:
                cf_rank[j], cf_score[j] = hit
            if (hit := d.get("trend")) is not None:
                trend_rank[j] = hit[0]
            if (hit := d.get("explore")) is not None:
                draw[j] = hit[1]
        X[:, COL["seq_rank"]], X[:, COL["cf_rank"]], X[:, COL["trend_rank"]] = seq_rank, cf_rank, trend_rank
        X[:, COL["cf_score"]], X[:, COL["explore_draw"]], X[:, COL["n_sources"]] = cf_score, draw, n_sources
        if query is not None and models.index is not None:
            dots, known = models.index.dots(query, items)
            X[:, COL["seq_score"]] = np.where(known, dots, 0.0)
        rows = [cache[it] for it in items]
        # (n, 4): log2 sums n / examined / clicks, created_at (NaN when unknown)
        num = np.array([(r.n, r.examined, r.clicks, r.created) for r in rows])
        alpha, beta = beta_posterior(num[:, 1], num[:, 2], at_ms, self.state.bandit)
        X[:, COL["post_mean"]], X[:, COL["post_std"]] = beta_moments(alpha, beta)
        X[:, COL["popularity"]] = np.log1p(value_at(num[:, 0], at_ms, self.h_n))
        trend = np.array([trend_score.get(it, -math.inf) for it in items])
        X[:, COL["trend_score"]] = np.log1p(value_at(trend, at_ms, self.h_trend))
        X[:, COL["item_age_h"]] = np.where(np.isnan(num[:, 3]), -1.0, (at_ms - num[:, 3]) / 3.6e6)
        recent = [cache[h].token_ids for h in history[-5:] if h in cache]
        X[:, COL["content_sim"]] = content_similarities([r.token_ids for r in rows], recent,
                                                        len(self.items.token_index))
        # Per-list relative scores: magnitudes differ from user to user (how many recent clicks,
        # how strong their co-occurrences, the session embedding's norm); the ranker compares
        # candidates within one list, so it also sees each score against the list's best.
        cf_max = cf_score.max()
        X[:, COL["cf_rel"]] = cf_score / cf_max if cf_max > 0 else 0.0
        seq = X[:, COL["seq_score"]]
        X[:, COL["seq_rel"]] = seq - seq.max() if query is not None else -1.0
        pop = X[:, COL["popularity"]]
        X[:, COL["pop_rel"]] = pop / pop.max() if pop.max() > 0 else 0.0
        X[:, COL["session_len"]] = len(history)
        X[:, COL["since_last_s"]] = (times[-1] - times[-2]) / 1000.0 if len(times) >= 2 else -1.0
        X[:, COL["user_clicks"]] = view.clicks if view is not None else 0
        return X


__all__ = ["Engine", "ModelSet", "Request", "Served"]
