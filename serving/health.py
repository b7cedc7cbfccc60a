"""`streamrec health`: are a role's workers alive and keeping up?

Read from Redis only (what the workers report in their heartbeats, ``Registry.workers``, and the
serving queue), so it answers in milliseconds and can run as a container healthcheck:

- ``worker``: at least one stream worker with a fresh heartbeat (``health.max_heartbeat_age_s``),
  none reporting the state lost, and together at most ``health.max_lag_records`` records behind
  the fetch high-water marks of the partitions they hold;
- ``serve``: at least one serving worker with a fresh heartbeat, not waiting for lost state,
  and no user waiting longer than ``health.max_dirty_age_s`` for a refresh;
- ``trainer``: a trainer with a fresh heartbeat, and the newest live model younger than
  ``health.max_model_age_s`` (a deployment that has no model yet is healthy: it waits for data).

``--here`` restricts the check to workers of this host (the ``host`` of their heartbeat: the
container's host name), which is what a container's healthcheck asks: is *this* replica healthy.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, Sequence

from streamrec.infra.metrics import MODEL_KINDS
from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore

ROLES = ("worker", "serve", "trainer")
_STATUS_ROLE = {"worker": "stream", "serve": "serve", "trainer": "trainer"}


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    line: str  # one line: why


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fresh(statuses: Sequence[dict[str, Any]], role: str, max_age_s: float, now: float,
           host: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(fresh, stale) heartbeats of a role (of this host's workers when ``host``)."""
    mine = [w for w in statuses if w.get("role") == _STATUS_ROLE[role]
            and (host is None or w.get("host", "") == host)]
    fresh = [w for w in mine if now - float(w.get("updated") or 0.0) <= max_age_s]
    return fresh, [w for w in mine if w not in fresh]


def check_role(role: str, statuses: Sequence[dict[str, Any]], *, settings: Settings, now: float,
               oldest_dirty_s: float | None = None, model_created_s: float | None = None,
               host: str | None = None) -> Verdict:
    """The verdict on one role from what its workers reported (a pure function: the tests feed
    it statuses, ``check`` reads them from Redis)."""
    h = settings.health
    fresh, stale = _fresh(statuses, role, h.max_heartbeat_age_s, now, host)
    where = f" on {host}" if host else ""
    name = {"worker": "stream worker", "serve": "serving worker", "trainer": "trainer"}[role]
    if not fresh:
        if stale:
            age = min(now - float(w.get("updated") or 0.0) for w in stale)
            return Verdict(False, f"unhealthy: no live {name}{where}: the last heartbeat is {age:.0f} s old "
                                  f"(max {h.max_heartbeat_age_s:g} s)")
        return Verdict(False, f"unhealthy: no {name}{where} has reported a heartbeat in Redis")
    lost = [w for w in fresh if w.get("lost")]
    if lost:
        return Verdict(False, f"unhealthy: {name} {lost[0].get('worker')} reports the state lost: {lost[0]['lost']}")
    count = _plural(len(fresh), name)
    if role == "worker":
        lag = sum(int(w.get("lag") or 0) for w in fresh)
        if lag > h.max_lag_records:
            return Verdict(False, f"unhealthy: {count}{where} {lag:,} records behind (max {h.max_lag_records:,})")
        return Verdict(True, f"healthy: {count}{where}, {lag:,} records behind")
    if role == "serve":
        if oldest_dirty_s is not None and oldest_dirty_s > h.max_dirty_age_s:
            return Verdict(False, f"unhealthy: {count}{where}, but a user has waited {oldest_dirty_s:.0f} s "
                                  f"for a refresh (max {h.max_dirty_age_s:g} s)")
        waited = f"{oldest_dirty_s:.1f} s" if oldest_dirty_s is not None else "no user"
        return Verdict(True, f"healthy: {count}{where}, longest wait for a refresh {waited}")
    if model_created_s is None:
        return Verdict(True, f"healthy: {count}{where}, no model published yet")
    age = now - model_created_s
    if age > h.max_model_age_s:
        return Verdict(False, f"unhealthy: {count}{where}, but the newest model is {age / 3600:.1f} h old "
                              f"(max {h.max_model_age_s / 3600:g} h)")
    return Verdict(True, f"healthy: {count}{where}, newest model {age:.0f} s old")


def oldest_dirty_s(recstore: RecStore, now: float) -> float | None:
    """How long the longest-waiting dirty user has been claimable (None: nobody waits)."""
    pipe = recstore.client.pipeline(transaction=False)
    for shard in range(recstore.shards):
        pipe.zrange(recstore.keys.dirty_queue(shard), 0, 0, withscores=True)
    since = [float(row[0][1]) / 1000.0 for row in pipe.execute() if row]
    due = [s for s in since if s <= now]  # later scores: backing off after a failure
    return now - min(due) if due else None


def check(settings: Settings, roles: Sequence[str], here: bool = False) -> Verdict:
    """The verdict on ``roles`` (all must be healthy), read from Redis."""
    store = StateStore.from_settings(settings)
    recstore = RecStore(store, settings.kafka.partitions)
    now = time.time()
    statuses = store.registry.workers()
    host = socket.gethostname() if here else None
    lines = []
    for role in roles:
        extra: dict[str, Any] = {}
        if role == "serve":
            extra["oldest_dirty_s"] = oldest_dirty_s(recstore, now)
        elif role == "trainer":
            created = [info["created_at"] / 1000.0 for info in (recstore.model_info(k) for k in MODEL_KINDS) if info]
            extra["model_created_s"] = max(created) if created else None
        verdict = check_role(role, statuses, settings=settings, now=now, host=host, **extra)
        if not verdict.healthy:
            return Verdict(False, f"{role} {verdict.line}")
        lines.append(f"{role} {verdict.line}")
    return Verdict(True, "; ".join(lines))


__all__ = ["ROLES", "Verdict", "check", "check_role", "oldest_dirty_s"]
