"""What classified inbound mail turns into: the records `mailbus replies` produces."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from mailbus.codec import Registry
from mailbus.replies.classify import classify
from mailbus.replies.events import Plan, address_hash, plan
from mailbus.replytag import verify_tag
from tests.unit.test_classify import TAG_RING

CORPUS = Path(__file__).parent / "corpus" / "inbound"
NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
GENUINE = "v1.k1.genuine.sig"
TOKEN_MID = "0b6f5a8e-2c1d-4c5e-9a43-1e2f3a4b5c6d"


def check_token(token: str) -> tuple[str, str] | None:
    """Stands for the keyring: only one token is genuine here (tokens.verify is tested apart)."""
    return (TOKEN_MID, "ada@example.org") if token == GENUINE else None


def planned(name: str, *, source_ref: str = "imap:7:42", token_check=check_token) -> Plan:
    inbound = classify((CORPUS / name).read_bytes(), domains=("example.com",))
    return plan(inbound, account_id="dev", source="imap:dev", source_ref=source_ref, now=NOW,
                check_token=token_check, check_tag=partial(verify_tag, TAG_RING))


FIELDS = {"email.bounced": ("recipient", "bounce_class", "status_code"),
          "email.delivered": ("recipient", "evidence"),
          "email.responses": ("kind", "recipient"),
          "email.suppressions": ("address", "reason")}


def summary(p: Plan) -> list[tuple[str, ...]]:
    return [(r.topic, *(r.value[f] for f in FIELDS[r.topic])) for r in p.records]


def test_hard_bounce_is_a_bounce_and_a_suppression():
    p = planned("postfix_hard_511.eml")
    assert (p.kind, p.message_id) == ("dsn", "1c6a2f0e-5b7d-4e39-8a21-3f4d5e6a7b8c")
    assert summary(p) == [("email.bounced", "nobody@example.net", "hard", "5.1.1"),
                          ("email.suppressions", "nobody@example.net", "hard_bounce")]
    bounce, suppression = p.records
    assert bounce.key == p.message_id and suppression.key == address_hash("nobody@example.net")
    assert suppression.value["scope"] is None and suppression.value["active"] is True


def test_soft_bounces_do_not_suppress():
    p = planned("two_recipients_422_511.eml")
    assert summary(p) == [("email.bounced", "erin@example.net", "soft", "4.2.2"),
                          ("email.bounced", "frank@example.net", "hard", "5.1.1"),
                          ("email.suppressions", "frank@example.net", "hard_bounce")]


def test_positive_dsn_is_delivery_evidence_and_a_delay_is_nothing_yet():
    assert summary(planned("delivered_200.eml")) == [
        ("email.delivered", "dana+news@example.net", "dsn")]
    delayed = planned("delayed_447.eml")
    assert (delayed.kind, delayed.records) == ("dsn", ())
    assert delayed.detail["results"][0]["action"] == "delayed"


def test_complaint_is_a_response_and_a_suppression():
    assert summary(planned("yahoo_arf_complaint.eml")) == [
        ("email.responses", "complaint", "grace@example.org"),
        ("email.suppressions", "grace@example.org", "complaint")]


def test_reply_and_auto_reply_carry_the_sender_and_stripped_text():
    [reply] = planned("gmail_reply_html_plain.eml").records
    assert (reply.value["kind"], reply.value["recipient"]) == ("reply",
                                                               "ada.lovelace@example.org")
    assert "Thursday works for me" in reply.value["text"] and "wrote:" not in reply.value["text"]
    assert reply.value["source"] == "imap:dev" and reply.value["account_id"] == "dev"
    [auto] = planned("outlook_out_of_office.eml").records
    assert auto.value["kind"] == "auto_reply"


def test_reply_threaded_by_its_tag_only_when_the_tag_verifies():
    tagged = planned("reply_via_tag.eml")
    assert tagged.kind == "reply" and tagged.message_id is not None
    assert [r.value["message_id"] for r in tagged.records] == [tagged.message_id]
    inbound = classify((CORPUS / "reply_via_tag.eml").read_bytes())
    forged = plan(inbound, account_id="dev", source="imap:dev", source_ref="x", now=NOW,
                  check_token=check_token, check_tag=lambda tag: None)
    assert (forged.kind, forged.records) == ("unmatched", ())


def test_unsubscribe_by_mail_needs_a_genuine_token():
    refused = planned("unsubscribe_mailto.eml")
    assert (refused.kind, refused.records) == ("unmatched", ())
    accepted = planned("unsubscribe_mailto.eml", token_check=lambda token: check_token(GENUINE))
    assert summary(accepted) == [("email.responses", "unsubscribe", "ada@example.org"),
                                 ("email.suppressions", "ada@example.org", "unsubscribe")]
    assert {r.value["message_id"] for r in accepted.records} == {TOKEN_MID}


def test_mail_that_answers_nothing_of_ours_is_kept_unmatched():
    spam = planned("spam_unrelated.eml")
    assert (spam.kind, spam.message_id, spam.records) == ("unmatched", None, ())
    assert spam.detail["reason"]
    # A bounce of a message some other system sent (its Message-ID is not ours).
    raw = b"".join(line for line in (CORPUS / "postfix_hard_511.eml").read_bytes()
                   .splitlines(keepends=True) if not line.startswith(b"X-Mailbus-Message-Id"))
    inbound = classify(raw, domains=("other.org",))
    foreign = plan(inbound, account_id="dev", source="imap:dev", source_ref="x", now=NOW,
                   check_token=check_token, check_tag=lambda tag: None)
    assert (foreign.kind, foreign.records) == ("unmatched", ())
    assert foreign.detail["results"][0]["recipient"] == "nobody@example.net"


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")))
def test_every_record_is_valid_avro_and_replays_to_the_same_ids(name):
    registry = Registry.load()
    first = planned(name, source_ref="imap:7:42")
    # The same mail read again (a restart, a new UIDVALIDITY) produces the same events.
    again = planned(name, source_ref="imap:8:1")
    assert [r.value["event_id"] for r in first.records] == [
        r.value["event_id"] for r in again.records]
    assert len({r.value["event_id"] for r in first.records}) == len(first.records)
    for r in first.records:
        assert registry.decode(registry.encode(r.topic, r.value))[1]["event_id"] == \
            r.value["event_id"]
