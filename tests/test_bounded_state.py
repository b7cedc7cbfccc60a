"""Redis state is bounded: every key family expires or is capped (README "State in Redis").

On real Redis: the keys a batch writes carry their lifetimes; a stream of ever new users
levels off in memory once the inactive ones expire; trending sets keep their N highest; a
segment beyond the cap is not recorded, as in the reference bandit.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from streamrec.infra.embedded import EmbeddedRedis
from streamrec.infra.keys import Keys
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Click, Impression, Item, Shown
from streamrec.models.learners import BanditConfig, BetaBandit, Feedback, TrendingConfig
from streamrec.models.session import SessionConfig, Status, UserEventRow, UserState
from streamrec.streams.evaluate import Feeder
from tests.support import close

NOW = int(time.time() * 1000) - 3_600_000  # event times: an hour ago (the worker refuses the future)


def _with(settings: Settings, **sections: dict[str, object]) -> Settings:
    return settings.model_copy(update={
        name: getattr(settings, name).model_copy(update=fields) for name, fields in sections.items()
    })


def _user_events(user: str, t: int, items: list[str]) -> list[Click | Impression]:
    """An impression of ``items``, a click answering it (with a segment), three more clicks."""
    request = f"r-{user}"
    events: list[Click | Impression] = [
        Impression(id=f"{user}-imp", timestamp=t, user=user, request_id=request, segment="web",
                   items=[Shown(item=i, position=p) for p, i in enumerate(items[:5])]),
        Click(id=f"{user}-c0", timestamp=t + 1000, user=user, item=items[1], request_id=request, segment="web"),
    ]
    events += [Click(id=f"{user}-c{k}", timestamp=t + 1000 * (k + 1), user=user, item=items[(k * 7) % len(items)])
               for k in range(1, 4)]
    return events


ITEMS = [f"it{n}" for n in range(100)]
CATALOG = [Item(id=f"cat-{i}", timestamp=NOW, item=i, title=i, category=f"c{n % 5}") for n, i in enumerate(ITEMS)]


def test_keys_carry_their_lifetimes(settings: Settings) -> None:
    """After one user's events every user key expires within ``session.ttl_s`` (the facts
    within ``learners.facts_ttl_s``), the item keys within ``learners.item_ttl_s``; trending,
    catalog and progress are bounded by caps and the catalog, and do not expire."""
    settings = _with(settings, session={"ttl_s": 1000.0},
                     learners={"facts_ttl_s": 100.0, "item_ttl_s": 5000.0})
    store = StateStore.from_settings(settings)
    feeder = Feeder(settings, store, "v1")
    feeder.items(CATALOG)
    feeder.clicks(_user_events("u1", NOW, ITEMS))
    ns, client = store.keys.ns("v1"), store.client
    user_keys = [ns.session_seq("u1"), ns.session_meta("u1"), ns.seen("u1"), ns.requests("u1"),
                 ns.request_index("u1")]
    assert all(client.exists(k) for k in [*user_keys, ns.facts("u1")])
    for key in user_keys:
        assert 100_000 < client.pttl(key) <= 1_000_000, key
    assert 0 < client.pttl(ns.facts("u1")) <= 100_000
    touched = [ITEMS[1], ITEMS[7], ITEMS[14], ITEMS[21]]  # clicked: counts and neighbours
    for item in touched:
        for key in (ns.item_neighbours(item), ns.item_stats(item)):
            assert 1_000_000 < client.pttl(key) <= 5_000_000, key
    for key in (ns.trending(), ns.trending("c1"), ns.trending_meta(), ns.catalog(), ns.item_meta(ITEMS[1]),
                ns.progress()):
        assert client.pttl(key) == -1, key  # exists, no expiry

    # A later event refreshes the expiry of every user key; ttl 0 means never.
    forever = _with(settings, session={"ttl_s": 0.0}, learners={"facts_ttl_s": 0.0, "item_ttl_s": 0.0})
    feeder = Feeder(forever, StateStore.from_settings(forever), "v2")
    feeder.clicks(_user_events("u2", NOW, ITEMS))
    ns2 = store.keys.ns("v2")
    for key in (ns2.session_seq("u2"), ns2.facts("u2"), ns2.requests("u2"), ns2.item_stats(ITEMS[1])):
        assert client.pttl(key) == -1, key


def test_expiries_are_set_again_once_a_part_of_the_ttl_old(settings: Settings) -> None:
    """A key's expiry is not rewritten on every event, only once the last setting is
    ``ttl / TTL_REFRESH_PARTS`` old: so a user's and an item's keys expire between
    ``ttl - ttl / TTL_REFRESH_PARTS`` and ``ttl`` after the last event, never earlier."""
    from streamrec.infra.state import TTL_REFRESH_PARTS
    ttl_s = 0.064 * TTL_REFRESH_PARTS * 10  # expiries set again once 0.64 s old
    refresh_ms = ttl_s * 1000 / TTL_REFRESH_PARTS
    settings = _with(settings, session={"ttl_s": ttl_s}, learners={"facts_ttl_s": ttl_s, "item_ttl_s": ttl_s})
    store = StateStore.from_settings(settings)
    feeder = Feeder(settings, store, "v1")
    ns, client = store.keys.ns("v1"), store.client
    keys = [ns.session_seq("u1"), ns.session_meta("u1"), ns.seen("u1"), ns.requests("u1"),
            ns.request_index("u1"), ns.item_neighbours(ITEMS[1]), ns.item_stats(ITEMS[1])]
    feeder.clicks(_user_events("u1", NOW, ITEMS))
    first = {k: client.pttl(k) for k in keys}
    assert all(ttl_s * 1000 - refresh_ms < v <= ttl_s * 1000 for v in first.values()), first
    time.sleep(refresh_ms / 2000)
    # within the refresh time: not rewritten, but still above ttl - refresh
    feeder.clicks([Click(id="u1-late", timestamp=NOW + 10_000, user="u1", item=ITEMS[1])])
    mid = {k: client.pttl(k) for k in keys}
    assert all(ttl_s * 1000 - refresh_ms < v < first[k] for k, v in mid.items()), mid
    time.sleep(refresh_ms * 1.2 / 1000)
    # older than the refresh time: set again, to the whole ttl
    feeder.clicks([Click(id="u1-later", timestamp=NOW + 20_000, user="u1", item=ITEMS[1])])
    later = {k: client.pttl(k) for k in keys}
    assert all(v > mid[k] and ttl_s * 1000 - refresh_ms / 2 < v <= ttl_s * 1000 for k, v in later.items()), later


def test_facts_are_kept_compact_and_come_back_whole(base_settings: Settings) -> None:
    """Facts are stored in small pieces (Redis keeps such a set in its compact encoding);
    facts of any size, a 60-item impression of long ids included, come back whole on
    redelivery, equal to the reference's."""
    client = redis.Redis.from_url(base_settings.redis.url)
    store = StateStore(client, Keys(f"test{uuid.uuid4().hex[:8]}"), SessionConfig())
    ns = store.keys.ns("v1")
    long_ids = [f"item-{n:03d}-" + "x" * 100 for n in range(60)]
    rows = [UserEventRow("u", "i", "imp", "", NOW, 7, "r1", "web", tuple((i, p) for p, i in enumerate(long_ids))),
            UserEventRow("u", "c", "c1", long_ids[3], NOW + 1000, 8, "r1", "web"),
            *(UserEventRow("v", "c", f"c{k}", f"i{k}", NOW + 1000 * k, 9 + k) for k in range(6))]
    try:
        first = store.apply_user_events(ns, rows)
        again = store.apply_user_events(ns, rows)
        reference = {"u": UserState(store.session), "v": UserState(store.session)}
        for row, (status, _, facts), (status2, _, facts2) in zip(rows, first, again):
            state = reference[row.user]
            state.apply(row.kind, row.event_id, row.item, row.ts, row.offset, row.request_id, row.segment, row.shown)
            assert (status, status2) == (Status.APPLIED, Status.REDELIVERED)
            assert facts == facts2 == state.last_facts
        assert len(first[0][2]) > 6000  # the impression's facts: well over a hundred pieces
        assert len(first[-1][2]) > 64  # a click after five: longer than a compact member may be
        assert client.object("encoding", ns.facts("v")) in (b"listpack", b"ziplist")
    finally:
        store.drop_everything()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, so that INFO memory measures only this test."""
    with EmbeddedRedis(0) as server:
        yield server


def test_memory_levels_off_as_inactive_users_expire(settings: Settings, private_redis: EmbeddedRedis) -> None:
    """Ten waves of new users (ten times the users of one wave) through the batch processor
    with a 2 s session lifetime: once a wave's users have expired, the next wave takes their
    place, so memory after the tenth wave stays near memory after the first (it would be
    about ten times as much if nothing expired)."""
    ttl_s, users_per_wave = 2.0, 300
    settings = _with(settings, redis={"url": private_redis.url}, session={"ttl_s": ttl_s})
    store = StateStore.from_settings(settings)
    client = store.client
    feeder = Feeder(settings, store, "v1")
    feeder.items(CATALOG)
    feeder.clicks(_user_events("warm", NOW, ITEMS))  # scripts loaded, item keys created
    time.sleep(ttl_s + 0.5)
    resting_keys = client.dbsize()
    baseline = int(client.info("memory")["used_memory"])
    added, keys = [], []
    for wave in range(10):
        started = time.monotonic()
        events = [e for u in range(users_per_wave)
                  for e in _user_events(f"w{wave}u{u}", NOW + 60_000 * wave, ITEMS[wave:] + ITEMS[:wave])]
        for lo in range(0, len(events), 500):
            feeder.clicks(events[lo : lo + 500])
        added.append(int(client.info("memory")["used_memory"]) - baseline)
        keys.append(client.dbsize() - resting_keys)
        # Wait until this wave's users are past their lifetime and Redis has reclaimed most
        # of them (a bounded wait: if nothing expired, memory simply keeps growing).
        deadline = started + ttl_s + 10
        time.sleep(max(0.0, started + ttl_s + 0.2 - time.monotonic()))
        while client.dbsize() > resting_keys + keys[-1] // 10 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert keys[0] >= users_per_wave * 6  # every user key of the wave was there after it
    assert keys[-1] < 1.5 * keys[0], keys
    assert added[-1] < 2 * added[0], added
    assert client.dbsize() <= resting_keys + keys[-1] // 10  # the last wave has gone too


def test_trending_sets_keep_their_n_highest(base_settings: Settings) -> None:
    """Trimmed to N, the global set holds the N highest-scored items and each category set
    the N highest of its category (items that fell out of the global set included); an item
    that fell out of the global set but not its category's continues from that score."""
    client = redis.Redis.from_url(base_settings.redis.url)
    store = StateStore(client, Keys(f"test{uuid.uuid4().hex[:8]}"), SessionConfig(),
                       trending_config=TrendingConfig(max_items=4))
    ns = store.keys.ns("v1")
    try:
        scores = {f"i{n:02d}": float((n * 37) % 23) + n / 100 for n in range(20)}  # all distinct
        category = {item: f"c{n % 2}" for n, item in enumerate(scores)}
        ops = [("s:0", n, "i", item, category[item]) for n, item in enumerate(scores)]
        ops += [("s:0", 100 + n, "c", item, repr(x)) for n, (item, x) in enumerate(scores.items())]
        assert store.apply_trending(ns, ops) == len(ops)

        def top(items: list[str]) -> dict[str, float]:
            return {i: scores[i] for i in sorted(items, key=lambda i: -scores[i])[:4]}

        assert dict(client.zrange(ns.trending(), 0, -1, withscores=True)) == \
            {k.encode(): v for k, v in top(list(scores)).items()}
        for c in ("c0", "c1"):
            want = top([i for i in scores if category[i] == c])
            assert dict(client.zrange(ns.trending(c), 0, -1, withscores=True)) == \
                {k.encode(): v for k, v in want.items()}
        assert store.trending(4, namespace="v1") == sorted(scores, key=lambda i: -scores[i])[:4]

        # Out of the global top 4, kept in its category's: a new click continues from there.
        fallen = next(i for i in top([i for i in scores if category[i] == "c0"]) if i not in top(list(scores)))
        assert client.zscore(ns.trending(), fallen) is None
        store.apply_trending(ns, [("s:0", 200, "c", fallen, repr(30.0))])
        expected = 30.0 + math.log2(1 + 2 ** (scores[fallen] - 30.0))
        assert client.zscore(ns.trending(), fallen) == pytest.approx(expected, rel=1e-12)
        assert client.zscore(ns.trending("c0"), fallen) == pytest.approx(expected, rel=1e-12)
        assert client.zcard(ns.trending()) == 4 and client.zcard(ns.trending("c0")) == 4
    finally:
        store.drop_everything()


def test_a_segment_beyond_the_cap_is_not_recorded(base_settings: Settings) -> None:
    """Per item at most ``max_segments`` segments get posteriors, the first ones to arrive;
    the item-wide posterior still counts all feedback. The Redis state equals the reference
    bandit with the same cap."""
    client = redis.Redis.from_url(base_settings.redis.url)
    config = BanditConfig(max_segments=2)
    store = StateStore(client, Keys(f"test{uuid.uuid4().hex[:8]}"), SessionConfig(), bandit=config)
    ns = store.keys.ns("v1")
    reference = BetaBandit(config)
    facts = [Feedback("a", p, NOW + 1000 * p, p % 3 == 0, seg)
             for p, seg in enumerate(["web", "app", None, "tv", "web", "tv", "app", "car"])]
    try:
        for offset, fact in enumerate(facts):
            reference.learn_one(fact)
            store.apply_item_updates(ns, [("s:0", offset, reference.updates(fact))])
        got = store.learner_snapshot("v1", ["a"])["bandit"]
        assert set(got) == {"a", "a|web", "a|app"}
        assert close(got, reference.snapshot(), rel=1e-12)
        assert client.hget(ns.item_stats("a"), "segments") == b"2"
    finally:
        store.drop_everything()
