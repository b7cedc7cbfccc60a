"""Candidate sources: one ``CandidateSource`` protocol (``base``), one file per source.

A new retriever is one file with a class that follows the protocol, plus one line in
``REGISTRY`` below; ``serving.sources`` (a setting) chooses which ones serving runs.
"""

from __future__ import annotations

from typing import Sequence

from streamrec.models.errors import ConfigError
from streamrec.serving.sources.base import Batch, CandidateSource, Retrieved, SourceContext, same_for_all
from streamrec.serving.sources.cf import CFSource
from streamrec.serving.sources.explore import ExploreSource
from streamrec.serving.sources.mf import MFSource
from streamrec.serving.sources.seq import SeqSource
from streamrec.serving.sources.tower import TowerSource
from streamrec.serving.sources.trend import TrendSource
from streamrec.serving.sources.users import UserCFSource

REGISTRY: dict[str, type[CandidateSource]] = {
    SeqSource.name: SeqSource,
    CFSource.name: CFSource,
    TrendSource.name: TrendSource,
    ExploreSource.name: ExploreSource,
    MFSource.name: MFSource,
    UserCFSource.name: UserCFSource,
    TowerSource.name: TowerSource,
}


def build(names: Sequence[str], context: SourceContext) -> dict[str, CandidateSource]:
    """The sources named (in that order: earlier ones rank first among equal candidates)."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown candidate source(s) {unknown}; known: {sorted(REGISTRY)}")
    return {name: REGISTRY[name](context) for name in dict.fromkeys(names)}


__all__ = ["REGISTRY", "build", "Batch", "CandidateSource", "Retrieved", "SourceContext", "same_for_all"]
