"""Next-item losses for the sequence models: one home for each formula.

Every loss scores hidden states ``h`` [N, D] (one per position that has a target) against
item vectors (rows of the shared item table ``E`` [n_items + 1, D], row 0 padding) and
returns the mean over the N positions:

* ``bce``: SASRec's binary cross-entropy on the positive and one sampled negative per
  position, ``softplus(-s+) + softplus(s-)`` (Kang & McAuley 2018).
* ``ce``: full softmax cross-entropy over the whole catalog (BERT4Rec's loss; for SASRec,
  Klenitskiy & Vasilev 2023), ``logsumexp_j s_j - s+`` with the padding row excluded.
* ``sampled``: sampled softmax over the positive and K negatives shared by the batch, drawn
  from a proposal ``q`` (the items' click frequency: popular items are the hard negatives of
  a large catalog), each logit corrected by ``-log(K q_i)`` (logQ correction, Yi et al. 2019;
  Bengio & Senecal 2008) so the softmax estimates the full one; a negative equal to the
  position's positive is masked out (an accidental hit is not a negative).
* ``gbce``: gSASRec's generalised BCE (Petrov & Macdonald 2023) on the positive and K
  uniform negatives per sequence (shared by the sequence's positions; gSASRec draws them per
  position, an [N, K, D] gather that two cores cannot afford at N = 25,000 positions per
  batch; each position still sees K uniform negatives, which is what beta is derived for):
  ``beta * softplus(-s+) + sum_k softplus(s_k)``
  with ``alpha = K / (n_items - 1)`` and ``beta = alpha * (t * (1 - 1/alpha) + 1/alpha)``;
  ``t`` is the calibration parameter (t = 0: beta = 1, plain BCE with K negatives; t = 1:
  beta = alpha, the fully calibrated case).

Pure computation (torch, numpy): imports nothing outside ``models``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from streamrec.models.errors import ConfigError

LossKind = Literal["bce", "ce", "sampled", "gbce"]
LOSSES: tuple[str, ...] = ("bce", "ce", "sampled", "gbce")


@dataclass(frozen=True)
class LossConfig:
    kind: str = "bce"
    negatives: int = 256  # K: gbce's per position, sampled's per batch (bce always draws 1)
    gbce_t: float = 0.75  # gSASRec's calibration parameter t in [0, 1]

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}; got {self.kind!r}")
        if not isinstance(self.negatives, int) or isinstance(self.negatives, bool) or self.negatives < 1:
            raise ConfigError(f"LossConfig.negatives must be an integer >= 1, got {self.negatives!r}")
        if not 0.0 <= float(self.gbce_t) <= 1.0:
            raise ConfigError(f"LossConfig.gbce_t must be in [0, 1], got {self.gbce_t!r}")


def gbce_beta(negatives: int, n_items: int, t: float) -> float:
    """gSASRec's beta for K = ``negatives`` uniform negatives out of ``n_items`` items."""
    alpha = negatives / max(n_items - 1, 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def bce(h: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """h [N, D]; pos, neg [N] item indices -> mean of softplus(-s+) + softplus(s-)."""
    s_pos = (h * table[pos]).sum(-1)  # [N]
    s_neg = (h * table[neg]).sum(-1)  # [N]
    return (F.softplus(-s_pos) + F.softplus(s_neg)).mean()


def ce(h: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """h [N, D]; pos [N] -> mean full-catalog softmax cross-entropy (padding row excluded)."""
    logits = h @ table[1:].T  # [N, n_items]: column j is item j + 1
    return F.cross_entropy(logits, pos - 1)


def sampled(h: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
            log_q: torch.Tensor) -> torch.Tensor:
    """h [N, D]; pos [N]; neg [K] shared negatives; log_q [n_items + 1] log proposal
    probabilities -> mean sampled-softmax cross-entropy with logQ correction."""
    k = neg.shape[0]
    s_pos = (h * table[pos]).sum(-1, keepdim=True) - (math.log(k) + log_q[pos]).unsqueeze(-1)  # [N, 1]
    s_neg = h @ table[neg].T - (math.log(k) + log_q[neg])  # [N, K]
    s_neg = s_neg.masked_fill(neg.unsqueeze(0) == pos.unsqueeze(-1), float("-inf"))  # accidental hits
    logits = torch.cat([s_pos, s_neg], dim=1)  # [N, 1 + K]
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=h.device))


def gbce(h: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
         beta: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """h [N, D]; pos [N]; neg [K] uniform negatives shared by the batch, or [U, K] one set per
    sequence with ``rows`` [N] (position n's set: ``neg[rows[n]]``) -> mean of
    beta * softplus(-s+) + sum_k softplus(s_k) (a negative equal to the positive is masked out)."""
    s_pos = (h * table[pos]).sum(-1)  # [N]
    if neg.ndim == 1:
        s_neg = h @ table[neg].T  # [N, K]
        hit = neg.unsqueeze(0) == pos.unsqueeze(-1)
    else:
        assert rows is not None, "per-sequence negatives need each position's row"
        s_neg = grouped_scores(h, table[neg], rows)  # [N, K]
        hit = neg[rows] == pos.unsqueeze(-1)
    neg_term = F.softplus(s_neg).masked_fill(hit, 0.0).sum(-1)  # [N]
    return (beta * F.softplus(-s_pos) + neg_term).mean()


def grouped_scores(h: torch.Tensor, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [N, D], vectors [U, K, D], rows [N] in 0..U-1 -> [N, K]: h[n] . vectors[rows[n], k].

    One batched product over the positions laid out per row ([U, longest, D]) instead of an
    [N, K, D] gather (K times the memory of h)."""
    U, N = vectors.shape[0], h.shape[0]
    counts = torch.bincount(rows, minlength=U)
    order = torch.argsort(rows, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(N) - starts[rows[order]]  # each position's place within its row
    laid = h.new_zeros(U, int(counts.max()), h.shape[1]).index_put((rows, rank), h)  # [U, longest, D]
    return torch.bmm(laid, vectors.transpose(1, 2))[rows, rank]  # [N, K]


class NegativeSampler:
    """The negatives each loss draws: one per position uniform over items 1..n outside the
    user's own items (bce); K per batch, uniform (gbce) or from the click-frequency proposal
    (sampled, whose log-probabilities ``log_q`` the loss corrects by)."""

    def __init__(self, n_items: int, counts: np.ndarray, rng: np.random.Generator) -> None:
        self.n = n_items
        self.rng = rng
        freq = np.asarray(counts, dtype=np.float64)[1:] + 1.0  # [n]; +1: every item can be drawn
        self.q = freq / freq.sum()
        log_q = np.zeros(n_items + 1, dtype=np.float32)
        log_q[1:] = np.log(self.q)
        self.log_q = torch.from_numpy(log_q)

    def uniform(self, shape: tuple[int, ...], seen: np.ndarray | None = None) -> np.ndarray:
        """Indices in 1..n; with ``seen`` (sorted unique indices) redrawn until outside it."""
        out = self.rng.integers(1, self.n + 1, size=shape)
        if seen is None or len(seen) >= self.n:
            return out
        bad = np.isin(out, seen)
        while bad.any():
            out[bad] = self.rng.integers(1, self.n + 1, size=int(bad.sum()))
            bad = np.isin(out, seen)
        return out

    def shared(self, k: int) -> np.ndarray:
        """K indices in 1..n drawn from the proposal q (with replacement)."""
        return self.rng.choice(self.n, size=k, p=self.q) + 1


__all__ = ["LOSSES", "LossConfig", "LossKind", "NegativeSampler", "bce", "ce", "gbce", "gbce_beta", "grouped_scores",
           "sampled"]
