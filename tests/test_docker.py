"""The suite on Apache Kafka and Redis containers (testcontainers), where Docker exists.

With ``STREAMREC_TEST_DOCKER=1`` the session fixture (``tests/conftest.py``) starts the
containers and every service-crossing test runs against them; this file checks that it did
and that a record makes the round trip. Without it, skipped: no Docker engine runs here."""

from __future__ import annotations

import pytest

from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.events import Click
from streamrec.streams.sdk import Publisher
from tests.conftest import DOCKER, KAFKA_IMAGE
from tests.support import wait_for

pytestmark = pytest.mark.skipif(
    not DOCKER, reason="set STREAMREC_TEST_DOCKER=1 (with a Docker engine) to run the suite on "
                       f"Apache Kafka ({KAFKA_IMAGE}) and Redis containers")


def test_the_session_runs_on_the_containers(settings: Settings, start_worker) -> None:  # type: ignore[no-untyped-def]
    assert not settings.kafka.bootstrap.startswith("127.0.0.1:19092")
    assert settings.redis.url != "redis://127.0.0.1:6379/0"
    store = StateStore.from_settings(settings)
    worker = start_worker("docker-w1")
    with Publisher.from_settings(settings) as pub:
        pub.send(Click(id="d1", timestamp=1_700_000_000_000, user="u1", item="i1"))
        pub.flush()
    wait_for(lambda: store.registry.live_name() and store.session_view("u1").clicks == 1,
             timeout_s=120, what="the click applied on the containers")
    assert worker.alive()
