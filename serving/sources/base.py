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


__all__ = ["Batch", "CandidateSource", "Retrieved", "SourceContext", "same_for_all"]
