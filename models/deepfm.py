"""DeepFM (Guo et al., IJCAI 2017): the neural ranker, over the same logged feature rows as
the LightGBM ranker (``models.ranking.FEATURES``), behind the same ``Ranker`` protocol.

Every feature is a field. A row's values are first made comparable (``sign(x) log1p(|x|)``,
then standardised with the training rows' mean and deviation: ranks of 10,000 and ages of
thousands of hours would otherwise swamp the rest); field i's embedding is ``z_i v_i``. The
score is

    bias + sum_i w_i z_i                            (linear)
         + sum_{i<j} <v_i, v_j> z_i z_j             (factorisation machine, 2nd order)
         + MLP([z_1 v_1, ..., z_F v_F])             (deep part, on the same embeddings)

Trained listwise (ListNet: softmax cross-entropy of each served list's scores against its
click labels), Adam, early stopping on the held-out lists' NDCG@10. Inference and
contributions run in float64.

Contributions (``streamrec explain``) add up to the score exactly (to float64 rounding): the
linear terms, each FM pair split half and half between its two fields, and the deep part's
integrated gradients from the all-zero (average) row, whose completeness residual is spread
over the fields in proportion to their attribution; the bias is ``b + MLP(0)``.

Bytes: a JSON header (config, feature names, report, tensor shapes) and the raw float64
tensors; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from streamrec.models.errors import ConfigError
from streamrec.models.metrics import graded_ndcg_at
from streamrec.models.ranking import FEATURES, check_features

FORMAT = "streamrec.deepfm/1"


@dataclass(frozen=True)
class DeepFMConfig:
    dim: int = 8  # embedding size of each field
    hidden: tuple[int, ...] = (64, 32)  # the deep part's layers
    dropout: float = 0.1
    epochs: int = 40
    lr: float = 2e-3
    batch_lists: int = 64  # served lists per step
    valid_fraction: float = 0.2  # held-out lists for early stopping
    patience: int = 5  # epochs without a better held-out NDCG@10 before stopping
    max_seconds: float = 300.0
    threads: int = 2
    ig_steps: int = 32  # integrated-gradient steps of the deep part's contributions

    def __post_init__(self) -> None:
        for name in ("dim", "epochs", "batch_lists", "patience", "threads", "ig_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DeepFMConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(f"DeepFMConfig.hidden must be positive layer sizes, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError("DeepFMConfig.dropout and valid_fraction must be in [0, 1)")
        if not self.lr > 0 or not self.max_seconds > 0:
            raise ConfigError("DeepFMConfig.lr and max_seconds must be > 0")


class DeepFMModule(nn.Module):
    def __init__(self, n_fields: int, cfg: DeepFMConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_fields))
        self.register_buffer("std", torch.ones(n_fields))
        self.linear = nn.Linear(n_fields, 1)
        self.v = nn.Parameter(torch.randn(n_fields, cfg.dim) * 0.05)
        layers: list[nn.Module] = []
        width = n_fields * cfg.dim
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def standardise(self, X: torch.Tensor) -> torch.Tensor:
        return (torch.sign(X) * torch.log1p(X.abs()) - self.mean) / self.std

    def parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [n, F] standardised -> (linear [n], fm [n], deep [n]); the linear part holds the bias."""
        e = z.unsqueeze(-1) * self.v  # [n, F, k]
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(-1)  # [n]
        return self.linear(z)[:, 0], fm, self.mlp(e.flatten(1))[:, 0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lin, fm, deep = self.parts(z)
        return lin + fm + deep


def _writable(X: np.ndarray) -> np.ndarray:
    """torch shares the array's memory: a read-only view (a logged row) is copied first."""
    return X if X.flags.writeable else X.copy()


def _lists(sizes: np.ndarray) -> list[np.ndarray]:
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return [np.arange(s, s + n) for s, n in zip(starts.tolist(), sizes.tolist())]


def _padded(X: np.ndarray, y: np.ndarray, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    Xb = np.zeros((len(rows), width, X.shape[1]))
    yb = np.zeros((len(rows), width))
    mask = np.zeros((len(rows), width), dtype=bool)
    for k, r in enumerate(rows):
        Xb[k, : len(r)], yb[k, : len(r)], mask[k, : len(r)] = X[r], y[r], True
    return torch.from_numpy(Xb).float(), torch.from_numpy(yb).float(), torch.from_numpy(mask)


@dataclass
class DeepFMRanker:
    """A trained DeepFM; ``Ranker`` protocol (``score``, ``contributions``, ``staged``)."""

    module: DeepFMModule
    config: DeepFMConfig
    report: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    features: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        self.module = self.module.double().eval()
        if not self.version:
            self.version = "deepfm-" + hashlib.sha256(self.to_bytes(versioned=False)).hexdigest()[:12]

    def score(self, X: np.ndarray) -> np.ndarray:
        X = _writable(check_features(X, "DeepFMRanker.score"))
        if not len(X):
            return np.zeros(0)
        with torch.inference_mode():
            return self.module(self.module.standardise(torch.from_numpy(X))).numpy().copy()

    def staged(self, first_trees: int) -> None:
        return None  # not a tree model: no coarse stage

    def contributions(self, X: np.ndarray) -> np.ndarray:
        X = _writable(check_features(X, "DeepFMRanker.contributions"))
        m, F = self.module, len(FEATURES)
        out = np.zeros((len(X), F + 1))
        if not len(X):
            return out
        with torch.no_grad():
            z = m.standardise(torch.from_numpy(X))  # [n, F]
            lin, fm, deep = m.parts(z)
            gram = m.v @ m.v.T  # [F, F]
            pair = 0.5 * z.unsqueeze(2) * z.unsqueeze(1) * gram  # [n, F, F]: half of each pair's term
            pair = pair - torch.diag_embed(torch.diagonal(pair, dim1=1, dim2=2))
            fm_i = pair.sum(2)  # [n, F]
            lin_i = z * m.linear.weight[0]  # [n, F]
            zero = torch.zeros(1, F, dtype=z.dtype)
            deep0 = m.mlp((zero.unsqueeze(-1) * m.v).flatten(1))[0, 0]
        # integrated gradients of the deep part along 0 -> z (midpoint rule)
        grads = torch.zeros_like(z)
        steps = self.config.ig_steps
        for s in range(steps):
            point = (z * (s + 0.5) / steps).requires_grad_(True)
            value = m.mlp((point.unsqueeze(-1) * m.v).flatten(1)).sum()
            (g,) = torch.autograd.grad(value, point)
            grads += g
        with torch.no_grad():
            ig = z * grads / steps  # [n, F]
            residual = (deep - deep0) - ig.sum(1)  # what the finite path missed
            weight = ig.abs()
            total = weight.sum(1, keepdim=True)
            share = torch.where(total > 0, weight / total.clamp_min(1e-300), torch.full_like(weight, 1.0 / F))
            deep_i = ig + share * residual.unsqueeze(1)
            out[:, :F] = (lin_i + fm_i + deep_i).numpy()
            out[:, F] = float(m.linear.bias[0] + deep0)
        return out

    # -- bytes: JSON header + raw float64 tensors (no pickle) ---------------------------------

    def to_bytes(self, versioned: bool = True) -> bytes:
        state = {k: v.detach().double().contiguous().numpy() for k, v in self.module.state_dict().items()}
        tensors = {k: list(a.shape) for k, a in state.items()}
        header = {"format": FORMAT, "config": {**asdict(self.config), "hidden": list(self.config.hidden)},
                  "features": list(self.features), "report": self.report, "tensors": tensors,
                  **({"version": self.version} if versioned else {})}
        head = json.dumps(header).encode()
        return len(head).to_bytes(4, "big") + head + b"".join(a.tobytes() for a in state.values())

    @classmethod
    def from_bytes(cls, blob: bytes) -> DeepFMRanker:
        try:
            size = int.from_bytes(blob[:4], "big")
            header = json.loads(blob[4 : 4 + size])
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"DeepFM blob has no readable header: {exc}") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ConfigError(f"not a {FORMAT} blob")
        if list(header.get("features", [])) != list(FEATURES):
            raise ConfigError(f"DeepFM blob was trained on features {header.get('features')}, serving builds {list(FEATURES)}")
        cfg = DeepFMConfig(**{**header["config"], "hidden": tuple(header["config"]["hidden"])})
        module = DeepFMModule(len(FEATURES), cfg)
        pos, state = 4 + size, {}
        for name, shape in header["tensors"].items():
            n = int(np.prod(shape)) if shape else 1
            arr = np.frombuffer(blob, dtype=np.float64, count=n, offset=pos).reshape(shape)
            state[name] = torch.from_numpy(arr.copy())
            pos += 8 * n
        if pos != len(blob):
            raise ConfigError(f"DeepFM blob has {len(blob) - pos} bytes beyond its tensors")
        module.double().load_state_dict(state)
        return cls(module, cfg, header["report"], header.get("version", ""))


def train_deepfm(X: np.ndarray, labels: np.ndarray, groups: Sequence[int], *, config: DeepFMConfig | None = None,
                 seed: int = 0) -> DeepFMRanker:
    """Fit DeepFM on served lists (as ``train_ranker``: X (n, len(FEATURES)), labels, list sizes);
    lists without both a clicked and an unclicked row are dropped (ConfigError if none is left)."""
    cfg = config or DeepFMConfig()
    X = check_features(X, "train_deepfm")
    y = np.asarray(labels, dtype=np.float64).ravel()
    sizes = np.asarray(groups, dtype=np.int64).ravel()
    if y.shape[0] != X.shape[0] or int(sizes.sum()) != X.shape[0] or (sizes <= 0).any():
        raise ConfigError(f"train_deepfm: {X.shape[0]} rows, {y.shape[0]} labels, list sizes summing to {int(sizes.sum())}")
    lists = [r for r in _lists(sizes) if y[r].min() < y[r].max()]
    if not lists:
        raise ConfigError(f"train_deepfm: none of {len(sizes)} lists has both a positive and a negative label")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lists))
    n_valid = min(round(cfg.valid_fraction * len(lists)), len(lists) - 1)
    valid = [lists[i] for i in order[:n_valid]]
    train = [lists[i] for i in order[n_valid:]]
    rows = np.concatenate(train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            module = DeepFMModule(len(FEATURES), cfg)
            t = np.sign(X[rows]) * np.log1p(np.abs(X[rows]))
            module.mean.copy_(torch.from_numpy(t.mean(0)).float())
            module.std.copy_(torch.from_numpy(np.where(t.std(0) > 1e-9, t.std(0), 1.0)).float())
            opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
            best, best_state, stale, epochs = -1.0, None, 0, 0
            started = time.perf_counter()
            for epoch in range(1, cfg.epochs + 1):
                module.train()
                epochs = epoch
                for k in range(0, len(train), cfg.batch_lists):
                    batch = train[k : k + cfg.batch_lists]
                    Xb, yb, mask = _padded(X, y, batch)
                    s = module(module.standardise(Xb.flatten(0, 1))).view(mask.shape).masked_fill(~mask, -1e9)
                    target = yb / yb.sum(1, keepdim=True)
                    loss = -(target * torch.log_softmax(s, dim=1)).sum(1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                train = [train[i] for i in rng.permutation(len(train))]
                score = _ndcg(module, X, y, valid) if valid else -float(loss.item())
                if score > best:
                    best, stale = score, 0
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    stale += 1
                if stale >= cfg.patience or time.perf_counter() - started > cfg.max_seconds:
                    break
            if best_state is not None:
                module.load_state_dict(best_state)
        finally:
            torch.set_num_threads(before)
    report = {"n_groups": len(lists), "n_rows": int(sum(len(r) for r in lists)),
              "dropped_groups": len(sizes) - len(lists), "train_groups": len(train), "valid_groups": len(valid),
              "epochs": epochs, "valid_ndcg@10": best if valid else None, "objective": "listnet"}
    return DeepFMRanker(module, cfg, report)


def _ndcg(module: DeepFMModule, X: np.ndarray, y: np.ndarray, lists: Sequence[np.ndarray]) -> float:
    module.eval()
    with torch.no_grad():
        scores = module(module.standardise(torch.from_numpy(X[np.concatenate(lists)]).float())).numpy()
    out, pos = [], 0
    for r in lists:
        s = scores[pos : pos + len(r)]
        pos += len(r)
        ranked = np.argsort(-s, kind="stable")
        out.append(graded_ndcg_at(y[r][ranked], 10))
    return float(np.mean(out))


__all__ = ["DeepFMConfig", "DeepFMModule", "DeepFMRanker", "FORMAT", "train_deepfm"]
