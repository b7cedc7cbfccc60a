"""Model checksums: ``publish_model`` records the bytes' SHA-256 in the live hash (and for
every version kept); a model whose bytes in Redis were changed afterwards is refused before
it is deserialised and serving keeps the model it has; a model published before checksums
were recorded still loads, with one warning."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest

from streamrec.infra.recstore import ModelIntegrityError, RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.ranking import HeuristicBlend, TrainedRanker
from streamrec.serving.engine import ModelSet
from streamrec.serving.modelio import load_models
from tests.test_engine import ranker as small_ranker


@pytest.fixture
def recstore(settings: Settings, store: StateStore) -> RecStore:
    return RecStore(store, settings.kafka.partitions)


def test_publish_records_the_checksum_of_every_kept_version(recstore: RecStore) -> None:
    blobs = {f"m{k}": f"model bytes {k}".encode() for k in range(4)}
    for version, blob in blobs.items():
        recstore.publish_model("seq", version, blob, {"n": 1}, keep=3)
    raw = recstore.client.hgetall(recstore.keys.model("seq"))
    assert raw[b"sha256"].decode() == hashlib.sha256(blobs["m3"]).hexdigest()
    assert json.loads(raw[b"history"]) == ["m1", "m2", "m3"]
    assert json.loads(raw[b"checksums"]) == {v: hashlib.sha256(blobs[v]).hexdigest() for v in ("m1", "m2", "m3")}
    for version in ("m1", "m2", "m3"):
        assert recstore.load_model("seq", version) == blobs[version]
    assert recstore.load_model("seq", "m0") is None  # gone (beyond keep)
    assert recstore.model_info("seq")["version"] == "m3"


def test_tampered_bytes_are_refused_and_serving_keeps_its_model(recstore: RecStore,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    good = small_ranker()
    recstore.publish_model("ranker", "r1", good.to_bytes(), {}, keep=3)
    models = load_models(recstore)
    assert isinstance(models.ranker, TrainedRanker) and models.ranker.version == "r1"

    recstore.publish_model("ranker", "r2", small_ranker(seed=1).to_bytes(), {}, keep=3)
    # Someone rewrites r2's bytes in Redis: garbage that would fail to parse, so reaching the
    # deserialiser would raise; it is never reached.
    recstore.client.set(recstore.keys.model_blob("ranker", "r2"), b"\x00tampered bytes")
    with pytest.raises(ModelIntegrityError, match="do not match the checksum"):
        recstore.load_model("ranker", "r2")
    with caplog.at_level(logging.WARNING):
        again = load_models(recstore, models)
    assert again.ranker is models.ranker and again.ranker.version == "r1"  # the current one stays
    assert any("ranker r2" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    # A process starting now serves without a trained ranker rather than the tampered one.
    assert isinstance(load_models(recstore).ranker, HeuristicBlend)

    # The sequence model: refused at start (served without one) and while serving (kept).
    recstore.publish_model("seq", "s1", b"not a real bundle", {}, keep=3)
    recstore.client.set(recstore.keys.model_blob("seq", "s1"), b"not a real bundle!")
    fresh = load_models(recstore)
    assert fresh.seq is None and fresh.seq_version is None
    serving = ModelSet(ranker=models.ranker, seq=object(), index=object(), content=object(),  # type: ignore[arg-type]
                       seq_version="s0")  # stand-ins for the sequence model being served
    kept = load_models(recstore, serving)
    assert kept.seq is serving.seq and kept.index is serving.index and kept.seq_version == "s0"


def test_a_model_published_without_a_checksum_loads_with_one_warning(recstore: RecStore,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    blob = small_ranker().to_bytes()
    recstore.publish_model("ranker", "old1", blob, {}, keep=3)
    recstore.client.hdel(recstore.keys.model("ranker"), "sha256", "checksums")  # as published before
    with caplog.at_level(logging.WARNING):
        assert recstore.load_model("ranker", "old1") == blob
        assert recstore.load_model("ranker", "old1") == blob
        models = load_models(recstore)
    assert isinstance(models.ranker, TrainedRanker) and models.ranker.version == "old1"
    warnings = [r for r in caplog.records if "no recorded checksum" in r.getMessage()]
    assert len(warnings) == 1
    # The next publish records checksums again (the old version's stays unknown).
    recstore.publish_model("ranker", "new1", blob, {}, keep=3)
    assert json.loads(recstore.client.hget(recstore.keys.model("ranker"), "checksums")) == {
        "new1": hashlib.sha256(blob).hexdigest()}


def test_models_gone_from_redis_are_kept_by_serving_and_retrained_by_the_trainer(
        settings: Settings, store: StateStore, recstore: RecStore, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis loses the model keys (restarted empty, flushed): serving keeps the ranker it holds
    and reports it gone instead of falling back silently; the trainer that saw it published
    retrains at once (reason ``models-gone``)."""
    from streamrec.models.events import Click, encode
    from streamrec.serving import trainer
    from streamrec.serving.modelio import gone_models
    from streamrec.streams.processor import Processor, Record

    recstore.publish_model("ranker", "r1", small_ranker().to_bytes(), {}, keep=3)
    models = load_models(recstore)
    recstore.client.delete(recstore.keys.model("ranker"), recstore.keys.model_blob("ranker", "r1"))
    with caplog.at_level(logging.ERROR):
        kept = load_models(recstore, models)
    assert kept.ranker is models.ranker and gone_models(recstore, kept) == ["ranker"]
    assert any("ranker r1 is gone from Redis" in r.getMessage() for r in caplog.records)
    assert isinstance(load_models(recstore).ranker, HeuristicBlend)  # a new process has nothing to keep

    store.registry.ensure()
    t0 = 1_700_000_000_000
    Processor(settings, store).process([Record(settings.kafka.events_topic, 0, 0, b"u1", encode(
        Click(id="c1", timestamp=t0, user="u1", item="i1")), t0)])
    recstore.publish_model("ranker", "r2", small_ranker().to_bytes(), {}, keep=3)
    reasons: list[str] = []

    def fake_round(s: Settings, status: dict, reason: str, **train: object) -> dict:
        reasons.append(reason)
        if reason == "schedule":  # the first round; then the models vanish
            recstore.client.delete(recstore.keys.model("ranker"))
        return {"ranker": {"version": "r3"}} if reason == "models-gone" else {}

    monkeypatch.setattr(trainer, "_round", fake_round)
    s = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"drift": "off"})})
    deadline = time.monotonic() + 30
    trainer._train_loop(s, store, {"state": "waiting", "rounds": 0}, 3600.0, 10**9, None,
                        lambda: "models-gone" in reasons or time.monotonic() > deadline)
    assert reasons == ["schedule", "models-gone"]
