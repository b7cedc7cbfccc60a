"""The only module that builds Redis keys.

Layout (``sr`` is ``redis.prefix``; ``<ns>`` a namespace such as ``v1``)::

    sr:{reg}:live                  STRING  name of the namespace readers use
    sr:{reg}:rebuild               STRING  namespace being rebuilt by a replay (one replay at a time)
    sr:{reg}:handoff               STRING  token of a replay's switch in progress: workers pause
    sr:{reg}:paused:<id>           STRING  the handoff token a worker has paused for (expires)
    sr:{reg}:epoch                 STRING  token of the state's lifetime (see Registry.ensure)
    sr:{reg}:lost                  STRING  JSON: when and by whom the state was found gone
    sr:{reg}:restoring             STRING  the process restoring lost state (expires)
    sr:{reg}:namespaces            ZSET    namespace -> creation time (ms)
    sr:{reg}:worker:<id>           STRING  worker status as JSON (expires)
    sr:{reg}:latency               LIST    publish-to-applied samples, ms (benchmarks only)
    sr:{reg}:serve-latency         LIST    click-publish-to-list-written samples, ms (benchmarks only)
    sr:<ns>:info                   HASH    how and when the namespace was built
    sr:<ns>:progress               HASH    "<topic>:<partition>" -> next offset to apply
    sr:<ns>:u:{<user>}:seq         ZSET    member "<item>|<event id>", score event time (ms)
    sr:<ns>:u:{<user>}:meta        HASH    last_ts, session_start, session_len, clicks, impressions
    sr:<ns>:u:{<user>}:seen        ZSET    member event id, score Kafka offset (dedupe window)
    sr:<ns>:u:{<user>}:facts       ZSET    learner facts of the user's last events, by offset
    sr:<ns>:u:{<user>}:reqs        HASH    impression join: request -> shown items; c:<request> -> clicks
    sr:<ns>:u:{<user>}:reqidx      ZSET    request -> time (the last learners.max_requests kept)
    sr:<ns>:i:{<item>}:meta        HASH    title, tags (JSON), category, created_at, ts, id
    sr:<ns>:i:{<item>}:nbr         ZSET    neighbour item -> log2 decayed co-occurrence
    sr:<ns>:i:{<item>}:stats       HASH    n (log2 decayed clicks), e/c[|segment] (bandit sums),
                                           wm:<topic:partition> (last applied offset)
    sr:<ns>:trend:{t}:all          ZSET    item -> log2 decayed clicks (trending order)
    sr:<ns>:trend:{t}:all:c:<cat>  ZSET    the same, items of one category
    sr:<ns>:trend:{t}:meta         HASH    cat:<item> -> category, wm:<topic:partition>
    sr:<ns>:catalog                ZSET    item -> created_at (ms)
    sr:rec:{<user>}                HASH    the user's recommendations (see README "Reading recommendations")
    sr:{reg}:rec:default           HASH    the list for users without recommendations of their own
    sr:chg:{c<shard>}              STREAM  new catalog items, for serving (cold start)
    sr:chg:{c<shard>}:dirty        HASH    user -> "<offset>:<event ms>:<publish ms>": lists to refresh
    sr:chg:{c<shard>}:queue        ZSET    dirty user -> when a serving worker may claim it (ms)
    sr:chg:{c<shard>}:lease        ZSET    claimed user -> when the claim expires (ms)
    sr:chg:{c<shard>}:failed       HASH    user -> failed refreshes in a row (backoff)
    sr:{reg}:wake                  LIST    nudged when users became dirty (idle serving waits)
    sr:{reg}:model:<kind>          HASH    the live model of a kind: version, created_at, info (JSON)
    sr:model:<kind>:<version>      STRING  a model's bytes (the last few versions are kept)

Keys of one user share the hash tag ``{<user>}`` so that one script can update them
atomically on Redis Cluster; the registry keys share ``{reg}`` so that a switch is one
transaction. Ids never contain braces (see ``models.events.ID_PATTERN``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streamrec.models.errors import ConfigError

NAMESPACE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
DEFAULT_NAMESPACE = "v1"
# The key families outside namespaces: a namespace by one of these names would have its
# SCAN pattern (``<prefix>:<name>:*``) match them, and dropping it would delete served lists,
# models or change streams.
RESERVED_NAMES = frozenset({"reg", "rec", "chg", "model"})


@dataclass(frozen=True, slots=True)
class Namespace:
    """Keys of one state namespace."""

    prefix: str
    name: str

    def _base(self) -> str:
        return f"{self.prefix}:{self.name}"

    def session_seq(self, user: str) -> str:
        return f"{self._base()}:u:{{{user}}}:seq"

    def session_meta(self, user: str) -> str:
        return f"{self._base()}:u:{{{user}}}:meta"

    def seen(self, user: str) -> str:
        return f"{self._base()}:u:{{{user}}}:seen"

    def facts(self, user: str) -> str:
        return f"{self._base()}:u:{{{user}}}:facts"

    def requests(self, user: str) -> str:
        return f"{self._base()}:u:{{{user}}}:reqs"

    def request_index(self, user: str) -> str:
        return f"{self._base()}:u:{{{user}}}:reqidx"

    def user_keys(self, user: str) -> tuple[str, str, str, str, str, str]:
        """The apply script's keys of one user, in its order."""
        return (self.session_seq(user), self.session_meta(user), self.seen(user),
                self.facts(user), self.requests(user), self.request_index(user))

    def item_neighbours(self, item: str) -> str:
        return f"{self._base()}:i:{{{item}}}:nbr"

    def item_stats(self, item: str) -> str:
        return f"{self._base()}:i:{{{item}}}:stats"

    def trending(self, category: str | None = None) -> str:
        """All items, or one category (same hash slot)."""
        base = f"{self._base()}:trend:{{t}}:all"
        return base if category is None else f"{base}:c:{category}"

    def trending_meta(self) -> str:
        return f"{self._base()}:trend:{{t}}:meta"

    def item_meta(self, item: str) -> str:
        return f"{self._base()}:i:{{{item}}}:meta"

    def catalog(self) -> str:
        return f"{self._base()}:catalog"

    def info(self) -> str:
        return f"{self._base()}:info"

    def progress(self) -> str:
        return f"{self._base()}:progress"

    def pattern(self) -> str:
        """SCAN pattern matching every key of this namespace."""
        return f"{self._base()}:*"

    def user_seq_pattern(self) -> str:
        return f"{self._base()}:u:*:seq"

    def user_from_seq_key(self, key: str) -> str:
        """Inverse of ``session_seq``."""
        start = key.index("{") + 1
        return key[start : key.index("}", start)]


@dataclass(frozen=True, slots=True)
class Keys:
    """Entry point: registry keys and namespaces under one prefix."""

    prefix: str = "sr"

    def live(self) -> str:
        return f"{self.prefix}:{{reg}}:live"

    def rebuild(self) -> str:
        return f"{self.prefix}:{{reg}}:rebuild"

    def namespaces(self) -> str:
        return f"{self.prefix}:{{reg}}:namespaces"

    def handoff(self) -> str:
        return f"{self.prefix}:{{reg}}:handoff"

    def epoch(self) -> str:
        """A token written when the registry is created: state written under one epoch is
        never continued under another (or none: Redis lost it)."""
        return f"{self.prefix}:{{reg}}:epoch"

    def lost(self) -> str:
        """Set by the first worker that finds the state gone; cleared by the restore."""
        return f"{self.prefix}:{{reg}}:lost"

    def restoring(self) -> str:
        """Held (with an expiry) by the process restoring lost state."""
        return f"{self.prefix}:{{reg}}:restoring"

    def paused(self, worker_id: str) -> str:
        return f"{self.prefix}:{{reg}}:paused:{worker_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:{{reg}}:worker:{worker_id}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}:{{reg}}:worker:*"

    def latency(self) -> str:
        return f"{self.prefix}:{{reg}}:latency"

    def recs(self, user: str) -> str:
        """A user's served list; outside namespaces so consumers read one fixed key."""
        return f"{self.prefix}:rec:{{{user}}}"

    def recs_default(self) -> str:
        return f"{self.prefix}:{{reg}}:rec:default"

    def changes(self, shard: int) -> str:
        """New catalog items for serving (cold start), one stream per shard (= source partition)."""
        return f"{self.prefix}:chg:{{c{shard}}}"

    def dirty(self, shard: int) -> str:
        """Users whose lists are out of date: user -> "<offset>:<event ms>:<newest publish
        ms>:<oldest publish ms>" of their unserved clicks (one entry per user however many
        clicks: coalescing). In the shard's hash slot, with the rest of its dirty feed."""
        return f"{self.changes(shard)}:dirty"

    def dirty_queue(self, shard: int) -> str:
        """The dirty users waiting for a refresh: user -> when it may be claimed (ms)."""
        return f"{self.changes(shard)}:queue"

    def dirty_leases(self, shard: int) -> str:
        """Users a serving worker is refreshing: user -> when the lease expires (ms)."""
        return f"{self.changes(shard)}:lease"

    def dirty_failures(self, shard: int) -> str:
        """Failed refreshes per user (backoff): user -> count."""
        return f"{self.changes(shard)}:failed"

    def wake(self) -> str:
        """Nudged after users were marked dirty: idle serving workers wait on it."""
        return f"{self.prefix}:{{reg}}:wake"

    def model(self, kind: str) -> str:
        return f"{self.prefix}:{{reg}}:model:{kind}"

    def model_blob(self, kind: str, version: str) -> str:
        return f"{self.prefix}:model:{kind}:{version}"

    def serve_latency(self) -> str:
        """Click-publish-to-list-written samples, ms (benchmarks only)."""
        return f"{self.prefix}:{{reg}}:serve-latency"

    def all_pattern(self) -> str:
        return f"{self.prefix}:*"

    def ns(self, name: str) -> Namespace:
        if not NAMESPACE_PATTERN.fullmatch(name):
            raise ConfigError(f"namespace {name!r} must match {NAMESPACE_PATTERN.pattern}")
        if name in RESERVED_NAMES:
            raise ConfigError(f"namespace {name!r} is reserved: keys {self.prefix}:{name}:... are not a "
                              f"namespace's (reserved: {', '.join(sorted(RESERVED_NAMES))})")
        return Namespace(self.prefix, name)
