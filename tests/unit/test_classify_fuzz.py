"""The classifier against generated and adversarial mail: always a verdict, in linear work.

Hypothesis runs a bounded number of examples (a few seconds in all). The 1 MB
inputs aim at each pattern's worst case; their CPU time is printed (pytest -s),
not asserted: what is asserted is the verdict, and that the same inputs come
back through the deadline sandbox (`sandbox.py`) classified, not abandoned.
"""

from __future__ import annotations

import asyncio
import base64
import os
import quopri
import time
from collections.abc import Callable, Iterator
from email.header import Header

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbus.replies.classify import MAX_RECIPIENTS, MAX_SUBJECT, Inbound, classify_inbound
from mailbus.replies.sandbox import Sandbox

MID = "0b6f5a8e-2c1d-4c5e-9a43-1e2f3a4b5c6d"
OURS = ("example.com",)
KINDS = {"dsn", "complaint", "auto_reply", "reply", "unsubscribe", "unmatched"}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(got: Inbound, max_text: int = 10_000) -> None:
    """What holds for any verdict: a known kind, bounded fields, no fallback on a crash."""
    assert isinstance(got, Inbound) and got.kind in KINDS
    # classify_inbound() turns an exception into this reason; none may reach it.
    assert not (got.reason or "").startswith("unreadable message"), got.reason
    assert len(got.text) <= max_text
    assert got.subject is None or len(got.subject) <= MAX_SUBJECT
    assert len(got.dsn) <= MAX_RECIPIENTS
    assert "<script" not in got.text.lower()


# -- any bytes ------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=4096))
def test_any_bytes_give_a_verdict(raw: bytes) -> None:
    check(classify_inbound(raw, domains=OURS))


LINE_PIECES = st.sampled_from([
    b"\r\n", b"\n", b"\r", b" ", b"\t", b"From: ", b"To: ", b"Subject: ", b"Content-Type: ",
    b"multipart/mixed; boundary=b", b"multipart/report; report-type=delivery-status",
    b"message/delivery-status", b"message/rfc822", b"text/html", b"--b", b"--b--",
    b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
    b"=?utf-8?b?w6k=?=", b"=?iso-8859-1?q?=E9t=E9?=", b"=?", b"?=", b"<", b">", b"@", b"a@b.c",
    b"Action: failed", b"Final-Recipient: rfc822; x@y.z", b"Status: 5.1.1", b"(", b")",
    b"\"", b";", b"=", b"X-Mailbus-Message-Id: " + MID.encode(), b"\xe2\x80\xa8", b"\xc2\x85",
    b"\x00", b"\xff", b"<div class=gmail_quote>", b"<!--", b"&#", b"On Mon, Ada wrote:", b">",
])


@FUZZ
@given(st.lists(LINE_PIECES, max_size=200))
def test_mail_shaped_bytes_give_a_verdict(pieces: list[bytes]) -> None:
    check(classify_inbound(b"".join(pieces), domains=OURS))


# -- structured mail --------------------------------------------------------------

WORDS = st.text(alphabet=st.sampled_from("abcXYZ019 éüßçøñ日本語€😀"), min_size=1,
                max_size=60).map(lambda t: " ".join(t.split())).filter(bool)
LOCAL = st.text(alphabet="abcdefghij0123456789._+-", min_size=1, max_size=20).filter(
    lambda t: t[0] not in ".-" and t[-1] not in ".-" and ".." not in t)
ADDRESSES = st.builds(lambda local, domain: f"{local}@{domain}.example", LOCAL,
                      st.sampled_from(["mx", "net", "org"]))
STATUS = st.sampled_from(["5.1.1", "5.2.2", "4.4.7", "5.7.1", "2.0.0"])
ACTION = {"5.1.1": "failed", "5.2.2": "failed", "4.4.7": "delayed", "5.7.1": "failed",
          "2.0.0": "delivered"}


def encode_body(text: str, how: str) -> tuple[str, str]:
    """The body text in a transfer encoding, and that encoding's header value."""
    data = text.encode()
    if how == "base64":
        return base64.encodebytes(data).decode(), "base64"
    if how == "quoted-printable":
        return quopri.encodestring(data).decode(), "quoted-printable"
    return text, "8bit"


def wrap(part: str, depth: int, noise: int) -> str:
    """`part` nested `depth` multiparts deep, each with `noise` unrelated parts before it."""
    for level in range(depth):
        boundary = f"=_level{level}"
        others = "".join(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
                         f"noise {n}\r\n" for n in range(noise))
        part = (f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n{others}"
                f"--{boundary}\r\n{part}\r\n--{boundary}--\r\n")
    return part


@FUZZ
@given(recipients=st.lists(ADDRESSES, min_size=1, max_size=5, unique=True), status=STATUS,
       depth=st.integers(0, 4), noise=st.integers(0, 3),
       encoding=st.sampled_from(["8bit", "base64", "quoted-printable"]), explanation=WORDS)
def test_a_multipart_dsn_names_each_recipient(recipients: list[str], status: str, depth: int,
                                              noise: int, encoding: str,
                                              explanation: str) -> None:
    fields = "".join(f"\r\nFinal-Recipient: rfc822; {r}\r\nAction: {ACTION[status]}\r\n"
                     f"Status: {status}\r\n" for r in recipients)
    text, cte = encode_body(explanation, encoding)
    report = (
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"=_r\"\r\n\r\n"
        "--=_r\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n{text}\r\n"
        "--=_r\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.net\r\n{fields}\r\n"
        "--=_r\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{MID}@example.com>\r\nX-Mailbus-Message-Id: {MID}\r\n\r\n"
        "--=_r--\r\n")
    raw = ("From: MAILER-DAEMON@mx.example.net\r\nTo: news@example.com\r\n"
           "Subject: Undelivered Mail\r\n" + wrap(report, depth, noise)).encode()
    got = classify_inbound(raw, domains=OURS)
    check(got)
    assert (got.kind, got.message_id) == ("dsn", MID)
    assert [(r.recipient, r.action, r.status) for r in got.dsn] == [
        (r.lower(), ACTION[status], status) for r in recipients]


@FUZZ
@given(subject=WORDS, charset=st.sampled_from(["utf-8", "utf-16", "gb18030"]),
       sender=WORDS, body=WORDS, depth=st.integers(0, 3),
       encoding=st.sampled_from(["8bit", "base64", "quoted-printable"]))
def test_encoded_words_come_back_as_the_text(subject: str, charset: str, sender: str,
                                             body: str, depth: int, encoding: str) -> None:
    text, cte = encode_body(body, encoding)
    part = (f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {cte}"
            f"\r\n\r\n{text}\r\n")
    raw = (f"From: {Header(sender, charset).encode()} <ada@example.org>\r\n"
           f"Subject: {Header(subject, charset).encode()}\r\n"
           f"In-Reply-To: <{MID}@example.com>\r\n" + wrap(part, depth, 1)).encode()
    got = classify_inbound(raw, domains=OURS)
    check(got)
    assert (got.kind, got.message_id, got.sender) == ("reply", MID, "ada@example.org")
    assert got.subject == subject
    assert got.text == body


# -- 1 MB aimed at each pattern -----------------------------------------------------

SIZE = 1_000_000


def bounce(body: str) -> bytes:
    return ("From: MAILER-DAEMON@example.net\r\nTo: news@example.com\r\nReturn-Path: <>\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nContent-Type: text/plain\r\n\r\n"
            + body).encode()


def encoded_bounce(body: bytes, cte: str) -> bytes:
    return (b"From: MAILER-DAEMON@example.net\r\nReturn-Path: <>\r\n"
            b"Subject: Undelivered Mail Returned to Sender\r\nContent-Type: text/plain\r\n"
            b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + body)


def reply(body: str, ctype: str = "text/plain") -> bytes:
    return ("From: ada@example.org\r\nTo: news@example.com\r\nSubject: Re: Friday\r\n"
            f"In-Reply-To: <{MID}@example.com>\r\nContent-Type: {ctype}; charset=utf-8\r\n\r\n"
            + body).encode()


def header(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\nFrom: ada@example.org\r\n\r\nbody\r\n".encode()


def report(part: str, ctype: str = "message/delivery-status") -> bytes:
    return ("From: MAILER-DAEMON@example.net\r\nContent-Type: multipart/report; "
            "report-type=delivery-status; boundary=b\r\n\r\n--b\r\n"
            f"Content-Type: {ctype}\r\n\r\n{part}\r\n--b--\r\n").encode()


def times(piece: str) -> str:
    return piece * (SIZE // len(piece))


# name -> (input, the kind it must still be classified as)
ADVERSARIAL: dict[str, tuple[Callable[[], bytes], str]] = {
    # _QUOTED_OURS / _QUOTED_MSGID / _QUOTED_HEADER: leading blanks under re.M.
    "bounce of blank lines": (lambda: bounce("\n" * SIZE), "dsn"),
    "bounce of CRLF blank lines": (lambda: bounce("\r\n" * (SIZE // 2)), "dsn"),
    "bounce of blank-space lines": (lambda: bounce(times(" \n")), "dsn"),
    "bounce of one line of spaces": (lambda: bounce(" " * SIZE), "dsn"),
    "bounce of tab, VT, FF lines": (lambda: bounce(times("\t\n\x0b\x0c")), "dsn"),
    "bounce of unicode line separators": (lambda: bounce(times("\u2028\x85\x0c")), "dsn"),
    # The same, behind a transfer encoding: the raw bytes show no blank line at all.
    "bounce of blank lines in base64": (lambda: encoded_bounce(
        base64.encodebytes(b"\n" * (SIZE * 3 // 4)), "base64"), "dsn"),
    "bounce of blank lines as =0A": (lambda: encoded_bounce(
        b"=0A" * (SIZE // 3), "quoted-printable"), "dsn"),
    "X-Mailbus-Message-Id: repeated": (lambda: bounce(times("X-Mailbus-Message-Id: \n")),
                                       "dsn"),
    "X-Mailbus-Message-Id: and spaces": (lambda: bounce("X-Mailbus-Message-Id:" + " " * SIZE),
                                         "dsn"),
    "Message-ID: < repeated": (lambda: bounce(times("Message-ID: <")), "dsn"),
    # _ADDRESS: local-part runs without "@", fragments, dotted domains.
    "one local-part run": (lambda: bounce("a" * SIZE), "dsn"),
    "a@a.a fragments": (lambda: bounce(times("a@a.a")), "dsn"),
    "a@a.a.a... domain": (lambda: bounce("a@" + times("a.")), "dsn"),
    "long local parts before @": (lambda: bounce(times("a" * 1000 + "@")), "dsn"),
    "digits and dots": (lambda: bounce(times("5.1.1.")), "dsn"),
    "SMTP codes run together": (lambda: bounce(times("550")), "dsn"),
    # strip_reply: attribution, separator and signature patterns per line.
    "reply of blank lines": (lambda: reply("\n" * SIZE), "reply"),
    "reply of one U+2028 line": (lambda: reply("\u2028" * (SIZE // 3)), "reply"),
    "attribution openers": (lambda: reply(times("On 1\n")), "reply"),
    "On without wrote": (lambda: reply("On 1 " + "x" * SIZE), "reply"),
    "Am ... schrieb lines": (lambda: reply(times("Am " + "schrieb " * 70 + "\n")), "reply"),
    "quoted lines": (lambda: reply(times("> \n")), "reply"),
    "one line of dashes": (lambda: reply("-" * SIZE), "reply"),
    "From: lines": (lambda: reply(times("From: \n")), "reply"),
    "Sent from my and spaces": (lambda: reply("Sent from my " + " " * SIZE), "reply"),
    "soft line breaks (qp)": (lambda: reply("=\n" * (SIZE // 2)).replace(
        b"charset=utf-8", b"charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"),
        "reply"),
    # html_to_text.
    "html: one tag, huge attribute list": (lambda: reply("<a " + times("b=1 ") + ">x",
                                                         "text/html"), "reply"),
    "html: class=\" repeated": (lambda: reply("<a " + times('class="') + ">", "text/html"),
                                "reply"),
    "html: unclosed <a": (lambda: reply(times("<a"), "text/html"), "reply"),
    "html: unclosed quotes": (lambda: reply(times('<a "'), "text/html"), "reply"),
    "html: <!-- never closed": (lambda: reply(times("<!--"), "text/html"), "reply"),
    "html: nested divs": (lambda: reply(times("<div>"), "text/html"), "reply"),
    "html: open and close": (lambda: reply(times("<b></i>"), "text/html"), "reply"),
    "html: lone <": (lambda: reply("<" * SIZE, "text/html"), "reply"),
    "html: <script> never closed": (lambda: reply(times("<script>"), "text/html"), "reply"),
    "html: numeric entities": (lambda: reply("&#" + "9" * SIZE, "text/html"), "reply"),
    # Header values the stdlib parses: Content-Type parameters, addresses, encoded words.
    "Content-Type parameters": (lambda: header("Content-Type", "text/plain; "
                                               + times("a=b; ")), "unmatched"),
    "Content-Type quote and semicolons": (lambda: header("Content-Type", 'text/plain; a="'
                                                         + ";" * SIZE), "unmatched"),
    "RFC 2231 sections": (lambda: header("Content-Type", "text/plain; " + "".join(
        f"a*{i}=b; " for i in range(SIZE // 10))), "unmatched"),
    "encoded words in a parameter": (lambda: header(
        "Content-Type", 'text/plain; name="' + times("=?utf-8?q?a?= ") + '"'), "unmatched"),
    "encoded words in Subject": (lambda: header("Subject", times("=?utf-8?q?a?= ")),
                                 "unmatched"),
    "=? in Subject": (lambda: header("Subject", "=?" * (SIZE // 2)), "unmatched"),
    "From: nested comments": (lambda: header("From", "(" * SIZE), "unmatched"),
    "From: angle brackets": (lambda: header("From", "<" * SIZE), "unmatched"),
    "To: many addresses": (lambda: header("To", times("a@b, ")), "unmatched"),
    "folded header": (lambda: header("Subject", "a" + "\r\n " * (SIZE // 3)), "unmatched"),
    "References: many ids": (lambda: header("References", times(f"<{MID}@x")), "unmatched"),
    "many header fields": (lambda: ("X-A: b\r\n" * (SIZE // 8) + "\r\nx").encode(),
                           "unmatched"),
    # MIME structure and reports.
    "many parts": (lambda: ("Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                            + times("--b\r\n\r\n")).encode(), "unmatched"),
    "deeply nested parts": (lambda: "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n"
        for i in range(SIZE // 60)).encode(), "unmatched"),
    "report of blank blocks": (lambda: report(times("\n \n")), "unmatched"),
    "report of many blocks": (lambda: report(times("Action: failed\n\n")), "unmatched"),
    "report of folded lines": (lambda: report("A: b\n" + times("\n\t"),
                                              "message/global-delivery-status"), "unmatched"),
    "long line without newline": (lambda: b"x" * SIZE, "unmatched"),
    "NUL bytes": (lambda: b"\0" * SIZE, "unmatched"),
    "bare CRs": (lambda: b"Subject: x\r\r\r" + b"\r" * SIZE, "unmatched"),
    "base64 without padding": (lambda: b"Content-Transfer-Encoding: base64\r\n\r\n" + b"A" * SIZE,
                               "unmatched"),
}


@pytest.fixture(scope="module")
def sandboxed() -> Iterator[Callable[[bytes], Inbound]]:
    """classify_inbound() through one sandbox for the module (its queue lives on one loop)."""
    loop = asyncio.new_event_loop()
    sandbox = Sandbox(deadline=120.0, workers=1)
    try:
        yield lambda raw: loop.run_until_complete(sandbox.classify_inbound(raw, domains=OURS))
    finally:
        sandbox.close()
        loop.close()


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_a_megabyte_aimed_at_a_pattern_is_classified(
        name: str, sandboxed: Callable[[bytes], Inbound]) -> None:
    make, kind = ADVERSARIAL[name]
    raw = make()
    started = time.process_time()
    got = classify_inbound(raw, domains=OURS)
    spent = time.process_time() - started
    print(f"\n{spent * 1000:8.1f} ms CPU  {len(raw):>9,} bytes  {name}")
    check(got)
    assert got.kind == kind
    # The same mail through the deadline wrapper: it returns, with the same verdict.
    assert sandboxed(raw) == got


# -- the deadline -----------------------------------------------------------------------


def stalling(raw: bytes, *, domains: tuple[str, ...] = ()) -> Inbound:
    """classify_inbound(), except that mail starting STALL spins like a backtracking pattern, and
    mail starting DIE kills the worker."""
    if raw.startswith(b"STALL"):
        while True:
            pass
    if raw.startswith(b"DIE"):
        os._exit(3)
    return classify_inbound(raw, domains=domains)


def test_a_stalled_classification_is_abandoned_and_the_next_mail_is_classified() -> None:
    async def scenario() -> None:
        sandbox = Sandbox(deadline=1.0, workers=1, target=stalling)
        try:
            stalled = await sandbox.classify_inbound(b"STALL" + reply("hello"), domains=OURS)
            assert (stalled.kind, stalled.quarantined) == ("unmatched", True)
            assert stalled.reason == "classification did not finish within 1 s"
            died = await sandbox.classify_inbound(b"DIE", domains=OURS)
            assert (died.quarantined, died.reason) == (True, "the classifier worker died")
            after = await sandbox.classify_inbound(reply("Yes, see you Friday."), domains=OURS)
            assert (after.kind, after.message_id, after.text) == (
                "reply", MID, "Yes, see you Friday.")
            assert not after.quarantined and sandbox.abandoned == 2
        finally:
            sandbox.close()

    asyncio.run(scenario())
