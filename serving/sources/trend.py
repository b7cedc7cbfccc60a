"""``trend``: the global trending list (decayed click counts), the user's clicks left out."""

from __future__ import annotations

from streamrec.infra.settings import Settings
from streamrec.serving.sources.base import Batch, Retrieved, SourceContext, same_for_all


class TrendSource:
    name = "trend"

    def __init__(self, context: SourceContext) -> None:
        self.reads = context.reads

    @staticmethod
    def limit(settings: Settings) -> int:
        return settings.serving.trending_candidates

    def retrieve(self, batch: Batch, limit: int) -> list[Retrieved]:
        if limit <= 0 or not len(batch):
            return [Retrieved.empty() for _ in range(len(batch))]
        rows, scores = self.reads.trending(batch.ns)  # best first, log2 decayed counts
        return same_for_all(batch, rows, scores, limit)
