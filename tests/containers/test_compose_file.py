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

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = Path(__file__).with_name("compose-spec.json")

SETTINGS: dict[str, type[ServiceSettings]] = {
    "ingest": IngestSettings, "sender": SenderSettings, "confirm": ConfirmSettings,
    "projector": ProjectorSettings, "hooks": HooksSettings, "replies": RepliesSettings,
}
# Read by `mailbus setup db` straight from the environment (cli.py), not by a settings class.
CLI_VARIABLES = {"MAILBUS_PG_SUPERUSER", "MAILBUS_PG_SUPERUSER_PASSWORD_FILE"}
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE", re.I)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


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
                assert dependency in {"secrets", "init"}, (name, dependency)
    for name in mailbus_services(services):
        assert services[name]["depends_on"]["init"]["condition"] == (
            "service_completed_successfully")
    assert set(services["init"]["depends_on"]) == {"kafka", "postgres"}
