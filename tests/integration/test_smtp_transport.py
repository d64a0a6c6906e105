"""The SMTP transport over TLS with AUTH, against aiosmtpd servers on real sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailbus.accounts import Account, SmtpAccount
from mailbus.sender.smtp import SmtpTransport
from mailbus.sender.transport import Outgoing, TransientError
from tests.support.smtp import ScriptedHandler, free_port

USER, PASSWORD = "relay-user", "correct horse battery staple"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the account trusts it through ca_file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USER
          and auth_data.password.decode() == PASSWORD)
    return AuthResult(success=ok)


class TlsServer:
    def __init__(self, certificate: tuple[Path, Path], implicit: bool, pipelining: bool):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*map(str, certificate))
        self.handler = ScriptedHandler(pipelining=pipelining)
        self.port = free_port()
        # With implicit TLS the whole session is encrypted, and aiosmtpd only
        # tracks TLS it negotiated itself (STARTTLS): require it there alone.
        tls = {"ssl_context": context, "auth_require_tls": False} if implicit else {
            "tls_context": context, "require_starttls": True, "auth_require_tls": True}
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, authenticator=authenticator,
            auth_required=True, **tls)

    def __enter__(self) -> TlsServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


@pytest.fixture(params=["starttls", "implicit", "starttls, no pipelining"])
def server(request, certificate) -> Iterator[tuple[TlsServer, str]]:
    tls, _, rest = request.param.partition(",")
    with TlsServer(certificate, implicit=tls == "implicit", pipelining=not rest) as srv:
        yield srv, tls


def account(port: int, tls: str, ca_file: Path | None, tmp_path: Path,
            password: str = PASSWORD, connections: int = 2) -> Account:
    secret = tmp_path / "password"
    secret.write_text(password)
    return Account(id="relay", kind="smtp", from_address="news@sender.example",
                   smtp=SmtpAccount(host="127.0.0.1", port=port, tls=tls, username=USER,
                                    password_file=secret, ca_file=ca_file,
                                    connections=connections, timeout_seconds=5))


def message(n: int) -> Outgoing:
    raw = (f"From: news@sender.example\r\nTo: ada@example.com\r\nSubject: n{n}\r\n"
           f"Message-ID: <n{n}@sender.example>\r\n\r\nbody {n}\r\n").encode()
    return Outgoing("news@sender.example", ["ada@example.com"], raw, f"<n{n}@sender.example>")


def test_tls_and_auth_with_reused_connections(server, certificate, tmp_path):
    srv, tls = server
    transport = SmtpTransport(account(srv.port, tls, certificate[0], tmp_path))

    async def run() -> list:
        results = [await transport.send(message(n)) for n in range(5)]
        await transport.close()
        return results

    results = asyncio.run(run())
    assert all(r.response.startswith("250") for r in results)
    assert [m["Subject"] for m in srv.handler.messages()] == [f"n{n}" for n in range(5)]
    assert srv.handler.connections == 1  # one session carried all five transactions


def test_an_untrusted_certificate_is_refused_not_bypassed(server, tmp_path):
    srv, tls = server
    transport = SmtpTransport(account(srv.port, tls, None, tmp_path))  # system CAs only
    with pytest.raises(TransientError):
        asyncio.run(transport.send(message(1)))
    assert srv.handler.received == []


def test_a_wrong_password_never_delivers(server, certificate, tmp_path):
    srv, tls = server
    transport = SmtpTransport(account(srv.port, tls, certificate[0], tmp_path,
                                      password="wrong"))
    # Refused as an account problem (retried), never as a failed message.
    with pytest.raises(TransientError):
        asyncio.run(transport.send(message(1)))
    assert srv.handler.received == []
