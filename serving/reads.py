"""What a serving worker reads from Redis for many users at once, cached briefly.

* ``ItemCache``: item statistics (log2 sums: clicks, examinations, bandit clicks) reused for
  ``serving.stats_ttl_s`` (hot items are in many users' candidate lists), and catalog content
  (created_at, tokens) for ``meta_ttl_s`` or until the item is announced again.
* ``SharedReads``: the trending list and the exploration pool, read once per ``stats_ttl_s``
  for every user of every batch, plus the item cache.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import ServingSettings
from streamrec.models.content import tokens


@dataclass
class ItemRow:
    """One item as serving sees it."""

    n: float  # log2 decayed clicks (CF and popularity)
    examined: float  # log2 decayed examinations (bandit)
    clicks: float  # log2 decayed joined clicks (bandit)
    created_at: int | None
    tokens: frozenset[str]
    expires: float
    token_ids: np.ndarray  # ids of ``tokens`` in the cache's token vocabulary (int64)

    @property
    def created(self) -> float:
        return float(self.created_at) if self.created_at is not None else math.nan


class ItemCache:
    """Item statistics and content read from Redis, reused for a while."""

    def __init__(self, recstore: RecStore, ttl_s: float, meta_ttl_s: float = 300.0,
                 max_items: int = 500_000) -> None:
        self.recstore = recstore
        self.ttl_s = ttl_s
        self.meta_ttl_s = meta_ttl_s
        self.max_items = max_items
        self._data: dict[str, ItemRow] = {}
        self._meta: dict[str, tuple[float, int | None, frozenset[str], np.ndarray]] = {}
        self.token_index: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    def get(self, items: Sequence[str], ns: Namespace) -> dict[str, ItemRow]:
        """A mapping that holds at least ``items`` (fresh enough)."""
        now = time.monotonic()
        data = self._data
        missing = [i for i in dict.fromkeys(items) if (row := data.get(i)) is None or row.expires < now]
        self.misses += len(missing)
        self.hits += len(items) - len(missing)
        if missing:
            if len(data) + len(missing) > self.max_items:
                self.clear()
                data = self._data
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
                data[item] = ItemRow(n, e, c, m[1], m[2], expires, m[3])
        return data

    def peek(self, item: str) -> ItemRow | None:
        """The cached row, if any, without reading Redis."""
        return self._data.get(item)

    def forget(self, items: Sequence[str]) -> None:
        for item in items:
            self._data.pop(item, None)
            self._meta.pop(item, None)

    def clear(self) -> None:
        self._data.clear()
        self._meta.clear()
        self.token_index.clear()


class SharedReads:
    """Reads every user of a batch shares: the trending list, the exploration pool, items."""

    def __init__(self, recstore: RecStore, cfg: ServingSettings, seed: int = 0) -> None:
        self.recstore = recstore
        self.cfg = cfg
        self.items = ItemCache(recstore, cfg.stats_ttl_s)
        self.cold: list[str] = []  # catalog items announced while serving, newest last
        self._pyrng = random.Random(seed)
        self._trend: tuple[float, list[str], np.ndarray, dict[str, float]] = (-1.0, [], np.zeros(0), {})
        self._pool: tuple[float, list[str]] = (-1.0, [])

    def _until(self) -> float:
        return time.monotonic() + max(self.cfg.stats_ttl_s, 0.05)

    def _trend_read(self, ns: Namespace) -> tuple[list[str], np.ndarray, dict[str, float]]:
        if self._trend[0] < time.monotonic():
            top = self.recstore.trending_scores(max(self.cfg.trending_candidates * 5, 1000), ns)
            items = [i for i, _ in top]
            self._trend = (self._until(), items, np.fromiter((s for _, s in top), float, len(top)), dict(top))
        return self._trend[1], self._trend[2], self._trend[3]

    def trending(self, ns: Namespace) -> tuple[list[str], np.ndarray]:
        """The trending items, best first, with their log2 decayed click counts."""
        items, scores, _ = self._trend_read(ns)
        return items, scores

    def trending_score(self, ns: Namespace) -> dict[str, float]:
        """item -> log2 decayed click count, for the items of ``trending``."""
        return self._trend_read(ns)[2]

    def reset(self) -> None:
        """Forget everything read (the state was replaced: a restore)."""
        self.items.clear()
        self.cold.clear()
        self._trend = (-1.0, [], np.zeros(0), {})
        self._pool = (-1.0, [])

    def add_cold(self, items: Sequence[str]) -> None:
        """Items announced as new: they join the exploration pool at once."""
        for item in items:
            if item not in self.cold:
                self.cold.append(item)
        del self.cold[:-10_000]
        self._pool = (-1.0, [])

    def explore_pool(self, ns: Namespace) -> list[str]:
        """The newest catalog items (and those announced while serving), then a random
        sample of the trending ones, ``serving.explore_pool`` in all."""
        if self._pool[0] < time.monotonic():
            size = self.cfg.explore_pool
            newest = [i for i, _ in self.recstore.newest_items(size, ns)]
            listed = set(newest)
            newest += [i for i in reversed(self.cold) if i not in listed][: max(0, size - len(newest))]
            top = self.trending(ns)[0]
            sample = self._pyrng.sample(top, min(len(top), max(0, size - len(newest)))) if top else []
            self._pool = (self._until(), list(dict.fromkeys(newest + sample)))
        return self._pool[1]


__all__ = ["ItemCache", "ItemRow", "SharedReads"]
