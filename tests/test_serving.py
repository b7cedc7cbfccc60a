"""Serving against the real broker and Redis: a click changes the user's list, unknown users
read the default list, a hot-swapped ranker serves the next request with none failing, and a
new catalog item is recommended before anyone clicks it."""

from __future__ import annotations

import random
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest

from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.errors import StateLost
from streamrec.models.events import Click, Item
from streamrec.serving import trainer
from streamrec.serving.engine import Engine, ModelSet, Request
from streamrec.serving.worker import ServingWorker
from streamrec.streams.launch import WorkerProcess, wait_applied
from streamrec.streams.sdk import Publisher, Reader
from tests.support import wait_for

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000
CLUSTERS = 4
PER = 10


def item_of(c: int, j: int) -> str:
    return f"m{c}-{j}"


def history(users: int, clicks_each: int, seed: int = 0) -> list[Click]:
    """Each user browses one cluster of items, mostly in order (so sequences carry signal)."""
    rng = random.Random(seed)
    out = []
    for u in range(users):
        c = u % CLUSTERS
        j = rng.randrange(PER)
        for k in range(clicks_each):
            j = (j + 1) % PER if rng.random() < 0.8 else rng.randrange(PER)
            out.append(Click(id=f"h{u}-{k}", timestamp=T0 + (u * clicks_each + k) * 1000,
                             user=f"u{u}", item=item_of(c, j)))
    return out


def catalog() -> list[Item]:
    return [Item(id=f"it-{c}-{j}", timestamp=T0, item=item_of(c, j), title=f"Movie {c} {j}",
                 tags=[f"genre{c}"], created_at=T0) for c in range(CLUSTERS) for j in range(PER)]


@pytest.fixture
def serve_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "serving": settings.serving.model_copy(update={
            "k": 10, "explore_slots": 2, "seq_candidates": 30, "cf_candidates": 30,
            "trending_candidates": 20, "explore_pool": 50, "stats_ttl_s": 0.0,
            "default_every_s": 0.3, "model_poll_s": 0.1, "block_ms": 20,
        }),
        "trainer": settings.trainer.model_copy(update={"seq_epochs": 15, "seq_dim": 16, "seq_max_len": 20,
                                                       "ranker_min_lists": 5, "ranker_trees": 30}),
    })


@contextmanager
def running_pipeline(s: Settings, start_worker: Callable[..., WorkerProcess],
                     serve_id: str = "serve-test") -> Iterator[dict[str, Any]]:
    """A stream worker process and a serving worker thread, with some history applied."""
    store = StateStore.from_settings(s)
    worker = start_worker("w1")
    clicks = history(24, 12)
    with Publisher.from_settings(s) as pub:
        pub.send_all(catalog())
        pub.send_all(clicks)
        pub.flush()
    wait_applied(store, len(clicks) + CLUSTERS * PER, workers=[worker])
    serving = ServingWorker(s, serve_id)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    try:
        yield {"settings": s, "store": store, "serving": serving, "clicks": clicks, "worker": worker}
    finally:
        serving.stop_event.set()
        thread.join(20)
        serving.close()


@pytest.fixture
def pipeline(serve_settings: Settings, start_worker: Callable[..., WorkerProcess]) -> Iterator[dict[str, Any]]:
    with running_pipeline(serve_settings, start_worker) as p:
        yield p


def click(settings: Settings, user: str, item: str, ts: int, eid: str) -> None:
    with Publisher.from_settings(settings) as pub:
        pub.send(Click(id=eid, timestamp=ts, user=user, item=item))
        pub.flush()


def test_a_click_changes_the_users_list_and_unknown_users_read_the_default(pipeline: dict[str, Any]) -> None:
    s: Settings = pipeline["settings"]
    reader = Reader.from_settings(s)
    default = wait_for(lambda: reader.recommendations("nobody-yet"), what="default list")
    assert default["default"] is True
    assert len(default["items"]) == s.serving.k
    assert set(default["sources"]) <= {"trend", "explore", "trend+explore"}
    # the user clicks: a list of their own appears, built from their state
    click(s, "u1", item_of(1, 3), T0 + 10_000_000, "c1")
    # (u1 has history: the list of that history may still be written first; wait for the click's)
    first = wait_for(lambda: (r := reader.recommendations("u1", fallback=False)) and r["as_of"] == T0 + 10_000_000 and r,
                     what="u1's list as of the click")
    assert first["default"] is False and len(first["items"]) == s.serving.k
    assert item_of(1, 3) not in first["items"]  # just seen: filtered
    assert any("cf" in src for src in first["sources"])  # personalised: CF neighbours of the session
    # another click changes it again, newer version
    click(s, "u1", item_of(1, 4), T0 + 10_001_000, "c2")
    second = wait_for(lambda: (r := reader.recommendations("u1", fallback=False)) and r["version"] > first["version"] and r,
                      what="u1's list after the second click")
    assert item_of(1, 4) not in second["items"]
    assert second["as_of"] == T0 + 10_001_000
    assert second["items"] != first["items"] or second["request_id"] != first["request_id"]
    # a user with no list still reads the default one
    assert reader.recommendations("stranger")["default"] is True
    assert pipeline["serving"].stats.errors == 0


def test_sequence_model_and_ranker_hot_swap_without_failing_requests(pipeline: dict[str, Any]) -> None:
    s: Settings = pipeline["settings"]
    serving: ServingWorker = pipeline["serving"]
    store: StateStore = pipeline["store"]
    recstore = RecStore(store, s.kafka.partitions)
    reader = Reader.from_settings(s)
    # publish a sequence model: the next lists use it (seq source appears)
    report = trainer.train_once(s, seq=True, ranker=False)
    seq_version = report["seq"]["version"]
    wait_for(lambda: serving.engine.models.seq_version == seq_version, what="sequence model swap")
    rng = random.Random(1)
    sent: list[tuple[str, int]] = []
    stop = threading.Event()

    def traffic() -> None:  # clicks keep arriving during the swap
        n = 0
        with Publisher.from_settings(s) as pub:
            while not stop.is_set():
                u = rng.randrange(24)
                ts = T0 + 20_000_000 + n * 1000
                pub.send(Click(id=f"t{n}", timestamp=ts, user=f"u{u}", item=item_of(u % CLUSTERS, rng.randrange(PER))))
                pub.flush()
                sent.append((f"u{u}", ts))
                n += 1
                time.sleep(0.02)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(sent) >= 120, what="traffic")
        lists = wait_for(lambda: (r := reader.recommendations(sent[-1][0], fallback=False))
                         and f"seq={seq_version}" in r["model"] and r, what="a list with the new sequence model")
        assert any("seq" in src for src in lists["sources"])
        # train a ranker on the served log joined with the clicks that followed
        serving._producer.flush(10)
        report = trainer.train_once(s, seq=False, ranker=True)
        assert "version" in report["ranker"], report
        ranker_version = report["ranker"]["version"]
        before = len(sent)
        wait_for(lambda: serving.engine.models.ranker.version == ranker_version, what="ranker swap")
        # the next request after the swap is served by the new ranker
        wait_for(lambda: len(sent) >= before + 10, what="more traffic")
    finally:
        stop.set()
        t.join(10)
    user, ts = sent[-1]
    latest = wait_for(lambda: (r := reader.recommendations(user, fallback=False)) and r["as_of"] == ts and r,
                      what="the last click's list")
    assert f"ranker={ranker_version}" in latest["model"]
    # no request failed: every clicking user has a list as of their last click
    last: dict[str, int] = {}
    for u, ts in sent:
        last[u] = ts
    wait_for(lambda: all((r := reader.recommendations(u, fallback=False)) and r["as_of"] == ts for u, ts in last.items()),
             what="every user's list up to date")
    assert serving.stats.errors == 0
    assert serving.stats.swaps >= 2
    assert recstore.model_info("ranker")["info"]["n_groups"] >= s.trainer.ranker_min_lists


def test_new_catalog_item_is_recommended_before_its_first_click(pipeline: dict[str, Any]) -> None:
    s: Settings = pipeline["settings"]
    serving: ServingWorker = pipeline["serving"]
    reader = Reader.from_settings(s)
    trainer.train_once(s, seq=True, ranker=False)
    wait_for(lambda: serving.engine.models.seq is not None, what="sequence model")
    with Publisher.from_settings(s) as pub:
        pub.item("brand-new", title="Movie 2 sequel", tags=["genre2"], timestamp=T0 + 30_000_000)
        pub.flush()
    # the default list (trending + exploration) shows it
    wait_for(lambda: "brand-new" in reader.recommendations("nobody")["items"], what="new item in the default list")
    # it has a content vector in the index: retrievable by the session embedding
    assert "brand-new" in serving.engine.models.index
    # a user who clicks gets it too (exploration slot or content neighbour), without any click on it
    click(s, "u2", item_of(2, 1), T0 + 30_001_000, "n1")
    got = wait_for(lambda: (r := reader.recommendations("u2", fallback=False)) and r["as_of"] == T0 + 30_001_000 and r,
                   what="u2's list")
    assert "brand-new" in got["items"]
    store: StateStore = pipeline["store"]
    assert store.learner_snapshot(store.live().name, ["brand-new"])["item_cf"]["counts"] == {}  # never clicked


def test_engine_refresh_direct(serve_settings: Settings, store: StateStore) -> None:
    """The engine on an empty state: the default list is empty, not an error; with no state
    at all (no registry: nothing applied, or Redis lost it) nothing is computed."""
    recstore = RecStore(store, serve_settings.kafka.partitions)
    engine = Engine(serve_settings, store, recstore, ModelSet())
    with pytest.raises(StateLost):
        engine.refresh([Request(None)])
    store.registry.ensure()
    served = engine.refresh([Request(None), Request("ghost")])
    assert [s.items for s in served] == [[], []]


# -- the dirty-user feed: coalescing, sharing, retries ----------------------------------------------


def applied_history(s: Settings, start_worker: Callable[..., WorkerProcess], extra: list[Click]) -> tuple[StateStore, WorkerProcess]:
    store = StateStore.from_settings(s)
    worker = start_worker("w1")
    clicks = history(12, 6) + extra
    with Publisher.from_settings(s) as pub:
        pub.send_all(catalog())
        pub.send_all(clicks)
    wait_applied(store, len(clicks) + CLUSTERS * PER, workers=[worker])
    return store, worker


def drain(serving: ServingWorker, recstore: RecStore, timeout_s: float = 30.0) -> None:
    serving._next = {"default": float("inf"), "models": float("inf"), "status": float("inf")}
    deadline = time.monotonic() + timeout_s
    while recstore.backlog() and time.monotonic() < deadline:
        serving._step()
    assert recstore.backlog() == 0


def test_many_quick_clicks_make_one_refresh_that_reflects_the_last(
    serve_settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    s = serve_settings
    burst = [Click(id=f"b{k}", timestamp=T0 + 50_000_000 + k, user="u3", item=item_of(3, k % PER)) for k in range(30)]
    store, _ = applied_history(s, start_worker, burst)  # all applied before any serving runs
    recstore = RecStore(store, s.kafka.partitions)
    assert recstore.backlog() == 12  # one pending refresh per user, however many clicks
    serving = ServingWorker(s, "serve-once")
    try:
        drain(serving, recstore)
    finally:
        serving.close()
    assert serving.stats.refreshed == 12  # each user refreshed once
    got = recstore.read_recs("u3", fallback=False)
    assert got is not None and got["as_of"] == burst[-1].timestamp  # with the state of the last click
    status = wait_for(lambda: next((w for w in store.registry.workers() if w["worker"] == "w1"), None),
                      what="the stream worker's status")
    assert status["coalesced"] >= len(burst) + 12 * 6 - 12 - 1, status  # every other click's refresh was saved


def test_two_serving_processes_share_the_work_and_every_list_ends_up_current(
    serve_settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Any
) -> None:
    s = serve_settings
    store, worker = applied_history(s, start_worker, [])
    servers = [WorkerProcess(s, f"s{n}", tmp_path / f"serve-{n}.log", command="serve") for n in range(2)]
    try:
        # both up (each reports its status once it serves) before the clicks arrive
        wait_for(lambda: {"s0", "s1"} <= {w["worker"] for w in store.registry.workers()}, timeout_s=60,
                 what="both serving workers' status")
        rng = random.Random(3)
        last: dict[str, int] = {}
        with Publisher.from_settings(s) as pub:
            for k in range(600):
                user = f"v{rng.randrange(150)}"
                ts = T0 + 60_000_000 + k * 10
                pub.click(user, item_of(rng.randrange(CLUSTERS), rng.randrange(PER)), timestamp=ts, event_id=f"t{k}")
                last[user] = ts
                time.sleep(0.002)
        recstore = RecStore(store, s.kafka.partitions)
        wait_for(lambda: all((r := recstore.read_recs(u, fallback=False)) and r["as_of"] == ts for u, ts in last.items()),
                 timeout_s=90, what="every user's list as of their last click")
        # each reports its counts every 2 s: both took a share
        wait_for(lambda: all(w["refreshed"] > 0 for w in store.registry.workers() if w["worker"] in ("s0", "s1")),
                 timeout_s=10, what="both serving workers' refresh counts")
        assert recstore.backlog() == 0
    finally:
        for server in servers:
            server.stop()


class _Flaky:
    """A candidate source that raises for one user the first two times it sees them."""

    name = "flaky"
    failures = 0

    def __init__(self, context: Any) -> None:
        pass

    @staticmethod
    def limit(settings: Settings) -> int:
        return 5

    def retrieve(self, batch: Any, limit: int) -> list[Any]:
        from streamrec.serving.sources import Retrieved
        if "boom" in batch.users and _Flaky.failures < 2:
            _Flaky.failures += 1
            raise RuntimeError("a bug that only this user's input triggers")
        return [Retrieved.empty() for _ in range(len(batch))]


def test_a_refresh_that_raises_leaves_the_user_dirty_and_it_is_retried(
    serve_settings: Settings, start_worker: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamrec.serving import sources
    monkeypatch.setitem(sources.REGISTRY, "flaky", _Flaky)
    s = serve_settings.model_copy(update={"serving": serve_settings.serving.model_copy(update={
        "sources": ["flaky", "cf", "trend", "explore"], "retry_base_s": 0.2})})
    store, _ = applied_history(s, start_worker, [Click(id="boom-1", timestamp=T0 + 70_000_000, user="boom",
                                                       item=item_of(0, 1))])
    recstore = RecStore(store, s.kafka.partitions)
    serving = ServingWorker(s, "serve-flaky")
    try:
        drain(serving, recstore)
    finally:
        serving.close()
    assert _Flaky.failures == 2 and serving.stats.failed > 0  # it raised twice ...
    got = recstore.read_recs("boom", fallback=False)
    assert got is not None and got["as_of"] == T0 + 70_000_000  # ... stayed dirty, and was refreshed
    assert recstore.backlog() == 0
