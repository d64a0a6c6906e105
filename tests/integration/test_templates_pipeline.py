"""A message by stored template through the API, the broker, the sender and a real SMTP
server, then the projector: the mail is rendered from the version accepted, even after the
template was changed and deleted, and the timeline says which version it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from mailbus.codec import Registry
from mailbus.ingest.settings import IngestSettings
from mailbus.sender.settings import SenderSettings
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import auth
from tests.support.kafka import read_all
from tests.support.projector import eventually, lag, projector_running, settings_for
from tests.support.sender import SenderThread, smtp_account
from tests.support.smtp import SmtpServer

RECEIPT = {"name": "receipt", "subject": "Receipt {{ order }} for {{ customer }}",
           "text": "v1: thank you, {{ customer }}.",
           "html": "<p>v1: thank you, {{ customer }}</p>"}
# Compiles (attribute access is checked as the template runs), so it is stored; the
# sandbox refuses it when the sender renders it.
ESCAPE = {"name": "escape", "subject": "x",
          "text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}


def send(api: httpx.Client, token: str, name: str, version: Any = None, **variables: Any
         ) -> str:
    template: dict[str, Any] = {"name": name, "variables": variables}
    if version is not None:
        template["version"] = version
    r = api.post("/v1/messages", json={"to": ["Ada Lovelace <ada@example.com>"],
                                        "template": template}, headers=auth(token))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_the_mail_is_rendered_from_the_version_accepted_and_the_timeline_names_it(
        namespace: str, tmp_path: Path, make_key, admin_kafka, registry: Registry):
    accounts = tmp_path / "accounts.toml"
    _, token = make_key()
    with SmtpServer() as smtp:
        accounts.write_text(smtp_account("dev", smtp.port))
        ingest = IngestSettings(accounts_file=accounts,
                                kafka={"topic_prefix": namespace, "delivery_timeout_ms": 5000})
        sender = SenderSettings(
            accounts_file=accounts, kafka={"topic_prefix": namespace}, metrics_port=0,
            retry_base_seconds=0.2, retry_cap_seconds=1.0, poll_seconds=0.2,
            link_keys_file=tmp_path / "link-keys.json")
        with LiveServer(ingest) as server, httpx.Client(base_url=server.url, timeout=30) as api:
            for body in (RECEIPT, ESCAPE):
                assert api.post("/v1/templates", json=body, headers=auth(token)
                                ).status_code == 201
            first = send(api, token, "receipt", 1, customer="Ada <ada>", order=7)
            r = api.post("/v1/templates/receipt/versions", headers=auth(token), json={
                "subject": RECEIPT["subject"], "text": "v2: thanks, {{ customer }}."})
            assert r.status_code == 201, r.text
            latest = send(api, token, "receipt", "latest", customer="Grace", order=8)
            escape = send(api, token, "escape")
            # Gone before anything is sent: what was accepted is sent all the same.
            assert api.delete("/v1/templates/receipt", headers=auth(token)).status_code == 204

            with SenderThread(sender):
                sent = read_all(admin_kafka, namespace + "email.sent", expect=2, timeout=60)
                failed = read_all(admin_kafka, namespace + "email.failed", expect=1, timeout=60)
            assert {registry.decode(m.value())[1]["message_id"] for m in sent} == {first, latest}
            [failure] = [registry.decode(m.value())[1] for m in failed]
            assert failure["message_id"] == escape
            assert failure["reason"].startswith("template: text: refused by the sandbox"), \
                failure["reason"]

            mails = {m["Message-ID"].strip("<>").split("@")[0]: m for m in smtp.handler.messages()}
            assert set(mails) == {first, latest}
            one, two = mails[first], mails[latest]
            assert one["Subject"] == "Receipt 7 for Ada <ada>"
            assert one.get_body(("plain",)).get_content().startswith("v1: thank you, Ada <ada>.")
            # html parts are autoescaped: the variable cannot write markup.
            assert "<p>v1: thank you, Ada &lt;ada&gt;</p>" in one.get_body(("html",)).get_content()
            assert two["Subject"] == "Receipt 8 for Grace"
            assert two.get_body(("plain",)).get_content().startswith("v2: thanks, Grace.")
            assert two.get_body(("html",)) is None or "v1" not in two.get_body(
                ("html",)).get_content()

            with projector_running(settings_for(namespace)):
                eventually(lambda: _caught_up(admin_kafka, namespace))
            for message_id, version in ((first, 1), (latest, 2)):
                got = api.get(f"/v1/messages/{message_id}", headers=auth(token)).json()
                [entry] = [e for e in got["timeline"] if e["kind"] == "requested"]
                assert entry["detail"]["template"] == {"name": "receipt", "version": version}
            got = api.get(f"/v1/messages/{escape}", headers=auth(token)).json()
            assert got["status"] == "failed"
            assert [e["detail"].get("template") for e in got["timeline"]
                    if e["kind"] == "requested"] == [{"name": "escape", "version": 1}]


def _caught_up(admin_kafka: dict[str, Any], namespace: str) -> None:
    assert lag(admin_kafka, namespace) == 0
