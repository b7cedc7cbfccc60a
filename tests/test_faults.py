"""No poison pill, no silent loss: every input is applied or dead-lettered, and every service
fault is waited out, detected or reported. Against the real broker and Redis; the tests that
kill a service start their own redis-server or broker on a free port.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.embedded import EmbeddedKafka, EmbeddedRedis
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.errors import StateLost
from streamrec.models.events import REJECT_CODES, Click
from streamrec.serving.worker import ServingWorker
from streamrec.streams.launch import WorkerProcess, applied, wait_applied
from streamrec.streams.processor import Processor, Record
from streamrec.streams.sdk import Publisher, Reader
from tests.support import wait_for
from tests.test_worker import expected, make_events, publish, read_dlq, users_of

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000


def renamed(events: list[Any], prefix: str) -> list[Any]:
    """The same events under other ids (a second, distinct stream)."""
    return [e.__class__(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "id": f"{prefix}{e.id}"})
            for e in events]


def with_redis(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url, "embedded": False})})


# -- every input is applied or dead-lettered -------------------------------------------------


def mutations(rng: random.Random, n: int) -> list[bytes]:
    """``n`` inputs: valid events, and valid events broken every way a client could."""
    base = [
        {"type": "click", "id": "e", "timestamp": T0, "user": "u1", "item": "i1", "request_id": "r1",
         "segment": "web"},
        {"type": "impression", "id": "e", "timestamp": T0, "user": "u1", "request_id": "r1",
         "items": [{"item": "i1", "position": 0}, {"item": "i2", "position": 1}]},
        {"type": "item", "id": "e", "timestamp": T0, "item": "i1", "title": "t", "tags": ["a"], "category": "c"},
    ]
    junk_values: list[Any] = [None, True, -1, 0, 2**70, 1.5, 1e308, "", "x" * 5000, "é\u0000\ud7ff", [], {},
                              [[[[]]]], {"a": {"b": {}}}, "{u}", "a b", "*", "\n"]
    out: list[bytes] = []
    for k in range(n):
        doc = json.loads(json.dumps(rng.choice(base)))
        doc["id"] = f"f{k}"
        doc["user"] = doc.get("user") and f"u{rng.randrange(300)}"
        if doc["user"] is None:
            del doc["user"]
        kind = rng.randrange(12)
        if kind == 0:  # a field replaced by anything
            doc[rng.choice(list(doc))] = rng.choice(junk_values)
        elif kind == 1:  # a field dropped
            doc.pop(rng.choice(list(doc)))
        elif kind == 2:  # an unknown field holding deep nesting
            depth = rng.choice([10, 1000, 20_000])
            raw = json.dumps(doc)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
            out.append(raw.encode())
            continue
        raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        if kind == 3:  # bytes flipped
            b = bytearray(raw)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            raw = bytes(b)
        elif kind == 4:  # cut short
            raw = raw[: rng.randrange(len(raw))]
        elif kind == 5:  # random bytes inserted
            at = rng.randrange(len(raw))
            raw = raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + raw[at:]
        elif kind == 6:  # not JSON at all: every byte value, or nothing
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        elif kind == 7:  # far too large
            raw = raw[:-1] + b', "pad": "' + b"x" * rng.choice([70_000, 300_000]) + b'"}'
        elif kind == 8:  # a redelivered or repeated valid event
            raw = out[-1] if out else raw
        out.append(raw)
    return out


def test_a_fuzz_run_of_100k_inputs_is_applied_or_dead_lettered(settings: Settings, store: StateStore) -> None:
    rng = random.Random(9)
    inputs = mutations(rng, 100_000)
    processor = Processor(settings, store, namespace="fuzz")
    topics = (settings.kafka.events_topic, settings.kafka.items_topic)
    offsets: dict[tuple[str, int], int] = {}
    codes: dict[str, int] = {}
    for lo in range(0, len(inputs), 2000):
        records = []
        for raw in inputs[lo : lo + 2000]:
            topic = topics[0] if b'"item"' not in raw[:12] else rng.choice(topics)
            partition = zlib.crc32(raw[:40]) % settings.kafka.partitions
            offset = offsets.get((topic, partition), 0)
            offsets[(topic, partition)] = offset + 1
            records.append(Record(topic, partition, offset, b"k", raw, T0))
        result = processor.process(records)  # must not raise, whatever the input
        for rejection in result.rejections:
            codes[rejection.code] = codes.get(rejection.code, 0) + 1
    stats = processor.stats
    assert stats.read == len(inputs)
    assert stats.read == stats.applied + stats.redelivered + stats.rejected + stats.skipped
    assert set(codes) <= set(REJECT_CODES), codes
    assert stats.applied > 10_000 and stats.rejected > 30_000  # both kinds were really exercised
    assert {"too_deep", "too_large", "not_json", "bad_id", "schema"} <= set(codes), codes


# -- dead letters: whatever their size, once per record -------------------------------------------


def test_a_record_too_large_to_dead_letter_is_cut_and_the_worker_goes_on(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    s = settings.model_copy(update={"worker": settings.worker.model_copy(update={"dlq_max_bytes": 4096})})
    huge = b'{"type": "click", "pad": "' + bytes(range(35, 127)) * 2200 + b'"}'  # ~200 KB, every printable
    valid = make_events(300, users=10, seed=4)
    with Publisher.from_settings(s, max_request_size=4_000_000) as pub:
        pub.send_raw(s.kafka.events_topic, b"u1", huge)
        published = [(e, pub.send(e)) for e in valid]
        pub.flush()
        rows = [(e, d.get().partition, d.get().offset) for e, d in published]
    worker = start_worker(dlq_max_bytes=4096)
    wait_applied(store, len(valid) + 1, workers=[worker])
    (dead,) = read_dlq(s, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["streamrec.error.code"] == "too_large"
    assert len(dead.value) == 4096 and dead.value == huge[:4096]
    assert headers["streamrec.dlq.truncated"] == "1"
    assert int(headers["streamrec.dlq.original_bytes"]) == len(huge)
    assert headers["streamrec.dlq.sha256"] == hashlib.sha256(huge).hexdigest()
    assert store.snapshot(store.live().name, users_of(valid)) == expected(s, rows)  # it went on


def test_a_crash_after_dead_lettering_sends_no_second_dead_letter(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    bad = [b"not json", b'{"type": "click"}', b'{"type":"click","id":"x","timestamp":1,"user":"u","item":"i"}']
    valid = make_events(200, users=5, seed=5)
    with Publisher.from_settings(settings) as pub:
        for raw in bad:
            pub.send_raw(settings.kafka.events_topic, b"u1", raw)
        pub.send_all(valid)
    # nothing is committed before the kill: the restarted worker gets every record again
    first = start_worker("w1", commit_interval_s=600.0)
    wait_applied(store, len(valid) + len(bad), workers=[first])
    assert len(read_dlq(settings, len(bad))) == len(bad)
    first.kill()
    second = start_worker("w2", commit_interval_s=600.0)
    status = wait_for(lambda: next((w for w in store.registry.workers() if w["worker"] == "w2"
                                    and w["read"] >= len(valid) + len(bad)), None), 60, "the redelivery")
    assert status["dead_letters_repeated"] == len(bad) and status["dead_letters"] == 0
    assert len(read_dlq(settings, len(bad) + 1, timeout_s=5)) == len(bad)
    assert second.alive()


# -- service faults ------------------------------------------------------------------------------


def test_sigterm_stops_the_workers_within_10_s_while_redis_is_down(
    settings: Settings, tmp_path: Path
) -> None:
    server = EmbeddedRedis(0)
    server.start()
    s = with_redis(settings, server.url)
    started_procs: list[WorkerProcess] = []
    try:
        store = StateStore.from_settings(s)
        worker = WorkerProcess(s, "w1", tmp_path / "worker.log")
        server_proc = WorkerProcess(s, "s1", tmp_path / "serve.log", command="serve")
        started_procs += [worker, server_proc]
        publish(s, make_events(200, users=5, seed=6))
        wait_applied(store, 200, workers=[worker])
        wait_for(lambda: any(w["worker"] == "s1" for w in store.registry.workers()), 60, "the serving worker")
        server.stop()
        publish(s, renamed(make_events(200, users=5, seed=7), "b"))  # a batch now waits for Redis
        time.sleep(3.0)
        for proc in (worker, server_proc):
            assert proc.alive(), proc.output()  # waiting, not crashed
            started = time.monotonic()
            proc.proc.terminate()
            proc.proc.wait(20)
            assert time.monotonic() - started < 10.0, proc.output()
            assert "Traceback" not in proc.output(tail=100_000), proc.output()
    finally:
        for proc in started_procs:
            proc.kill()
        server.stop()


def test_redis_restarted_empty_is_detected_reported_and_restored(settings: Settings, tmp_path: Path) -> None:
    """Redis dies mid-stream and comes back with nothing: the stream worker and the serving
    worker stay up, the loss is detected and reported (readers are told, not answered empty),
    the worker restores the state from the topics by itself, and the result equals a clean
    pass of every event, those published during the outage included."""
    server = EmbeddedRedis(0)
    server.start()
    port = server.port
    s = with_redis(settings, server.url)
    s = s.model_copy(update={"serving": s.serving.model_copy(update={"log_features": False, "block_ms": 20})})
    serving: ServingWorker | None = None
    thread: threading.Thread | None = None
    worker: WorkerProcess | None = None
    try:
        store = StateStore.from_settings(s)
        worker = WorkerProcess(s, "w1", tmp_path / "worker.log")
        first = publish(s, make_events(3000, users=40, seed=11))
        wait_applied(store, len(first), workers=[worker])
        serving = ServingWorker(s, "serve-1")
        thread = threading.Thread(target=serving.run, daemon=True)
        thread.start()
        time.sleep(3.0)  # committed offsets for what was applied

        # events keep arriving, before, during and after the outage
        during: list[tuple[Any, int, int]] = []
        failures: list[BaseException] = []

        def traffic() -> None:
            try:
                with Publisher.from_settings(s, linger_ms=2) as pub:
                    sent = []
                    for e in renamed(make_events(2000, users=30, seed=12), "d"):  # u30-u39: no click after
                        sent.append((e, pub.send(e)))
                        time.sleep(0.002)
                    pub.flush(120)
                    during.extend((e, d.get().partition, d.get().offset) for e, d in sent)
            except BaseException as exc:  # reported below: a test that lost its traffic must fail
                failures.append(exc)

        publisher = threading.Thread(target=traffic)
        publisher.start()
        time.sleep(1.5)
        server.stop()  # Redis dies mid-stream, and its data with it (no persistence)
        time.sleep(0.5)
        server = EmbeddedRedis(port)
        server.start()  # back, empty
        publisher.join(300)
        assert not publisher.is_alive() and not failures and len(during) == 2000, failures

        # detected and reported: the worker marks the loss before anything else is written
        wait_for(lambda: store.registry.lost_marker() or store.registry.live_name(), 60, "the loss to be detected")
        with Reader.from_settings(s) as reader:
            try:
                view = reader.session("u1")
            except StateLost as exc:
                assert "lost" in str(exc) or "no state" in str(exc)
            else:  # the restore already finished: then the state is whole
                assert view.entries
        # restored by the worker itself, then the events of the outage applied too
        total = len(first) + len(during)
        wait_for(lambda: store.registry.view().healthy and applied(store) >= total, 120, "the restore")
        ns = store.live()
        info = store.registry.info(ns.name)
        assert info.get("restore") is True and "no registry" in info["lost"]["reason"]  # what was found, and when
        got, want = store.snapshot(ns.name, users_of([e for e, _, _ in first + during])), expected(s, first + during)
        assert got == want, (sum(v["clicks"] for v in got.values()), sum(v["clicks"] for v in want.values()),
                             info, worker.output(tail=6000))
        assert worker.alive(), worker.output()
        assert "STATE LOST" in worker.output(tail=200_000)
        # serving stayed up through it and serves the restored state: the lists went with the
        # state, and the restore marked every user dirty, so even users who have not clicked
        # since get theirs back
        assert thread.is_alive()
        with Reader.from_settings(s) as reader:
            wait_for(lambda: all(reader.recommendations(f"u{n}", fallback=False) for n in range(30, 40)),
                     60, "the lists of users who did not click since the restore")
        more = publish(s, [Click(id=f"after-{uuid.uuid4().hex[:6]}", timestamp=T0 + 10**9, user="u1", item="i7")])
        wait_applied(store, total + len(more), workers=[worker])
        with Reader.from_settings(s) as reader:
            got = wait_for(lambda: (r := reader.recommendations("u1", fallback=False)) and r["as_of"] == T0 + 10**9
                           and r, 60, "u1's list after the restore")
        assert got["items"]
    finally:
        if serving is not None:
            serving.stop_event.set()
        if thread is not None:
            thread.join(20)
        if serving is not None:
            serving.close()
        if worker is not None:
            worker.stop()
        server.stop()


def test_an_idle_worker_detects_a_flushed_state_and_restores_it_without_waiting_for_an_event(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    """No event arrives after the flush: the heartbeat finds the registry gone, reports the
    loss once (no traceback per heartbeat) and starts the restore, which rebuilds the state."""
    worker = start_worker("w1")
    events = publish(settings, make_events(600, users=20, seed=5))
    wait_applied(store, len(events), workers=[worker])
    time.sleep(3.0)  # offsets committed
    keys = list(store.client.scan_iter(match=f"{settings.redis.prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        store.client.delete(*keys[i : i + 500])
    wait_for(lambda: store.registry.lost_marker() or store.registry.live_name(), 30, "the loss to be detected")
    wait_for(lambda: store.registry.view().healthy and applied(store) >= len(events), 120, "the restore")
    ns = store.live()
    sent = [e for e, _, _ in events]
    assert store.snapshot(ns.name, users_of(sent)) == expected(settings, events)
    out = worker.output(tail=200_000)
    assert out.count("STATE LOST") == 1 and "heartbeat failed" not in out and "Traceback" not in out, out[-4000:]


def test_a_broker_restarted_with_empty_topics_keeps_the_learners_learning(
    settings: Settings, tmp_path: Path
) -> None:
    broker = EmbeddedKafka(0)
    broker.start()
    port = broker.port
    s = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap": broker.bootstrap})})
    worker: WorkerProcess | None = None
    try:
        kafka_wiring.ensure_topics(s.kafka)
        store = StateStore.from_settings(s)
        worker = WorkerProcess(s, "w1", tmp_path / "worker.log")
        first = make_events(2000, users=20, seed=13)
        publish(s, first)
        wait_applied(store, len(first), workers=[worker])
        ns = store.live()
        old_items = sorted({e.item for e in first if isinstance(e, Click)} & {f"i{k}" for k in range(0, 40, 2)})
        before = store.learner_snapshot(ns.name, ["fresh-item", *old_items])
        assert before["item_cf"]["counts"].keys() == set(old_items) and "fresh-item" not in before["trending"]

        broker.stop()  # the in-memory broker loses every topic
        broker = EmbeddedKafka(port)
        broker.start()
        kafka_wiring.ensure_topics(s.kafka)  # as a publisher or an operator would
        later = [Click(id=f"n{k}", timestamp=T0 + 10**8 + k * 1000, user=f"u{k % 5}",
                       item="fresh-item" if k % 2 else f"i{k}") for k in range(40)]
        publish(s, later)
        # the partitions restarted at offset 0, below what was applied: a new incarnation
        def all_applied() -> bool:
            have = {u: {e.event_id for e in store.session_view(u).entries} for u in {c.user for c in later}}
            return all(c.id in have[c.user] for c in later)

        wait_for(all_applied, 120, "the events of the new incarnation")
        wait_for(lambda: store.learner_snapshot(ns.name, ["fresh-item"])["item_cf"]["counts"], 30,
                 "the learners to learn from the new incarnation")
        time.sleep(1.0)  # the item-side updates of the last batch
        after = store.learner_snapshot(ns.name, ["fresh-item", *old_items])
        assert "fresh-item" in after["trending"]
        for item in old_items:  # items learned before the restart keep learning after it
            assert after["item_cf"]["counts"][item] > before["item_cf"]["counts"][item], item
            assert after["trending"][item] > before["trending"][item], item
        assert any(v > 0 for v in store.offsets(ns).incarnations.values())
        assert store.session_view("u1").entries[-1].event_id.startswith("n")
        assert worker.alive(), worker.output()
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


def test_replay_refuses_a_mismatch_unless_told(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    from streamrec.models.errors import ReplayError
    from streamrec.streams.replay import replay

    published = publish(settings, make_events(600, users=12, seed=14))
    worker = start_worker()
    wait_applied(store, len(published), workers=[worker])
    worker.stop()
    live = store.live()
    store.client.zadd(live.session_seq("u3"), {"ghost|g1": T0})  # live state that no event explains
    with pytest.raises(ReplayError, match="differs from live .* for 1 of 12 users"):
        replay(settings)
    assert store.live() == live  # readers stay where they were
    summary = replay(settings, allow_mismatch=True)
    assert summary.switched and summary.verification["mismatched_users"] == 1
    assert store.live().name == summary.namespace != live.name
    assert store.snapshot(summary.namespace, users_of([e for e, _, _ in published])) == expected(settings, published)


def test_an_empty_batch_applies_nothing_and_raises_nothing(settings: Settings, store: StateStore) -> None:
    """With concurrent lanes (worker.apply_lanes > 1) an empty batch is one empty lane, not an
    IndexError (it broke `streamrec bench serve` whenever the clicks were a multiple of 2,000)."""
    s = settings.model_copy(update={"worker": settings.worker.model_copy(update={"apply_lanes": 4})})
    result = Processor(s, store, namespace="empty").process([])
    assert result.rejections == [] and result.positions == {}
