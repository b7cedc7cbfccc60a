"""The registry's state-loss protocol and a namespace's positions, against real Redis."""

from __future__ import annotations

import pytest

from streamrec.infra.state import StateStore
from streamrec.models.errors import ReplayError, StateLost


def test_reads_never_create_the_registry(store: StateStore) -> None:
    registry = store.registry
    assert registry.condition() == "empty" and registry.live_name() is None and registry.epoch() is None
    with pytest.raises(StateLost, match="no state in Redis"):
        registry.live()
    with pytest.raises(StateLost):
        store.session_view("u1")
    assert not registry.view().healthy
    assert list(store.client.scan_iter(match=f"{store.keys.prefix}:*")) == []  # nothing was written


def test_ensure_creates_it_once_and_keeps_the_epoch(store: StateStore) -> None:
    epoch = store.registry.ensure()
    assert store.registry.ensure() == epoch == store.registry.epoch()
    view = store.registry.view()
    assert view.healthy and view.live is not None and view.live.name == "v1" and view.epoch == epoch
    assert store.registry.info("v1")["epoch"] == epoch


def test_a_loss_is_marked_once_and_a_restore_clears_it(store: StateStore) -> None:
    registry = store.registry
    registry.ensure()
    with pytest.raises(ReplayError, match="not lost"):
        registry.begin_restore("r1", {})  # the state is there: a plain replay rebuilds it
    store.client.delete(store.keys.live(), store.keys.epoch(), store.keys.namespaces())  # Redis "restarted"
    assert registry.mark_lost("w1", "no registry") and not registry.mark_lost("w2", "no registry")
    assert registry.condition() == "lost" and registry.lost_marker()["worker"] == "w1"
    with pytest.raises(StateLost, match="state lost .* w1"):
        registry.live()
    ns = registry.begin_restore("r1", {"restore": True})
    assert registry.condition() == "restoring" and not registry.view().healthy  # not readable yet
    with pytest.raises(ReplayError, match="in progress"):
        registry.begin_restore("r2", {})
    epoch = registry.epoch()
    assert registry.info("r1")["lost"]["worker"] == "w1"
    registry.switch(ns.name)
    view = registry.view()
    assert view.healthy and view.live == ns and view.epoch == epoch and registry.condition() == "ok"


def test_offsets_keep_every_position_apart_and_rebase_continues_them(store: StateStore) -> None:
    store.registry.ensure()
    ns = store.live()
    store.record_progress(ns, {"t.events:0": 500, "t.events:1": 7})
    store.record_dead_letters(ns, {"t.events:0": 480})
    store.record_progress(ns, {"t.events:0": 400})  # kept at the maximum
    got = store.offsets(ns)
    assert got.progress == {"t.events:0": 500, "t.events:1": 7} == store.progress(ns)
    assert got.dead_letters == {"t.events:0": 480} and got.base == {} and got.incarnations == {}
    store.rebase(ns, "t.events:0", 500)  # the partition restarted from offset 0
    got = store.offsets(ns)
    assert got.base == {"t.events:0": 500} and got.incarnations == {"t.events:0": 1}
    assert got.effective("t.events:0", 3) == 503 and got.effective("t.events:1", 3) == 3
    rebuilt = store.keys.ns("v2")
    store.copy_bases(ns, rebuilt)
    assert store.offsets(rebuilt).base == {"t.events:0": 500} and store.offsets(rebuilt).progress == {}
