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


def content_similarities(candidates: np.ndarray, n_tokens: np.ndarray, owner: np.ndarray,
                         sessions: Sequence[np.ndarray]) -> np.ndarray:
    """``content_similarity`` of the candidates of a whole batch of users at once, on token ids.

    candidates: (N, W) int, each candidate's distinct token ids, padded with negative values;
    n_tokens: (N,) how many each has; owner: (N,) int, the user (index into ``sessions``) each
    candidate is compared with; sessions[u]: the token ids of user u's recent items,
    concatenated (a token once per item that carries it). Returns (N,) float64, equal to the
    reference: the weights are integer counts, so every sum is exact.
    """
    N = len(owner)
    out = np.zeros(N)
    lens = np.array([len(s) for s in sessions], dtype=np.int64)
    if N == 0 or not lens.sum():
        return out
    # the batch's distinct session tokens, and each user's count of each: (B, V + 1), where
    # the last column stands for tokens in no session (weight 0)
    vocab, local = np.unique(np.concatenate(sessions), return_inverse=True)
    V = len(vocab)
    who = np.repeat(np.arange(len(sessions)), lens)
    weights = np.bincount(who * (V + 1) + local, minlength=len(sessions) * (V + 1)).astype(np.float64)
    weights = weights.reshape(len(sessions), V + 1)
    norm = np.sqrt((weights * weights).sum(axis=1))  # (B,)
    cands = np.asarray(candidates)
    col = np.minimum(np.searchsorted(vocab, cands), V - 1)  # (N, W)
    col = np.where((vocab[col] == cands) & (cands >= 0), col, V)
    dot = weights[np.asarray(owner)[:, None], col].sum(axis=1)  # (N,)
    denom = np.sqrt(np.asarray(n_tokens, dtype=np.float64)) * norm[owner]
    hit = (dot > 0) & (denom > 0)
    out[hit] = dot[hit] / denom[hit]
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
