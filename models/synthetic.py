"""Deterministic synthetic users, items and click streams for the demo and benchmarks.

The world: ``n_items`` items spread evenly over ``n_categories`` categories, each item with a
Zipf popularity (``weight = rank ** -zipf_a``, ranks shuffled so that popular ids are spread
out). Each user has a taste (a Dirichlet mix over categories, concentrated on a few) and an
activity level. A user's life is a sequence of sessions separated by hours; within a session
clicks are seconds apart and correlated: the next click stays in the category of the previous
one with high probability, and sometimes is the "related" item of the previous one (its
successor in a fixed per-category ring), so both category and item-to-item co-occurrence are
learnable from the stream.

Everything is a pure function of ``SyntheticConfig``: same config, same events. Each user
draws from its own random streams, so nothing depends on ``n_clicks`` (the clicks of a shorter
run are a prefix of a longer run's) and toggling impressions changes no click's item, time or
id (only its ``request_id``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import numpy as np

from streamrec.models.errors import ConfigError
from streamrec.models.events import MAX_TIMESTAMP_MS, Click, Impression, Item, Shown

_WORDS: Final = (
    "amber", "atlas", "autumn", "blue", "bright", "broken", "city", "clear", "cloud", "copper",
    "crystal", "dark", "dawn", "deep", "desert", "dream", "echo", "ember", "empire", "falling",
    "field", "fire", "forest", "frozen", "garden", "ghost", "glass", "golden", "harbor", "hidden",
    "hollow", "iron", "island", "last", "light", "lost", "lunar", "midnight", "mirror", "morning",
    "mountain", "night", "north", "ocean", "orbit", "paper", "quiet", "rain", "river", "road",
    "run", "salt", "secret", "shadow", "silent", "silver", "sky", "small", "song", "spring",
    "star", "stone", "storm", "summer", "sun", "tide", "tower", "velvet", "walk", "water",
    "west", "wild", "wind", "winter", "wolf", "wood", "year", "zero",
)  # fmt: skip
_TAGS: Final = (
    "action", "classic", "comedy", "cozy", "dark", "documentary", "drama", "family", "fantasy",
    "fast", "funny", "historical", "indie", "kids", "long-read", "mystery", "nature", "new",
    "noir", "quirky", "romance", "sci-fi", "short", "slow", "sports", "thriller", "travel",
    "true-story", "upbeat", "visual",
)  # fmt: skip

# Independent random streams per purpose (numpy SeedSequence entropy = [seed, stream, ...]).
_STREAM_WORLD: Final = 1
_STREAM_CATALOG: Final = 2
_STREAM_USER: Final = 3
_STREAM_IMPRESSION: Final = 4

_MIN_CLICK_INTERVAL_MS: Final = 1_000  # nobody clicks faster than this
_MAX_SESSIONS_PER_CHUNK: Final = 64


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic world. Times are Unix milliseconds / durations in ms.

    ``session_gap_ms`` is the mean time between a user's sessions (before per-user activity
    scaling); gaps never fall below ``min_session_gap_ms`` so that sessions stay separable
    with a 30-minute session cut. ``click_interval_ms`` is the mean time between two clicks
    of one session. After a click, the next one is the "related" item with probability
    ``p_related``, another item of the same category with ``p_same_category``, and otherwise a
    fresh draw from the user's taste.
    """

    n_users: int = 1000
    n_items: int = 5000
    n_categories: int = 20
    zipf_a: float = 1.1
    mean_session_len: float = 8.0
    session_gap_ms: int = 4 * 3_600_000
    click_interval_ms: int = 30_000
    impressions: bool = True
    start_ms: int = 1_700_000_000_000
    seed: int = 0
    impression_size: int = 10
    p_related: float = 0.3
    p_same_category: float = 0.5
    taste_concentration: float = 0.3  # Dirichlet alpha per category: lower = narrower tastes
    min_session_gap_ms: int = 3_600_000

    def validate(self) -> None:
        """Raise ``ConfigError`` if the parameters cannot produce a valid stream."""
        checks = (
            (self.n_users >= 1, "n_users must be >= 1"),
            (self.n_categories >= 1, "n_categories must be >= 1"),
            (self.n_items >= self.n_categories, "n_items must be >= n_categories"),
            (self.zipf_a >= 0, "zipf_a must be >= 0"),
            (self.mean_session_len >= 1, "mean_session_len must be >= 1"),
            (self.click_interval_ms >= 1, "click_interval_ms must be >= 1"),
            (self.min_session_gap_ms >= 1, "min_session_gap_ms must be >= 1"),
            (
                self.session_gap_ms >= self.min_session_gap_ms,
                "session_gap_ms must be >= min_session_gap_ms",
            ),
            (self.impression_size >= 1, "impression_size must be >= 1"),
            (0 <= self.p_related and 0 <= self.p_same_category, "probabilities must be >= 0"),
            (
                self.p_related + self.p_same_category <= 1,
                "p_related + p_same_category must be <= 1",
            ),
            (self.taste_concentration > 0, "taste_concentration must be > 0"),
            (self.seed >= 0, "seed must be >= 0"),
            (
                0 <= self.start_ms <= MAX_TIMESTAMP_MS,
                "start_ms must be a Unix time in milliseconds",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SyntheticConfig: {message}")


def user_id(index: int, config: SyntheticConfig) -> str:
    """Id of user ``index`` (0-based): ``u00042``, zero-padded to at least 5 digits."""
    return f"u{index:0{max(5, len(str(config.n_users - 1)))}d}"


def item_id(index: int, config: SyntheticConfig) -> str:
    """Id of item ``index`` (0-based): ``i001234``, zero-padded to at least 6 digits."""
    return f"i{index:0{max(6, len(str(config.n_items - 1)))}d}"


def category_name(index: int, config: SyntheticConfig) -> str:
    """Name of category ``index`` (0-based): ``c03``, zero-padded to at least 2 digits."""
    return f"c{index:0{max(2, len(str(config.n_categories - 1)))}d}"


@dataclass(frozen=True)
class _World:
    item_ids: list[str]
    item_category: np.ndarray  # item index -> category index
    order: np.ndarray  # ring position -> item index; items grouped by category, popular first
    cum: np.ndarray  # inclusive cumulative popularity weight along ``order``
    cat_start: np.ndarray  # first ring position of each category
    cat_size: np.ndarray
    cum_lo: np.ndarray  # cumulative weight before each category's first position
    cum_span: np.ndarray  # total weight of each category


@lru_cache(maxsize=8)
def _world(config: SyntheticConfig) -> _World:
    rng = np.random.default_rng([config.seed, _STREAM_WORLD])
    n, k = config.n_items, config.n_categories
    category = rng.permutation(np.arange(n) % k)  # balanced: every category is non-empty
    rank = rng.permutation(n)
    weight = (rank + 1.0) ** -config.zipf_a
    order = np.lexsort((rank, category))
    cum = np.cumsum(weight[order])
    size = np.bincount(category, minlength=k)
    start = np.concatenate(([0], np.cumsum(size)[:-1]))
    end_cum = cum[start + size - 1]
    lo = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    return _World(
        item_ids=[item_id(i, config) for i in range(n)],
        item_category=category,
        order=order,
        cum=cum,
        cat_start=start,
        cat_size=size,
        cum_lo=lo,
        cum_span=end_cum - lo,
    )


def _zipf_positions(world: _World, cats: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Ring positions drawn by popularity within each given category (u uniform in [0, 1))."""
    target = world.cum_lo[cats] + u * world.cum_span[cats]
    pos = np.searchsorted(world.cum, target, side="right")
    # Float rounding can push a draw one slot past its category: clamp it back.
    first = world.cat_start[cats]
    clamped: np.ndarray = np.clip(pos, first, first + world.cat_size[cats] - 1)
    return clamped


def catalog(config: SyntheticConfig) -> list[Item]:
    """One ``Item`` per item, in id order, stamped ``config.start_ms`` (before every click).

    Titles are 2-4 words; the category is ``cNN``; tags are 1-4 distinct tags, the first of
    which is the category's signature tag (so tags carry category signal for cold start).
    """
    config.validate()
    world = _world(config)
    rng = np.random.default_rng([config.seed, _STREAM_CATALOG])
    n = config.n_items
    n_words = rng.integers(2, 5, n).tolist()
    words = rng.integers(0, len(_WORDS), (n, 4)).tolist()
    n_tags = rng.integers(1, 5, n).tolist()
    extra_tags = rng.integers(0, len(_TAGS), (n, 3)).tolist()
    cats = world.item_category.tolist()
    cat_names = [category_name(c, config) for c in range(config.n_categories)]
    items = []
    for i in range(n):
        title = " ".join(_WORDS[w] for w in words[i][: n_words[i]]).title()
        tags = [_TAGS[cats[i] % len(_TAGS)]]
        for t in extra_tags[i][: n_tags[i] - 1]:
            if _TAGS[t] not in tags:
                tags.append(_TAGS[t])
        iid = world.item_ids[i]
        items.append(
            Item(
                id=f"s{config.seed}-{iid}",
                timestamp=config.start_ms,
                item=iid,
                title=title,
                tags=tags,
                category=cat_names[cats[i]],
            )
        )
    return items


def item_categories(config: SyntheticConfig) -> dict[str, str]:
    """Item id -> category name, the same mapping ``catalog`` publishes."""
    config.validate()
    world = _world(config)
    cats = world.item_category.tolist()
    return {iid: category_name(c, config) for iid, c in zip(world.item_ids, cats)}


_Arrays = tuple[np.ndarray, ...]


def _shown_keys(
    target: np.ndarray, cand: np.ndarray, where: np.ndarray, shown_n: int, n_items: int
) -> np.ndarray:
    """Impression lists as ``(len(target), shown_n)`` keys ``item * shown_n + position``.

    Each list is ``target`` at position ``where`` and, around it, the first ``shown_n - 1``
    distinct candidates (row order) other than the target.
    """
    rows, m = cand.shape
    need = shown_n - 1
    if need == 0:
        return target[:, None] * shown_n

    def usable(c: np.ndarray) -> np.ndarray:
        order = np.argsort(c, axis=1, kind="stable")
        ordered = np.take_along_axis(c, order, axis=1)
        dup_sorted = np.zeros(c.shape, dtype=bool)
        dup_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # not the first occurrence
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        ok = ~dup & (c != target[:, None])
        first_needed: np.ndarray = ok & (np.cumsum(ok, axis=1) <= need)
        return first_needed

    keep = usable(cand)
    short = np.flatnonzero(keep.sum(axis=1) < need)
    if short.size:  # rare (tiny catalogs): top up with the next item ids, deterministically
        cand = cand.copy()
        for r in short.tolist():
            t = int(target[r])
            others = dict.fromkeys(x for x in cand[r].tolist() if x != t)
            filler = t
            while len(others) < need:
                filler = (filler + 1) % n_items
                if filler != t:
                    others.setdefault(filler, None)
            row = list(others)[:need]
            cand[r] = row + [row[0]] * (m - need)
        keep = usable(cand)
    others = cand[keep].reshape(rows, need)
    col = np.arange(shown_n)
    w = where[:, None]
    left = others[:, np.minimum(col, need - 1)]
    right = others[:, np.maximum(col - 1, 0)]
    items = np.where(col < w, left, np.where(col == w, target[:, None], right))
    return items * shown_n + col


class _User:
    """One user's generator: draws its events in chunks of whole sessions, in time order.

    The chunk schedule and the random streams depend only on the config and the user index,
    never on how far the stream is read, so any prefix of the output is reproducible.
    """

    def __init__(self, config: SyntheticConfig, world: _World, u: int) -> None:
        self.config = config
        self.world = world
        self.rng = np.random.default_rng([config.seed, _STREAM_USER, u])
        # A separate stream for impressions so that toggling them leaves the clicks unchanged.
        self.imp_rng = np.random.default_rng([config.seed, _STREAM_IMPRESSION, u])
        self.taste_cdf = np.cumsum(
            self.rng.dirichlet(np.full(config.n_categories, config.taste_concentration))
        )
        activity = self.rng.lognormal(0.0, 0.5)  # > 1: a heavier user with shorter gaps
        self.gap_extra = max(config.session_gap_ms - config.min_session_gap_ms, 0) / activity
        self.iv_min = min(_MIN_CLICK_INTERVAL_MS, config.click_interval_ms // 2)
        # Users start staggered over their first gap rather than all at start_ms.
        self.t = config.start_ms + int(
            self.rng.uniform(0, config.min_session_gap_ms + self.gap_extra)
        )
        self.n = 0  # clicks drawn so far: the per-user click counter behind event ids
        self.sessions = 2  # chunk size grows geometrically: little waste for short runs
        self.shown_n = min(config.impression_size, config.n_items)
        empty = np.zeros(0, dtype=np.int64)
        # Drawn, not yet emitted: click time, item, counter, impression time, shown keys.
        self.pending: _Arrays = (empty, empty, empty, empty, np.zeros((0, self.shown_n), np.int64))
        self.imp_done = 0  # impressions of pending[:imp_done] were already emitted

    def _taste_cats(self, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        k = self.config.n_categories
        return np.minimum(np.searchsorted(self.taste_cdf, rng.random(size), side="right"), k - 1)

    def _chunk(self) -> _Arrays:
        config, world, rng = self.config, self.world, self.rng
        lens = rng.geometric(1.0 / config.mean_session_len, self.sessions)
        self.sessions = min(2 * self.sessions, _MAX_SESSIONS_PER_CHUNK)
        total = int(lens.sum())
        first = np.zeros(total, dtype=bool)
        first[np.concatenate(([0], np.cumsum(lens)[:-1]))] = True
        iv_extra = config.click_interval_ms - self.iv_min
        step = self.iv_min + np.floor(rng.exponential(1.0, total) * iv_extra).astype(np.int64)
        gaps = config.min_session_gap_ms + np.floor(rng.exponential(1.0, total) * self.gap_extra)
        step[first] = gaps[first].astype(np.int64)
        times = self.t + np.cumsum(step)
        self.t = int(times[-1])

        draw = rng.random(total)
        fresh = first | (draw < 1.0 - config.p_related - config.p_same_category)
        related = ~first & (draw >= 1.0 - config.p_related)
        idx = np.arange(total)
        # Category: that of the latest fresh draw (same-category and related clicks keep it).
        cats = self._taste_cats(total, rng)[np.maximum.accumulate(np.where(fresh, idx, 0))]
        pos = _zipf_positions(world, cats, rng.random(total))
        # A related click is the ring successor of the previous click; a run of m related
        # clicks after an anchor walks m steps from it within the category.
        anchor = np.maximum.accumulate(np.where(related, 0, idx))
        start = world.cat_start[cats]
        pos = start + (pos[anchor] - start + (idx - anchor)) % world.cat_size[cats]
        clicked = world.order[pos]
        counter = self.n + idx
        self.n += total

        if not config.impressions:
            return times, clicked, counter, times, np.zeros((total, self.shown_n), np.int64)
        imp_rng, shown_n = self.imp_rng, self.shown_n
        # Shown a moment (<= 5 s) before the click and never before the previous click.
        delay = np.minimum(imp_rng.integers(300, 5_000, total), step // 2)
        where = imp_rng.integers(0, shown_n, total)
        n_cand = shown_n + 4  # spare candidates absorb duplicates
        cand_pos = _zipf_positions(
            world, self._taste_cats((total, n_cand), imp_rng), imp_rng.random((total, n_cand))
        )
        keys = _shown_keys(clicked, world.order[cand_pos], where, shown_n, config.n_items)
        return times, clicked, counter, times - delay, keys

    def take(self, horizon: int) -> tuple[_Arrays, _Arrays]:
        """Clicks with time <= horizon, and impressions with time <= horizon, not yet taken.

        Returns ``(ts, item, n)`` for clicks and ``(ts, n, click_ts, keys)`` for impressions.
        """
        p = self.pending
        while p[0].size == 0 or p[0][-1] <= horizon:
            chunk = self._chunk()
            p = tuple(np.concatenate((a, b)) for a, b in zip(p, chunk))
        c = int(np.searchsorted(p[0], horizon, side="right"))
        clicks = (p[0][:c], p[1][:c], p[2][:c])
        if self.config.impressions:
            # Impression times are non-decreasing and <= their click's, so i >= c.
            i = int(np.searchsorted(p[3], horizon, side="right"))
            lo = self.imp_done
            imps = (p[3][lo:i], p[2][lo:i], p[0][lo:i], p[4][lo:i])
            self.imp_done = i - c
        else:
            imps = (p[3][:0], p[2][:0], p[0][:0], p[4][:0])
        self.pending = tuple(a[c:] for a in p)
        return clicks, imps


_MIN_WINDOW_MS: Final = 60_000  # must exceed the longest impression-to-click delay (5 s)
_WINDOW_CLICKS = 100_000  # clicks per merge window: bounds memory; output does not depend on it


@dataclass
class _Window:
    """All users' events with time in (previous horizon, horizon], in merge order."""

    c_ts: np.ndarray
    c_user: np.ndarray
    c_n: np.ndarray
    c_item: np.ndarray
    i_ts: np.ndarray
    i_user: np.ndarray
    i_n: np.ndarray
    i_click_ts: np.ndarray
    i_keys: np.ndarray
    order: np.ndarray  # indices: < len(c_ts) a click, else an impression (offset by it)


def _windows(config: SyntheticConfig, world: _World, n_clicks: int) -> Iterator[_Window]:
    """Merge users window by window: one vectorised sort per window instead of a heap per event.

    Order: event time, then user index, then the user's own order (impression before click).
    """
    users = [_User(config, world, u) for u in range(config.n_users)]
    target = min(_WINDOW_CLICKS, 2 * n_clicks + 1_000)  # little waste for short runs
    cycle_ms = config.session_gap_ms + config.mean_session_len * config.click_interval_ms
    width = max(_MIN_WINDOW_MS, int(target * cycle_ms / (config.n_users * config.mean_session_len)))
    horizon = config.start_ms
    user_index = np.arange(config.n_users)
    while True:
        horizon += width
        taken = [user.take(horizon) for user in users]
        cs = [t[0] for t in taken]
        ims = [t[1] for t in taken]
        c_ts, c_item, c_n = (np.concatenate([c[f] for c in cs]) for f in range(3))
        c_user = np.repeat(user_index, [c[0].size for c in cs])
        i_ts, i_n, i_click_ts, i_keys = (np.concatenate([m[f] for m in ims]) for f in range(4))
        i_user = np.repeat(user_index, [m[0].size for m in ims])
        if c_ts.size and int(c_ts.max()) > MAX_TIMESTAMP_MS:
            raise ConfigError("synthetic event times run past 2100: lower start_ms or n_clicks")
        order = np.lexsort(
            (
                np.concatenate((2 * c_n + 1, 2 * i_n)),
                np.concatenate((c_user, i_user)),
                np.concatenate((c_ts, i_ts)),
            )
        )
        yield _Window(c_ts, c_user, c_n, c_item, i_ts, i_user, i_n, i_click_ts, i_keys, order)
        # Aim the next window at ~target clicks; the output does not depend on window sizes.
        scale = min(4.0, max(0.25, target / max(c_ts.size, 1)))
        width = max(_MIN_WINDOW_MS, int(width * scale))


def _after(
    ts: np.ndarray, user: np.ndarray, seq: np.ndarray, key: tuple[int, int, int]
) -> np.ndarray:
    """Mask of merge keys (ts, user, seq) strictly after ``key``."""
    t, u, s = key
    later: np.ndarray = (ts > t) | ((ts == t) & ((user > u) | ((user == u) & (seq > s))))
    return later


def events(config: SyntheticConfig, n_clicks: int) -> Iterator[Click | Impression]:
    """All users' events merged in event-time order (ties: user index, then user order).

    Exactly ``n_clicks`` clicks: the earliest ones in event time. With ``config.impressions``
    each click is preceded (in its user's stream and in time, by at most 5 s) by exactly one
    impression whose ``request_id`` the click carries and which lists the clicked item;
    impressions whose click falls after the cut are dropped. Event ids are unique per user:
    click n of a user is ``s{seed}-{n}``, its impression ``s{seed}-{n}-imp``.
    """
    config.validate()
    if n_clicks < 0:
        raise ConfigError(f"n_clicks must be >= 0, got {n_clicks}")
    return _merged(config, n_clicks)


def _merged(config: SyntheticConfig, n_clicks: int) -> Iterator[Click | Impression]:
    if n_clicks == 0:
        return
    world = _world(config)
    uids = [user_id(u, config) for u in range(config.n_users)]
    shown_n = min(config.impression_size, config.n_items)
    # Shown entries are immutable: one shared object per (item, position) instead of ten
    # allocations per impression (allocation and GC would dominate).
    table: dict[int, Shown] = {}
    have = np.zeros(config.n_items * shown_n, dtype=bool)
    before = 0  # clicks in windows already emitted
    prev: _Window | None = None
    # A window is emitted only once the next one is known: an impression near the end of a
    # window may have its click in the next one, after the cut, and must then be dropped.
    for cur in _windows(config, world, n_clicks):
        cut: tuple[int, int, int] | None = None
        stop: int | None = None
        base = before + (prev.c_ts.size if prev is not None else 0)
        if base + cur.c_ts.size >= n_clicks:
            is_click = cur.order < cur.c_ts.size
            stop = int(np.searchsorted(np.cumsum(is_click), n_clicks - base))
            k = int(cur.order[stop])
            cut = (int(cur.c_ts[k]), int(cur.c_user[k]), 2 * int(cur.c_n[k]) + 1)
        if prev is not None:
            yield from _emit(config, world, uids, table, have, prev, cut, None)
            before = base
        if cut is not None:
            yield from _emit(config, world, uids, table, have, cur, cut, stop)
            return
        prev = cur


def _emit(
    config: SyntheticConfig,
    world: _World,
    uids: list[str],
    table: dict[int, Shown],
    have: np.ndarray,
    win: _Window,
    cut: tuple[int, int, int] | None,
    stop: int | None,
) -> Iterator[Click | Impression]:
    """Build the window's events in merge order, up to ``order[stop]``, minus dropped impressions."""
    nc = win.c_ts.size
    order = win.order if stop is None else win.order[: stop + 1]
    if cut is not None and win.i_ts.size:
        late = _after(win.i_click_ts, win.i_user, 2 * win.i_n + 1, cut)
        is_imp = order >= nc
        dropped = np.zeros(order.size, dtype=bool)
        dropped[is_imp] = late[order[is_imp] - nc]
        order = order[~dropped]
    seed, item_ids = config.seed, world.item_ids
    if win.i_keys.size:
        flat = win.i_keys.ravel()
        shown_n = win.i_keys.shape[1]
        for key in np.unique(flat[~have[flat]]).tolist():
            table[key] = Shown(item=item_ids[key // shown_n], position=key % shown_n)
        have[flat] = True
    c_ts, c_user, c_n, c_item = (a.tolist() for a in (win.c_ts, win.c_user, win.c_n, win.c_item))
    i_ts, i_user, i_n, i_keys = (a.tolist() for a in (win.i_ts, win.i_user, win.i_n, win.i_keys))
    with_requests = config.impressions
    for k in order.tolist():
        if k < nc:
            uid, m = uids[c_user[k]], c_n[k]
            yield Click(
                id=f"s{seed}-{m}",
                timestamp=c_ts[k],
                user=uid,
                item=item_ids[c_item[k]],
                request_id=f"r{seed}-{uid}-{m}" if with_requests else None,
            )
        else:
            j = k - nc
            uid, m = uids[i_user[j]], i_n[j]
            yield Impression(
                id=f"s{seed}-{m}-imp",
                timestamp=i_ts[j],
                user=uid,
                request_id=f"r{seed}-{uid}-{m}",
                items=[table[key] for key in i_keys[j]],
            )
