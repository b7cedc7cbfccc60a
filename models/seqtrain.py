"""Everything around the SASRec module: vocabulary, data split, training loop, serving wrapper,
offline evaluation.

    vocab = ItemVocab.from_sequences(...)          external string ids <-> indices 1..n
    split = leave_one_out(sequences)               paper protocol: ... train | valid | test
    model = train(split.train, TrainConfig(...), dim=64, max_len=200)   -> SeqModel
    model.session_embedding(["i1", "i7"])          (dim,) float32
    evaluate(model, split)                         hr@10 / ndcg@10, 100 sampled negatives
    evaluate(model, split, negatives=None)         full ranking over the catalog

Pure computation: imports nothing outside ``models``.
"""

from __future__ import annotations

import io
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from streamrec.models.errors import ConfigError
from streamrec.models.sasrec import SASRec, SASRecConfig

FORMAT = "streamrec.sasrec/1"  # tag inside to_bytes() payloads


class ItemVocab:
    """External item ids (strings) <-> model indices 1..n in first-seen order; 0 is padding."""

    def __init__(self, items: Iterable[str] = ()) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}
        for item in items:
            if item in self.index:
                raise ConfigError(f"ItemVocab: duplicate item id {item!r}")
            self.add(item)

    @classmethod
    def from_sequences(cls, sequences: Iterable[Iterable[str]]) -> ItemVocab:
        vocab = cls()
        for seq in sequences:
            for item in seq:
                vocab.add(item)
        return vocab

    def add(self, item: str) -> int:
        """Index of ``item``, adding it at the end when new."""
        idx = self.index.get(item)
        if idx is None:
            if not isinstance(item, str):
                raise ConfigError(f"ItemVocab: item ids are strings, got {item!r}")
            self.items.append(item)
            idx = self.index[item] = len(self.items)
        return idx

    def encode(self, items: Iterable[str]) -> list[int]:
        """Indices of the known items, in order; unknown ids are skipped."""
        index = self.index
        return [index[i] for i in items if i in index]

    def encode_last(self, items: Sequence[str], n: int) -> list[int]:
        """Indices of the newest ``n`` known items, oldest first (reads from the end only)."""
        index = self.index
        out: list[int] = []
        for i in range(len(items) - 1, -1, -1):
            idx = index.get(items[i])
            if idx is not None:
                out.append(idx)
                if len(out) == n:
                    break
        out.reverse()
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: object) -> bool:
        return item in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemVocab) and self.items == other.items

    def to_dict(self) -> dict[str, list[str]]:
        return {"items": list(self.items)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemVocab:
        items = data.get("items")
        if not isinstance(items, list):
            raise ConfigError("ItemVocab.from_dict: expected {'items': [...]}")
        return cls(items)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128  # users (sequences) per step
    lr: float = 1e-3
    l2: float = 0.0  # weight of ||item embedding||_2 added to the loss (pmixer's l2_emb)
    seed: int = 0
    threads: int = 2  # torch intra-op threads while training (restored afterwards)
    max_seconds: float | None = None  # stop after the batch that crosses this wall time

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not self.l2 >= 0:
            raise ConfigError(f"TrainConfig.l2 must be >= 0, got {self.l2!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(
                f"TrainConfig.max_seconds must be > 0 or None, got {self.max_seconds!r}")


@dataclass
class Split:
    """Leave-one-out split: ``train`` has every user, ``valid``/``test`` users with >= 3 items."""

    train: dict[str, list[str]] = field(default_factory=dict)
    valid: dict[str, str] = field(default_factory=dict)
    test: dict[str, str] = field(default_factory=dict)


def leave_one_out(sequences: Mapping[str, Sequence[str]]) -> Split:
    """Per user (sequence in time order): last item = test, second to last = valid, rest = train.

    Users with fewer than 3 items keep everything in train and have no valid/test item.
    """
    split = Split()
    for user, seq in sequences.items():
        seq = list(seq)
        if len(seq) < 3:
            split.train[user] = seq
        else:
            split.train[user] = seq[:-2]
            split.valid[user] = seq[-2]
            split.test[user] = seq[-1]
    return split


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _left_pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)  # [B, width]
    for r, row in enumerate(rows):
        if len(row):
            out[r, width - len(row):] = row
    return out


class SeqModel:
    """A trained SASRec with its vocabulary, for inference (eval mode, no gradients)."""

    def __init__(self, vocab: ItemVocab, config: SASRecConfig, module: SASRec,
                 version: str = "") -> None:
        if len(vocab) != config.n_items:
            raise ConfigError(f"vocab has {len(vocab)} items, config.n_items is {config.n_items}")
        self.vocab = vocab
        self.config = config
        self.module = module.eval()
        self.version = version

    @property
    def dim(self) -> int:
        return self.config.dim

    def session_embedding(self, items: Sequence[str]) -> np.ndarray:
        """(dim,) float32 for one session (oldest first); zeros when no item is known."""
        idx = self.vocab.encode_last(items, self.config.max_len)
        if not idx:
            return np.zeros(self.config.dim, dtype=np.float32)
        with torch.inference_mode():
            seqs = torch.tensor([idx], dtype=torch.long)  # [1, L], no padding needed
            return self.module.session_embedding(seqs)[0].numpy().copy()  # [D]

    def session_embeddings(self, sessions: Sequence[Sequence[str]],
                           batch_size: int = 256) -> np.ndarray:
        """(B, dim) float32; rows of sessions with no known item are zeros."""
        encoded = [self.vocab.encode_last(s, self.config.max_len) for s in sessions]
        out = np.zeros((len(encoded), self.config.dim), dtype=np.float32)  # [B, D]
        # Similar lengths share a batch, so little padding is computed (the output does not
        # depend on the padding).
        order = sorted((i for i, e in enumerate(encoded) if e), key=lambda i: len(encoded[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                seqs = torch.from_numpy(_left_pad([encoded[i] for i in rows], width))  # [b, L]
                out[rows] = self.module.session_embedding(seqs).numpy()  # [b, D]
        return out

    def item_matrix(self) -> np.ndarray:
        """(n_items, dim) float32; row i is the vector of ``vocab.items[i]``."""
        with torch.inference_mode():
            return self.module.item_vectors()[1:].numpy().astype(np.float32, copy=True)

    def score(self, items_seq: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """(len(candidates),) float32 dot products; NaN for candidates outside the vocabulary."""
        session = self.session_embedding(items_seq)  # [D]
        idx = np.array([self.vocab.index.get(c, 0) for c in candidates], dtype=np.int64)  # [C]
        with torch.inference_mode():
            vectors = self.module.item_vectors()[torch.from_numpy(idx)].numpy()  # [C, D]
        out = (vectors @ session).astype(np.float32)  # [C]
        out[idx == 0] = np.nan
        return out

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "config": asdict(self.config), "vocab": self.vocab.to_dict(),
                    "version": self.version, "state": self.module.state_dict()}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SeqModel:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ConfigError(f"not a {FORMAT} payload")
        config = SASRecConfig(**payload["config"])
        module = SASRec(config)
        module.load_state_dict(payload["state"])
        return cls(ItemVocab.from_dict(payload["vocab"]), config, module, payload["version"])


def _model_config(n_items: int, overrides: Mapping[str, Any]) -> SASRecConfig:
    allowed = {f.name for f in fields(SASRecConfig)} - {"n_items"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConfigError(f"unknown SASRec settings {unknown}; allowed: {sorted(allowed)}")
    return SASRecConfig(n_items=n_items, **overrides)


class _NegativeSampler:
    """Uniform item indices in 1..n outside a user's own sequence, by rejection."""

    def __init__(self, n_items: int, rng: np.random.Generator) -> None:
        self.n = n_items
        self.rng = rng

    def draw(self, shape: tuple[int, int], seen: np.ndarray) -> np.ndarray:
        # seen: the user's sorted unique item indices
        out = self.rng.integers(1, self.n + 1, size=shape)
        if len(seen) >= self.n:  # the user saw everything: no clean negative exists
            return out
        bad = np.isin(out, seen)
        while bad.any():
            out[bad] = self.rng.integers(1, self.n + 1, size=int(bad.sum()))
            bad = np.isin(out, seen)
        return out


def train(sequences: Mapping[str, Sequence[str]], cfg: TrainConfig | None = None,
          progress: Callable[[dict[str, float]], None] | None = None, *,
          catalog: Iterable[str] = (),
          on_epoch: Callable[[int, SeqModel], None] | None = None,
          **model: Any) -> SeqModel:
    """Train SASRec on per-user item sequences (oldest first) and return it in eval mode.

    ``model`` holds SASRecConfig fields other than n_items (max_len, dim, n_blocks, n_heads,
    dropout); n_items is the vocabulary size: every item of ``sequences`` plus ``catalog``.
    Each epoch visits every user with >= 2 items once, in a seeded random order, on the newest
    max_len + 1 items (inputs = all but the last, targets = all but the first), with one
    negative per position drawn uniformly from items outside that user's sequence.
    ``progress`` gets {"epoch", "loss" (mean over the epoch's batches), "seconds" (since the
    start, on_epoch time included), "seq_per_s" (this epoch)}; ``on_epoch(epoch, model)`` may evaluate the model.
    Same data, settings and seed -> same model.
    """
    cfg = cfg or TrainConfig()
    vocab = ItemVocab.from_sequences(sequences.values())
    for item in catalog:
        vocab.add(item)
    if not len(vocab):
        raise ConfigError("train: no items in the sequences")
    config = _model_config(len(vocab), model)
    L = config.max_len

    rows = [np.array(vocab.encode(s[-(L + 1):]), dtype=np.int64) for s in sequences.values()]
    seen = [np.unique(vocab.encode(s)) for s in sequences.values()]
    users = [u for u, r in enumerate(rows) if len(r) >= 2]
    if not users:
        raise ConfigError("train: no sequence has 2 or more items")

    rng = np.random.default_rng(cfg.seed)
    negatives = _NegativeSampler(len(vocab), rng)
    # fork_rng: seeding for initialisation and dropout leaves the caller's torch RNG as it was
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = SASRec(config)
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        started = time.perf_counter()
        out_of_time = False
        for epoch in range(1, cfg.epochs + 1):
            module.train()
            epoch_start, losses, done = time.perf_counter(), [], 0
            order = [users[i] for i in rng.permutation(len(users))]
            for start in range(0, len(order), cfg.batch_size):
                chunk = order[start:start + cfg.batch_size]
                width = max(len(rows[u]) - 1 for u in chunk)
                seqs = _left_pad([rows[u][:-1] for u in chunk], width)  # [b, W]
                pos = _left_pad([rows[u][1:] for u in chunk], width)  # [b, W]
                neg = np.zeros_like(pos)  # [b, W]
                for r, u in enumerate(chunk):
                    n = len(rows[u]) - 1
                    neg[r, width - n:] = negatives.draw((1, n), seen[u])[0]
                _, loss = module(torch.from_numpy(seqs), torch.from_numpy(pos),
                                 torch.from_numpy(neg))
                assert loss is not None
                if cfg.l2:
                    loss = loss + cfg.l2 * module.item_emb.weight.norm()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                done += len(chunk)
                if cfg.max_seconds is not None and time.perf_counter() - started >= cfg.max_seconds:
                    out_of_time = True
                    break
            now = time.perf_counter()
            if progress is not None:
                progress({"epoch": epoch, "epochs": cfg.epochs, "loss": float(np.mean(losses)),
                          "seconds": now - started, "seq_per_s": done / max(now - epoch_start, 1e-9)})
            if on_epoch is not None:
                on_epoch(epoch, SeqModel(vocab, config, module))  # puts it in eval mode
            if out_of_time:
                break
    return SeqModel(vocab, config, module.eval())


class Scorer(Protocol):
    """What ``evaluate`` needs: scores are session_embeddings . item_matrix^T."""

    vocab: ItemVocab

    def session_embeddings(self, sessions: Sequence[Sequence[str]]) -> np.ndarray: ...

    def item_matrix(self) -> np.ndarray: ...


def _sample_outside(n: int, exclude: set[int], k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to k distinct indices in 0..n-1 outside ``exclude``, uniformly (without replacement)."""
    k = min(k, n - len(exclude))
    chosen: dict[int, None] = {}  # insertion-ordered, for determinism
    while len(chosen) < k:
        for x in rng.integers(0, n, size=2 * (k - len(chosen)) + 8).tolist():
            if x not in exclude and x not in chosen:
                chosen[x] = None
                if len(chosen) == k:
                    break
    return np.fromiter(chosen, dtype=np.int64, count=len(chosen))


def evaluate(model: Scorer, split: Split, *, negatives: int | None = 100, k: int = 10,
             seed: int = 0, max_users: int | None = None, target: str = "test") -> dict[str, Any]:
    """HR@k and NDCG@k of the held-out item, one per user with a ``target`` item.

    target="test": input = train + valid items; target="valid": input = train items only
    (for model selection). negatives=N: the paper's protocol, rank the target among N items
    drawn uniformly from items the user never interacted with (train, valid or test);
    negatives=None: rank it over the whole catalog minus the input items (the target stays).
    Ties count against the target, so a constant scorer does not look perfect. A target the
    vocabulary does not know is a miss (counted in "unknown_targets").
    """
    if target not in ("test", "valid"):
        raise ConfigError(f"evaluate: target must be 'test' or 'valid', got {target!r}")
    if negatives is not None and negatives < 1:
        raise ConfigError(f"evaluate: negatives must be >= 1 or None, got {negatives!r}")
    if k < 1:
        raise ConfigError(f"evaluate: k must be >= 1, got {k!r}")
    held = split.test if target == "test" else split.valid
    users = list(held)
    rng = np.random.default_rng(seed)
    if max_users is not None and len(users) > max_users:
        users = [users[i] for i in sorted(rng.choice(len(users), size=max_users, replace=False))]

    def inputs(u: str) -> list[str]:
        history = split.train.get(u, [])
        if target == "test" and u in split.valid:
            return [*history, split.valid[u]]
        return list(history)

    vocab = model.vocab
    items = model.item_matrix()  # [N, D], row i = vocab index i + 1
    n = items.shape[0]
    sessions = model.session_embeddings([inputs(u) for u in users])  # [U, D]
    hits = ndcg = 0.0
    unknown = 0
    for row, u in enumerate(users):
        t = vocab.index.get(held[u])
        if t is None:
            unknown += 1
            continue
        t -= 1
        if negatives is not None:
            known = [*split.train.get(u, []), split.valid.get(u), split.test.get(u)]
            exclude = {i - 1 for i in vocab.encode(x for x in known if x is not None)}
            exclude.add(t)
            cands = _sample_outside(n, exclude, negatives, rng)  # [C]
            scores = items[cands] @ sessions[row]  # [C]
            target_score = float(items[t] @ sessions[row])
        else:
            scores = items @ sessions[row]  # [N]
            target_score = float(scores[t])
            scores[[i - 1 for i in vocab.encode(inputs(u))]] = -np.inf
            scores[t] = -np.inf  # the target is not its own competitor
        rank = int((scores >= target_score).sum())  # 0-based, ties count against the target
        if rank < k:
            hits += 1.0
            ndcg += 1.0 / math.log2(rank + 2)
    count = max(len(users), 1)
    return {f"hr@{k}": hits / count, f"ndcg@{k}": ndcg / count, "users": len(users),
            "unknown_targets": unknown, "negatives": negatives, "target": target}


def evaluate_valid(model: Scorer, split: Split, **kwargs: Any) -> dict[str, Any]:
    """``evaluate`` on the valid item with train-only input (early stopping, model selection)."""
    return evaluate(model, split, target="valid", **kwargs)
