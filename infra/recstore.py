"""Redis state of the serving stage: the dirty-user feed, served lists, item reads, models.

* Dirty users (coalescing by design): after a batch, a stream worker marks every user whose
  state changed as dirty, keeping only the newest change per user (Kafka offset of the newest
  applied click, its event time, the publish times of the newest and the oldest click not
  yet served). However many clicks arrive, a user is refreshed once with the state as it is
  then: the backlog is bounded by the number of distinct users with new clicks, not by the
  number of clicks. Serving workers claim dirty users with a lease (no user is refreshed by
  two at once; a dead worker's leases expire and the users are claimed again), acknowledge
  them after writing (a user who clicked again meanwhile stays dirty), and put a failed one
  back with a backoff. One set of keys per shard (= source partition), all in one hash slot.
* New catalog items: a stream per shard, read by the serving workers in one consumer group.
* Served lists: one hash per user, written by a script that refuses a list computed from
  older state than the stored one (``version`` = the offset above), so two serving workers
  racing on one user cannot go back in time.
* Models: bytes under a versioned key plus a small "live version" hash; loading is by version,
  so a reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import redis
from redis.commands.core import Script

from streamrec.infra.keys import Keys, Namespace
from streamrec.infra.redisconn import evalsha, is_cluster
from streamrec.infra.state import StateStore
from streamrec.models.errors import StreamrecError

log = logging.getLogger(__name__)
_UNCHECKED: set[tuple[str, str]] = set()  # models without a checksum already warned about


class ModelIntegrityError(StreamrecError):
    """A model's bytes in Redis differ from the checksum recorded when it was published
    (corrupted or tampered with): they are not deserialised."""

_WRITE_RECS = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[1], unpack(ARGV, 3))
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# Many items' fields in one call: far less client work than a pipeline of HMGETs. The keys span
# hash slots, so on Redis Cluster (``StateStore.per_user_calls``) the pipeline is used instead.
_HMGET_MANY = """
local out = {}
local n = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, unpack(ARGV, 2, n + 1))
  for j = 1, n do out[#out + 1] = v[j] end
end
return out
"""

_ZREVRANGE_MANY = """
local out = {}
for i, key in ipairs(KEYS) do
  local r = redis.call('ZREVRANGE', key, 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
  out[#out + 1] = r
end
return out
"""

REC_FIELDS = ("items", "scores", "sources", "request_id", "model", "computed_at", "as_of", "version")


@dataclass(frozen=True)
class Change:
    """A new catalog item, announced on a shard's item stream."""

    stream: str
    entry_id: str
    item: str | None


class Pending(NamedTuple):
    """A dirty user claimed for a refresh."""

    shard: int
    user: str
    value: str  # the dirty entry as claimed: "<offset>:<event ms>:<newest publish ms>:<oldest publish ms>"

    @property
    def offset(self) -> int:
        return int(self.value.split(":", 1)[0])

    @property
    def publish_ms(self) -> int:
        """When the oldest click behind this refresh was published (freshness is counted from it)."""
        return int(self.value.rsplit(":", 1)[1])


# Mark users dirty. KEYS: dirty, queue, lease. ARGV: now_ms, then per user: user, offset,
# event_ms, publish_ms. The newest change wins; the oldest unserved publish time is kept.
# A user already waiting is coalesced (a refresh saved); one being refreshed is only
# updated: its acknowledgement sees the newer change and queues it again.
_MARK = """
local now = tonumber(ARGV[1])
local coalesced = 0
for i = 2, #ARGV, 4 do
  local user, off, t, p = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local cur = redis.call('HGET', KEYS[1], user)
  if cur then
    local c_off, c_t, c_p, c_first = string.match(cur, '^(-?%d+):(%d+):(%d+):(%d+)$')
    if off > tonumber(c_off) then
      redis.call('HSET', KEYS[1], user, ARGV[i + 1] .. ':' .. t .. ':' .. p .. ':' .. c_first)
    end
    if redis.call('ZSCORE', KEYS[2], user) then coalesced = coalesced + 1 end
  else
    redis.call('HSET', KEYS[1], user, ARGV[i + 1] .. ':' .. t .. ':' .. p .. ':' .. p)
  end
  if not redis.call('ZSCORE', KEYS[3], user) then redis.call('ZADD', KEYS[2], 'NX', now, user) end
end
return coalesced
"""

# Claim up to ARGV[3] users. KEYS: dirty, queue, lease. ARGV: now_ms, lease_ms, count.
# Expired leases (their worker died) go back in the queue first. Returns {reclaimed, user,
# value, user, value, ...}.
_CLAIM = """
local now, lease, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, user in ipairs(expired) do
  redis.call('ZREM', KEYS[3], user)
  if redis.call('HEXISTS', KEYS[1], user) == 1 then redis.call('ZADD', KEYS[2], 'NX', now, user) end
end
local out = {#expired}
local taken = 0
for _, user in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, count)) do
  redis.call('ZREM', KEYS[2], user)
  local value = redis.call('HGET', KEYS[1], user)
  if value and not redis.call('ZSCORE', KEYS[3], user) then
    redis.call('ZADD', KEYS[3], now + lease, user)
    out[#out + 1] = user
    out[#out + 1] = value
  end
end
return out
"""

# Done refreshing. KEYS: dirty, queue, lease, failed. ARGV: now_ms, then user, claimed value.
# A user whose entry changed while being refreshed stays dirty and is queued again.
_ACK = """
local again = 0
for i = 2, #ARGV, 2 do
  local user = ARGV[i]
  redis.call('ZREM', KEYS[3], user)
  redis.call('HDEL', KEYS[4], user)
  local cur = redis.call('HGET', KEYS[1], user)
  if cur == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], user)
  elseif cur then
    redis.call('ZADD', KEYS[2], 'NX', ARGV[1], user)
    again = again + 1
  end
end
return again
"""

# A refresh failed. KEYS: dirty, queue, lease, failed. ARGV: now_ms, base_ms, cap_ms, users.
# The user stays dirty and is queued again after base * 2^(failures - 1), at most cap.
_FAIL = """
local now, base, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV do
  local user = ARGV[i]
  redis.call('ZREM', KEYS[3], user)
  local n = redis.call('HINCRBY', KEYS[4], user, 1)
  if redis.call('HEXISTS', KEYS[1], user) == 1 then
    redis.call('ZADD', KEYS[2], now + math.min(base * 2 ^ (n - 1), cap), user)
  end
end
return #ARGV - 3
"""


def _f(raw: bytes | None) -> float:
    return float(raw) if raw is not None else float("-inf")


class RecStore:
    """Serving-side reads and writes, on top of a ``StateStore`` (same client and keys)."""

    def __init__(self, state: StateStore, shards: int) -> None:
        self.state = state
        self.client: redis.Redis = state.client
        self.keys: Keys = state.keys
        self.shards = shards
        self._write = self.client.register_script(_WRITE_RECS)
        self._mark = self.client.register_script(_MARK)
        self._claim = self.client.register_script(_CLAIM)
        self._ack = self.client.register_script(_ACK)
        self._fail = self.client.register_script(_FAIL)
        self._hmget_many = self.client.register_script(_HMGET_MANY)
        self._zrevrange_many = self.client.register_script(_ZREVRANGE_MANY)

    # -- the dirty-user feed and the item streams --------------------------------------------

    def _dirty_keys(self, shard: int) -> list[str]:
        k = self.keys
        return [k.dirty(shard), k.dirty_queue(shard), k.dirty_leases(shard), k.dirty_failures(shard)]

    def mark_dirty(self, users: Mapping[str, tuple[int, int, int, int]]) -> int:
        """``users``: user -> (shard, offset, event ms, publish ms) of their newest applied click.
        Returns how many were already waiting for a refresh (coalesced: refreshes saved)."""
        if not users:
            return 0
        by_shard: dict[int, list[Any]] = {}
        for user, (shard, offset, event_ms, publish_ms) in users.items():
            by_shard.setdefault(shard % self.shards, []).extend([user, offset, event_ms, publish_ms])
        now = int(time.time() * 1000)

        def build(pipe: Any) -> None:
            for shard, args in by_shard.items():
                evalsha(pipe, self._mark.sha, self._dirty_keys(shard)[:3], [now, *args])
            pipe.lpush(self.keys.wake(), 1)
            pipe.ltrim(self.keys.wake(), 0, 0)
        return sum(int(n) for n in self._run(build, (self._mark,))[:-2])

    def claim(self, per_shard: int, lease_ms: int) -> tuple[list[Pending], int]:
        """Up to ``per_shard`` dirty users of every shard, leased for ``lease_ms``; and how
        many expired leases were put back in the queues."""
        now = int(time.time() * 1000)

        def build(pipe: Any) -> None:
            for shard in range(self.shards):
                evalsha(pipe, self._claim.sha, self._dirty_keys(shard)[:3], [now, lease_ms, per_shard])
        out: list[Pending] = []
        reclaimed = 0
        for shard, reply in enumerate(self._run(build, (self._claim,))):
            reclaimed += int(reply[0])
            for k in range(1, len(reply), 2):
                out.append(Pending(shard, reply[k].decode(), reply[k + 1].decode()))
        return out, reclaimed

    def done(self, pending: Sequence[Pending]) -> int:
        """Acknowledge refreshed users; returns how many changed meanwhile (queued again)."""
        return self._per_shard(self._ack, pending, lambda p: [p.user, p.value], [int(time.time() * 1000)])

    def failed(self, pending: Sequence[Pending], base_ms: int, cap_ms: int) -> None:
        """Put users whose refresh failed back in the queue, after a backoff."""
        self._per_shard(self._fail, pending, lambda p: [p.user], [int(time.time() * 1000), base_ms, cap_ms])

    def _per_shard(self, script: Script, pending: Sequence[Pending], row: Any, head: list[Any]) -> int:
        by_shard: dict[int, list[Any]] = {}
        for p in pending:
            by_shard.setdefault(p.shard, []).extend(row(p))
        if not by_shard:
            return 0

        def build(pipe: Any) -> None:
            for shard, args in by_shard.items():
                evalsha(pipe, script.sha, self._dirty_keys(shard), [*head, *args])
        return sum(int(n) for n in self._run(build, (script,)))

    def _run(self, build: Any, scripts: Sequence[Script]) -> list[Any]:
        """A pipeline of script calls (``build`` queues them), sent again once with the
        scripts loaded if Redis did not know them (a restart empties its script cache)."""
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                for script in scripts:
                    self.client.script_load(script.script)
        raise AssertionError("unreachable")

    def wait_for_work(self, timeout_s: float) -> None:
        """Block until some user is marked dirty or ``timeout_s`` passed."""
        self.client.blpop([self.keys.wake()], timeout=timeout_s)

    def backlog(self) -> int:
        """Users waiting for a refresh (queued, backing off or being refreshed)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.hlen(self.keys.dirty(shard))
        return sum(int(n) for n in pipe.execute())

    def streams(self) -> list[str]:
        return [self.keys.changes(s) for s in range(self.shards)]

    def announce_items(self, items: Sequence[tuple[int, str]], maxlen: int) -> None:
        """New catalog items, ``(shard, item)``, for serving (cold start)."""
        if not items:
            return
        pipe = self.client.pipeline(transaction=False)
        for shard, item in items:
            pipe.xadd(self.keys.changes(shard % self.shards), {"i": item}, maxlen=maxlen, approximate=True)
        pipe.execute()

    def ensure_group(self, group: str, start: str = "$") -> None:
        """Create the consumer group on every item stream (new groups start at the end)."""
        for key in self.streams():
            try:
                self.client.xgroup_create(key, group, id=start, mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def read_items(self, group: str, consumer: str, count: int) -> list[Change]:
        if is_cluster(self.client):  # the streams lie in different hash slots: one read each
            pipe = self.client.pipeline(transaction=False)
            for key in self.streams():
                pipe.xreadgroup(group, consumer, {key: ">"}, count=count)
            replies = [entry for reply in pipe.execute() for entry in (reply or [])]
        else:
            replies = self.client.xreadgroup(group, consumer, {k: ">" for k in self.streams()}, count=count)
        out = []
        for stream, entries in replies or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, f in entries:
                item = f.get(b"i") if f else None
                out.append(Change(name, entry_id.decode(), item.decode() if item is not None else None))
        return out

    def ack_items(self, group: str, changes: Sequence[Change]) -> None:
        by_stream: dict[str, list[str]] = {}
        for c in changes:
            by_stream.setdefault(c.stream, []).append(c.entry_id)
        if not by_stream:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, group, *ids)
        pipe.execute()

    # -- served lists -----------------------------------------------------------------------

    def write_recs(self, lists: Sequence[tuple[str | None, int, Mapping[str, str]]], ttl_ms: int) -> list[bool]:
        """Write (user or None for the default list, version, fields); False where a newer
        list was already there."""
        pipe = self.client.pipeline(transaction=False)
        for user, version, fields in lists:
            key = self.keys.recs(user) if user is not None else self.keys.recs_default()
            flat: list[Any] = []
            for name, value in fields.items():
                flat += [name, value]
            evalsha(pipe, self._write.sha, [key], [version, ttl_ms if user is not None else 0, *flat])
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:
            self.client.script_load(_WRITE_RECS)
            return self.write_recs(lists, ttl_ms)
        return [bool(r) for r in replies]

    def read_recs(self, user: str | None, fallback: bool = True) -> dict[str, Any] | None:
        """A user's list (or the default list for ``None``), decoded; with ``fallback`` an
        unknown user gets the default list, marked ``"default": true``."""
        key = self.keys.recs(user) if user is not None else self.keys.recs_default()
        raw = self.client.hgetall(key)
        is_default = user is None
        if not raw and fallback and user is not None:
            raw, is_default = self.client.hgetall(self.keys.recs_default()), True
        if not raw:
            return None
        m = {k.decode(): v.decode() for k, v in raw.items()}
        return {
            "user": user, "default": is_default,
            "items": json.loads(m["items"]), "scores": json.loads(m["scores"]),
            "sources": json.loads(m["sources"]), "request_id": m.get("request_id"),
            "model": m.get("model"), "computed_at": int(m.get("computed_at", 0)),
            "as_of": int(m.get("as_of", 0)), "version": int(m.get("version", -1)),
        }

    # -- item reads -------------------------------------------------------------------------

    def _fields(self, keys: Sequence[str], fields: Sequence[str]) -> list[list[bytes | None]]:
        n = len(fields)
        if not keys:
            return []
        if self.state.per_user_calls:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, *fields)
            return pipe.execute()
        flat = self._hmget_many(keys=list(keys), args=[n, *fields])
        return [flat[k * n : (k + 1) * n] for k in range(len(keys))]

    def item_stats(self, items: Sequence[str], ns: Namespace) -> list[tuple[float, float, float]]:
        """(n, e, c) log2 sums per item (-inf where absent)."""
        rows = self._fields([ns.item_stats(i) for i in items], ("n", "e", "c"))
        return [(_f(n), _f(e), _f(c)) for n, e, c in rows]

    def item_meta(self, items: Sequence[str], ns: Namespace) -> list[tuple[int | None, str, tuple[str, ...], str | None]]:
        """(created_at, title, tags, category) per item (None/empty where not in the catalog)."""
        rows = self._fields([ns.item_meta(i) for i in items], ("created_at", "title", "tags", "category"))
        return [(int(c) if c is not None else None, t.decode() if t else "",
                 tuple(json.loads(g)) if g else (), cat.decode() if cat else None) for c, t, g, cat in rows]

    def neighbours(self, items: Sequence[str], per_item: int, ns: Namespace) -> list[list[tuple[str, float]]]:
        """Each item's strongest co-occurrences (log2 decayed), one call."""
        return [[(m.decode(), v) for m, v in zip(names, sums.tolist())]
                for names, sums in self.neighbours_raw(items, per_item, ns)]

    def neighbours_raw(self, items: Sequence[str], per_item: int, ns: Namespace) -> list[tuple[list[bytes], np.ndarray]]:
        """``neighbours`` as Redis returns them: per item, the neighbour ids (UTF-8 bytes) and
        their log2 decayed sums as one float64 array (no per-entry Python objects)."""
        if not items:
            return []
        if self.state.per_user_calls:
            pipe = self.client.pipeline(transaction=False)
            for item in items:
                pipe.zrevrange(ns.item_neighbours(item), 0, per_item - 1, withscores=True)
            return [([m for m, _ in row], np.array([v for _, v in row], dtype=np.float64)) for row in pipe.execute()]
        replies = self._zrevrange_many(keys=[ns.item_neighbours(i) for i in items], args=[per_item])
        return [(flat[0::2], np.array(flat[1::2], dtype="S").astype(np.float64) if flat else np.zeros(0))
                for flat in replies]

    def trending_scores(self, n: int, ns: Namespace) -> list[tuple[str, float]]:
        return [(m.decode(), float(s)) for m, s in self.client.zrevrange(ns.trending(), 0, n - 1, withscores=True)]

    def newest_items(self, n: int, ns: Namespace) -> list[tuple[str, int]]:
        """The n catalog items with the latest created_at."""
        return [(m.decode(), int(s)) for m, s in self.client.zrevrange(ns.catalog(), 0, n - 1, withscores=True)]

    def catalog(self, ns: Namespace) -> list[str]:
        return [m.decode() for m in self.client.zrange(ns.catalog(), 0, -1)]

    # -- models -----------------------------------------------------------------------------

    def publish_model(self, kind: str, version: str, blob: bytes, info: Mapping[str, Any], keep: int) -> None:
        """Store a model's bytes, then make it the live one; older versions beyond ``keep`` go.

        The live hash records the bytes' SHA-256 (``sha256``) and that of every version kept
        (``checksums``: version -> hex digest, beside ``history``); ``load_model`` checks it.
        The blob and the hash lie in different hash slots: separate commands, blob first."""
        digest = hashlib.sha256(blob).hexdigest()
        self.client.set(self.keys.model_blob(kind, version), blob)
        key = self.keys.model(kind)
        before = self.client.hmget(key, ["history", "checksums"])
        history = json.loads(before[0] or b"[]")
        checksums = json.loads(before[1] or b"{}")
        history = [v for v in history if v != version] + [version]
        old, history = history[:-keep], history[-keep:]
        checksums = {v: checksums[v] for v in history if v in checksums} | {version: digest}
        self.client.hset(key, mapping={"version": version, "created_at": int(time.time() * 1000),
                                       "info": json.dumps(info), "history": json.dumps(history),
                                       "sha256": digest, "checksums": json.dumps(checksums)})
        for v in old:
            self.client.delete(self.keys.model_blob(kind, v))

    def model_version(self, kind: str) -> str | None:
        raw = self.client.hget(self.keys.model(kind), "version")
        return raw.decode() if raw else None

    def model_info(self, kind: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self.keys.model(kind))
        if not raw:
            return None
        m = {k.decode(): v.decode() for k, v in raw.items()}
        return {"version": m["version"], "created_at": int(m["created_at"]), "info": json.loads(m["info"])}

    def model_checksum(self, kind: str, version: str) -> str | None:
        """The SHA-256 (hex) recorded for a version when it was published; None for a model
        published before checksums were recorded (or a version no longer kept)."""
        live, sha, checksums = self.client.hmget(self.keys.model(kind), ["version", "sha256", "checksums"])
        known = json.loads(checksums) if checksums else {}
        if version in known:
            return str(known[version])
        if live is not None and live.decode() == version and sha:
            return sha.decode()
        return None

    def load_model(self, kind: str, version: str) -> bytes | None:
        """A model's bytes (None when gone), checked against the SHA-256 recorded when it was
        published: ``ModelIntegrityError`` when they differ (the bytes are never handed on).
        A model published without a checksum loads, with one warning per version."""
        expected = self.model_checksum(kind, version)
        blob = self.client.get(self.keys.model_blob(kind, version))
        if blob is None:
            return None
        if expected is None:
            if (kind, version) not in _UNCHECKED:
                _UNCHECKED.add((kind, version))
                log.warning("model %s %s has no recorded checksum (published before checksums were "
                            "recorded): loading it unchecked", kind, version)
            return blob
        actual = hashlib.sha256(blob).hexdigest()
        if actual != expected:
            raise ModelIntegrityError(
                f"model {kind} {version}: its bytes in Redis ({len(blob)} bytes, sha256 {actual[:12]}...) do not "
                f"match the checksum recorded when it was published ({expected[:12]}...): not loaded")
        return blob


__all__ = ["RecStore", "Change", "Pending", "REC_FIELDS", "ModelIntegrityError"]
