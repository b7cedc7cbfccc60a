"""Synthetic generator: deterministic, time-ordered, valid, and with learnable structure."""

from __future__ import annotations

import itertools
import time
from collections import Counter, defaultdict
from dataclasses import replace

import pytest

from streamrec.models import synthetic
from streamrec.models.errors import ConfigError
from streamrec.models.events import MAX_TIMESTAMP_MS, Click, Impression, decode, encode
from streamrec.models.synthetic import SyntheticConfig, catalog, events, item_categories

SMALL = SyntheticConfig(n_users=200, n_items=1000, n_categories=10, seed=7)
SESSION_CUT_MS = 1_800_000  # the worker's default session gap


def clicks_of(stream: list[Click | Impression]) -> list[Click]:
    return [e for e in stream if isinstance(e, Click)]


@pytest.fixture(scope="module")
def stream() -> list[Click | Impression]:
    return list(events(SMALL, 20_000))


def test_same_seed_same_events_other_seed_other_events() -> None:
    a = list(events(SMALL, 1_000))
    assert a == list(events(SMALL, 1_000))
    other = list(events(replace(SMALL, seed=8), 1_000))
    assert [(e.user, e.item, e.timestamp) for e in clicks_of(a)] != [
        (e.user, e.item, e.timestamp) for e in clicks_of(other)
    ]
    assert catalog(SMALL) == catalog(SMALL)


def test_count_order_and_one_impression_per_click(stream: list[Click | Impression]) -> None:
    clicks = clicks_of(stream)
    assert len(clicks) == 20_000
    assert len(stream) - len(clicks) == 20_000
    stamps = [e.timestamp for e in stream]
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    assert min(stamps) > SMALL.start_ms


def test_events_round_trip_and_ids_unique_per_user(stream: list[Click | Impression]) -> None:
    for e in stream:
        assert decode(encode(e), now_ms=MAX_TIMESTAMP_MS) == e
    seen: set[tuple[str, str]] = set()
    for e in stream:
        assert (e.user, e.id) not in seen
        seen.add((e.user, e.id))
    assert clicks_of(stream)[0].user.startswith("u") and len(clicks_of(stream)[0].user) == 6
    assert clicks_of(stream)[0].item.startswith("i") and len(clicks_of(stream)[0].item) == 7


def test_clicks_answer_a_preceding_impression_that_shows_the_item(
    stream: list[Click | Impression],
) -> None:
    open_requests: dict[str, Impression] = {}
    positions: Counter[int] = Counter()
    for e in stream:
        if isinstance(e, Impression):
            assert e.request_id not in open_requests
            shown = [s.item for s in e.items]
            assert len(shown) == SMALL.impression_size == len(set(shown))
            assert [s.position for s in e.items] == list(range(len(shown)))
            open_requests[e.request_id] = e
            continue
        assert e.request_id is not None
        imp = open_requests.pop(e.request_id)  # KeyError: no preceding impression
        assert imp.user == e.user and imp.timestamp <= e.timestamp <= imp.timestamp + 5_000
        (entry,) = [s for s in imp.items if s.item == e.item]
        positions[entry.position] += 1
    assert not open_requests  # no impression without its click, even at the cut
    assert set(positions) == set(range(SMALL.impression_size))  # not always at the same slot


def test_impressions_off_keeps_the_same_clicks(stream: list[Click | Impression]) -> None:
    everything = list(events(replace(SMALL, impressions=False), 20_000))
    plain = clicks_of(everything)
    assert len(plain) == len(everything) and all(c.request_id is None for c in plain)
    assert [(c.id, c.user, c.item, c.timestamp) for c in plain] == [
        (c.id, c.user, c.item, c.timestamp) for c in clicks_of(stream)
    ]


def test_shorter_run_is_a_prefix_of_a_longer_one(stream: list[Click | Impression]) -> None:
    short = clicks_of(list(events(SMALL, 1_234)))
    assert short == clicks_of(stream)[:1_234]


def test_catalog_matches_event_items_and_categories(stream: list[Click | Impression]) -> None:
    items = catalog(SMALL)
    assert len(items) == SMALL.n_items == len({i.item for i in items})
    categories = item_categories(SMALL)
    assert {i.item: i.category for i in items} == categories
    assert set(categories.values()) == {f"c{k:02d}" for k in range(SMALL.n_categories)}
    for i in items:
        assert 1 <= len(i.tags) <= 4 and len(set(i.tags)) == len(i.tags)
        assert 2 <= len(i.title.split()) <= 4
        assert i.timestamp <= stream[0].timestamp
        assert decode(encode(i), now_ms=MAX_TIMESTAMP_MS) == i
    assert {c.item for c in clicks_of(stream)} <= set(categories)


def sessions_of(clicks: list[Click]) -> list[list[Click]]:
    by_user: dict[str, list[Click]] = defaultdict(list)
    for c in clicks:
        by_user[c.user].append(c)
    out: list[list[Click]] = []
    for seq in by_user.values():
        current = [seq[0]]
        for prev, c in itertools.pairwise(seq):
            if c.timestamp - prev.timestamp > SESSION_CUT_MS:
                out.append(current)
                current = []
            current.append(c)
        out.append(current)
    return out


def test_sessions_have_the_configured_shape(stream: list[Click | Impression]) -> None:
    sessions = sessions_of(clicks_of(stream))
    mean_len = sum(map(len, sessions)) / len(sessions)
    assert 0.85 * SMALL.mean_session_len < mean_len < 1.15 * SMALL.mean_session_len
    steps = [b.timestamp - a.timestamp for s in sessions for a, b in itertools.pairwise(s)]
    mean_step = sum(steps) / len(steps)
    assert 0.8 * SMALL.click_interval_ms < mean_step < 1.2 * SMALL.click_interval_ms


def test_popularity_is_skewed(stream: list[Click | Impression]) -> None:
    counts = Counter(c.item for c in clicks_of(stream))
    top = sum(n for _, n in counts.most_common(SMALL.n_items // 100))
    assert top / 20_000 > 0.10  # the top 1% of items take well over 1% of clicks


def test_consecutive_clicks_share_a_category_far_more_than_chance(
    stream: list[Click | Impression],
) -> None:
    category = item_categories(SMALL)
    clicks = clicks_of(stream)
    pairs = [(a, b) for s in sessions_of(clicks) for a, b in itertools.pairwise(s)]
    same = sum(category[a.item] == category[b.item] for a, b in pairs) / len(pairs)
    freq = Counter(category[c.item] for c in clicks)
    chance = sum((n / len(clicks)) ** 2 for n in freq.values())
    assert same > 0.7
    assert same > 4 * chance


def test_item_to_item_cooccurrence_predicts_the_next_click(
    stream: list[Click | Impression],
) -> None:
    category = item_categories(SMALL)
    pairs = [
        (a.item, b.item) for s in sessions_of(clicks_of(stream)) for a, b in itertools.pairwise(s)
    ]
    train, test = pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]
    following: dict[str, Counter[str]] = defaultdict(Counter)
    in_category: dict[str, Counter[str]] = defaultdict(Counter)
    for a, b in train:
        following[a][b] += 1
        in_category[category[a]][b] += 1
    popular = Counter(b for _, b in train).most_common(1)[0][0]
    hits = sum(bool(following[a]) and following[a].most_common(1)[0][0] == b for a, b in test)
    global_hits = sum(b == popular for _, b in test)
    category_hits = sum(in_category[category[a]].most_common(1)[0][0] == b for a, b in test)
    assert hits / len(test) > 0.15
    assert hits > 3 * max(global_hits, 1)
    # Item-specific signal beyond "popular in the same category" (the related items).
    assert hits > 1.25 * category_hits


def test_output_does_not_depend_on_merge_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cut, merged in windows of a few clicks, equals the same cut of one long run.

    Dense sessions make impressions straddle window ends, so that a cut early in one window
    must drop an impression already merged in the window before.
    """
    config = replace(
        SMALL,
        n_users=10,
        session_gap_ms=60_000,
        min_session_gap_ms=60_000,
        click_interval_ms=10_000,
    )
    full = list(events(config, 200))
    monkeypatch.setattr(synthetic, "_WINDOW_CLICKS", 10)
    click_rank: dict[str, int] = {}
    for e in full:
        if isinstance(e, Click):
            click_rank[e.request_id or ""] = len(click_rank)
    orphans = 0
    for n in range(1, 201):
        expected = [e for e in full if click_rank[e.request_id or ""] < n]
        last = next(
            i
            for i, e in enumerate(full)
            if isinstance(e, Click) and click_rank[e.request_id or ""] == n - 1
        )
        orphans += len(full[: last + 1]) != len(expected)
        assert list(events(config, n)) == expected, n
    assert orphans > 50  # the cut often leaves an impression whose click comes later


def test_simultaneous_impression_and_click_keep_user_order() -> None:
    # A 1 ms click interval lets an impression share its click's millisecond.
    fast = replace(SMALL, n_users=5, click_interval_ms=1)
    stream = list(events(fast, 2_000))
    shown: set[str] = set()
    for e in stream:
        if isinstance(e, Impression):
            shown.add(e.request_id)
        else:
            assert e.request_id in shown
    stamps = [e.timestamp for e in stream]
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    assert any(
        isinstance(a, Impression) and a.timestamp == b.timestamp
        for a, b in itertools.pairwise(stream)
    )


def test_tiny_catalog_still_shows_distinct_items() -> None:
    tiny = SyntheticConfig(n_users=3, n_items=6, n_categories=2, impression_size=10, seed=1)
    stream = list(events(tiny, 200))
    imps = [e for e in stream if isinstance(e, Impression)]
    assert len(imps) == 200
    for imp in imps:
        assert sorted(s.item for s in imp.items) == [f"i{k:06d}" for k in range(6)]


def test_zero_clicks_and_invalid_configs() -> None:
    assert list(events(SMALL, 0)) == []
    with pytest.raises(ConfigError):
        events(SMALL, -1)
    for bad in (
        {"n_users": 0},
        {"n_items": 5, "n_categories": 6},
        {"mean_session_len": 0.5},
        {"p_related": 0.7, "p_same_category": 0.5},
        {"seed": -1},
        {"session_gap_ms": 1_000},
    ):
        with pytest.raises(ConfigError):
            events(replace(SMALL, **bad), 10)


def test_fast_enough() -> None:
    started = time.perf_counter()
    n = sum(1 for _ in events(SyntheticConfig(impressions=False), 50_000))
    assert n == 50_000
    assert time.perf_counter() - started < 5  # ~0.15 s normally; guards against slow paths
