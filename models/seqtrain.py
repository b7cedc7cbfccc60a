"""Everything around the sequence models (SASRec, GRU4Rec, BERT4Rec): vocabulary, data
split, the one training loop, serving wrapper, offline evaluation.

    vocab = ItemVocab.from_sequences(...)          external string ids <-> indices 1..n
    split = leave_one_out(sequences)               paper protocol: ... train | valid | test
    model = train(split.train, TrainConfig(...), dim=64, max_len=200)   -> SeqModel
    model = train(split.train, TrainConfig(loss=LossConfig("ce")), family="bert4rec")
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

from streamrec.models.bert4rec import BERT4Rec, BERT4RecConfig
from streamrec.models.errors import ConfigError
from streamrec.models.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.models.sasrec import SASRec, SASRecConfig
from streamrec.models.seqloss import LossConfig, NegativeSampler, bce, ce, gbce, gbce_beta, sampled

FORMAT = "streamrec.seq/1"  # tag inside to_bytes() payloads
FORMATS = (FORMAT, "streamrec.sasrec/1")  # read: the older tag is a SASRec payload

# family -> (config dataclass, module): every module has session_embedding(seqs [B, L]) ->
# [B, D] and item_vectors() -> [n_items + 1, D]; scores are their dot products
FAMILIES: dict[str, tuple[type, type]] = {
    "sasrec": (SASRecConfig, SASRec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
    "bert4rec": (BERT4RecConfig, BERT4Rec),
}
SeqConfig = SASRecConfig | GRU4RecConfig | BERT4RecConfig


def family_of(module: torch.nn.Module) -> str:
    for name, (_, cls) in FAMILIES.items():
        if isinstance(module, cls):
            return name
    raise ConfigError(f"not a sequence model: {type(module).__name__}")


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
    loss: LossConfig = LossConfig()  # bce, ce, sampled or gbce (models.seqloss)

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
    """A trained sequence model (any of ``FAMILIES``) with its vocabulary, for inference
    (eval mode, no gradients)."""

    def __init__(self, vocab: ItemVocab, config: SeqConfig, module: torch.nn.Module,
                 version: str = "") -> None:
        if len(vocab) != config.n_items:
            raise ConfigError(f"vocab has {len(vocab)} items, config.n_items is {config.n_items}")
        self.vocab = vocab
        self.config = config
        self.family = family_of(module)
        self.module: Any = module.eval()
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
        torch.save({"format": FORMAT, "family": self.family, "config": asdict(self.config),
                    "vocab": self.vocab.to_dict(), "version": self.version,
                    "state": self.module.state_dict()}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SeqModel:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
            raise ConfigError(f"not a {FORMAT} payload")
        family = payload.get("family", "sasrec")
        if family not in FAMILIES:
            raise ConfigError(f"unknown sequence model family {family!r}")
        config_cls, module_cls = FAMILIES[family]
        config = config_cls(**payload["config"])
        module = module_cls(config)
        module.load_state_dict(payload["state"])
        return cls(ItemVocab.from_dict(payload["vocab"]), config, module, payload["version"])


def _model_config(family: str, n_items: int, overrides: Mapping[str, Any]) -> SeqConfig:
    if family not in FAMILIES:
        raise ConfigError(f"model must be one of {', '.join(FAMILIES)}; got {family!r}")
    config_cls = FAMILIES[family][0]
    allowed = {f.name for f in fields(config_cls)} - {"n_items"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConfigError(f"unknown {family} settings {unknown}; allowed: {sorted(allowed)}")
    config: SeqConfig = config_cls(n_items=n_items, **overrides)
    return config


# -- batches: each family's training examples, as hidden states at the positions that have a
# target. A batch is (hidden [N, D], targets [N] item indices, owners [N] user rows, sequences
# finished by this batch). ---------------------------------------------------------------------

Batch = tuple[torch.Tensor, np.ndarray, np.ndarray, int]


def _causal_batches(module: SASRec, rows: list[np.ndarray], order: list[int], size: int,
                    rng: np.random.Generator) -> Iterator[Batch]:
    """SASRec: every position predicts the next item (inputs all but the last, targets all
    but the first of the newest max_len + 1 items)."""
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        width = max(len(rows[u]) - 1 for u in chunk)
        seqs = _left_pad([rows[u][:-1] for u in chunk], width)  # [b, W]
        pos = _left_pad([rows[u][1:] for u in chunk], width)  # [b, W]
        at = pos != 0  # [b, W]
        hidden = module.hidden(torch.from_numpy(seqs))  # [b, W, D]
        owners = np.broadcast_to(np.array(chunk)[:, None], at.shape)[at]
        yield hidden[torch.from_numpy(at)], pos[at], owners, len(chunk)


def _masked_batches(module: BERT4Rec, rows: list[np.ndarray], order: list[int], size: int,
                    rng: np.random.Generator) -> Iterator[Batch]:
    """BERT4Rec (Cloze): each item of the newest max_len is hidden behind [MASK] with
    probability mask_prob (a row with none masked gets its newest item masked) and predicted."""
    cfg = module.config
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        width = max(len(rows[u]) for u in chunk)
        seqs = _left_pad([rows[u] for u in chunk], width)  # [b, W]
        real = seqs != 0
        masked = real & (rng.random(seqs.shape) < cfg.mask_prob)
        masked[~masked.any(1), -1] = True  # the newest item: what inference predicts
        inputs = np.where(masked, cfg.mask_id, seqs)
        hidden = module.hidden(torch.from_numpy(inputs))  # [b, W, D]
        owners = np.broadcast_to(np.array(chunk)[:, None], masked.shape)[masked]
        yield hidden[torch.from_numpy(masked)], seqs[masked], owners, len(chunk)


def _session_parallel_batches(module: GRU4Rec, rows: list[np.ndarray], order: list[int], size: int,
                              rng: np.random.Generator) -> Iterator[Batch]:
    """GRU4Rec's session-parallel mini-batches: ``size`` lanes, each walking one user's
    sequence an item per step (input item t, target item t + 1) with the hidden state carried
    (detached after each step) and reset when the lane takes its next user."""
    queue = iter(order)
    lanes = [next(queue, -1) for _ in range(min(size, len(order)))]
    t = np.zeros(len(lanes), dtype=np.int64)
    state = torch.zeros(1, len(lanes), module.config.dim)
    while any(u >= 0 for u in lanes):
        active = np.array([u >= 0 for u in lanes])
        inputs = np.array([rows[u][t[k]] if u >= 0 else 0 for k, u in enumerate(lanes)])
        targets = np.array([rows[u][t[k] + 1] if u >= 0 else 0 for k, u in enumerate(lanes)])
        out, state = module.step(torch.from_numpy(inputs), state)  # [B, D], [1, B, D]
        owners = np.array(lanes)[active]
        finished = 0
        reset = np.zeros(len(lanes), dtype=bool)
        for k, u in enumerate(lanes):
            if u < 0:
                continue
            t[k] += 1
            if t[k] + 1 >= len(rows[u]):  # the lane's user is done: the next one starts fresh
                finished += 1
                lanes[k], t[k], reset[k] = next(queue, -1), 0, True
        yield out[torch.from_numpy(active)], targets[active], owners, finished
        state = state.detach()
        if reset.any():
            state[:, torch.from_numpy(reset)] = 0.0


_BATCHES = {"sasrec": _causal_batches, "bert4rec": _masked_batches, "gru4rec": _session_parallel_batches}


def _training_rows(family: str, sequences: Iterable[Sequence[str]], vocab: ItemVocab, L: int) -> list[np.ndarray]:
    """What each family trains on per user: SASRec and GRU4Rec the newest max_len + 1 items
    (inputs and shifted targets), BERT4Rec the newest max_len (with [MASK]s among them)."""
    keep = L if family == "bert4rec" else L + 1
    return [np.array(vocab.encode(s[-keep:]), dtype=np.int64) for s in sequences]


def _loss(lc: LossConfig, hidden: torch.Tensor, table: torch.Tensor, pos: np.ndarray, owners: np.ndarray,
          sampler: NegativeSampler, seen: list[np.ndarray], beta: float) -> torch.Tensor:
    target = torch.from_numpy(np.ascontiguousarray(pos))
    if lc.kind == "ce":
        return ce(hidden, table, target)
    if lc.kind == "sampled":
        return sampled(hidden, table, target, torch.from_numpy(sampler.shared(lc.negatives)), sampler.log_q)
    if lc.kind == "gbce":  # K uniform negatives per sequence of the batch
        users, rows = np.unique(owners, return_inverse=True)
        neg = torch.from_numpy(sampler.uniform((len(users), lc.negatives)))
        return gbce(hidden, table, target, neg, beta, torch.from_numpy(rows.astype(np.int64)))
    neg = np.empty(len(pos), dtype=np.int64)  # bce: one negative per position, outside the user's items
    for u in np.unique(owners).tolist():
        at = owners == u
        neg[at] = sampler.uniform((int(at.sum()),), seen[u])
    return bce(hidden, table, target, torch.from_numpy(neg))


def train(sequences: Mapping[str, Sequence[str]], cfg: TrainConfig | None = None,
          progress: Callable[[dict[str, float]], None] | None = None, *,
          catalog: Iterable[str] = (),
          on_epoch: Callable[[int, SeqModel], None] | None = None,
          family: str = "sasrec",
          **model: Any) -> SeqModel:
    """Train a sequence model (``family``: sasrec, gru4rec or bert4rec) on per-user item
    sequences (oldest first) with ``cfg.loss`` (``models.seqloss``) and return it in eval mode.

    ``model`` holds the family's config fields other than n_items (max_len, dim, dropout, and
    n_blocks, n_heads, mask_prob where the family has them); n_items is the vocabulary size:
    every item of ``sequences`` plus ``catalog``. Each epoch visits every user with >= 2 items
    once, in a seeded random order, through the family's batches (SASRec: next item at every
    position of the newest max_len + 1; BERT4Rec: masked items of the newest max_len; GRU4Rec:
    session-parallel lanes over the newest max_len + 1). ``progress`` gets {"epoch", "loss" (mean
    over the epoch's batches), "seconds" (since the start, on_epoch time included),
    "seq_per_s" (sequences finished per second, this epoch)}; ``on_epoch(epoch, model)`` may
    evaluate the model. Same data, settings and seed -> same model.
    """
    cfg = cfg or TrainConfig()
    vocab = ItemVocab.from_sequences(sequences.values())
    for item in catalog:
        vocab.add(item)
    if not len(vocab):
        raise ConfigError("train: no items in the sequences")
    config = _model_config(family, len(vocab), model)
    rows = _training_rows(family, sequences.values(), vocab, config.max_len)
    seen = [np.unique(vocab.encode(s)) for s in sequences.values()]
    users = [u for u, r in enumerate(rows) if len(r) >= 2]
    if not users:
        raise ConfigError("train: no sequence has 2 or more items")
    counts = np.bincount(np.concatenate([rows[u] for u in users]), minlength=len(vocab) + 1)

    rng = np.random.default_rng(cfg.seed)
    sampler = NegativeSampler(len(vocab), counts, rng)
    beta = gbce_beta(cfg.loss.negatives, len(vocab), cfg.loss.gbce_t)
    batches = _BATCHES[family]
    # fork_rng: seeding for initialisation and dropout leaves the caller's torch RNG as it was
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = FAMILIES[family][1](config)
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        started = time.perf_counter()
        out_of_time = False
        for epoch in range(1, cfg.epochs + 1):
            module.train()
            epoch_start, losses, done = time.perf_counter(), [], 0
            order = [users[i] for i in rng.permutation(len(users))]
            for hidden, pos, owners, finished in batches(module, rows, order, cfg.batch_size, rng):
                table = module.item_vectors()
                loss = _loss(cfg.loss, hidden, table, pos, owners, sampler, seen, beta)
                if cfg.l2:
                    loss = loss + cfg.l2 * table.norm()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                done += finished
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
