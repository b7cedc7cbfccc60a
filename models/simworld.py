"""The closed-loop simulator's world (``streamrec simulate``): synthetic users and items with
latent vectors, and clicks drawn from position-biased examination times attraction.

* Items: a latent vector ``v`` near one of ``categories`` centres (its category, which is
  also its catalog category and tag), a quality offset, and a creation time; new items arrive
  every window (cold start).
* Users: a latent taste ``u`` (unit vector) that drifts a little every window (``drift``: a
  Gaussian step, renormalised), and turns around (``u -> -u``, and every item's quality
  with it) at the end of window ``shift_at``: a sudden change the drift detector should notice.
* Clicks (the position-based model): a user examines position ``p`` with probability
  ``1 / (1 + p) ** eta`` and clicks an examined item with its attraction
  ``sigmoid(base + scale * u.v + quality)``; the two draws are independent.
* The oracle slate: the ``k`` most attractive items the user has not clicked, best first
  (examination falls with position, so this order maximises expected clicks). Regret is its
  expected clicks minus the served list's, both from the true probabilities (no sampling noise).

Pure and seeded: the population, the arrivals, the taste drift and which user asks when come
from their own generators, so every policy compared faces the same users and items; only the
clicks (a separate generator) depend on what was served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.models.events import Item


@dataclass(frozen=True)
class WorldConfig:
    users: int = 400
    items: int = 300  # catalog at the start
    new_items: int = 8  # arriving per window
    dim: int = 8
    categories: int = 8
    spread: float = 0.5  # item vectors: category centre + spread * noise
    base: float = -3.0  # attraction logit offset (a ~5% base rate)
    scale: float = 3.0  # attraction logit per unit of u.v
    quality_sd: float = 0.5
    eta: float = 1.0  # true examination exponent
    drift: float = 0.05  # per window taste step
    shift_at: int = -1  # window at which every taste jumps (-1: never)
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class World:
    def __init__(self, cfg: WorldConfig, start_ms: int) -> None:
        self.cfg = cfg
        root = np.random.SeedSequence(cfg.seed)
        self._pop, self._arrive, self._drift, self._ask, click = (np.random.default_rng(s) for s in root.spawn(5))
        self.click_rng = click
        self.centres = _unit(self._pop.normal(size=(cfg.categories, cfg.dim)))
        self.tastes = _unit(self._pop.normal(size=(cfg.users, cfg.dim)) + 0.8 * self.centres[
            self._pop.integers(cfg.categories, size=cfg.users)])
        self.vectors = np.zeros((0, cfg.dim))
        self.quality = np.zeros(0)
        self.category = np.zeros(0, dtype=np.int64)
        self.created = np.zeros(0, dtype=np.int64)
        self.clicked: list[set[int]] = [set() for _ in range(cfg.users)]
        self.add_items(cfg.items, start_ms - 30 * 86_400_000, self._pop)  # the catalog before the run

    # -- the population over time -------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return len(self.vectors)

    @staticmethod
    def item_id(i: int) -> str:
        return f"s{i:05d}"

    @staticmethod
    def user_id(u: int) -> str:
        return f"u{u:04d}"

    def add_items(self, n: int, at_ms: int, rng: np.random.Generator | None = None) -> list[Item]:
        rng = rng or self._arrive
        cfg = self.cfg
        cat = rng.integers(cfg.categories, size=n)
        vec = _unit(self.centres[cat] + cfg.spread * rng.normal(size=(n, cfg.dim)))
        first = self.n_items
        self.vectors = np.concatenate([self.vectors, vec])
        self.quality = np.concatenate([self.quality, cfg.quality_sd * rng.normal(size=n)])
        self.category = np.concatenate([self.category, cat])
        self.created = np.concatenate([self.created, np.full(n, at_ms, dtype=np.int64)])
        return [Item(id=f"item-{first + j}", timestamp=at_ms, item=self.item_id(first + j),
                     title=f"item {first + j}", category=f"c{int(cat[j])}", tags=[f"c{int(cat[j])}"],
                     created_at=at_ms) for j in range(n)]

    def arrivals(self, at_ms: int) -> list[Item]:
        return self.add_items(self.cfg.new_items, at_ms)

    def step(self, window: int) -> None:
        """Tastes move at the end of a window (and jump at ``shift_at``)."""
        cfg = self.cfg
        if window == cfg.shift_at:  # every taste turns around, and so does item quality
            self.tastes = -self.tastes
            self.quality = -self.quality
        elif cfg.drift > 0:
            self.tastes = _unit(self.tastes + cfg.drift * self._drift.normal(size=self.tastes.shape))

    def askers(self, n: int) -> np.ndarray:
        """The users who ask for a list next (with replacement)."""
        return self._ask.integers(self.cfg.users, size=n)

    # -- clicks -------------------------------------------------------------------------------

    def attraction(self, user: int, items: np.ndarray) -> np.ndarray:
        z = self.cfg.base + self.cfg.scale * (self.vectors[items] @ self.tastes[user]) + self.quality[items]
        return 1.0 / (1.0 + np.exp(-z))

    def examination(self, n: int) -> np.ndarray:
        return (1.0 + np.arange(n)) ** -self.cfg.eta

    def value(self, user: int, items: np.ndarray) -> float:
        """Expected clicks of a list shown to ``user``."""
        return float((self.examination(len(items)) * self.attraction(user, items)).sum()) if len(items) else 0.0

    def oracle_value(self, user: int, k: int) -> float:
        open_items = np.setdiff1d(np.arange(self.n_items), np.fromiter(self.clicked[user], np.int64))
        best = np.sort(self.attraction(user, open_items))[::-1][:k]
        return float((self.examination(len(best)) * best).sum())

    def clicks(self, user: int, items: np.ndarray) -> np.ndarray:
        """Which positions of a shown list the user clicks (bool per position)."""
        rng = self.click_rng
        examined = rng.random(len(items)) < self.examination(len(items))
        hit = examined & (rng.random(len(items)) < self.attraction(user, items))
        for i in items[hit].tolist():
            self.clicked[user].add(i)
        return hit


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0: equal exposure, near 1: one item gets all)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float((2.0 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def concentration(categories: np.ndarray) -> float:
    """Herfindahl index of the categories in a set of recommendations: the sum of squared
    category shares (1 / categories when spread evenly, 1 when all alike)."""
    if not len(categories):
        return 0.0
    _, counts = np.unique(categories, return_counts=True)
    share = counts / counts.sum()
    return float((share**2).sum())


__all__ = ["WorldConfig", "World", "gini", "concentration"]
