"""BERT4Rec: sequential recommendation with bidirectional encoder representations from
transformers (Sun et al., CIKM 2019).

Items (and a ``[MASK]`` token, index n_items + 1) plus a learned positional embedding go
through bidirectional transformer blocks (post-norm, GELU, as BERT); training hides a share
of each sequence's items behind ``[MASK]`` and predicts them (the Cloze task,
``models.seqtrain``). The next item of a session is the prediction at a ``[MASK]`` appended
after its newest item. The output head (dense, GELU, LayerNorm) maps a hidden state into
the item-embedding space and scores by dot products with the same (tied) item table, whose
rows serve as item vectors; the paper's per-item output bias is left out, so that scores stay
dot products that a vector index can retrieve.

As in ``models.sasrec``, sequences are LEFT-padded with 0 and positions are counted from the
newest item (1) backwards, padding keys are masked out, so an embedding does not depend on
how much padding a batch carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from streamrec.models.errors import ConfigError
from streamrec.models.sasrec import xavier_init


@dataclass(frozen=True)
class BERT4RecConfig:
    n_items: int  # catalog size; item indices are 1..n_items, 0 is padding, n_items + 1 [MASK]
    max_len: int = 200  # longest input (the appended [MASK] included)
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    mask_prob: float = 0.2  # share of a training sequence's items hidden behind [MASK]

    def __post_init__(self) -> None:
        for name in ("n_items", "max_len", "dim", "n_blocks", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"BERT4RecConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_len < 2:
            raise ConfigError(f"BERT4RecConfig.max_len must be >= 2 (an item and [MASK]), got {self.max_len}")
        if self.dim % self.n_heads:
            raise ConfigError(f"BERT4RecConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"BERT4RecConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < float(self.mask_prob) < 1.0:
            raise ConfigError(f"BERT4RecConfig.mask_prob must be in (0, 1), got {self.mask_prob!r}")

    @property
    def mask_id(self) -> int:
        return self.n_items + 1


class BERT4Rec(nn.Module):
    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__()
        self.config = config
        D = config.dim
        self.item_emb = nn.Embedding(config.n_items + 2, D, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len + 1, D, padding_idx=0)
        self.ln_emb = nn.LayerNorm(D)
        self.drop = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(D, config.n_heads, 4 * D, config.dropout, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.n_blocks, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D))
        xavier_init(self, self.item_emb, self.pos_emb)  # as SASRec's

    def hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [B, L] left-padded item indices (n_items + 1 = [MASK]) -> [B, L, D] in the item
        space (after the output head)."""
        if seqs.dim() != 2:
            raise ConfigError(f"seqs must be [B, L], got shape {tuple(seqs.shape)}")
        if seqs.shape[1] > self.config.max_len:
            raise ConfigError(f"sequence length {seqs.shape[1]} exceeds max_len {self.config.max_len}")
        B, L = seqs.shape
        real = seqs != 0  # [B, L]
        positions = torch.arange(L, 0, -1, device=seqs.device) * real  # newest = 1
        x = self.drop(self.ln_emb(self.item_emb(seqs) + self.pos_emb(positions)))  # [B, L, D]
        y = self.encoder(x, src_key_padding_mask=~real)  # [B, L, D]
        return self.head(y)

    def session_embedding(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [B, L] left-padded -> [B, D]: the output at a [MASK] appended after the newest
        item (the newest max_len - 1 items are read)."""
        seqs = seqs[:, -(self.config.max_len - 1):]
        masked = F.pad(seqs, (0, 1), value=self.config.mask_id)  # [B, L + 1]
        return self.hidden(masked)[:, -1]

    def item_vectors(self) -> torch.Tensor:
        """[n_items + 1, D], row 0 = padding (zeros); the [MASK] row is not an item."""
        return self.item_emb.weight[: self.config.n_items + 1]


__all__ = ["BERT4Rec", "BERT4RecConfig"]
