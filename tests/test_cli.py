"""The ``streamrec`` command line, run as a child process against the real services.

User mistakes (bad arguments, bad ids, bad input lines, an unreachable broker) print one
line and a non-zero exit status, never a traceback; the happy paths move events from a file
through a worker into state that ``session``, ``dlq`` and ``namespaces`` print.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from streamrec.infra.embedded import port_open
from streamrec.infra.settings import Settings, env_for
from streamrec.infra.state import StateStore
from streamrec.streams.launch import WorkerProcess, wait_applied

T0 = 1_700_000_000_000


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **env_for(settings), "PYTHONUNBUFFERED": "1", **extra}


def cli(settings: Settings, *args: str, cwd: Path, timeout: float = 60.0,
        **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamrec", *args], cwd=cwd, env=_env(settings, **extra_env),
        capture_output=True, text=True, timeout=timeout,
    )


def click(event_id: str, user: str, item: str, ts: int) -> str:
    return json.dumps({"type": "click", "id": event_id, "timestamp": ts, "user": user, "item": item})


def assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("streamrec"), lines[0]
    assert "error" in lines[0], lines[0]
    return lines[0]


# -- the unreachable broker ------------------------------------------------------------------
# kafka-python's producer waits bootstrap_timeout_ms (30 s by default) before it gives up, so
# this child is started when the module's first test starts and judged by the last test,
# instead of adding its 30 s to the module's run time.

UNREACHABLE_LIMIT_S = 90.0  # generous: the measured time is about 30.4 s (see the report)


@pytest.fixture(scope="module", autouse=True)
def unreachable_publish(
    base_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    cwd = tmp_path_factory.mktemp("unreachable")
    (cwd / "events.jsonl").write_text(click("e1", "u1", "i1", T0) + "\n")
    assert not port_open("127.0.0.1", 1)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamrec", "publish", "events.jsonl"], cwd=cwd,
        env=_env(base_settings, STREAMREC_KAFKA__BOOTSTRAP="127.0.0.1:1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    yield {"proc": proc, "started": started}
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


# -- argument errors -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["frobnicate"],
    ["replay", "--since", "notatime"],
    ["bench", "ingest", "--events", "-5"],
    ["generate", "--clicks", "0"],
    ["session"],
    ["bench", "serve", "--items", "0"],
    ["train", "--epochs", "x"],
    ["recs"],
    ["eval", "x.csv", "--two-stage", "--every", "-1"],
], ids=["unknown-subcommand", "replay-since", "bench-negative", "generate-zero", "session-no-user",
        "bench-serve-zero", "train-epochs", "recs-no-user", "eval-every"])
def test_bad_arguments_print_one_line_and_exit_2(
    base_settings: Settings, tmp_path: Path, args: list[str]
) -> None:
    proc = cli(base_settings, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc)
    assert proc.stdout == ""


def test_bad_user_id_is_one_line_without_traceback(base_settings: Settings, tmp_path: Path) -> None:
    proc = cli(base_settings, "session", "bad{id}", cwd=tmp_path)
    assert proc.returncode != 0
    line = assert_one_error_line(proc)
    assert line.startswith("streamrec: error: ")
    assert "bad{id}" in line
    assert proc.stdout == ""


def test_recs_of_a_bad_user_id_or_with_nothing_served_is_one_line(settings: Settings, store: StateStore,
                                                                  tmp_path: Path) -> None:
    proc = cli(settings, "recs", "bad{id}", cwd=tmp_path)
    assert proc.returncode == 1 and "bad{id}" in assert_one_error_line(proc)
    for command in (["recs", "u1"], ["session", "u1"], ["status"]):  # read-only: nothing is created
        cli(settings, *command, cwd=tmp_path)
        assert not list(store.client.scan_iter(match=f"{store.keys.prefix}:*"))
    proc = cli(settings, "recs", "u1", cwd=tmp_path)  # no state at all: said, not answered empty
    assert proc.returncode == 1 and "no state in Redis" in assert_one_error_line(proc)
    store.registry.ensure()
    proc = cli(settings, "recs", "u1", cwd=tmp_path)  # state, but no serving worker ever ran
    assert proc.returncode == 1 and "streamrec serve" in assert_one_error_line(proc)


def test_train_on_a_missing_file_is_one_line(settings: Settings, tmp_path: Path) -> None:
    proc = cli(settings, "train", "--data", "nope.csv", "--seq-only", cwd=tmp_path)
    assert proc.returncode == 1 and "nope.csv" in assert_one_error_line(proc)


def test_user_id_with_trailing_newline_is_rejected(settings: Settings, tmp_path: Path) -> None:
    # `settings`, not `base_settings`: reading a session creates the registry under the prefix
    proc = cli(settings, "session", "u1\n", "--compact", cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    line = assert_one_error_line(proc)
    assert line.startswith("streamrec: error: ")


def test_an_unusable_setting_is_one_line_naming_the_variable(base_settings: Settings, tmp_path: Path) -> None:
    proc = cli(base_settings, "status", cwd=tmp_path, STREAMREC_KAFKA__PARTITIONS="0")
    assert proc.returncode == 1
    assert "STREAMREC_KAFKA__PARTITIONS" in assert_one_error_line(proc)


def test_schema_is_json_with_every_event_type(base_settings: Settings, tmp_path: Path) -> None:
    proc = cli(base_settings, "schema", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert {"Click", "Impression", "Item"} <= set(schema["$defs"])


# -- publish, worker, session ----------------------------------------------------------------


def test_publish_reports_bad_lines_and_session_shows_clicks_in_event_time_order(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = start_worker()  # starts while the file is published
    lines = [
        click("e1", "alice", "a", T0 + 2000),
        '{"type": "click", "id": "e2", "timestamp": 1700000000000, "user": "alice", "item": "x"',
        click("e3", "alice", "b", T0),
        click("e4", "alice", "y", 1_700_000_000),  # seconds, not milliseconds: bad_timestamp
        click("e5", "alice", "c", T0 + 1000),
    ]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")

    proc = cli(settings, "publish", "events.jsonl", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2, proc.stderr
    assert err[0].startswith("events.jsonl:2: ")
    assert err[1].startswith("events.jsonl:4: ")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["published"] == 3
    assert summary["invalid"] == 2

    wait_applied(store, 3, workers=[worker], timeout_s=60)
    proc = cli(settings, "session", "alice", "--compact", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1, proc.stdout
    view = json.loads(out[0])
    assert view["user"] == "alice"
    assert [r["item"] for r in view["recent"]] == ["b", "c", "a"]
    assert [r["ts"] for r in view["recent"]] == [T0, T0 + 1000, T0 + 2000]
    assert [r["event_id"] for r in view["recent"]] == ["e3", "e5", "e1"]
    assert view["clicks"] == 3
    assert view["session"]["items"] == ["b", "c", "a"]


def test_publish_raw_sends_invalid_lines_and_dlq_prints_them_with_codes(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = start_worker()
    not_json = "this is not json"
    bad_id = click("e2", "bad{user}", "i2", T0)
    lines = [click("e1", "bob", "i1", T0), not_json, click("e3", "bob", "i3", T0 + 1),
             bad_id, click("e4", "bob", "i4", T0 + 2)]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")

    proc = cli(settings, "publish", "--raw", "events.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line.split(" ")[0] for line in proc.stderr.strip().splitlines()] == [
        "events.jsonl:2:", "events.jsonl:4:"]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["published"], summary["invalid"], summary["invalid_sent_raw"]) == (3, 2, 2)

    wait_applied(store, 5, workers=[worker], timeout_s=60)
    want = {not_json: "not_json", bad_id: "bad_id"}
    got: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc = cli(settings, "dlq", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        got = {row["value"]: row["code"] for row in rows}
        if set(want) <= set(got):
            break
        time.sleep(0.5)
    assert got == want
    assert store.session_view("bob").clicks == 3


def test_namespaces_lists_v1_live_after_a_worker_started(
    settings: Settings, store: StateStore, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    assert store.client.exists(store.keys.namespaces()) == 0  # a fresh prefix: no registry yet
    worker = start_worker()
    deadline = time.monotonic() + 30
    while not store.registry.workers() and time.monotonic() < deadline:
        assert worker.alive(), worker.output()
        time.sleep(0.1)
    assert store.registry.workers(), worker.output()
    assert [name for name, _ in store.registry.namespaces()] == ["v1"]  # registered by the worker

    proc = cli(settings, "namespaces", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [(r["namespace"], r["role"]) for r in rows] == [("v1", "live")]
    assert rows[0]["created_ms"] > 0


def _keys_and_values(store: StateStore) -> dict[bytes, bytes]:
    return {k: store.client.dump(k) for k in store.client.scan_iter(match=f"{store.keys.prefix}:*", count=1000)}


def test_drop_refuses_anything_but_a_registered_idle_namespace(settings: Settings, store: StateStore,
                                                              tmp_path: Path) -> None:
    """Reserved key families (served lists, models, change streams, the registry), names never
    registered, the live namespace and the one being rebuilt: each refused with one line,
    nothing deleted. A registered idle namespace is dropped, and only its keys go."""
    from streamrec.infra.recstore import RecStore
    from streamrec.models.session import UserEventRow

    recstore = RecStore(store, settings.kafka.partitions)
    store.registry.ensure()
    live = store.live()
    store.apply_user_events(live, [UserEventRow("u1", "c", "e1", "i1", T0, 0, "", "")])
    recstore.write_recs([("u1", 0, {"items": "[]"}), (None, 0, {"items": "[]"})], 60_000)
    recstore.publish_model("seq", "m1", b"model bytes", {}, keep=3)
    recstore.mark_dirty({"u1": (0, 0, T0, T0)})
    recstore.announce_items([(0, "i1")], maxlen=100)
    building = store.registry.begin_rebuild("v3", {})
    store.apply_user_events(building, [UserEventRow("u1", "c", "e1", "i1", T0, 0, "", "")])
    before = _keys_and_values(store)
    assert any(b":rec:" in k for k in before) and any(b":model:" in k for k in before)
    assert any(b":chg:" in k for k in before) and any(b"{reg}" in k for k in before)

    for name in ["rec", "model", "chg", "reg", "v7", "nope", live.name, "v3", "rec:*", "*"]:
        proc = cli(settings, "drop", name, cwd=tmp_path)
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert repr(name) in assert_one_error_line(proc) or name in proc.stderr
        assert _keys_and_values(store) == before, name  # not one key deleted or changed

    store.registry.abort_rebuild("v3")  # registered, neither live nor rebuilding: droppable
    before = _keys_and_values(store)
    proc = cli(settings, "drop", "v3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    v3 = f"{store.keys.prefix}:v3:".encode()
    registered = store.keys.namespaces().encode()
    assert json.loads(proc.stdout)["keys_deleted"] == sum(k.startswith(v3) for k in before) >= 4
    after = _keys_and_values(store)
    assert not any(k.startswith(v3) for k in after)
    assert ({k: v for k, v in before.items() if not k.startswith(v3) and k != registered}
            == {k: v for k, v in after.items() if k != registered})
    assert [n for n, _ in store.registry.namespaces()] == [live.name]


# -- judged last: see unreachable_publish ----------------------------------------------------


def test_publish_to_unreachable_broker_is_one_line(unreachable_publish: dict[str, Any]) -> None:
    proc: subprocess.Popen[str] = unreachable_publish["proc"]
    remaining = UNREACHABLE_LIMIT_S - (time.monotonic() - unreachable_publish["started"])
    try:
        stdout, stderr = proc.communicate(timeout=max(remaining, 0.1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"publish to an unreachable broker ran past {UNREACHABLE_LIMIT_S:.0f} s")
    elapsed = time.monotonic() - unreachable_publish["started"]
    assert proc.returncode == 1, stderr
    line = assert_one_error_line(subprocess.CompletedProcess(proc.args, 1, stdout, stderr))
    assert line.startswith("streamrec: error: ")
    assert "127.0.0.1:1" in line
    assert "Kafka" in line
    assert stdout == ""
    print(f"publish to an unreachable broker failed after {elapsed:.1f} s")


@pytest.mark.parametrize("flag,value", [("--baselines", "als:1d"), ("--baselines", "svd:24h"),
                                        ("--rankers", "xgboost"), ("--sources", "seq,magic")])
def test_bad_two_stage_choices_are_one_line(base_settings: Settings, tmp_path: Path, flag: str, value: str) -> None:
    proc = cli(base_settings, "eval", "x.csv", "--two-stage", flag, value, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert_one_error_line(proc)
    assert flag in proc.stderr
