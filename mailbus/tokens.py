"""Signed, expiring link tokens: the sender signs them, the hooks service verifies them.

The token format is a contract between services:

    v1.<kid>.<payload>.<sig>

- ``kid``: id of the signing key, ``[A-Za-z0-9_-]{1,32}``.
- ``payload``: base64url without padding of compact JSON (no spaces) with the keys
  ``m`` message id, ``a`` action (``"unsubscribe"``, ``"open"`` or an action id),
  ``e`` expiry in Unix seconds (int) and, optionally, ``r`` the recipient address
  (lower-cased) and ``u`` the redirect URL signed in with the action. ``r`` is
  absent from the links of a message sent to several recipients, which cannot
  tell who clicked; an unsubscribe token always has it (it says whom to suppress).
- ``sig``: base64url without padding of
  HMAC-SHA256(keys[kid], ASCII ``"v1." + kid + "." + payload``).

The MAC covers the payload *text*, so a verifier checks it before decoding
anything. A token longer than MAX_TOKEN characters is refused before any work;
the cap leaves room for the 2,000-character redirect URLs the API accepts.
Every key signs and verifies; only ``current`` signs, retired keys keep verifying
until they are removed from the keyring file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mailbus.errors import ConfigError, MailbusError

VERSION = "v1"
UNSUBSCRIBE = "unsubscribe"
OPEN = "open"
# Actions with a route of their own (/u/, /o/); never an action button's id.
RESERVED_ACTIONS = frozenset({UNSUBSCRIBE, OPEN})
MAX_TOKEN = 4096
MIN_KEY_BYTES = 32
DEFAULT_BASE_URL = "http://127.0.0.1:8081"
DEFAULT_TTL = timedelta(days=30)
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
# Field caps of the payload: RFC 5321 path limits for addresses, ample room for ids.
_LIMITS = {"m": 128, "r": 320, "a": 64, "u": 2048}
_REQUIRED = {"m", "a", "e"}


class TokenError(MailbusError):
    """A link token could not be signed or is not acceptable."""


class TokenInvalid(TokenError):
    """The token is malformed, tampered with or signed by the wrong key."""


class TokenExpired(TokenError):
    """The token was genuine but its expiry has passed."""


class UnknownKey(TokenError):
    """The token names a key id this keyring does not hold."""


@dataclass(frozen=True)
class Claims:
    """What a verified token says."""

    message_id: str
    recipient: str | None  # None: one of the message's several recipients
    action: str
    expires_at: datetime
    url: str | None
    kid: str


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise TokenInvalid("payload is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenInvalid("payload is not base64url") from exc


class Keyring:
    """HMAC keys by id; `current` signs, all of them verify."""

    def __init__(self, keys: dict[str, bytes], current: str):
        for kid, key in keys.items():
            if not _KID.fullmatch(kid):
                raise ConfigError(f"token key id {kid!r} must match {_KID.pattern}")
            if len(key) < MIN_KEY_BYTES:
                raise ConfigError(f"token key {kid!r} is shorter than {MIN_KEY_BYTES} bytes")
        if current not in keys:
            raise ConfigError(f"current token key {current!r} is not in the keyring")
        self.keys, self.current = dict(keys), current

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        """Read {"current": kid, "keys": {kid: base64}} from a TOML or JSON file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            raw = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError
            raise ConfigError(f"token keyring {path}: {exc}") from exc
        keys, current = (raw.get("keys"), raw.get("current")) if isinstance(raw, dict) else ({}, 0)
        if not isinstance(keys, dict) or not keys or not isinstance(current, str):
            raise ConfigError(f"token keyring {path}: needs 'current' and a 'keys' table")
        decoded: dict[str, bytes] = {}
        for kid, value in keys.items():
            try:
                decoded[kid] = base64.b64decode(str(value), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(f"token keyring {path}: key {kid!r} is not base64") from exc
        return cls(decoded, current)

    @classmethod
    def generate_file(cls, path: Path, kid: str = "k1") -> Keyring:
        """Write a new one-key keyring file (mode 600, atomically); never overwrites."""
        path = Path(path)
        key = secrets.token_bytes(MIN_KEY_BYTES)
        ring = cls({kid: key}, kid)
        encoded = base64.b64encode(key).decode("ascii")
        if path.suffix == ".json":
            text = json.dumps({"current": kid, "keys": {kid: encoded}}, indent=2) + "\n"
        else:
            text = f'current = "{kid}"\n\n[keys]\n{kid} = "{encoded}"\n'
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            # link() fails if the target exists, unlike rename(): a complete file
            # appears at once, and an existing keyring is never replaced.
            os.link(tmp, path)
        except FileExistsError as exc:
            raise ConfigError(f"token keyring {path} already exists") from exc
        except OSError as exc:
            raise ConfigError(f"token keyring {path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return ring


def load_keyring(path: Path, *, create: bool) -> Keyring:
    """The link keyring at `path`; with `create` (local development), made on first use.

    The sender, the hooks and the replies service all load the same file;
    when two of them start at once, generate_file lets one write it and the
    others read it.
    """
    if not path.exists():
        if not create:
            raise ConfigError(f"link signing keys {path} do not exist")
        try:
            Keyring.generate_file(path)
        except ConfigError:
            if not path.exists():
                raise
    return Keyring.from_file(path)


def _mac(key: bytes, signed: str) -> str:
    return _b64encode(hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest())


def sign(keyring: Keyring, *, message_id: str, recipient: str | None, action: str,
         expires_at: datetime, url: str | None = None) -> str:
    """Sign a link token with the keyring's current key; recipient None: not one person."""
    if expires_at.tzinfo is None:
        raise TokenError("expires_at must be timezone-aware")
    if recipient is None and action == UNSUBSCRIBE:
        raise TokenError("an unsubscribe token must name its recipient")
    claims: dict[str, Any] = {"m": message_id, "a": action, "e": int(expires_at.timestamp())}
    if recipient is not None:
        claims["r"] = recipient.strip().lower()
    if url is not None:
        claims["u"] = url
    for field in claims.keys() & _LIMITS.keys():
        if not _fits(claims[field], _LIMITS[field]):
            raise TokenError(f"token field {field!r} is not a string of 1..{_LIMITS[field]}")
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    signed = f"{VERSION}.{keyring.current}.{payload}"
    token = f"{signed}.{_mac(keyring.keys[keyring.current], signed)}"
    if len(token) > MAX_TOKEN:
        raise TokenError(f"token would be longer than {MAX_TOKEN} characters")
    return token


def verify(keyring: Keyring, token: str, *, now: datetime) -> Claims:
    """Check a token's version, key, signature, shape and expiry; return its claims."""
    if now.tzinfo is None:
        raise TokenError("now must be timezone-aware")
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise TokenInvalid("token is too long")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION:
        raise TokenInvalid("not a v1 token")
    _, kid, payload, sig = parts
    if not _KID.fullmatch(kid):
        raise TokenInvalid("malformed key id")
    key = keyring.keys.get(kid)
    if key is None:
        raise UnknownKey(f"unknown key id {kid!r}")
    # Compare the encoded text: base64 without padding has slack bits in its last
    # character, so comparing decoded bytes would accept altered tokens.
    expected = _mac(key, f"{VERSION}.{kid}.{payload}")
    if not hmac.compare_digest(expected.encode("ascii"), sig.encode("ascii", "replace")):
        raise TokenInvalid("bad signature")
    try:
        claims = json.loads(_b64decode(payload))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenInvalid("payload is not JSON") from exc
    _check_shape(claims)
    expires_at = datetime.fromtimestamp(claims["e"], UTC)
    if now >= expires_at:
        raise TokenExpired(f"token expired at {expires_at.isoformat()}")
    return Claims(claims["m"], claims.get("r"), claims["a"], expires_at, claims.get("u"), kid)


def _check_shape(claims: Any) -> None:
    if not isinstance(claims, dict) or not _REQUIRED <= claims.keys() <= {*_LIMITS, "e"}:
        raise TokenInvalid("payload has the wrong fields")
    if type(claims["e"]) is not int:  # bool is an int subclass; JSON floats are refused
        raise TokenInvalid("expiry is not an integer")
    for field in claims.keys() & _LIMITS.keys():
        if not _fits(claims[field], _LIMITS[field]):
            raise TokenInvalid(f"field {field!r} is not a string of 1..{_LIMITS[field]}")
    if claims["a"] == UNSUBSCRIBE and "r" not in claims:
        raise TokenInvalid("an unsubscribe token without a recipient")


def _fits(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


class LinkBuilder:
    """Builds the signed links a message carries, pointing at the public hooks service.

    A token names the one recipient a message went to. A message sent to
    several people carries the same links for all of them, so its action and
    open links name no recipient (recipient None) and it gets no unsubscribe
    links at all: mailbus cannot tell which of them clicked, and must not
    suppress one recipient on another's click. Per-recipient links need one
    message per recipient.
    """

    def __init__(self, keyring: Keyring, base_url: str = DEFAULT_BASE_URL,
                 ttl: timedelta = DEFAULT_TTL, unsubscribe_mailto: str | None = None,
                 open_tracking: bool = False):
        # Both end up in List-Unsubscribe as they are: nothing that could break out of <...>.
        if not re.fullmatch(r"https?://[^\s<>\"\\]+", base_url):
            raise ConfigError(f"hooks base URL {base_url!r} is not an http(s) URL")
        if unsubscribe_mailto is not None and not re.fullmatch(r"[^\s@<>?&\"]+@[^\s@<>?&\"]+",
                                                               unsubscribe_mailto):
            raise ConfigError(f"unsubscribe mailto {unsubscribe_mailto!r} is not an address")
        self.keyring, self.base_url, self.ttl = keyring, base_url.rstrip("/"), ttl
        self.mailto, self.open_tracking = unsubscribe_mailto, open_tracking

    def _token(self, message_id: str, recipient: str | None, action: str, url: str | None,
               now: datetime) -> str:
        return sign(self.keyring, message_id=message_id, recipient=recipient, action=action,
                    expires_at=now + self.ttl, url=url)

    def action_url(self, message_id: str, recipient: str | None, action_id: str,
                   url: str | None = None, *, now: datetime) -> str:
        """The signed link of one action button; `url` is where the click lands."""
        if action_id in RESERVED_ACTIONS:
            # /a/, /u/ and /o/ tokens differ only by their action, so these names stay reserved.
            raise TokenError(f"action id {action_id!r} is reserved")
        return f"{self.base_url}/a/{self._token(message_id, recipient, action_id, url, now)}"

    def unsubscribe_url(self, message_id: str, recipient: str, *, now: datetime) -> str:
        """The one-click (RFC 8058) unsubscribe link."""
        return f"{self.base_url}/u/{self._token(message_id, recipient, UNSUBSCRIBE, None, now)}"

    def open_url(self, message_id: str, recipient: str | None, *, now: datetime) -> str:
        """The open-tracking pixel's link (recorded only where the hooks service tracks opens)."""
        return f"{self.base_url}/o/{self._token(message_id, recipient, OPEN, None, now)}"

    def unsubscribe_mailto(self, message_id: str, recipient: str, *,
                           now: datetime) -> str | None:
        """The mailto: unsubscribe link, or None when no mailbox is configured."""
        if self.mailto is None:
            return None
        return self._mailto(self._token(message_id, recipient, UNSUBSCRIBE, None, now))

    def _mailto(self, token: str) -> str:
        return f"mailto:{self.mailto}?subject={quote('unsubscribe-' + token, safe='')}"

    def unsubscribe_links(self, message_id: str, recipient: str, *, now: datetime) -> list[str]:
        """List-Unsubscribe's links: the one-click URL, and the mailto: link when a mailbox
        is configured; one token signed for both (they carry the same claims)."""
        token = self._token(message_id, recipient, UNSUBSCRIBE, None, now)
        return [f"{self.base_url}/u/{token}"] + ([self._mailto(token)] if self.mailto else [])
