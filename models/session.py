"""Session sequences as pure functions: the reference that the Redis state must equal.

A user's state is a bounded sequence of clicks ordered by event time, a dedupe window of
event ids, and counters. ``UserState.apply`` is the per-event rule the worker's Redis script
implements; ``rebuild`` is the batch recomputation over a whole stream. Tests compare the
live Redis state with it.

Every part of the state is bounded: the sequence by ``max_length``, the dedupe window by
``dedupe_window``, the join state by ``max_requests`` and by time (a request is forgotten once
the user's newest event is ``join_lateness_ms`` past its attribution window), the learner
facts by the facts floor (see ``UserState.apply``) and ``facts_span``. Expiry after inactivity
(``ttl_ms``, ``facts_ttl_ms``) is wall-clock time, which only Redis has: the reference models
state that has not expired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, NamedTuple

SEPARATOR = "|"


class Status(IntEnum):
    """Outcome of applying one event (the script returns the same integers)."""

    DUPLICATE = -1  # same event id seen at an earlier offset: rejected
    REDELIVERED = 0  # same event id at the same offset: already applied, no-op
    APPLIED = 1
    SUPERSEDED = 2  # an earlier offset arrived after a later duplicate: replaced it


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_length: int = 200
    gap_ms: int = 1_800_000
    dedupe_window: int = 1024
    cf_window: int = 5  # items before a click that it co-occurs with (within gap_ms)
    attribution_ms: int = 1_800_000  # a click joins an impression at most this much later
    max_requests: int = 100  # impressions (and their clicks) remembered per user for the join
    facts_span: int = 100_000  # facts kept while within this many offsets of the newest, for redelivery
    join_lateness_ms: int = 3_600_000  # a request is kept until the user's newest event is this much past its window
    ttl_ms: int = 30 * 86_400_000  # Redis only: a user's keys expire this long after their last event (0 = never)
    facts_ttl_ms: int = 3_600_000  # Redis only: the facts key expires this long after the user's last event (at most ttl_ms; 0 = as ttl_ms)

    @property
    def join_horizon_ms(self) -> int:
        """How far behind the user's newest event time a request is still kept."""
        return self.attribution_ms + self.join_lateness_ms


US, RS = "\x1f", "\x1e"  # field and record separators of encoded facts
# The facts of a redelivered record below the facts floor: its learner updates were all
# applied (its partition's progress is past it), so there is nothing to send again. No
# learner reads a "D" record (``models.learners.parse_facts`` yields nothing for it).
FACTS_DONE = "D"


class Entry(NamedTuple):
    """One retained click."""

    item: str
    ts: int  # event time, ms
    event_id: str


def member(item: str, event_id: str) -> str:
    """Sorted-set member of a click: ``<item>|<event id>`` (ids cannot contain ``|``)."""
    return f"{item}{SEPARATOR}{event_id}"


def parse_member(value: str) -> tuple[str, str]:
    item, _, event_id = value.partition(SEPARATOR)
    return item, event_id


class SessionMeta(NamedTuple):
    last_ts: int | None
    session_start: int | None
    session_len: int


def derive_meta(entries: list[Entry], gap_ms: int) -> SessionMeta:
    """Current session = the longest run ending at the latest entry with no gap above gap_ms.

    ``entries`` must be sorted by (ts, member).
    """
    if not entries:
        return SessionMeta(None, None, 0)
    last = entries[-1].ts
    start, length = last, 0
    for entry in reversed(entries):
        if start - entry.ts > gap_ms:
            break
        start, length = entry.ts, length + 1
    return SessionMeta(last, start, length)


def split_sessions(entries: list[Entry], gap_ms: int) -> list[list[Entry]]:
    """Split a time-ordered sequence wherever consecutive events are more than gap_ms apart."""
    sessions: list[list[Entry]] = []
    for entry in entries:
        if not sessions or entry.ts - sessions[-1][-1].ts > gap_ms:
            sessions.append([])
        sessions[-1].append(entry)
    return sessions


@dataclass(slots=True)
class UserState:
    """Reference state of one user."""

    config: SessionConfig
    seq: dict[str, int] = field(default_factory=dict)  # member -> ts
    seen: dict[str, int] = field(default_factory=dict)  # event id -> offset
    clicks: int = 0
    impressions: int = 0
    last_facts: str = ""
    requests: dict[str, tuple[int, str, tuple[tuple[str, int], ...]]] = field(default_factory=dict)
    clicked: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # request -> clicks
    request_order: dict[str, int] = field(default_factory=dict)  # request -> time, for trimming
    factlog: dict[int, str] = field(default_factory=dict)  # offset -> encoded facts
    newest_ts: int | None = None  # event time of the newest event applied (ms): ages the join state

    def apply(self, kind: str, event_id: str, item: str, ts: int, offset: int,
              request_id: str = "", segment: str = "",
              shown: tuple[tuple[str, int], ...] = (), facts_floor: int = 0) -> tuple[Status, int]:
        """Apply one event in offset order. ``kind`` is "c" (click) or "i" (impression).
        The facts it yields for the learners are left in ``last_facts``.

        ``facts_floor`` is the offset below which the user's partition is known to be fully
        applied, learner updates included (the worker passes the partition's progress as it
        was before the batch). Facts of offsets below it are forgotten: a record below the
        floor that comes back is only recognised as redelivered, and yields ``FACTS_DONE``.
        """
        self.last_facts = ""
        self._forget_facts(facts_floor)
        prev = self.seen.get(event_id)
        if prev is not None:
            if prev == offset:
                self.last_facts = FACTS_DONE if offset < facts_floor else self.factlog.get(offset, "")
                return Status.REDELIVERED, prev
            if prev < offset:
                return Status.DUPLICATE, prev
            # An earlier offset after a later one only happens with two writers; mirror the script.
            suffix = SEPARATOR + event_id
            self.seq = {m: t for m, t in self.seq.items() if not m.endswith(suffix)}
            if kind == "c":
                self.seq[member(item, event_id)] = ts
            self._remember(event_id, offset)
            self._trim()
            return Status.SUPERSEDED, prev
        self._remember(event_id, offset)
        if kind == "c":
            self.clicks += 1
            self.seq[member(item, event_id)] = ts
            self._trim()
            facts = self._click_facts(event_id, item, ts, request_id)
        else:
            self.impressions += 1
            facts = self._impression_facts(ts, request_id, segment, shown)
        self.last_facts = RS.join(facts)
        self.factlog[offset] = self.last_facts
        self._forget_facts(offset - self.config.facts_span)
        if self.newest_ts is None or ts > self.newest_ts:
            self.newest_ts = ts
        self._forget_requests(self.newest_ts - self.config.join_horizon_ms)
        return Status.APPLIED, offset

    def _forget_facts(self, below: int) -> None:
        for old in [o for o in self.factlog if o < below]:
            del self.factlog[old]

    def _forget_requests(self, before_ts: int) -> None:
        """Join state of requests older than ``before_ts``: no click can still join them
        (unless it is later than the lateness allowance)."""
        for rid in [r for r, t in self.request_order.items() if t < before_ts]:
            del self.request_order[rid]
            self.requests.pop(rid, None)
            self.clicked.pop(rid, None)

    def _click_facts(self, event_id: str, item: str, ts: int, request_id: str) -> list[str]:
        c = self.config
        own = member(item, event_id)
        # ZREVRANGEBYSCORE seq ts (ts - gap) LIMIT 0 window+1: newest first, ties by member desc
        rows = sorted(
            ((m, t) for m, t in self.seq.items() if ts - c.gap_ms <= t <= ts),
            key=lambda mt: (mt[1], mt[0].encode()), reverse=True,
        )[: c.cf_window + 1]
        facts = ["C"] + [f"W{US}{parse_member(m)[0]}{US}{t}" for m, t in rows if m != own][: c.cf_window]
        if request_id:
            prior = self.clicked.get(request_id, [])
            if all(i != item for i, _ in prior):
                self.clicked[request_id] = [*prior, (item, ts)]
                if request_id not in self.request_order:
                    self.request_order[request_id] = ts
                    self._trim_requests()
                imp = self.requests.get(request_id)
                if imp is not None and imp[0] <= ts <= imp[0] + c.attribution_ms:
                    for shown_item, position in imp[2]:
                        if shown_item == item:
                            facts.append(f"K{US}{item}{US}{position}{US}{imp[0]}{US}{imp[1]}")
                            break
        return facts

    def _impression_facts(self, ts: int, request_id: str, segment: str,
                          shown: tuple[tuple[str, int], ...]) -> list[str]:
        c = self.config
        repeated = request_id in self.requests  # a retried impression: its clicks were joined
        self.requests[request_id] = (ts, segment, shown)
        self.request_order[request_id] = ts
        facts = [f"S{US}{i}{US}{p}{US}{ts}{US}{segment}" for i, p in shown]
        for clicked_item, cts in [] if repeated else self.clicked.get(request_id, []):
            if ts <= cts <= ts + c.attribution_ms:
                for shown_item, position in shown:
                    if shown_item == clicked_item:
                        facts.append(f"K{US}{clicked_item}{US}{position}{US}{ts}{US}{segment}")
                        break
        self._trim_requests()
        return facts

    def _trim_requests(self) -> None:
        excess = len(self.request_order) - self.config.max_requests
        if excess > 0:
            for rid, _ in sorted(self.request_order.items(), key=lambda kv: (kv[1], kv[0]))[:excess]:
                del self.request_order[rid]
                self.requests.pop(rid, None)
                self.clicked.pop(rid, None)

    def _remember(self, event_id: str, offset: int) -> None:
        self.seen[event_id] = offset
        if len(self.seen) > self.config.dedupe_window:
            keep = sorted(self.seen.items(), key=lambda kv: (kv[1], kv[0]))[-self.config.dedupe_window :]
            self.seen = dict(keep)

    def _trim(self) -> None:
        if len(self.seq) > self.config.max_length:
            keep = sorted(self.seq.items(), key=lambda kv: (kv[1], kv[0].encode()))
            self.seq = dict(keep[-self.config.max_length :])

    def entries(self) -> list[Entry]:
        ordered = sorted(self.seq.items(), key=lambda kv: (kv[1], kv[0].encode()))
        return [Entry(*parse_member(m)[:1], ts, parse_member(m)[1]) for m, ts in ordered]

    def meta(self) -> SessionMeta:
        return derive_meta(self.entries(), self.config.gap_ms)


class UserEventRow(NamedTuple):
    """What the state machine needs of a user event (decoded elsewhere)."""

    user: str
    kind: str  # "c" or "i"
    event_id: str
    item: str
    ts: int
    offset: int
    request_id: str = ""
    segment: str = ""
    shown: tuple[tuple[str, int], ...] = ()  # impressions: (item, position)


def rebuild(rows: Iterable[UserEventRow], config: SessionConfig) -> dict[str, UserState]:
    """Batch recomputation: apply every row in the given (per-user offset) order."""
    users: dict[str, UserState] = {}
    for row in rows:
        state = users.get(row.user)
        if state is None:
            state = users[row.user] = UserState(config)
        state.apply(row.kind, row.event_id, row.item, row.ts, row.offset,
                    row.request_id, row.segment, row.shown)
    return users
