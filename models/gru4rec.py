"""GRU4Rec: session-based recommendation with recurrent neural networks (Hidasi et al., ICLR
2016; Hidasi & Karatzoglou, CIKM 2018).

An item embedding feeds one GRU layer; the hidden state after an item scores the next item
by dot products with a separate output item table (the vectors serving indexes). Trained
with **session-parallel mini-batches** (``models.seqtrain``): B lanes each walk one user's
sequence an item per step, the hidden state carried from step to step (and detached: one
step of backpropagation through time, as the original) and reset to zero when a lane
starts its next user.

Sequences are LEFT-padded with item 0, as for SASRec; ``session_embedding`` reads a batch
of them by packing each row at its own length, so padding never enters the recurrence and
the result does not depend on how much of it there is.

The training loop, vocabulary and evaluation live in ``models.seqtrain``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from streamrec.models.errors import ConfigError


@dataclass(frozen=True)
class GRU4RecConfig:
    n_items: int  # catalog size; item indices are 1..n_items, 0 is padding
    max_len: int = 200  # longest input sequence at inference (the newest max_len items)
    dim: int = 64  # embedding and hidden size
    dropout: float = 0.1  # on the embedding and on the hidden state before scoring

    def __post_init__(self) -> None:
        for name in ("n_items", "max_len", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"GRU4RecConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"GRU4RecConfig.dropout must be in [0, 1), got {self.dropout!r}")


class GRU4Rec(nn.Module):
    def __init__(self, config: GRU4RecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.gru = nn.GRU(config.dim, config.dim, batch_first=True)
        self.out_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        for p in (self.item_emb.weight, self.out_emb.weight):
            nn.init.normal_(p, std=config.dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.out_emb.weight[0].zero_()

    def step(self, items: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One item per lane: items [B], state [1, B, D] -> (output [B, D], new state [1, B, D])."""
        x = self.drop(self.item_emb(items)).unsqueeze(1)  # [B, 1, D]
        y, state = self.gru(x, state)  # [B, 1, D], [1, B, D]
        return self.drop(y[:, 0]), state

    def session_embedding(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [B, L] left-padded (every row with an item) -> [B, D], the state after the newest."""
        if seqs.dim() != 2:
            raise ConfigError(f"seqs must be [B, L], got shape {tuple(seqs.shape)}")
        seqs = seqs[:, -self.config.max_len:]
        lengths = (seqs != 0).sum(1)  # [B]
        if bool((lengths == 0).any()):
            raise ConfigError("session_embedding: a row has no item")
        # right-align -> left-align so that packing reads each row's real items only
        L = seqs.shape[1]
        idx = (torch.arange(L).unsqueeze(0) + (L - lengths).unsqueeze(1)) % L  # [B, L]
        left = torch.gather(seqs, 1, idx)  # [B, L], real items first
        packed = pack_padded_sequence(self.item_emb(left), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h = self.gru(packed)  # h [1, B, D]
        return h[0]

    def item_vectors(self) -> torch.Tensor:
        """[n_items + 1, D], row 0 = padding (zeros). Scores are hidden . item_vectors()^T."""
        return self.out_emb.weight


__all__ = ["GRU4Rec", "GRU4RecConfig"]
