"""`mailbus doctor` against real parts: the broker and PostgreSQL of `make infra`, an SMTP
server with STARTTLS and AUTH, Dovecot, the hooks app, the Gmail emulator, and a DNS server
the test starts. Nothing here reaches the internet."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailbus.domaincheck import public_key_der
from mailbus.tokens import Keyring
from tests.integration.test_hooks import HooksServer, settings_for
from tests.support import dovecot
from tests.support.dns import DnsServer
from tests.support.doctor import run_doctor
from tests.support.gmail_emulator import DEFAULT_SCOPES, GmailEmulator
from tests.support.smtp import ScriptedHandler, free_port

SMTP_USER, SMTP_SECRET = "relay-user", "smtp-secret-that-must-not-show"
GMAIL_USER = "boss@gmail-domain.test"


class AuthSmtp:
    """An aiosmtpd server requiring STARTTLS, then AUTH with one user and password."""

    def __init__(self, cert: Path, key: Path):
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        self.port = free_port()
        self.logins: list[str] = []
        self.controller = Controller(
            ScriptedHandler(), hostname="127.0.0.1", port=self.port, tls_context=context,
            require_starttls=True, authenticator=self._authenticate)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == SMTP_USER.encode()
              and auth_data.password == SMTP_SECRET.encode())
        self.logins.append("ok" if ok else "refused")
        return AuthResult(success=ok, handled=False)

    def __enter__(self) -> AuthSmtp:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def dkim_key(path: Path) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path.read_bytes()


def good_zone(dkim_pem: bytes) -> dict[str, list[str]]:
    p = base64.b64encode(public_key_der(dkim_pem)).decode()
    return {
        "news.test": ["v=spf1 ip4:127.0.0.1 -all", "google-site-verification=x"],
        "s1._domainkey.news.test": [f"v=DKIM1; k=rsa; p={p}"],
        "_dmarc.news.test": ["v=DMARC1; p=quarantine; rua=mailto:dmarc@news.test"],
        "gmail-domain.test": ["v=spf1 include:_spf.google.com ~all"],
        "_dmarc.gmail-domain.test": ["v=DMARC1; p=none"],
    }


@pytest.fixture
def parts(tmp_path: Path, namespace: str, dovecot_server: dovecot.Dovecot,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Every real part the doctor checks, healthy, and the environment pointing at them."""
    dovecot.self_signed(tmp_path / "smtp.crt", tmp_path / "smtp.key")
    (tmp_path / "smtp.password").write_text(SMTP_SECRET + "\n")
    pem = dkim_key(tmp_path / "dkim.pem")
    ring = Keyring.generate_file(tmp_path / "link-keys.json")
    with AuthSmtp(tmp_path / "smtp.crt", tmp_path / "smtp.key") as smtp, \
            GmailEmulator() as emu, DnsServer(good_zone(pem)) as dns, \
            HooksServer(settings_for(namespace, tmp_path), ring) as hooks:
        emu.add_user(GMAIL_USER, refresh_token="1//r")
        token = {"token": emu.issue_token(GMAIL_USER), "refresh_token": "1//r",
                 "client_id": "client-id", "client_secret": "client-secret",
                 "token_uri": emu.token_uri, "scopes": list(DEFAULT_SCOPES)}
        (tmp_path / "token.json").write_text(json.dumps(token))
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(f"""
[[accounts]]
id = "relay"
kind = "smtp"
from_address = "hello@news.test"
[accounts.smtp]
host = "127.0.0.1"
port = {smtp.port}
tls = "starttls"
ca_file = "{tmp_path / 'smtp.crt'}"
username = "{SMTP_USER}"
password_file = "{tmp_path / 'smtp.password'}"
dkim_selector = "s1"
dkim_domain = "news.test"
dkim_key_file = "{tmp_path / 'dkim.pem'}"
[accounts.imap]
host = "{dovecot_server.host}"
port = {dovecot_server.tls_port}
tls = "implicit"
ca_file = "{dovecot_server.ca_file}"
username = "{dovecot_server.user}"
password_file = "{dovecot_server.password_file}"

[[accounts]]
id = "boss"
kind = "gmail"
from_address = "{GMAIL_USER}"
[accounts.gmail]
token_file = "{tmp_path / 'token.json'}"
read_inbox = true
""")
        for name, value in {
            "MAILBUS_ACCOUNTS_FILE": str(accounts),
            "MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
            "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "link-keys.json"),
            "MAILBUS_HOOKS_BASE_URL": str(hooks.base_url),
            "MAILBUS_GMAIL_API_ENDPOINT": emu.api_endpoint,
            "MAILBUS_GMAIL_TOKEN_URI": emu.token_uri,
        }.items():
            monkeypatch.setenv(name, value)
        yield {"imap_password_file": dovecot_server.password_file, "smtp": smtp, "dns": dns,
               "emu": emu, "dir": tmp_path, "accounts": accounts,
               "pem": pem}


def doctor(parts: dict[str, Any], *args: str) -> tuple[int, dict[tuple[str, str], str], str]:
    return run_doctor(["--dns-server", parts["dns"].address, *args])


def test_a_healthy_installation_passes_every_row(parts: dict[str, Any]) -> None:
    code, rows, out = doctor(parts)
    assert code == 0, out
    for service in ("ingest", "sender", "confirm", "projector", "replies", "hooks"):
        assert rows[("kafka", service)] == "ok", out
    for service in ("ingest", "sender", "projector", "replies"):
        assert rows[("postgres", service)] == "ok", out
    assert rows[("postgres", "migrations")] == "ok"
    assert rows[("links", "link keys")] == rows[("links", "hooks base URL")] == "ok"
    assert rows[("transport", "relay")] == rows[("mailbox", "relay")] == "ok", out
    assert rows[("transport", "boss")] == rows[("mailbox", "boss")] == "ok", out
    assert rows[("SPF", "news.test")] == rows[("DMARC", "news.test")] == "ok", out
    assert rows[("DKIM", "news.test (relay)")] == "ok", out
    # Google signs for a Gmail account with a selector this file does not name.
    assert rows[("DKIM", "gmail-domain.test (boss)")] == "warn"
    assert "STARTTLS verified" in out and "IDLE offered" in out
    assert "OK:" in out and parts["smtp"].logins == ["ok"]
    assert SMTP_SECRET not in out


def test_each_broken_part_fails_its_row_with_its_fix_and_no_secret(
        parts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    folder: Path = parts["dir"]
    (folder / "smtp.password").write_text("wrong-smtp-password\n")
    (folder / "dovecot-wrong").write_text("wrong-imap-password\n")
    parts["accounts"].write_text(parts["accounts"].read_text().replace(
        str(parts["imap_password_file"]), str(folder / "dovecot-wrong")))
    # Another key published than the one the account signs with; no DMARC for news.test.
    other = dkim_key(folder / "other.pem")
    parts["dns"].zone.update(good_zone(other))
    parts["dns"].zone.pop("_dmarc.news.test")
    monkeypatch.setenv("MAILBUS_HOOKS_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MAILBUS_KAFKA__PASSWORD", "wrong-kafka-password")
    code, rows, out = doctor(parts, "--service", "ingest")
    assert code == 1, out
    assert rows[("kafka", "ingest")] == "fail" and "run `mailbus setup kafka`" in out
    assert rows[("transport", "relay")] == "fail" and "login as relay-user refused" in out
    assert rows[("mailbox", "relay")] == "fail" and "imap.password_file" in out
    assert rows[("DKIM", "news.test (relay)")] == "fail"
    assert "is not the public half of dkim_key_file" in out
    assert rows[("DMARC", "news.test")] == "fail" and "_dmarc.news.test" in out
    assert rows[("links", "hooks base URL")] == "fail"
    assert rows[("SPF", "news.test")] == "ok"  # what is right stays right
    assert "FAIL:" in out
    for secret in ("wrong-smtp-password", "wrong-imap-password", "wrong-kafka-password",
                   SMTP_SECRET, "imap-test-secret"):
        assert secret not in out


def test_an_accounts_file_that_does_not_validate_is_one_failed_row(
        parts: dict[str, Any]) -> None:
    parts["accounts"].write_text('[[accounts]]\nid = "x"\nkind = "smtp"\n')
    code, rows, out = doctor(parts, "--skip-infra")
    assert code == 1
    assert rows[("accounts", str(parts["accounts"]))] == "fail"
    assert "from_address" in out
