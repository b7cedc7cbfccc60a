"""Content features of catalog items (title words and tags), for cold start.

An item nobody has clicked has no learned embedding. Its title and tags still say what it is:
``ContentModel`` learns, at training time, the mean learned vector of the items carrying each
token (IDF-weighted), so that a new item's vector is the weighted mean over its tokens. It goes
into the vector index and can be retrieved by the session embedding before its first click.
``content_similarity`` compares a candidate with the user's recent items by shared tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an and the of in on at to for with from by is it its".split())


def tokens(title: str, tags: Iterable[str] = (), category: str | None = None) -> frozenset[str]:
    """Lower-case title words (minus stop words and 1-char words; 4-digit years kept) and tags."""
    words = {w for w in _WORD.findall(title.lower()) if len(w) > 1 and w not in _STOP}
    out = {f"w:{w}" for w in words}
    out.update(f"t:{t.strip().lower()}" for t in tags if t.strip())
    if category:
        out.add(f"c:{category.lower()}")
    return frozenset(out)


def content_similarity(candidate: frozenset[str], session: Mapping[str, float]) -> float:
    """Cosine between a candidate's token set and the session's token weights (0 when either is empty)."""
    if not candidate or not session:
        return 0.0
    dot = sum(session.get(t, 0.0) for t in candidate)
    if dot == 0.0:
        return 0.0
    norm = math.sqrt(sum(w * w for w in session.values()))
    return dot / (math.sqrt(len(candidate)) * norm)


def content_similarities(candidates: Sequence[np.ndarray], session: Sequence[np.ndarray],
                         vocab_size: int) -> np.ndarray:
    """``content_similarity`` of many candidates at once, on token ids (each item's distinct
    tokens as an int array; ids below ``vocab_size``): one gather over the concatenated ids.
    (len(candidates),) float64."""
    n = len(candidates)
    out = np.zeros(n)
    weights = np.zeros(vocab_size)
    for ids in session:
        weights[ids] += 1.0
    norm = math.sqrt(float(weights @ weights))
    lens = np.array([len(x) for x in candidates], dtype=np.int64)
    nonempty = lens > 0
    if norm == 0.0 or not nonempty.any():
        return out
    flat = np.concatenate([x for x in candidates if len(x)])
    starts = np.concatenate([[0], np.cumsum(lens[nonempty])[:-1]])
    out[nonempty] = np.add.reduceat(weights[flat], starts) / (np.sqrt(lens[nonempty]) * norm)
    return out


def session_tokens(items_tokens: Sequence[frozenset[str]]) -> dict[str, float]:
    """Token weights of a session: how many of its recent items carry each token."""
    out: dict[str, float] = {}
    for toks in items_tokens:
        for t in toks:
            out[t] = out.get(t, 0.0) + 1.0
    return out


@dataclass
class ContentModel:
    """Token -> mean learned vector, and token document frequencies (for IDF)."""

    dim: int
    centroids: dict[str, np.ndarray] = field(default_factory=dict)  # token -> (dim,) float32
    idf: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, item_tokens: Mapping[str, frozenset[str]], vectors: Mapping[str, np.ndarray],
            dim: int, min_items: int = 2) -> "ContentModel":
        """Learn from the items that have both content and a learned vector."""
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        df: dict[str, int] = {}
        for item, toks in item_tokens.items():
            for t in toks:
                df[t] = df.get(t, 0) + 1
            vec = vectors.get(item)
            if vec is None:
                continue
            for t in toks:
                if t in sums:
                    sums[t] += vec
                else:
                    sums[t] = np.array(vec, dtype=np.float64)
                counts[t] = counts.get(t, 0) + 1
        n = max(len(item_tokens), 1)
        idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        centroids = {t: (s / counts[t]).astype(np.float32) for t, s in sums.items() if counts[t] >= min_items}
        return cls(dim, centroids, idf)

    def vector(self, toks: Iterable[str]) -> np.ndarray | None:
        """IDF-weighted mean of the known tokens' centroids; None when no token is known."""
        acc = np.zeros(self.dim, dtype=np.float64)
        total = 0.0
        for t in toks:
            c = self.centroids.get(t)
            if c is not None:
                w = self.idf.get(t, 1.0)
                acc += w * c
                total += w
        return None if total == 0.0 else (acc / total).astype(np.float32)

    def to_dict(self) -> dict:
        return {"dim": self.dim, "idf": self.idf,
                "centroids": {t: v.tolist() for t, v in self.centroids.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ContentModel":
        return cls(int(d["dim"]), {t: np.asarray(v, dtype=np.float32) for t, v in d["centroids"].items()},
                   {t: float(x) for t, x in d["idf"].items()})


__all__ = ["tokens", "content_similarity", "content_similarities", "session_tokens", "ContentModel"]
