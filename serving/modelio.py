"""Model artifacts as bytes (stored in Redis by ``infra.recstore``) and their loading.

Kinds: ``seq`` (the sequence model, its vector index and the content model, one bundle),
``ranker`` (the LambdaMART or DeepFM ranker) and ``retrieval`` (matrix factorisation and the
two-tower model with their indexes, one bundle; trained when the sources mf, users or tower
are configured). A bundle is a JSON header naming its parts' lengths,
followed by the parts.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from streamrec.infra.recstore import ModelIntegrityError, RecStore
from streamrec.models.content import ContentModel
from streamrec.models.errors import ConfigError
from streamrec.models.index import VectorIndex
from streamrec.models.mf import MFModel
from streamrec.models.ranking import HeuristicBlend, Ranker
from streamrec.models.rankers import is_trained, ranker_from_bytes
from streamrec.models.retrieval import RetrievalSet
from streamrec.models.seqtrain import SeqModel
from streamrec.models.twotower import TowerModel
from streamrec.serving.engine import ModelSet

log = logging.getLogger(__name__)


def pack(parts: Mapping[str, bytes]) -> bytes:
    header = json.dumps({name: len(blob) for name, blob in parts.items()}).encode()
    return len(header).to_bytes(4, "big") + header + b"".join(parts.values())


def unpack(data: bytes) -> dict[str, bytes]:
    size = int.from_bytes(data[:4], "big")
    header = json.loads(data[4 : 4 + size])
    out, pos = {}, 4 + size
    for name, length in header.items():
        out[name] = data[pos : pos + length]
        pos += length
    if pos != len(data):
        raise ConfigError(f"model bundle has {len(data) - pos} trailing bytes")
    return out


def pack_seq(model: SeqModel, index: VectorIndex, content: ContentModel) -> bytes:
    return pack({"model": model.to_bytes(), "index": index.to_bytes(),
                 "content": json.dumps(content.to_dict()).encode()})


def unpack_seq(data: bytes) -> tuple[SeqModel, VectorIndex, ContentModel]:
    parts = unpack(data)
    return (SeqModel.from_bytes(parts["model"]), VectorIndex.from_bytes(parts["index"]),
            ContentModel.from_dict(json.loads(parts["content"])))


def pack_retrieval(r: RetrievalSet) -> bytes:
    parts: dict[str, bytes] = {}
    if r.mf is not None and r.mf_items is not None and r.mf_users is not None:
        parts.update(mf=r.mf.to_bytes(), mf_items=r.mf_items.to_bytes(), mf_users=r.mf_users.to_bytes())
    if r.tower is not None and r.tower_items is not None:
        parts.update(tower=r.tower.to_bytes(), tower_items=r.tower_items.to_bytes())
    return pack(parts)


def unpack_retrieval(data: bytes) -> RetrievalSet:
    parts = unpack(data)
    out = RetrievalSet()
    if "mf" in parts:
        out.mf, out.mf_items = MFModel.from_bytes(parts["mf"]), VectorIndex.from_bytes(parts["mf_items"])
        out.mf_users = VectorIndex.from_bytes(parts["mf_users"])
    if "tower" in parts:
        out.tower, out.tower_items = TowerModel.from_bytes(parts["tower"]), VectorIndex.from_bytes(parts["tower_items"])
    return out


_REFUSED: Any = object()  # what _checked_blob returns for bytes that failed their checksum


def _checked_blob(recstore: RecStore, kind: str, version: str) -> Any:
    """``RecStore.load_model`` (None: gone); bytes that fail their checksum are refused with
    one error line and ``_REFUSED`` comes back."""
    try:
        return recstore.load_model(kind, version)
    except ModelIntegrityError as exc:
        log.error("%s", exc)
        return _REFUSED


_GONE: set[tuple[str, str | None]] = set()  # (kind, version) already reported gone


def _gone(kind: str, version: str | None) -> None:
    """A live model's registry entry vanished (Redis restarted empty or was flushed): serving
    keeps the model it holds (never falls back silently) and says so once; the trainer
    publishes again (``serving.trainer``: it retrains when the models it published are gone)."""
    if (kind, version) not in _GONE:
        _GONE.add((kind, version))
        log.error("%s %s is gone from Redis (restarted empty or flushed?): serving keeps it from memory "
                  "until a new one is published", kind, version)


def gone_models(recstore: RecStore, models: ModelSet) -> list[str]:
    """The kinds serving holds in memory that Redis no longer has (see ``_gone``)."""
    seq_version, ranker_version, retrieval_version = live_versions(recstore)
    out = []
    if models.seq is not None and seq_version is None:
        out.append("seq")
    if is_trained(models.ranker) and ranker_version is None:
        out.append("ranker")
    if models.retrieval is not None and retrieval_version is None:
        out.append("retrieval")
    return out


def load_treatment(recstore: RecStore, version: str, current: Ranker | None = None) -> Ranker | None:
    """The experiment's treatment ranker: a registry version of the ranker (kept while it is
    among ``trainer.keep_versions``), or ``heuristic-rrf`` (the blend). None (logged): gone."""
    if not version:
        return None
    if current is not None and current.version == version:
        return current
    if version == HeuristicBlend().version:
        return HeuristicBlend()
    blob = _checked_blob(recstore, "ranker", version)
    if blob is None or blob is _REFUSED:
        log.warning("treatment ranker %s is not in Redis; no experiment", version)
        return None
    ranker = ranker_from_bytes(blob)
    ranker.version = version
    return ranker


def load_models(recstore: RecStore, current: ModelSet | None = None, treatment: str = "") -> ModelSet:
    """The live models; parts whose version did not change are reused from ``current``.

    A model's bytes are checked against the SHA-256 recorded when it was published before
    they are deserialised: a model that fails the check is not loaded, and serving keeps the
    model it has (``current``'s) or, at start, serves without it."""
    seq_version = recstore.model_version("seq")
    ranker_version = recstore.model_version("ranker")
    seq, index, content = (current.seq, current.index, current.content) if current else (None, None, None)
    if current is None or seq_version != current.seq_version:
        keep = (seq, index, content, current.seq_version if current else None)
        seq = index = content = None
        if not seq_version and keep[0] is not None:
            _gone("sequence model", keep[3])
            seq, index, content, seq_version = keep
        elif seq_version:
            blob = _checked_blob(recstore, "seq", seq_version)
            if blob is _REFUSED and keep[0] is not None:
                log.warning("sequence model %s refused; keeping %s", seq_version, keep[3])
                seq, index, content, seq_version = keep
            elif blob is _REFUSED:
                log.warning("sequence model %s refused; serving without one", seq_version)
                seq_version = None
            elif blob is None:
                log.warning("sequence model %s is gone from Redis; serving without it", seq_version)
                seq_version = None
            else:
                seq, index, content = unpack_seq(blob)
                seq.version = seq_version
    ranker: Ranker = current.ranker if current else HeuristicBlend()
    if ranker_version is None and is_trained(ranker):
        _gone("ranker", ranker.version)
    elif ranker_version is None:
        ranker = HeuristicBlend()
    elif ranker.version != ranker_version:
        blob = _checked_blob(recstore, "ranker", ranker_version)
        if blob is None:
            log.warning("ranker %s is gone from Redis; keeping %s", ranker_version, ranker.version)
        elif blob is _REFUSED:
            log.warning("ranker %s refused; keeping %s", ranker_version, ranker.version)
        else:
            try:
                ranker = ranker_from_bytes(blob)
                ranker.version = ranker_version
            except ConfigError as exc:  # e.g. trained on the features of an older release
                log.error("ranker %s cannot serve (%s); keeping %s until the trainer publishes one that can",
                          ranker_version, exc, ranker.version)
    return ModelSet(ranker=ranker, seq=seq, index=index, content=content, seq_version=seq_version,
                    treatment=load_treatment(recstore, treatment, current.treatment if current else None),
                    retrieval=_load_retrieval(recstore, current.retrieval if current else None))


def _load_retrieval(recstore: RecStore, current: RetrievalSet | None) -> RetrievalSet | None:
    """The live retrieval bundle (mf, users, tower sources): kept from ``current`` while its
    version is live, kept from memory (said once) when Redis lost it, not loaded when refused."""
    version = recstore.model_version("retrieval")
    if current is not None and version == current.version:
        return current
    if version is None:
        if current is not None:
            _gone("retrieval bundle", current.version)
        return current
    blob = _checked_blob(recstore, "retrieval", version)
    if blob is None or blob is _REFUSED:
        log.warning("retrieval bundle %s %s; keeping %s", version, "is gone from Redis" if blob is None else "was refused",
                    current.version if current else "none")
        return current
    out = unpack_retrieval(blob)
    out.version = version
    return out


def live_versions(recstore: RecStore) -> tuple[str | None, str | None, str | None]:
    """The live versions of the seq, ranker and retrieval models."""
    return recstore.model_version("seq"), recstore.model_version("ranker"), recstore.model_version("retrieval")


__all__ = ["pack", "unpack", "pack_seq", "unpack_seq", "pack_retrieval", "unpack_retrieval", "load_models", "load_treatment", "live_versions",
           "gone_models"]
