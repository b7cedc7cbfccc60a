"""Redis state of the serving stage: change notifications, served lists, item reads, models.

* Change streams: after a batch, a stream worker appends one entry per user whose state
  changed (``u`` user, ``o`` Kafka offset of the user's newest applied click, ``t`` its event
  time, ``p`` its publish time) and per new catalog item (``i``). Serving workers read them in
  one consumer group, so a list is recomputed once per change, by one worker, at least once.
* Served lists: one hash per user, written by a script that refuses a list computed from
  older state than the stored one (``version`` = the offset above), so two serving workers
  racing on one user cannot go back in time.
* Models: bytes under a versioned key plus a small "live version" hash; loading is by version,
  so a reader never sees half a model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import redis

from streamrec.infra.keys import Keys, Namespace
from streamrec.infra.state import StateStore

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
    """One change notification: a user's state (``user``) or a new catalog item (``item``)."""

    stream: str
    entry_id: str
    user: str | None
    item: str | None
    offset: int
    event_ms: int
    publish_ms: int


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
        self._hmget_many = self.client.register_script(_HMGET_MANY)
        self._zrevrange_many = self.client.register_script(_ZREVRANGE_MANY)

    # -- change streams ---------------------------------------------------------------------

    def streams(self) -> list[str]:
        return [self.keys.changes(s) for s in range(self.shards)]

    def notify(self, users: Mapping[str, tuple[int, int, int, int]], items: Sequence[tuple[int, str]],
               maxlen: int) -> None:
        """``users``: user -> (shard, offset, event ms, publish ms); ``items``: (shard, item)."""
        if not users and not items:
            return
        pipe = self.client.pipeline(transaction=False)
        for user, (shard, offset, event_ms, publish_ms) in users.items():
            pipe.xadd(self.keys.changes(shard % self.shards),
                      {"u": user, "o": offset, "t": event_ms, "p": publish_ms},
                      maxlen=maxlen, approximate=True)
        for shard, item in items:
            pipe.xadd(self.keys.changes(shard % self.shards), {"i": item}, maxlen=maxlen, approximate=True)
        pipe.execute()

    def ensure_group(self, group: str, start: str = "$") -> None:
        """Create the consumer group on every stream (new groups start at the end)."""
        for key in self.streams():
            try:
                self.client.xgroup_create(key, group, id=start, mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def read_changes(self, group: str, consumer: str, count: int, block_ms: int) -> list[Change]:
        replies = self.client.xreadgroup(group, consumer, {k: ">" for k in self.streams()},
                                         count=count, block=block_ms)
        return self._changes(replies or [])

    def claim_stale(self, group: str, consumer: str, idle_ms: int, count: int = 500) -> list[Change]:
        """Entries another (dead) serving worker read but never acknowledged."""
        out: list[Change] = []
        for key in self.streams():
            reply = self.client.xautoclaim(key, group, consumer, idle_ms, "0-0", count=count)
            out += self._changes([[key.encode(), reply[1]]])
        return out

    @staticmethod
    def _changes(replies: Iterable[Any]) -> list[Change]:
        out = []
        for stream, entries in replies:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, f in entries:
                if not f:  # deleted by trimming while pending
                    out.append(Change(name, entry_id.decode(), None, None, -1, 0, 0))
                    continue
                user = f.get(b"u")
                out.append(Change(
                    name, entry_id.decode(),
                    user.decode() if user is not None else None,
                    f[b"i"].decode() if b"i" in f else None,
                    int(f.get(b"o", -1)), int(f.get(b"t", 0)), int(f.get(b"p", 0)),
                ))
        return out

    def ack(self, group: str, changes: Sequence[Change]) -> None:
        by_stream: dict[str, list[str]] = {}
        for c in changes:
            by_stream.setdefault(c.stream, []).append(c.entry_id)
        if not by_stream:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, group, *ids)
        pipe.execute()

    def backlog(self, group: str) -> int:
        """Entries not yet delivered to the group plus delivered but unacknowledged ones."""
        total = 0
        for key in self.streams():
            try:
                for g in self.client.xinfo_groups(key):
                    if g["name"].decode() == group:
                        total += int(g.get("lag") or 0) + int(g.get("pending") or 0)
            except redis.exceptions.ResponseError:
                continue
        return total

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
            pipe.evalsha(self._write.sha, 1, key, version, ttl_ms if user is not None else 0, *flat)
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
        if not items:
            return []
        if self.state.per_user_calls:
            pipe = self.client.pipeline(transaction=False)
            for item in items:
                pipe.zrevrange(ns.item_neighbours(item), 0, per_item - 1, withscores=True)
            return [[(m.decode(), float(s)) for m, s in row] for row in pipe.execute()]
        replies = self._zrevrange_many(keys=[ns.item_neighbours(i) for i in items], args=[per_item])
        return [[(flat[k].decode(), float(flat[k + 1])) for k in range(0, len(flat), 2)] for flat in replies]

    def trending_scores(self, n: int, ns: Namespace) -> list[tuple[str, float]]:
        return [(m.decode(), float(s)) for m, s in self.client.zrevrange(ns.trending(), 0, n - 1, withscores=True)]

    def newest_items(self, n: int, ns: Namespace) -> list[tuple[str, int]]:
        """The n catalog items with the latest created_at."""
        return [(m.decode(), int(s)) for m, s in self.client.zrevrange(ns.catalog(), 0, n - 1, withscores=True)]

    def catalog(self, ns: Namespace) -> list[str]:
        return [m.decode() for m in self.client.zrange(ns.catalog(), 0, -1)]

    # -- models -----------------------------------------------------------------------------

    def publish_model(self, kind: str, version: str, blob: bytes, info: Mapping[str, Any], keep: int) -> None:
        """Store a model's bytes, then make it the live one; older versions beyond ``keep`` go."""
        self.client.set(self.keys.model_blob(kind, version), blob)
        key = self.keys.model(kind)
        history = json.loads(self.client.hget(key, "history") or b"[]")
        history = [v for v in history if v != version] + [version]
        old, history = history[:-keep], history[-keep:]
        self.client.hset(key, mapping={"version": version, "created_at": int(time.time() * 1000),
                                       "info": json.dumps(info), "history": json.dumps(history)})
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

    def load_model(self, kind: str, version: str) -> bytes | None:
        return self.client.get(self.keys.model_blob(kind, version))


__all__ = ["RecStore", "Change", "REC_FIELDS"]
