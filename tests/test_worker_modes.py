"""The stream worker's modes and its consumer's path from fetch to stream.

Against the real broker and Redis: ``worker.apply`` off (the stream framework's ceiling, measured by `streamrec bench ingest`):
every record is taken, acknowledged and counted as applied, and no state is written. A stream
buffer far smaller than a fetch (Faust holding partitions back while it drains) loses and
repeats nothing, with batches applied as usual. In-process: the consumer's eager
``wait_first`` behaves as Faust's own (a result at once, or the rest of the coroutine under
the general path, interrupted when the other awaitable wins).
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any, Callable

import mode
import pytest

from streamrec.infra import kafka as kafka_wiring
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Click
from streamrec.streams.launch import wait_live
from streamrec.streams.sdk import Publisher
from streamrec.streams.worker import _Consumer
from tests.conftest import WorkerProcess, wait_applied
from tests.support import wait_for
from tests.test_worker import expected, make_events, publish, users_of

T0 = 1_700_000_000_000


def committed(settings: Settings) -> int:
    k = settings.kafka
    return sum(kafka_wiring.committed_offsets(k, [k.events_topic, k.items_topic]).values())


@pytest.mark.slow
def test_a_worker_that_does_not_apply_counts_every_record_and_writes_no_state(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    k = settings.kafka
    n = 5_000
    clicks = [Click(id=f"c{i}", timestamp=T0 + i, user=f"u{i % 60}", item=f"i{i % 97}") for i in range(n)]
    with Publisher.from_settings(settings) as pub:
        for click in clicks:
            pub.send(click)
        pub.send_raw(k.events_topic, b"u1", b"not an event")  # would be dead-lettered if applied
        pub.flush()
    total = n + 1
    worker = start_worker("w1", apply=False, batch_size=300)
    live = wait_live(store, workers=[worker])
    wait_applied(store, total, workers=[worker])
    # Acknowledged, so committed: every offset of every partition.
    wait_for(lambda: committed(settings) == total, timeout_s=30, what=f"{total} committed offsets")

    status = wait_for(lambda: [s for s in store.registry.workers() if s["worker"] == "w1"], what="a status")
    assert status[0]["apply"] is False
    assert status[0]["dead_letters"] == 0
    time.sleep(0.5)
    assert sum(store.progress(live).values()) == total  # nothing counted twice
    # No state: the namespace holds its progress (and how it was built), nothing else.
    keys = {key.decode() for key in store.client.scan_iter(match=live.pattern(), count=1000)}
    assert keys <= {live.progress(), live.info()}, sorted(keys)[:10]
    assert store.snapshot(live.name, {c.user for c in clicks}) == {}
    assert not list(store.client.scan_iter(match=f"{settings.redis.prefix}:chg:*", count=1000))  # serving not told


@pytest.mark.slow
def test_a_stream_buffer_smaller_than_a_fetch_loses_and_repeats_nothing(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A 64-record stream buffer, 2,000-record fetches: Faust keeps holding partitions back
    until the agent drained the buffer (the worker's consumer resumes them without Faust's
    fixed one-second waits). State equals one clean pass, and every offset is committed."""
    events = make_events(12_000, users=200, seed=11, dup_every=157)
    published = publish(settings, events)
    worker = start_worker("w1", stream_buffer_maxsize=64, batch_size=500)
    wait_applied(store, len(published), workers=[worker])
    live = store.registry.live_name()
    assert store.snapshot(live, users_of(events)) == expected(settings, published)
    wait_for(lambda: committed(settings) == len(published), timeout_s=30,
             what=f"{len(published)} committed offsets")
    assert worker.alive()


def consumer(fast: bool) -> Any:
    """A worker consumer as a bare service (its ``wait_first`` needs nothing else)."""
    c = _Consumer.__new__(_Consumer)
    mode.Service.__init__(c)
    c.app = types.SimpleNamespace(consumer_fast_path=fast)
    return c


@pytest.mark.parametrize("fast", [True, False])
def test_the_consumers_wait_first_is_fausts_with_or_without_the_fast_path(fast: bool) -> None:
    async def main() -> list[Any]:
        c = consumer(fast)
        loop = asyncio.get_running_loop()
        other = asyncio.Event()
        out: list[Any] = []

        async def at_once(x: int) -> int:
            return x * 2

        done = await c.wait_first(at_once(21), other.wait())
        out.append((done.results, done.stopped))

        later = loop.create_future()
        cleaned: list[str] = []

        async def suspends() -> int:
            try:
                return await later
            finally:
                cleaned.append("finished")

        loop.call_later(0.02, later.set_result, 7)
        done = await c.wait_first(suspends(), other.wait())
        out.append((done.results, done.stopped, cleaned[:]))

        never = loop.create_future()

        async def interrupted() -> None:
            try:
                await never
            except asyncio.CancelledError:
                cleaned.append("cancelled")
                raise

        loop.call_later(0.02, other.set)
        done = await c.wait_first(interrupted(), other.wait())
        await asyncio.sleep(0)  # the cancellation reaches the coroutine
        out.append((done.results, done.stopped, cleaned[:]))

        async def fails() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await c.wait_first(fails(), asyncio.Event().wait())
        return out

    assert asyncio.run(main()) == [
        ([42], False),
        ([7], False, ["finished"]),
        ([True], False, ["finished", "cancelled"]),
    ]
