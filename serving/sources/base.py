"""One protocol for every candidate source (the retrieval stage).

A source gets a whole batch of users at once and answers, per user, the items it proposes
with their scores, as arrays, best first. Items are **rows** of the serving worker's item table
(``serving.reads.ItemTable``: ``reads.items.ids[rows]`` are their ids). The contract (checked
for every registered source by ``tests/test_sources.py``):

* one ``Retrieved`` per user of the batch, in order; the default list's request (``user``
  None, empty history) included;
* at most ``limit`` items per user, no duplicates, none the user already clicked
  (``Batch.seen``); ``limit`` 0 gives nothing;
* ``rows`` are int64 rows of the item table; ``scores`` are finite float64 and
  non-increasing (``rows[0]`` is the best);
* the same batch, state and seed give the same answer.

A source reads what it needs through the ``SourceContext`` it was built with (Redis state
through the shared, cached reads; models from the batch). A source may leave per-user
results other stages reuse on the batch (the ``seq`` source: ``embeddings``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import numpy as np

from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore

from streamrec.models.index import VectorIndex

if TYPE_CHECKING:  # the engine imports the sources; these are only types here
    from streamrec.serving.engine import ModelSet
    from streamrec.serving.reads import SharedReads

_EMPTY_ROWS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float64)


class Retrieved(NamedTuple):
    """One user's candidates from one source."""

    rows: np.ndarray  # (n,) int64: item rows, best first, unique
    scores: np.ndarray  # (n,) float64, non-increasing

    @staticmethod
    def empty() -> "Retrieved":
        return Retrieved(_EMPTY_ROWS, _EMPTY_SCORES)


def _key(user: np.ndarray | int, rows: np.ndarray) -> np.ndarray:
    """One int64 per (user of the batch, item row)."""
    return (np.asarray(user, dtype=np.int64) << 32) | rows


@dataclass
class Batch:
    """What every source sees of one refresh."""

    ns: Namespace
    users: list[str | None]  # None: the default list (users without one of their own)
    histories: list[np.ndarray]  # each user's retained clicks (item rows, int64), oldest first
    as_of: np.ndarray  # (B,) int64 event time each list is computed at (the newest click), ms
    models: "ModelSet"
    now: float = field(default_factory=time.monotonic)  # freshness of cached reads is judged at this time
    embeddings: np.ndarray | None = None  # (len(users), D) session embeddings, from the seq source
    mf_queries: tuple[list[int], np.ndarray] | None = None  # folded-in MF vectors (mf_vectors): mf and users share them
    seen: list[np.ndarray] = field(init=False)  # per user: the distinct item rows clicked, sorted
    _seen_keys: np.ndarray = field(init=False, repr=False)  # sorted (user, row) keys of every click

    def __post_init__(self) -> None:
        self.as_of = np.asarray(self.as_of, dtype=np.int64)
        self.seen = [np.unique(h) for h in self.histories]
        keys = [_key(i, s) for i, s in enumerate(self.seen) if len(s)]
        self._seen_keys = np.sort(np.concatenate(keys)) if keys else _EMPTY_ROWS

    def __len__(self) -> int:
        return len(self.users)

    def unseen(self, users: np.ndarray | int, rows: np.ndarray) -> np.ndarray:
        """For each (user index, item row): the user has not clicked the item. (n,) bool"""
        keys = _key(users, rows)
        seen = self._seen_keys
        if not len(seen):
            return np.ones(keys.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(seen, keys), len(seen) - 1)
        return seen[pos] != keys

    def drop_seen(self, users: np.ndarray, rows: np.ndarray, scores: np.ndarray, limit: int) -> list[Retrieved]:
        """Per user of the batch: the first ``limit`` unclicked items of best-first entries
        (``users`` non-decreasing, each user's entries best first)."""
        keep = self.unseen(users, rows)
        users, rows, scores = users[keep], rows[keep], np.asarray(scores, np.float64)[keep]
        bounds = np.searchsorted(users, np.arange(len(self) + 1))
        rank = np.arange(len(users)) - bounds[users]
        first = rank < limit
        users, rows, scores = users[first], rows[first], scores[first]
        bounds = np.searchsorted(users, np.arange(len(self) + 1))
        return [Retrieved(rows[lo:hi], scores[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


@dataclass
class SourceContext:
    """What a source is built with: settings, the stores, the serving worker's shared reads
    and its random generator."""

    settings: Settings
    state: StateStore
    recstore: RecStore
    reads: "SharedReads"
    rng: np.random.Generator


@runtime_checkable
class CandidateSource(Protocol):
    """The one protocol of candidate sources."""

    name: str  # the source's name in settings, features and served lists

    def __init__(self, context: SourceContext) -> None: ...

    @staticmethod
    def limit(settings: Settings) -> int:
        """How many candidates per user the engine asks for (from the settings)."""

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        """At most ``limit`` candidates per user of ``batch``, best first."""


def same_for_all(batch: Batch, rows: np.ndarray, scores: np.ndarray, limit: int) -> list[Retrieved]:
    """One best-first list proposed to every user of the batch, each user's clicks left out."""
    B = len(batch)
    if not B or not len(rows) or limit <= 0:
        return [Retrieved.empty() for _ in range(B)]
    n = min(len(rows), limit + max(len(s) for s in batch.seen))  # enough for anyone's first ``limit``
    users = np.repeat(np.arange(B, dtype=np.int64), n)
    return batch.drop_seen(users, np.tile(rows[:n], B), np.tile(np.asarray(scores[:n], np.float64), B), limit)


class NearestItems:
    """The nearest items of per-user query vectors in an item index (FAISS, inner product),
    the users' own clicks left out: what every vector retriever (seq, mf, tower) does after
    computing its queries.

    The user's own clicks are among the nearest items and are dropped: the search asks for a
    margin beyond the limit, and users who lost more than the margin to their clicks are
    searched again with room for all of them (a few, with long histories)."""

    def __init__(self, reads: "SharedReads", owner: str) -> None:
        self.reads = reads
        self.owner = owner  # whose index: its row mapping is kept under this name
        self.searched_again = 0  # users whose own clicks filled more than the first search's margin

    def __call__(self, batch: Batch, index: VectorIndex, users: list[int], queries: np.ndarray,
                 limit: int) -> list[Retrieved]:
        """One list per user of the batch; ``users`` (batch positions) have the rows of
        ``queries`` (len(users), D), the others get nothing."""
        out = [Retrieved.empty() for _ in range(len(batch))]
        if not users or limit <= 0 or not len(index):
            return out
        margin = min(limit // 8, max(len(batch.seen[i]) for i in users))
        got = self._search(batch, index, users, queries, limit + margin, limit)
        short = [w for w, i in enumerate(users) if len(got[i].rows) < limit and len(batch.seen[i]) > margin
                 and limit + margin < len(index)]
        if short:
            self.searched_again += len(short)
            room = limit + max(len(batch.seen[users[w]]) for w in short)
            again = self._search(batch, index, [users[w] for w in short], queries[short], room, limit)
            for w in short:
                got[users[w]] = again[users[w]]
        for i in users:
            out[i] = got[i]
        return out

    def _search(self, batch: Batch, index: VectorIndex, users: list[int], queries: np.ndarray, k: int,
                limit: int) -> list[Retrieved]:
        k = min(k, len(index))
        scores, found = index.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)  # (b, k) each
        valid = found >= 0  # fewer results than k: padded with -1
        owner = np.repeat(np.asarray(users, dtype=np.int64), k).reshape(len(users), k)[valid]
        rows = self.reads.index_rows(index, self.owner).item_of[found[valid]]
        return batch.drop_seen(owner, rows, scores[valid].astype(np.float64), limit)


__all__ = ["Batch", "CandidateSource", "NearestItems", "Retrieved", "SourceContext", "same_for_all"]
