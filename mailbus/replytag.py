"""Reply tags: a signed message id in the sub-address of the reply address.

A reply that lost its In-Reply-To and References (some clients and forwarders
drop them) still reaches ``replies+<tag>@domain``, and the tag names the message:

    m<32 hex of the message UUID>.<kid>.<mac>

- ``kid``: the signing key's id in the link-token keyring (`mailbus.tokens.Keyring`).
- ``mac``: the first 12 characters of lower-case base32 of
  HMAC-SHA256(keys[kid], ASCII ``"reply." + 32 hex``): 60 bits.

Hex and lower-case base32 survive MTAs that lower-case local parts, which
base64 would not; key ids are matched without regard to case for the same
reason. With a two-character key id a tag is 49 characters, so a base name of
up to 14 characters fits the 64-character limit of a local part (RFC 5321).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid

from mailbus.tokens import Keyring, TokenError

PREFIX = "m"
MAC_CHARS = 12
MAX_LOCAL_PART = 64
TAG = re.compile(r"m[0-9a-f]{32}\.[a-z0-9_-]{1,32}\.[a-z2-7]{12}", re.IGNORECASE)


def _mac(key: bytes, hexid: str) -> str:
    digest = hmac.new(key, f"reply.{hexid}".encode("ascii"), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:MAC_CHARS]


def make_tag(keyring: Keyring, message_id: str) -> str:
    """The reply tag of a message, signed with the keyring's current key."""
    try:
        hexid = uuid.UUID(message_id).hex
    except (ValueError, TypeError, AttributeError) as exc:
        raise TokenError(f"message id {message_id!r} is not a UUID") from exc
    kid = keyring.current
    return f"{PREFIX}{hexid}.{kid}.{_mac(keyring.keys[kid], hexid)}"


def verify_tag(keyring: Keyring, tag: str) -> str | None:
    """The message id a genuine tag names (canonical UUID text), else None."""
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        return None
    hexid, kid, mac = tag[len(PREFIX):].lower().split(".")
    for name, key in keyring.keys.items():
        if name.lower() == kid and hmac.compare_digest(_mac(key, hexid), mac):
            return str(uuid.UUID(hex=hexid))
    return None


def tagged_address(address: str, tag: str) -> str:
    """``local+tag@domain``; refuses an address with a sub-address or a too-long result."""
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain or "+" in local:
        raise TokenError(f"{address!r} is not a plain address to tag")
    if len(local) + 1 + len(tag) > MAX_LOCAL_PART:
        raise TokenError(f"{local}+<tag> is longer than {MAX_LOCAL_PART} characters")
    return f"{local}+{tag}@{domain}"


def extract_tag(address: str) -> str | None:
    """The tag-shaped sub-address of an address, lower-cased, unverified; else None."""
    local = address.strip().rpartition("@")[0]
    _, plus, detail = local.partition("+")
    if plus and TAG.fullmatch(detail):
        return detail.lower()
    return None
