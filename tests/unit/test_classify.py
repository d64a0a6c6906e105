"""The inbound classifier over a corpus shaped like real servers' mail, and hostile input."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailbus.replies.classify import (
    MAX_DEPTH,
    MAX_PARTS,
    DsnResult,
    Inbound,
    bounce_class,
    classify_inbound,
)
from mailbus.replies.text import decode_bytes, decode_raw_header, html_to_text, strip_reply
from mailbus.replytag import verify_tag
from mailbus.tokens import Keyring

CORPUS = Path(__file__).parent / "corpus" / "inbound"
OURS = ("example.com",)
MID = "0b6f5a8e-2c1d-4c5e-9a43-1e2f3a4b5c6d"
TAG_RING = Keyring({"k1": b"1" * 32}, "k1")  # the key the corpus' reply tag was made with
TAGS = re.compile(r"<[A-Za-z/!?]")


@dataclass(frozen=True)
class Expected:
    kind: str
    message_id: str | None = None
    dsn: tuple[tuple[str | None, str, str | None, str | None], ...] = ()
    has: tuple[str, ...] = ()  # in the text
    lacks: tuple[str, ...] = ()  # quoted history, signatures: never in the text
    sender: str | None = None
    complaint_recipient: str | None = None


EXPECTED: dict[str, Expected] = {
    "postfix_hard_511.eml": Expected(
        "dsn", "1c6a2f0e-5b7d-4e39-8a21-3f4d5e6a7b8c",
        (("nobody@example.net", "failed", "5.1.1", "hard"),)),
    "exim_plain_bounce.eml": Expected(
        "dsn", "2d7b3a1f-6c8e-4f4a-9b32-4a5e6f7a8b9c",
        (("gone@example.net", "failed", "5.1.1", "hard"),)),
    "gmail_dsn_failure.eml": Expected(
        "dsn", "3e8c4b20-7d9f-4a5b-8c43-5b6f7a8b9cad",
        (("no.such.user@example.org", "failed", "5.1.1", "hard"),)),
    "exchange_ndr_5110.eml": Expected(
        "dsn", "4f9d5c31-8e0a-4b6c-9d54-6c7a8b9cadbe",
        (("mallory@example.org", "failed", "5.1.10", "hard"),)),
    "delayed_447.eml": Expected(
        "dsn", "5a0e6d42-9f1b-4c7d-8e65-7d8b9cadbecf",
        (("slow@example.net", "delayed", "4.4.7", None),)),
    "delivered_200.eml": Expected(
        "dsn", "6b1f7e53-0a2c-4d8e-9f76-8e9cadbecfd0",
        (("dana+news@example.net", "delivered", "2.0.0", None),)),
    "mailbox_full_522.eml": Expected(
        "dsn", "7c208f64-1b3d-4e9f-8a87-9fadbecfd0e1",
        (("full.box@example.org", "failed", "5.2.2", "soft"),)),
    "two_recipients_422_511.eml": Expected(
        "dsn", "8d31a075-2c4e-4fa0-9b98-adbecfd0e1f2",
        (("erin@example.net", "failed", "4.2.2", "soft"),
         ("frank@example.net", "failed", "5.1.1", "hard"))),
    "plain_undelivered_no_status.eml": Expected(
        "dsn", "93e4b686-37b4-4bc1-8c26-becfd0e1f203",
        (("olduser@example.org", "failed", None, "unknown"),)),
    "yahoo_arf_complaint.eml": Expected(
        "complaint", "9e42b186-3d5f-4ab1-8ca9-becfd0e1f203",
        complaint_recipient="grace@example.org"),
    "aol_arf_headers_only.eml": Expected(
        "complaint", "af53c297-4e6a-4bc2-9dba-cfd0e1f20314",
        complaint_recipient="heidi@example.org"),
    "outlook_out_of_office.eml": Expected(
        "auto_reply", "b064d3a8-5f7b-4cd3-8aeb-d0e1f2031425", has=("out of the office",)),
    "gmail_vacation_responder.eml": Expected(
        "auto_reply", "c175e4b9-6a8c-4de4-9bfc-e1f203142536", has=("hiking until Monday",)),
    "x_autoreply_only.eml": Expected(
        "auto_reply", "d286f5ca-7b9d-4ef5-8c0a-f20314253647", has=("not monitored",)),
    "german_abwesenheitsnotiz.eml": Expected(
        "auto_reply", "e397a6db-8cae-4f06-9d1b-031425364758",
        has=("nicht im Büro", "weitergeleitet")),
    "gmail_reply_html_plain.eml": Expected(
        "reply", "f4a8b7ec-9dbf-4017-8e2c-142536475869",
        has=("Thursday works for me", "start at 10"),
        lacks=("wrote:", "shall we meet", "Analytical Engines", ">"),
        sender="ada.lovelace@example.org"),
    "outlook_reply.eml": Expected(
        "reply", "0a5b8cfd-ae0c-4128-9f3d-25364758697a",
        has=("paid yesterday \u2013 please", "Kind regards"),
        lacks=("From:", "Sent:", "now due", "____")),
    "apple_iphone_reply.eml": Expected(
        "reply", "1b6c9d0e-bf1d-4239-a04e-364758697a8b", has=("valid in the shop?",),
        lacks=("Sent from my iPhone", "wrote:", "20% off this week")),
    "apple_mail_html_only.eml": Expected(
        "reply", "a4f5c797-48c5-4cd2-9d37-cfd0e1f20314", has=("two seats, please",),
        lacks=("wrote:", "limited", "<")),
    "german_reply.eml": Expected(
        "reply", "2c7daf1f-c02e-434a-b15f-4758697a8b9c", has=("Grüße aus München",),
        lacks=("schrieb", "bestätigen")),
    "french_reply.eml": Expected(
        "reply", "3d8eb020-d13f-445b-8c60-58697a8b9cad", has=("je serai présente jeudi",),
        lacks=("a écrit", "Bonjour Claire")),
    "references_only_reply.eml": Expected(
        "reply", "4e9fc131-e24f-456c-9d71-697a8b9cadbe", has=("my colleague",),
        lacks=("Forwarded message", "Example News")),
    "reply_via_tag.eml": Expected("reply", None, has=("has not arrived",)),
    "unsubscribe_mailto.eml": Expected("unsubscribe"),
    "iso2022jp_reply.eml": Expected(
        "reply", "5fa0d242-f360-467d-ae82-7a8b9cadbecf", has=("木曜日で大丈夫です",),
        lacks=("会議は木曜日です", "2025年3月24日")),
    "windows1251_reply.eml": Expected(
        "reply", "60b1e353-0471-478e-bf93-8b9cadbecfd0", has=("счёт получен",),
        lacks=("пишет", "Ваш счёт готов")),
    "malformed_mime.eml": Expected(
        "reply", "71c2f464-1582-489f-8a04-9cadbecfd0e1", has=("résumé template",)),
    "html_only_script.eml": Expected(
        "reply", "82d3a575-26a3-4ab0-9b15-adbecfd0e1f2",
        has=("I love the new design & the colours.", "bold"),
        lacks=("document.cookie", "alert(1)", "alert(3)", "alert(5)", "alert(6)", "onerror",
               "fallback text", "background")),
    "spam_unrelated.eml": Expected("unmatched", None, has=("Claim your prize",)),
}


def _load(name: str) -> Inbound:
    return classify_inbound((CORPUS / name).read_bytes(), domains=OURS)


def test_every_corpus_file_has_an_expectation() -> None:
    assert sorted(path.name for path in CORPUS.glob("*.eml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus(name: str) -> None:
    expected, got = EXPECTED[name], _load(name)
    assert (got.kind, got.message_id) == (expected.kind, expected.message_id)
    assert [(r.recipient, r.action, r.status, r.bounce_class) for r in got.dsn] == list(
        expected.dsn)
    assert got.complaint_recipient == expected.complaint_recipient
    for part in expected.has:
        assert part in got.text
    for part in expected.lacks:
        assert part not in got.text
    if expected.sender:
        assert got.sender == expected.sender
    assert got.subject and got.header_message_id
    assert (got.date is None) == (name == "malformed_mime.eml")  # "99:99:99 +9999"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_holds_with_no_domain_list_too(name: str) -> None:
    """Without `domains` only references_only_reply changes: a foreign UUID is newer there."""
    got = classify_inbound((CORPUS / name).read_bytes())
    if name == "references_only_reply.eml":
        assert got.message_id == "5f0ad242-aaaa-4bbb-8ccc-ddddeeeeffff"
    else:
        assert (got.kind, got.message_id) == (EXPECTED[name].kind, EXPECTED[name].message_id)


def test_delivery_report_details() -> None:
    postfix = _load("postfix_hard_511.eml")
    assert postfix.dsn[0].diagnostic == ("550 5.1.1 <nobody@example.net>: Recipient address "
                                         "rejected: User unknown in virtual mailbox table")
    assert postfix.sender == "mailer-daemon@mail.example.com"
    # ORCPT is xtext: "+2B" is the "+" of the address as it was sent.
    assert _load("delivered_200.eml").dsn[0].recipient == "dana+news@example.net"
    exim = _load("exim_plain_bounce.eml").dsn[0]
    assert exim.diagnostic and "User unknown" in exim.diagnostic


def test_mime_defects_are_reported() -> None:
    reason = _load("malformed_mime.eml").reason
    assert reason and "close boundary not found" in reason


def test_complaint_details() -> None:
    yahoo = _load("yahoo_arf_complaint.eml")
    assert yahoo.feedback_type == "abuse"
    # Original-Rcpt-To wins over the original's (redacted) To.
    assert yahoo.complaint_recipient == "grace@example.org"


def test_unsubscribe_token_is_extracted_whole() -> None:
    got = _load("unsubscribe_mailto.eml")
    subject = (CORPUS / "unsubscribe_mailto.eml").read_text().split("Subject: unsubscribe-")[1]
    assert got.unsubscribe_token == subject.split("\n")[0]
    assert got.unsubscribe_token.startswith("v1.k1.")


def test_reply_tag_is_extracted_once_and_verifies() -> None:
    got = _load("reply_via_tag.eml")
    assert len(got.reply_tags) == 1  # To, Delivered-To and X-Original-To carry the same tag
    assert verify_tag(TAG_RING, got.reply_tags[0]) == "7d1e4b2a-9c3f-4a5b-8e6d-0f1a2b3c4d5e"


def test_decoded_headers() -> None:
    assert _load("iso2022jp_reply.eml").subject == "Re: 会議の件"
    assert _load("windows1251_reply.eml").subject == "Re: Счёт №42"
    assert _load("german_abwesenheitsnotiz.eml").subject == "Abwesenheitsnotiz: Ihre März-Ausgabe"
    assert _load("malformed_mime.eml").subject.startswith("Re: Résumé caf")  # type: ignore[union-attr]
    assert _load("spam_unrelated.eml").subject == "\U0001f4b0 You have won $1,000,000!!!"
    assert _load("gmail_reply_html_plain.eml").date == datetime(2025, 3, 17, 9, 31, 27,
                                                                tzinfo=UTC)


def test_html_of_the_corpus_has_no_markup() -> None:
    text = _load("html_only_script.eml").text
    assert not TAGS.search(text)
    assert "<script" not in text.lower()


# -- rules, one at a time ---------------------------------------------------------


def message(*headers: str, body: str = "Thanks!\n",
            ctype: str = "text/plain; charset=utf-8") -> bytes:
    lines = ["From: Ada <ada@example.org>", "To: news@example.com", "Subject: Re: hello",
             *headers, "MIME-Version: 1.0", f"Content-Type: {ctype}", "", body]
    return "\r\n".join(lines).encode("utf-8")


def test_in_reply_to_wins_over_references() -> None:
    other = "11111111-2222-4333-8444-555555555555"
    got = classify_inbound(message(f"In-Reply-To: <{MID}@example.com>",
                                   f"References: <{MID}@example.com> <{other}@example.com>"))
    assert (got.kind, got.message_id) == ("reply", MID)


def test_latest_reference_of_ours_wins() -> None:
    older = "11111111-2222-4333-8444-555555555555"
    got = classify_inbound(
        message(f"References: <{older}@example.com>\r\n <{MID.upper()}@example.com>"))
    assert got.message_id == MID  # canonical lower-case text


@pytest.mark.parametrize("ref", ["<not-a-uuid@example.com>", f"<{MID}>", f"{MID}@example.com",
                                 f"<{MID.replace('-', '')}@example.com>",
                                 f"<{MID[:-1]}g@example.com>"])
def test_references_that_are_not_ours_do_not_thread(ref: str) -> None:
    got = classify_inbound(message(f"In-Reply-To: {ref}"))
    assert (got.kind, got.message_id) == ("unmatched", None)
    assert got.reason


def test_domains_limit_whose_ids_count() -> None:
    raw = message(f"In-Reply-To: <{MID}@elsewhere.example.net>")
    assert classify_inbound(raw).message_id == MID
    assert classify_inbound(raw, domains=["Example.com"]).message_id is None


@pytest.mark.parametrize("header", ["Auto-Submitted: auto-replied",
                                   "Auto-Submitted: auto-generated", "X-Autorespond: on",
                                   "Precedence: bulk", "Precedence: junk", "Precedence: auto_reply",
                                   "X-MS-Exchange-Inbox-Rules-Loop: ada@example.org"])
def test_auto_reply_headers(header: str) -> None:
    got = classify_inbound(message(header, f"In-Reply-To: <{MID}@example.com>"))
    assert (got.kind, got.message_id) == ("auto_reply", MID)


@pytest.mark.parametrize("subject", ["Automatic reply: hello", "Out of Office: hello",
                                     "Réponse automatique : hello", "Abwesenheitsnotiz: hallo",
                                     "AutoReply: hello"])
def test_auto_reply_subjects(subject: str) -> None:
    raw = message(f"In-Reply-To: <{MID}@example.com>").replace(
        b"Subject: Re: hello", f"Subject: {subject}".encode())
    assert classify_inbound(raw).kind == "auto_reply"


def test_auto_submitted_no_is_a_person() -> None:
    got = classify_inbound(message("Auto-Submitted: no", f"In-Reply-To: <{MID}@example.com>"))
    assert got.kind == "reply"


def test_unsubscribe_beats_auto_reply_headers_and_long_tokens_are_refused() -> None:
    token = "v1.k1.eyJt.c2ln"
    raw = message("Auto-Submitted: auto-generated").replace(
        b"Subject: Re: hello", f"Subject: unsubscribe-{token}".encode())
    got = classify_inbound(raw)
    assert (got.kind, got.unsubscribe_token) == ("unsubscribe", token)
    huge = message().replace(b"Subject: Re: hello",
                             b"Subject: unsubscribe-v1.k1." + b"A" * 5000 + b".c2ln")
    got = classify_inbound(huge)
    assert (got.kind, got.unsubscribe_token) == ("unmatched", None)


def test_feedback_that_is_not_a_complaint() -> None:
    raw = message(ctype='multipart/report; report-type=feedback-report; boundary="b"', body=(
        "--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: not-spam\r\n"
        "Original-Rcpt-To: <ada@example.org>\r\n\r\n--b--\r\n"))
    got = classify_inbound(raw)
    assert (got.kind, got.feedback_type) == ("unmatched", "not-spam")
    assert got.complaint_recipient is None


def test_global_delivery_status_of_smtputf8_mail() -> None:
    raw = message(ctype='multipart/report; report-type=global-delivery-status; boundary="b"',
                  body=("--b\r\nContent-Type: message/global-delivery-status\r\n\r\n"
                        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
                        "Final-Recipient: utf-8; jürgen@example.net\r\nAction: failed\r\n"
                        "Status: 5.1.1\r\n\r\n"
                        "--b\r\nContent-Type: message/global-headers\r\n\r\n"
                        f"Message-ID: <{MID}@example.com>\r\n\r\n--b--\r\n"))
    got = classify_inbound(raw)
    assert (got.kind, got.message_id) == ("dsn", MID)
    assert got.dsn == (DsnResult("jürgen@example.net", "failed", "5.1.1", "hard", None),)


@pytest.mark.parametrize(("action", "status", "diagnostic", "expected"), [
    ("failed", "5.1.1", None, "hard"),
    ("failed", "5.1.10", None, "hard"),
    ("failed", "5.7.1", None, "hard"),
    ("failed", "5.2.2", None, "soft"),
    ("failed", "5.4.7", None, "soft"),
    ("failed", "4.2.2", None, "soft"),
    ("failed", None, "550 User unknown", "hard"),
    ("failed", None, "421 try later", "soft"),
    ("failed", None, "it did not work", "unknown"),
    ("failed", "2.0.0", None, "unknown"),
    ("delayed", "4.4.7", None, None),
    ("delivered", "2.0.0", None, None),
    ("relayed", "2.0.0", None, None),
])
def test_bounce_class(action: str, status: str | None, diagnostic: str | None,
                      expected: str | None) -> None:
    assert bounce_class(action, status, diagnostic) == expected


# -- hostile input ------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00" * 1000,
    bytes(range(256)) * 64,
    b"Subject: only headers",
    b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n--\r\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter at all\r\n",
    b"Content-Type: text/plain; charset=idna\r\n\r\n\xff\xfe caf\xe9\r\n",
    b"Content-Type: text/plain; charset=\"=?utf-8?q?x?=\"\r\n\r\nhi\r\n",
    b"From: \"unterminated <@@@>\r\nTo: ,,,<>,@\r\nDate: Mon, 99 Foo 2025\r\n\r\nhi",
    b"Content-Type: message/rfc822\r\n\r\nnot a message\r\n",
    b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n",
    b"Subject: =?utf-8?b?" + b"A" * 100_000 + b"?=\r\n\r\nhi",
])
def test_garbage_never_raises(raw: bytes) -> None:
    got = classify_inbound(raw)
    assert isinstance(got, Inbound)
    assert got.kind == "unmatched"
    assert got.subject is None or len(got.subject) <= 998


def test_many_parts_are_cut_off() -> None:
    parts = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n"
                    for i in range(MAX_PARTS + 50))
    got = classify_inbound(message(f"In-Reply-To: <{MID}@example.com>",
                                   ctype='multipart/mixed; boundary="b"', body=parts + "--b--\r\n"))
    assert (got.kind, got.message_id) == ("reply", MID)
    assert got.reason and "parts" in got.reason
    assert "part 0" in got.text and f"part {MAX_PARTS + 10}" not in got.text


def test_huge_number_of_parts_is_not_parsed_but_headers_still_count() -> None:
    parts = "--b\r\n\r\nx\r\n" * 20_000
    got = classify_inbound(message(f"In-Reply-To: <{MID}@example.com>",
                                   ctype='multipart/mixed; boundary="b"', body=parts + "--b--\r\n"))
    assert (got.kind, got.message_id, got.text) == ("reply", MID, "")
    assert got.reason and "not read" in got.reason


def nested(depth: int, leaf: str) -> bytes:
    opening = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
                      for i in range(depth))
    closing = "".join(f"\r\n--b{i}--\r\n" for i in reversed(range(depth)))
    head = (f"From: ada@example.org\r\nIn-Reply-To: <{MID}@example.com>\r\nMIME-Version: 1.0\r\n")
    return (head + opening + f"Content-Type: text/plain\r\n\r\n{leaf}" + closing).encode()


def test_nesting_within_the_cap_is_read() -> None:
    assert classify_inbound(nested(MAX_DEPTH - 1, "deep words")).text == "deep words"


def test_nesting_beyond_the_cap_is_not_read() -> None:
    got = classify_inbound(nested(MAX_DEPTH + 5, "too deep"))
    assert (got.kind, got.message_id, got.text) == ("reply", MID, "")
    assert got.reason and "nested" in got.reason


def test_pathological_nesting_does_not_reach_the_recursive_parser() -> None:
    got = classify_inbound(nested(3000, "abyss"))
    assert (got.kind, got.message_id) == ("reply", MID)
    assert got.reason and "not read" in got.reason


def test_huge_text_is_capped() -> None:
    body = ("word " * 1_000_000) + "\r\n"
    got = classify_inbound(message(f"In-Reply-To: <{MID}@example.com>", body=body), max_text=500)
    assert 400 < len(got.text) <= 500
    assert got.text.startswith("word word")


def test_broken_base64_and_unknown_charset() -> None:
    raw = message(f"In-Reply-To: <{MID}@example.com>", "Content-Transfer-Encoding: base64",
                  ctype='text/plain; charset="x-unknown"', body="SGVsbG8gd29ybGQ=*&^%$#\r\n!!")
    got = classify_inbound(raw)
    assert (got.kind, got.message_id) == ("reply", MID)
    assert got.text.startswith("Hello world")


def test_eight_bit_headers_are_read_as_utf8() -> None:
    raw = message(f"In-Reply-To: <{MID}@example.com>").replace(
        b"Subject: Re: hello", "Subject: Re: Grüße".encode())
    assert classify_inbound(raw).subject == "Re: Grüße"


# Script in any of these forms must vanish with its content.
SCRIPTED_HTML = [
    "<script>alert(1)</script><p>visible</p>",
    "<p>visible</p><img src=x onerror=alert(1)>",
    "<p>visible<SCRIPT>alert(1)</SCRIPT></p>",
    "<p>visible</p><script>alert(1)",  # never closed
    "<style>p{x:1}</style><p>visible</p><style>.a{alert(1)}",
    "<p>visible</p><![CDATA[<script>alert(1)</script>]]>",
    "<p>visible</p><!-- <script>alert(1)</script> -->",
    "<p>visible</p><svg><script>alert(1)</script></svg>",
    "<p>visible</p><a href='javascript:alert(1)'>link</a>",
    "<p>visible</p></script><script>alert(1)</script x>",
    "<p>visible</p><iframe srcdoc='<script>alert(1)</script>'>alert(1)</iframe>",
]
# Text that only looks like markup once entities are decoded; it stays, inert.
INERT_HTML = [
    "<p>visible</p>&lt;script&gt;alert(1)&lt;/script&gt;",
    "<p>visible</p>&#60;img src=x onerror=alert(1)&#62;",
    "<p>visible</p><a href='#'>&lt;</a>b",
    "<scr<script>ipt>alert(1)</script><p>visible</p>",  # "scr<script" is the tag's name
    "<p>visible</p><!DOCTYPE <script>>",
    "<html><head><title>t</title><body><p>visible</p>",  # head never closed
    "<p>visible</p><" + "<div>" * 5000 + "x" + "</div>" * 5000,
]


@pytest.mark.parametrize("html", SCRIPTED_HTML + INERT_HTML)
def test_html_to_text_keeps_no_markup(html: str) -> None:
    text = html_to_text(html)
    assert "visible" in text
    assert not TAGS.search(text)


@pytest.mark.parametrize("html", SCRIPTED_HTML)
def test_html_to_text_drops_scripts(html: str) -> None:
    assert "alert" not in html_to_text(html)


def test_entities_that_spell_markup_stay_inert_text() -> None:
    assert html_to_text(INERT_HTML[0]) == "visible\n\u2039script>alert(1)\u2039/script>"


@pytest.mark.parametrize("html", SCRIPTED_HTML + INERT_HTML)
def test_html_only_messages_give_plain_text(html: str) -> None:
    got = classify_inbound(message(f"In-Reply-To: <{MID}@example.com>", body=html,
                                   ctype="text/html; charset=utf-8"))
    assert (got.kind, got.message_id) == ("reply", MID)
    assert "visible" in got.text
    assert not TAGS.search(got.text)


def test_html_drops_quoted_blocks() -> None:
    html = ('<div>New text</div><div class="gmail_quote">On Mon, 3 Mar 2025 X wrote:'
            '<blockquote>old</blockquote></div><div id="divRplyFwdMsg">From: x</div>')
    assert html_to_text(html) == "New text"


# -- text helpers ---------------------------------------------------------------


@pytest.mark.parametrize("quoted", [
    "On Mon, 3 Mar 2025 at 10:00, Ada <ada@example.org> wrote:\n> old",
    "On Mon, 3 Mar 2025 at 10:00, Ada Lovelace <\nada@example.org> wrote:\nold",
    "Am 03.03.2025 um 10:00 schrieb Ada <ada@example.org>:\nalt",
    "Le 3 mars 2025 à 10:00, Ada <ada@example.org> a écrit :\nancien",
    "El lun, 3 mar 2025 a las 10:00, Ada (<ada@example.org>) escribió:\nviejo",
    "Op ma 3 mrt 2025 om 10:00 schreef Ada <ada@example.org>:\noud",
    "-----Original Message-----\nFrom: Ada\nold",
    "-----Ursprüngliche Nachricht-----\nVon: Ada\nalt",
    "________________________________\nFrom: Ada\nSent: Monday\nold",
    "Von: Ada <ada@example.org>\nGesendet: Montag, 3. März 2025 10:00\nAn: Bob\nalt",
    "De : Ada <ada@example.org>\nEnvoyé : lundi 3 mars 2025 10:00\nancien",
    "-- \nAda Lovelace\n+44 20 7946 0000",
    "Sent from my iPhone",
    "Get Outlook for Android",
    "Von meinem iPhone gesendet",
])
def test_strip_reply_removes_history_and_signatures(quoted: str) -> None:
    assert strip_reply(f"New words.\n\n{quoted}\n\nmore") == "New words."


def test_strip_reply_keeps_answers_between_quotes_and_ordinary_lines() -> None:
    text = ("> Can you come?\nYes.\n> At 9?\nOn Monday at 10 I can; I wrote: twice.\n"
            "From: the desk of Ada, sent with love")
    assert strip_reply(text) == ("Yes.\nOn Monday at 10 I can; I wrote: twice.\n"
                                 "From: the desk of Ada, sent with love")


@pytest.mark.parametrize(("data", "charset", "expected"), [
    ("café".encode(), "us-ascii", "café"),
    (b"caf\xe9", "iso-8859-1", "café"),
    (b"\x93quoted\x94", "iso-8859-1", "\u201cquoted\u201d"),
    ("café".encode(), "x-unknown", "café"),
    ("café".encode(), "idna", "café"),
    ("café".encode(), "base64", "café"),
    (b"caf\xff", None, "caf\ufffd"),
])
def test_decode_bytes(data: bytes, charset: str | None, expected: str) -> None:
    assert decode_bytes(data, charset) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("=?utf-8?q?caf=C3=A9?= =?utf-8?q?_au_lait?=", "café au lait"),
    ("Re: =?UTF-8*en?B?R3LDvMOfZQ==?= and more", "Re: Grüße and more"),
    ("plain\r\n folded", "plain folded"),
    ("=?utf-8?q?a?=\x00\x07b", "ab"),
    ("=?nonsense?x?abc?=", "=?nonsense?x?abc?="),
])
def test_decode_raw_header(raw: str, expected: str) -> None:
    assert decode_raw_header(raw) == expected


def test_an_attribution_without_a_date_goes_only_before_a_quote() -> None:
    assert strip_reply("Count me in.\n\nOn Mon, Ada wrote:\n> Are you coming?\n") == (
        "Count me in.")
    kept = "Sure.\nOn reflection, what I wrote: still holds.\nBye"
    assert strip_reply(kept) == kept


# -- what the linear-time rewrite keeps ---------------------------------------------


@pytest.mark.parametrize(("html", "text"), [
    ('<a title="x>y">link</a> after', "link after"),  # ">" inside a quoted value
    ("<p>new</p><div class='x gmail_quote'>old</div>", "new"),
    ("<p>new</p><div class=gmail_quote>old</div>", "new"),
    ("<p>new</p><DIV ID=divRplyFwdMsg>From: old</DIV>", "new"),
    ("<p>a</p><!-- hidden --!> b", "a\nb"),
    ("<p>a &#99999999999999999999; b</p>", "a \ufffd b"),  # out of range
    # More digits than int() converts: kept as it was, not an exception.
    ("<p>a &#" + "9" * 5000 + "; b</p>", "a &#" + "9" * 5000 + "; b"),
    ("<title>t</title><style>p{}</style><p>x &lt; y</p>", "x < y"),
    ("<textarea><b>typed</b></textarea>", "\u2039b>typed\u2039/b>"),
])
def test_html_conversion(html: str, text: str) -> None:
    assert html_to_text(html) == text


def test_a_quoted_id_after_many_blank_lines_is_found() -> None:
    raw = ("From: MAILER-DAEMON@example.net\r\nReturn-Path: <>\r\nSubject: Undelivered Mail\r\n"
           "Content-Type: text/plain\r\n\r\n550 5.1.1 <gone@example.net>: no such user\r\n"
           + "\r\n" * 5000 + f"  X-Mailbus-Message-Id: {MID}  \r\n").encode()
    got = classify_inbound(raw, domains=OURS)
    assert (got.kind, got.message_id) == ("dsn", MID)
    assert [(r.recipient, r.status) for r in got.dsn] == [("gone@example.net", "5.1.1")]


def test_a_long_content_type_keeps_the_parameters_it_starts_with() -> None:
    ctype = "text/plain; charset=iso-8859-1; " + "x=y; " * 2000
    got = classify_inbound(message(f"In-Reply-To: <{MID}@example.com>", ctype=ctype).replace(
        b"Thanks!", "Gr\u00fc\u00dfe".encode("latin-1")), domains=OURS)
    assert (got.kind, got.text) == ("reply", "Gr\u00fc\u00dfe")


def test_deeply_nested_comments_in_from_still_give_a_verdict() -> None:
    got = classify_inbound(message(f"In-Reply-To: <{MID}@example.com>").replace(
        b"From: Ada <ada@example.org>", b"From: " + b"(" * 5000 + b"ada@example.org"))
    assert (got.kind, got.message_id) == ("reply", MID)
