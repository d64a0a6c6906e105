"""The verdicts on a sending domain's SPF, DKIM and DMARC records (pure; DNS in
tests/integration/test_doctor.py)."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailbus.domaincheck import aligned, judge_dkim, judge_dmarc, judge_spf, public_key_der


@pytest.mark.parametrize(("records", "kind", "verdict", "says"), [
    ([], "smtp", "fail", "no SPF record"),
    (["v=spf1 -all", "v=spf1 ip4:192.0.2.1 -all"], "smtp", "fail", "2 SPF records"),
    (["v=spf1 +all"], "smtp", "fail", "every host"),
    (["v=spf1 a mx all"], "smtp", "fail", "every host"),
    (["v=spf1 ip4:192.0.2.1 ~all"], "gmail", "warn", "does not include Google"),
    (["v=spf1 include:_spf.google.com ~all"], "gmail", "ok", "include:_spf.google.com"),
    (["google-site-verification=x", "V=SPF1 ip4:192.0.2.1 -all"], "smtp", "ok", "ip4"),
])
def test_spf(records: list[str], kind: str, verdict: str, says: str) -> None:
    finding = judge_spf(records, kind)
    assert finding.verdict == verdict and says in finding.detail
    assert bool(finding.fix) == (verdict != "ok")


def pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_dkim_key_must_be_the_public_half_of_the_signing_key() -> None:
    mine, other = pem(), pem()
    published = f"v=DKIM1; k=rsa; p={base64.b64encode(public_key_der(mine)).decode()}"
    name = "s1._domainkey.example.test"
    assert judge_dkim([published], name, mine).verdict == "ok"
    assert judge_dkim([published], name, other).verdict == "fail"
    assert judge_dkim([], name, mine).verdict == "fail"
    assert "revoked" in judge_dkim(["v=DKIM1; k=rsa; p="], name, mine).detail
    # Long keys are published in several strings; a space inside p= is allowed.
    spaced = published[:40] + " " + published[40:]
    assert judge_dkim([spaced], name, mine).verdict == "ok"


@pytest.mark.parametrize(("record", "dkim_domain", "verdict"), [
    ("v=DMARC1; p=none", "example.test", "ok"),
    ("v=DMARC1; p=reject", "mail.example.test", "ok"),  # relaxed: a subdomain aligns
    ("v=DMARC1; p=reject; adkim=s", "mail.example.test", "fail"),
    ("v=DMARC1; p=reject", "other.test", "fail"),
    ("v=DMARC1; rua=mailto:x@example.test", "example.test", "fail"),  # no policy
    ("v=DMARC1; p=none", None, "ok"),  # no DKIM of ours to align (Gmail signs)
])
def test_dmarc_policy_and_alignment(record: str, dkim_domain: str | None, verdict: str) -> None:
    assert judge_dmarc([record], "_dmarc.example.test", "example.test",
                       dkim_domain).verdict == verdict


def test_no_dmarc_record_fails() -> None:
    assert judge_dmarc(["v=spf1 -all"], "_dmarc.example.test", "example.test",
                       None).verdict == "fail"


def test_alignment_never_joins_unrelated_names() -> None:
    assert aligned("Example.Test.", "example.test") and aligned("a.example.test", "example.test")
    assert not aligned("badexample.test", "example.test")
    assert not aligned("example.test.evil", "example.test")
