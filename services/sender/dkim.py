"""DKIM-signs composed messages (RFC 6376) with dkimpy: rsa-sha256, relaxed/relaxed.

dkimpy stamps t= from the wall clock, so a signed message is not byte-for-byte
reproducible; everything else it signs comes from the composed bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import dkim
from dkim.crypto import parse_pem_private_key

from mailbus.errors import ConfigError, MailbusError

# From twice: signing one more From than exists stops anyone adding a second one
# later (RFC 6376 section 8.15). Absent headers listed here are signed as absent.
# RFC 8058 requires List-Unsubscribe and List-Unsubscribe-Post to be signed.
DEFAULT_HEADERS = ("From", "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID",
                   "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
                   "List-Unsubscribe", "List-Unsubscribe-Post", "X-Mailbus-Message-Id")
_LABELS = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*")


class DkimFailed(MailbusError):
    """dkimpy could not sign the message."""


class DkimSigner:
    """Signs as one selector of one domain."""

    def __init__(self, selector: str, domain: str, private_key_pem: bytes,
                 headers: tuple[str, ...] = DEFAULT_HEADERS):
        for label in (selector, domain):
            if not _LABELS.fullmatch(label):
                raise ConfigError(f"DKIM selector or domain {label!r} is not a DNS name")
        try:
            parse_pem_private_key(private_key_pem)
        except Exception as exc:  # dkimpy raises assorted errors for bad keys
            raise ConfigError(f"DKIM key for {selector}._domainkey.{domain} is unusable") from exc
        self.selector, self.domain = selector.encode("ascii"), domain.encode("ascii")
        self.key, self.headers = private_key_pem, [h.encode("ascii") for h in headers]

    @classmethod
    def from_file(cls, selector: str, domain: str, path: Path) -> DkimSigner:
        """Load the PEM private key (PKCS#1 or PKCS#8) from a file."""
        try:
            return cls(selector, domain, Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"DKIM key file {path}: {exc}") from exc

    def sign(self, raw: bytes) -> bytes:
        """Return the message with a DKIM-Signature header prepended."""
        try:
            header = dkim.sign(raw, self.selector, self.domain, self.key,
                               canonicalize=(b"relaxed", b"relaxed"),
                               signature_algorithm=b"rsa-sha256",
                               include_headers=self.headers, linesep=b"\r\n")
        except dkim.DKIMException as exc:
            raise DkimFailed(f"DKIM signing failed: {exc}") from exc
        return header + raw
