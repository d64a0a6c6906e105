"""schemathesis against the ingest and hooks OpenAPI documents, every check on, over a real socket.

The apps run as in production (uvicorn on a socket, the real broker and
PostgreSQL behind them); schemathesis generates valid and invalid requests
from each document and checks every answer against it. Bounded: a few
examples per operation and a fixed seed, so the file stays well under a
minute and a finding reproduces.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailbus.hooks.app import create_app
from mailbus.hooks.openapi import document
from mailbus.ingest.settings import IngestSettings
from mailbus.tokens import Keyring, LinkBuilder
from tests.integration.conftest import LiveServer
from tests.integration.test_hooks import MID, HooksServer, path_of, settings_for

MAX_EXAMPLES = 5
SEED = 20261130
# Statuses a schema-valid request may get (positive_data_acceptance's default).
ACCEPTING = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
# The exceptions docs/api.md argues ("Checked against its OpenAPI document"):
# a valid request may also be a 422 where a rule cannot be said in JSON
# Schema. Listings take only cursors the API issued; a message must name an
# account that exists and satisfy rules across fields (content, subject, at
# most 100 recipients in to, cc and bcc, 512 KiB of content, send_at within
# 30 days, addresses by RFC 5322); a batch is 422 when no item is accepted;
# a webhook URL must be https (here) without user info, a replay's `since`
# not in the future, and a key has at most 20 endpoints. A stored template
# must compile in the sandbox, have a name the key does not use yet, and stay
# within the key's caps; a message may name only a template the key has.
# An upload must not be an executable or a script by its first bytes, and a
# message's files must be the key's own uploads.
INGEST_CONFIG = """
# One method the API serves nowhere is enough to check 405 and Allow.
[phases.coverage]
unexpected-methods = ["delete"]

[[operations]]
include-path-regex = "^/v1/(messages|responses|suppressions|inbound|messages/[^/]+/responses)$"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = {statuses}

[[operations]]
include-path-regex = "^/v1/messages(/batch)?$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {statuses}

[[operations]]
include-path-regex = "^/v1/messages/[^/]+/(cancel|reschedule)$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {statuses}

[[operations]]
include-path-regex = "^/v1/webhooks/endpoints"
checks.positive_data_acceptance.expected-statuses = {statuses}

[[operations]]
include-path-regex = "^/v1/templates"
checks.positive_data_acceptance.expected-statuses = {statuses}

[[operations]]
include-path-regex = "^/v1/attachments$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {statuses}
"""


# Links are signed: a token schemathesis makes up is never genuine (400), so a
# valid-looking request to a link may be refused like that too.
HOOKS_CONFIG = """
[phases.coverage]
unexpected-methods = ["delete"]

[[operations]]
include-path-regex = "^/[auo]/"
checks.positive_data_acceptance.expected-statuses = {statuses}
"""


def schemathesis(workdir: Path, location: str, *args: str, config: str,
                 timeout: float = 120) -> None:
    """Run the schemathesis CLI with every check; fail with its report on any finding."""
    config_file = workdir / "schemathesis.toml"
    config_file.write_text(config)
    command = [str(Path(sys.executable).with_name("schemathesis")),
               "--config-file", str(config_file), "run", location,
               "--checks", "all", "--mode", "all", "--max-examples", str(MAX_EXAMPLES),
               "--seed", str(SEED), "--generation-database", "none", "--workers", "2",
               "--no-color", "--request-timeout", "20", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]


@pytest.mark.serial  # CPU-bound fuzzing within a 120 s timeout: alone, not beside other tests
def test_ingest_api_conforms_to_its_openapi_document(ingest_settings: IngestSettings,
                                                     make_key, tmp_path: Path):
    # An admin key reaches every operation; a generous rate, so that the
    # generated requests are judged on their content, not their number.
    _, token = make_key(scopes=("send", "read", "admin"))
    settings = ingest_settings.model_copy(update={"rate_limit": "99999/second"})
    statuses = json.dumps([*ACCEPTING, "422"])
    with LiveServer(settings) as server:
        schemathesis(tmp_path, f"{server.url}/openapi.json",
                     "--header", f"Authorization: Bearer {token}",
                     config=INGEST_CONFIG.format(statuses=statuses))


def with_genuine_links(doc: dict[str, Any], keyring: Keyring) -> dict[str, Any]:
    """The document with a genuine link of each kind as its token's example.

    Only the sender can mint tokens, so without them every generated request
    would be refused at the signature; with them the examples phase clicks,
    unsubscribes and loads the pixel for real (the events go to Kafka).
    """
    now = datetime.now(UTC)
    links = LinkBuilder(keyring, "http://hooks.test", timedelta(days=7), open_tracking=True)
    tokens = {
        "/a/{token}": path_of(links.action_url(MID, "ada@example.org", "yes", now=now)),
        "/u/{token}": path_of(links.unsubscribe_url(MID, "ada@example.org", now=now)),
        "/o/{token}": path_of(links.open_url(MID, "ada@example.org", now=now)),
    }
    for path, token_path in tokens.items():
        for operation in doc["paths"][path].values():
            for parameter in operation["parameters"]:
                if parameter["name"] == "token":
                    parameter["example"] = token_path.split("/", 2)[2]
    return doc


def test_hooks_service_conforms_to_its_openapi_document(namespace: str, tmp_path: Path):
    keyring = Keyring.generate_file(tmp_path / "link-keys.json")
    # Open tracking on, so that every route is served; a generous rate per
    # address (every request comes from 127.0.0.1).
    settings = settings_for(namespace, tmp_path, open_tracking=True, rate_per_minute=100_000,
                            rate_burst=100_000)
    spec = tmp_path / "hooks-openapi.json"
    doc = document(create_app(settings, keyring))
    spec.write_text(json.dumps(with_genuine_links(doc, keyring)))
    statuses = json.dumps([*ACCEPTING, "400"])
    server = HooksServer(settings, keyring)
    with server:
        schemathesis(tmp_path, str(spec), "--url", server.url,
                     config=HOOKS_CONFIG.format(statuses=statuses))
