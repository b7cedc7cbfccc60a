"""Model artifacts as bytes (stored in Redis by ``infra.recstore``) and their loading.

Kinds: ``seq`` (the sequence model, its vector index and the content model, one bundle) and
``ranker`` (the LambdaMART ranker). A bundle is a JSON header naming its parts' lengths,
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
from streamrec.models.ranking import HeuristicBlend, Ranker
from streamrec.models.rankers import is_trained, ranker_from_bytes
from streamrec.models.seqtrain import SeqModel
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
    seq_version, ranker_version = live_versions(recstore)
    out = []
    if models.seq is not None and seq_version is None:
        out.append("seq")
    if is_trained(models.ranker) and ranker_version is None:
        out.append("ranker")
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
            ranker = ranker_from_bytes(blob)
            ranker.version = ranker_version
    return ModelSet(ranker=ranker, seq=seq, index=index, content=content, seq_version=seq_version,
                    treatment=load_treatment(recstore, treatment, current.treatment if current else None))


def live_versions(recstore: RecStore) -> tuple[str | None, str | None]:
    return recstore.model_version("seq"), recstore.model_version("ranker")


__all__ = ["pack", "unpack", "pack_seq", "unpack_seq", "load_models", "load_treatment", "live_versions",
           "gone_models"]
