"""The trained rankers behind the ``Ranker`` protocol, read back from their bytes: LightGBM
(``models.ranking.TrainedRanker``, a JSON document) and DeepFM (``models.deepfm``, a JSON
header behind a 4-byte length, then raw tensors). Neither format is a pickle."""

from __future__ import annotations

from streamrec.models.deepfm import DeepFMRanker
from streamrec.models.ranking import HeuristicBlend, Ranker, TrainedRanker

RANKER_MODELS: tuple[str, ...] = ("lightgbm", "deepfm")


def ranker_from_bytes(blob: bytes) -> Ranker:
    """The ranker a blob holds (``ConfigError`` when it is neither format)."""
    if blob[:1] == b"{":
        return TrainedRanker.from_bytes(blob)
    return DeepFMRanker.from_bytes(blob)


def is_trained(ranker: Ranker) -> bool:
    """A ranker trained from the served log (not the heuristic blend serving starts with)."""
    return not isinstance(ranker, HeuristicBlend)


__all__ = ["RANKER_MODELS", "ranker_from_bytes", "is_trained"]
