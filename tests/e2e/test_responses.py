"""Hearing back, end to end: a click, a reply, a bounce and an unsubscribe come back.

API (in the test, on a real socket) -> Kafka -> sender -> SMTP server; the
recipient's answers go the real ways: the hooks service over HTTP (GET, then
POST), a reply and a DSN into the account's Dovecot mailbox read by `mailbus
replies` over IMAP; the projector makes them readable through the API, and
the sender refuses the unsubscribed and the bounced recipient next time.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import httpx

from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.support import dovecot
from tests.support.processes import Services
from tests.support.projector import eventually
from tests.support.smtp import SmtpServer, free_port


def accounts_toml(smtp_port: int, box: dovecot.Dovecot) -> str:
    return f"""
[[accounts]]
id = "dev"
kind = "smtp"
from_address = "news@example.com"
rate_per_second = 50
evidence = "smtp_final"

[accounts.smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"

{box.accounts_table()}"""


def dsn_for(original: EmailMessage, recipient: str) -> bytes:
    """A Postfix-shaped RFC 3464 bounce of `original` for one recipient."""
    report = EmailMessage()
    report["From"] = "MAILER-DAEMON@mx.example.com (Mail Delivery System)"
    report["To"] = "news@example.com"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(datetime.now(UTC))
    report["Message-ID"] = make_msgid(domain="mx.example.com")
    report["Auto-Submitted"] = "auto-replied"
    report.set_content("I'm sorry to have to inform you that your message could not\n"
                       "be delivered to one or more recipients.\n")
    report.make_mixed()
    status = EmailMessage()
    status.set_content(
        "Reporting-MTA: dns; mx.example.com\n\n"
        f"Final-Recipient: rfc822; {recipient}\nOriginal-Recipient: rfc822;{recipient}\n"
        "Action: failed\nStatus: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: "
        "User unknown\n")
    report.attach(status)
    headers = "".join(f"{k}: {v}\n" for k, v in original.items()
                      if k.lower() in ("from", "to", "subject", "message-id",
                                       "x-mailbus-message-id"))
    returned = EmailMessage()
    returned.set_content(headers)
    report.attach(returned)
    # RFC 3464 types (EmailMessage has no API for a report's parts).
    return _retype(bytes(report).replace(
        b"multipart/mixed", b"multipart/report; report-type=delivery-status", 1))


def _retype(raw: bytes) -> bytes:
    """Second and third part: message/delivery-status and text/rfc822-headers."""
    out, seen = [], 0
    for line in raw.split(b"\n"):
        if line.startswith(b"Content-Type: text/plain"):
            seen += 1
            if seen == 2:
                line = b"Content-Type: message/delivery-status"
            elif seen == 3:
                line = b"Content-Type: text/rfc822-headers"
        out.append(line)
    return b"\n".join(out)


def reply_to(original: EmailMessage, sender: str, text: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "news@example.com"
    msg["Subject"] = "Re: " + str(original["Subject"])
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain="example.org")
    msg["In-Reply-To"] = original["Message-ID"]
    msg["References"] = original["Message-ID"]
    quoted = "\n".join("> " + line for line in original.get_body(("plain",)).get_content()
                       .splitlines())
    msg.set_content(f"{text}\n\nOn {original['Date']}, Example News wrote:\n{quoted}\n")
    return bytes(msg)


def test_a_click_a_reply_a_bounce_and_an_unsubscribe_come_back(
        namespace, tmp_path: Path, make_key, dovecot_server: dovecot.Dovecot):
    mailbox = dovecot_server
    mailbox.clear()
    _, token = make_key(scopes=("send", "read"))
    _, admin = make_key(scopes=("admin",))
    hooks_port = free_port()
    with SmtpServer() as smtp:
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(accounts_toml(smtp.port, mailbox))
        env = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace, "MAILBUS_ACCOUNTS_FILE": str(accounts),
               "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "link-keys.json"),
               "MAILBUS_HOOKS_BASE_URL": f"http://127.0.0.1:{hooks_port}",
               "MAILBUS_METRICS_PORT": "0", "MAILBUS_POLL_SECONDS": "0.2"}
        settings = IngestSettings(accounts_file=accounts, kafka={"topic_prefix": namespace})
        with Services(env, tmp_path) as services, LiveServer(settings) as api, \
                httpx.Client(base_url=api.url, timeout=30) as client:
            services.start("sender")
            services.start("projector")
            services.start("hooks", MAILBUS_PORT=str(hooks_port))
            services.start("replies")
            as_key = {"Authorization": f"Bearer {token}"}

            def send(to: str, **extra: Any) -> str:
                r = client.post("/v1/messages", headers=as_key, json={
                    "to": [to], "subject": "Are you coming on Friday?",
                    "text": "Let us know.", "html": "<p>Let us know.</p>", **extra})
                assert r.status_code == 202, r.text
                return str(r.json()["id"])

            invited = send("ada@example.org", actions=[{"id": "yes", "label": "Yes"},
                                                       {"id": "no", "label": "No"}])
            bouncing = send("bob@example.org")

            def both_sent() -> list[EmailMessage]:
                services.check_alive()
                assert len(smtp.handler.received) == 2
                return smtp.handler.messages()

            by_id = {m["X-Mailbus-Message-Id"]: m for m in eventually(both_sent, 60)}
            invitation, doomed = by_id[invited], by_id[bouncing]
            html = invitation.get_body(("html",)).get_content()
            links = dict(re.findall(r'href="(http://127\.0\.0\.1:\d+/a/[^"]+)"[^>]*>(\w+)<',
                                    html))
            assert sorted(links.values()) == ["No", "Yes"]
            yes = next(url for url, label in links.items() if label == "Yes")
            unsubscribe = re.search(r"<(http://[^>]+/u/[^>]+)>",
                                    str(invitation["List-Unsubscribe"])).group(1)

            with httpx.Client(timeout=30) as browser:
                # A scanner or preview fetching the link records nothing; the button does.
                page = browser.get(yes.replace("&amp;", "&"))
                assert page.status_code == 200 and "Confirm: yes" in page.text
                assert browser.post(yes.replace("&amp;", "&")).status_code == 200
                one_click = browser.post(unsubscribe,
                                         data={"List-Unsubscribe": "One-Click"})
                assert one_click.status_code == 200
            mailbox.append(reply_to(invitation, "Ada <ada@example.org>", "Yes, I'll be there!"))
            mailbox.append(dsn_for(doomed, "bob@example.org"))

            def answered() -> dict[str, Any]:
                services.check_alive()
                got = client.get(f"/v1/messages/{invited}/responses", headers=as_key).json()
                assert sorted(r["kind"] for r in got["responses"]) == [
                    "action", "reply", "unsubscribe"]
                return {r["kind"]: r for r in got["responses"]}

            responses = eventually(answered, 60)
            assert responses["action"]["action_id"] == "yes"
            assert responses["reply"]["text"] == "Yes, I'll be there!"
            assert responses["reply"]["recipient"] == "ada@example.org"
            assert responses["unsubscribe"]["recipient"] == "ada@example.org"

            def bounced() -> dict[str, Any]:
                got = client.get(f"/v1/messages/{bouncing}", headers=as_key).json()
                assert got["status"] == "bounced"
                return got

            timeline = eventually(bounced, 60)["timeline"]
            [bounce] = [e for e in timeline if e["kind"] == "bounced"]
            assert bounce["detail"]["bounce_class"] == "hard"
            assert bounce["detail"]["status_code"] == "5.1.1"

            def suppressed() -> None:
                got = client.get("/v1/suppressions",
                                 headers={"Authorization": f"Bearer {admin}"}).json()
                assert sorted((s["address"], s["reason"]) for s in got["suppressions"]) == [
                    ("ada@example.org", "unsubscribe"), ("bob@example.org", "hard_bounce")]

            eventually(suppressed, 60)

            # The next mail to either is refused by the sender, and nothing reaches SMTP.
            again = [send("ada@example.org"), send("bob@example.org")]

            def refused(message_id: str) -> None:
                services.check_alive()
                got = client.get(f"/v1/messages/{message_id}", headers=as_key).json()
                assert got["status"] == "failed", got
                [failure] = [e for e in got["timeline"] if e["kind"] == "failed"]
                assert failure["detail"]["reason"].startswith("suppressed")

            for message_id in again:
                eventually(lambda: refused(message_id), 60)  # noqa: B023
            assert len(smtp.handler.received) == 2
