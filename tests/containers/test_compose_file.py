"""docker-compose.yml cannot drift from the code unnoticed.

The file must satisfy the Compose specification's JSON schema; every mailbus
service must run a real `mailbus` subcommand, set only MAILBUS_* variables
its settings class reads, publish and expose the ports those settings use,
and carry no secret inline. Nothing here needs a container engine.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from jsonschema import Draft201909Validator
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from mailbus.cli import app
from mailbus.confirm.projector import ProjectorSettings
from mailbus.confirm.settings import ConfirmSettings
from mailbus.hooks.settings import HooksSettings
from mailbus.ingest.settings import IngestSettings
from mailbus.replies.settings import RepliesSettings
from mailbus.sender.settings import SenderSettings
from mailbus.settings import ServiceSettings
from mailbus.webhooks.settings import WebhooksSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = Path(__file__).with_name("compose-spec.json")

SETTINGS: dict[str, type[ServiceSettings]] = {
    "ingest": IngestSettings, "sender": SenderSettings, "confirm": ConfirmSettings,
    "projector": ProjectorSettings, "hooks": HooksSettings, "replies": RepliesSettings,
    "webhooks": WebhooksSettings,
}
# Read by `mailbus setup db` straight from the environment (cli.py), not by a settings class.
CLI_VARIABLES = {"MAILBUS_PG_SUPERUSER", "MAILBUS_PG_SUPERUSER_PASSWORD_FILE"}
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE", re.I)


# `${NAME:-default}`: the only interpolation the file uses (host ports, the image).
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")
# The host ports a user may change, and their defaults (the file's header lists them).
PORT_DEFAULTS = {"MAILBUS_API_PORT": "8080", "MAILBUS_HOOKS_PORT": "8081",
                 "MAILBUS_MAILPIT_PORT": "8025", "MAILBUS_PROMETHEUS_PORT": "9090",
                 "MAILBUS_GRAFANA_PORT": "3000", "MAILBUS_KAFKA_EXTERNAL_PORT": "9094"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as compose reads it with none of its variables set."""
    return yaml.safe_load(INTERPOLATION.sub(lambda m: m.group(2), COMPOSE.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def mailbus_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run a mailbus service from the project's image."""
    return {name: s for name, s in services.items()
            if s.get("command", [None])[:1] == ["mailbus"]}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def env_names(settings: type[BaseSettings]) -> set[str]:
    """Every variable a settings class reads: MAILBUS_FIELD and MAILBUS_MODEL__FIELD."""
    names = set()
    for field, info in settings.model_fields.items():
        names.add(f"MAILBUS_{field.upper()}")
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names |= {f"MAILBUS_{field.upper()}__{sub.upper()}" for sub in nested.model_fields}
    return names


def settings_from(settings: type[ServiceSettings], env: dict[str, str],
                  monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The settings object the service would build from this environment."""
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("MAILBUS_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return settings()


def test_the_file_satisfies_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(Draft201909Validator(schema).iter_errors(compose), key=str)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_every_pipeline_service_is_in_the_file(services: dict[str, dict[str, Any]]) -> None:
    assert set(mailbus_services(services)) == set(SETTINGS)
    assert {"kafka", "postgres", "prometheus", "grafana", "mailpit", "init"} <= set(services)


def test_each_command_is_a_mailbus_subcommand(services: dict[str, dict[str, Any]]) -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name, service in mailbus_services(services).items():
        assert service["command"][1] in commands, (name, service["command"])
        assert service["command"][1] == name  # the service is named after what it runs


def test_each_variable_is_read_by_the_service_settings(services: dict[str, dict[str, Any]]
                                                       ) -> None:
    for name, service in mailbus_services(services).items():
        unknown = {k for k in environment(service) if k.startswith("MAILBUS_")} - env_names(
            SETTINGS[name])
        assert not unknown, (name, unknown)
    init_vars = {k for k in environment(services["init"]) if k.startswith("MAILBUS_")}
    assert not init_vars - env_names(ServiceSettings) - CLI_VARIABLES


def test_every_service_builds_its_settings_from_the_file(
        services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in mailbus_services(services).items():
        s = settings_from(SETTINGS[name], environment(service), monkeypatch)
        assert s.kafka.bootstrap_servers == "kafka:9092"
        assert (s.postgres.host, s.postgres.port) == ("postgres", 5432)
        assert s.accounts_file == Path("/etc/mailbus/accounts.toml")


def test_ports_agree_with_the_settings(services: dict[str, dict[str, Any]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    prometheus = yaml.safe_load((REPO / "deploy/compose/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0]
               for job in prometheus["scrape_configs"]}
    for name, service in mailbus_services(services).items():
        s = settings_from(SETTINGS[name], environment(service), monkeypatch)
        # What Prometheus scrapes is where the service serves its metrics.
        metrics_port = s.port if isinstance(s, IngestSettings) else s.metrics_port  # type: ignore[attr-defined]
        assert targets[name] == f"{name}:{metrics_port}"
        # A published port is one the service listens on.
        for published in service.get("ports", []):
            container_port = int(str(published).rsplit(":", 1)[1])
            assert container_port == s.port, (name, published)  # type: ignore[attr-defined]
    assert set(targets) == set(SETTINGS)


def test_the_image_healthcheck_knows_each_service_default_port(monkeypatch) -> None:
    sys.path.insert(0, str(REPO / "deploy" / "compose"))
    try:
        import healthcheck
    finally:
        sys.path.remove(str(REPO / "deploy" / "compose"))
    for name, settings in SETTINGS.items():
        s = settings_from(settings, {}, monkeypatch)
        variable, default, _ = healthcheck.SERVICES[name]
        port = s.port if name == "ingest" else s.metrics_port  # type: ignore[attr-defined]
        assert default == port, name
        assert variable in env_names(settings), name


def test_no_secret_is_inline(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_WORDS.search(key):
                assert key.endswith("_FILE") and value.startswith("/"), (name, key)
    text = COMPOSE.read_text()
    assert not re.search(r"mbk_|BEGIN [A-Z ]*PRIVATE KEY", text)


def test_mounted_project_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), (name, source)


def test_start_up_order_is_by_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            condition = spec["condition"]
            target = services[dependency]
            if condition == "service_healthy":
                # Our image carries a HEALTHCHECK; third-party services declare one here.
                assert "healthcheck" in target and not target["healthcheck"].get("disable"), (
                    name, dependency)
            if condition == "service_completed_successfully":
                assert dependency in {"secrets", "init", "handout"}, (name, dependency)
    for name in mailbus_services(services):
        assert services[name]["depends_on"]["handout"]["condition"] == (
            "service_completed_successfully")
    assert set(services["init"]["depends_on"]) == {"kafka", "postgres"}
    assert set(services["handout"]["depends_on"]) == {"init"}


# Which container may see which secret. Each file is named the way the code
# names it: kafka-<principal>.password and postgres-<role>.password
# (mailbus/settings.py), link-keys.json (the services' link_keys_file).
SECRETS_MOUNT = "/var/lib/mailbus/secrets"
# The services that open a database connection; confirm (Faust) keeps its
# state in Kafka and hooks answers from signed links alone.
USES_POSTGRES = {"ingest", "sender", "projector", "replies", "webhooks"}
# Files no running service may hold: the database owner and superuser, the
# operator's role, the broker's admin and controller, the development API key.
NEVER_HANDED_OUT = re.compile(
    r"owner|superuser|mailbus_admin|kafka-admin|controller|api-key|grafana", re.I)


def handout(services: dict[str, dict[str, Any]]) -> dict[str, tuple[int, set[str]]]:
    """The handout step's list: container -> (uid the files belong to, file names)."""
    command = services["handout"]["command"]
    assert command[:2] == ["python", "/etc/mailbus/compose/handout.py"]
    out = {}
    for arg in command[2:]:
        name, uid, files = arg.split(":")
        out[name] = (int(uid), set(files.split(",")))
    return out


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Named volumes a service mounts: volume -> (container path, read-only)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = str(volume).split(":")
        if not source.startswith(("/", ".", "~")):
            out[source] = (target, mode == ["ro"])
    return out


def test_each_service_gets_exactly_the_secrets_its_settings_read(
        services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    given = handout(services)
    assert set(given) == set(mailbus_services(services)) | {"grafana"}
    # The settings classes say the same (their production check skips the database).
    assert {n for n, cls in SETTINGS.items() if cls.uses_postgres} == USES_POSTGRES
    # The image sets where state (and so the secrets folder) lives.
    var_dir = re.search(r"MAILBUS_VAR_DIR=(\S+)", (REPO / "Dockerfile").read_text())
    assert var_dir is not None
    for name, service in mailbus_services(services).items():
        env = {"MAILBUS_VAR_DIR": var_dir.group(1), **environment(service)}
        s = settings_from(SETTINGS[name], env, monkeypatch)
        wanted = {s.kafka.password_file}
        if name in USES_POSTGRES:
            wanted.add(s.postgres.password_file)
        if hasattr(s, "link_keys_file"):
            wanted.add(s.link_keys_file)
        # Each is read where the service's own volume is mounted.
        assert {p.parent for p in wanted if p is not None} == {Path(SECRETS_MOUNT)}, name
        uid, files = given[name]
        assert (uid, files) == (10001, {p.name for p in wanted if p is not None}), name
        assert not {f for f in files if NEVER_HANDED_OUT.search(f)}, name
    assert given["grafana"] == (472, {"grafana-admin.password"})


def test_each_service_starts_in_production_with_only_its_own_volume(
        services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    # The production start-up check reads every secret the service needs:
    # with nothing but the files handed out to it, it must pass.
    for name, (_, files) in handout(services).items():
        if name not in SETTINGS:
            continue
        var_dir = tmp_path / name
        (var_dir / "secrets").mkdir(parents=True)
        for file in files:
            (var_dir / "secrets" / file).write_text(f"{name}-{file}-not-a-placeholder")
        # Production also insists on TLS to both servers; that is not what this checks.
        env = {**environment(services[name]), "MAILBUS_VAR_DIR": str(var_dir),
               "MAILBUS_ENV": "production", "MAILBUS_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
               "MAILBUS_POSTGRES__SSLMODE": "verify-full"}
        settings_from(SETTINGS[name], env, monkeypatch).check_secrets()


def test_the_public_hooks_service_holds_no_database_or_admin_secret(
        services: dict[str, dict[str, Any]]) -> None:
    # Written out, whatever the rules above derive: hooks faces the internet.
    _, files = handout(services)["hooks"]
    assert files == {"kafka-hooks.password", "link-keys.json"}
    assert volume_mounts(services["hooks"]) == {
        "secrets-hooks": (SECRETS_MOUNT, True)}
    assert not any("credentials" in str(v) for v in services["hooks"]["volumes"])


def test_each_container_mounts_only_its_own_credentials(
        services: dict[str, dict[str, Any]]) -> None:
    own = {f"secrets-{name}" for name in handout(services)}
    # Who may mount the shared volumes (and how): the bootstrap volume is for
    # the bootstrap step, the broker, the database and the two steps after;
    # what init provisions only init writes and handout reads.
    shared = {
        "secrets": {"secrets": False, "kafka": True, "postgres": True, "init": False,
                    "handout": True},
        "provisioned": {"init": False, "handout": True},
    }
    for name, service in services.items():
        for volume, (target, read_only) in volume_mounts(service).items():
            if volume in shared:
                assert shared[volume].get(name) == read_only, (name, volume)
            elif volume in own:
                if name == "handout":
                    assert target == f"/run/mailbus/handout/{volume.removeprefix('secrets-')}"
                else:
                    # Only its own container, read-only.
                    assert volume == f"secrets-{name}" and read_only, (name, volume)
            else:
                assert volume.endswith("-data"), (name, volume)  # state, not secrets
    for name in mailbus_services(services):
        assert volume_mounts(services[name]) == {f"secrets-{name}": (SECRETS_MOUNT, True)}
    # Gmail tokens: only the sender (sends) and the mailbox reader (reads) use them.
    gmail = {name for name, service in services.items()
             if any(str(v).startswith("~/.credentialsEmail") for v in service.get("volumes", []))}
    assert gmail == {"sender", "replies"}
    assert set(volume_mounts(services["handout"])) == own | {"secrets", "provisioned"}


def test_handout_leaves_exactly_the_listed_files(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(REPO / "deploy" / "compose"))
    try:
        import handout as step
    finally:
        sys.path.remove(str(REPO / "deploy" / "compose"))
    provisioned, bootstrap, out = (tmp_path / d for d in ("provisioned", "bootstrap", "out"))
    for folder in (provisioned, bootstrap, out / "hooks"):
        folder.mkdir(parents=True)
    (provisioned / "kafka-hooks.password").write_text("k")
    (provisioned / "postgres-mailbus_owner.password").write_text("owner")
    (bootstrap / "link-keys.json").write_text("{}")
    # A credential handed out by an earlier version of the list.
    (out / "hooks" / "postgres-mailbus_hooks.password").write_text("old")
    monkeypatch.setattr(step, "SOURCES", (provisioned, bootstrap))
    monkeypatch.setattr(step, "HANDOUT", out)
    # Giving files to one's own uid needs no privilege, so this runs unprivileged.
    step.main([f"hooks:{os.getuid()}:kafka-hooks.password,link-keys.json"])
    files = {p.name: p.stat().st_mode & 0o777 for p in (out / "hooks").iterdir()}
    assert files == {"kafka-hooks.password": 0o400, "link-keys.json": 0o400}
    assert (out / "hooks" / "link-keys.json").read_text() == "{}"
    assert (out / "hooks").stat().st_mode & 0o777 == 0o500
    (out / "hooks").chmod(0o700)  # let tmp_path be cleaned up
    with pytest.raises(SystemExit, match="not provisioned"):
        step.main([f"hooks:{os.getuid()}:postgres-mailbus_hooks.password"])


def test_every_variable_is_a_documented_host_port_with_its_default() -> None:
    text = COMPOSE.read_text()
    used = INTERPOLATION.findall(text)
    # Besides the ports: which image the mailbus services run.
    defaults = {**PORT_DEFAULTS, "MAILBUS_IMAGE": "mailbus:latest"}
    assert {name for name, _ in used} == set(defaults)
    assert all(defaults[name] == default for name, default in used)
    # No other `$` form (a bare $NAME, or ${NAME} without a default).
    assert text.count("$") == len(used)
    header = text.split("\n\n", 1)[0]
    for name, default in PORT_DEFAULTS.items():
        assert f"{name} {default}" in header, name


def test_what_links_and_the_broker_advertise_follows_the_published_ports() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    # A host port moved away from its default moves the links in mail with it...
    assert environment(services["sender"])["MAILBUS_HOOKS_BASE_URL"] == (
        "http://localhost:${MAILBUS_HOOKS_PORT:-8081}")
    assert services["hooks"]["ports"] == ["127.0.0.1:${MAILBUS_HOOKS_PORT:-8081}:8081"]
    # ... and what the broker's EXTERNAL listener advertises to tools on the host.
    assert services["kafka"]["ports"] == ["127.0.0.1:${MAILBUS_KAFKA_EXTERNAL_PORT:-9094}:9094"]
    assert environment(services["kafka"])["MAILBUS_KAFKA_EXTERNAL_PORT"] == (
        "${MAILBUS_KAFKA_EXTERNAL_PORT:-9094}")
    template = (REPO / "deploy/compose/kafka/server.properties.in").read_text()
    assert "EXTERNAL://localhost:@EXTERNAL_PORT@" in template
    assert "@EXTERNAL_PORT@/$external_port" in (REPO / "deploy/compose/kafka/start.sh").read_text()


def test_no_compose_step_shadows_a_standard_module() -> None:
    # `python /etc/mailbus/compose/NAME.py` puts that folder first on sys.path:
    # a step named like a standard module (secrets.py) imports itself instead.
    for script in (REPO / "deploy" / "compose").glob("*.py"):
        assert script.stem not in sys.stdlib_module_names, script.name


def test_every_third_party_image_but_grafana_has_a_local_stand_in(
        services: dict[str, dict[str, Any]]) -> None:
    podman_sh = (REPO / "scripts" / "podman.sh").read_text()
    tags = dict(re.findall(r"\[(\w+)\]=(\S+)", podman_sh.split("declare -A STANDIN_TAGS", 1)[1]
                                                   .split(")", 1)[0]))
    images = {name: s["image"] for name, s in services.items()
              if "build" not in s and name != "grafana"}
    assert set(images) == set(tags)
    for name, image in images.items():
        # The name podman gives the compose file's short name.
        full = image if image.count("/") == 2 else (
            f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}")
        assert tags[name] == full, name
        assert (REPO / "deploy/compose/standins" / name / f"{name}.Containerfile").is_file()
