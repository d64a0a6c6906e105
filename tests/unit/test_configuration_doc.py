"""docs/configuration.md names every setting every service reads, so it cannot drift."""

from __future__ import annotations

import re
import tomllib
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from mailbus.accounts import Account, GmailAccount, ImapAccount, SmtpAccount, load_accounts
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


# The accounts file: docs/configuration.md's tables against mailbus/accounts.py.
ACCOUNT_TABLES = {"": Account, "smtp.": SmtpAccount, "imap.": ImapAccount, "gmail.": GmailAccount}
SUBTABLES = {"smtp", "imap", "gmail"}  # fields of Account that are the tables above


def accounts_section() -> str:
    start = DOC.index("## The accounts file")
    end = DOC.index("\n## ", start + 1)
    return DOC[start:end]


def documented_keys() -> dict[str, list[str]]:
    """Each key's row: its cells after the key."""
    rows: dict[str, list[str]] = {}
    for line in accounts_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[a-z_.]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def model_keys() -> dict[str, Any]:
    """Every key of the accounts file, with its pydantic field."""
    keys: dict[str, Any] = {}
    for prefix, model in ACCOUNT_TABLES.items():
        for name, field in model.model_fields.items():
            if not (prefix == "" and name in SUBTABLES):
                keys[prefix + name] = field
    return keys


def test_every_key_of_the_accounts_file_is_documented_and_nothing_else() -> None:
    assert sorted(documented_keys()) == sorted(model_keys())


def toml_value(text: str) -> Any:
    return tomllib.loads(f"v = {text}")["v"]


@pytest.mark.parametrize("key", sorted(model_keys()))
def test_each_documented_default_and_choice_is_the_model_s(key: str) -> None:
    field, (default, meaning) = model_keys()[key], documented_keys()[key]
    if field.is_required():
        assert default == "required", key
    elif field.default is None:
        # none, or a default derived from another key ("the account's `from_address`")
        assert default == "none" or not re.fullmatch(r"`[^`]*`", default), key
    else:
        assert re.fullmatch(r"`[^`]*`", default), f"{key}: default {default!r} not a literal"
        value = field.default
        expected = list(value) if isinstance(value, tuple) else value
        assert toml_value(default.strip("`")) == expected, key
    # Every value a Literal allows is named in the row, and nothing else is suggested.
    if get_origin(field.annotation) is Literal:
        for choice in get_args(field.annotation):
            assert f"`{choice}`" in meaning or default == f'`"{choice}"`', (key, choice)


def test_the_example_accounts_file_is_valid_and_shows_every_imap_and_gmail_setting() -> None:
    example = REPO_ROOT / "deploy" / "accounts.example.toml"
    directory = load_accounts(example)
    assert len(directory) >= 2
    text = example.read_text()
    # Keys an operator most often needs and cannot guess (commented out or set).
    for key in ("poll_seconds", "idle", "processed_folder", "processed_label", "tls"):
        assert re.search(rf"^#? ?{key} = ", text, re.M), key


def test_every_mailbus_variable_named_anywhere_in_the_docs_exists() -> None:
    # The image's health check (deploy/compose/healthcheck.py) reads one more,
    # and docker-compose.yml's host ports are `${MAILBUS_..._PORT:-default}`;
    # the suite's fixtures read MAILBUS_TEST_CONTAINERS (tests/support/containers.py).
    compose = set(re.findall(r"\$\{(MAILBUS_[A-Z0-9_]+):-",
                             (REPO_ROOT / "docker-compose.yml").read_text()))
    known = (set().union(*(env_names(m) for m in MODELS)) | SCRIPTS | {"MAILBUS_HEALTH_URL"}
             | compose | {"MAILBUS_TEST_CONTAINERS"})
    for page in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        named = set(re.findall(r"\b(MAILBUS_[A-Z0-9_]*[A-Z0-9])\b", page.read_text()))
        assert named - known == set(), page.name
