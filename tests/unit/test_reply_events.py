"""What classified inbound mail turns into: the records `mailbus replies` produces."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from mailbus.codec import Registry
from mailbus.replies.classify import Inbound, classify_inbound
from mailbus.replies.events import (
    NOT_A_RECIPIENT,
    NOT_OURS,
    PROJECTION_GRACE,
    Plan,
    ReportTooEarly,
    Sent,
    address_hash,
    judge,
    named,
    plan,
    reference,
)
from mailbus.replytag import verify_tag
from tests.unit.test_classify import TAG_RING

CORPUS = Path(__file__).parent / "corpus" / "inbound"
NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
GENUINE = "v1.k1.genuine.sig"
TOKEN_MID = "0b6f5a8e-2c1d-4c5e-9a43-1e2f3a4b5c6d"


def check_token(token: str) -> tuple[str, str] | None:
    """Stands for the keyring: only one token is genuine here (tokens.verify is tested apart)."""
    return (TOKEN_MID, "ada@example.org") if token == GENUINE else None


def genuine(inbound: Inbound) -> Sent | None:
    """What the lookup finds when the report is true: its message, sent to whom it names."""
    mid = reference(inbound, partial(verify_tag, TAG_RING))
    return Sent(mid, frozenset(named(inbound))) if mid else None


def planned(name: str, *, source_ref: str = "imap:7:42", token_check=check_token,
            raw: bytes | None = None, sent: Sent | str | None = "genuine") -> Plan:
    inbound = classify_inbound(raw if raw is not None else (CORPUS / name).read_bytes(),
                               domains=("example.com",))
    return plan(inbound, account_id="dev", source="imap:dev", source_ref=source_ref, now=NOW,
                check_token=token_check, check_tag=partial(verify_tag, TAG_RING),
                sent=genuine(inbound) if sent == "genuine" else sent)  # type: ignore[arg-type]


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
    inbound = classify_inbound((CORPUS / "reply_via_tag.eml").read_bytes())
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
    inbound = classify_inbound(raw, domains=("other.org",))
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


# -- forged reports: a DSN or complaint speaks only for a recipient of ours ------------

MID = "1c6a2f0e-5b7d-4e39-8a21-3f4d5e6a7b8c"  # the message of postfix_hard_511.eml
ARF_MID = "9e42b186-3d5f-4ab1-8ca9-becfd0e1f203"  # the message of yahoo_arf_complaint.eml


def dsn_raw(message_id_header: str | None, *recipients: str,
            mailbus_id: str | None = None) -> bytes:
    """An RFC 3464 report for `recipients`, quoting the original's headers as given."""
    status = "".join(f"\nFinal-Recipient: rfc822; {r}\nAction: failed\nStatus: 5.1.1\n"
                     f"Diagnostic-Code: smtp; 550 5.1.1 user unknown\n" for r in recipients)
    original = "From: Example News <news@example.com>\nSubject: News\n"
    if message_id_header is not None:
        original += f"Message-ID: {message_id_header}\n"
    if mailbus_id is not None:
        original += f"X-Mailbus-Message-Id: {mailbus_id}\n"
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\nTo: news@example.com\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        f"Message-ID: <{uuid.uuid4()}@mx.example.net>\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n"
        "--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n"
        f"{status}\n--b\nContent-Type: text/rfc822-headers\n\n{original}\n--b--\n"
    ).encode()


def arf_raw(message_id_header: str | None, original_rcpt: str | None,
            to: str = "someone@example.org") -> bytes:
    """An RFC 5965 abuse report; the original's Message-ID and Original-Rcpt-To as given."""
    rcpt = f"Original-Rcpt-To: {original_rcpt}\n" if original_rcpt is not None else ""
    msgid = f"Message-ID: {message_id_header}\n" if message_id_header is not None else ""
    return (
        "From: feedback@arf.example.net\nTo: fbl@example.com\nSubject: complaint\n"
        f"Message-ID: <{uuid.uuid4()}@arf.example.net>\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nThis is an abuse report.\n\n"
        "--b\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\n"
        f"User-Agent: fbl/1.0\nVersion: 1\n{rcpt}\n"
        f"--b\nContent-Type: message/rfc822\n\nFrom: Example News <news@example.com>\n"
        f"To: {to}\nSubject: News\n{msgid}\nHello\n\n--b--\n"
    ).encode()


def sent_to(*recipients: str, mid: str = MID) -> Sent:
    return Sent(mid, frozenset(recipients))


def refused(p: Plan, reason: str) -> None:
    assert (p.kind, p.message_id, p.records) == ("unmatched", None, ())
    assert p.detail["reason"] == reason


def test_without_the_lookup_no_report_produces_anything():
    for name in ("postfix_hard_511.eml", "yahoo_arf_complaint.eml", "delivered_200.eml"):
        refused(planned(name, sent=None), NOT_OURS)


def test_a_dsn_for_a_message_we_never_sent_is_kept_unmatched():
    p = planned("postfix_hard_511.eml", sent=Sent(MID, frozenset(), projected=False))
    refused(p, NOT_OURS)
    assert p.detail["named_message_id"] == MID and p.detail["classified_as"] == "dsn"
    assert p.detail["results"][0]["recipient"] == "nobody@example.net"
    # An answer about another message than the one named is no answer.
    refused(planned("postfix_hard_511.eml",
                    sent=sent_to("nobody@example.net", mid=ARF_MID)), NOT_OURS)


def test_a_dsn_naming_someone_the_message_never_went_to_suppresses_nobody():
    p = planned("postfix_hard_511.eml", sent=sent_to())  # sent, but not to nobody@
    refused(p, NOT_A_RECIPIENT)
    assert p.detail["refused"] == ["nobody@example.net"]
    # A positive report is delivery evidence only for a recipient of the message, too.
    refused(planned("delivered_200.eml", sent=Sent("6b1f7e53-0a2c-4d8e-9f76-8e9cadbecfd0",
                                                   frozenset({"other@example.net"}))),
            NOT_A_RECIPIENT)


def test_of_two_named_only_the_recipient_of_the_message_counts():
    raw = dsn_raw(f"<{MID}@example.com>", "ada@example.org", "victim@example.net")
    p = planned("", raw=raw, sent=sent_to("ada@example.org"))
    assert (p.kind, p.message_id) == ("dsn", MID)
    assert summary(p) == [("email.bounced", "ada@example.org", "hard", "5.1.1"),
                          ("email.suppressions", "ada@example.org", "hard_bounce")]
    assert p.detail["refused"] == ["victim@example.net"]
    assert [r["recipient"] for r in p.detail["results"]] == ["ada@example.org"]


def test_a_delay_for_a_stranger_does_not_reach_the_message_timeline():
    refused(planned("delayed_447.eml", sent=Sent("5a0e6d42-9f1b-4c7d-8e65-7d8b9cadbecf",
                                                 frozenset())), NOT_A_RECIPIENT)


def test_a_dsn_whose_message_id_has_a_foreign_domain_names_no_message_of_ours():
    p = planned("", raw=dsn_raw(f"<{MID}@attacker.example>", "nobody@example.net"),
                sent=sent_to("nobody@example.net"))
    refused(p, "the DSN names no message of ours")


def test_a_complaint_without_a_reference_suppresses_nobody():
    p = planned("", raw=arf_raw(None, "<ada@example.org>"), sent=None)
    refused(p, "the complaint names no message of ours")
    assert p.detail["recipient"] == "ada@example.org"


def test_a_complaint_naming_another_address_than_the_recipient_suppresses_nobody():
    ref = f"<{ARF_MID}@example.com>"
    refused(planned("", raw=arf_raw(ref, "<ada@example.org>"), sent=sent_to(
        "bob@attacker.example", mid=ARF_MID)), NOT_A_RECIPIENT)
    # No recipient named at all: the report cannot say whom it is about.
    refused(planned("", raw=arf_raw(ref, None, to="undisclosed-recipients:;"),
                    sent=sent_to("bob@attacker.example", mid=ARF_MID)),
            "the complaint names no recipient")


@pytest.mark.parametrize("variant", [
    "<ADA@Example.COM>", "=?utf-8?q?Ada_Lovelace?= <ada@example.org>",
    '"=?utf-8?q?ada=40example=2Eorg?=" <ada@example.org>', "<ada@example.org.>",
    "  <ada@example.org>  ", "<ada@example.org >", "ada@example.org.",
    "=?utf-8?b?YWRhQGV4YW1wbGUub3Jn?=",
])
def test_variants_of_a_stranger_address_suppress_nobody(variant):
    # The message went to the attacker only; no spelling of ada's address is a recipient.
    p = planned("", raw=arf_raw(f"<{ARF_MID}@example.com>", variant),
                sent=sent_to("bob@attacker.example", mid=ARF_MID))
    assert (p.kind, p.records) == ("unmatched", ())
    assert p.detail["reason"] in (NOT_A_RECIPIENT, "the complaint names no recipient")


def test_what_is_suppressed_is_the_recipient_as_the_lookup_matched_it():
    for spelling in ("<ADA@Example.ORG>", " ada@EXAMPLE.org "):
        p = planned("", raw=arf_raw(f"<{ARF_MID}@example.com>", spelling),
                    sent=sent_to("ada@example.org", mid=ARF_MID))
        assert summary(p) == [("email.responses", "complaint", "ada@example.org"),
                              ("email.suppressions", "ada@example.org", "complaint")]
    # A trailing dot is another address, not the recipient's.
    refused(planned("", raw=arf_raw(f"<{ARF_MID}@example.com>", "<ada@example.org.>"),
                    sent=sent_to("ada@example.org", mid=ARF_MID)), NOT_A_RECIPIENT)


def test_a_report_read_before_its_send_was_projected_waits_then_is_judged():
    inbound = classify_inbound((CORPUS / "postfix_hard_511.eml").read_bytes(),
                               domains=("example.com",))
    early = Sent(MID, frozenset(), projected=False, handed_over_at=NOW - timedelta(seconds=2))
    with pytest.raises(ReportTooEarly):
        judge(inbound, MID, early, NOW)
    late = Sent(MID, frozenset(), projected=False,
                handed_over_at=NOW - PROJECTION_GRACE - timedelta(seconds=1))
    assert judge(inbound, MID, late, NOW).reason == NOT_OURS
    # Projected: judged at once, however recent.
    recent = Sent(MID, frozenset({"nobody@example.net"}), handed_over_at=NOW)
    assert judge(inbound, MID, recent, NOW).accepted == {"nobody@example.net"}
