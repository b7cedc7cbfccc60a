"""Redis clients built from ``RedisSettings``: the one place that connects to Redis.

``connect`` returns a ``redis.Redis`` or, with ``redis.cluster``, a ``redis.cluster.RedisCluster``:
credentials from the settings (they override the URL's), TLS when ``redis.tls`` is on or the URL
is ``rediss://``, bounded timeouts and the quick retries of ``infra.retry.client_retry``.

Redis Cluster: every script call must name keys of one hash slot. The key layout puts each
user's keys in the slot of ``{<user>}``, an item's in ``{<item>}`` (``infra.keys``);
``SlotCalls`` packs units of work (a user's events, an item's updates) into bounded script
calls, one slot per call when asked to. Cluster pipelines refuse ``evalsha()`` (redis-py
blocks the method), so scripts are sent as ``execute_command("EVALSHA", ...)`` (``evalsha``):
the same command on a standalone Redis, routed by its keys' slot on a cluster.

Secrets: ``redact`` masks a URL's password; ``scrub`` masks the configured secrets in any text
(an error message) before it is shown or logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.crc import key_slot

from streamrec.infra.retry import client_retry
from streamrec.infra.settings import RedisSettings
from streamrec.models.errors import ConfigError

Client = redis.Redis | RedisCluster

# What a server says when it refuses the credentials (or wants some): redis-py raises
# AuthenticationError for these, but a wrapped or older error may only carry the text.
AUTH_MARKERS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password")


def redact(url: str) -> str:
    """``url`` with its password (user info or ``password=`` query value) masked as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable Redis URL>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def secrets_of(rs: RedisSettings) -> list[str]:
    """The secrets ``rs`` carries (its password and the URL's), as written and decoded."""
    out = {rs.password.get_secret_value()}
    try:
        opts = parse_url(rs.url)
    except ValueError:
        opts = {}
    try:
        raw = urlsplit(rs.url).password
    except ValueError:
        raw = None
    for value in (opts.get("password"), raw, unquote(raw) if raw else None, quote(raw) if raw else None):
        if value:
            out.add(str(value))
    return sorted((s for s in out if s), key=len, reverse=True)


def scrub(text: str, rs: RedisSettings) -> str:
    """``text`` with every secret of ``rs`` masked (error messages are shown and logged)."""
    for secret in secrets_of(rs):
        text = text.replace(secret, "***")
    return text


def auth_failed(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps) is Redis refusing the credentials."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)):
            return True
        if any(m.lower() in str(exc).lower() for m in AUTH_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def connect(rs: RedisSettings, **overrides: Any) -> Client:
    """A client for ``rs``: ``redis.Redis``, or ``RedisCluster`` when ``rs.cluster``.

    The settings' username and password override the URL's; TLS (``rs.tls`` or ``rediss://``)
    passes the CA bundle, client certificate and key and the host-name check. Calls never
    block forever (connect 5 s, reply 30 s) and a blip is retried by the client
    (``client_retry``); ``overrides`` (any keyword of the client class) win over all of it.

    A standalone client connects on first use; a cluster client reads the cluster's layout
    at once: an unreachable cluster raises ``redis.exceptions.ConnectionError`` here (a
    refused login ``AuthenticationError``), never with a secret in the message."""
    try:
        opts = parse_url(rs.url)
    except ValueError as exc:
        raise ConfigError(f"STREAMREC_REDIS__URL: {exc} (got {redact(rs.url)})") from None
    scheme = rs.url.split(":", 1)[0].lower()
    opts.pop("connection_class", None)
    if rs.username:
        opts["username"] = rs.username
    if rs.password.get_secret_value():
        opts["password"] = rs.password.get_secret_value()
    kwargs: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30, "retry": client_retry()}
    if rs.tls or scheme == "rediss":
        if scheme == "unix":
            raise ConfigError("STREAMREC_REDIS__TLS: a unix:// socket does not take TLS")
        kwargs.update(ssl=True, ssl_ca_certs=rs.ssl_ca_certs or None, ssl_certfile=rs.ssl_certfile or None,
                      ssl_keyfile=rs.ssl_keyfile or None, ssl_check_hostname=rs.ssl_check_hostname)
    if not rs.cluster:
        kwargs["health_check_interval"] = 30
        if "path" in opts:
            opts["unix_socket_path"] = opts.pop("path")
        return redis.Redis(**{**kwargs, **opts, **overrides})
    if scheme == "unix":
        raise ConfigError("STREAMREC_REDIS__CLUSTER: a Redis Cluster is reached over TCP (redis:// or rediss://), "
                          f"not {redact(rs.url)}")
    if int(opts.pop("db", 0) or 0) != 0:
        raise ConfigError(f"STREAMREC_REDIS__URL: a Redis Cluster has only database 0 (got {redact(rs.url)})")
    try:
        return RedisCluster(**{**kwargs, **opts, **overrides})
    except redis.exceptions.RedisClusterException as exc:
        cause = exc.__cause__
        detail = scrub(" ".join(str(cause or exc).split()) or type(exc).__name__, rs)
        if auth_failed(cause):
            raise redis.exceptions.AuthenticationError(f"Redis Cluster at {redact(rs.url)}: {detail}") from None
        raise redis.exceptions.ConnectionError(
            f"Redis Cluster at {redact(rs.url)} cannot be reached: {detail}") from None


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def info_total(client: Client, section: str, name: str) -> float:
    """``INFO <section>`` field ``name``, summed over the primaries on a cluster (a standalone
    server's own value otherwise). 0 where absent."""
    if is_cluster(client):
        info = client.info(section, target_nodes=RedisCluster.PRIMARIES)
        nodes = list(info.values()) if info and all(isinstance(v, dict) for v in info.values()) else [info]
    else:
        nodes = [client.info(section)]
    return sum(float(node.get(name, 0) or 0) for node in nodes)


def used_memory(client: Client) -> int:
    """Bytes Redis holds (``INFO memory`` used_memory; summed over a cluster's primaries)."""
    return int(info_total(client, "memory", "used_memory"))


def slot_of(key: str) -> int:
    """The Redis Cluster hash slot of a key (its ``{tag}`` when it has one)."""
    return key_slot(key.encode())


def evalsha(pipe: Any, sha: str, keys: Sequence[str], args: Iterable[Any]) -> Any:
    """Queue a script call on a pipeline (standalone or cluster: see the module's docstring)."""
    return pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)


@dataclass
class Call:
    """One script call: its keys, its arguments (the header first), what it carries (``members``:
    whatever the caller maps the reply back to) and its cost so far."""

    keys: list[str]
    args: list[Any]
    members: list[Any] = field(default_factory=list)
    cost: int = 0


class SlotCalls:
    """Units of work (their keys, arguments, cost and members) packed into script calls of
    at most about ``limit`` cost each: a call is closed as soon as its cost reaches ``limit``.

    With ``by_slot`` (Redis Cluster), each hash slot has its own open call, so every call's
    keys lie in one slot; a unit's keys must then share a slot (a user's or an item's do).
    Without it, units go into the calls in the order given, exactly as one open call."""

    def __init__(self, header: Sequence[Any], limit: int, by_slot: bool) -> None:
        self.header = list(header)
        self.limit = limit
        self.by_slot = by_slot
        self._done: list[Call] = []
        self._open: dict[int | None, Call] = {}

    def add(self, keys: Sequence[str], args: Sequence[Any], cost: int, members: Sequence[Any]) -> None:
        slot: int | None = None
        if self.by_slot:
            slot = slot_of(keys[0])
            if any(slot_of(k) != slot for k in keys[1:]):
                raise ValueError(f"one unit's keys lie in several hash slots: {list(keys)[:4]}")
        call = self._open.get(slot)
        if call is None:
            call = self._open[slot] = Call([], list(self.header))
        call.keys += keys
        call.args += args
        call.members += members
        call.cost += cost
        if call.cost >= self.limit:
            self._done.append(self._open.pop(slot))

    def calls(self) -> list[Call]:
        """Every call, the full ones first (in the order they filled), then the open ones."""
        return self._done + [c for c in self._open.values() if c.members or c.keys]


__all__ = ["connect", "redact", "scrub", "secrets_of", "auth_failed", "is_cluster", "used_memory",
           "info_total", "slot_of", "evalsha", "SlotCalls", "Call", "Client", "AUTH_MARKERS"]
