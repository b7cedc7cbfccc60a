"""Retraining on drift: the drift monitor (river's ADWIN and Page-Hinkley) on seeded streams,
the per-list click-through signal on hand-made served logs, the trainer's watch on real
ServedLog and Click records, and the trainer service retraining the ranker when the live
click-through rate of served lists drops (real broker, Redis and stream worker)."""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from prometheus_client import REGISTRY

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.drift import DriftMonitor, list_rewards, outcome_known
from streamrec.models.errors import ConfigError
from streamrec.models.events import Click
from streamrec.models.ranking import FEATURES
from streamrec.models.servedlog import ServedLog, encode_log
from streamrec.serving import trainer
from streamrec.streams.launch import WorkerProcess, wait_applied
from streamrec.streams.sdk import Publisher
from tests.support import wait_for

T0 = 1_700_000_000_000
ITEMS = ["a", "b", "c"]


def bernoulli(rng: random.Random, p: float, n: int) -> list[float]:
    return [1.0 if rng.random() < p else 0.0 for _ in range(n)]


def fires(monitor: DriftMonitor, values: list[float]) -> list[int]:
    """Indices of the values on which the monitor reported drift."""
    return [i for i, v in enumerate(values) if monitor.update(v)]


# -- the monitor ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_fires_soon_after_the_rate_drops(seed: int) -> None:
    rng = random.Random(seed)
    values = bernoulli(rng, 0.3, 2000) + bernoulli(rng, 0.05, 2000)
    monitor = DriftMonitor("adwin", delta=0.002, min_obs=100)
    hits = fires(monitor, values)
    assert hits, "no drift detected"
    assert 2000 <= hits[0] <= 2000 + 400, hits
    d = monitor.last
    assert d is not None and d.observed == hits[0] + 1
    assert d.recent < d.mean  # the recent rate is lower
    assert monitor.detections == len(hits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_does_not_fire_on_a_stationary_stream(seed: int) -> None:
    monitor = DriftMonitor("adwin", delta=0.002, min_obs=1)
    assert fires(monitor, bernoulli(random.Random(seed), 0.3, 5000)) == []
    assert monitor.observed == 5000 and monitor.detections == 0
    assert abs(monitor.mean - 0.3) < 0.03


def test_page_hinkley_fires_soon_after_the_rate_drops() -> None:
    rng = random.Random(3)
    values = bernoulli(rng, 0.3, 2000) + bernoulli(rng, 0.05, 2000)
    hits = fires(DriftMonitor("page-hinkley", delta=0.002, min_obs=100), values)
    assert hits and 2000 <= hits[0] <= 2000 + 400, hits


def test_min_obs_is_respected_and_a_detection_resets_the_monitor() -> None:
    # blocks of 0s and 1s: a change every 150 values, far more often than min_obs allows
    values = ([0.0] * 150 + [1.0] * 150) * 10
    free = fires(DriftMonitor("adwin", min_obs=1), values)
    monitor = DriftMonitor("adwin", min_obs=400)
    held = fires(monitor, values)
    assert len(free) > len(held) >= 1
    # every report came after at least min_obs values since the previous one (or the start)
    starts = [-1, *held[:-1]]
    assert all(h - s >= 400 for s, h in zip(starts, held)), held
    assert monitor.observed == len(values) - 1 - held[-1]  # counting again since the last one
    assert DriftMonitor("adwin", min_obs=len(values) + 1).update(0.0) is False
    monitor.reset()
    assert monitor.observed == 0 and monitor.mean == 0.0 and monitor.detections == len(held)


def test_unknown_detector_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="kswin"):
        DriftMonitor("kswin", 0.002, 10)
    with pytest.raises(ConfigError):
        DriftMonitor("adwin", 0.002, 0)


# -- the signal ------------------------------------------------------------------------------

def served(user: str | None, as_of: int, items: list[str] = ITEMS, tie_ids: list[str] | None = None,
           computed_at: int = 0, request_id: str = "r") -> ServedLog:
    n = len(items)
    return ServedLog(request_id, user, as_of, computed_at, "test", list(items), list(items),
                     np.zeros((n, len(FEATURES)), dtype=np.float32).tobytes(), list(FEATURES), tie_ids or [])


def click(user: str, item: str, ts: int, eid: str) -> Click:
    return Click(id=eid, timestamp=ts, user=user, item=item)


def test_list_rewards_on_a_hand_made_log() -> None:
    W = 10_000
    clicks = [
        # u1: the state's own click at as_of (a tie id) is skipped; the next one hits
        click("u1", "a", 1000, "s1"), click("u1", "b", 2000, "n1"),
        # u2: a click at as_of that is not the state's own counts: it is on a served item
        click("u2", "c", 1000, "x2"),
        # u3: the next click is on an item not served (a miss), though a later one hits
        click("u3", "z", 1500, "n3"), click("u3", "a", 1600, "m3"),
        # u4: the next click hits, but too late (after the window)
        click("u4", "a", 1000 + W + 1, "late4"),
        # u5: exactly at the end of the window still counts
        click("u5", "b", 1000 + W, "edge5"),
        # u6: a click before the list's state does not count
        click("u6", "a", 900, "old6"),
    ]
    logs = [
        served("u3", 1000, request_id="r3"),
        served("u1", 1000, tie_ids=["s1"], request_id="r1"),
        served("u2", 1000, tie_ids=["s2"], request_id="r2"),
        served("u4", 1000), served("u5", 1000), served("u6", 1000), served("u7", 1000),  # u7: no click
        served(None, 1000),  # the default list: no user, skipped
        served("u1", 500, request_id="r0"),  # an older list of u1: its next click is s1, on "a"
        served("u1", 5000, tie_ids=["n1"]),  # too young at now: left out
    ]
    now = 1000 + W + 1  # the newest click
    got = list_rewards(logs, clicks, W, now)
    assert got == [(500, 1.0), (1000, 0.0), (1000, 1.0), (1000, 1.0), (1000, 0.0), (1000, 1.0),
                   (1000, 0.0), (1000, 0.0)]
    assert outcome_known(served("u1", 1000), W, now) and not outcome_known(served("u1", 5000), W, now)
    # the window is inclusive of its end and measured from as_of
    assert list_rewards([served("u1", 1000, tie_ids=["s1"])], clicks, 1000, 2000) == [(1000, 1.0)]
    assert list_rewards([served("u1", 1000, tie_ids=["s1"])], clicks, 999, 2000) == [(1000, 0.0)]
    assert list_rewards([], clicks, W, now) == []


# -- the trainer's watch ---------------------------------------------------------------------

def traffic(rng: random.Random, rates: list[tuple[int, float]], t0: int, computed_at: int,
            prefix: str = "d") -> tuple[list[ServedLog], list[Click]]:
    """Lists of fresh users one second apart; each user's next click is on a served item with
    the given probability, else elsewhere. ``rates``: (lists, probability) blocks."""
    logs, clicks = [], []
    n = 0
    for count, p in rates:
        for _ in range(count):
            user, ts = f"{prefix}{n}", t0 + n * 1000
            clicks.append(click(user, "a", ts, f"{prefix}s{n}"))  # the click behind the state
            logs.append(served(user, ts, tie_ids=[f"{prefix}s{n}"], computed_at=computed_at,
                               request_id=f"{prefix}r{n}"))
            clicks.append(click(user, "a" if rng.random() < p else "z", ts + 500, f"{prefix}n{n}"))
            n += 1
    return logs, clicks


def watch_settings(settings: Settings, **trainer_overrides: Any) -> Settings:
    return settings.model_copy(update={
        "learners": settings.learners.model_copy(update={"attribution_window_s": 10.0}),
        "trainer": settings.trainer.model_copy(update={"drift": "adwin", "drift_min_lists": 100,
                                                       **trainer_overrides}),
    })


def test_watch_fires_on_a_drop_and_judges_only_what_it_may() -> None:
    s = watch_settings(Settings())
    watch = trainer.DriftWatch(s, since_ms=1_000)
    logs, clicks = traffic(random.Random(5), [(600, 0.4), (600, 0.02)], T0, computed_at=2_000)
    stale = served("old", T0, computed_at=999)  # served by the previous model: never judged
    # nothing is judged before its window closed: the first 10 s of lists wait
    assert watch.observe([stale, *logs[:5]], clicks[:10]) is False
    assert watch.monitor.observed == 0 and len(watch.pending) == 5
    assert all(p.features == b"" for p in watch.pending)  # held without their feature rows
    fired_at = None
    for k in range(5, len(logs), 50):  # arriving in batches, clicks of a batch with it
        if watch.observe(logs[k : k + 50], clicks[2 * k : 2 * k + 100]):
            fired_at = k
            break
    assert fired_at is not None and 600 <= fired_at <= 1000, fired_at
    assert watch.monitor.last is not None and watch.monitor.last.observed >= 100
    assert watch.monitor.last.recent < watch.monitor.last.mean
    # held: one attribution window of clicks (event time), lists whose window is open
    assert min(c.timestamp for c in watch.clicks) >= watch.now_ms - watch.window_ms
    assert all(not outcome_known(p, watch.window_ms, watch.now_ms) for p in watch.pending)
    # a list whose state is older than the clicks held cannot be judged: dropped
    watch.observe([served("x", watch.horizon_ms - 1, computed_at=2_000)], [])
    assert all(p.user != "x" for p in watch.pending)
    # after a round: a new detector, and only lists computed after it count
    watch.restart(since_ms=3_000)
    assert watch.monitor.observed == 0 and watch.pending == []
    watch.observe([served("y", watch.now_ms, computed_at=2_999)], [])
    assert watch.pending == []
    assert watch.report()["detections"] == 1


def test_watch_does_not_fire_on_a_steady_rate() -> None:
    watch = trainer.DriftWatch(watch_settings(Settings()), since_ms=0)
    logs, clicks = traffic(random.Random(6), [(3000, 0.3)], T0, computed_at=1)
    for k in range(0, len(logs), 100):
        assert watch.observe(logs[k : k + 100], clicks[2 * k : 2 * k + 200]) is False
    assert watch.monitor.observed > 2900
    assert abs(watch.report()["ctr"] - 0.3) < 0.1


# -- the service, end to end -----------------------------------------------------------------

def trainings(outcome: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("streamrec_trainings_total", {"outcome": outcome, "reason": reason})
    return value or 0.0


@pytest.fixture
def drift_settings(settings: Settings) -> Settings:
    s = watch_settings(settings, seq_epochs=1, seq_dim=8, seq_max_len=10, ranker_min_lists=10**6)
    return s.model_copy(update={"metrics": s.metrics.model_copy(update={"port": 0})})


@pytest.fixture
def service(drift_settings: Settings, start_worker: Callable[..., WorkerProcess]
            ) -> Iterator[Callable[[], dict[str, Any] | None]]:
    """A stream worker with some history applied, and the trainer service in a thread; yields
    a function that reads the trainer's status (its heartbeat in Redis)."""
    s = drift_settings
    store = StateStore.from_settings(s)
    worker = start_worker("w1")
    history = [click(f"h{u}", f"m{(u + k) % 7}", T0 - 10**7 + (u * 5 + k) * 1000, f"h{u}-{k}")
               for u in range(20) for k in range(5)]
    with Publisher.from_settings(s) as pub:
        pub.send_all(history)
        pub.flush()
    wait_applied(store, len(history), workers=[worker])
    stop = threading.Event()
    thread = threading.Thread(target=trainer.train_service, args=(s,), daemon=True,
                              kwargs=dict(every_s=3600.0, after_events=10**9, epochs=1, stop=stop.is_set))
    thread.start()

    def status() -> dict[str, Any] | None:
        return next((w for w in store.registry.workers() if w.get("role") == "trainer"), None)

    try:
        yield status
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


@pytest.mark.slow
def test_trainer_retrains_the_ranker_when_the_click_through_rate_drops(
        drift_settings: Settings, service: Callable[[], dict[str, Any] | None]) -> None:
    s = drift_settings
    # the first scheduled round (at start), and the drift watch started after it
    first = wait_for(lambda: (st := service()) and st["rounds"] >= 1 and "drift" in st and st,
                     timeout_s=60, what="the first scheduled round")
    assert first["last_round"]["reason"] == "schedule" and first["drift"]["detector"] == "adwin"
    before = trainings("skipped", "drift")
    # live traffic served by the new model: a click-through rate of 0.4, then 0.02
    logs, clicks = traffic(random.Random(7), [(400, 0.4), (400, 0.02)], T0,
                           computed_at=int(time.time() * 1000))
    clicks.append(click("clock", "a", logs[-1].as_of + 60_000, "clock"))  # closes every window
    producer = kafka_wiring.producer(s.kafka)
    try:
        for log in logs:
            producer.send(s.kafka.served_topic, key=(log.user or "").encode(), value=encode_log(log),
                          timestamp_ms=log.computed_at)
        producer.flush(30)
    finally:
        producer.close()
    with Publisher.from_settings(s) as pub:
        pub.send_all(clicks)
        pub.flush()
    st = wait_for(lambda: (st := service()) and st["rounds"] >= 2 and st, timeout_s=60,
                  what="a round started by drift")
    assert st["last_round"]["reason"] == "drift"
    assert st["drift"]["detections"] == 1
    assert st["rounds"] == 2  # the schedule did not run again: only the ranker was retrained
    assert trainings("skipped", "drift") == before + 1  # skipped: ranker_min_lists is out of reach
