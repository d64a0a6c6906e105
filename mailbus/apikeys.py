"""API keys: the token format, its hash, and parsing a presented token."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

SCOPES = ("send", "read", "admin", "webhooks")
PREFIX = "mbk_"
# mbk_<10 lowercase base32 chars>.<43 url-safe chars>: the id is public (it
# names the key in logs and the CLI), the part after the dot is the secret.
TOKEN_PATTERN = re.compile(r"^mbk_([a-z2-7]{10})\.([A-Za-z0-9_-]{43})$")
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: the token is shown once, only the hash is stored."""

    key_id: str
    token: str
    secret_sha256: bytes


def generate() -> NewKey:
    """Make a key id and a 256-bit secret."""
    key_id = "".join(secrets.choice(_B32) for _ in range(10))
    secret = new_secret()
    return NewKey(key_id, token(key_id, secret), hash_secret(secret))


def new_secret() -> str:
    """A 256-bit secret, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token(key_id: str, secret: str) -> str:
    """The token a caller presents: `mbk_<key id>.<secret>`."""
    return f"{PREFIX}{key_id}.{secret}"


def hash_secret(secret: str) -> bytes:
    """SHA-256 of the secret: a 256-bit random secret needs no slow hash."""
    return hashlib.sha256(secret.encode()).digest()


def parse(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None."""
    match = TOKEN_PATTERN.match(token)
    return (match.group(1), match.group(2)) if match else None


def matches(secret: str, stored_sha256: bytes) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return secrets.compare_digest(hash_secret(secret), stored_sha256)


def accepts(secret: str, current_sha256: bytes, previous_sha256: bytes | None,
            previous_valid_until: datetime | None, now: datetime) -> bool:
    """Whether a presented secret is the key's: its current one, or the one a
    rotation replaced while that is still within its grace time. Both are
    compared every time, so the answer takes as long whichever matched."""
    current = matches(secret, current_sha256)
    previous = matches(secret, previous_sha256 or bytes(32))
    in_grace = (previous_sha256 is not None and previous_valid_until is not None
                and now < previous_valid_until)
    return current or (previous and in_grace)


# A key's own request rate, in the `limits` notation ('100/second', '6000 per
# minute', '10/2 seconds'); the same form as the api_keys_rate_limit_form check.
# Under 100,000 per window: a moving window keeps one timestamp per request.
RATE_PATTERN = re.compile(
    r"^[1-9][0-9]{0,4} ?(/|per) ?([1-9][0-9]{0,5} )?(second|minute|hour|day)s?$")


def valid_rate(text: str) -> bool:
    """True when `text` is a request rate a key or the installation may carry."""
    return RATE_PATTERN.match(text) is not None
