"""A real Dovecot IMAP server for the tests: Debian's binary with a private configuration.

`dovecot -F -c <conf>` runs in the foreground as a child of the test process,
with its own base_dir, state_dir, log file, passwd-file user database and
maildir under one temporary directory, listening on 127.0.0.1 only: plain
IMAP (STARTTLS offered) and implicit-TLS IMAP with a self-signed certificate
that the tests trust through a CA file. Nothing of the system's Dovecot
configuration or state is read or touched.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
# Debian's package creates this user; mail files belong to it.
MAIL_USER = "dovecot"

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
last_valid_uid = {uid}
mail_location = maildir:{root}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
# The wrong-password test must not wait for Dovecot's delay after a failed login
# (auth_failure_delay, the passdb's nodelay field) nor its growing per-IP penalty
# (anvil's auth-penalty socket, closed below).
auth_failure_delay = 0
# IDLE learns of new mail through inotify, and falls back to a check every
# mailbox_idle_check_interval (30 s by default) when the host has no inotify
# watches left; 1 s keeps "arrives within seconds" true on any host.
mailbox_idle_check_interval = 1 secs
auth_mechanisms = plain login
disable_plaintext_auth = no
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(cert_path: Path, key_path: Path) -> None:
    """A certificate for 127.0.0.1 and localhost that is its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailbus test IMAP")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)


@dataclass
class Dovecot:
    """A running server: where it listens, its user, the CA that signed its certificate."""

    root: Path
    host: str
    port: int
    tls_port: int
    user: str
    password: str
    password_file: Path
    ca_file: Path
    process: subprocess.Popen[bytes] | None = None

    def connect(self) -> imaplib.IMAP4:
        """A logged-in imaplib connection (plain), for the tests' own look at the mailbox."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        conn.login(self.user, self.password)
        return conn

    def append(self, raw: bytes, mailbox: str = "INBOX") -> None:
        """APPEND a message over a real IMAP connection, as a delivery agent would store it."""
        conn = self.connect()
        try:
            if mailbox != "INBOX":
                conn.create(mailbox)  # NO when it exists: fine
            typ, data = conn.append(mailbox, "", imaplib.Time2Internaldate(time.time()), raw)
            if typ != "OK":
                raise RuntimeError(f"APPEND to {mailbox} failed: {data!r}")
        finally:
            conn.logout()

    def mailbox(self, mailbox: str = "INBOX") -> list[tuple[int, bytes]]:
        """(UID, FLAGS) of every message in a mailbox, read without changing anything."""
        conn = self.connect()
        try:
            typ, data = conn.select(_quote(mailbox), readonly=True)
            if typ != "OK":
                return []
            typ, data = conn.uid("FETCH", "1:*", "(FLAGS)")
            found = []
            for line in data:
                if not isinstance(line, bytes):
                    continue
                # b'1 (UID 7 FLAGS (\\Seen))'
                text = line.decode()
                uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
                flags = text.split("FLAGS (")[1].split(")")[0].encode()
                found.append((uid, flags))
            return found
        finally:
            conn.logout()

    def clear(self) -> None:
        """Remove the user's mail store (between tests, with no session open): the next login
        finds a new, empty INBOX whose UIDs start at 1."""
        shutil.rmtree(self.root / "mail" / self.user, ignore_errors=True)

    def set_uidvalidity(self, value: int) -> None:
        """Make the server see INBOX as a new mailbox (UIDVALIDITY changed), messages kept."""
        # Dovecot keeps UIDVALIDITY in the maildir's dovecot-uidlist header ("3 V<n> N<next>").
        uidlist = self.root / "mail" / self.user / "dovecot-uidlist"
        lines = uidlist.read_text().splitlines()
        head = [f"V{value}" if f.startswith("V") else f for f in lines[0].split()]
        uidlist.write_text("\n".join([" ".join(head), *lines[1:]]) + "\n")
        for index in (self.root / "mail" / self.user).glob("dovecot.index*"):
            index.unlink()

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def accounts_table(self, poll_seconds: float = 1) -> str:
        """The [accounts.imap] table of an accounts file that reads this mailbox (plain IMAP)."""
        return (f'[accounts.imap]\nhost = "{self.host}"\nport = {self.port}\ntls = "none"\n'
                f'username = "{self.user}"\npassword_file = "{self.password_file}"\n'
                f"poll_seconds = {poll_seconds}\n")


def _quote(mailbox: str) -> str:
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start(user: str = "reader@example.test", password: str = "imap-test-secret") -> Dovecot:
    """Write a private configuration and start Dovecot; returns once both ports answer."""
    # Not under pytest's 0700 tmp_path: Dovecot's unprivileged processes must traverse it.
    root = Path(tempfile.mkdtemp(prefix="mailbus-dovecot-"))
    root.chmod(0o755)
    mail_user = pwd.getpwnam(MAIL_USER)
    (root / "mail").mkdir()
    os.chown(root / "mail", mail_user.pw_uid, mail_user.pw_gid)
    self_signed(root / "cert.pem", root / "key.pem")
    (root / "passwd").write_text(f"{user}:{{PLAIN}}{password}::::::nodelay=yes\n")
    password_file = root / "imap.password"
    password_file.write_text(password + "\n")
    server = Dovecot(root, "127.0.0.1", free_port(), free_port(), user, password,
                     password_file, root / "cert.pem")
    (root / "dovecot.conf").write_text(CONFIG.format(
        root=root, uid=mail_user.pw_uid, gid=mail_user.pw_gid, port=server.port,
        tls_port=server.tls_port))
    server.process = subprocess.Popen([DOVECOT, "-F", "-c", str(root / "dovecot.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while True:
        if server.process.poll() is not None:
            err = server.process.stderr.read().decode() if server.process.stderr else ""
            raise RuntimeError(f"dovecot exited: {err}\n{server.log()}")
        try:
            for port in (server.port, server.tls_port):
                socket.create_connection((server.host, port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop(server)
                raise RuntimeError(f"dovecot did not listen:\n{server.log()}") from None
            time.sleep(0.05)
    return server


def stop(server: Dovecot) -> None:
    """SIGTERM, wait, and remove the temporary directory."""
    proc = server.process
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc is not None and proc.stderr:
        proc.stderr.close()
    shutil.rmtree(server.root, ignore_errors=True)


def tls_context(server: Dovecot) -> ssl.SSLContext:
    """A client context that trusts the server's self-signed certificate."""
    return ssl.create_default_context(cafile=str(server.ca_file))
