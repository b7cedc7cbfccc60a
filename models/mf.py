"""Matrix factorisation of the click matrix with the ``implicit`` library: ALS (Hu, Koren and
Volinsky's weighted least squares on implicit feedback) or BPR (pairwise ranking).

    model = fit_mf({"u1": ["i3", "i9"], ...}, MFConfig(kind="als"))
    model.fold_in([["i3", "i7"], []])          (B, D) user vectors from click histories
    model.item_factors                         (n, D) float32, rows in ``model.items`` order
    MFModel.from_bytes(model.to_bytes())       numpy's .npz, read with allow_pickle=False

Scores are inner products ``user . item``. A user's vector is not the one fitted for them but
recomputed from their current clicks (``fold_in``): the ALS user step, one weighted least
squares solve against the item factors with ``implicit``'s own solver
(``AlternatingLeastSquares.recalculate_user``), for both kinds. For BPR this projects the
user's clicks onto the item factors (and their bias column) by least squares, where BPR would
fit them by gradient steps: an approximation, the one that lets a user who clicked a minute
ago be served with the items' factors without refitting.

The fitted users' own vectors are kept too (``user_factors``): user-user CF finds a user's
neighbours among them (``serving.sources.users``).

Pure computation: imports nothing outside ``models``.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from threadpoolctl import threadpool_limits

from streamrec.models.errors import ConfigError

FORMAT = "streamrec.mf/1"
KINDS = ("als", "bpr")


@dataclass(frozen=True)
class MFConfig:
    kind: str = "als"  # als | bpr
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 10.0  # ALS confidence of an item clicked n times: alpha * n (implicit's convention; 1 unclicked); fold-in too
    iterations: int = 15  # ALS sweeps; BPR epochs are ``bpr_iterations``
    bpr_iterations: int = 100
    learning_rate: float = 0.05  # BPR
    recent: int = 50  # fold-in uses a user's newest ``recent`` clicks

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"mf kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.factors < 1 or self.iterations < 1 or self.bpr_iterations < 1 or self.recent < 1:
            raise ConfigError("mf factors, iterations and recent must be positive")
        if self.regularization < 0 or self.alpha <= 0 or self.learning_rate <= 0:
            raise ConfigError("mf regularization must be >= 0, alpha and learning_rate > 0")


def click_matrix(sequences: Mapping[str, Sequence[str]], items: Sequence[str] | None = None,
                 ) -> tuple[list[str], list[str], sp.csr_matrix]:
    """(users, items, users x items CSR of click counts). Items: first-seen order unless given
    (clicks on items outside a given list are dropped)."""
    index: dict[str, int] = {}
    if items is not None:
        index = {item: i for i, item in enumerate(items)}
    users = list(sequences)
    rows, cols = [], []
    for u, seq in enumerate(sequences.values()):
        for item in seq:
            j = index.get(item)
            if j is None:
                if items is not None:
                    continue
                j = index[item] = len(index)
            rows.append(u)
            cols.append(j)
    data = np.ones(len(rows), np.float32)
    m = sp.csr_matrix((data, (rows, cols)), shape=(len(users), len(index)), dtype=np.float32)
    m.sum_duplicates()
    return users, list(index), m


class MFModel:
    """Item factors, fitted user factors, and the fold-in of new click histories."""

    def __init__(self, config: MFConfig, items: list[str], item_factors: np.ndarray, users: list[str],
                 user_factors: np.ndarray, report: dict | None = None) -> None:
        self.config = config
        self.items = items
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)  # (n, D)
        self.users = users
        self.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)  # (m, D)
        self.report = report or {}
        self.index = {item: i for i, item in enumerate(items)}
        self._solver = _fold_in_solver(self.item_factors, config)

    @property
    def dim(self) -> int:
        return self.item_factors.shape[1]

    def fold_in(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """(B, D) float32: each history's user vector (zeros for a history with no known item)."""
        recent = self.config.recent
        rows, cols = [], []
        for b, h in enumerate(histories):
            for item in list(h)[-recent:]:
                j = self.index.get(item)
                if j is not None:
                    rows.append(b)
                    cols.append(j)
        m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(histories), len(self.items)))
        m.sum_duplicates()
        if not len(histories):
            return np.zeros((0, self.dim), np.float32)
        out = self._solver.recalculate_user(np.arange(len(histories)), m)
        return np.ascontiguousarray(out.reshape(len(histories), self.dim), dtype=np.float32)

    # -- bytes: .npz without pickle -----------------------------------------------------------

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        header = json.dumps({"format": FORMAT, "config": asdict(self.config), "report": self.report})
        np.savez(buf, header=np.array(header), items=np.array(self.items, dtype=str),
                 users=np.array(self.users, dtype=str), item_factors=self.item_factors,
                 user_factors=self.user_factors)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "MFModel":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in ("items", "users", "item_factors", "user_factors")}
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"not a {FORMAT} payload: {exc}") from exc
        if header.get("format") != FORMAT:
            raise ConfigError(f"not a {FORMAT} payload")
        return cls(MFConfig(**header["config"]), arrays["items"].tolist(), arrays["item_factors"],
                   arrays["users"].tolist(), arrays["user_factors"], header.get("report"))


def _fold_in_solver(item_factors: np.ndarray, config: MFConfig) -> AlternatingLeastSquares:
    """An ALS model holding ``item_factors``, used only for its user step."""
    with threadpool_limits(1, "blas"):  # implicit warns unless OpenBLAS keeps to one thread
        solver = AlternatingLeastSquares(factors=item_factors.shape[1], regularization=config.regularization,
                                         alpha=config.alpha, num_threads=1, random_state=0)
    solver.item_factors = item_factors
    return solver


def fit_mf(sequences: Mapping[str, Sequence[str]], config: MFConfig = MFConfig(), *, seed: int = 0,
           num_threads: int = 0) -> MFModel:
    """Fit on every user's clicks (a click counted once per occurrence)."""
    users, items, m = click_matrix(sequences)
    if not m.nnz:
        raise ConfigError("no clicks to factorise")
    t0 = time.monotonic()
    with threadpool_limits(1, "blas"):  # implicit's own threads do the work; OpenBLAS's would fight them
        model = _fit(m, config, seed, num_threads)
    report = {"kind": config.kind, "users": len(users), "items": len(items), "clicks": int(m.sum()),
              "seconds": round(time.monotonic() - t0, 2)}
    return MFModel(config, items, np.asarray(model.item_factors), users, np.asarray(model.user_factors), report)


def _fit(m: sp.csr_matrix, config: MFConfig, seed: int,
         num_threads: int) -> AlternatingLeastSquares | BayesianPersonalizedRanking:
    if config.kind == "als":
        model = AlternatingLeastSquares(factors=config.factors, regularization=config.regularization,
                                        alpha=config.alpha, iterations=config.iterations,
                                        num_threads=num_threads, random_state=seed)
    else:
        model = BayesianPersonalizedRanking(factors=config.factors, learning_rate=config.learning_rate,
                                            regularization=config.regularization,
                                            iterations=config.bpr_iterations, num_threads=num_threads,
                                            random_state=seed)
    model.fit(m, show_progress=False)
    return model


__all__ = ["FORMAT", "KINDS", "MFConfig", "MFModel", "click_matrix", "fit_mf"]
