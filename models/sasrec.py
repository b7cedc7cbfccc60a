"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

Follows pmixer/SASRec.pytorch: scaled item embedding plus a learned positional embedding,
blocks of [LayerNorm(query) -> causal attention -> residual from the normalised query;
LayerNorm -> point-wise feed-forward -> residual; re-mask], a final LayerNorm, and logits
that are dot products with the (shared) item embedding. Trained with the paper's binary
cross-entropy on one positive and one sampled negative per position (``forward``); the
training loop (``models.seqtrain``) also trains it with the other losses of
``models.seqloss`` on ``hidden``.

Sequences are LEFT-padded with item 0. Two choices make the output independent of how much
padding there is, so inference can feed a sequence at its own length, without padding to
``max_len``:

* positions are counted from the end (the newest item has position 1, padding position 0);
  training always reads the newest ``max_len`` items, so this is a relabelling of the
  paper's absolute positions, not a different model;
* padding positions are masked out as attention keys (pmixer lets them in), so a real item
  never attends to padding. A padding query attends to itself only, so no softmax row is
  empty; its output is zeroed by the timeline mask anyway.

The training loop, vocabulary and evaluation live in ``models.seqtrain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from streamrec.models.errors import ConfigError


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int  # catalog size; item indices are 1..n_items, 0 is padding
    max_len: int = 200  # longest input sequence (the newest max_len items are kept)
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2

    def __post_init__(self) -> None:
        for name in ("n_items", "max_len", "dim", "n_blocks", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SASRecConfig.{name} must be an integer >= 1, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"SASRecConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout!r}")


def xavier_init(module: nn.Module, *padded: nn.Embedding) -> None:
    """pmixer's initialisation: every matrix Xavier-normal, then the padding row (index 0) of
    each of ``padded`` back to zeros."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_normal_(p)
    with torch.no_grad():
        for emb in padded:
            emb.weight[0].zero_()


class CausalSelfAttention(nn.Module):
    """Multi-head attention; queries are normalised, keys and values are not (as in pmixer)."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.q = nn.Linear(config.dim, config.dim)
        self.kv = nn.Linear(config.dim, 2 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        # q_in [B, Lq, D], kv_in [B, L, D]; mask [B, 1, Lq, L] bool (True = may attend), or
        # None when there is no padding: then plain causal over the last Lq rows.
        B, Lq, D = q_in.shape
        L = kv_in.shape[1]
        H, hd = self.n_heads, D // self.n_heads
        q = self.q(q_in).view(B, Lq, H, hd).transpose(1, 2)  # [B, H, Lq, hd]
        k, v = self.kv(kv_in).split(D, dim=2)  # 2 x [B, L, D]
        k = k.view(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        v = v.view(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        p = self.dropout if self.training else 0.0
        if mask is None and Lq == 1:  # the newest query sees every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, Lq, D)  # [B, Lq, D]
        return self.proj(y)


class PointWiseFeedForward(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.dim)
        self.fc2 = nn.Linear(config.dim, config.dim)
        self.drop1 = nn.Dropout(config.dropout)
        self.drop2 = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, L, D] -> [B, L, D]
        return self.drop2(self.fc2(self.drop1(F.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.dim, eps=1e-8)
        self.attn = CausalSelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.dim, eps=1e-8)
        self.ffn = PointWiseFeedForward(config)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor | None,
                last_only: bool = False) -> torch.Tensor:
        # x [B, L, D]; keep [B, L, 1] float (1 = real item); mask [B, 1, L, L] or None.
        # last_only: compute the newest position only -> [B, 1, D] (keys still span all of x).
        if last_only:
            q = self.ln_attn(x[:, -1:])  # [B, 1, D]
            mask = mask[:, :, -1:] if mask is not None else None  # [B, 1, 1, L]
            keep = keep[:, -1:]  # [B, 1, 1]
        else:
            q = self.ln_attn(x)  # [B, L, D]
        x = q + self.attn(q, x, mask)  # residual from the normalised query, as in pmixer
        x = self.ln_ffn(x)
        x = x + self.ffn(x)
        return x * keep


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len + 1, config.dim, padding_idx=0)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_blocks))
        self.ln_f = nn.LayerNorm(config.dim, eps=1e-8)
        self.scale = math.sqrt(config.dim)
        xavier_init(self, self.item_emb, self.pos_emb)

    def _check(self, seqs: torch.Tensor) -> None:
        if seqs.dim() != 2:
            raise ConfigError(f"seqs must be [B, L], got shape {tuple(seqs.shape)}")
        if seqs.shape[1] > self.config.max_len:
            raise ConfigError(
                f"sequence length {seqs.shape[1]} exceeds max_len {self.config.max_len}")

    def _encode(self, seqs: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        # seqs [B, L] long, left-padded with 0 -> hidden [B, L, D] ([B, 1, D] when last_only)
        B, L = seqs.shape
        real = seqs != 0  # [B, L]
        keep = real.unsqueeze(-1).to(self.item_emb.weight.dtype)  # [B, L, 1]
        positions = torch.arange(L, 0, -1, device=seqs.device) * real  # [B, L]; newest = 1
        x = self.item_emb(seqs) * self.scale + self.pos_emb(positions)  # [B, L, D]
        x = self.emb_drop(x) * keep  # [B, L, D]
        mask: torch.Tensor | None = None
        if not bool(real.all()):
            causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()  # [L, L]
            eye = torch.eye(L, dtype=torch.bool, device=seqs.device)  # [L, L]
            mask = ((causal & real[:, None, :]) | eye).unsqueeze(1)  # [B, 1, L, L]
        for i, block in enumerate(self.blocks):
            x = block(x, keep, mask, last_only=last_only and i == len(self.blocks) - 1)
        return self.ln_f(x)  # [B, L, D] (or [B, 1, D])

    def forward(self, seqs: torch.Tensor, pos: torch.Tensor | None = None,
                neg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """seqs, pos, neg: [B, L] item indices (pos = next item, 0 where none; neg = sampled).

        Returns hidden [B, L, D] and, when pos and neg are given, the mean BCE over positions
        with pos != 0: -log sigmoid(h.e_pos) - log(1 - sigmoid(h.e_neg)).
        """
        self._check(seqs)
        hidden = self._encode(seqs)  # [B, L, D]
        if pos is None and neg is None:
            return hidden, None
        if pos is None or neg is None or pos.shape != seqs.shape or neg.shape != seqs.shape:
            raise ConfigError("pos and neg must both be given, each shaped like seqs [B, L]")
        pos_logits = (hidden * self.item_emb(pos)).sum(-1)  # [B, L]
        neg_logits = (hidden * self.item_emb(neg)).sum(-1)  # [B, L]
        at = pos != 0  # [B, L]
        p, n = pos_logits[at], neg_logits[at]  # [N], [N]
        loss = (F.binary_cross_entropy_with_logits(p, torch.ones_like(p))
                + F.binary_cross_entropy_with_logits(n, torch.zeros_like(n)))
        return hidden, loss

    def hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [B, L] left-padded -> hidden [B, L, D] (position t predicts item t + 1)."""
        self._check(seqs)
        return self._encode(seqs)

    def session_embedding(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [B, L] left-padded -> [B, D], the hidden state at the newest position.

        Only the newest query row is computed in the last block; equal to forward(seqs)[0][:, -1].
        """
        self._check(seqs)
        return self._encode(seqs, last_only=True)[:, -1]  # [B, D]

    def logits(self, hidden: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, D]; items [B, C] -> scores [B, C]; items None -> [B, n_items + 1]."""
        if items is None:
            return hidden @ self.item_emb.weight.T  # [B, n_items + 1]
        return (self.item_emb(items) * hidden.unsqueeze(1)).sum(-1)  # [B, C]

    def item_vectors(self) -> torch.Tensor:
        """[n_items + 1, D], row 0 = padding (zeros). Scores are hidden . item_vectors()^T."""
        return self.item_emb.weight
