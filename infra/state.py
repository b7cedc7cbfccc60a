"""Named state in Redis, inside a namespace: session sequences, learner state, the catalog.

Everything above this module asks for state by name (a user's session, an item's neighbours,
a posterior); only ``infra.keys`` knows key strings. Writes are idempotent: applying the same
Kafka record twice leaves the state as applying it once. Which namespace is live, rebuilds
and their switch are the registry's (``infra.registry``, reached as ``StateStore.registry``).
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import redis
from redis.commands.core import Script

from streamrec.infra import redisconn
from streamrec.infra.keys import Keys, Namespace
from streamrec.infra.redisconn import SlotCalls, evalsha
from streamrec.infra.registry import Registry, unlink_matching
from streamrec.infra.settings import RedisSettings, Settings
from streamrec.models.decay import NEG_INF, log_sum_by
from streamrec.models.events import Item
from streamrec.models.learners import (
    CF_PER_ITEM,
    BanditConfig,
    ItemCFConfig,
    ItemDelta,
    Posterior,
    TrendingConfig,
    Update,
    aggregate_updates,
    best_first,
    beta_posterior,
    cosine_similarity,
    neighbour_scores,
)
from streamrec.models.session import (
    US,
    Entry,
    SessionConfig,
    SessionMeta,
    Status,
    UserEventRow,
    parse_member,
    split_sessions,
)

log = logging.getLogger(__name__)


def _lua(name: str) -> str:
    """A script's source, with each ``-- @include <file>`` line replaced by that file."""
    folder = resources.files("streamrec.infra").joinpath("lua")
    return re.sub(r"^-- @include (\S+)$", lambda m: folder.joinpath(m.group(1)).read_text(),
                  folder.joinpath(name).read_text(), flags=re.M)


_APPLY_ITEM = """
local cur = redis.call('HMGET', KEYS[1], 'ts', 'id')
local ts = tonumber(ARGV[1])
if cur[1] and (tonumber(cur[1]) > ts or (tonumber(cur[1]) == ts and cur[2] > ARGV[2])) then
  return 0
end
redis.call('HSET', KEYS[1], 'ts', ARGV[1], 'id', ARGV[2], 'title', ARGV[3], 'tags', ARGV[4],
           'category', ARGV[5], 'created_at', ARGV[6])
return 1
"""

_MAX_FIELD = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


def connect(settings: RedisSettings | str, **overrides: Any) -> "redis.Redis | redis.cluster.RedisCluster":
    """A client for the Redis settings (``infra.redisconn.connect``: credentials, TLS, Redis
    Cluster), with a few quick retries of its own (``infra.retry.client_retry``); longer
    outages surface as errors for the caller's ``RetryPolicy``. Calls never block forever.
    A bare URL stands for the default settings with that URL."""
    rs = RedisSettings(url=settings) if isinstance(settings, str) else settings
    return redisconn.connect(rs, **overrides)


# Script calls are cut to a bounded amount of work each, so that no call blocks Redis (and the
# serving reads waiting behind it) for more than a few milliseconds. Units: one field or pair
# update; an item costs ITEM_COST on top of its updates (its reads, writes and expiries).
ITEM_COST = 12
ITEM_CALL_BUDGET = 1000
USER_CALL_EVENTS = 60  # user events per call of the session script
# A key's expiry is set again once the last setting is this part of its TTL old (not on
# every update): a key expires between (1 - 1/TTL_REFRESH_PARTS) x TTL and TTL after its last
# update, and most updates save the PEXPIRE calls.
TTL_REFRESH_PARTS = 64
TREND_BUCKETS = 16  # trending watermarks per source (a batch's trending work splits along them)
TREND_CALL_ITEMS = 600  # items per call of the trending script at most (whole buckets)


def trend_bucket(item: str) -> int:
    """The trending bucket of an item (stable across processes and versions)."""
    return zlib.crc32(item.encode()) % TREND_BUCKETS


# Fields of a namespace's progress hash besides "<topic>:<partition>" (next offset to apply);
# "|" never occurs in topic names.
FIELD_SEP = "|"
BASE, DEAD_LETTERS, INCARNATION = "base|", "dlq|", "inc|"


@dataclass(frozen=True)
class Offsets:
    """A namespace's positions per source partition ("<topic>:<partition>"). All are
    *effective* offsets: the partition's incarnation base plus the Kafka offset."""

    progress: dict[str, int]  # next offset to apply
    base: dict[str, int]  # effective offset of the current incarnation's Kafka offset 0
    dead_letters: dict[str, int]  # every dead letter below this was delivered
    incarnations: dict[str, int]  # how many times the partition restarted from offset 0

    def effective(self, tp: str, offset: int) -> int:
        return self.base.get(tp, 0) + offset


@dataclass(frozen=True)
class SessionView:
    """A user's session state as readers see it."""

    user: str
    namespace: str
    entries: list[Entry]  # oldest first
    meta: SessionMeta
    clicks: int
    impressions: int
    gap_ms: int

    def sessions(self) -> list[list[Entry]]:
        return split_sessions(self.entries, self.gap_ms)

    def to_dict(self) -> dict[str, Any]:
        current = [e for e in self.entries if self.meta.session_start is not None and e.ts >= self.meta.session_start]
        return {
            "user": self.user,
            "namespace": self.namespace,
            "clicks": self.clicks,
            "impressions": self.impressions,
            "last_ts": self.meta.last_ts,
            "session": {
                "id": f"{self.user}:{self.meta.session_start}" if self.meta.session_start is not None else None,
                "start_ts": self.meta.session_start,
                "length": self.meta.session_len,
                "items": [e.item for e in current],
            },
            "recent": [{"item": e.item, "ts": e.ts, "event_id": e.event_id} for e in self.entries],
        }


@dataclass
class StateStore:
    """Redis-backed state of streamrec under one key prefix."""

    client: redis.Redis
    keys: Keys
    session: SessionConfig
    # Redis Cluster: every script call names keys of one hash slot (users and items grouped by
    # slot, ``infra.redisconn.SlotCalls``) instead of a batch's keys in any slot. Set from
    # ``redis.cluster`` by ``from_settings``; tests force it on a standalone Redis.
    per_user_calls: bool = False
    # learner updates summed per item and field before they are sent (False: one by one, the
    # reference path the benchmark and the property tests compare with)
    aggregate: bool = True
    cf: ItemCFConfig = field(default_factory=ItemCFConfig)
    trending_config: TrendingConfig = field(default_factory=TrendingConfig)
    bandit: BanditConfig = field(default_factory=BanditConfig)
    registry: Registry = field(init=False, repr=False)
    _apply: Script = field(init=False, repr=False)
    _item: Script = field(init=False, repr=False)
    _max_field: Script = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.registry = Registry(self.client, self.keys)
        self._apply = self.client.register_script(_lua("apply_user_events.lua"))
        self._item = self.client.register_script(_APPLY_ITEM)
        self._max_field = self.client.register_script(_MAX_FIELD)
        self._item_facts = self.client.register_script(_lua("apply_item_facts.lua"))
        self._item_batch = self.client.register_script(_lua("apply_item_batch.lua"))
        self._trending = self.client.register_script(_lua("apply_trending.lua"))
        self._load_scripts()

    def _load_scripts(self) -> None:
        for script in (self._apply, self._item, self._max_field, self._item_facts, self._item_batch, self._trending):
            self.client.script_load(script.script)

    def _run_pipeline(self, calls: list[tuple[Script, list[str], list[Any]]]) -> list[Any]:
        """EVALSHA each call in one pipeline; scripts Redis lost (a restart) are loaded again.

        A connection failure is not retried here: the caller's ``RetryPolicy`` retries its
        whole unit of work, which first checks that the state it writes to is still there
        (a Redis that restarted empty must be noticed, not written into)."""
        for attempt in range(3):
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args in calls:
                evalsha(pipe, script.sha, keys, args)  # a cluster pipeline routes it by slot
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                self._load_scripts()
        raise AssertionError("unreachable")

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> "StateStore":
        s, ln = settings.session, settings.learners
        client = client if client is not None else connect(settings.redis)
        return cls(
            client=client,
            keys=Keys(settings.redis.prefix),
            per_user_calls=settings.redis.cluster or redisconn.is_cluster(client),
            session=SessionConfig(
                s.max_length, int(s.gap_s * 1000), s.dedupe_window, ln.cf_window,
                int(ln.attribution_window_s * 1000), ln.max_requests, ln.facts_span,
                join_lateness_ms=int(ln.join_lateness_s * 1000), ttl_ms=int(s.ttl_s * 1000),
                facts_ttl_ms=int(ln.facts_ttl_s * 1000),
            ),
            cf=ItemCFConfig(ln.cf_window, ln.cf_pair_half_life_s * 1000, ln.cf_half_life_s * 1000,
                            ln.cf_max_neighbours, item_ttl_ms=int(ln.item_ttl_s * 1000)),
            trending_config=TrendingConfig(ln.trending_half_life_s * 1000, max_items=ln.trending_max_items),
            bandit=BanditConfig(ln.bandit_prior_alpha, ln.bandit_prior_beta, ln.bandit_eta,
                                ln.bandit_half_life_s * 1000, max_segments=ln.max_segments),
        )

    # -- namespaces (the registry's) ------------------------------------------------------

    def live(self) -> Namespace:
        """The live namespace (``Registry.live``)."""
        return self.registry.live()

    def _ns(self, namespace: str | None) -> Namespace:
        return self.keys.ns(namespace) if namespace else self.registry.live()

    def drop_everything(self) -> int:
        """Delete every key under this store's prefix (benchmarks, the demo, evaluation)."""
        return unlink_matching(self.client, self.keys.all_pattern())

    # -- writes -----------------------------------------------------------------------------

    def apply_user_events(
        self, ns: Namespace, rows: Sequence[UserEventRow], floors: Sequence[int] | None = None,
    ) -> list[tuple[Status, int, str]]:
        """Apply rows (in offset order per user); returns (status, first offset, facts) per row.

        ``floors``, one per row: the offset below which the row's partition was fully applied
        before this batch (its recorded progress); facts below it are dropped and a record
        below it that comes back yields ``FACTS_DONE`` (``UserState.apply``). None: 0."""
        if not rows:
            return []
        if floors is not None and len(floors) != len(rows):
            raise ValueError(f"{len(floors)} facts floors for {len(rows)} rows")
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(row.user, []).append(index)
        s = self.session
        header = [s.max_length, s.gap_ms, s.dedupe_window, s.cf_window, s.attribution_ms,
                  s.max_requests, s.facts_span, s.join_horizon_ms, s.ttl_ms, s.facts_ttl_ms,
                  int(time.time() * 1000), s.ttl_ms // TTL_REFRESH_PARTS]
        # Bounded calls (ITEM_CALL_BUDGET's reason): a call is closed once it holds
        # USER_CALL_EVENTS events (a user's events all go in one call). On Redis Cluster, one
        # open call per hash slot: every call's keys lie in one slot.
        packer = SlotCalls(header, USER_CALL_EVENTS, self.per_user_calls)
        for user, indexes in groups.items():
            user_args: list[Any] = [len(indexes)]
            for i in indexes:
                r = rows[i]
                shown = US.join(f"{item}{US}{pos}" for item, pos in r.shown)
                user_args += [r.kind, r.event_id, r.item, r.ts, r.offset, r.request_id, r.segment, shown,
                              floors[i] if floors is not None else 0]
            packer.add(ns.user_keys(user), user_args, len(indexes), indexes)
        calls = packer.calls()
        results = self._run_pipeline([(self._apply, c.keys, c.args) for c in calls])
        out: list[tuple[Status, int, str]] = [(Status.APPLIED, 0, "")] * len(rows)
        for call, flat in zip(calls, results):
            for j, index in enumerate(call.members):
                facts = flat[3 * j + 2]
                out[index] = (Status(int(flat[3 * j])), int(flat[3 * j + 1]),
                              facts.decode() if isinstance(facts, bytes) else str(facts))
        return out

    def apply_item_updates(self, ns: Namespace, groups: Sequence[tuple[str, int, Sequence[Update]]]) -> int:
        """Apply learner updates of item-level state, grouped by source record ``(source,
        offset, updates)`` in offset order per source. Returns how many items were applied
        whole, or in part (the rest had been applied before).

        The batch is summed per item first (``aggregate_updates``: one log-space add per field
        and per pair) and sent in chunks of a bounded size (``ITEM_CALL_BUDGET``), so that no
        script call blocks Redis for long. An item whose records straddle its watermark (part
        of a redelivered batch was applied before) is sent again record by record."""
        if not self.aggregate:
            return self._apply_item_records(ns, groups, None)
        return self.apply_item_deltas(ns, aggregate_updates(groups), lambda: groups)

    def apply_item_deltas(self, ns: Namespace, deltas: Sequence[ItemDelta],
                          records: Callable[[], Sequence[tuple[str, int, Sequence[Update]]]]) -> int:
        """``apply_item_updates`` of a batch already summed (``aggregate_updates``,
        ``Learners.summed``); ``records()`` gives the batch's updates record by record, asked
        for only when an item straddles its watermark."""
        if not deltas:
            return 0
        header: list[Any] = [self.cf.max_neighbours, self.cf.item_ttl_ms, self.bandit.max_segments,
                             int(time.time() * 1000), self.cf.item_ttl_ms // TTL_REFRESH_PARTS]
        packer = SlotCalls(header, ITEM_CALL_BUDGET, self.per_user_calls)  # one slot per call on a cluster
        for delta in deltas:
            args: list[Any] = [len(delta.ranges)]
            for source, (lo, hi) in delta.ranges.items():
                args += [source, lo, hi]
            args.append(len(delta.fields))
            for name, x in delta.fields:
                args += [name, repr(x)]
            args.append(len(delta.pairs))
            for other, x in delta.pairs:
                args += [other, repr(x)]
            packer.add([ns.item_neighbours(delta.item), ns.item_stats(delta.item)], args,
                       ITEM_COST + len(delta.fields) + len(delta.pairs), [delta])
        calls = packer.calls()
        applied = 0
        straddling: set[str] = set()
        for call, reply in zip(calls, self._run_pipeline([(self._item_batch, c.keys, c.args) for c in calls])):
            applied += int(reply[0])
            straddling.update(call.members[int(j)].item for j in reply[2:])
        if straddling:
            self._apply_item_records(ns, records(), straddling)
            applied += len(straddling)
        return applied

    def _apply_item_records(self, ns: Namespace, groups: Sequence[tuple[str, int, Sequence[Update]]],
                            only: set[str] | None) -> int:
        """The records behind the updates of the items ``only`` (None: all) one by one
        (``apply_item_facts.lua``): each is applied where its offset lies above the item's
        watermark for its source. Returns how many (item, record) groups were new."""
        per_item: dict[str, list[tuple[str, int, list[Update]]]] = {}
        for source, offset, updates in groups:
            by_item: dict[str, list[Update]] = {}
            for u in updates:
                if only is None or u.item in only:
                    by_item.setdefault(u.item, []).append(u)
            for item, ops in by_item.items():
                per_item.setdefault(item, []).append((source, offset, ops))
        header: list[Any] = [self.cf.max_neighbours, self.cf.item_ttl_ms, self.bandit.max_segments]
        packer = SlotCalls(header, ITEM_CALL_BUDGET, self.per_user_calls)  # one slot per call on a cluster
        for item, item_groups in per_item.items():
            args: list[Any] = [len(item_groups)]
            cost = 0
            for source, offset, ops in item_groups:
                args += [source, offset, len(ops)]
                for u in ops:
                    args += [u.op, u.arg, repr(u.x)]
                cost += ITEM_COST + 3 * len(ops)  # a watermark read per record, three calls per op
            packer.add([ns.item_neighbours(item), ns.item_stats(item)], args, cost, [item])
        calls = [(self._item_facts, c.keys, c.args) for c in packer.calls()]
        return sum(int(n) for n in self._run_pipeline(calls))

    def apply_trending(self, ns: Namespace, ops: Sequence[tuple[str, int, str, str, str]]) -> int:
        """``(source, offset, op, item, value)`` in offset order per source: op "c" a click
        (value: log2 contribution), op "i" a catalog record (value: category or ""). Each
        trending set keeps its ``trending_config.max_items`` highest items. Returns how many
        records were applied (the rest had been applied before).

        Items fall in ``TREND_BUCKETS`` buckets, each with its own watermark per source: a
        bucket's clicks are summed per item (one log-space add each) and the buckets go in
        calls of at most ``TREND_CALL_ITEMS`` items, each idempotent on its own. Catalog records
        go one by one, in the call of their item's bucket; so do the clicks of a bucket whose
        records straddle its watermark (part of a redelivered batch was applied before).

        The script writes only keys it is given: the per-category sets of the items' current
        categories (read first) and of the new ones. Should a category change in between (a
        concurrent worker), the script names what it lacks, writes nothing, and is called
        again with those keys too."""
        if not ops:
            return 0
        items = sorted({op[3] for op in ops})
        current = self.client.hmget(ns.trending_meta(), [f"cat:{item}" for item in items])
        categories = {c.decode() for c in current if c is not None}
        categories |= {op[4] for op in ops if op[2] == "i" and op[4]}
        one_by_one: dict[int, list[Any]] = {}
        clicks: dict[int, list[tuple[str, int, str, str, str]]] = {}
        for op in ops:
            bucket = trend_bucket(op[3])
            if op[2] == "c" and self.aggregate:
                clicks.setdefault(bucket, []).append(op)
            else:
                one_by_one.setdefault(bucket, []).extend([*op, bucket])
        summed: dict[int, list[Any]] = {}
        sizes: dict[int, int] = {}
        for bucket, bucket_ops in clicks.items():
            ranges: dict[str, list[int]] = {}
            slots: dict[str, int] = {}
            index = []
            for source, offset, _, item, _ in bucket_ops:
                span = ranges.setdefault(source, [offset, offset])
                span[0], span[1] = min(span[0], offset), max(span[1], offset)
                index.append(slots.setdefault(item, len(slots)))
            xs = np.fromiter((float(op[4]) for op in bucket_ops), np.float64, len(bucket_ops))
            sums = log_sum_by(np.asarray(index), xs, len(slots)).tolist()
            group: list[Any] = [bucket, len(bucket_ops), len(ranges)]
            for source, (lo, hi) in ranges.items():
                group += [source, lo, hi]
            group.append(len(slots))
            for item, x in zip(slots, sums):
                group += [item, repr(x)]
            summed[bucket] = group
            sizes[bucket] = len(slots)
        applied = 0
        buckets = sorted(set(one_by_one) | set(summed))
        chunks: list[list[int]] = []
        size = TREND_CALL_ITEMS
        for bucket in buckets:
            cost = sizes.get(bucket, 0) + len(one_by_one.get(bucket, ())) // 6
            if not chunks or size + cost > TREND_CALL_ITEMS:
                chunks.append([])
                size = 0
            chunks[-1].append(bucket)
            size += cost
        straddling: list[int] = []
        for chunk in chunks:
            flat = [x for b in chunk for x in one_by_one.get(b, [])]
            groups = [summed[b] for b in chunk if b in summed]
            reply = self._trending_call(ns, categories, flat, groups)
            applied += int(reply[1])
            straddling += [int(b) for b in reply[2:]]
        if straddling:
            flat = [x for b in straddling for op in clicks[b] for x in (*op, b)]
            applied += int(self._trending_call(ns, categories, flat, [])[1])
        return applied

    def _trending_call(self, ns: Namespace, categories: set[str], flat: list[Any],
                       groups: list[list[Any]]) -> list[Any]:
        """One call of the trending script (``flat``: records one by one, six values each;
        ``groups``: summed buckets), with the category keys it needs."""
        tail: list[Any] = [len(flat) // 6, *flat, len(groups)]
        for group in groups:
            tail += group
        while True:
            names = sorted(categories)
            keys = [ns.trending(), ns.trending_meta(), *(ns.trending(c) for c in names)]
            args = [self.trending_config.max_items, len(names), *names, *tail]
            reply = self._run_pipeline([(self._trending, keys, args)])[0]
            head = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if head == "ok":
                return list(reply)
            categories |= {c.decode() if isinstance(c, bytes) else str(c) for c in reply[1:]}

    def apply_items(self, ns: Namespace, items: Iterable[Item]) -> list[bool]:
        """Upsert catalog records; the newest (timestamp, id) per item wins. Returns, per
        record, whether it is now the item's record."""
        items = list(items)
        if not items:
            return []
        won = self._run_pipeline([
            (self._item, [ns.item_meta(it.item)],
             [it.timestamp, it.id, it.title, json.dumps(it.tags), it.category or "",
              it.created_at if it.created_at is not None else it.timestamp])
            for it in items
        ])
        pipe = self.client.pipeline(transaction=False)
        for it, applied in zip(items, won):
            if applied:
                created = it.created_at if it.created_at is not None else it.timestamp
                pipe.zadd(ns.catalog(), {it.item: created})
        pipe.execute()
        return [bool(int(w)) for w in won]

    def record_progress(self, ns: Namespace, positions: dict[str, int]) -> None:
        """Remember the next offset to apply per "<topic>:<partition>" (kept at the maximum)."""
        self._run_pipeline([(self._max_field, [ns.progress()], [tp, offset])
                            for tp, offset in positions.items()])

    def record_dead_letters(self, ns: Namespace, positions: dict[str, int]) -> None:
        """Remember, per partition, the offset below which every dead letter was delivered
        (kept at the maximum): a redelivered bad record is not dead-lettered again."""
        self._run_pipeline([(self._max_field, [ns.progress()], [f"{DEAD_LETTERS}{tp}", offset])
                            for tp, offset in positions.items()])

    def offsets(self, ns: Namespace) -> Offsets:
        """Every position the namespace keeps per source partition, in one read."""
        out = Offsets({}, {}, {}, {})
        parts = {"": out.progress, BASE: out.base, DEAD_LETTERS: out.dead_letters, INCARNATION: out.incarnations}
        for key, value in self.client.hgetall(ns.progress()).items():
            kind, _, tp = key.decode().rpartition(FIELD_SEP)
            target = parts.get(kind + FIELD_SEP if kind else "")
            if target is not None:
                target[tp] = int(value)
        return out

    def progress(self, ns: Namespace) -> dict[str, int]:
        """Next offset to apply per "<topic>:<partition>" (effective: incarnation base included)."""
        return self.offsets(ns).progress

    def rebase(self, ns: Namespace, tp: str, base: int) -> None:
        """A partition's new incarnation: its Kafka offset 0 is effective offset ``base`` from now
        on (``base`` = the progress reached in the old one), so offsets keep growing and the
        learners' watermarks and the dedupe window keep working."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(ns.progress(), f"{BASE}{tp}", base)
        pipe.hincrby(ns.progress(), f"{INCARNATION}{tp}", 1)
        pipe.execute()

    def copy_bases(self, source: Namespace, target: Namespace) -> None:
        """A rebuild continues the live namespace's incarnations (same effective offsets)."""
        got = self.offsets(source)
        mapping = {**{f"{BASE}{tp}": v for tp, v in got.base.items()},
                   **{f"{INCARNATION}{tp}": v for tp, v in got.incarnations.items()}}
        if mapping:
            self.client.hset(target.progress(), mapping=mapping)

    # -- operations -------------------------------------------------------------------------

    def push_latencies(self, samples_ms: Sequence[float]) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(self.keys.latency(), *[f"{x:.3f}" for x in samples_ms])
        pipe.ltrim(self.keys.latency(), -1_000_000, -1)
        pipe.execute()

    def take_latencies(self) -> list[float]:
        pipe = self.client.pipeline(transaction=True)
        pipe.lrange(self.keys.latency(), 0, -1)
        pipe.delete(self.keys.latency())
        raw, _ = pipe.execute()
        return [float(x) for x in raw]

    # -- reads ------------------------------------------------------------------------------

    def session_view(self, user: str, namespace: str | None = None) -> SessionView:
        ns = self._ns(namespace)
        return self.session_views([user], ns.name)[0]

    def session_views(self, users: Sequence[str], namespace: str) -> list[SessionView]:
        """Several users' sessions in one round trip."""
        ns = self.keys.ns(namespace)
        pipe = self.client.pipeline(transaction=False)
        for user in users:
            pipe.zrange(ns.session_seq(user), 0, -1, withscores=True)
            pipe.hgetall(ns.session_meta(user))
        replies = pipe.execute()
        return [
            self._view(user, ns.name, replies[2 * i], replies[2 * i + 1])
            for i, user in enumerate(users)
        ]

    def _view(self, user: str, namespace: str, rows: list[Any], meta: dict[bytes, bytes]) -> SessionView:
        entries = []
        for raw, score in rows:
            item, event_id = parse_member(raw.decode())
            entries.append(Entry(item, int(score), event_id))
        m = {k.decode(): v.decode() for k, v in meta.items()}
        return SessionView(
            user=user,
            namespace=namespace,
            entries=entries,
            meta=SessionMeta(
                int(m["last_ts"]) if "last_ts" in m else None,
                int(m["session_start"]) if "session_start" in m else None,
                int(m.get("session_len", 0)),
            ),
            clicks=int(m.get("clicks", 0)),
            impressions=int(m.get("impressions", 0)),
            gap_ms=self.session.gap_ms,
        )

    # -- learner reads -----------------------------------------------------------------------

    def similar_items(self, item: str, k: int, namespace: str | None = None) -> list[tuple[str, float]]:
        """The k items most similar to ``item`` (decayed co-occurrence, cosine-normalised)."""
        ns = self._ns(namespace)
        # The whole list (at most cf_max_neighbours): ranking by cosine may reorder it entirely.
        rows = self.client.zrevrange(ns.item_neighbours(item), 0, -1, withscores=True)
        if not rows:
            return []
        names, sims = self._similarities(ns, [item], [rows])[0]
        order = best_first(names, sims)[:k]
        return [(names[j], float(sims[j])) for j in order]

    def _similarities(self, ns: Namespace, items: Sequence[str],
                      rows: Sequence[Sequence[tuple[bytes, float]]]) -> list[tuple[list[str], np.ndarray]]:
        """Each item's neighbours (``rows``: ZRANGE replies) with their cosine similarities;
        the click counts of all of them in one round trip."""
        names = [[m.decode() for m, _ in row] for row in rows]
        wanted = sorted(set(items).union(*names))
        pipe = self.client.pipeline(transaction=False)
        for name in wanted:
            pipe.hget(ns.item_stats(name), "n")
        count = {n: float(v) if v is not None else NEG_INF for n, v in zip(wanted, pipe.execute())}
        out = []
        for item, row, row_names in zip(items, rows, names):
            c_ij = np.fromiter((c for _, c in row), float, len(row))
            n_j = np.fromiter((count[j] for j in row_names), float, len(row))
            out.append((row_names, cosine_similarity(c_ij, count[item], n_j)))
        return out

    def recommend_cf(self, recent: Sequence[str], k: int, exclude: set[str], window: int,
                     namespace: str | None = None, per_item: int = CF_PER_ITEM) -> list[str]:
        """Items most similar to the recent ones (newer ones weigh more), in two round trips:
        ``models.learners.neighbour_scores`` over each recent item's ``4 * per_item``
        strongest co-occurrences."""
        ns = self._ns(namespace)
        sources = list(reversed(recent[-window:]))
        if not sources:
            return []
        pipe = self.client.pipeline(transaction=False)
        for item in sources:
            pipe.zrevrange(ns.item_neighbours(item), 0, per_item * 4 - 1, withscores=True)
        items, _ = neighbour_scores(self._similarities(ns, sources, pipe.execute()), per_item=per_item)
        return [j for j in items if j not in exclude][:k]

    def trending_excluding(self, n: int, exclude: set[str], category: str | None = None,
                           namespace: str | None = None) -> list[str]:
        """Top-n trending items not in ``exclude``, reading pages of the sorted set."""
        ns = self._ns(namespace)
        out: list[str] = []
        start, page = 0, max(2 * n, 50)
        while len(out) < n:
            chunk = [i.decode() for i in self.client.zrevrange(ns.trending(category), start, start + page - 1)]
            out += [i for i in chunk if i not in exclude][: n - len(out)]
            if len(chunk) < page:
                break
            start += page
        return out

    def trending(self, n: int, category: str | None = None, namespace: str | None = None) -> list[str]:
        """The top-n trending items (globally or in a category): one ZREVRANGE."""
        ns = self._ns(namespace)
        return [i.decode() for i in self.client.zrevrange(ns.trending(category), 0, n - 1)]

    def posteriors(self, items: Sequence[str], at_ms: int, segment: str | None = None,
                   namespace: str | None = None) -> list[Posterior]:
        """Each item's Beta posterior at event time ``at_ms`` (per segment when given)."""
        ns = self._ns(namespace)
        e, c = ("e", "c") if not segment else (f"e|{segment}", f"c|{segment}")
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.hmget(ns.item_stats(item), e, c)
        sums = np.array([[float(x) if x is not None else NEG_INF for x in row] for row in pipe.execute()],
                        dtype=np.float64).reshape(-1, 2)
        alpha, beta = beta_posterior(sums[:, 0], sums[:, 1], at_ms, self.bandit)
        return [Posterior(float(a), float(b)) for a, b in zip(alpha, beta)]

    def sample_scores(self, items: Sequence[str], at_ms: int, rng: np.random.Generator,
                      segment: str | None = None, namespace: str | None = None) -> np.ndarray:
        """One Thompson draw per item from its posterior."""
        post = self.posteriors(items, at_ms, segment, namespace)
        return rng.beta([p.alpha for p in post], [p.beta for p in post])

    def learner_snapshot(self, namespace: str, items: Iterable[str]) -> dict[str, Any]:
        """Item-level learner state in the reference models' snapshot form (for tests)."""
        ns = self.keys.ns(namespace)
        items = sorted(set(items))
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.zrange(ns.item_neighbours(item), 0, -1, withscores=True)
            pipe.hgetall(ns.item_stats(item))
        replies = pipe.execute()
        pairs, counts, arms = {}, {}, {}
        for k, item in enumerate(items):
            nbr, stats = replies[2 * k], {a.decode(): b.decode() for a, b in replies[2 * k + 1].items()}
            if nbr:
                pairs[item] = {m.decode(): float(v) for m, v in nbr}
            if "n" in stats:
                counts[item] = float(stats["n"])
            for fieldname, value in stats.items():
                if fieldname[0] in "ec" and (len(fieldname) == 1 or fieldname[1] == "|"):
                    kind, _, segment = fieldname.partition("|")
                    arm = item if not segment else f"{item}|{segment}"
                    sums = arms.setdefault(arm, [NEG_INF, NEG_INF])
                    sums[1 if kind == "c" else 0] = float(value)
        scores = {m.decode(): float(v) for m, v in self.client.zrange(ns.trending(), 0, -1, withscores=True)}
        return {"item_cf": {"pairs": pairs, "counts": counts}, "bandit": arms, "trending": scores}

    def item(self, item: str, namespace: str | None = None) -> dict[str, Any] | None:
        ns = self._ns(namespace)
        raw = self.client.hgetall(ns.item_meta(item))
        if not raw:
            return None
        m = {k.decode(): v.decode() for k, v in raw.items()}
        return {
            "item": item, "title": m["title"], "tags": json.loads(m["tags"]),
            "category": m["category"] or None, "created_at": int(m["created_at"]),
        }

    def users(self, namespace: str) -> list[str]:
        ns = self.keys.ns(namespace)
        return sorted(
            ns.user_from_seq_key(k.decode())
            for k in self.client.scan_iter(match=ns.user_seq_pattern(), count=1000)
        )

    def snapshot(self, namespace: str, users: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Users' session states in a namespace (default: every user), for comparisons.
        Users without clicks are left out."""
        wanted = self.users(namespace) if users is None else list(users)
        out = {}
        for lo in range(0, len(wanted), 500):
            for view in self.session_views(wanted[lo : lo + 500], namespace):
                if view.entries:
                    out[view.user] = {"entries": view.entries, "meta": view.meta, "clicks": view.clicks}
        return out



