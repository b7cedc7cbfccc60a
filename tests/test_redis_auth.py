"""Redis with a password, an ACL user and TLS: real redis-server processes.

With the right secret (``STREAMREC_REDIS__PASSWORD``, the URL's password, an ACL user's name
and password) the state store works; without it or with a wrong one ``streamrec status``
exits non-zero with one line saying authentication failed, and the secret appears in no
output of ``streamrec status`` either way. TLS: a ``rediss://`` URL or ``redis.tls`` with the
CA bundle connects; without the CA the certificate is refused. ``redact`` masks passwords.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import redis
from pydantic import SecretStr

from streamrec.infra.redisconn import connect, redact, scrub
from streamrec.infra.retry import is_transient
from streamrec.infra.services import ensure_services, redis_answers
from streamrec.infra.settings import RedisSettings, Settings
from streamrec.infra.state import StateStore
from streamrec.models.errors import RedisServiceError
from streamrec.models.session import UserEventRow
from tests.support import wait_for

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(not REDIS_SERVER, reason="needs the redis-server binary")

SECRET = "pw-Zq81-default"  # the default user's password (requirepass)
ALICE, ALICE_SECRET = "alice", "s3cret-xyz"
WRONG = "not-the-pw-7731"
T0 = 1_700_000_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(tmp: Path, args: list[str], ping: dict[str, object]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = open(tmp / f"redis-{port}.log", "wb")
    proc = subprocess.Popen([str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp), *args], stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            return bool(redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, **ping).ping())  # type: ignore[arg-type]
        except redis.RedisError:
            return False
    wait_for(up, 20, f"redis-server on {port}")
    return proc, port


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server with a password for the default user and an ACL user alice."""
    tmp = tmp_path_factory.mktemp("auth")
    proc, port = _start(tmp, ["--requirepass", SECRET,
                              "--user", ALICE, "on", f">{ALICE_SECRET}", "~*", "&*", "+@all"],
                        {"password": SECRET})
    try:
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def rsettings(port: int, **fields: object) -> RedisSettings:
    return RedisSettings(**{"url": f"redis://127.0.0.1:{port}/0", "embedded": False, **fields})  # type: ignore[arg-type]


def works(rs: RedisSettings, base: Settings) -> None:
    """A state store on ``rs`` applies an event and reads it back."""
    s = base.model_copy(update={"redis": rs.model_copy(update={"prefix": f"auth{os.getpid()}"})})
    store = StateStore.from_settings(s)
    try:
        store.registry.ensure()
        ns = store.live()
        store.apply_user_events(ns, [UserEventRow("u1", "c", "e1", "i1", T0, 0, "", "")])
        assert [e.item for e in store.session_view("u1").entries] == ["i1"]
    finally:
        store.drop_everything()


def test_the_right_secret_works_however_it_is_given(secured: int, base_settings: Settings,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    works(rsettings(secured, password=SecretStr(SECRET)), base_settings)
    works(rsettings(secured, url=f"redis://:{SECRET}@127.0.0.1:{secured}/0"), base_settings)
    # the settings' password overrides the URL's
    works(rsettings(secured, url=f"redis://:{WRONG}@127.0.0.1:{secured}/0", password=SecretStr(SECRET)),
          base_settings)
    works(rsettings(secured, username=ALICE, password=SecretStr(ALICE_SECRET)), base_settings)
    works(rsettings(secured, url=f"redis://{ALICE}:{ALICE_SECRET}@127.0.0.1:{secured}/0"), base_settings)
    # from the environment, as every process reads it
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("STREAMREC_REDIS__URL", f"redis://127.0.0.1:{secured}/0")
    monkeypatch.setenv("STREAMREC_REDIS__PASSWORD", SECRET)
    monkeypatch.setenv("STREAMREC_REDIS__EMBEDDED", "false")
    from_env = Settings()
    assert from_env.redis.password.get_secret_value() == SECRET
    assert SECRET not in repr(from_env) and SECRET not in str(from_env.redis)
    works(from_env.redis, base_settings)
    assert redis_answers(from_env.redis)


@pytest.mark.parametrize("given", ["none", "wrong", "wrong-alice"])
def test_a_missing_or_wrong_secret_is_one_clear_error(secured: int, given: str) -> None:
    fields: dict[str, object] = {"none": {}, "wrong": {"password": SecretStr(WRONG)},
                                 "wrong-alice": {"username": ALICE, "password": SecretStr(WRONG)}}[given]  # type: ignore[assignment]
    rs = rsettings(secured, **fields)
    settings = Settings().model_copy(update={"redis": rs})
    with pytest.raises(RedisServiceError) as info:
        ensure_services(settings, start=False, kafka=False)
    message = str(info.value)
    assert "authentication failed" in message and f"127.0.0.1:{secured}" in message
    assert "\n" not in message and WRONG not in message and SECRET not in message
    assert not is_transient(info.value)  # no retry loop waits for a password to change
    # and with the password in the URL: masked
    rs = rsettings(secured, url=f"redis://:{WRONG}@127.0.0.1:{secured}/0")
    with pytest.raises(RedisServiceError) as info:
        ensure_services(Settings().model_copy(update={"redis": rs}), start=False, kafka=False)
    assert WRONG not in str(info.value) and "redis://:***@127.0.0.1" in str(info.value)


def status(port: int, base: Settings, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    return subprocess.run(
        [sys.executable, "-m", "streamrec", "status"], cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**clean, "STREAMREC_REDIS__URL": f"redis://127.0.0.1:{port}/0", "STREAMREC_REDIS__EMBEDDED": "false",
             "STREAMREC_KAFKA__BOOTSTRAP": base.kafka.bootstrap, **env})


@pytest.mark.parametrize("case", ["none", "wrong", "wrong-in-url", "wrong-alice"])
def test_status_without_the_right_secret_fails_in_one_line_without_it(
    secured: int, base_settings: Settings, tmp_path: Path, case: str
) -> None:
    env = {"none": {}, "wrong": {"STREAMREC_REDIS__PASSWORD": WRONG},
           "wrong-in-url": {"STREAMREC_REDIS__URL": f"redis://:{WRONG}@127.0.0.1:{secured}/0"},
           "wrong-alice": {"STREAMREC_REDIS__USERNAME": ALICE, "STREAMREC_REDIS__PASSWORD": WRONG}}[case]
    proc = status(secured, base_settings, tmp_path, **env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("streamrec: error:") and "authentication failed" in lines[0], lines[0]
    assert WRONG not in proc.stdout + proc.stderr and SECRET not in proc.stdout + proc.stderr


@pytest.mark.parametrize("case", ["env", "url", "alice"])
def test_status_with_the_right_secret_shows_no_secret(secured: int, base_settings: Settings,
                                                     tmp_path: Path, case: str) -> None:
    env = {"env": {"STREAMREC_REDIS__PASSWORD": SECRET},
           "url": {"STREAMREC_REDIS__URL": f"redis://:{SECRET}@127.0.0.1:{secured}/0"},
           "alice": {"STREAMREC_REDIS__URL": f"redis://{ALICE}:{ALICE_SECRET}@127.0.0.1:{secured}/0"}}[case]
    proc = status(secured, base_settings, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert '"state"' in proc.stdout
    out = proc.stdout + proc.stderr
    assert SECRET not in out and ALICE_SECRET not in out


def test_redact_and_scrub_mask_passwords() -> None:
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("rediss://alice:p%40ss@h:6380/2") == "rediss://alice:***@h:6380/2"
    assert redact("redis://alice@h/0") == "redis://alice@h/0"
    assert redact("redis://h:1/0?password=pw&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    rs = RedisSettings(url="redis://u:p%40ss@h/0", password=SecretStr("other-secret"))
    assert scrub("x p@ss y p%40ss z other-secret", rs) == "x *** y *** z ***"


def test_connect_passes_credentials_and_tls_settings() -> None:
    rs = RedisSettings(url="redis://urluser:urlpass@h:7000/3", username="bob", password=SecretStr("pw"),
                       tls=True, ssl_ca_certs="/ca.pem", ssl_certfile="/c.pem", ssl_keyfile="/k.pem",
                       ssl_check_hostname=False)
    client = connect(rs)
    kw = client.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["host"], kw["port"], kw["db"]) == ("bob", "pw", "h", 7000, 3)
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert (kw["ssl_ca_certs"], kw["ssl_certfile"], kw["ssl_keyfile"], kw["ssl_check_hostname"]) == (
        "/ca.pem", "/c.pem", "/k.pem", False)
    assert kw["socket_timeout"] == 30 and kw["socket_connect_timeout"] == 5
    plain = connect(RedisSettings(url="redis://:urlpass@h:7000/0"), socket_timeout=1.0)
    kw = plain.connection_pool.connection_kwargs
    assert kw["password"] == "urlpass" and kw["socket_timeout"] == 1.0
    assert plain.connection_pool.connection_class is redis.Connection
    assert connect(RedisSettings(url="rediss://h:7000/0")).connection_pool.connection_class is redis.SSLConnection


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking only TLS, its certificate (for 127.0.0.1) signed by a test CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl binary to make test certificates")
    tmp = tmp_path_factory.mktemp("tls")
    (tmp / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-days", "2", "-subj", "/CN=streamrec-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "san.cnf"],
    ):
        subprocess.run([openssl, *cmd], cwd=tmp, check=True, capture_output=True, timeout=60)
    port = free_port()
    log = open(tmp / "redis.log", "wb")
    proc = subprocess.Popen([str(REDIS_SERVER), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(tmp / "server.crt"), "--tls-key-file", str(tmp / "server.key"),
                             "--tls-ca-cert-file", str(tmp / "ca.crt"), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                pytest.skip(f"this redis-server does not speak TLS: {(tmp / 'redis.log').read_text()[-300:]}")
            try:
                return bool(redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(tmp / "ca.crt"),
                                        socket_connect_timeout=0.5).ping())
            except redis.RedisError:
                return False
        wait_for(up, 20, "TLS redis-server")
        yield port, tmp / "ca.crt"
    finally:
        proc.kill()
        proc.wait(10)


def test_tls_with_the_ca_connects_and_without_it_is_refused(tls_server: tuple[int, Path],
                                                             base_settings: Settings) -> None:
    port, ca = tls_server
    works(rsettings(port, url=f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(ca)), base_settings)
    works(rsettings(port, tls=True, ssl_ca_certs=str(ca)), base_settings)
    assert redis_answers(rsettings(port, tls=True, ssl_ca_certs=str(ca)))
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        connect(rsettings(port, tls=True), retry=None).ping()  # not signed by a CA the system knows
    assert not redis_answers(rsettings(port))  # plain TCP to a TLS port: no answer


@pytest.mark.slow
def test_the_demo_on_a_redis_with_a_password_prints_no_secret(secured: int, base_settings: Settings,
                                                             tmp_path: Path) -> None:
    """The README's demo end to end on the secured Redis (its workers, the replay and the
    trainer are child processes that get the secret through the environment): it succeeds,
    and the secret is in none of its output nor its workers' logs."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    proc = subprocess.run(
        [sys.executable, "-m", "streamrec", "demo", "--clicks", "2000", "--users", "40"], cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
        env={**clean, "STREAMREC_REDIS__URL": f"redis://127.0.0.1:{secured}/0", "STREAMREC_REDIS__EMBEDDED": "false",
             "STREAMREC_REDIS__PASSWORD": SECRET, "STREAMREC_KAFKA__BOOTSTRAP": base_settings.kafka.bootstrap,
             "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"redis  redis://127.0.0.1:{secured}/0" in proc.stdout
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
    assert logs  # the workers' logs were there to search
    assert SECRET not in proc.stdout + proc.stderr + logs


def test_up_prints_a_configured_url_with_its_password_masked(secured: int, base_settings: Settings,
                                                              tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamrec", "up"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**clean, "STREAMREC_REDIS__URL": f"redis://:{SECRET}@127.0.0.1:{secured}/0",
                        "STREAMREC_REDIS__EMBEDDED": "false",
                        "STREAMREC_KAFKA__BOOTSTRAP": base_settings.kafka.bootstrap})
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    text = "".join(lines) + out
    assert f"export STREAMREC_REDIS__URL=redis://:***@127.0.0.1:{secured}/0" in text, text
    assert SECRET not in text
