"""Two-tower retrieval: a user tower over the recent session and its context, an item tower
over the item id and its content tokens, trained with in-batch negatives and log-Q correction.

    model = train_two_tower(sequences, item_tokens, TwoTowerConfig())
    model.user_vectors([["i3", "i9"], []])      (B, D) float32, unit norm (zeros: no known item)
    model.item_vectors(["i3", "new"], [toks, toks])   (n, D) float32, unit norm
    TowerModel.from_bytes(model.to_bytes())     torch.load(weights_only=True): no pickle

Scores are inner products of unit vectors (cosines), so FAISS's inner-product index serves
them. An item's vector is ``normalize(MLP(id_embedding + mean(token embeddings)))``; an item
without clicks in the training data has no id embedding (row 0, zeros) and gets its vector
from its content tokens alone. Training hides the id of a share of the items
(``id_dropout``), so the content path learns to place items by itself: that is what serves a
new item before anyone clicked it.

Loss (one home: ``in_batch_loss``): per training pair (history, next item), softmax over the
batch's next items, logits ``u_i . v_j / temperature - log q_j`` where ``q_j`` is the share of
training pairs whose next item is j (items of the batch are drawn in proportion to their
frequency; without the correction popular items are over-penalised as negatives, Yi et al.
2019); another pair with the same next item is not a negative (masked).

Pure computation: imports nothing outside ``models``.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamrec.models.errors import ConfigError

FORMAT = "streamrec.twotower/1"


@dataclass(frozen=True)
class TwoTowerConfig:
    dim: int = 64
    max_len: int = 20  # the user tower reads the newest max_len clicks
    max_tokens: int = 16  # content tokens kept per item
    batch: int = 512
    epochs: int = 30
    max_seconds: float = 120.0
    lr: float = 3e-3
    temperature: float = 0.05
    id_dropout: float = 0.25  # share of batch items trained from their content alone
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.max_len < 1 or self.max_tokens < 1 or self.batch < 2 or self.epochs < 1:
            raise ConfigError("two-tower dim, max_len, max_tokens, epochs must be positive and batch at least 2")
        if not 0.0 <= self.id_dropout < 1.0 or self.temperature <= 0 or self.lr <= 0 or self.max_seconds <= 0:
            raise ConfigError("two-tower id_dropout must be in [0, 1); temperature, lr, max_seconds positive")


class TwoTower(nn.Module):
    def __init__(self, n_items: int, n_tokens: int, cfg: TwoTowerConfig) -> None:
        super().__init__()
        D = cfg.dim
        # bags: the mean of a row's non-zero indices (index 0, padding, is left out; a row of
        # padding only gives zeros), 6 x faster than gathering and masking (measured)
        self.item_id = nn.Embedding(n_items + 1, D, padding_idx=0)  # row 0: no id (content only)
        self.item_tok = nn.EmbeddingBag(n_tokens + 1, D, mode="mean", padding_idx=0)
        self.item_mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.user_id = nn.EmbeddingBag(n_items + 1, D, mode="mean", padding_idx=0)  # the session's items, as the user tower sees them
        self.user_tok = nn.EmbeddingBag(n_tokens + 1, D, mode="mean", padding_idx=0)
        self.user_mlp = nn.Sequential(nn.Linear(2 * D + 1, D), nn.GELU(), nn.Linear(D, D))
        for emb in (self.item_id, self.item_tok, self.user_id, self.user_tok):
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()

    def items(self, ids: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        """ids [N], toks [N, T] -> [N, D] unit vectors."""
        h = self.item_id(ids) + self.item_tok(toks)
        return F.normalize(self.item_mlp(h), dim=-1)

    def users(self, hist: torch.Tensor, hist_toks: torch.Tensor) -> torch.Tensor:
        """hist [B, L] item indices (0: padding or unknown), hist_toks [B, L * T] -> [B, D]."""
        n = (hist > 0).sum(1, keepdim=True).float()
        ctx = torch.log1p(n)  # context: how long the session is
        h = torch.cat([self.user_id(hist), self.user_tok(hist_toks), ctx], dim=-1)
        return F.normalize(self.user_mlp(h), dim=-1)


def in_batch_loss(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Sampled softmax over the batch's next items with log-Q correction.

    users [B, D], items [B, D] (row j: the vector of pair j's next item), targets [B] item
    indices (equal targets are the same item: not each other's negatives), log_q [B] log
    sampling probability of each pair's next item. Mean over the batch."""
    logits = users @ items.T / temperature - log_q.unsqueeze(0)  # [B, B]
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=targets.device))


class TowerModel:
    """The trained towers, the id and token vocabularies, and each known item's tokens."""

    def __init__(self, cfg: TwoTowerConfig, module: TwoTower, items: list[str], tokens: list[str],
                 item_tokens: Mapping[str, Sequence[str]], report: dict | None = None) -> None:
        self.config = cfg
        self.module = module.eval()
        self.items = items  # index i + 1 <-> items[i]
        self.index = {item: i + 1 for i, item in enumerate(items)}
        self.tokens = tokens
        self.token_index = {t: i + 1 for i, t in enumerate(tokens)}
        self.item_tokens = {item: list(toks) for item, toks in item_tokens.items()}
        self.report = report or {}

    @property
    def dim(self) -> int:
        return self.config.dim

    def _token_rows(self, token_lists: Sequence[Iterable[str]], width: int) -> np.ndarray:
        out = np.zeros((len(token_lists), width), np.int64)
        for r, toks in enumerate(token_lists):
            idx = sorted({self.token_index[t] for t in toks if t in self.token_index})[:width]
            out[r, : len(idx)] = idx
        return out

    def _tokens_of(self, item: str) -> list[str]:
        return self.item_tokens.get(item, [])

    def item_vectors(self, items: Sequence[str], token_sets: Sequence[Iterable[str]] | None = None) -> np.ndarray:
        """(n, D) float32 unit vectors; an item's tokens default to those it was trained with.
        An item with neither a trained id nor a known token gets a zero vector."""
        if token_sets is None:
            token_sets = [self._tokens_of(i) for i in items]
        ids = torch.tensor([self.index.get(i, 0) for i in items], dtype=torch.long)
        toks = torch.from_numpy(self._token_rows(token_sets, self.config.max_tokens))
        with torch.inference_mode():
            out = self.module.items(ids, toks).numpy()
        blank = (ids == 0).numpy() & (toks == 0).all(1).numpy()
        out[blank] = 0.0
        return np.ascontiguousarray(out, dtype=np.float32)

    def user_vectors(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """(B, D) float32: each history's user vector (zeros: no item the model knows)."""
        L, T = self.config.max_len, self.config.max_tokens
        hist = np.zeros((len(histories), L), np.int64)
        toks = np.zeros((len(histories), L * T), np.int64)
        for b, h in enumerate(histories):
            recent = list(h)[-L:]
            hist[b, : len(recent)] = [self.index.get(i, 0) for i in recent]
            row = self._token_rows([[t for i in recent for t in self._tokens_of(i)]], L * T)
            toks[b] = row[0]
        with torch.inference_mode():
            out = self.module.users(torch.from_numpy(hist), torch.from_numpy(toks)).numpy()
        out[(hist == 0).all(1) & (toks == 0).all(1)] = 0.0
        return np.ascontiguousarray(out, dtype=np.float32)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "config": asdict(self.config), "items": self.items, "tokens": self.tokens,
                    "item_tokens": self.item_tokens, "report": self.report,
                    "state": self.module.state_dict()}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TowerModel":
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for foreign bytes
            raise ConfigError(f"not a {FORMAT} payload: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ConfigError(f"not a {FORMAT} payload")
        cfg = TwoTowerConfig(**payload["config"])
        module = TwoTower(len(payload["items"]), len(payload["tokens"]), cfg)
        module.load_state_dict(payload["state"])
        return cls(cfg, module, payload["items"], payload["tokens"], payload["item_tokens"], payload["report"])


def training_pairs(sequences: Iterable[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (history, next item) of the index sequences: (hist [P, max_len] newest last
    left-aligned, zero padded; targets [P])."""
    hists, targets = [], []
    for seq in sequences:
        for t in range(1, len(seq)):
            h = seq[max(0, t - max_len) : t]
            hists.append(list(h) + [0] * (max_len - len(h)))
            targets.append(seq[t])
    if not targets:
        return np.zeros((0, max_len), np.int64), np.zeros(0, np.int64)
    return np.array(hists, np.int64), np.array(targets, np.int64)


def train_two_tower(sequences: Mapping[str, Sequence[str]], item_tokens: Mapping[str, Iterable[str]],
                    cfg: TwoTowerConfig = TwoTowerConfig(),
                    progress: Callable[[dict], None] | None = None) -> TowerModel:
    """Fit both towers on every (recent clicks, next click) pair of the sequences."""
    items = list(dict.fromkeys(i for seq in sequences.values() for i in seq))
    if len(items) < 2:
        raise ConfigError("the two-tower model needs clicks on at least two items")
    index = {item: i + 1 for i, item in enumerate(items)}
    kept_tokens = {item: sorted(set(toks))[: cfg.max_tokens] for item, toks in item_tokens.items()}
    tokens = sorted({t for toks in kept_tokens.values() for t in toks})
    token_index = {t: i + 1 for i, t in enumerate(tokens)}
    hists, targets = training_pairs([[index[i] for i in seq] for seq in sequences.values()], cfg.max_len)
    if len(targets) < 2:
        raise ConfigError("the two-tower model needs at least two (history, next click) pairs")
    tok_table = np.zeros((len(items) + 1, cfg.max_tokens), np.int64)  # item index -> its token ids
    for item, i in index.items():
        idx = [token_index[t] for t in kept_tokens.get(item, [])]
        tok_table[i, : len(idx)] = idx
    freq = np.bincount(targets, minlength=len(items) + 1).astype(np.float64)
    log_q_all = torch.from_numpy(np.log(np.maximum(freq, 1.0) / freq.sum()))

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    module = TwoTower(len(items), len(tokens), cfg)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    tok_t, hist_t, target_t = torch.from_numpy(tok_table), torch.from_numpy(hists), torch.from_numpy(targets)
    P, t0, epoch, loss_value = len(targets), time.monotonic(), 0, math.nan
    for epoch in range(1, cfg.epochs + 1):
        module.train()
        order = torch.from_numpy(rng.permutation(P))
        total, steps = 0.0, 0
        for lo in range(0, P - 1, cfg.batch):
            b = order[lo : lo + cfg.batch]
            if len(b) < 2:
                continue
            h, y = hist_t[b], target_t[b]
            u = module.users(h, tok_t[h].reshape(len(b), -1))
            ids = torch.where(torch.rand(len(b)) < cfg.id_dropout, torch.zeros_like(y), y)
            v = module.items(ids, tok_t[y])
            loss = in_batch_loss(u, v, y, log_q_all[y].float(), cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        loss_value = total / max(steps, 1)
        seconds = time.monotonic() - t0
        if progress is not None:
            progress({"epoch": epoch, "epochs": cfg.epochs, "loss": loss_value, "seconds": seconds,
                      "seq_per_s": P * epoch / max(seconds, 1e-9)})
        if seconds >= cfg.max_seconds:
            break
    report = {"pairs": P, "items": len(items), "tokens": len(tokens), "epochs": epoch,
              "loss": round(loss_value, 4), "seconds": round(time.monotonic() - t0, 1)}
    return TowerModel(cfg, module, items, tokens, kept_tokens, report)


__all__ = ["FORMAT", "TowerModel", "TwoTower", "TwoTowerConfig", "in_batch_loss", "train_two_tower", "training_pairs"]
