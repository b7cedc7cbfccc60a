"""Redis Cluster: a real three-node cluster (redis-server processes, ``redis-cli --cluster
create``), skipped where no redis-server binary exists.

Unit level: every script call a StateStore, RecStore or the serving reads send names keys of
one hash slot (the grouping itself, then the real cluster, which refuses anything else), the
grouped calls leave the same state as the standalone multi-user calls, scripts lost by every
primary are loaded again, registry transactions, SCAN and deletes across slots, used memory.

End to end: the same events applied by a stream worker and read by a serving worker on the
cluster and on a standalone Redis give the same session state, learner state and
recommendation lists; a `streamrec replay` on the cluster rebuilds the same state.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
from kafka.partitioner.default import murmur2
from redis.cluster import RedisCluster

from streamrec.infra.keys import Keys
from streamrec.infra.recstore import RecStore
from streamrec.infra.redisconn import SlotCalls, connect, slot_of, used_memory
from streamrec.infra.settings import Settings, env_for
from streamrec.infra.state import StateStore
from streamrec.models.events import Click, Impression, Shown
from streamrec.models.learners import Update
from streamrec.models.session import UserEventRow
from streamrec.serving.reads import SharedReads
from streamrec.serving.worker import ServingWorker
from tests.conftest import WorkerProcess, wait_applied
from tests.support import close, wait_for
from tests.test_worker import expected, expected_learning, items_of, publish, users_of

REDIS_SERVER, REDIS_CLI = shutil.which("redis-server"), shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(not (REDIS_SERVER and REDIS_CLI),
                                reason="Redis Cluster tests need the redis-server and redis-cli binaries")

T0 = 1_700_000_000_000


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-primary Redis Cluster (no replicas, no persistence), killed afterwards."""
    folder = tmp_path_factory.mktemp("cluster")
    ports: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(3):
            port = _free_cluster_port()
            while port in ports:
                port = _free_cluster_port()
            ports.append(port)
            with open(folder / f"node-{port}.log", "wb") as out:
                procs.append(subprocess.Popen(
                    [str(REDIS_SERVER), "--cluster-enabled", "yes",
                     "--cluster-config-file", str(folder / f"nodes-{port}.conf"), "--port", str(port),
                     "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
                    stdout=out, stderr=subprocess.STDOUT, cwd=folder))
        for port in ports:
            wait_for(lambda: _pings(port), 20, f"cluster node {port}")
        created = subprocess.run(
            [str(REDIS_CLI), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        for port in ports:
            wait_for(lambda: "cluster_state:ok" in subprocess.run(
                [str(REDIS_CLI), "-p", str(port), "cluster", "info"], capture_output=True, text=True).stdout,
                30, f"cluster_state:ok on {port}")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(10)


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def on_cluster(s: Settings, url: str, **kafka: Any) -> Settings:
    """``s`` with Redis on the cluster (same key prefix, topics, group unless given)."""
    return s.model_copy(update={
        "redis": s.redis.model_copy(update={"url": url, "cluster": True, "embedded": False}),
        "kafka": s.kafka.model_copy(update=kafka),
    })


@pytest.fixture
def cluster_settings(settings: Settings, cluster_url: str) -> Iterator[Settings]:
    s = on_cluster(settings, cluster_url)
    yield s
    StateStore.from_settings(s).drop_everything()


# -- the grouping ------------------------------------------------------------------------------


def test_slot_calls_put_one_slot_in_each_call_and_keep_the_bound() -> None:
    ns = Keys("sr").ns("v1")
    users = [f"u{i}" for i in range(3000)]
    packer = SlotCalls(["h"], 5, by_slot=True)
    for k, user in enumerate(users):
        packer.add(ns.user_keys(user), [k], 1 + k % 3, [user])
    calls = packer.calls()
    assert sorted(u for c in calls for u in c.members) == sorted(users)  # each user once
    for call in calls:
        assert len({slot_of(key) for key in call.keys}) == 1, call.keys[:8]
        assert call.args[0] == "h" and call.cost < 5 + 3
    assert len(calls) < len(users)  # users sharing a slot share calls
    assert max(len(c.members) for c in calls) > 1
    # Without slots: the units in the order given, a call closed as soon as it is full.
    plain = SlotCalls(["h"], 5, by_slot=False)
    for k, user in enumerate(users[:10]):
        plain.add(ns.user_keys(user), [k], 2, [user])
    assert [c.members for c in plain.calls()] == [users[0:3], users[3:6], users[6:9], users[9:10]]
    assert plain.calls()[0].args == ["h", 0, 1, 2]
    with pytest.raises(ValueError, match="several hash slots"):
        SlotCalls([], 5, by_slot=True).add([ns.session_seq("a"), ns.session_seq("b")], [], 1, ["x"])


def _rows(n_users: int, per_user: int) -> list[UserEventRow]:
    rng = random.Random(3)
    rows = []
    for i in range(n_users * per_user):
        user = f"u{i % n_users}"
        if rng.random() < 0.2:
            rows.append(UserEventRow(user, "i", f"e{i}", "", T0 + i * 1000, i, f"r{i}", "web",
                                     tuple((f"i{rng.randrange(200)}", p) for p in range(3))))
        else:
            rows.append(UserEventRow(user, "c", f"e{i}", f"i{rng.randrange(200)}", T0 + i * 1000, i, "", ""))
    return rows


def _updates(n_items: int) -> list[tuple[str, int, list[Update]]]:
    rng = random.Random(4)
    out = []
    for offset in range(300):
        a, b = f"i{rng.randrange(n_items)}", f"i{rng.randrange(n_items)}"
        out.append(("t.events:0", offset, [Update(a, "p", b, -1.5), Update(b, "p", a, -1.5),
                                           Update(a, "n", "", 0.0), Update(b, "b", "e", -2.0)]))
    return out


def test_every_script_call_names_one_slot_and_leaves_the_standalone_state(
    settings: Settings, store: StateStore, cluster_settings: Settings
) -> None:
    """With cluster on, batches of many users and items (every call would span slots) are
    applied without a CROSSSLOT refusal (redis-py refuses a multi-slot EVALSHA before sending
    it; the server would too), and the state equals the standalone multi-user calls'."""
    cl = StateStore.from_settings(cluster_settings)
    assert isinstance(cl.client, RedisCluster) and cl.per_user_calls and not store.per_user_calls
    rows = _rows(400, 4)
    updates = _updates(150)
    trending = [("t.events:0", k, "c", f"i{k % 50}", repr(-1.0 - k / 1000)) for k in range(200)]
    items = sorted({r.item for r in rows if r.item})

    def apply_all(s: StateStore, ns: Any) -> None:
        got = s.apply_user_events(ns, rows)
        assert len(got) == len(rows)
        assert s.apply_item_updates(ns, updates) > 0
        s.aggregate = False  # the record-by-record path too
        s.apply_item_updates(ns, [(src, off + 1000, ops) for src, off, ops in updates])
        s.aggregate = True
        s.apply_trending(ns, trending)
        s.record_progress(ns, {"t.events:0": 1600, "t.events:1": 7})

    for s in (store, cl):
        s.registry.ensure()
        apply_all(s, s.live())
    live_std, live_cl = store.live().name, cl.live().name
    users = {r.user for r in rows}
    assert cl.snapshot(live_cl) == store.snapshot(live_std) != {}
    assert cl.users(live_cl) == store.users(live_std) and len(store.users(live_std)) > 390  # SCAN: every primary
    wanted = {f"i{k}" for k in range(200)}
    assert cl.learner_snapshot(live_cl, wanted) == store.learner_snapshot(live_std, wanted)
    assert cl.progress(cl.live()) == store.progress(store.live())
    # The serving side: dirty feed, lists, item reads, sessions.
    for s in (store, cl):
        rec = RecStore(s, 4)
        rec.mark_dirty({u: (k % 4, k, T0, T0) for k, u in enumerate(sorted(users))})
        pending, _ = rec.claim(1000, 60_000)
        assert len(pending) == len(users)
        rec.failed(pending[:10], 1, 10)
        assert rec.done(pending[10:]) == 0
        assert rec.write_recs([(u, 1, {"items": "[]"}) for u in sorted(users)] + [(None, 1, {"items": "[]"})],
                              60_000) == [True] * (len(users) + 1)
        reads = SharedReads(rec, settings.serving)
        sessions = reads.sessions.read(sorted(users) + [None], s.live())
        assert sum(len(x) for x in sessions.items) == sum(r.kind == "c" for r in rows)
        rows_of = reads.items.rows(items)
        reads.items.ensure(rows_of, s.live(), time.monotonic())
        assert reads.neighbours.get(list(rows_of[:50]), 10, s.live(), time.monotonic())
    # Grouping by slot on a standalone Redis (how the tests force it) gives the same state.
    forced = StateStore.from_settings(settings)
    forced.per_user_calls = True
    apply_all(forced, forced.keys.ns("v9"))
    assert forced.snapshot("v9") == store.snapshot(live_std)
    assert forced.learner_snapshot("v9", wanted) == store.learner_snapshot(live_std, wanted)
    # the calls a batch makes: users grouped by slot, each call bounded
    calls = []
    original = cl._run_pipeline
    cl._run_pipeline = lambda c: calls.extend(c) or original(c)  # type: ignore[method-assign]
    many = _rows(3000, 1)  # 3,000 users: some share a slot
    cl.apply_user_events(cl.keys.ns("v8"), many)
    assert len(calls) == len({slot_of(cl.keys.ns("v8").session_seq(r.user)) for r in many})
    for _, keys, args in calls:
        assert len({slot_of(k) for k in keys}) == 1
    assert max(len(keys) for _, keys, _ in calls) > 6  # several users in one call


def test_lost_scripts_are_loaded_on_every_primary_and_transactions_work(cluster_settings: Settings) -> None:
    cl = StateStore.from_settings(cluster_settings)
    client = cl.client
    assert isinstance(client, RedisCluster)
    cl.registry.ensure()
    ns = cl.live()
    rows = _rows(200, 2)
    flush = lambda: [n.redis_connection.script_flush() for n in client.get_primaries()]  # noqa: E731
    flush()  # what a restart does to every primary
    assert not any(client.script_exists(cl._apply.sha))
    cl.apply_user_events(ns, rows)  # NOSCRIPT: loaded again (on every primary), sent again
    for node in client.get_primaries():
        assert node.redis_connection.script_exists(cl._apply.sha) == [True]
    assert len(cl.snapshot(ns.name)) == len({r.user for r in rows if r.kind == "c"}) > 150
    rec = RecStore(cl, 4)
    flush()
    rec.mark_dirty({"u1": (1, 5, T0, T0), "u2": (2, 5, T0, T0)})
    assert rec.write_recs([("u1", 1, {"items": "[]"})], 1000) == [True]
    flush()
    assert len(SharedReads(rec, cluster_settings.serving).sessions.read(["u1", "u2"], ns).items) == 2
    # registry transactions (MULTI/EXEC on {reg} keys), a rebuild and its switch
    building = cl.registry.begin_rebuild("v2", {})
    cl.apply_user_events(building, rows)
    assert cl.registry.switch("v2") == ns.name and cl.live().name == "v2"
    assert cl.registry.drop(ns.name) > 0  # keys of many slots
    assert not list(client.scan_iter(match=ns.pattern(), count=1000))
    memory = used_memory(client)
    per_node = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    assert len(per_node) == 3 and memory > max(int(v["used_memory"]) for v in per_node.values())
    assert cl.drop_everything() > 0
    assert not list(client.scan_iter(match=cl.keys.all_pattern(), count=1000))


def test_connect_makes_a_cluster_client_and_refuses_a_database(cluster_url: str) -> None:
    from streamrec.infra.settings import RedisSettings
    from streamrec.models.errors import ConfigError
    client = connect(RedisSettings(url=cluster_url, cluster=True))
    assert isinstance(client, RedisCluster) and client.ping()
    client.close()
    with pytest.raises(ConfigError, match="only database 0"):
        connect(RedisSettings(url=cluster_url.replace("/0", "/3"), cluster=True))
    with pytest.raises(redis.exceptions.ConnectionError, match="cannot be reached"):
        connect(RedisSettings(url="redis://127.0.0.1:1/0", cluster=True), socket_connect_timeout=0.3)


# -- end to end --------------------------------------------------------------------------------


def partition_of(user: str, partitions: int) -> int:
    """The events partition of a user (kafka-python's default partitioner, key = the user)."""
    return (murmur2(user.encode()) & 0x7FFFFFFF) % partitions


def pool_events(n: int, users: int, partitions: int, seed: int) -> list[Click | Impression]:
    """Clicks (some answering impressions) where each partition's users click and are shown
    items of that partition's own pool: every item's learner state is then written by one
    partition, in offset order, so (with one record per batch) two runs add the same floats in
    the same order and the states are equal bit for bit."""
    rng = random.Random(seed)
    out: list[Click | Impression] = []
    shown_to: dict[str, Impression] = {}
    for i in range(n):
        user = f"u{rng.randrange(users)}"
        pool = partition_of(user, partitions)
        item = lambda: f"p{pool}-i{rng.randrange(12)}"  # noqa: E731
        ts = T0 + i * 1000 + rng.randrange(-60_000, 60_000)
        if rng.random() < 0.15:
            imp = Impression(id=f"e{i}", timestamp=ts, user=user, request_id=f"r{i}",
                             segment=rng.choice([None, "web"]),
                             items=[Shown(item=item(), position=p) for p in range(4)])
            shown_to[user] = imp
            out.append(imp)
        elif user in shown_to and rng.random() < 0.5:
            imp = shown_to.pop(user)
            out.append(Click(id=f"e{i}", timestamp=ts, user=user, request_id=imp.request_id,
                             item=rng.choice(imp.items).item))
        else:
            out.append(Click(id=f"e{i}", timestamp=ts, user=user, item=item()))
    return out


def serve_until_listed(s: Settings, worker_id: str, users: set[str]) -> dict[str | None, dict[str, Any]]:
    """Run a serving worker until every user has a list and nobody waits; the lists."""
    serving = ServingWorker(s, worker_id, log_served=False)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    try:
        rec = serving.recstore
        wait_for(lambda: all(rec.read_recs(u, fallback=False) for u in users) and rec.backlog() == 0
                 and rec.read_recs(None), 90, f"{worker_id}: every user's list")
        return {u: rec.read_recs(u, fallback=False) for u in [*sorted(users), None]}  # type: ignore[misc]
    finally:
        serving.stop_event.set()
        thread.join(20)
        serving.close()


def comparable(recs: dict[str | None, dict[str, Any]]) -> dict[str | None, Any]:
    """What a list says (not when or by which request it was computed)."""
    return {u: (r["items"], r["scores"], r["sources"]) for u, r in recs.items()}


@pytest.mark.slow
def test_a_worker_and_serving_on_the_cluster_equal_standalone_and_a_replay_equals_live(
    settings: Settings, store: StateStore, cluster_settings: Settings, tmp_path: Path
) -> None:
    serving_cfg = {"k": 8, "sources": ["cf", "trend"], "explore_slots": 0, "trending_candidates": 20,
                   "cf_candidates": 30, "stats_ttl_s": 0.0, "neighbours_ttl_s": 0.0, "default_every_s": 0.2,
                   "block_ms": 20, "model_poll_s": 60.0}
    std = settings.model_copy(update={
        "worker": settings.worker.model_copy(update={"batch_size": 1}),
        "serving": settings.serving.model_copy(update=serving_cfg)})
    cl = on_cluster(std, cluster_settings.redis.url, group_id=settings.kafka.group_id + "-cl")
    events = pool_events(1500, users=60, partitions=settings.kafka.partitions, seed=11)
    published = publish(settings, events)
    assert all(p == partition_of(e.user, settings.kafka.partitions) for e, p, _ in published)
    cl_store = StateStore.from_settings(cl)
    workers = [WorkerProcess(std, "w-std", tmp_path / "std.log"), WorkerProcess(cl, "w-cl", tmp_path / "cl.log")]
    try:
        wait_applied(store, len(published), workers=workers[:1], timeout_s=240)
        wait_applied(cl_store, len(published), workers=workers[1:], timeout_s=240)
    finally:
        for w in workers:
            w.stop()
    users, items = users_of(events), items_of(events)
    live_std, live_cl = store.live().name, cl_store.live().name
    state = store.snapshot(live_std, users)
    assert state == expected(settings, published)  # the standalone side is right...
    assert cl_store.snapshot(live_cl, users) == state  # ...and the cluster's is the same, exactly
    learned = store.learner_snapshot(live_std, items)
    assert close(learned, expected_learning(settings, published))
    assert cl_store.learner_snapshot(live_cl, items) == learned  # bit for bit (see pool_events)

    clicked = set(state)
    lists_std = serve_until_listed(std, "serve-std", clicked)
    lists_cl = serve_until_listed(cl, "serve-cl", clicked)
    assert any(len(r["items"]) == 8 for r in lists_std.values())
    assert comparable(lists_cl) == comparable(lists_std)

    # `streamrec replay` on the cluster (settings through the environment, as for the workers)
    proc = subprocess.run([sys.executable, "-m", "streamrec", "replay", "--no-switch"], cwd=tmp_path,
                          env={**os.environ, **env_for(cl)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert summary["read"] == len(published) and summary["verification"]["mismatched_users"] == 0
    assert cl_store.snapshot(summary["namespace"], users) == state
    # A replay applies big batches (several records of an item summed before they are added):
    # the same sums in another order of addition, equal to 1e-9 relative.
    assert close(cl_store.learner_snapshot(summary["namespace"], items), learned)
