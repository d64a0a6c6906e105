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
from pathlib import Path

from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer

MAX_EXAMPLES = 5
SEED = 20261130
# Statuses a schema-valid request may get (positive_data_acceptance's default).
ACCEPTING = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
# The exceptions docs/api.md argues ("Checked against its OpenAPI document"):
# a valid request may also be a 422 where a rule cannot be said in JSON
# Schema. Listings take only cursors the API issued; a message must name an
# account that exists and satisfy rules across fields (content, subject, at
# most 100 recipients in to, cc and bcc, 512 KiB of content, send_at within
# 7 days, addresses by RFC 5322); a batch is 422 when no item is accepted.
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
"""


def schemathesis(location: str, *args: str, config: str = "", timeout: float = 120) -> None:
    """Run the schemathesis CLI with every check; fail with its report on any finding."""
    config_file = Path(sys.prefix) / "tmp-schemathesis.toml"
    command = [str(Path(sys.executable).with_name("schemathesis"))]
    if config:
        config_file.write_text(config)
        command += ["--config-file", str(config_file)]
    command += ["run", location, "--checks", "all", "--mode", "all",
                "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
                "--generation-database", "none", "--workers", "2", "--no-color",
                "--request-timeout", "20", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]


def test_ingest_api_conforms_to_its_openapi_document(ingest_settings: IngestSettings,
                                                     make_key):
    # An admin key reaches every operation; a generous rate, so that the
    # generated requests are judged on their content, not their number.
    _, token = make_key(scopes=("send", "read", "admin"))
    settings = ingest_settings.model_copy(update={"rate_limit": "100000/second"})
    statuses = json.dumps([*ACCEPTING, "422"])
    with LiveServer(settings) as server:
        schemathesis(f"{server.url}/openapi.json", "--header", f"Authorization: Bearer {token}",
                     config=INGEST_CONFIG.format(statuses=statuses))
