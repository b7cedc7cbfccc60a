"""Nearest-neighbour search over item vectors (FAISS, inner product).

One contract, two implementations chosen by a factory (as ``implicit.ann`` does): exact search
(``IndexFlatIP``) for small catalogs, where it is both exact and fast enough, and HNSW
(``IndexHNSWFlat``) above ``exact_below`` items. Rows are addressed by position; ``items[i]``
is the id of row ``i``. Vectors added later (cold-start items) are appended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import faiss
import numpy as np

from streamrec.models.errors import ConfigError


@dataclass
class VectorIndex:
    """Item ids plus a FAISS index over their vectors (float32, one row per item)."""

    dim: int
    kind: str  # "exact" | "hnsw"
    index: faiss.Index
    items: list[str] = field(default_factory=list)
    _row: dict[str, int] = field(default_factory=dict, repr=False)
    _buf: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32), repr=False)  # (capacity, dim)

    def __post_init__(self) -> None:
        if self._buf.shape[1] != self.dim:
            self._buf = np.zeros((max(16, len(self.items)), self.dim), np.float32)
            if self.items:
                self._buf[: len(self.items)] = self.index.reconstruct_n(0, len(self.items))

    @classmethod
    def build(cls, items: Sequence[str], vectors: np.ndarray, *, exact_below: int = 20_000,
              hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128) -> "VectorIndex":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise ConfigError(f"vectors must be (len(items), dim), got {vectors.shape} for {len(items)} items")
        if len(set(items)) != len(items):
            raise ConfigError("item ids of an index must be unique")
        if not np.isfinite(vectors).all():
            raise ConfigError("item vectors contain NaN or infinity")
        dim = vectors.shape[1]
        if len(items) < exact_below:
            index: faiss.Index = faiss.IndexFlatIP(dim)
            kind = "exact"
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
            kind = "hnsw"
        out = cls(dim, kind, index)
        out.add(items, vectors)
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: str) -> bool:
        return item in self._row

    def add(self, items: Sequence[str], vectors: np.ndarray) -> int:
        """Append new items (ids already present are skipped). Returns how many were added."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(items), self.dim)
        keep, seen = [], set(self._row)
        for i, item in enumerate(items):
            if item not in seen:
                seen.add(item)
                keep.append(i)
        if not keep:
            return 0
        start = len(self.items)
        need = start + len(keep)
        if need > len(self._buf):
            grown = np.zeros((max(need, 2 * len(self._buf)), self.dim), np.float32)
            grown[:start] = self._buf[:start]
            self._buf = grown
        self._buf[start:need] = vectors[keep]
        for i in keep:
            self._row[items[i]] = len(self.items)
            self.items.append(items[i])
        self.index.add(vectors[keep])
        return len(keep)

    def vector(self, item: str) -> np.ndarray | None:
        row = self._row.get(item)
        return None if row is None else self._buf[row].copy()

    def rows(self, items: Sequence[str]) -> np.ndarray:
        """Row of each item, -1 where the index does not hold it. (n,) int64"""
        get = self._row.get
        return np.fromiter((get(i, -1) for i in items), dtype=np.int64, count=len(items))

    def dots(self, query: np.ndarray, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Inner products of one query (dim,) with the items' vectors: (scores (n,), known (n,) bool)."""
        rows = self.rows(items)
        known = rows >= 0
        scores = np.zeros(len(items), np.float32)
        if known.any():
            scores[known] = self._buf[rows[known]] @ query.astype(np.float32)
        return scores, known

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The k best items per query row: ids (B lists) and inner products (B, k).
        Rows with fewer than k results are shorter lists (scores padded with -inf)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # (B, dim)
        k = min(k, len(self.items))
        if k <= 0:
            return [[] for _ in range(len(queries))], np.zeros((len(queries), 0), np.float32)
        scores, rows = self.index.search(queries, k)  # (B, k) each
        ids = [[self.items[r] for r in row if r >= 0] for row in rows]
        return ids, np.where(rows >= 0, scores, -np.inf)

    def to_bytes(self) -> bytes:
        header = f"{self.kind}\n{self.dim}\n{len(self.items)}\n".encode()
        names = "\n".join(self.items).encode()
        blob = faiss.serialize_index(self.index).tobytes()
        return header + len(names).to_bytes(8, "big") + names + blob

    @classmethod
    def from_bytes(cls, data: bytes) -> "VectorIndex":
        kind, dim, n, rest = data.split(b"\n", 3)
        size = int.from_bytes(rest[:8], "big")
        names = rest[8 : 8 + size].decode()
        items = names.split("\n") if int(n) else []
        index = faiss.deserialize_index(np.frombuffer(rest[8 + size :], dtype=np.uint8))
        if index.ntotal != len(items):
            raise ConfigError(f"index holds {index.ntotal} vectors for {len(items)} item ids")
        return cls(int(dim), kind.decode(), index, items, {item: i for i, item in enumerate(items)})


__all__ = ["VectorIndex"]
