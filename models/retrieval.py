"""The trained retrievers besides the sequence model, as serving holds them: matrix
factorisation (its item index, and its users' index for user-user CF) and the two-tower model
(its item index, catalog items without clicks included from their content alone).

Pure computation: imports nothing outside ``models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from streamrec.models.index import VectorIndex
from streamrec.models.mf import MFModel
from streamrec.models.twotower import TowerModel


@dataclass
class RetrievalSet:
    mf: MFModel | None = None
    mf_items: VectorIndex | None = None  # item factors (inner product = the MF score)
    mf_users: VectorIndex | None = None  # the fitted users' unit vectors (cosine neighbours)
    tower: TowerModel | None = None
    tower_items: VectorIndex | None = None  # item tower vectors, unit norm
    version: str = ""

    @classmethod
    def build(cls, mf: MFModel | None, tower: TowerModel | None,
              catalog: Mapping[str, Iterable[str]] | None = None, *, exact_below: int = 20_000,
              version: str = "") -> "RetrievalSet":
        out = cls(mf=mf, tower=tower, version=version)
        if mf is not None:
            out.mf_items = VectorIndex.build(mf.items, mf.item_factors, exact_below=exact_below)
            norms = np.linalg.norm(mf.user_factors, axis=1)
            keep = np.flatnonzero(norms > 0)
            out.mf_users = VectorIndex.build([mf.users[i] for i in keep],
                                             mf.user_factors[keep] / norms[keep, None], exact_below=exact_below)
        if tower is not None:
            items = list(dict.fromkeys([*tower.items, *(catalog or {})]))
            tokens = [list((catalog or {}).get(i, tower.item_tokens.get(i, []))) for i in items]
            vectors = tower.item_vectors(items, tokens)
            keep = np.flatnonzero(np.abs(vectors).sum(axis=1) > 0)  # neither a trained id nor a known token: no vector
            out.tower_items = VectorIndex.build([items[i] for i in keep], vectors[keep], exact_below=exact_below)
        return out

    def add_cold(self, item: str, tokens: Iterable[str]) -> int:
        """A new catalog item: its two-tower vector from its content (1 if it was added)."""
        if self.tower is None or self.tower_items is None or item in self.tower_items:
            return 0
        vec = self.tower.item_vectors([item], [list(tokens)])
        if not np.abs(vec).sum():
            return 0
        return self.tower_items.add([item], vec)


__all__ = ["RetrievalSet"]
