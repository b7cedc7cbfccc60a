"""The stream worker against the real broker and Redis.

Dead-lettering of every kind of bad input; kill -9 and restart equals one clean pass; two
workers in one group equal one; replay into a new namespace equals live state and the switch
is atomic for readers.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Callable

import pytest

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Click, Impression, Item, Shown, encode
from streamrec.models.learners import BetaBandit, ItemCF, Learners, Trending
from streamrec.streams.launch import wait_live
from streamrec.streams.replay import replay
from streamrec.streams.sdk import Publisher, Reader
from tests.conftest import WorkerProcess, wait_applied
from tests.support import close, expected_learners, expected_snapshot, row_of
from tests.test_events import BAD, NOW

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000


def make_events(n: int, users: int, seed: int, dup_every: int = 0) -> list[Click | Impression]:
    """Clicks with out-of-order times, some impressions, and (optionally) duplicated ids."""
    rng = random.Random(seed)
    out: list[Click | Impression] = []
    shown_to: dict[str, Impression] = {}
    for i in range(n):
        user = f"u{rng.randrange(users)}"
        ts = T0 + i * 1000 + rng.randrange(-120_000, 120_000)  # up to 2 min out of order
        if rng.random() < 0.15:
            imp = Impression(id=f"e{i}", timestamp=ts, user=user, request_id=f"r{i}",
                             segment=rng.choice([None, "web", "app"]),
                             items=[Shown(item=f"i{rng.randrange(300)}", position=p) for p in range(5)])
            shown_to[user] = imp
            out.append(imp)
        elif user in shown_to and rng.random() < 0.5:  # answers the user's last impression
            imp = shown_to.pop(user)
            out.append(Click(id=f"e{i}", timestamp=ts, user=user, request_id=imp.request_id,
                             item=rng.choice(imp.items).item))
        else:
            out.append(Click(id=f"e{i}", timestamp=ts, user=user, item=f"i{rng.randrange(300)}"))
        if dup_every and i % dup_every == 0 and i:
            out.append(Click(id=f"e{i}", timestamp=ts + 5, user=user, item="dup"))
    return out


def publish(settings: Settings, events: list[Any]) -> list[tuple[Any, int, int]]:
    """Publish and return (event, partition, offset) for each."""
    with Publisher.from_settings(settings) as pub:
        futures = [(e, pub.send(e)) for e in events]
        pub.flush()
        out = []
        for e, f in futures:
            meta = f.get(timeout_s=30)
            out.append((e, meta.partition, meta.offset))
    return out


def expected(settings: Settings, published: list[tuple[Any, int, int]]) -> dict[str, Any]:
    store = StateStore.from_settings(settings)
    return expected_snapshot([row_of(e, off) for e, _, off in published], store.session)


def expected_learning(settings: Settings, published: list[tuple[Any, int, int]]) -> dict[str, Any]:
    store = StateStore.from_settings(settings)
    learners = Learners(ItemCF(store.cf), Trending(store.trending_config), BetaBandit(store.bandit))
    return expected_learners([row_of(e, off) for e, _, off in published], store.session, learners)


def items_of(events: list[Any]) -> set[str]:
    out = set()
    for e in events:
        out.update([e.item] if isinstance(e, Click) else [s.item for s in e.items])
    return out


def users_of(events: list[Any]) -> set[str]:
    return {e.user for e in events}


def read_dlq(settings: Settings, expect: int, timeout_s: float = 30) -> list[Any]:
    k = settings.kafka
    consumer = kafka_wiring.reader(k, [k.dlq_topic])
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                got.extend(records)
    finally:
        consumer.close()
    return got


def test_every_bad_input_is_dead_lettered_and_nothing_valid_is_lost(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    k = settings.kafka
    valid = make_events(400, users=20, seed=1)
    # BAD's "future" case is relative to a fixed clock; replace it by one relative to now.
    future = Click(id="f1", timestamp=int(time.time() * 1000) + 3 * 86_400_000, user="u1", item="i1")
    bad = [(raw, code) for raw, code in BAD if str(NOW + 2 * 86_400_000).encode() not in raw]
    bad.append((encode(future), "bad_timestamp"))
    with Publisher.from_settings(settings) as pub:
        futures = []
        for i, event in enumerate(valid):
            futures.append((event, pub.send(event)))
            if i % 10 == 0 and bad:
                raw, code = bad[(i // 10) % len(bad)]
                pub.send_raw(k.events_topic, b"u1", raw)
        # A valid event on the wrong topic, and an exact duplicate id for the same user.
        pub.send_raw(k.items_topic, b"u1", encode(valid[0]))
        dup = Click(id=valid[0].id, timestamp=valid[0].timestamp, user=valid[0].user, item="other")
        futures.append((dup, pub.send(dup)))
        pub.flush()
        published = [(e, f.get(30).partition, f.get(30).offset) for e, f in futures]
    n_bad = len(range(0, len(valid), 10)) + 2
    total = len(valid) + n_bad
    worker = start_worker()
    wait_applied(store, total, workers=[worker])

    dead = read_dlq(settings, n_bad)
    assert len(dead) == n_bad
    codes = [dict(r.headers)["streamrec.error.code"].decode() for r in dead]
    sent_codes = [bad[(i // 10) % len(bad)][1] for i in range(0, len(valid), 10)]
    assert sorted(codes) == sorted(sent_codes + ["wrong_topic", "duplicate"])
    for record in dead:
        headers = {key: value.decode() for key, value in record.headers}
        assert headers["streamrec.error.reason"]
        assert headers["streamrec.source.topic"] in (k.events_topic, k.items_topic)
        assert int(headers["streamrec.source.offset"]) >= 0
    # The original bytes travel unchanged.
    assert {bytes(r.value or b"") for r in dead} >= {raw for raw, _ in bad[:5]}

    # Every valid event is applied exactly once: the state equals the reference model.
    want = expected(settings, [p for p in published])
    assert store.snapshot(store.registry.live_name(), users_of(valid)) == want
    deadline = time.monotonic() + 10
    while not (status := store.registry.workers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status and status[0]["rejected"] == n_bad
    assert status[0]["event_loop"] == settings.worker.event_loop  # uvloop unless configured otherwise


def test_a_category_that_could_escape_a_key_is_dead_lettered(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Categories are part of key names (per-category trending): the worker dead-letters
    catalog records whose category is not an id, and applies the valid ones, whose category
    sets the trending script writes through the keys it is given."""
    k = settings.kafka
    T0 = 1_700_000_000_000
    bad = ["a{b}", "}", "{t}", "*", "x*y", "two words", "tab\tbed", "new\nline"]
    raw = [json.dumps({"type": "item", "id": f"c{n}", "timestamp": T0, "item": f"sku-{n}", "category": c}).encode()
           for n, c in enumerate(bad)]
    good = [Item(id="g1", timestamp=T0, item="sku-ok", category="kitchen"),
            Item(id="g2", timestamp=T0, item="sku-ok2", category="home:garden/tools")]
    clicks = [Click(id=f"k{n}", timestamp=T0 + n, user="u1", item=it)
              for n, it in enumerate(["sku-ok", "sku-ok2", "sku-ok", "sku-0"])]
    with Publisher.from_settings(settings) as pub:
        for value in raw:
            pub.send_raw(k.items_topic, b"sku", value)
        pub.send_all(good)
        pub.send_all(clicks)
    worker = start_worker()
    wait_applied(store, len(raw) + len(good) + len(clicks), workers=[worker])
    dead = read_dlq(settings, len(raw))
    assert sorted(bytes(r.value) for r in dead) == sorted(raw)
    assert {dict(r.headers)["streamrec.error.code"] for r in dead} == {b"bad_id"}
    ns = store.live()
    assert store.trending(10, "kitchen", ns.name) == ["sku-ok"]
    assert store.trending(10, "home:garden/tools", ns.name) == ["sku-ok2"]
    assert set(store.trending(10, None, ns.name)) == {"sku-ok", "sku-ok2", "sku-0"}
    keys = {key.decode() for key in store.client.scan_iter(match=f"{store.keys.prefix}:*", count=1000)}
    assert {key.split(":all:c:", 1)[1] for key in keys if ":all:c:" in key} == {"kitchen", "home:garden/tools"}
    assert not any(c in key for key in keys for c in ("a{b}", "x*y", "two words", "\t", "\n"))
    assert store.item("sku-0", ns.name) is None  # the rejected record left no catalog entry


def test_kill_9_and_restart_equals_one_clean_pass(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    events = make_events(30_000, users=300, seed=2, dup_every=97)
    published = publish(settings, events)
    worker = start_worker("w1", batch_size=200)
    live = wait_live(store, workers=[worker])
    # Kill it mid-stream, several times, then let a fresh worker finish.
    for _ in range(2):
        deadline = time.monotonic() + 60
        start = sum(store.progress(live).values())
        while sum(store.progress(live).values()) < start + 3000 and time.monotonic() < deadline:
            time.sleep(0.02)
        worker.kill()
        worker = start_worker("w1", batch_size=200)
    done_before = sum(store.progress(live).values())
    assert done_before < len(published), "the worker finished before it could be killed"
    wait_applied(store, len(published), workers=[worker])
    users = users_of(events)
    after_kills = store.snapshot(live.name, users)
    assert after_kills == expected(settings, published)
    # The online learners too: co-occurrence, counts, bandit sums and trending.
    learned = store.learner_snapshot(live.name, items_of(events))
    assert close(learned, expected_learning(settings, published))
    # A clean pass over the same records (a replay into a fresh namespace) gives the same state.
    summary = replay(settings, switch=False)
    assert summary.read == len(published)
    assert store.snapshot(summary.namespace, users) == after_kills
    assert close(store.learner_snapshot(summary.namespace, items_of(events)), learned)
    assert summary.verification["mismatched_users"] == 0


def test_two_workers_in_one_group_equal_one(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    events = make_events(20_000, users=400, seed=3, dup_every=211)
    w1 = start_worker("w1", batch_size=100)
    w2 = start_worker("w2", batch_size=100)
    time.sleep(3)  # let both join before the stream starts
    published = publish(settings, events)
    wait_applied(store, len(published), workers=[w1, w2])
    assert store.snapshot(store.registry.live_name(), users_of(events)) == expected(settings, published)
    assert close(store.learner_snapshot(store.registry.live_name(), items_of(events)),
                 expected_learning(settings, published))
    time.sleep(1.5)  # one more heartbeat
    read = {w["worker"]: w["read"] for w in store.registry.workers()}
    assert set(read) == {"w1", "w2"}
    assert all(n > 0 for n in read.values()), read  # both did part of the work


def test_replay_equals_live_and_the_switch_is_atomic_for_readers(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    events = make_events(6_000, users=50, seed=4)
    published = publish(settings, events)
    worker = start_worker()
    wait_applied(store, len(published), workers=[worker])
    users = sorted(users_of(events))
    old = store.snapshot(store.registry.live_name(), users)

    # A full replay equals the live state, and readers move to it.
    summary = replay(settings)
    assert summary.switched and summary.verification == {
        "accounted": True, "users": len(old), "mismatched_users": 0, "live_users": len(old),
        "compared_users": len(old), "only_rebuilt": 0}
    assert store.registry.live_name() == summary.namespace != summary.previous
    assert store.snapshot(summary.namespace, users) == old

    # A replay from an event time builds a different state; readers polling through the
    # switch see the old state or the new one for every user, never a mixture or nothing.
    since = T0 + 3_000 * 1000
    reader = Reader(StateStore.from_settings(settings))
    seen: list[tuple[str, Any]] = []
    stop = threading.Event()

    def poll() -> None:
        rng = random.Random(5)
        while not stop.is_set():
            user = rng.choice(users)
            view = reader.session(user)
            seen.append((user, (view.namespace, tuple(view.entries))))

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        partial = replay(settings, since_ms=since)
    finally:
        time.sleep(0.3)
        stop.set()
        thread.join()
    assert partial.switched and partial.skipped > 0
    new = store.snapshot(partial.namespace, users)
    want_new = expected(settings, [p for p in published if p[0].timestamp >= since])
    assert new == want_new
    assert new != old
    names = {summary.namespace: old, partial.namespace: new}
    namespaces_seen = set()
    for user, (name, entries) in seen:
        namespaces_seen.add(name)
        state = names[name].get(user)
        assert entries == (tuple(state["entries"]) if state else ())
    assert namespaces_seen == set(names), "readers should have seen both sides of the switch"
    # Live processing continues into the new namespace.
    more = publish(settings, [Click(id="late-1", timestamp=T0 + 10_000_000, user=users[0], item="fresh")])
    wait_applied(store, len(published) + len(more), namespace=partial.namespace, workers=[worker])
    assert reader.session(users[0]).entries[-1].item == "fresh"


def test_replay_finishes_under_live_traffic_and_misses_nothing(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    first = publish(settings, make_events(3_000, users=40, seed=6))
    worker = start_worker()
    wait_applied(store, len(first), workers=[worker])
    live_events = make_events(3_000, users=40, seed=7)
    live_events = [e.__class__(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "id": f"l{e.id}"})
                   for e in live_events]
    published: list[tuple[Any, int, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        with Publisher.from_settings(settings, linger_ms=0) as pub:
            for event in live_events:
                if stop.is_set():
                    break
                meta = pub.send(event).get(timeout_s=30)
                published.append((event, meta.partition, meta.offset))
                time.sleep(0.002)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(1.0)
        started = time.monotonic()
        # The comparison with live state happens while the workers are paused, so even
        # under traffic the rebuilt namespace must match the live one exactly.
        summary = replay(settings)
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
    assert summary.switched and summary.verification["accounted"]
    assert summary.verification["mismatched_users"] == 0
    assert took < 60 and summary.pause_s < 10
    everything = first + published
    wait_applied(store, len(everything), namespace=summary.namespace, workers=[worker])
    users = users_of([e for e, _, _ in everything])
    assert store.snapshot(summary.namespace, users) == expected(settings, everything)


def test_replay_backfills_state_that_redis_lost(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    events = make_events(4_000, users=60, seed=8)
    published = publish(settings, events)
    worker = start_worker()
    wait_applied(store, len(published), workers=[worker])
    time.sleep(2.5)  # let the group commit its offsets
    lost = store.live()
    keys = list(store.client.scan_iter(match=lost.pattern(), count=1000))
    store.client.delete(*keys)  # the live state is gone, progress included
    summary = replay(settings)  # nothing live differs: the users it brings back are counted apart
    assert summary.verification["mismatched_users"] == 0
    assert summary.verification["only_rebuilt"] == len(users_of(events))
    assert summary.switched and summary.read == len(published)
    assert store.snapshot(summary.namespace, users_of(events)) == expected(settings, published)
