"""Standard Webhooks signatures (https://www.standardwebhooks.com): secrets and headers.

The signature is HMAC-SHA256 over `id.timestamp.body`, base64, prefixed
`v1,`; several signatures (an old and a new secret during a rotation) are
separated by spaces. Signing is these few lines of the standard library;
the `standardwebhooks` library verifies every delivery in the tests, as a
receiver would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix, not a secret
# 24 random bytes, as the convention's reference libraries generate.
SECRET_BYTES = 24


def new_secret() -> str:
    """A fresh `whsec_` signing secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of a delivery."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets_: Iterable[str], webhook_id: str, timestamp: int, body: bytes
            ) -> dict[str, str]:
    """The three headers of a delivery, signed with every secret given."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, webhook_id, timestamp, body)
                                      for s in secrets_),
    }
