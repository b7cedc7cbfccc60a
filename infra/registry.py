"""The namespace registry and the replay handoff protocol.

State lives in versioned namespaces (``v1``, ``v2``, ...). The registry (keys under
``<prefix>:{reg}``, one hash slot) says which one readers use (``live``), which one a replay
is building (``rebuild``), which ones exist (``namespaces``), and carries the handoff of a
replay's switch: the replay asks every stream worker to pause (``handoff``), each confirms
(``paused:<id>``), and one transaction makes the new namespace live and releases them. Worker
heartbeats live here too, since the handoff waits for the workers they name.

Reads and writes of the state inside a namespace are ``infra.state``'s.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, NamedTuple, Sequence

import redis

from streamrec.infra.keys import DEFAULT_NAMESPACE, Keys, Namespace
from streamrec.infra.redisconn import is_cluster
from streamrec.models.errors import InvalidArgument, ReplayError, StateLost


def now_ms() -> int:
    return int(time.time() * 1000)


def unlink_matching(client: redis.Redis, pattern: str) -> int:
    """Delete every key matching a SCAN pattern, a thousand at a time; returns how many.

    On Redis Cluster the scan covers every primary and the keys (of many hash slots) go one
    UNLINK each, in a pipeline (one UNLINK may only name keys of one slot)."""
    cluster = is_cluster(client)

    def unlink(batch: list[bytes]) -> int:
        if not cluster:
            return int(client.unlink(*batch))
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.unlink(key)
        return sum(int(n) for n in pipe.execute())

    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += unlink(batch)
            batch.clear()
    if batch:
        deleted += unlink(batch)
    return deleted


class RegistryView(NamedTuple):
    live: Namespace | None  # None: no registry (nothing applied yet, or the state is lost)
    handoff: str | None  # a replay's pending switch
    epoch: str | None
    lost: bool  # a worker found the state gone and no restore has finished yet

    @property
    def healthy(self) -> bool:
        return self.live is not None and self.epoch is not None and not self.lost


class Registry:
    """The registry of one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    # -- which namespace, and whether the state is there ------------------------------------

    def ensure(self) -> str:
        """Create the registry (live namespace ``v1``, a fresh epoch) unless it exists; returns
        the epoch. Only a stream worker starting on a deployment with nothing applied yet
        calls this: everything else reads and never creates."""
        token = uuid.uuid4().hex
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.epoch(), token, nx=True)
        pipe.set(self.keys.live(), DEFAULT_NAMESPACE, nx=True)
        pipe.zadd(self.keys.namespaces(), {DEFAULT_NAMESPACE: now_ms()}, nx=True)
        created, _, _ = pipe.execute()
        if created:
            self.client.hset(self.keys.ns(DEFAULT_NAMESPACE).info(), mapping={
                "status": json.dumps("live"), "epoch": json.dumps(token)})
        epoch = self.epoch()
        assert epoch is not None
        return epoch

    def epoch(self) -> str | None:
        raw = self.client.get(self.keys.epoch())
        return raw.decode() if raw is not None else None

    def live_name(self) -> str | None:
        """The namespace readers use; None when there is no registry (nothing applied yet, or
        the state is lost). Never writes."""
        name = self.client.get(self.keys.live())
        return name.decode() if name is not None else None

    def live(self) -> Namespace:
        """The live namespace; ``StateLost`` when there is none to read."""
        name = self.live_name()
        if name is None:
            raise StateLost(self.missing_reason())
        return self.keys.ns(name)

    def missing_reason(self) -> str:
        """Why there is no live namespace, in one line."""
        lost = self.lost_marker()
        if lost is not None:
            return (f"state lost (found gone by {lost.get('worker', '?')} at {lost.get('at_ms', '?')} ms: "
                    f"{lost.get('reason', '?')}); rebuilding from the topics "
                    "(`streamrec replay --restore` if no worker restores it)")
        return ("no state in Redis under this prefix: nothing has been applied yet, or Redis lost it "
                "(start a stream worker; it detects a loss and restores it)")

    def condition(self) -> str:
        """"ok", "empty" (no registry: nothing applied yet, or lost unnoticed), "lost" (a worker
        found it gone) or "restoring". Never writes."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.live())
        pipe.exists(self.keys.lost())
        pipe.exists(self.keys.restoring())
        live, lost, restoring = pipe.execute()
        if lost:
            return "restoring" if restoring else "lost"
        return "ok" if live is not None else "empty"

    def lost_marker(self) -> dict[str, Any] | None:
        raw = self.client.get(self.keys.lost())
        return json.loads(raw) if raw is not None else None

    def mark_lost(self, worker_id: str, reason: str) -> bool:
        """Record that the state is gone (the first worker to see it wins); True if this call
        recorded it."""
        return bool(self.client.set(self.keys.lost(), json.dumps(
            {"worker": worker_id, "at_ms": now_ms(), "reason": reason}), nx=True))

    def namespaces(self) -> list[tuple[str, int]]:
        """Every registered namespace with its creation time (ms), oldest first."""
        rows = self.client.zrange(self.keys.namespaces(), 0, -1, withscores=True)
        return [(n.decode(), int(s)) for n, s in rows]

    def info(self, name: str) -> dict[str, Any]:
        raw = self.client.hgetall(self.keys.ns(name).info())
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def set_info(self, name: str, **values: Any) -> None:
        self.client.hset(self.keys.ns(name).info(), mapping={k: json.dumps(v) for k, v in values.items()})

    def view(self) -> RegistryView:
        """The live namespace, the pending handoff, the epoch and the loss marker, in one
        round trip (what a worker checks before every batch)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.live())
        pipe.get(self.keys.handoff())
        pipe.get(self.keys.epoch())
        pipe.exists(self.keys.lost())
        live, token, epoch, lost = pipe.execute()
        return RegistryView(self.keys.ns(live.decode()) if live is not None else None,
                            token.decode() if token is not None else None,
                            epoch.decode() if epoch is not None else None, bool(lost))

    def rebuild_name(self) -> str | None:
        name = self.client.get(self.keys.rebuild())
        return name.decode() if name is not None else None

    # -- the handoff -------------------------------------------------------------------------

    def handoff_token(self) -> str | None:
        token = self.client.get(self.keys.handoff())
        return token.decode() if token is not None else None

    def begin_handoff(self, token: str, ttl_s: float = 120.0) -> None:
        """Ask every worker to pause before its next batch (expires if the replay dies)."""
        self.client.set(self.keys.handoff(), token, px=int(ttl_s * 1000))

    def end_handoff(self, token: str) -> None:
        if self.handoff_token() == token:
            self.client.delete(self.keys.handoff())

    def confirm_paused(self, worker_id: str, token: str, ttl_s: float = 30.0) -> None:
        self.client.set(self.keys.paused(worker_id), token, px=int(ttl_s * 1000))

    def paused_for(self, worker_ids: Sequence[str], token: str) -> set[str]:
        """The workers among ``worker_ids`` that confirmed pausing for ``token``."""
        if not worker_ids:
            return set()
        values = self.client.mget([self.keys.paused(w) for w in worker_ids])
        return {w for w, v in zip(worker_ids, values) if v is not None and v.decode() == token}

    # -- rebuilds ----------------------------------------------------------------------------

    def begin_rebuild(self, name: str, info: dict[str, Any]) -> Namespace:
        """Reserve a fresh namespace for a replay (one rebuild at a time)."""
        ns = self.keys.ns(name)
        if self.client.zscore(self.keys.namespaces(), name) is not None or self.client.exists(ns.info()):
            raise ReplayError(f"namespace {name} already exists; choose another or drop it first")
        if not self.client.set(self.keys.rebuild(), name, nx=True):
            raise ReplayError(f"a rebuild into {self.rebuild_name()} is in progress")
        self.client.zadd(self.keys.namespaces(), {name: now_ms()})
        self.client.hset(ns.info(), mapping={k: json.dumps(v) for k, v in {**info, "status": "building"}.items()})
        return ns

    def begin_restore(self, name: str, info: dict[str, Any], ttl_s: float = 120.0) -> Namespace:
        """Start rebuilding lost state into ``name``: refused while a namespace is live (the
        state is there: use a plain replay) or while another restore holds the lock. A new
        epoch is written at once; readers and workers keep reporting the loss until
        ``switch`` makes ``name`` live."""
        if self.live_name() is not None:
            raise ReplayError(f"the state is not lost: namespace {self.live_name()} is live "
                              "(`streamrec replay` rebuilds it)")
        if not self.client.set(self.keys.restoring(), name, nx=True, px=int(ttl_s * 1000)):
            raise ReplayError(f"a restore into {self.client.get(self.keys.restoring())!r} is in progress")
        epoch = uuid.uuid4().hex
        lost = self.lost_marker()
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.epoch(), epoch)
        pipe.set(self.keys.rebuild(), name)
        pipe.zadd(self.keys.namespaces(), {name: now_ms()})
        pipe.execute()
        ns = self.keys.ns(name)
        self.client.hset(ns.info(), mapping={k: json.dumps(v) for k, v in {
            **info, "status": "building", "epoch": epoch, "lost": lost}.items()})
        return ns

    def keep_restoring(self, name: str, ttl_s: float = 120.0) -> None:
        """Extend the restore's lock (it expires if the restoring process dies)."""
        self.client.set(self.keys.restoring(), name, px=int(ttl_s * 1000), xx=True)

    def abort_rebuild(self, name: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.rebuild())
        pipe.get(self.keys.restoring())
        current, restoring = pipe.execute()
        if current is not None and current.decode() == name:
            self.client.delete(self.keys.rebuild(), self.keys.handoff())
        if restoring is not None and restoring.decode() == name:
            self.client.delete(self.keys.restoring())
        self.client.hset(self.keys.ns(name).info(), "status", json.dumps("aborted"))

    def switch(self, name: str) -> str | None:
        """Atomically make ``name`` the live namespace, end its rebuild (or restore: the loss
        marker goes too) and let paused workers resume, into it. Returns the old one."""
        old = self.live_name()
        ns = self.keys.ns(name)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.live(), name)
        pipe.delete(self.keys.rebuild(), self.keys.handoff(), self.keys.restoring(), self.keys.lost())
        pipe.execute()
        self.client.hset(ns.info(), mapping={"status": json.dumps("live"), "live_since": str(now_ms())})
        return old

    def drop(self, name: str) -> int:
        """Delete every key of a registered namespace that is neither live nor being rebuilt.

        Anything else is refused before a key is touched: a name outside the namespace
        alphabet or one of the reserved key families (``Keys.ns``), a name that was never
        registered (``streamrec namespaces`` lists those that were), the live namespace and
        the one a replay is building."""
        ns = self.keys.ns(name)
        if self.client.zscore(self.keys.namespaces(), name) is None:
            known = ", ".join(n for n, _ in self.namespaces()) or "none"
            raise InvalidArgument(f"{name!r} is not a registered namespace (registered: {known})")
        if name in (self.live_name(), self.rebuild_name()):
            raise ReplayError(f"namespace {name} is in use and cannot be dropped")
        deleted = unlink_matching(self.client, ns.pattern())
        self.client.zrem(self.keys.namespaces(), name)
        return deleted

    # -- workers -----------------------------------------------------------------------------

    def write_worker_status(self, worker_id: str, status: dict[str, Any], ttl_s: float) -> None:
        self.client.set(self.keys.worker(worker_id), json.dumps(status), px=int(ttl_s * 1000))

    def workers(self) -> list[dict[str, Any]]:
        """The status of every worker (stream and serving) that reported recently."""
        keys = list(self.client.scan_iter(match=self.keys.worker_pattern(), count=1000))
        values = self.client.mget(keys) if keys else []
        return [json.loads(v) for v in values if v is not None]


__all__ = ["Registry", "unlink_matching", "now_ms"]
