"""`streamrec explain USER ITEM` (and ``Reader.explain``): why an item is in a user's list, read
from what serving computed for that list, not recomputed differently.

The user's current list (Redis) names its ``request_id``; the served log record with that id
(the served topic, on the user's partition, read from its end backwards) holds, per served
slot, the feature row the ranker scored, the slot's kind and propensity, the session items
that brought it and the score. From these:

* ``sources``: every source that proposed the item, with its 0-based rank there (the row's
  ``seq_rank``, ``cf_rank``, ``trend_rank``; ``explore`` with its policy index);
* ``via``: the session item whose CF neighbour it is (``cf``) or whose item vector is closest
  to it (``seq``);
* ``posterior``: the bandit's Beta posterior mean and standard deviation at serving time;
* ``contributions``: the ranker's per-feature contributions to the item's score (LightGBM's
  own ``pred_contrib`` for a trained ranker, the blend's terms for the heuristic one) and the
  bias; they sum to ``score`` (within float64 rounding, ``sum_error`` reports it).
"""

from __future__ import annotations

import time
from typing import Any

from kafka import TopicPartition
from kafka.partitioner.default import murmur2

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.recstore import RecStore
from streamrec.infra.registry import Registry
from streamrec.infra.settings import Settings
from streamrec.models.errors import StreamrecError
from streamrec.models.ranking import ABSENT_RANK, FEATURES, HeuristicBlend, Ranker
from streamrec.models.rankers import ranker_from_bytes
from streamrec.models.servedlog import ServedLog, served_decoder



def find_served(settings: Settings, user: str, request_id: str, *, chunk: int = 2000,
                max_records: int = 1_000_000, timeout_s: float = 60.0) -> ServedLog | None:
    """The served log record of ``request_id``: the user's partition of the served topic
    (keyed by user, kafka-python's default partitioner), newest records first."""
    topic = settings.kafka.served_topic
    consumer = kafka_wiring.reader(settings.kafka, [topic])
    try:
        parts = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        tp = TopicPartition(topic, (murmur2(user.encode()) & 0x7FFFFFFF) % len(parts))
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        end = None
        while end is None:  # the high-water mark comes with a fetch (Tansu's ListOffsets is wrong)
            consumer.poll(timeout_ms=200, max_records=1)
            end = consumer.highwater(tp)
            if time.monotonic() > deadline:
                raise StreamrecError(f"reading {topic} took over {timeout_s:.0f} s")
        stop = end
        while stop > 0 and end - stop < max_records:
            start = max(0, stop - chunk)
            consumer.seek(tp, start)
            found = None
            while consumer.position(tp) < stop:
                for records in consumer.poll(timeout_ms=200, max_records=chunk).values():
                    for r in records:
                        if r.offset < stop and r.key == user.encode():
                            try:
                                log = served_decoder.decode(r.value)
                            except Exception:  # noqa: BLE001 - a foreign record is not ours
                                continue
                            if log.request_id == request_id:
                                found = log
                if time.monotonic() > deadline:
                    raise StreamrecError(f"reading {topic} took over {timeout_s:.0f} s")
            if found is not None:
                return found
            stop = start
        return None
    finally:
        consumer.close()


def _ranker(recstore: RecStore, model_label: str, role: str = "ranker") -> Ranker:
    """The ranker the label names for ``role``: ``ranker`` (the control) or ``treatment``."""
    fields = dict(part.split("=", 1) for part in model_label.split(";") if "=" in part)
    version = fields.get(role, "")
    if version in ("", HeuristicBlend().version):
        return HeuristicBlend()
    blob = recstore.load_model("ranker", version)
    if blob is None:
        raise StreamrecError(f"ranker {version} that served this list is no longer in Redis "
                             f"(trainer.keep_versions); its contributions cannot be read")
    ranker = ranker_from_bytes(blob)
    ranker.version = version
    return ranker


def explain_log(log: ServedLog, item: str, recstore: RecStore) -> dict[str, Any]:
    """The explanation of ``item`` in the served list ``log``."""
    if item not in log.items:
        raise StreamrecError(f"item {item} is not in list {log.request_id} (it holds {len(log.items)} items)")
    if not log.slot_features or list(log.feature_names) != list(FEATURES):
        raise StreamrecError(f"list {log.request_id} was logged without its slots' features "
                             f"(served by an older streamrec); it cannot be explained")
    slot = log.items.index(item)
    row = log.slot_matrix()[slot]
    col = {name: i for i, name in enumerate(FEATURES)}
    sources: dict[str, int | None] = {name: int(row[col[f"{name}_rank"]]) for name in ("seq", "cf", "trend") if row[col[f"{name}_rank"]] < ABSENT_RANK}
    kind = log.kinds[slot] if log.kinds else ""
    if kind in ("explore", "cold") or row[col["explore_draw"]] > 0:
        sources["explore"] = None  # the exploration pool has no rank of its own: see policy_index
    team = log.teams[slot] if log.teams else ""
    # the ranker whose score placed the slot: the treatment for its team's slots (interleaving)
    # or for every slot of a treatment-arm list (A/B); the control otherwise
    by_treatment = team == "b" or (not log.teams and log.arm == "treatment")
    ranker = _ranker(recstore, log.model, "treatment" if by_treatment else "ranker")
    contrib = ranker.contributions(row[None, :])[0]
    score = log.scores[slot] if log.scores else float(ranker.score(row[None, :])[0])
    named = sorted(((FEATURES[j], float(contrib[j])) for j in range(len(FEATURES)) if contrib[j] != 0.0),
                   key=lambda kv: -abs(kv[1]))
    return {
        "user": log.user, "item": item, "request_id": log.request_id, "position": slot, "kind": kind,
        "propensity": log.propensities[slot] if log.propensities else None, "policy": log.policy,
        "sources": sources, "via": log.via[slot] if log.via else {},
        "policy_index": float(row[col["explore_draw"]]),
        "posterior": {"mean": float(row[col["post_mean"]]), "std": float(row[col["post_std"]])},
        "score": score, "ranker": ranker.version,
        "experiment": "interleave" if log.teams else "ab" if log.arm else "",
        "arm": log.arm, "team": {"a": "control", "b": "treatment"}.get(team, ""),
        "ranked_by": "treatment" if by_treatment else "control",
        "contributions": dict(named), "bias": float(contrib[-1]),
        "sum_error": abs(float(contrib.sum()) - score),
        "features": {name: float(row[j]) for j, name in enumerate(FEATURES)},
    }


def explain(settings: Settings, recstore: RecStore, user: str, item: str,
            registry: Registry | None = None) -> dict[str, Any]:
    """``explain_log`` of the user's current list. With ``registry``: ``StateLost`` when the
    user has no list because the state is gone (as ``Reader.recommendations``)."""
    recs = recstore.read_recs(user, fallback=False)
    if recs is None and registry is not None:
        registry.live()  # StateLost when the state is gone
    if recs is None:
        raise StreamrecError(f"user {user} has no list of their own (is `streamrec serve` running?)")
    if item not in recs.get("items", []):
        raise StreamrecError(f"item {item} is not in user {user}'s current list ({len(recs.get('items', []))} items)")
    log = find_served(settings, user, recs["request_id"])
    if log is None:
        raise StreamrecError(f"list {recs['request_id']} of user {user} is not on {settings.kafka.served_topic} "
                             f"(serving.log_features off, or past the topic's retention)")
    return explain_log(log, item, recstore)


__all__ = ["explain", "explain_log", "find_served"]
