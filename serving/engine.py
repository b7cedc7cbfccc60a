"""The serving stages: candidates from several sources, a coarse cut, one ranker over the rest.

``Engine.refresh`` recomputes the lists of a batch of users in one pass, on arrays: items are
rows of the serving worker's item table (``serving.reads.ItemTable``), the merged candidates
of the whole batch one ragged structure (``Candidates``: flat arrays, user by user), their
features one matrix built with numpy, scored by one ranker call.

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
3. **Coarse cut** (a trained ranker only, ``serving.coarse_candidates`` > 0): the ranker's
   first ``serving.coarse_trees`` trees score every candidate; each list keeps its best
   ``coarse_candidates`` (and every exploration candidate) for the next stage.
4. **Ranking**: the trained LambdaMART ranker (the remaining trees, added to the coarse sums:
   the full model's scores exactly), or the heuristic blend (reciprocal-rank fusion) before
   one exists. The best ``k - explore_slots`` items fill the list; the last ``explore_slots``
   positions go to exploration picks: first the newest catalog item with no evidence at all
   (never shown, never clicked: cold start), then the highest draws.

Decayed quantities are read at the event time of the user's newest click, so a replayed
history is served as it would have been then.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import ServingSettings, Settings
from streamrec.infra.state import StateStore
from streamrec.models.content import ContentModel, content_similarities
from streamrec.models.decay import value_at
from streamrec.models.diversity import cosine_matrix, jaccard_matrix, mmr
from streamrec.models.errors import ConfigError, StateLost
from streamrec.models.index import VectorIndex
from streamrec.models.interleave import assign_arm, draft_propensities, team_draft
from streamrec.models.learners import beta_moments, beta_posterior
from streamrec.models.ranking import (ABSENT_RANK, FEATURES, RANKED_SOURCES, HeuristicBlend, Ranker, TrainedRanker,
                                     check_features)
from streamrec.models.retrieval import RetrievalSet
from streamrec.models.servedlog import PolicyDecision as Decision  # the exploration choice, as logged
from streamrec.models.seqtrain import SeqModel
from streamrec.serving import sources as source_registry
from streamrec.serving.reads import NO_TOKEN, Sessions, SharedReads
from streamrec.serving.sources import Batch, CandidateSource, Retrieved, SourceContext
from streamrec.serving.sources.explore import serving_policy

COL = {name: i for i, name in enumerate(FEATURES)}
CONTENT_RECENT = 5  # recent clicks the content similarity compares a candidate with


@dataclass(frozen=True)
class ModelSet:
    """The models one refresh uses; replaced as a whole when a newer model is loaded."""

    ranker: Ranker = field(default_factory=HeuristicBlend)
    seq: SeqModel | None = None
    index: VectorIndex | None = None
    content: ContentModel | None = None
    seq_version: str | None = None
    treatment: Ranker | None = None  # the experiment's treatment ranker (experiment.treatment)
    retrieval: RetrievalSet | None = None  # matrix factorisation and two-tower (sources mf, users, tower)

    @property
    def label(self) -> str:
        label = f"ranker={self.ranker.version};seq={self.seq_version or 'none'}"
        return label + (f";retrieval={self.retrieval.version}" if self.retrieval is not None else "")


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
    unpruned: list[str] = field(default_factory=list)  # the list without the coarse cut (Engine.keep_unpruned)
    # per served slot: how it was filled ("rank", "cold", "explore", "fill") and the probability
    # that the policy put that item in that slot given the earlier slots (1: deterministic)
    kinds: list[str] = field(default_factory=list)
    propensities: list[float] = field(default_factory=list)
    decision: "Decision | None" = None  # the exploration policy's choice (off-policy evaluation)
    slot_features: np.ndarray | None = None  # (len(items), len(FEATURES)) float64: the served items' rows
    via: list[dict[str, str]] = field(default_factory=list)  # per slot: source -> the session item that brought it
    policy: str = ""
    teams: list[str] = field(default_factory=list)  # interleaving: per slot, the team that placed it
    arm: str = ""  # experiment arm of the user

    def fields(self) -> dict[str, str]:
        return {
            "items": json.dumps(self.items), "scores": json.dumps([round(s, 6) for s in self.scores]),
            "sources": json.dumps(self.sources), "request_id": self.request_id, "model": self.model,
            "computed_at": str(self.computed_at), "as_of": str(self.as_of),
        }


@dataclass
class Slate:
    """A served list's positions within its user's candidates, and how each slot was filled."""

    picks: np.ndarray  # (k,) int64
    kinds: list[str]
    propensities: list[float]
    decision: Decision | None = None
    teams: list[str] = field(default_factory=list)  # interleaving: per slot "a", "b" or "" (not drafted)


@dataclass
class Candidates:
    """The merged candidates of a batch, user by user (each user's in merge order: sources in
    their configured order, each best first; an item a source proposes again keeps its place).

    N candidates in all, S sources; user i's are ``[bounds[i], bounds[i + 1])``.
    """

    rows: np.ndarray  # (N,) int64 item rows
    user: np.ndarray  # (N,) int64 index of the user in the batch, non-decreasing
    bounds: np.ndarray  # (B + 1,) int64
    has: np.ndarray  # (S, N) bool: source s proposed it
    rank: np.ndarray  # (S, N) float64: its 0-based rank in source s (ABSENT_RANK: not proposed)
    score: np.ndarray  # (S, N) float64: source s's score (0: not proposed)
    alpha: np.ndarray | None = None  # (N,) Beta posteriors at each list's time (set with the features)
    beta: np.ndarray | None = None

    @staticmethod
    def merge(found: Sequence[Sequence[Retrieved]], limits: Sequence[int], n_users: int) -> "Candidates":
        """Merge S sources' answers (``found[s][i]``: source s for user i). A new item of source
        s joins user i's list while it holds fewer than ``limits[s]`` items."""
        S, B = len(found), n_users
        lengths = np.array([[len(found[s][i].rows) for s in range(S)] for i in range(B)], dtype=np.int64).reshape(B, S)
        E = int(lengths.sum())
        if E == 0:
            return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(B + 1, np.int64),
                              np.zeros((S, 0), bool), np.zeros((S, 0)), np.zeros((S, 0)))
        # every proposal, user by user, then source by source, each best first: (E,)
        rows = np.concatenate([found[s][i].rows for i in range(B) for s in range(S)])
        scores = np.concatenate([found[s][i].scores for i in range(B) for s in range(S)])
        segment = np.repeat(np.arange(B * S), lengths.ravel())  # i * S + s
        user, source = segment // S, segment % S
        seg_start = np.concatenate([[0], np.cumsum(lengths.ravel())[:-1]])
        rank = np.arange(E) - seg_start[segment]
        # an item's first proposal for a user is its place in the list, if there is room
        _, first, inverse = np.unique((user << 32) | rows, return_index=True, return_inverse=True)
        new = np.zeros(E, dtype=bool)
        new[first] = True
        new_in_segment = np.bincount(segment[new], minlength=B * S).reshape(B, S)
        admitted = np.zeros((B, S), dtype=np.int64)
        held = np.zeros(B, dtype=np.int64)
        for s in range(S):  # sources fill the lists in order, each up to its limit
            admitted[:, s] = np.clip(limits[s] - held, 0, new_in_segment[:, s])
            held += admitted[:, s]
        new_before = np.concatenate([[0], np.cumsum(new)[:-1]])
        new_rank = new_before - new_before[seg_start[segment]]
        take = np.flatnonzero(new & (new_rank < admitted.ravel()[segment]))
        N = len(take)
        cand_of_item = np.full(len(first), -1, dtype=np.int64)
        cand_of_item[inverse[take]] = np.arange(N)
        cand = cand_of_item[inverse]  # (E,) the candidate each proposal is about (-1: no room)
        hit = cand >= 0
        s_hit, c_hit = source[hit], cand[hit]
        has = np.zeros((S, N), dtype=bool)
        has[s_hit, c_hit] = True
        rank_m = np.full((S, N), ABSENT_RANK)
        rank_m[s_hit, c_hit] = rank[hit]
        score_m = np.zeros((S, N))
        score_m[s_hit, c_hit] = scores[hit]
        c_user = user[take]
        return Candidates(rows[take], c_user, np.searchsorted(c_user, np.arange(B + 1)), has, rank_m, score_m)


def _segment_max(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Max of each user's values (0 for a user without candidates). (B,)"""
    out = np.zeros(len(bounds) - 1)
    nonempty = bounds[1:] > bounds[:-1]
    if nonempty.any():
        out[nonempty] = np.maximum.reduceat(x, bounds[:-1][nonempty])
    return out


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
        self.keep_unpruned = False  # fill Served.unpruned (the list without the coarse cut; evaluation)
        self.timings: dict[str, float] = {}  # seconds spent per stage, summed over refreshes
        self._lock = threading.Lock()
        self.epoch: str | None = None  # of the state served from (see _live)
        self.h_n = state.cf.half_life_ms
        self.h_trend = state.trending_config.half_life_ms
        self.policy = serving_policy(settings)
        self.explain = True  # fill Served.via (which session item brought each served item)
        _one_thread()

    # -- model swaps ------------------------------------------------------------------------

    def prepare(self, models: ModelSet) -> ModelSet:
        """Make the models ready to serve fast: a trained ranker is compiled to native code
        (``serving.tree_evaluator``; seconds, so the serving worker calls this in its
        model-loading thread). The scores do not change, only their cost."""
        ranker = models.ranker
        evaluator = self.cfg.tree_evaluator
        if evaluator != "compiled" and isinstance(ranker, TrainedRanker):
            coarse = [self.cfg.coarse_trees] if self.cfg.coarse_candidates > 0 else []
            if not ranker.compile_native(coarse) and evaluator == "native":
                raise ConfigError("serving.tree_evaluator is native but lleaves is not installed")
        return models

    def swap(self, models: ModelSet) -> None:
        """Install new models; the refresh in progress finishes with the ones it started with."""
        for item in self.reads.cold:
            self._add_cold(models, item)
        self.models = models

    def add_items(self, items: Sequence[str], ns: Namespace | None = None) -> int:
        """New catalog items: give each a content vector in the index (cold start) and a
        place in the exploration pool."""
        ns = ns or self._live()
        self.items.forget(items)
        rows = self.items.rows(items)
        self.items.ensure(rows, ns, time.monotonic())
        self.reads.add_cold(items)
        return sum(self._add_cold(self.models, item) for item in items)

    def _add_cold(self, models: ModelSet, item: str) -> int:
        row = self.items.index.get(item)
        toks = self.items.token_sets[row] if row is not None else frozenset()
        if models.retrieval is not None:  # the two-tower model places it from its content
            models.retrieval.add_cold(item, toks)
        if models.index is None or models.content is None or item in models.index:
            return 0
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
                self.reads.reset()
            self.epoch = view.epoch
        assert view.live is not None
        return view.live

    def refresh(self, requests: Sequence[Request], ns: Namespace | None = None) -> list[Served]:
        with self._lock:
            if ns is None:
                t = time.perf_counter()
                ns = self._live()
                self._lap("live", t)
            return self._refresh(requests, ns)

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - since
        return now

    def _refresh(self, requests: Sequence[Request], ns: Namespace) -> list[Served]:
        cfg, models, reads = self.cfg, self.models, self.reads
        t = time.perf_counter()
        now = reads.begin()
        users = [r.user for r in requests]
        sessions = reads.sessions.read(users, ns)
        has_clicks = sessions.last_ts >= 0
        as_of = np.where(has_clicks, sessions.last_ts, self.clock_ms)
        if has_clicks.any():
            self.clock_ms = max(self.clock_ms, int(sessions.last_ts.max()))
        batch = Batch(ns, users, sessions.items, as_of, models, now=now)
        # Items are read from Redis when a stage needs them; what later stages will need goes
        # along with that read (one round trip): the recent clicks (content similarity) and
        # each source's candidates (features).
        self.items.prefetch(np.concatenate([h[-CONTENT_RECENT:] for h in sessions.items] or [np.zeros(0, np.int64)]))
        t = self._lap("sessions", t)

        # candidates: every source over the whole batch, merged in the sources' order
        found = []
        for name, src in self.sources.items():
            got = src.retrieve(batch, self.limits[name])
            found.append(got)
            if got:
                self.items.prefetch(np.concatenate([r.rows for r in got]))
            t = self._lap(name, t)
        limits = [cfg.candidates + (self.limits[n] if n == "explore" else 0) for n in self.sources]  # exploration always fits
        cands = Candidates.merge(found, limits, len(requests))
        t = self._lap("merge", t)
        X = self._features(cands, batch, sessions, models)
        t = self._lap("features", t)
        scores, order = self._rank(X, cands, models)  # records "coarse" and "ranker"
        t = time.perf_counter()
        full_order = self._full_order(X, cands, models, order) if self.keep_unpruned else None

        ids = self.items.ids
        explore = list(self.sources).index("explore") if "explore" in self.sources else None
        exp = self.settings.experiment
        t_scores = t_order = None
        if exp.mode != "off" and models.treatment is not None and len(X):
            t_scores = models.treatment.score(X)
            t_order = np.lexsort((-t_scores, cands.user))
        out: list[Served] = []
        now_ms = int(time.time() * 1000)
        for i, r in enumerate(requests):
            lo, hi = int(cands.bounds[i]), int(cands.bounds[i + 1])
            rows = cands.rows[lo:hi]
            o = order[lo:hi] - lo  # this user's candidates, best first
            s = scores[lo:hi]
            # one generator per list, seeded from the engine's: the same list (without the coarse
            # cut, for evaluation) can be chosen again with the same draws
            list_seed = int(self.rng.integers(2**63))
            arm = assign_arm(r.user, exp.salt, exp.share) if t_order is not None and r.user is not None else None
            if arm == "treatment" and exp.mode == "ab":  # the treatment ranker serves this user alone
                o, s = t_order[lo:hi] - lo, t_scores[lo:hi]
            rival = t_order[lo:hi] - lo if arm is not None and exp.mode == "interleave" else None
            slate = self._slate(o, s, cands, explore, lo, hi, models, list_seed, rival)
            picks = slate.picks
            logged = o[: cfg.log_top]
            has = cands.has[:, lo:hi]
            unpruned: list[str] = []
            if full_order is not None:
                again = self._slate(full_order[lo:hi] - lo, s, cands, explore, lo, hi, models, list_seed)
                unpruned = ids[rows[again.picks]].tolist()
            slot_scores = s[picks]
            label = models.label
            if arm is not None:  # the experiment's lists name the treatment; each slot has its ranker's score
                assert models.treatment is not None and t_scores is not None
                label += f";treatment={models.treatment.version}"
                if slate.teams:
                    b = np.array([t == "b" for t in slate.teams])
                    slot_scores = np.where(b, t_scores[lo:hi][picks], slot_scores)
            out.append(Served(
                user=r.user, request_id=uuid.uuid4().hex, items=ids[rows[picks]].tolist(),
                scores=slot_scores.tolist(),
                sources=["+".join(src for k, src in enumerate(self.sources) if has[k, j]) for j in picks.tolist()],
                as_of=int(as_of[i]), computed_at=now_ms, version=r.version, model=label,
                candidates=ids[rows[logged]].tolist(), features=X[lo:hi][logged], publish_ms=r.publish_ms,
                by_source=self._by_source(cands, lo, hi) if self.keep_sources else {},
                tie_ids=sessions.tie_ids[i], unpruned=unpruned,
                kinds=slate.kinds, propensities=slate.propensities, decision=slate.decision,
                slot_features=X[lo:hi][picks], policy=self.policy.name,
                via=self._via(rows[picks], has[:, picks], batch, i, models) if self.explain else [],
                teams=slate.teams, arm=arm or "",
            ))
        self._lap("lists", t)
        return out

    def _slate(self, order: np.ndarray, scores: np.ndarray, cands: Candidates, explore: int | None,
               lo: int, hi: int, models: ModelSet, seed: int, rival: np.ndarray | None = None) -> Slate:
        """The served list (positions within the user's candidates) and how each slot was
        filled: the best ``k - explore_slots`` by ``order`` (re-ranked for diversity when
        ``serving.diversity`` > 0), then the exploration slots, then the next best if short.

        Exploration slots: first the newest candidate nobody has seen or clicked (cold start:
        every new item gets shown; propensity 1, the rule is deterministic), then the policy's
        picks among the list's other exploration candidates not already placed (the action
        set), each with its propensity, drawn from a generator seeded with ``seed``.

        ``rival`` (an interleaving experiment): the ranked slots are a team-draft of ``order``
        (control, team "a") and ``rival`` (the treatment's order, team "b"), each slot with its
        team and its probability given the earlier slots (0.5 where a coin decided)."""
        cfg = self.cfg
        k = cfg.k
        n_main = max(k - cfg.explore_slots, 0)
        teams: list[str] = []
        if rival is not None:
            a, b = [str(j) for j in order[:n_main].tolist()], [str(j) for j in rival[:n_main].tolist()]
            drafted, teams = team_draft(a, b, n_main, np.random.default_rng(seed + 1))
            main = np.array([int(j) for j in drafted], dtype=np.int64)
            props = draft_propensities(a, b, drafted, teams)
        else:
            main = (self._diversify(order, scores, cands.rows[lo:hi], n_main, models) if cfg.diversity > 0
                    else order[:n_main])
            props = [1.0] * len(main)
        parts = [main]
        kinds = ["rank"] * len(main)
        decision = None
        placed = np.zeros(hi - lo, dtype=bool)
        placed[main] = True
        if explore is not None and k > len(main):
            mine = np.flatnonzero(cands.has[explore, lo:hi] & ~placed)
            mine = mine[np.argsort(-cands.score[explore, lo:hi][mine], kind="stable")]  # the source's order
            rows = cands.rows[lo:hi]
            unseen = mine[self.items.no_evidence(rows[mine])]
            if len(unseen):
                newest = unseen[int(np.argmax(self.items.created[rows[unseen]]))]
                parts.append(np.array([newest]))
                kinds.append("cold")
                props.append(1.0)
                mine = mine[mine != newest]
            left = k - len(kinds)
            if left > 0 and len(mine):
                assert cands.alpha is not None and cands.beta is not None
                alpha, beta = cands.alpha[lo:hi][mine], cands.beta[lo:hi][mine]
                chosen = self.policy.choose(alpha, beta, left, np.random.default_rng(seed))
                first = len(kinds)
                parts.append(mine[chosen.index])
                kinds += ["explore"] * len(chosen.index)
                props += chosen.propensity.tolist()
                decision = Decision(
                    items=self.items.ids[rows[mine]].tolist(), alpha=alpha.tolist(), beta=beta.tolist(),
                    picks=chosen.index.tolist(), slots=list(range(first, first + len(chosen.index))),
                    propensities=chosen.propensity.tolist())
        picks = np.concatenate(parts).astype(np.int64)
        if len(picks) < k:
            placed[picks] = True
            fill = order[~placed[order]][: k - len(picks)]
            picks = np.concatenate([picks, fill]).astype(np.int64)
            kinds += ["fill"] * len(fill)
            props += [1.0] * len(fill)
        if teams:
            teams += [""] * (len(picks) - len(teams))
        return Slate(picks, kinds, props, decision, teams)

    def _diversify(self, order: np.ndarray, scores: np.ndarray, rows: np.ndarray, n: int,
                   models: ModelSet) -> np.ndarray:
        """The ranked slots re-ranked by maximal marginal relevance (``models.diversity``) over
        the best ``max(4 n, 50)`` candidates."""
        top = order[: max(4 * n, 50)]
        if len(top) <= 1 or n <= 0:
            return order[:n]
        cand_rows = rows[top]
        if self.cfg.diversity_by == "vectors" and models.index is not None:
            where = self.reads.index_rows(models.index).index_of(cand_rows)
            known = where >= 0
            vectors = np.zeros((len(top), models.index.index.d), np.float32)
            if known.any():
                vectors[known] = models.index.index.reconstruct_batch(where[known])
            sim = cosine_matrix(vectors, known)
        else:
            sim = jaccard_matrix(self.items.tokens[cand_rows], NO_TOKEN)
        return top[mmr(scores[top], sim, n, self.cfg.diversity)]

    def _via(self, rows: np.ndarray, has: np.ndarray, batch: Batch, i: int, models: ModelSet) -> list[dict[str, str]]:
        """Per served item, the session item that brought it: for ``cf``, the recent click
        contributing most to its CF score (similarity / (1 + age), the cf source's blend); for
        ``seq``, the recent click whose item vector is closest to the item's (inner product)."""
        out: list[dict[str, str]] = [{} for _ in range(len(rows))]
        recent = batch.histories[i][-self.cfg.recent :][::-1]  # newest first
        if not len(recent):
            return out
        ids = self.items.ids
        names = list(self.sources)
        if "cf" in names and has[names.index("cf")].any():
            nbrs = self.reads.neighbours.get(list(dict.fromkeys(recent.tolist())), max(50, self.limits["cf"] // 2),
                                             batch.ns, batch.now)
            got = [(nbrs[a], age, a) for age, a in enumerate(recent.tolist()) if a in nbrs]
            if got:
                n_rows = np.concatenate([g[0][0] for g in got])
                weight = np.concatenate([g[0][1] / (1.0 + g[1]) for g in got])
                source = np.concatenate([np.full(len(g[0][0]), g[2], dtype=np.int64) for g in got])
                order = np.argsort(-weight, kind="stable")  # the strongest contribution first
                first, at = np.unique(n_rows[order], return_index=True)
                where = np.searchsorted(first, rows)
                found = (where < len(first)) & (first[np.minimum(where, len(first) - 1)] == rows) & has[names.index("cf")]
                for slot in np.flatnonzero(found).tolist():
                    out[slot]["cf"] = str(ids[source[order[at[where[slot]]]]])
        if "seq" in names and models.index is not None and has[names.index("seq")].any():
            index_rows = self.reads.index_rows(models.index)
            w_items, w_recent = index_rows.index_of(rows), index_rows.index_of(recent)
            slots = np.flatnonzero(has[names.index("seq")] & (w_items >= 0))
            if (w_recent >= 0).any() and len(slots):
                rv = models.index.index.reconstruct_batch(w_recent[w_recent >= 0])
                iv = models.index.index.reconstruct_batch(w_items[slots])
                nearest = ids[recent[w_recent >= 0][np.argmax(iv @ rv.T, axis=1)]]
                for slot, item in zip(slots.tolist(), nearest.tolist()):
                    out[slot]["seq"] = str(item)
        return out

    def _by_source(self, cands: Candidates, lo: int, hi: int) -> dict[str, list[str]]:
        out = {}
        for s, name in enumerate(self.sources):
            mine = np.flatnonzero(cands.has[s, lo:hi])
            mine = mine[np.argsort(cands.rank[s, lo:hi][mine], kind="stable")]
            out[name] = self.items.ids[cands.rows[lo:hi][mine]].tolist()
        return out

    # -- ranking ----------------------------------------------------------------------------

    def _rank(self, X: np.ndarray, cands: Candidates, models: ModelSet) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N,) and the batch's order (N,): user by user, best first (ties: merge order).

        With a coarse stage, each user's candidates beyond the best ``coarse_candidates`` by the
        head's sums (exploration candidates excepted) are not scored further: they follow the
        kept ones, in the head's order, and keep the head's sums as scores."""
        cfg = self.cfg
        keep = max(cfg.coarse_candidates, cfg.k)
        stages = models.ranker.staged(cfg.coarse_trees) if cfg.coarse_candidates > 0 else None
        sizes = np.diff(cands.bounds)
        t = time.perf_counter()
        if stages is None or not len(sizes) or sizes.max() <= keep:
            scores = models.ranker.score(X) if len(X) else np.zeros(0)
            order = np.lexsort((-scores, cands.user))
            self._lap("ranker", t)
            return scores, order
        X = check_features(X, "Engine coarse stage")
        head = stages.coarse(X)
        by_head = np.lexsort((-head, cands.user))
        place = np.empty(len(head), dtype=np.int64)  # each candidate's rank in its user's list by the head
        place[by_head] = np.arange(len(head)) - cands.bounds[cands.user[by_head]]
        kept = place < keep
        if "explore" in self.sources:
            kept |= cands.has[list(self.sources).index("explore")]
        t = self._lap("coarse", t)
        scores = head.copy()
        scores[kept] = stages.finish(X[kept], head[kept])
        order = np.lexsort((-scores, ~kept, cands.user))
        self._lap("ranker", t)
        return scores, order

    def _full_order(self, X: np.ndarray, cands: Candidates, models: ModelSet, order: np.ndarray) -> np.ndarray:
        """The batch's order by the full ranker over every candidate (no coarse cut)."""
        if models.ranker.staged(self.cfg.coarse_trees) is None or self.cfg.coarse_candidates <= 0 or not len(X):
            return order
        return np.lexsort((-models.ranker.score(X), cands.user))

    # -- features ---------------------------------------------------------------------------

    def _features(self, cands: Candidates, batch: Batch, sessions: Sessions, models: ModelSet) -> np.ndarray:
        """(N, len(FEATURES)) float64: one row per candidate of the batch."""
        N = len(cands.rows)
        X = np.zeros((N, len(FEATURES)))
        if N == 0:
            return X
        table, reads = self.items, self.reads
        rows, user = cands.rows, cands.user
        table.ensure(rows, batch.ns, batch.now)
        where = {name: s for s, name in enumerate(self.sources)}
        for name in RANKED_SOURCES:
            if name in where:
                X[:, COL[f"{name}_rank"]] = cands.rank[where[name]]
            else:
                X[:, COL[f"{name}_rank"]] = ABSENT_RANK
        for name in ("mf", "users", "tower"):  # their own scores (0: not proposed)
            if name in where:
                X[:, COL[f"{name}_score"]] = cands.score[where[name]]
        cf_score = cands.score[where["cf"]] if "cf" in where else np.zeros(N)
        X[:, COL["cf_score"]] = cf_score
        if "explore" in where:
            X[:, COL["explore_draw"]] = cands.score[where["explore"]]
        X[:, COL["n_sources"]] = cands.has.sum(axis=0)
        queries = batch.embeddings
        if queries is not None and models.index is not None:
            X[:, COL["seq_score"]] = self._dots(models.index, rows, cands.bounds, queries)
        at = batch.as_of[user]  # (N,) ms: each candidate's list is computed at its user's time
        alpha, beta = beta_posterior(table.examined[rows], table.clicks[rows], at, self.state.bandit)
        cands.alpha, cands.beta = alpha, beta
        X[:, COL["post_mean"]], X[:, COL["post_std"]] = beta_moments(alpha, beta)
        X[:, COL["popularity"]] = np.log1p(value_at(table.n[rows], at, self.h_n))
        X[:, COL["trend_score"]] = np.log1p(value_at(reads.trending_score(rows, batch.ns), at, self.h_trend))
        created = table.created[rows]
        X[:, COL["item_age_h"]] = np.where(np.isnan(created), -1.0, (at - created) / 3.6e6)
        recent = [h[-CONTENT_RECENT:] for h in batch.histories]
        if any(len(r) for r in recent):
            table.ensure(np.concatenate(recent), batch.ns, batch.now)
        session_tokens = [table.tokens[r][table.tokens[r] >= 0] for r in recent]
        X[:, COL["content_sim"]] = content_similarities(table.tokens[rows], table.n_tokens[rows], user, session_tokens)
        # Per-list relative scores: magnitudes differ from user to user (how many recent clicks,
        # how strong their co-occurrences, the session embedding's norm); the ranker compares
        # candidates within one list, so it also sees each score against the list's best.
        cf_max = _segment_max(cf_score, cands.bounds)[user]
        X[:, COL["cf_rel"]] = np.divide(cf_score, cf_max, out=np.zeros(N), where=cf_max > 0)
        seq = X[:, COL["seq_score"]]
        # -1 for a list without a session embedding (no sequence model, or no clicks yet)
        embedded = np.array([queries is not None and len(h) > 0 for h in batch.histories])
        X[:, COL["seq_rel"]] = np.where(embedded[user], seq - _segment_max(seq, cands.bounds)[user], -1.0)
        pop = X[:, COL["popularity"]]
        pop_max = _segment_max(pop, cands.bounds)[user]
        X[:, COL["pop_rel"]] = np.divide(pop, pop_max, out=np.zeros(N), where=pop_max > 0)
        lengths = np.array([len(h) for h in batch.histories], dtype=np.int64)
        gap = np.where(lengths >= 2, (sessions.last_ts - sessions.prev_ts) / 1000.0, -1.0)  # between the last two clicks, s
        X[:, COL["session_len"]] = lengths[user]
        X[:, COL["since_last_s"]] = gap[user]
        X[:, COL["user_clicks"]] = sessions.clicks[user]
        return X

    def _dots(self, index: VectorIndex, rows: np.ndarray, bounds: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Inner product of each candidate's item vector with its user's session embedding
        (0 for items the index does not hold). (N,) float32"""
        where = self.reads.index_rows(index).index_of(rows)
        known = where >= 0
        out = np.zeros(len(rows), np.float32)
        if not known.any():
            return out
        vectors = index.index.reconstruct_batch(where[known])  # (K, D) float32, in candidate order
        k_bounds = np.concatenate([[0], np.cumsum(known)])[bounds]  # each user's slice of ``vectors``
        dots = np.empty(len(vectors), np.float32)
        for i in range(len(bounds) - 1):
            a, b = k_bounds[i], k_bounds[i + 1]
            if b > a:
                dots[a:b] = vectors[a:b] @ queries[i]
        out[known] = dots
        return out


__all__ = ["Candidates", "Decision", "Engine", "ModelSet", "Request", "Served", "Slate"]
