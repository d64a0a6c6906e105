"""docs/configuration.md names every setting every service reads, so it cannot drift."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel

from mailbus.confirm.projector import ProjectorSettings
from mailbus.confirm.settings import ConfirmSettings
from mailbus.hooks.settings import HooksSettings
from mailbus.ingest.settings import IngestSettings
from mailbus.replies.settings import RepliesSettings
from mailbus.sender.settings import SenderSettings
from mailbus.settings import REPO_ROOT
from mailbus.webhooks.settings import WebhooksSettings

DOC = (REPO_ROOT / "docs" / "configuration.md").read_text()
NESTED = {"kafka": "MAILBUS_KAFKA__", "postgres": "MAILBUS_POSTGRES__"}


def env_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        if name == "service_name":
            continue  # fixed per service, not configuration
        if name in NESTED:
            sub = field.annotation
            assert isinstance(sub, type) and issubclass(sub, BaseModel)
            names |= {NESTED[name] + n.upper() for n in sub.model_fields}
        else:
            names.add("MAILBUS_" + name.upper())
    return names


MODELS = (IngestSettings, SenderSettings, ConfirmSettings, ProjectorSettings, HooksSettings,
          RepliesSettings, WebhooksSettings)


@pytest.mark.parametrize("model", MODELS)
def test_every_setting_is_documented(model: type[BaseModel]) -> None:
    missing = sorted(n for n in env_names(model) if f"`{n}`" not in DOC)
    assert missing == [], f"docs/configuration.md lacks {missing}"


# Read by the stack's shell scripts and the CLI, not by a settings class.
SCRIPTS = {"MAILBUS_VAR", "MAILBUS_CACHE", "MAILBUS_KAFKA_PORT", "MAILBUS_KAFKA_CONTROLLER_PORT",
           "MAILBUS_KAFKA_TLS_PORT", "MAILBUS_PG_PORT", "MAILBUS_PG_SUPERUSER",
           "MAILBUS_PG_SUPERUSER_PASSWORD_FILE", "MAILBUS_API_KEY"}


def test_the_doc_names_no_setting_that_does_not_exist() -> None:
    known = set().union(*(env_names(m) for m in MODELS))
    documented = set(re.findall(r"`(MAILBUS_[A-Z0-9_]+)`", DOC))
    assert documented - known - SCRIPTS == set()
