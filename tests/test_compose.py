"""docker-compose.yml, the Dockerfile and infra/deploy checked without Docker.

No Docker engine runs here, so this is the validation `docker compose config` would do and
then some: the file parses; every streamrec service builds the one image, sets only real
settings (``STREAMREC_<SECTION>__<FIELD>``, infra/settings.py) with values that parse, has
the `streamrec health` healthcheck of its role, and serves metrics on the port Prometheus
scrapes for it; every published port binds localhost; the files mounted exist; Redis cannot
evict state; the Grafana dashboard draws every metric family; the Dockerfile ships every
package folder.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from streamrec.infra.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "infra" / "deploy"

# The streamrec services, by the CLI command each runs and the `streamrec health` role of it.
ROLE_OF_COMMAND = {"worker": "worker", "serve": "serve", "train": "trainer"}
STREAMREC_SERVICES = {"worker", "serve", "trainer"}

# What a published port may bind: localhost, or the variable the compose file documents for
# publishing wider (whose default is localhost).
BIND_VARIABLE = "${PUBLISH_ADDRESS:-127.0.0.1}"
ALLOWED_BINDS = ("127.0.0.1", BIND_VARIABLE)

# The metric families (as scraped) the dashboard must draw: the contract of infra/metrics.py.
METRIC_FAMILIES = (
    "streamrec_events_total", "streamrec_dead_letters_total", "streamrec_refreshes_total",
    "streamrec_refreshes_coalesced_total", "streamrec_refreshes_failed_total", "streamrec_trainings_total",
    "streamrec_consumer_lag_records", "streamrec_model_age_seconds", "streamrec_model_info",
    "streamrec_redis_used_memory_bytes", "streamrec_dirty_users",
    "streamrec_batch_apply_seconds", "streamrec_event_to_state_seconds", "streamrec_event_to_recs_seconds",
    "streamrec_refresh_seconds", "streamrec_training_seconds",
)

_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


# -- helpers ------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (compose allows a mapping or a list of K=V)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def with_defaults(value: str) -> str | None:
    """``value`` as compose resolves it when no variable is set in the shell: ``${X:-d}`` and
    ``${X-d}`` become ``d``, ``${X:+r}`` becomes nothing; None when a variable without a
    default (``${X}``, ``${X:?err}``) leaves it unknown. ``$$`` is a literal ``$``."""
    unknown = False

    def sub(match: re.Match[str]) -> str:
        nonlocal unknown
        op = match.group("op")
        if op in (":-", "-"):
            return match.group("arg")
        if op in (":+", "+"):
            return ""
        unknown = True
        return ""

    resolved = _INTERPOLATION.sub(sub, value.replace("$$", "\0")).replace("\0", "$")
    return None if unknown else resolved


def variables_in(value: str) -> set[str]:
    return {m.group("name") for m in _INTERPOLATION.finditer(value)}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def role_of(name: str, service: dict[str, Any]) -> str:
    command = command_of(service)
    assert command and command[0] in ROLE_OF_COMMAND, (
        f"service {name!r}: command {command} does not start with a streamrec service command "
        f"({', '.join(ROLE_OF_COMMAND)})")
    return ROLE_OF_COMMAND[command[0]]


def dockerfile_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set (KEY=VALUE form, continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for pair in line.strip()[4:].split():
                key, sep, value = pair.partition("=")
                assert sep, f"Dockerfile: use ENV KEY=VALUE, not the legacy form ({line.strip()!r})"
                out[key] = value.strip('"')
    return out


def setting_names() -> dict[str, str]:
    """Every settings environment variable, mapped to its section.field."""
    names = {}
    for section, info in Settings.model_fields.items():
        for field in info.annotation.model_fields:  # type: ignore[union-attr]
            names[f"STREAMREC_{section.upper()}__{field.upper()}"] = f"{section}.{field}"
    return names


def parse_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, where: str) -> Settings:
    """Settings read from exactly ``env`` (as the container's process would read them)."""
    import os

    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("STREAMREC_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        try:
            return Settings(_env_file=None)
        except Exception as exc:  # ConfigError names the variable
            pytest.fail(f"{where}: the settings do not parse: {exc}")


def host_path(spec: str) -> str | None:
    """The host side of a short-syntax bind mount (None for a named volume)."""
    source = spec.split(":", 1)[0]
    return source if source.startswith((".", "/", "~")) else None


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short or long syntax."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            parts = str(volume).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return out


def container_to_host(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository path a bind mount of ``service`` shows at ``container_path``."""
    for source, target in mounts(service):
        if not source.startswith("."):
            continue
        target = target.rstrip("/")
        if container_path == target or container_path.startswith(target + "/"):
            return (ROOT / source / container_path[len(target):].lstrip("/")).resolve()
    return None


def duration_s(value: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"not a compose duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def prometheus_config() -> dict[str, Any]:
    (source,) = [s for s, t in mounts(services()["prometheus"]) if t == "/etc/prometheus/prometheus.yml"]
    return yaml.safe_load((ROOT / source).read_text())


def grafana_provisioning(kind: str) -> list[dict[str, Any]]:
    """The parsed provisioning files of one kind (datasources, dashboards) Grafana loads."""
    grafana = services()["grafana"]
    folder = container_to_host(grafana, f"/etc/grafana/provisioning/{kind}")
    assert folder is not None and folder.is_dir(), (
        f"grafana: nothing from the repository is mounted at /etc/grafana/provisioning/{kind}")
    files = sorted(folder.glob("*.yml")) + sorted(folder.glob("*.yaml"))
    assert files, f"grafana: no provisioning file in {folder.relative_to(ROOT)}"
    return [yaml.safe_load(f.read_text()) for f in files]


def dashboards() -> dict[str, dict[str, Any]]:
    """The dashboards Grafana's file providers load, by repository path."""
    grafana = services()["grafana"]
    found = {}
    for config in grafana_provisioning("dashboards"):
        for provider in config["providers"]:
            folder = container_to_host(grafana, provider["options"]["path"])
            assert folder is not None and folder.is_dir(), (
                f"grafana: dashboard provider {provider['name']!r} reads {provider['options']['path']}, "
                f"where no repository folder is mounted")
            for path in sorted(folder.rglob("*.json")):
                try:
                    found[str(path.relative_to(ROOT))] = json.loads(path.read_text())
                except json.JSONDecodeError as exc:
                    pytest.fail(f"{path.relative_to(ROOT)}: not valid JSON: {exc}")
    assert found, "grafana: the dashboard providers find no dashboard JSON"
    return found


# -- the compose file -------------------------------------------------------------------------

def test_the_compose_file_parses_and_has_the_services() -> None:
    names = set(services())
    missing = (STREAMREC_SERVICES | {"kafka", "redis", "prometheus", "grafana"}) - names
    assert not missing, f"docker-compose.yml lacks the services {sorted(missing)}"


def test_every_streamrec_service_builds_the_one_image() -> None:
    runs_streamrec = {name for name, s in services().items()
                      if name in STREAMREC_SERVICES or any(k.startswith("STREAMREC_") for k in environment(s))}
    assert runs_streamrec == STREAMREC_SERVICES, (
        f"services that run streamrec: {sorted(runs_streamrec)}; expected {sorted(STREAMREC_SERVICES)}")
    images = {}
    for name in sorted(runs_streamrec):
        service = services()[name]
        assert "build" in service, f"service {name!r} has no `build:` (it would pull its image instead)"
        images[name] = service.get("image")
    assert len(set(images.values())) == 1 and None not in images.values(), (
        f"the streamrec services must build one image under one name; `image:` is {images}")


def test_the_build_context_and_dockerfile_exist() -> None:
    for name, service in services().items():
        if "build" not in service:
            continue
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert context.is_dir(), f"service {name!r}: build context {context} does not exist"
        assert (context / dockerfile).is_file(), f"service {name!r}: {context / dockerfile} does not exist"


def test_every_mounted_file_exists_and_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for source, target in mounts(service):
            if not source:
                continue  # an anonymous volume
            path = host_path(source)
            if path is None:
                assert source in declared, f"service {name!r}: volume {source!r} is not declared under `volumes:`"
            else:
                assert (ROOT / path).exists(), f"service {name!r}: {path} (mounted at {target}) does not exist"


def test_only_real_settings_are_set() -> None:
    """pydantic-settings ignores an unknown STREAMREC_* variable (extra="ignore"), so a typo in
    compose or the Dockerfile would silently leave the default: every name must be a setting."""
    known = setting_names()
    sources = {f"service {n!r}": environment(s) for n, s in services().items()}
    sources["the Dockerfile"] = dockerfile_env()
    for where, env in sources.items():
        for key in env:
            if key.startswith("STREAMREC_"):
                assert key in known, (
                    f"{where}: {key} is not a setting (STREAMREC_<SECTION>__<FIELD> of infra/settings.py)")


def test_every_streamrec_service_environment_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Dockerfile's ENV under each service's environment, with compose's defaults for the
    ``${VAR:-default}`` interpolations, is what each container reads: it must be valid."""
    base = {k: v for k, v in dockerfile_env().items() if k.startswith("STREAMREC_")}
    for name in sorted(STREAMREC_SERVICES):
        env = dict(base)
        for key, value in environment(services()[name]).items():
            resolved = with_defaults(value)
            if key.startswith("STREAMREC_") and resolved is not None:
                env[key] = resolved
        settings = parse_settings(env, monkeypatch, f"service {name!r}")
        assert settings.redis.embedded is False, (
            f"service {name!r}: STREAMREC_REDIS__EMBEDDED must be false in a container")
        assert settings.kafka.bootstrap, f"service {name!r}: STREAMREC_KAFKA__BOOTSTRAP is not set"


def test_published_ports_bind_localhost() -> None:
    for name, service in services().items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                bind = str(port.get("host_ip", ""))
            else:
                parts = str(port).rsplit(":", 2)
                bind = parts[0] if len(parts) == 3 else ""
            assert bind in ALLOWED_BINDS, (
                f"service {name!r}: port {port!r} binds {bind or 'every interface'}; bind 127.0.0.1 "
                f"or {BIND_VARIABLE}")


def test_every_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"service {name!r} has no healthcheck"


def test_streamrec_healthchecks_ask_streamrec_health_for_their_role() -> None:
    for name in sorted(STREAMREC_SERVICES):
        service = services()[name]
        role = role_of(name, service)
        check = service["healthcheck"]
        expected = ["CMD", "streamrec", "health", "--role", role, "--here"]
        assert check["test"] == expected, f"service {name!r}: healthcheck is {check['test']}, expected {expected}"
        assert duration_s(check.get("start_period", "0s")) >= 60, (
            f"service {name!r}: start_period {check.get('start_period')} is too short for the imports (torch)")


def test_depends_on_names_existing_services() -> None:
    names = set(services())
    for name, service in services().items():
        depends = service.get("depends_on") or []
        for other in depends:
            assert other in names, f"service {name!r} depends on {other!r}, which is not a service"


def test_redis_cannot_evict_state_and_keeps_it_on_disk() -> None:
    redis = services()["redis"]
    command = command_of(redis)
    assert command[:1] == ["redis-server"], f"redis: command {command} does not run redis-server"

    def option(name: str) -> str:
        assert f"--{name}" in command, f"redis: the command has no --{name}"
        return command[command.index(f"--{name}") + 1]

    maxmemory = with_defaults(option("maxmemory"))
    assert maxmemory and re.fullmatch(r"\d+(b|k|kb|m|mb|g|gb)?", maxmemory.lower()), (
        f"redis: --maxmemory {option('maxmemory')!r} is not a memory size")
    assert option("maxmemory-policy") == "noeviction", (
        f"redis: --maxmemory-policy {option('maxmemory-policy')!r}: streamrec's state must never be "
        f"evicted silently (noeviction: writes fail loudly when full)")
    assert option("appendonly") == "yes", "redis: --appendonly must be yes"


def test_the_redis_password_reaches_every_client() -> None:
    """One variable for --requirepass, the streamrec services and the healthcheck."""
    redis = services()["redis"]
    command = command_of(redis)
    if "--requirepass" not in command:
        return
    (variable,) = variables_in(command[command.index("--requirepass") + 1])
    assert variables_in(environment(redis).get("REDISCLI_AUTH", "")) == {variable}, (
        f"redis: the healthcheck's REDISCLI_AUTH must come from ${{{variable}}}")
    for name in sorted(STREAMREC_SERVICES):
        value = environment(services()[name]).get("STREAMREC_REDIS__PASSWORD", "")
        assert variables_in(value) == {variable}, (
            f"service {name!r}: STREAMREC_REDIS__PASSWORD must come from ${{{variable}}} (got {value!r})")


def test_third_party_images_are_pinned() -> None:
    for name, service in services().items():
        if "build" in service or name in STREAMREC_SERVICES:
            continue  # built here
        image = str(service.get("image", ""))
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"service {name!r}: image {image!r} is not pinned to a version"


# -- metrics: Prometheus and Grafana ------------------------------------------------------------

def test_prometheus_scrapes_every_replica_on_each_services_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    config = prometheus_config()
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)), f"prometheus.yml: duplicate job names in {jobs}"
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs") or []:
            assert sd.get("type") == "A", f"prometheus.yml job {job['job_name']!r}: dns_sd type must be A"
            for service in sd["names"]:
                scraped[service] = int(sd["port"])
    base = dockerfile_env()
    for name in sorted(STREAMREC_SERVICES):
        assert name in scraped, (
            f"prometheus.yml: no dns_sd_configs (type A) job scrapes service {name!r} (every replica)")
        env = {**base, **environment(services()[name])}
        port = with_defaults(env.get("STREAMREC_METRICS__PORT", "0"))
        assert port not in (None, "", "0"), f"service {name!r}: STREAMREC_METRICS__PORT is not set (metrics off)"
        assert int(port) == scraped[name], (
            f"service {name!r} serves metrics on {port}, but prometheus.yml scrapes it on {scraped[name]}")
        assert env.get("STREAMREC_METRICS__HOST") == "0.0.0.0", (
            f"service {name!r}: STREAMREC_METRICS__HOST must be 0.0.0.0 (Prometheus scrapes it over the network)")
        assert not any(str(p).endswith(f":{port}") for p in services()[name].get("ports") or []), (
            f"service {name!r}: the metrics port {port} must not be published (scaled replicas would collide)")


def test_grafanas_datasource_is_the_compose_prometheus() -> None:
    (datasource,) = [d for config in grafana_provisioning("datasources") for d in config["datasources"]]
    assert datasource["type"] == "prometheus" and datasource.get("uid"), (
        f"grafana: the provisioned datasource must be a prometheus one with a uid, got {datasource}")
    assert datasource["url"] == "http://prometheus:9090", (
        f"grafana: the datasource url {datasource['url']!r} is not the prometheus service")


def test_the_dashboard_is_valid_and_uses_the_provisioned_datasource() -> None:
    (datasource,) = [d for config in grafana_provisioning("datasources") for d in config["datasources"]]
    for path, dashboard in dashboards().items():
        for key in ("uid", "title", "schemaVersion", "panels"):
            assert dashboard.get(key), f"{path}: no {key!r}"
        ids = [p.get("id") for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path}: panel ids repeat: {ids}"
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard["panels"]:
            where = f"{path}: panel {panel.get('title')!r}"
            grid = panel.get("gridPos") or {}
            assert all(isinstance(grid.get(k), int) for k in "xywh"), f"{where}: gridPos {grid} lacks x, y, w, h"
            assert grid["x"] + grid["w"] <= 24, f"{where}: gridPos {grid} is wider than the 24 columns"
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{where} overlaps panel {cells[(x, y)]!r}"
                    cells[(x, y)] = panel.get("title", "")
            assert panel.get("targets"), f"{where}: no queries"
            for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel["targets"]]:
                assert ref and ref.get("uid") == datasource["uid"], (
                    f"{where}: datasource {ref} is not the provisioned one (uid {datasource['uid']!r})")
            for target in panel["targets"]:
                assert target.get("expr"), f"{where}: a query without a PromQL expression"
                assert target["expr"].count("(") == target["expr"].count(")"), (
                    f"{where}: unbalanced parentheses in {target['expr']!r}")


def test_the_dashboard_draws_every_metric_family() -> None:
    from streamrec.infra import metrics

    families = set(METRIC_FAMILIES) | set(getattr(metrics, "FAMILIES", ()))
    drawn: set[str] = set()
    for dashboard in dashboards().values():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                for name in re.findall(r"\bstreamrec_[a-z0-9_]+", target["expr"]):
                    drawn.add(name)
                    drawn.add(re.sub(r"_(bucket|sum|count)$", "", name))
    missing = sorted(families - drawn)
    assert not missing, f"no dashboard panel queries {missing}"
    unknown = sorted(n for n in drawn - families if not re.sub(r"_(bucket|sum|count)$", "", n) in families)
    assert not unknown, f"the dashboard queries series streamrec does not export: {unknown}"


# -- the Dockerfile ------------------------------------------------------------------------------

def _copied_sources() -> list[str]:
    out = []
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"]:
            out += [p for p in parts[1:-1] if not p.startswith("--")]
    return out


def _dockerignored(relative: str) -> bool:
    """Whether .dockerignore keeps ``relative`` (or a folder above it) out of the build context
    (patterns as Docker reads them, close enough: no ``!`` exceptions are used)."""
    ignore = ROOT / ".dockerignore"
    patterns = [p.strip().rstrip("/") for p in ignore.read_text().splitlines()
                if p.strip() and not p.startswith("#")] if ignore.exists() else []
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatchcase(prefix, pattern)
               for pattern in patterns if not pattern.startswith("!") for prefix in prefixes)


def test_the_dockerfile_copies_every_package_folder_and_the_lua_scripts() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = [s.rstrip("/") for s in _copied_sources()]

    def copied_in(folder: str) -> bool:
        return any(folder == c or folder.startswith(c + "/") or c == "." for c in copied)

    for folder in sorted(folders):
        assert copied_in(folder), f"Dockerfile: no COPY brings the package folder {folder}/ into the image"
        for module in (ROOT / folder).glob("*.py"):
            rel = module.relative_to(ROOT).as_posix()
            assert not _dockerignored(rel), f".dockerignore keeps {rel} out of the image"
    data = pyproject["tool"]["setuptools"]["package-data"]
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    for package, globs in data.items():
        for pattern in globs:
            files = list((ROOT / package_dir[package]).glob(pattern))
            if package == "streamrec.infra":
                assert files, f"package data {package_dir[package]}/{pattern} matches no file"
            for path in files:
                rel = path.relative_to(ROOT).as_posix()
                assert copied_in(rel), f"Dockerfile: no COPY brings the package data {rel} into the image"
                assert not _dockerignored(rel), f".dockerignore keeps the package data {rel} out of the image"
    for name in ("pyproject.toml", "README.md"):  # the build reads both (readme = "README.md")
        assert name in copied, f"Dockerfile: {name} is not copied, the package cannot be built"


def test_the_image_runs_the_streamrec_cli() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["streamrec"\]', text, re.M), 'Dockerfile: ENTRYPOINT must be ["streamrec"]'
    for name in sorted(STREAMREC_SERVICES):
        role_of(name, services()[name])  # each command is a streamrec subcommand
