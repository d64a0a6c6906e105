"""Composing messages: MIME structure, headers, links, injection resistance, DKIM."""

from __future__ import annotations

import base64
import email
import re
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbus.accounts import Account, SmtpAccount
from mailbus.sender.compose import ComposeFailed, compose, html_to_text
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.templates import TemplateFailed
from mailbus.tokens import Keyring, LinkBuilder, verify

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
MID = "0b6f3c1e-8a47-4f5e-9d0c-2f1a7e6b5c4d"
HOOKS = "https://hooks.example.org"
INJECT = "x@y.z\r\nBcc: victim@evil"
ACCOUNT = Account(id="billing", kind="smtp", from_address="billing@example.com",
                  from_name="Billing", smtp=SmtpAccount(host="127.0.0.1"))
RING = Keyring({"k1": b"k" * 32}, "k1")
LINKS = LinkBuilder(RING, HOOKS, timedelta(days=30), "unsubscribe@example.com")


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "7d1f0c34-2b9a-4c55-8f1e-3a6b9c0d2e4f", "message_id": MID,
        "account_id": "billing", "to": [{"email": "ada@example.org", "name": "Ada Lovelace"}],
        "cc": [], "bcc": [], "reply_to": None, "subject": "Your receipt",
        "text": "Thanks for your order.\n", "html": None, "template": None, "actions": [],
        "tags": [], "metadata": {}, "send_at": None, "requested_at": NOW,
    }
    return base | overrides


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def well_formed(raw: bytes) -> None:
    assert raw.isascii(), "8-bit data: headers must be RFC 2047, bodies QP/base64"
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def content(part: EmailMessage) -> str:
    # The parser keeps the wire's CRLF in 7bit payloads; compare with plain newlines.
    return part.get_content().replace("\r\n", "\n")


def bodies(message: EmailMessage) -> list[tuple[str, str]]:
    return [(p.get_content_type(), content(p)) for p in message.walk() if not p.is_multipart()]


def test_text_only() -> None:
    out = compose(event(), ACCOUNT, None, now=NOW)
    well_formed(out.raw)
    msg = parse(out.raw)
    assert msg.get_content_type() == "text/plain" and msg.get_content_charset() == "utf-8"
    assert content(msg) == "Thanks for your order.\n"
    assert str(msg["From"]) == "Billing <billing@example.com>"
    assert str(msg["To"]) == "Ada Lovelace <ada@example.org>"
    assert msg["Subject"] == "Your receipt"
    assert msg["Date"] == "Fri, 14 Mar 2025 09:26:53 +0000"
    assert msg["Date"].datetime == NOW
    assert msg["Message-ID"] == f"<{MID}@example.com>" == out.message_id_header
    assert msg["MIME-Version"] == "1.0" and msg["X-Mailbus-Message-Id"] == MID
    for absent in ("Cc", "Bcc", "Reply-To", "List-Unsubscribe", "List-Unsubscribe-Post"):
        assert msg[absent] is None
    assert out.envelope_from == "billing@example.com" and out.recipients == ["ada@example.org"]


def test_text_and_html_make_multipart_alternative_text_first() -> None:
    out = compose(event(html="<p>Thanks for <b>your</b> order.</p>"), ACCOUNT, None, now=NOW)
    well_formed(out.raw)
    msg = parse(out.raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert bodies(msg) == [("text/plain", "Thanks for your order.\n"),
                           ("text/html", "<p>Thanks for <b>your</b> order.</p>\n")]
    assert out.raw.count(b"MIME-Version") == 1


def test_html_only_gets_a_derived_text_part() -> None:
    html = ("<html><head><title>t</title><style>p{color:red}</style></head><body>"
            "<h1>Hello&nbsp;Ada</h1><p>Your <a href='https://example.com/o/1'>order</a> "
            "&amp; more.</p><ul><li>tea</li><li>cake</li></ul>"
            "<script>steal()</script></body></html>")
    msg = parse(compose(event(text=None, html=html), ACCOUNT, None, now=NOW).raw)
    (_, text), (html_type, html_body) = bodies(msg)
    assert html_type == "text/html" and html_body == html + "\n"
    assert text == ("Hello Ada\n\nYour order <https://example.com/o/1> & more.\n\n"
                    "- tea\n- cake\n")
    assert "steal" not in text and "color" not in text


def test_html_to_text_is_plain() -> None:
    assert html_to_text("") == ""
    assert html_to_text("a<br>b<br/>c") == "a\nb\nc\n"
    assert html_to_text('<a href="javascript:x()">x</a>') == "x\n"


def test_template_parts_win_and_event_fills_in() -> None:
    template = {"subject": None, "text": "Hi {{ name }}", "html": "<p>Hi {{ name }}</p>",
                "variables_json": '{"name": "<Ada>"}'}
    msg = parse(compose(event(template=template, text="ignored"), ACCOUNT, None, now=NOW).raw)
    assert msg["Subject"] == "Your receipt"
    assert bodies(msg) == [("text/plain", "Hi <Ada>\n"), ("text/html", "<p>Hi &lt;Ada&gt;</p>\n")]


def test_template_only() -> None:
    template = {"subject": "Order {{ n }}", "text": None, "html": "<p>{{ n }}</p>",
                "variables_json": '{"n": 4711}'}
    msg = parse(compose(event(template=template, subject=None, text=None), ACCOUNT, None,
                        now=NOW).raw)
    assert msg["Subject"] == "Order 4711"
    assert bodies(msg) == [("text/plain", "4711\n"), ("text/html", "<p>4711</p>\n")]


def test_template_failure_propagates() -> None:
    template = {"subject": "{{ missing }}", "text": "x", "html": None, "variables_json": "{}"}
    with pytest.raises(TemplateFailed, match="subject"):
        compose(event(template=template), ACCOUNT, None, now=NOW)


def test_utf8_subject_names_and_body_are_encoded_and_decode_back() -> None:
    subject = "Grüße aus Köln — 日本語のテキスト, \"quoted\" " * 3
    account = ACCOUNT.model_copy(update={"from_name": "Zoë \"Z\", Büro"})
    out = compose(event(subject=subject, text="Ünïcödé body ✓\n" * 3, html="<p>Grüße ✓</p>",
                        to=[{"email": "b@example.org", "name": "Smith, John \"JJ\""},
                            {"email": "c@example.org", "name": "Jürgen Müller"}],
                        reply_to={"email": "help@example.com", "name": "Hélp, Desk"}),
                  account, None, now=NOW)
    well_formed(out.raw)
    head = out.raw.split(b"\r\n\r\n")[0].decode()
    assert "=?utf-8?" in head and "Grüße" not in head
    msg = parse(out.raw)
    assert msg["Subject"] == " ".join(subject.split())
    assert msg["From"].addresses[0].display_name == "Zoë \"Z\", Büro"
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Smith, John \"JJ\"", "b@example.org"), ("Jürgen Müller", "c@example.org")]
    assert msg["Reply-To"].addresses[0].display_name == "Hélp, Desk"
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert {p["Content-Transfer-Encoding"] for p in parts} <= {"quoted-printable", "base64"}
    assert [content(p) for p in parts] == ["Ünïcödé body ✓\n" * 3, "<p>Grüße ✓</p>\n"]


def test_long_lines_stay_within_limits() -> None:
    out = compose(event(subject="word " * 190, text="x" * 5000, html="<p>" + "y" * 5000),
                  ACCOUNT, None, now=NOW)
    well_formed(out.raw)
    text, html = (body for _, body in bodies(parse(out.raw)))
    assert text == "x" * 5000 + "\n" and html == "<p>" + "y" * 5000 + "\n"


def test_hundred_recipients_dedup_and_bcc_only_in_envelope() -> None:
    to = [{"email": f"to{i}@example.org", "name": f"To {i}"} for i in range(40)]
    cc = [{"email": f"cc{i}@example.org", "name": None} for i in range(30)]
    bcc: list[dict[str, str | None]] = [{"email": f"bcc{i}@example.net", "name": "Hidden"}
                                        for i in range(28)]
    bcc += [{"email": "TO0@Example.org", "name": None}, {"email": "cc3@EXAMPLE.ORG", "name": None}]
    out = compose(event(to=to, cc=cc, bcc=bcc), ACCOUNT, None, now=NOW)
    well_formed(out.raw)
    assert out.recipients == ([a["email"] for a in to] + [a["email"] for a in cc]
                              + [a["email"] for a in bcc[:28]])
    msg = parse(out.raw)
    assert [a.addr_spec for a in msg["To"].addresses] == [a["email"] for a in to]
    assert len(msg["Cc"].addresses) == 30 and msg["Bcc"] is None
    assert b"bcc0@" not in out.raw and b"Hidden" not in out.raw


def test_idn_domains_become_punycode() -> None:
    out = compose(event(to=[{"email": "ada@bücher.example", "name": None}]), ACCOUNT, None,
                  now=NOW)
    assert out.recipients == ["ada@xn--bcher-kva.example"]


def test_message_id_domain_override_and_validation() -> None:
    out = compose(event(), ACCOUNT, None, now=NOW, domain="mail.example.net")
    assert out.message_id_header == f"<{MID}@mail.example.net>"
    assert parse(out.raw)["Message-ID"] == out.message_id_header
    with pytest.raises(ComposeFailed):
        compose(event(), ACCOUNT, None, now=NOW, domain="bad domain>\r\nX: y")


def test_list_unsubscribe_tokens_verify() -> None:
    # The same address in To and Cc is one recipient: the links may name it.
    out = compose(event(to=[{"email": "Ada@Example.org", "name": None}],
                        cc=[{"email": "ada@example.org", "name": "Ada"}]),
                  ACCOUNT, LINKS, now=NOW)
    assert out.recipients == ["Ada@example.org"]  # the domain is normalised
    well_formed(out.raw)
    msg = parse(out.raw)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https, mailto = re.findall(r"<([^>]+)>", msg["List-Unsubscribe"])
    claims = verify(RING, https.removeprefix(f"{HOOKS}/u/"), now=NOW)
    assert (claims.message_id, claims.recipient, claims.action) == (
        MID, "ada@example.org", "unsubscribe")
    assert claims.expires_at == NOW + timedelta(days=30)
    assert mailto.startswith("mailto:unsubscribe@example.com?subject=unsubscribe-")
    token = unquote(mailto.partition("?subject=")[2]).removeprefix("unsubscribe-")
    assert verify(RING, token, now=NOW).recipient == "ada@example.org"


@pytest.mark.parametrize("others", [
    {"to": [{"email": "ada@example.org", "name": None},
            {"email": "bob@example.org", "name": None}]},
    {"cc": [{"email": "bob@example.org", "name": None}]},
    {"bcc": [{"email": "bob@example.org", "name": None}]},
])
def test_a_message_to_several_recipients_names_none_in_its_links(others: dict) -> None:
    # One copy's links reach every recipient: a click cannot say who made it, and
    # Bob's unsubscribe button must not unsubscribe Ada.
    tracking = LinkBuilder(RING, HOOKS, timedelta(days=30), "unsubscribe@example.com",
                           open_tracking=True)
    out = compose(event(html="<p>Hi</p>", actions=[{"id": "yes", "label": "Yes", "url": None}],
                        **others), ACCOUNT, tracking, now=NOW)
    well_formed(out.raw)
    assert len(out.recipients) == 2
    msg = parse(out.raw)
    assert msg["List-Unsubscribe"] is None and msg["List-Unsubscribe-Post"] is None
    (_, text), (_, body) = bodies(msg)
    assert "mailto:" not in text + body and "/u/" not in text + body
    [action] = re.findall(rf"{HOOKS}/a/([^\s\"]+)", text)
    [pixel] = re.findall(rf'<img src="{HOOKS}/o/([^"]+)"', body)
    for token, kind in ((action, "yes"), (pixel, "open")):
        claims = verify(RING, token, now=NOW)
        assert (claims.message_id, claims.action, claims.recipient) == (MID, kind, None)


def test_actions_render_in_both_parts_and_carry_signed_tokens() -> None:
    actions = [{"id": "confirm", "label": "Confirm <order> & pay", "url": "https://shop.example/ok"},
               {"id": "dispute", "label": "Not me", "url": None}]
    html = "<html><body><p>Hi</p></body></html>"
    out = compose(event(html=html, actions=actions), ACCOUNT, LINKS, now=NOW)
    well_formed(out.raw)
    (_, text), (_, body) = bodies(parse(out.raw))
    lines = dict(line.split(": ", 1) for line in text.splitlines()[2:])
    assert text.startswith("Thanks for your order.\n\n")
    assert list(lines) == ["Confirm <order> & pay", "Not me"]
    first = verify(RING, lines["Confirm <order> & pay"].removeprefix(f"{HOOKS}/a/"), now=NOW)
    assert (first.action, first.url, first.recipient) == ("confirm", "https://shop.example/ok",
                                                          "ada@example.org")
    assert verify(RING, lines["Not me"].removeprefix(f"{HOOKS}/a/"), now=NOW).url is None
    assert "Confirm &lt;order&gt; &amp; pay</a>" in body
    assert body.index('role="group"') < body.index("</body>") and body.endswith("</html>\n")
    assert re.findall(r'<a href="([^"]+)"', body) == list(lines.values())


def test_actions_append_to_html_without_body_tag() -> None:
    out = compose(event(text=None, html="<p>Hi</p>",
                        actions=[{"id": "ok", "label": "OK", "url": None}]),
                  ACCOUNT, LINKS, now=NOW)
    (_, text), (_, body) = bodies(parse(out.raw))
    assert body.startswith("<p>Hi</p>\n<div") and ">OK</a>" in body
    assert text.startswith("Hi\n\nOK: https://")


def test_open_pixel_only_when_tracking_is_on_and_only_in_html() -> None:
    html = "<html><body><p>Hi</p></body></html>"
    untracked = bodies(parse(compose(event(html=html), ACCOUNT, LINKS, now=NOW).raw))
    assert "<img" not in untracked[1][1]
    tracking = LinkBuilder(RING, HOOKS, timedelta(days=30), open_tracking=True)
    out = compose(event(text=None, html=html), ACCOUNT, tracking, now=NOW)
    well_formed(out.raw)
    (_, text), (_, body) = bodies(parse(out.raw))
    [src] = re.findall(r'<img src="([^"]+)" width="1" height="1" alt=""', body)
    assert body.index("<img") < body.index("</body>") and text == "Hi\n"
    claims = verify(RING, src.removeprefix(f"{HOOKS}/o/"), now=NOW)
    assert (claims.message_id, claims.recipient, claims.action) == (
        MID, "ada@example.org", "open")
    text_only = parse(compose(event(), ACCOUNT, tracking, now=NOW).raw)
    assert text_only.get_content_type() == "text/plain" and "/o/" not in content(text_only)


@pytest.mark.parametrize("actions, links", [
    ([{"id": "ok", "label": "OK", "url": None}], None),
    ([{"id": "unsubscribe", "label": "Bye", "url": None}], LINKS),
    ([{"id": "open", "label": "Open", "url": None}], LINKS),
    ([{"id": "Bad Id", "label": "x", "url": None}], LINKS),
    ([{"id": "go", "label": "x", "url": "javascript:alert(1)"}], LINKS),
    ([{"id": "go", "label": "x", "url": "https://x.org/\r\nBcc: victim@evil"}], LINKS),
])
def test_bad_actions_fail(actions: list, links: LinkBuilder | None) -> None:
    with pytest.raises(ComposeFailed):
        compose(event(actions=actions), ACCOUNT, links, now=NOW)


def _inject(path: str, value: str) -> tuple[dict[str, Any], Account]:
    ev, account = event(cc=[{"email": "cc@example.org", "name": "Cc"}],
                        bcc=[{"email": "bcc@example.org", "name": None}],
                        reply_to={"email": "r@example.org", "name": "R"}), ACCOUNT
    field, _, key = path.partition(".")
    if field == "account":
        account = ACCOUNT.model_copy(update={key: value})
    elif field in ("to", "cc", "bcc"):
        ev[field][0][key] = value
    elif field == "reply_to":
        ev["reply_to"][key] = value
    elif field == "template":
        ev["template"] = {"subject": "{{ s }}", "text": "t", "html": None,
                          "variables_json": '{"s": "x\\r\\nBcc: victim@evil"}'}
    else:
        ev[field] = value
    return ev, account


@pytest.mark.parametrize("path", [
    "to.email", "to.name", "cc.email", "cc.name", "bcc.email", "bcc.name", "reply_to.email",
    "reply_to.name", "subject", "message_id", "account.from_address", "account.from_name",
    "template",
])
@pytest.mark.parametrize("value", [INJECT, "x@y.z\nBcc: victim@evil", "x@y.z\rBcc: victim@evil",
                                   "x@y.z\0Bcc: victim@evil"])
def test_header_injection_is_refused_everywhere(path: str, value: str) -> None:
    ev, account = _inject(path, value)
    with pytest.raises((ComposeFailed, TemplateFailed)):
        out = compose(ev, account, LINKS, now=NOW)
        msg = parse(out.raw)  # never reached; if it were, nothing may have been injected
        assert msg["Bcc"] is None and b"victim@evil" not in out.raw


def test_unicode_line_separators_are_folded_not_injected() -> None:
    out = compose(event(subject="a\u2028Bcc: victim@evil\u0085b\tc",
                        to=[{"email": "ada@example.org", "name": "Ada\u2029Lovelace"}]),
                  ACCOUNT, None, now=NOW)
    msg = parse(out.raw)
    assert msg["Bcc"] is None and msg["Subject"] == "a Bcc: victim@evil b c"
    assert msg["To"].addresses[0].display_name == "Ada Lovelace"


@pytest.mark.parametrize("overrides", [
    {"to": [], "cc": [], "bcc": []},
    {"to": [{"email": "not an address", "name": None}]},
    {"to": [{"email": "ü@example.org", "name": None}]},
    {"message_id": "<evil>"},
    {"to": [{"email": "a@example.org", "name": "x" * 300}]},
])
def test_invalid_events_fail(overrides: dict) -> None:
    with pytest.raises(ComposeFailed):
        compose(event(**overrides), ACCOUNT, None, now=NOW)


def test_naive_now_fails() -> None:
    with pytest.raises(ComposeFailed):
        compose(event(), ACCOUNT, None, now=datetime(2025, 3, 14))  # naive: refused


def _rsa_pem(traditional: bool) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fmt = (serialization.PrivateFormat.TraditionalOpenSSL if traditional
           else serialization.PrivateFormat.PKCS8)
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def _dns(record: bytes) -> Any:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name.rstrip(b".") == b"mb1._domainkey.example.com" else None
    return lookup


@pytest.mark.parametrize("traditional", [True, False])
def test_dkim_signature_verifies(tmp_path: Path, traditional: bool) -> None:
    pem, record = _rsa_pem(traditional)
    path = tmp_path / "dkim.pem"
    path.write_bytes(pem)
    signer = DkimSigner.from_file("mb1", "example.com", path)
    out = compose(event(html="<p>Grüße</p>", actions=[{"id": "ok", "label": "OK", "url": None}]),
                  ACCOUNT, LINKS, now=NOW, dkim=signer)
    well_formed(out.raw)
    assert out.raw.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert dkimpy.verify(out.raw, dnsfunc=_dns(record))
    signed = re.search(r"\bh=([^;]+)", str(parse(out.raw)["DKIM-Signature"]))
    assert signed is not None
    names = [name.strip().lower() for name in signed.group(1).split(":")]
    assert names[:2] == ["from", "from"] and "list-unsubscribe-post" in names
    assert not dkimpy.verify(out.raw.replace(b"Your receipt", b"Your rebate"), dnsfunc=_dns(record))
    assert not dkimpy.verify(out.raw.replace(b"Thanks", b"Thinks"), dnsfunc=_dns(record))


def test_dkim_signer_refuses_bad_config(tmp_path: Path) -> None:
    from mailbus.errors import ConfigError

    pem, _ = _rsa_pem(True)
    with pytest.raises(ConfigError):
        DkimSigner("mb1", "example.com", b"not a key")
    with pytest.raises(ConfigError):
        DkimSigner("mb1\r\n", "example.com", pem)
    with pytest.raises(ConfigError):
        DkimSigner.from_file("mb1", "example.com", tmp_path / "missing.pem")


def test_reply_tags_name_the_message_in_the_reply_address() -> None:
    from email.utils import parseaddr

    from mailbus.replies.classify import classify_inbound
    from mailbus.replytag import verify_tag

    tagged = ACCOUNT.model_copy(update={"reply_tags": True})
    message = parse(compose(event(), tagged, LINKS, now=NOW).raw)
    name, address = parseaddr(str(message["Reply-To"]))
    local, _, domain = address.partition("@")
    assert (name, domain) == ("Billing", "example.com") and local.startswith("billing+")
    assert verify_tag(RING, local.partition("+")[2]) == MID
    # A reply to it that lost In-Reply-To and References still names the message.
    reply = (f"From: ada@example.org\r\nTo: {address}\r\nSubject: Re: Your receipt\r\n"
             "Message-ID: <r1@example.org>\r\n\r\nGot it, thanks.\r\n").encode()
    [tag] = classify_inbound(reply).reply_tags
    assert verify_tag(RING, tag) == MID
    # The request's own reply_to wins; without the option nothing changes.
    own = parse(compose(event(reply_to={"email": "desk@example.com", "name": None}), tagged,
                        LINKS, now=NOW).raw)
    assert str(own["Reply-To"]) == "desk@example.com"
    assert parse(compose(event(), ACCOUNT, LINKS, now=NOW).raw)["Reply-To"] is None


def test_a_from_address_too_long_to_tag_fails_clearly() -> None:
    long_local = Account(id="long", kind="smtp", from_address="x" * 20 + "@example.com",
                         reply_tags=True, smtp=SmtpAccount(host="127.0.0.1"))
    with pytest.raises(ComposeFailed, match="reply tag"):
        compose(event(), long_local, LINKS, now=NOW)


# Bodies are written by compose itself (7bit or quoted-printable, CRLF, its own
# boundary): whatever the text, the wire stays well-formed and the stdlib parser,
# as a receiver reads it, gives back the same text, line breaks read as newlines.
_BODY_TEXT = st.lists(st.one_of(
    st.sampled_from(["\n", "\r\n", "\r", ".", "=", " ", "\t", "\x0b", "\x0c", "\x85",
                     "\u2028", "--", "=_mailbus_", "é", "日", "\U0001f600", "From "]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)),
    max_size=30).map("".join)


def _normal(text: str) -> str:
    # What a receiver can tell apart: CR, LF and CRLF are all one line break.
    return "\n".join(text.encode("utf-8").decode("utf-8").replace("\r\n", "\n")
                     .replace("\r", "\n").split("\n")).rstrip("\n")


@settings(max_examples=300, deadline=None)
@given(text=_BODY_TEXT, html=st.one_of(st.none(), _BODY_TEXT),
       long_line=st.integers(min_value=0, max_value=2500))
def test_property_bodies_leave_well_formed_and_decode_back(text: str, html: str | None,
                                                          long_line: int) -> None:
    text = text + "x" * long_line  # past 998 octets a line must go quoted-printable
    raw = compose(event(text=text, html=html), ACCOUNT, None, now=NOW).raw
    well_formed(raw)
    message = parse(raw)
    got = bodies(message)
    want = [("text/plain", text)] + ([("text/html", html)] if html is not None else [])
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, got_text), (_, want_text) in zip(got, want, strict=True):
        assert _normal(got_text) == _normal(want_text)
