"""The Redis key layout (infra/keys.py) as pure functions: hash slots, names, inverses."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from streamrec.infra.keys import DEFAULT_NAMESPACE, RESERVED_NAMES, Keys, Namespace
from streamrec.models.errors import ConfigError
from streamrec.models.events import ID_PATTERN

ids = st.from_regex(ID_PATTERN, fullmatch=True)
namespaces = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True).filter(lambda n: n not in RESERVED_NAMES)
prefixes = st.sampled_from(["sr", "test0123456789", "a", "prod-eu"])


def slot(key: str) -> int:
    return key_slot(key.encode())


def all_keys(ns: Namespace, users: list[str], items: list[str]) -> set[str]:
    out = {ns.catalog(), ns.info(), ns.progress()}
    for user in users:
        out.update(ns.user_keys(user))
    out.update(ns.item_meta(item) for item in items)
    out.update(ns.item_neighbours(item) for item in items)
    out.update(ns.item_stats(item) for item in items)
    out.update({ns.trending(), ns.trending("c1"), ns.trending_meta()})
    return out


@given(prefix=prefixes, name=namespaces, user=ids)
def test_every_key_of_one_user_is_in_one_hash_slot(prefix: str, name: str, user: str) -> None:
    ns = Keys(prefix).ns(name)
    keys = ns.user_keys(user)
    seq, meta, seen = keys[:3]
    assert (seq, meta, seen) == (ns.session_seq(user), ns.session_meta(user), ns.seen(user))
    assert keys[3:] == (ns.facts(user), ns.requests(user), ns.request_index(user))
    assert len(set(keys)) == 6
    assert len({slot(k) for k in keys}) == 1
    # the slot is the user's, whatever the namespace or prefix
    assert slot(seq) == key_slot(user.encode())


def test_different_users_usually_get_different_slots() -> None:
    ns = Keys().ns(DEFAULT_NAMESPACE)
    slots = {slot(ns.session_seq(f"user-{i}")) for i in range(1000)}
    assert len(slots) > 900  # 1000 users over 16384 slots: a few collisions at most


@given(prefix=prefixes, worker=ids)
def test_registry_keys_share_one_slot(prefix: str, worker: str) -> None:
    keys = Keys(prefix)
    registry = [keys.live(), keys.rebuild(), keys.namespaces(), keys.worker(worker), keys.latency()]
    assert len(set(registry)) == len(registry)
    assert len({slot(k) for k in registry}) == 1


@pytest.mark.parametrize("bad", [
    "", "V1", "-v1", "_v1", "v 1", "v1:x", "v{1}", "v*", "a" * 33, "ns/1", "é", "\nv1",
    "rec", "chg", "model", "reg",  # the key families outside namespaces
])
def test_ns_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ConfigError):
        Keys().ns(bad)


def test_ns_rejects_a_trailing_newline() -> None:
    with pytest.raises(ConfigError):
        Keys().ns("v1\n")


@pytest.mark.parametrize("good", ["v1", "0", "a" * 32, "v2-since_2024"])
def test_ns_accepts_good_names(good: str) -> None:
    assert Keys().ns(good) == Namespace("sr", good)


@given(prefix=prefixes, name=namespaces, user=ids)
def test_user_from_seq_key_inverts_session_seq(prefix: str, name: str, user: str) -> None:
    ns = Keys(prefix).ns(name)
    assert ns.user_from_seq_key(ns.session_seq(user)) == user
    assert fnmatchcase(ns.session_seq(user), ns.user_seq_pattern())
    assert not fnmatchcase(ns.session_meta(user), ns.user_seq_pattern())
    assert not fnmatchcase(ns.seen(user), ns.user_seq_pattern())


@settings(max_examples=200)
@given(
    prefix=prefixes,
    names=st.lists(namespaces, min_size=2, max_size=2, unique=True),
    users=st.lists(ids, min_size=1, max_size=4),
    items=st.lists(ids, min_size=1, max_size=4),
)
def test_namespaces_never_collide_and_patterns_separate_them(
    prefix: str, names: list[str], users: list[str], items: list[str]
) -> None:
    keys = Keys(prefix)
    a, b = keys.ns(names[0]), keys.ns(names[1])
    keys_a, keys_b = all_keys(a, users, items), all_keys(b, users, items)
    assert not keys_a & keys_b
    assert all(fnmatchcase(k, a.pattern()) for k in keys_a)
    assert all(fnmatchcase(k, b.pattern()) for k in keys_b)
    assert not any(fnmatchcase(k, a.pattern()) for k in keys_b)
    assert not any(fnmatchcase(k, b.pattern()) for k in keys_a)
    # no namespace pattern reaches the registry, served lists, models or change streams
    registry = [keys.live(), keys.rebuild(), keys.namespaces(), keys.latency(), keys.worker("w1"),
                keys.handoff(), keys.paused("w1"), keys.serve_latency(), keys.recs(users[0]),
                keys.recs_default(), keys.changes(0), keys.model("seq"), keys.model_blob("seq", names[0])]
    assert not any(fnmatchcase(k, a.pattern()) for k in registry)
    assert all(fnmatchcase(k, keys.all_pattern()) for k in keys_a | keys_b | set(registry))


@given(name=namespaces, user=ids, item=ids)
def test_user_and_item_keys_never_collide(name: str, user: str, item: str) -> None:
    ns = Keys().ns(name)
    assert ns.item_meta(item) not in ns.user_keys(user)
