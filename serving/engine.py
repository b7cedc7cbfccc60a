"""The two serving stages: candidates from several sources, then one ranker over all of them.

``Engine.refresh`` recomputes the lists of a batch of users in one pass:

1. **Candidates** (each keeps its source, rank and score):

   * ``seq``: nearest items (FAISS, inner product) of the session embedding the sequence
     model computes from the user's recent items;
   * ``cf``: item-to-item CF neighbours of the recent items (newer items weigh more);
   * ``trend``: the global trending list;
   * ``explore``: Thompson draws from the bandit posteriors of the exploration pool (the
     newest catalog items and a sample of the trending ones).

   Items already in the user's sequence are filtered out.
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
import random
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
from streamrec.models.content import ContentModel, content_similarities, tokens
from streamrec.models.index import VectorIndex
from streamrec.models.ranking import FEATURES, HeuristicBlend, Ranker
from streamrec.models.seqtrain import SeqModel

SOURCES = ("seq", "cf", "trend", "explore")
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
class _Item:
    n: float
    examined: float
    clicks: float
    created_at: int | None
    tokens: frozenset[str]
    expires: float
    token_ids: np.ndarray  # ids of ``tokens`` in the cache's token vocabulary (int64)

    @property
    def created(self) -> float:
        return float(self.created_at) if self.created_at is not None else math.nan


class ItemCache:
    """Item statistics and content read from Redis. Statistics are reused for ``ttl_s`` (hot
    items are shared by many users' candidate lists); catalog content for ``meta_ttl_s`` or
    until the item is announced again."""

    def __init__(self, recstore: RecStore, ttl_s: float, meta_ttl_s: float = 300.0,
                 max_items: int = 500_000) -> None:
        self.recstore = recstore
        self.ttl_s = ttl_s
        self.meta_ttl_s = meta_ttl_s
        self.max_items = max_items
        self._data: dict[str, _Item] = {}
        self._meta: dict[str, tuple[float, int | None, frozenset[str], np.ndarray]] = {}
        self.token_index: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    def get(self, items: Sequence[str], ns: Namespace) -> dict[str, _Item]:
        now = time.monotonic()
        data = self._data
        missing = [i for i in dict.fromkeys(items) if (e := data.get(i)) is None or e.expires < now]
        self.misses += len(missing)
        self.hits += len(items) - len(missing)
        if missing:
            if len(data) + len(missing) > self.max_items:
                data.clear()
                self._meta.clear()
                self.token_index.clear()
            meta = self._meta
            no_meta = [i for i in missing if (m := meta.get(i)) is None or m[0] < now]
            if no_meta:
                until = now + self.meta_ttl_s
                index = self.token_index
                for item, (created, title, tags, category) in zip(no_meta, self.recstore.item_meta(no_meta, ns)):
                    toks = tokens(title, tags, category)
                    ids = np.array([index.setdefault(t, len(index)) for t in toks], dtype=np.int64)
                    meta[item] = (until, created, toks, ids)
            expires = now + self.ttl_s
            for item, (n, e, c) in zip(missing, self.recstore.item_stats(missing, ns)):
                m = meta[item]
                data[item] = _Item(n, e, c, m[1], m[2], expires, m[3])
        return data

    def forget(self, items: Sequence[str]) -> None:
        for item in items:
            self._data.pop(item, None)
            self._meta.pop(item, None)

    def clear(self) -> None:
        self._data.clear()
        self._meta.clear()
        self.token_index.clear()


@dataclass
class _Candidates:
    order: list[str] = field(default_factory=list)
    info: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # item -> source -> (rank, score)

    def add(self, source: str, ranked: Sequence[tuple[str, float]], limit: int) -> None:
        for rank, (item, score) in enumerate(ranked):
            slot = self.info.get(item)
            if slot is None:
                if len(self.order) >= limit:
                    continue
                slot = self.info[item] = {}
                self.order.append(item)
            slot.setdefault(source, (float(rank), float(score)))


def _decayed(log_sums: np.ndarray, at_ms: float, half_life_ms: float) -> np.ndarray:
    """``models.decay.value_at`` over an array (log2 sums; -inf reads as 0)."""
    return np.exp2(np.minimum(log_sums - at_ms / half_life_ms, 1000.0))


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
        self.items = ItemCache(recstore, self.cfg.stats_ttl_s)
        self.rng = np.random.default_rng(seed)
        self._pyrng = random.Random(seed)
        self.clock_ms = 0  # newest event time served so far (the default list's clock)
        self.keep_sources = False  # fill Served.by_source (each source's own ranking; evaluation)
        self._trend: tuple[float, list[tuple[str, float]], dict[str, float]] = (-1.0, [], {})
        self._pool: tuple[float, list[str]] = (-1.0, [])
        self._cold: list[str] = []
        self._lock = threading.Lock()
        self._ns: tuple[float, Namespace] | None = None
        self.h_n = state.cf.half_life_ms
        self.h_trend = state.trending_config.half_life_ms
        self.h_bandit = state.bandit.half_life_ms
        self.prior = (state.bandit.prior_alpha, state.bandit.prior_beta)
        _one_thread()


    # -- model swaps ------------------------------------------------------------------------

    def swap(self, models: ModelSet) -> None:
        """Install new models; the refresh in progress finishes with the ones it started with."""
        for item in self._cold:
            self._add_cold(models, item, None)
        self.models = models

    def add_items(self, items: Sequence[str], ns: Namespace | None = None) -> int:
        """New catalog items: give each a content vector in the index (cold start) and a
        place in the exploration pool."""
        ns = ns or self._live()
        self.items.forget(items)
        cache = self.items.get(items, ns)
        added = 0
        for item in items:
            if item not in self._cold:
                self._cold.append(item)
            added += self._add_cold(self.models, item, cache[item].tokens)
        del self._cold[:-10_000]
        self._pool = (-1.0, [])
        return added

    def _add_cold(self, models: ModelSet, item: str, toks: frozenset[str] | None) -> int:
        if models.index is None or models.content is None or item in models.index:
            return 0
        if toks is None:
            entry = self.items._data.get(item)
            toks = entry.tokens if entry else frozenset()
        vec = models.content.vector(toks)
        if vec is None:
            return 0
        return models.index.add([item], vec[None, :])

    # -- sources ----------------------------------------------------------------------------

    def _trending(self, ns: Namespace) -> tuple[list[tuple[str, float]], dict[str, float]]:
        now = time.monotonic()
        if self._trend[0] < now:
            n = max(self.cfg.trending_candidates * 5, 1000)
            top = self.recstore.trending_scores(n, ns)
            self._trend = (now + max(self.cfg.stats_ttl_s, 0.05), top, dict(top))
        return self._trend[1], self._trend[2]

    def _explore_pool(self, ns: Namespace) -> list[str]:
        now = time.monotonic()
        if self._pool[0] < now:
            size = self.cfg.explore_pool
            newest = [i for i, _ in self.recstore.newest_items(size, ns)]
            listed = set(newest)
            newest += [i for i in reversed(self._cold) if i not in listed][: max(0, size - len(newest))]
            top = [i for i, _ in self._trending(ns)[0]]
            sample = self._pyrng.sample(top, min(len(top), max(0, size - len(newest)))) if top else []
            pool = list(dict.fromkeys(newest + sample))
            self._pool = (now + max(self.cfg.stats_ttl_s, 0.05), pool)
        return self._pool[1]

    def _cf(self, recents: list[list[str]], ns: Namespace) -> list[list[tuple[str, float]]]:
        distinct = list(dict.fromkeys(i for r in recents for i in r))
        if not distinct or self.cfg.cf_candidates == 0:
            return [[] for _ in recents]
        per_item = max(50, self.cfg.cf_candidates // 2)
        rows = dict(zip(distinct, self.recstore.neighbours(distinct, per_item, ns)))
        cache = self.items.get(distinct + [j for r in rows.values() for j, _ in r], ns)
        sims: dict[str, list[tuple[str, float]]] = {}
        for item, row in rows.items():
            n_i = cache[item].n
            out = []
            for j, c_ij in row:
                a, b = max(n_i, c_ij), max(cache[j].n, c_ij)
                out.append((j, 2.0 ** (c_ij - (a + b) / 2.0)))
            out.sort(key=lambda js: (-js[1], js[0]))
            sims[item] = out
        result = []
        for recent in recents:
            scores: dict[str, float] = {}
            for age, item in enumerate(recent):
                for j, s in sims.get(item, ()):
                    scores[j] = scores.get(j, 0.0) + s / (1.0 + age)
            result.append(sorted(scores.items(), key=lambda js: (-js[1], js[0])))
        return result

    # -- refresh ----------------------------------------------------------------------------

    def _live(self) -> Namespace:
        """The live namespace, read at most every 0.5 s (a replay's switch is seen within it)."""
        now = time.monotonic()
        if self._ns is None or self._ns[0] < now:
            self._ns = (now + 0.5, self.state.live())
        return self._ns[1]

    def refresh(self, requests: Sequence[Request], ns: Namespace | None = None) -> list[Served]:
        with self._lock:
            return self._refresh(requests, ns or self._live())

    def _refresh(self, requests: Sequence[Request], ns: Namespace) -> list[Served]:
        cfg, models = self.cfg, self.models
        users = [r.user for r in requests if r.user is not None]
        views = dict(zip(users, self.state.session_views(users, ns.name))) if users else {}
        histories: list[list[str]] = []
        times: list[list[int]] = []
        metas: list[SessionView | None] = []
        for r in requests:
            view = views.get(r.user) if r.user is not None else None
            metas.append(view)
            histories.append([e.item for e in view.entries] if view else [])
            times.append([e.ts for e in view.entries] if view else [])
        as_of = [t[-1] if t else self.clock_ms for t in times]
        ties = [[e.event_id for e in view.entries if e.ts == view.entries[-1].ts] if view and view.entries else []
                for view in metas]
        if times and any(times):
            self.clock_ms = max(self.clock_ms, max(t[-1] for t in times if t))
        seen = [set(h) for h in histories]

        # seq: one batched model pass and one batched search
        seq_lists: list[list[tuple[str, float]]] = [[] for _ in requests]
        queries: np.ndarray | None = None
        if models.seq is not None and models.index is not None and cfg.seq_candidates > 0:
            want = [i for i, h in enumerate(histories) if h]
            if want:
                emb = models.seq.session_embeddings([histories[i][-cfg.seq_len :] for i in want])  # (B', D)
                queries = np.zeros((len(requests), emb.shape[1]), np.float32)
                queries[want] = emb
                ids, scores = models.index.search(emb, cfg.seq_candidates + min(max(map(len, seen)), 200))
                for row, i in enumerate(want):
                    seq_lists[i] = [(it, float(s)) for it, s in zip(ids[row], scores[row])
                                    if it not in seen[i]][: cfg.seq_candidates]
        recents = [list(reversed(h[-cfg.recent :])) for h in histories]
        cf_lists = self._cf(recents, ns)
        top, trend_score = self._trending(ns)
        pool = self._explore_pool(ns)

        cands: list[_Candidates] = []
        for i in range(len(requests)):
            c = _Candidates()
            c.add("seq", seq_lists[i], cfg.candidates)
            c.add("cf", [x for x in cf_lists[i] if x[0] not in seen[i]][: cfg.cf_candidates], cfg.candidates)
            c.add("trend", [x for x in top if x[0] not in seen[i]][: cfg.trending_candidates], cfg.candidates)
            cands.append(c)
        cache = self.items.get([it for c in cands for it in c.order] + pool, ns)
        # explore: Thompson draws over the pool (per user, from the same posteriors)
        for i, c in enumerate(cands):
            open_pool = [it for it in pool if it not in seen[i]]
            if open_pool and cfg.explore_slots > 0:
                draws = self._draws(open_pool, cache, as_of[i])
                n_explore = max(cfg.explore_slots * 4, cfg.k)
                best = list(np.argsort(-draws, kind="stable")[:n_explore])
                cold = [j for j in range(len(open_pool)) if self._no_evidence(cache[open_pool[j]])]
                if cold:  # the newest item without any evidence is always a candidate (cold start)
                    newest = max(cold, key=lambda j: cache[open_pool[j]].created_at or 0)
                    best = [newest] + [j for j in best if j != newest]
                c.add("explore", [(open_pool[j], float(draws[j])) for j in best], cfg.candidates + n_explore)

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
            unseen = [j for j in by_draw if self._no_evidence(cache[c.order[j]])]
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
                sources=["+".join(src for src in SOURCES if src in c.info[c.order[j]]) for j in picks],
                as_of=as_of[i], computed_at=now_ms, version=r.version, model=models.label,
                candidates=[c.order[j] for j in logged], features=f[logged], publish_ms=r.publish_ms,
                by_source=self._by_source(c) if self.keep_sources else {}, tie_ids=ties[i],
            ))
        return out

    @staticmethod
    def _no_evidence(row: _Item) -> bool:
        return row.n == -math.inf and row.examined == -math.inf and row.created_at is not None

    @staticmethod
    def _by_source(c: _Candidates) -> dict[str, list[str]]:
        return {src: [it for it, _ in sorted(((it, c.info[it][src][0]) for it in c.order if src in c.info[it]),
                                            key=lambda x: x[1])] for src in SOURCES}

    def _draws(self, items: Sequence[str], cache: dict[str, _Item], at_ms: int) -> np.ndarray:
        a0, b0 = self.prior
        h = self.h_bandit
        n = len(items)
        clicks = _decayed(np.fromiter((cache[i].clicks for i in items), float, n), at_ms, h)
        examined = _decayed(np.fromiter((cache[i].examined for i in items), float, n), at_ms, h)
        return self.rng.beta(a0 + clicks, b0 + np.maximum(examined - clicks, 0.0))

    def _features(self, c: _Candidates, cache: dict[str, _Item], trend_score: dict[str, float],
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
        a0, b0 = self.prior
        hb = self.h_bandit
        clicks, examined = _decayed(num[:, 2], at_ms, hb), _decayed(num[:, 1], at_ms, hb)
        alpha, beta = a0 + clicks, b0 + np.maximum(examined - clicks, 0.0)
        total = alpha + beta
        X[:, COL["post_mean"]] = alpha / total
        X[:, COL["post_std"]] = np.sqrt(alpha * beta / (total * total * (total + 1.0)))
        X[:, COL["popularity"]] = np.log1p(_decayed(num[:, 0], at_ms, self.h_n))
        trend = np.array([trend_score.get(it, -math.inf) for it in items])
        X[:, COL["trend_score"]] = np.log1p(_decayed(trend, at_ms, self.h_trend))
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


__all__ = ["Engine", "ModelSet", "Request", "Served", "SOURCES", "ItemCache"]
