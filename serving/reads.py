"""What a serving worker reads from Redis for many users at once, cached briefly, as arrays.

Serving addresses items by an integer **row** (``ItemTable``): candidates, features and scores
are numpy arrays over rows, never per-item Python objects.

* ``ItemTable``: item id <-> row, and per row the numeric columns serving needs (log2 sums of
  clicks, examinations and bandit clicks; created_at) and the item's content token ids. The
  statistics are reused for ``serving.stats_ttl_s`` (hot items are in many users' candidate
  lists), the catalog content for ``meta_ttl_s`` or until the item is announced again.
* ``NeighbourCache``: per item, its CF neighbours (rows) and their cosine similarities
  (``models.learners.cosine_similarity``), reused for ``serving.neighbours_ttl_s`` (10 s:
  an item's strongest co-occurrences change slowly; the user's own session is read fresh
  every time), at most ``max_items`` lists.
* ``read_sessions``: the sessions of a batch of users in one script call, as item rows.
* ``SharedReads``: the trending list and the exploration pool, read once per ``stats_ttl_s``
  for every user of every batch, plus all of the above.

Freshness is judged at the time a refresh began (``Batch.now``): a refresh reads each item at
most once, and with ``stats_ttl_s = 0`` and ``neighbours_ttl_s = 0`` every refresh reads
everything again.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from redis.exceptions import NoScriptError

from streamrec.infra.keys import Namespace
from streamrec.infra.recstore import RecStore
from streamrec.infra.redisconn import SlotCalls, evalsha
from streamrec.infra.settings import ServingSettings
from streamrec.models.content import tokens
from streamrec.models.learners import cosine_similarity
from streamrec.models.session import SEPARATOR

if TYPE_CHECKING:
    from streamrec.models.index import VectorIndex

NO_TOKEN = -1  # padding of the token id matrix
_STATS = ("n", "e", "c")  # item statistics hash: log2 sums of clicks, examinations, joined clicks
_META = ("created_at", "title", "tags", "category")  # catalog record hash

# Statistics of some items and catalog records of some (the first ARGV[1] keys are statistics
# hashes, the rest catalog hashes) in one call; absent fields come back as nil.
_READ_ITEMS = """
local out = {}
local n = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local v
  if i <= n then v = redis.call('HMGET', key, 'n', 'e', 'c')
  else v = redis.call('HMGET', key, 'created_at', 'title', 'tags', 'category') end
  for j = 1, #v do out[#out + 1] = v[j] end
end
return out
"""


class ItemTable:
    """Items by row: ids, numeric columns and content token ids, read from Redis and reused.

    Rows are assigned on first sight (``rows``) and stay valid until ``clear`` (which bumps
    ``generation``: caches of rows built on this table check it). Columns are arrays indexed
    by row; an item whose statistics were never read holds -inf sums and NaN created_at.
    """

    def __init__(self, recstore: RecStore, ttl_s: float, meta_ttl_s: float = 300.0,
                 max_items: int = 500_000) -> None:
        self.recstore = recstore
        self._read_items = recstore.state.client.register_script(_READ_ITEMS)
        self.ttl_s = ttl_s
        self.meta_ttl_s = meta_ttl_s
        self.max_items = max_items
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._allocate(1024)

    def _allocate(self, capacity: int) -> None:
        self.index: dict[str, int] = {}
        self._bindex: dict[bytes, int] = {}  # the same, keyed by the id's UTF-8 bytes
        self.ids = np.empty(capacity, dtype=object)  # (cap,) row -> item id
        self.size = 0
        self.n = np.full(capacity, -math.inf)  # log2 decayed clicks (CF and popularity)
        self.examined = np.full(capacity, -math.inf)  # log2 decayed examinations (bandit)
        self.clicks = np.full(capacity, -math.inf)  # log2 decayed joined clicks (bandit)
        self.created = np.full(capacity, math.nan)  # created_at, ms (NaN: not in the catalog)
        self.stats_until = np.full(capacity, -math.inf)  # monotonic s until which stats are fresh
        self.meta_until = np.full(capacity, -math.inf)
        self.tokens = np.full((capacity, 4), NO_TOKEN, dtype=np.int32)  # (cap, width) token ids
        self.n_tokens = np.zeros(capacity, dtype=np.int32)
        self.token_sets: list[frozenset[str]] = [frozenset()] * capacity
        self.token_index: dict[str, int] = {}
        self._queued: list[np.ndarray] = []

    def __len__(self) -> int:
        return self.size

    def _grow(self, need: int) -> None:
        cap = len(self.ids)
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name, fill in (("n", -math.inf), ("examined", -math.inf), ("clicks", -math.inf),
                           ("created", math.nan), ("stats_until", -math.inf), ("meta_until", -math.inf)):
            old = getattr(self, name)
            grown = np.full(new, fill)
            grown[:cap] = old
            setattr(self, name, grown)
        ids = np.empty(new, dtype=object)
        ids[:cap] = self.ids
        self.ids = ids
        toks = np.full((new, self.tokens.shape[1]), NO_TOKEN, dtype=np.int32)
        toks[:cap] = self.tokens
        self.tokens = toks
        n_tokens = np.zeros(new, dtype=np.int32)
        n_tokens[:cap] = self.n_tokens
        self.n_tokens = n_tokens
        self.token_sets += [frozenset()] * (new - cap)

    def _intern(self, item: str) -> int:
        row = self.size
        self._grow(row + 1)
        self.index[item] = row
        self._bindex[item.encode()] = row
        self.ids[row] = item
        self.size = row + 1
        return row

    def rows(self, items: Sequence[str]) -> np.ndarray:
        """Row of each item, assigning rows to ids never seen (nothing is read). (n,) int64"""
        get = self.index.get
        out = [get(i, -1) for i in items]
        for k, row in enumerate(out):
            if row == -1:  # new (or repeated in ``items`` after a new one)
                found = get(items[k])
                out[k] = found if found is not None else self._intern(items[k])
        return np.array(out, dtype=np.int64)

    def rows_of_bytes(self, items: Sequence[bytes]) -> np.ndarray:
        """``rows`` for ids as UTF-8 bytes (as Redis returns them). (n,) int64"""
        get = self._bindex.get
        out = [get(b, -1) for b in items]
        for k, row in enumerate(out):
            if row == -1:
                found = self._bindex.get(items[k])
                out[k] = found if found is not None else self._intern(items[k].decode())
        return np.array(out, dtype=np.int64)

    def prefetch(self, rows: np.ndarray) -> None:
        """Read these rows too, if stale, with the next ``ensure`` (one round trip for both)."""
        self._queued.append(np.asarray(rows, dtype=np.int64))

    def drop_prefetch(self) -> None:
        """Forget rows queued by ``prefetch`` (a new refresh begins)."""
        self._queued.clear()

    def ensure(self, rows: np.ndarray, ns: Namespace, now: float) -> None:
        """Read the statistics (and, when stale, the content) of the rows not fresh at ``now``,
        and of the rows queued by ``prefetch``, in one round trip."""
        rows = np.asarray(rows, dtype=np.int64)
        stale = rows[self.stats_until[rows] < now]
        self.hits += len(rows) - len(stale)
        if self._queued:
            queued = np.concatenate(self._queued)
            self._queued = []
            if len(stale):  # something is read anyway: the queued rows come along
                stale = np.concatenate([stale, queued[self.stats_until[queued] < now]])
            else:
                self._queued = [queued]
        if not len(stale):
            return
        stale = np.unique(stale)
        self.misses += len(stale)
        no_meta = stale[self.meta_until[stale] < now]
        stats, meta = self._read(self.ids[stale].tolist(), self.ids[no_meta].tolist(), ns)
        self.n[stale], self.examined[stale], self.clicks[stale] = stats[:, 0], stats[:, 1], stats[:, 2]
        self.stats_until[stale] = now + self.ttl_s
        if len(no_meta):
            self._set_meta(no_meta, meta)
            self.meta_until[no_meta] = now + self.meta_ttl_s

    def _read(self, stats_of: list[str], meta_of: list[str], ns: Namespace) -> tuple[np.ndarray, list[tuple[int | None, frozenset[str]]]]:
        """(len(stats_of), 3) log2 sums n, e, c (-inf where absent), and (created_at, tokens)
        of each item of ``meta_of``, in one call."""
        keys = [ns.item_stats(i) for i in stats_of] + [ns.item_meta(i) for i in meta_of]
        state = self.recstore.state
        if state.per_user_calls:  # keys in many hash slots (Redis Cluster): one call per key
            pipe = state.client.pipeline(transaction=False)
            for i, key in enumerate(keys):
                pipe.hmget(key, *(_STATS if i < len(stats_of) else _META))
            flat = [v for row in pipe.execute() for v in row]
        else:
            flat = self._read_items(keys=keys, args=[len(stats_of)])
        k = 3 * len(stats_of)
        stats = np.array([float(v) if v is not None else -math.inf for v in flat[:k]]).reshape(-1, 3)
        meta = []
        for j in range(k, len(flat), 4):
            created, title, tags, category = flat[j : j + 4]
            meta.append((int(created) if created is not None else None,
                         tokens(title.decode() if title else "", tuple(json.loads(tags)) if tags else (),
                                category.decode() if category else None)))
        return stats, meta

    def _set_meta(self, rows: np.ndarray, meta: list[tuple[int | None, frozenset[str]]]) -> None:
        index = self.token_index
        ids = [[index.setdefault(t, len(index)) for t in sorted(toks)] for _, toks in meta]
        width = max((len(x) for x in ids), default=0)
        if width > self.tokens.shape[1]:
            wider = np.full((len(self.tokens), max(width, 2 * self.tokens.shape[1])), NO_TOKEN, dtype=np.int32)
            wider[:, : self.tokens.shape[1]] = self.tokens
            self.tokens = wider
        padded = np.full((len(rows), self.tokens.shape[1]), NO_TOKEN, dtype=np.int32)
        for r, x in enumerate(ids):
            padded[r, : len(x)] = x
        self.tokens[rows] = padded
        self.n_tokens[rows] = [len(x) for x in ids]
        self.created[rows] = [math.nan if c is None else float(c) for c, _ in meta]
        for row, (_, toks) in zip(rows.tolist(), meta):
            self.token_sets[row] = toks

    def no_evidence(self, rows: np.ndarray) -> np.ndarray:
        """Catalog items nobody has clicked or been shown yet. (n,) bool"""
        return (self.n[rows] == -math.inf) & (self.examined[rows] == -math.inf) & ~np.isnan(self.created[rows])

    def forget(self, items: Sequence[str]) -> None:
        """Read these items again next time (they were announced anew)."""
        rows = [self.index[i] for i in items if i in self.index]
        self.stats_until[rows] = -math.inf
        self.meta_until[rows] = -math.inf

    def clear(self) -> None:
        """Forget every row (caches built on rows see the new ``generation``)."""
        self.generation += 1
        self._allocate(1024)


class NeighbourCache:
    """Per item row: its strongest CF neighbours (rows) and their cosine similarities, kept for
    ``ttl_s``. The similarities are ``models.learners.cosine_similarity`` of the co-occurrence
    sums and the click counts read at the time, so serving does not recompute them per user."""

    def __init__(self, recstore: RecStore, items: ItemTable, ttl_s: float, max_items: int = 20_000) -> None:
        self.recstore = recstore
        self.items = items
        self.ttl_s = ttl_s
        self.max_items = max_items  # lists kept at most (each up to per_item rows and floats)
        self._rows: dict[int, tuple[float, int, np.ndarray, np.ndarray]] = {}  # row -> (until, per_item, rows, sims)
        self._generation = items.generation

    def get(self, rows: Sequence[int], per_item: int, ns: Namespace, now: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """row -> (neighbour rows (m,) int64, similarities (m,) float64, in Redis's order)."""
        if self._generation != self.items.generation:
            self._rows.clear()
            self._generation = self.items.generation
        cached = self._rows
        if len(cached) > self.max_items:  # bounded: expired lists go first, then everything
            for r in [r for r, hit in cached.items() if hit[0] < now]:
                del cached[r]
            if len(cached) > self.max_items:
                cached.clear()
        missing = [r for r in dict.fromkeys(rows) if (hit := cached.get(r)) is None or hit[0] < now or hit[1] != per_item]
        if missing:
            table = self.items
            lists = self.recstore.neighbours_raw(table.ids[missing].tolist(), per_item, ns)
            nbr = [table.rows_of_bytes(names) if names else np.zeros(0, np.int64) for names, _ in lists]
            table.ensure(np.concatenate([np.asarray(missing, np.int64), *nbr]), ns, now)
            until = now + self.ttl_s
            for row, (_, c_ij), got in zip(missing, lists, nbr):
                cached[row] = (until, per_item, got, cosine_similarity(c_ij, table.n[row], table.n[got]))
        return {r: (cached[r][2], cached[r][3]) for r in rows}

    def clear(self) -> None:
        self._rows.clear()


@dataclass
class Sessions:
    """The sessions of a batch of users, as item rows."""

    items: list[np.ndarray]  # per user: item rows of the retained clicks, oldest first (int64)
    last_ts: np.ndarray  # (B,) int64 event time of the newest click (-1: none)
    prev_ts: np.ndarray  # (B,) int64 the one before it (-1: none)
    tie_ids: list[list[str]]  # per user: event ids of the clicks at last_ts exactly, oldest first
    clicks: np.ndarray  # (B,) int64 the user's click count (session meta)


# One call for a batch: per user, the items of the sequence (members are item|event_id, by
# event time), the two newest times, the event ids at the newest time, and the click count.
# Scores come back as strings, so the client does no per-score float conversion.
_READ_SESSIONS = """
local out = {}
local sep = ARGV[1]
for k = 1, #KEYS, 2 do
  local r = redis.call('ZRANGE', KEYS[k], 0, -1, 'WITHSCORES')
  local n = #r / 2
  local items, ties = {}, {}
  for j = 1, n do
    local m = r[2 * j - 1]
    local p = string.find(m, sep, 1, true)
    items[j] = p and string.sub(m, 1, p - 1) or m
  end
  local last, prev = '', ''
  if n > 0 then
    last = r[2 * n]
    if n > 1 then prev = r[2 * n - 2] end
    local j = n
    while j >= 1 and r[2 * j] == last do
      local m = r[2 * j - 1]
      local p = string.find(m, sep, 1, true)
      ties[#ties + 1] = p and string.sub(m, p + 1) or ''
      j = j - 1
    end
  end
  out[#out + 1] = {items, last, prev, ties, redis.call('HGET', KEYS[k + 1], 'clicks') or '0'}
end
return out
"""


def _ts(raw: bytes) -> int:
    return int(float(raw)) if raw else -1


class SessionReader:
    """``read``: the sessions of many users in one round trip (one script call; on Redis
    Cluster, where users' keys lie in different slots, one call per hash slot in a pipeline)."""

    def __init__(self, recstore: RecStore, items: ItemTable) -> None:
        self.state = recstore.state
        self.items = items
        self._script = self.state.client.register_script(_READ_SESSIONS)

    def read(self, users: Sequence[str | None], ns: Namespace) -> Sessions:
        named = [u for u in users if u is not None]
        replies: list = []
        if named:
            if self.state.per_user_calls:
                replies = self._read_by_slot(named, ns)
            else:
                keys = [k for u in named for k in (ns.session_seq(u), ns.session_meta(u))]
                replies = self._script(keys=keys, args=[SEPARATOR])
        got = iter(replies)
        B = len(users)
        out = Sessions([], np.full(B, -1, np.int64), np.full(B, -1, np.int64), [], np.zeros(B, np.int64))
        empty = np.zeros(0, np.int64)
        for i, user in enumerate(users):
            if user is None:
                out.items.append(empty)
                out.tie_ids.append([])
                continue
            items, last, prev, ties, clicks = next(got)
            out.items.append(self.items.rows_of_bytes(items) if items else empty)
            out.last_ts[i], out.prev_ts[i], out.clicks[i] = _ts(last), _ts(prev), int(clicks)
            out.tie_ids.append([t.decode() for t in reversed(ties)])
        return out

    def _read_by_slot(self, named: Sequence[str], ns: Namespace) -> list:
        """The script's reply per user of ``named`` (in its order), from one call per hash
        slot (Redis Cluster), sent in one pipeline; loaded again if Redis lost the script."""
        packer = SlotCalls([SEPARATOR], len(named) + 1, by_slot=True)  # no size bound: one call per slot
        for k, u in enumerate(named):
            packer.add([ns.session_seq(u), ns.session_meta(u)], [], 1, [k])
        calls = packer.calls()
        client = self.state.client
        for attempt in (0, 1):
            pipe = client.pipeline(transaction=False)
            for call in calls:
                evalsha(pipe, self._script.sha, call.keys, call.args)
            try:
                results = pipe.execute()
                break
            except NoScriptError:
                if attempt:
                    raise
                client.script_load(self._script.script)
        out: list = [None] * len(named)
        for call, reply in zip(calls, results):
            for k, one in zip(call.members, reply):
                out[k] = one
        return out


class IndexRows:
    """Between a vector index's rows and the item table's rows, both ways (kept up to date as
    cold items are appended to the index)."""

    def __init__(self, index: VectorIndex, items: ItemTable) -> None:
        self.index = index
        self.items = items
        self.generation = items.generation
        self.item_of = np.zeros(0, np.int64)  # (len(index),) index row -> item row
        self._index_of = np.zeros(0, np.int64)  # (items capacity,) item row -> index row, -1: none
        self.update()

    def update(self) -> None:
        # Every item of the index got a row when the mapping was built or extended, so an
        # item row outside ``_index_of`` is an item the index does not hold.
        n = len(self.index)
        if n > len(self.item_of):
            new = self.items.rows(self.index.items[len(self.item_of) : n])
            self.item_of = np.concatenate([self.item_of, new])
            index_of = np.full(int(self.item_of.max()) + 1, -1, np.int64)
            index_of[self.item_of] = np.arange(n)
            self._index_of = index_of

    def index_of(self, rows: np.ndarray) -> np.ndarray:
        """Index row of each item row, -1 where the index does not hold it. (n,) int64"""
        out = np.full(len(rows), -1, np.int64)
        inside = rows < len(self._index_of)
        out[inside] = self._index_of[rows[inside]]
        return out



class SharedReads:
    """Reads every user of a batch shares: the trending list, the exploration pool, items."""

    def __init__(self, recstore: RecStore, cfg: ServingSettings, seed: int = 0) -> None:
        self.recstore = recstore
        self.cfg = cfg
        self.items = ItemTable(recstore, cfg.stats_ttl_s)
        self.neighbours = NeighbourCache(recstore, self.items, cfg.neighbours_ttl_s)
        self.sessions = SessionReader(recstore, self.items)
        self.cold: list[str] = []  # catalog items announced while serving, newest last
        self._pyrng = random.Random(seed)
        self._trend: tuple[float, np.ndarray, np.ndarray, np.ndarray] = self._no_trend()
        self._pool: tuple[float, np.ndarray] = (-1.0, np.zeros(0, np.int64))
        self._index_rows: dict[str, IndexRows] = {}  # per source with an item index (seq, mf, tower)

    @staticmethod
    def _no_trend() -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        return (-1.0, np.zeros(0, np.int64), np.zeros(0), np.zeros(0))

    def begin(self) -> float:
        """Start of a refresh: the time freshness is judged at. A table grown past its bound is
        cleared here, between refreshes, never while one holds rows."""
        indexed = sum(len(m.item_of) for m in self._index_rows.values())
        if len(self.items) > self.items.max_items + indexed:  # the index's items always have rows
            self.reset(keep_cold=True)
        self.items.drop_prefetch()
        return time.monotonic()

    def _until(self) -> float:
        return time.monotonic() + max(self.cfg.stats_ttl_s, 0.05)

    def _trend_read(self, ns: Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._trend[0] < time.monotonic():
            top = self.recstore.trending_scores(max(self.cfg.trending_candidates * 5, 1000), ns)
            rows = self.items.rows([i for i, _ in top])
            scores = np.fromiter((s for _, s in top), float, len(top))
            lookup = np.full(len(self.items.ids), -math.inf)  # item row -> log2 trending count
            lookup[rows] = scores
            self._trend = (self._until(), rows, scores, lookup)
        return self._trend[1], self._trend[2], self._trend[3]

    def trending(self, ns: Namespace) -> tuple[np.ndarray, np.ndarray]:
        """The trending items (rows), best first, with their log2 decayed click counts."""
        rows, scores, _ = self._trend_read(ns)
        return rows, scores

    def trending_score(self, rows: np.ndarray, ns: Namespace) -> np.ndarray:
        """log2 decayed trending count of each item row (-inf outside the trending list)."""
        lookup = self._trend_read(ns)[2]
        out = np.full(len(rows), -math.inf)
        inside = rows < len(lookup)
        out[inside] = lookup[rows[inside]]
        return out

    def index_rows(self, index: VectorIndex, owner: str = "seq") -> IndexRows:
        """The row mapping of ``owner``'s item index (built once per index, extended as it grows)."""
        m = self._index_rows.get(owner)
        if m is None or m.index is not index or m.generation != self.items.generation:
            m = self._index_rows[owner] = IndexRows(index, self.items)
        else:
            m.update()
        return m

    def reset(self, keep_cold: bool = False) -> None:
        """Forget everything read (the state was replaced: a restore)."""
        self.items.clear()
        self.neighbours.clear()
        if not keep_cold:
            self.cold.clear()
        self._trend = self._no_trend()
        self._pool = (-1.0, np.zeros(0, np.int64))
        self._index_rows = {}

    def add_cold(self, items: Sequence[str]) -> None:
        """Items announced as new: they join the exploration pool at once."""
        for item in items:
            if item not in self.cold:
                self.cold.append(item)
        del self.cold[:-10_000]
        self._pool = (-1.0, np.zeros(0, np.int64))

    def explore_pool(self, ns: Namespace) -> np.ndarray:
        """The newest catalog items (and those announced while serving), then a random
        sample of the trending ones, ``serving.explore_pool`` in all (item rows)."""
        if self._pool[0] < time.monotonic():
            size = self.cfg.explore_pool
            newest = [i for i, _ in self.recstore.newest_items(size, ns)]
            listed = set(newest)
            newest += [i for i in reversed(self.cold) if i not in listed][: max(0, size - len(newest))]
            top = self.items.ids[self.trending(ns)[0]].tolist()
            sample = self._pyrng.sample(top, min(len(top), max(0, size - len(newest)))) if top else []
            self._pool = (self._until(), self.items.rows(list(dict.fromkeys(newest + sample))))
        return self._pool[1]


__all__ = ["ItemTable", "IndexRows", "NeighbourCache", "SessionReader", "Sessions", "SharedReads"]
