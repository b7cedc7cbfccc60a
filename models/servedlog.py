"""The served log: every list a serving worker computed, with its candidates' feature rows,
as logged on the served topic (msgpack), and its join with the clicks that followed.

This schema is the contract between serving (which writes it) and the trainer (which learns
the ranker from it); it lives here, in the bottom layer, so both read one definition.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Sequence

import msgspec
import numpy as np

from streamrec.models.events import Click
from streamrec.models.ranking import FEATURES


class ServedLog(msgspec.Struct, frozen=True):
    """One served list as logged on the served topic (ranker training data)."""

    request_id: str
    user: str | None
    as_of: int  # event time of the newest click behind the list, ms
    computed_at: int  # wall clock, ms
    model: str
    items: list[str]  # the served list
    candidates: list[str]  # logged candidates, best first
    features: bytes  # float32 (len(candidates), len(feature_names)), C order
    feature_names: list[str]
    tie_ids: list[str] = []  # event ids of the state's clicks at ``as_of`` exactly (already seen)
    # per served slot (parallel to ``items``): how it was filled (rank, cold, explore, fill), the
    # probability that the logging policy put that item in that slot given the earlier slots,
    # and its feature row (float64, exactly what the ranker scored: ``streamrec explain``)
    kinds: list[str] = []
    propensities: list[float] = []
    slot_features: bytes = b""
    via: list[dict[str, str]] = []  # per slot: source -> the session item that brought it
    scores: list[float] = []  # per slot: the ranker's score
    policy: str = ""  # the exploration policy (serving.policy)
    decision: "PolicyDecision | None" = None  # the exploration choice, for off-policy evaluation
    teams: list[str] = []  # interleaving: per slot, the team that placed it: "a" (control), "b" (treatment), "" (not drafted: exploration)
    arm: str = ""  # the experiment arm of the user ("control", "treatment"; "" outside experiments)

    def matrix(self) -> np.ndarray:
        return np.frombuffer(self.features, dtype=np.float32).reshape(len(self.candidates), len(self.feature_names))

    def slot_matrix(self) -> np.ndarray:
        """(len(items), len(feature_names)) float64: the served items' feature rows."""
        return np.frombuffer(self.slot_features, dtype=np.float64).reshape(-1, len(self.feature_names))


class PolicyDecision(msgspec.Struct, frozen=True):
    """The exploration policy's choice in one served list: the action set (the list's
    exploration candidates not already placed, with their Beta posteriors at serving time) and
    the picks (indices into ``items``) placed in the served slots ``slots``, with the
    probability of each pick given the earlier ones."""

    items: list[str]
    alpha: list[float]
    beta: list[float]
    picks: list[int]
    slots: list[int]
    propensities: list[float]


_encoder = msgspec.msgpack.Encoder()
served_decoder = msgspec.msgpack.Decoder(ServedLog)


def encode_log(log: ServedLog) -> bytes:
    """The record value of one served list on the served topic."""
    return _encoder.encode(log)


@dataclass
class LabelledLists:
    X: np.ndarray  # (rows, len(FEATURES))
    y: np.ndarray  # (rows,) 1 = the candidate the user clicked next
    groups: list[int]  # rows per list
    lists: int  # logged lists read
    dropped: int  # lists without a usable next click


def label_lists(logs: Sequence[ServedLog], clicks: Iterable[Click], window_ms: int,
                negatives: int | None = None, seed: int = 0) -> LabelledLists:
    """Join served lists with the click that followed each: the user's first click after the
    list's state (event time above ``as_of``, or equal to it and not one of the state's own
    clicks, ``tie_ids``; ties in arrival order), within ``window_ms``. With ``negatives``, each
    list keeps its positive and at most that many negatives: the best-ranked half and a
    seeded random draw of the rest (hard and easy ones). Pure."""
    rng = np.random.default_rng(seed)
    by_user: dict[str, list[tuple[int, int, str, str]]] = {}
    for n, c in enumerate(clicks):
        by_user.setdefault(c.user, []).append((c.timestamp, n, c.item, c.id))
    for v in by_user.values():
        v.sort()
    # one list per state (user, as_of, the state's clicks at as_of): the newest computation
    latest: dict[tuple[str, int, tuple[str, ...]], ServedLog] = {}
    for s in logs:
        if s.user is None or list(s.feature_names) != list(FEATURES):
            continue
        key = (s.user, s.as_of, tuple(sorted(s.tie_ids)))
        if key not in latest or latest[key].computed_at <= s.computed_at:
            latest[key] = s
    Xs, ys, groups = [], [], []
    dropped = 0
    for (user, as_of, _), s in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], len(kv[0][2]))):
        seq = by_user.get(user, [])
        k = bisect.bisect_left(seq, (as_of,))
        ties = set(s.tie_ids)
        while k < len(seq) and seq[k][0] == as_of and seq[k][3] in ties:
            k += 1
        if k >= len(seq) or seq[k][0] - as_of > window_ms:
            dropped += 1
            continue
        target = seq[k][2]
        y = np.array([1.0 if it == target else 0.0 for it in s.candidates])
        if y.sum() == 0 or y.sum() == len(y):
            dropped += 1
            continue
        X = s.matrix().astype(np.float64)
        if negatives is not None and len(y) - 1 > negatives:
            neg = np.flatnonzero(y == 0)
            hard = neg[: negatives // 2]
            easy = rng.choice(neg[negatives // 2 :], negatives - len(hard), replace=False)
            rows = np.sort(np.concatenate([np.flatnonzero(y > 0), hard, easy]))
            X, y = X[rows], y[rows]
        Xs.append(X)
        ys.append(y)
        groups.append(len(y))
    X = np.concatenate(Xs) if Xs else np.zeros((0, len(FEATURES)))
    return LabelledLists(X, np.concatenate(ys) if ys else np.zeros(0), groups, len(latest), dropped)



__all__ = ["ServedLog", "PolicyDecision", "LabelledLists", "label_lists", "encode_log", "served_decoder"]
