"""One protocol for every candidate source (the retrieval stage).

A source gets a whole batch of users at once and answers, per user, the items it proposes
with their scores, as arrays, best first. The contract (checked for every registered source
by ``tests/test_sources.py``):

* one ``Retrieved`` per user of the batch, in order; the default list's request (``user``
  None, empty history) included;
* at most ``limit`` items per user, no duplicates, none the user already clicked
  (``Batch.seen``); ``limit`` 0 gives nothing;
* ``scores`` are finite float64 and non-increasing (``items[0]`` is the best);
* the same batch, state and seed give the same answer.

A source reads what it needs through the ``SourceContext`` it was built with (Redis state
through the shared, cached reads; models from the batch). A source may leave per-user
results other stages reuse on the batch (the ``seq`` source: ``embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore

if TYPE_CHECKING:  # the engine imports the sources; these are only types here
    from streamrec.serving.engine import ModelSet
    from streamrec.serving.reads import SharedReads


class Retrieved(NamedTuple):
    """One user's candidates from one source."""

    items: np.ndarray  # (n,) object: item ids, best first, unique
    scores: np.ndarray  # (n,) float64, non-increasing

    @staticmethod
    def of(items: Sequence[str], scores: Sequence[float] | np.ndarray) -> "Retrieved":
        return Retrieved(np.array(list(items), dtype=object), np.asarray(scores, dtype=np.float64))

    @staticmethod
    def empty() -> "Retrieved":
        return Retrieved(np.empty(0, dtype=object), np.empty(0, dtype=np.float64))


@dataclass
class Batch:
    """What every source sees of one refresh."""

    ns: Namespace
    users: list[str | None]  # None: the default list (users without one of their own)
    histories: list[list[str]]  # each user's retained clicks, oldest first
    seen: list[set[str]]  # items each user clicked: never proposed again
    as_of: list[int]  # event time each list is computed at (the newest click), ms
    models: "ModelSet"
    embeddings: np.ndarray | None = None  # (len(users), D) session embeddings, from the seq source

    def __len__(self) -> int:
        return len(self.users)


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


def drop_seen(items: Sequence[str], scores: np.ndarray, seen: set[str], limit: int) -> Retrieved:
    """The first ``limit`` of a best-first list that the user has not clicked."""
    keep = [j for j, it in enumerate(items) if it not in seen][:limit]
    return Retrieved(np.array([items[j] for j in keep], dtype=object), np.asarray(scores, np.float64)[keep])


__all__ = ["Batch", "CandidateSource", "Retrieved", "SourceContext", "drop_seen"]
