"""Drift of the live click-through rate of served lists: the signal and its detector.

``list_rewards`` turns served lists and the clicks that followed into one reward per list (1.0:
the user's next click, within the attribution window, was on one of its items); ``DriftMonitor`` feeds
such a stream to a river drift detector (ADWIN or Page-Hinkley) and says when the rate changed,
so that the trainer can retrain the ranker at once instead of waiting for its schedule.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from streamrec.models.errors import ConfigError
from streamrec.models.events import Click
from streamrec.models.servedlog import ServedLog

KINDS = ("adwin", "page-hinkley")


@dataclass(frozen=True)
class Detection:
    """One drift the monitor reported."""

    observed: int  # values seen since the previous reset, the one that fired included
    mean: float  # their mean
    recent: float  # mean of the last ``DriftMonitor.recent`` of them (the rate after the change)


class DriftMonitor:
    """A river drift detector on a stream of values that fires only once ``min_obs`` values
    were seen since its last reset, and resets itself (new detector, counter zero) when it does.

    ``delta`` is ADWIN's confidence (smaller: fewer false alarms); Page-Hinkley keeps river's
    defaults. A change the detector sees before ``min_obs`` is not reported: river restarts a
    detector that flagged one on its next value, so the level after that change becomes the new
    reference (after a retraining, the new model's own rate)."""

    def __init__(self, kind: str, delta: float = 0.002, min_obs: int = 500, recent: int = 100) -> None:
        if kind not in KINDS:
            raise ConfigError(f"drift detector {kind!r} is not one of {', '.join(KINDS)}")
        if min_obs < 1 or recent < 1:
            raise ConfigError(f"drift monitor: min_obs ({min_obs}) and recent ({recent}) must be at least 1")
        self.kind = kind
        self.delta = delta
        self.min_obs = min_obs
        self.recent = recent
        self.detections = 0
        self.last: Detection | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every value seen: a new detector, ``observed`` zero (``detections`` is kept)."""
        self.observed = 0
        self._sum = 0.0
        self._recent: deque[float] = deque(maxlen=self.recent)
        self._detector = _detector(self.kind, self.delta)

    @property
    def mean(self) -> float:
        """Mean of the values since the last reset (0.0 before the first)."""
        return self._sum / self.observed if self.observed else 0.0

    @property
    def recent_mean(self) -> float:
        """Mean of the last ``recent`` values since the last reset (0.0 before the first)."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def update(self, value: float) -> bool:
        """Take one value; True when drift was detected with at least ``min_obs`` values seen
        since the last reset (then ``last`` describes it and the monitor has reset itself)."""
        self._detector.update(value)
        self.observed += 1
        self._sum += value
        self._recent.append(value)
        if not (self._detector.drift_detected and self.observed >= self.min_obs):
            return False
        self.detections += 1
        self.last = Detection(self.observed, self.mean, self.recent_mean)
        self.reset()
        return True


def _detector(kind: str, delta: float) -> Any:
    # imported here: river.drift pulls in scipy (about a second), which the rest of models/
    # and every process that never monitors drift should not pay for
    from river import drift

    return drift.ADWIN(delta=delta) if kind == "adwin" else drift.PageHinkley()


def outcome_known(log: ServedLog, window_ms: int, now_ms: int) -> bool:
    """Whether a list's attribution window has passed at event time ``now_ms`` (the newest
    click seen): every click that could answer it has then been seen."""
    return now_ms - log.as_of >= window_ms


def list_rewards(logs: Iterable[ServedLog], clicks: Iterable[Click], window_ms: int,
                 now_ms: int) -> list[tuple[int, float]]:
    """The live click-through signal: ``(as_of, reward)`` per served list, in ``as_of`` order
    (ties: input order). Reward 1.0 when the user's next click after the list's state (the
    rule of ``servedlog.label_lists``: event time above ``as_of``, or equal to it and not one of
    the state's own clicks, ``tie_ids``; ties in arrival order), at most ``window_ms`` later,
    is on one of its served ``items``; else 0.0 (no click in the window, or a click elsewhere:
    that click makes the next list). Lists without a user, and lists whose outcome is not known
    yet at ``now_ms`` (``outcome_known``), are left out. Every logged list counts,
    recomputations of one state included (each was served). Pure."""
    by_user: dict[str, list[tuple[int, int, str, str]]] = {}
    for n, c in enumerate(clicks):
        by_user.setdefault(c.user, []).append((c.timestamp, n, c.item, c.id))
    for v in by_user.values():
        v.sort()
    out: list[tuple[int, float]] = []
    for s in logs:
        if s.user is None or not outcome_known(s, window_ms, now_ms):
            continue
        nxt = _next_click(by_user.get(s.user, []), s, window_ms)
        out.append((s.as_of, 1.0 if nxt is not None and nxt in s.items else 0.0))
    out.sort(key=lambda r: r[0])  # stable: ties keep input order
    return out


def _next_click(seq: Sequence[tuple[int, int, str, str]], s: ServedLog, window_ms: int) -> str | None:
    """The item of the first click of ``seq`` (one user's clicks, sorted) after the state of
    ``s`` and within the window; None when there is none."""
    k = bisect.bisect_left(seq, (s.as_of,))
    ties = set(s.tie_ids)
    while k < len(seq) and seq[k][0] == s.as_of and seq[k][3] in ties:
        k += 1
    if k >= len(seq) or seq[k][0] - s.as_of > window_ms:
        return None
    return seq[k][2]


__all__ = ["DriftMonitor", "Detection", "KINDS", "list_rewards", "outcome_known"]
