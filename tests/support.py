"""Helpers shared by tests: reference state from the pure model, published offsets."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

from streamrec.models.events import Click, Impression
from streamrec.models.session import SessionConfig, Status, UserEventRow, UserState, rebuild


def row_of(event: Click | Impression, offset: int) -> UserEventRow:
    if isinstance(event, Click):
        return UserEventRow(event.user, "c", event.id, event.item, event.timestamp, offset,
                            event.request_id or "", event.segment or "")
    return UserEventRow(event.user, "i", event.id, "", event.timestamp, offset, event.request_id,
                        event.segment or "", tuple((s.item, s.position) for s in event.items))


def expected_learners(rows: Iterable[UserEventRow], config: SessionConfig, learners: Any) -> dict[str, Any]:
    """The learners' reference state after the rows (per user in offset order)."""
    states: dict[str, UserState] = {}
    for row in sorted(rows, key=lambda r: r.offset):
        state = states.setdefault(row.user, UserState(config))
        status, _ = state.apply(row.kind, row.event_id, row.item, row.ts, row.offset,
                                row.request_id, row.segment, row.shown)
        if status is Status.APPLIED:
            learners.learn_facts(row.user, row.item, row.ts, state.last_facts)
    return learners.snapshot()


def expected_snapshot(rows: Iterable[UserEventRow], config: SessionConfig) -> dict[str, dict[str, Any]]:
    """What ``StateStore.snapshot`` must return after applying ``rows`` in offset order."""
    ordered = sorted(rows, key=lambda r: r.offset)  # per user, offsets are that user's order
    out = {}
    for user, state in rebuild(ordered, config).items():
        if state.seq:
            out[user] = {"entries": state.entries(), "meta": state.meta(), "clicks": state.clicks}
    return out


def close(a: Any, b: Any, rel: float = 1e-9) -> bool:
    """Structural equality with a float tolerance (log-space sums)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isinf(a) or math.isinf(b):
            return a == b
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return bool(a == b)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """The first truthy value of ``predicate()``, polled until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def synthetic_world(s: Any, namespace: str, n_items: int, seed: int, n_events: int) -> dict[str, Any]:
    """Real Redis state for retrieval and ranking tests: a synthetic catalog, clicks and
    impressions applied through the worker's processor into ``namespace``, three catalog items
    nobody has clicked or been shown yet (cold start, the newest), and a small sequence model
    trained on the clicks. The caller drops the state (``store.drop_everything()``)."""
    from streamrec.infra.state import StateStore
    from streamrec.models import synthetic
    from streamrec.models.events import Item
    from streamrec.models.content import tokens
    from streamrec.serving.trainer import fit_retrieval, fit_seq, sequences_of
    from streamrec.streams.evaluate import Feeder

    config = synthetic.SyntheticConfig(n_users=40, n_items=n_items, seed=seed)
    events = list(synthetic.events(config, n_events))
    store = StateStore.from_settings(s)
    last = max(e.timestamp for e in events)
    cold = [Item(id=f"cold-{n}", timestamp=last, item=f"cold-{n}", title=f"new arrival {n}",
                 tags=["new"], created_at=last - 1000 + n) for n in range(3)]
    catalog = [*synthetic.catalog(config), *cold]
    feeder = Feeder(s, store, namespace)
    feeder.items(catalog)
    feeder.clicks(events)  # clicks and impressions
    clicks = [e for e in events if isinstance(e, Click)]
    seq, index, content = fit_seq(s, sequences_of(clicks))
    item_tokens = {i.item: tokens(i.title, i.tags, i.category) for i in catalog}
    small = s.model_copy(update={"trainer": s.trainer.model_copy(update={"tower_epochs": 5, "mf_factors": 8})})
    retrieval = fit_retrieval(small, sequences_of(clicks), catalog=item_tokens, sources=["mf", "users", "tower"])
    return {"settings": s, "store": store, "catalog": catalog, "clicks": clicks,
            "seq": seq, "index": index, "content": content, "retrieval": retrieval}
