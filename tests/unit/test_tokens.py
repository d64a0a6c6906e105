"""Link tokens: the v1 format as a contract, expiry, key rotation, tampering, link building."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest

from mailbus.errors import ConfigError, MailbusError
from mailbus.tokens import (
    MAX_TOKEN,
    Keyring,
    LinkBuilder,
    TokenError,
    TokenExpired,
    TokenInvalid,
    UnknownKey,
    sign,
    verify,
)

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
MID = "0b6f3c1e-8a47-4f5e-9d0c-2f1a7e6b5c4d"
K1, K2 = b"1" * 32, bytes(range(40))


@pytest.fixture
def ring() -> Keyring:
    return Keyring({"k1": K1}, "k1")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(key: bytes, kid: str, claims: object) -> str:
    """An independent implementation of the documented format, as the hooks service would."""
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed = f"v1.{kid}.{payload}"
    return f"{signed}.{_b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())}"


def _token(ring: Keyring, **overrides: object) -> str:
    args: dict = {"message_id": MID, "recipient": "Ada@Example.org", "action": "unsubscribe",
                  "expires_at": NOW + timedelta(days=1)} | overrides
    return sign(ring, **args)


def test_round_trip_lower_cases_the_recipient(ring: Keyring) -> None:
    claims = verify(ring, _token(ring), now=NOW)
    assert (claims.message_id, claims.recipient, claims.action) == (MID, "ada@example.org",
                                                                     "unsubscribe")
    assert claims.expires_at == NOW + timedelta(days=1)
    assert claims.url is None and claims.kid == "k1"


def test_format_is_the_documented_contract(ring: Keyring) -> None:
    token = _token(ring, action="confirm", url="https://example.com/ok?a=1&b=2")
    version, kid, payload, _sig = token.split(".")
    assert (version, kid) == ("v1", "k1") and "=" not in token
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims == {"m": MID, "r": "ada@example.org", "a": "confirm",
                      "e": int((NOW + timedelta(days=1)).timestamp()),
                      "u": "https://example.com/ok?a=1&b=2"}
    assert token == forge(K1, "k1", claims)
    assert verify(ring, token, now=NOW).url == "https://example.com/ok?a=1&b=2"


def test_a_link_of_a_message_to_several_recipients_names_none(ring: Keyring) -> None:
    token = _token(ring, recipient=None, action="confirm")
    payload = token.split(".")[2]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert "r" not in claims and token == forge(K1, "k1", claims)
    assert verify(ring, token, now=NOW).recipient is None
    assert verify(ring, _token(ring, recipient=None, action="open"), now=NOW).recipient is None
    with pytest.raises(TokenError, match="must name its recipient"):
        _token(ring, recipient=None, action="unsubscribe")
    links = LinkBuilder(ring)
    assert verify(ring, links.action_url(MID, None, "yes", now=NOW).rpartition("/")[2],
                  now=NOW).recipient is None
    with pytest.raises(TokenError):
        links.unsubscribe_url(MID, None, now=NOW)  # type: ignore[arg-type]


def test_expired_at_and_after_the_expiry(ring: Keyring) -> None:
    token = _token(ring, expires_at=NOW)
    with pytest.raises(TokenExpired):
        verify(ring, token, now=NOW)
    with pytest.raises(TokenExpired):
        verify(ring, token, now=NOW + timedelta(days=400))
    assert verify(ring, token, now=NOW - timedelta(seconds=1)).message_id == MID


def test_retired_key_still_verifies_and_only_current_signs() -> None:
    old = Keyring({"k1": K1}, "k1")
    rotated = Keyring({"k1": K1, "k2": K2}, "k2")
    assert verify(rotated, _token(old), now=NOW).kid == "k1"
    fresh = _token(rotated)
    assert fresh.split(".")[1] == "k2"
    assert verify(rotated, fresh, now=NOW).kid == "k2"
    with pytest.raises(UnknownKey):
        verify(old, fresh, now=NOW)


def test_unknown_kid_fails(ring: Keyring) -> None:
    with pytest.raises(UnknownKey):
        verify(ring, forge(K1, "k9", {"m": MID, "r": "a@b.c", "a": "x", "e": 2**40}), now=NOW)


def test_same_kid_other_key_fails(ring: Keyring) -> None:
    impostor = Keyring({"k1": K2}, "k1")
    with pytest.raises(TokenInvalid):
        verify(ring, _token(impostor), now=NOW)


def test_tampering_any_character_fails(ring: Keyring) -> None:
    token = _token(ring, action="confirm", url="https://example.com/ok")
    for i, char in enumerate(token):
        for other in {"A" if char != "A" else "B", "." if char != "." else "_"}:
            tampered = token[:i] + other + token[i + 1:]
            with pytest.raises((TokenInvalid, UnknownKey)):
                verify(ring, tampered, now=NOW)
    for broken in (token + "A", token[:-1], token + "=", token + ".", "A" + token, ""):
        with pytest.raises(TokenError):
            verify(ring, broken, now=NOW)


@pytest.mark.parametrize("claims", [
    {"m": MID, "r": "a@b.c", "a": "x"},
    {"m": MID, "r": "a@b.c", "a": "x", "e": "2000000000"},
    {"m": MID, "r": "a@b.c", "a": "x", "e": 2000000000.5},
    {"m": MID, "r": "a@b.c", "a": "x", "e": True},
    {"m": MID, "r": "a@b.c", "a": "", "e": 2000000000},
    {"m": MID, "r": 7, "a": "x", "e": 2000000000},
    {"m": MID, "r": "a@b.c", "a": "x" * 65, "e": 2000000000},
    {"m": MID, "r": "a@b.c", "a": "x", "e": 2000000000, "u": None},
    {"m": MID, "r": "a@b.c", "a": "x", "e": 2000000000, "admin": True},
    {"m": MID, "r": "", "a": "x", "e": 2000000000},
    {"m": MID, "r": None, "a": "x", "e": 2000000000},
    {"m": MID, "a": "unsubscribe", "e": 2000000000},  # whom to suppress?
    ["m", "r", "a", "e"],
    "v1",
])
def test_genuine_signature_over_a_bad_payload_fails(ring: Keyring, claims: object) -> None:
    with pytest.raises(TokenInvalid):
        verify(ring, forge(K1, "k1", claims), now=NOW)


def test_non_json_payload_with_a_genuine_signature_fails(ring: Keyring) -> None:
    signed = f"v1.k1.{_b64(b'not json')}"
    token = f"{signed}.{_b64(hmac.new(K1, signed.encode(), hashlib.sha256).digest())}"
    with pytest.raises(TokenInvalid):
        verify(ring, token, now=NOW)


def test_oversized_and_foreign_tokens_fail(ring: Keyring) -> None:
    with pytest.raises(TokenInvalid, match="too long"):
        verify(ring, "v1.k1." + "A" * MAX_TOKEN + ".x", now=NOW)
    with pytest.raises(TokenInvalid):
        verify(ring, "v2" + _token(ring)[2:], now=NOW)
    with pytest.raises(TokenInvalid):
        verify(ring, "v1.k 1.a.b", now=NOW)


def test_sign_refuses_naive_datetimes_and_oversized_fields(ring: Keyring) -> None:
    with pytest.raises(TokenError):
        _token(ring, expires_at=datetime(2030, 1, 1))  # naive: refused
    with pytest.raises(TokenError):
        _token(ring, url="https://x.org/" + "a" * 3000)
    with pytest.raises(TokenError):
        _token(ring, action="")


def test_errors_share_the_mailbus_root() -> None:
    for exc in (TokenInvalid, TokenExpired, UnknownKey):
        assert issubclass(exc, TokenError) and issubclass(exc, MailbusError)


@pytest.mark.parametrize("keys, current", [
    ({"k1": b"short"}, "k1"),
    ({"k1": K1}, "k2"),
    ({"bad kid": K1}, "bad kid"),
])
def test_keyring_refuses_weak_or_inconsistent_keys(keys: dict, current: str) -> None:
    with pytest.raises(ConfigError):
        Keyring(keys, current)


def test_keyring_from_toml_and_json(tmp_path: Path, ring: Keyring) -> None:
    b1, b2 = base64.b64encode(K1).decode(), base64.b64encode(K2).decode()
    toml = tmp_path / "keys.toml"
    toml.write_text(f'current = "k2"\n[keys]\nk1 = "{b1}"\nk2 = "{b2}"\n')
    as_json = tmp_path / "keys.json"
    as_json.write_text(json.dumps({"current": "k2", "keys": {"k1": b1, "k2": b2}}))
    for path in (toml, as_json):
        loaded = Keyring.from_file(path)
        assert loaded.current == "k2" and loaded.keys == {"k1": K1, "k2": K2}
        assert verify(loaded, _token(ring), now=NOW).kid == "k1"


@pytest.mark.parametrize("text", [
    'current = "k1"\n[keys]\nk1 = "' + base64.b64encode(b"x" * 31).decode() + '"\n',
    'current = "k1"\n[keys]\nk1 = "not base64!"\n',
    'current = "k1"\n',
    "not toml at all [",
])
def test_keyring_file_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        Keyring.from_file(path)
    with pytest.raises(ConfigError):
        Keyring.from_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", ["keys.toml", "keys.json"])
def test_generate_file_is_private_and_never_overwrites(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    made = Keyring.generate_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Keyring.from_file(path)
    assert loaded.keys == made.keys and len(loaded.keys[loaded.current]) >= 32
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        Keyring.generate_file(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_link_builder_urls_verify(ring: Keyring) -> None:
    links = LinkBuilder(ring, "https://hooks.example.org/", timedelta(days=7),
                        "unsubscribe@example.org")
    action = links.action_url(MID, "Ada@Example.org", "confirm", "https://example.com/ok", now=NOW)
    prefix = "https://hooks.example.org/a/"
    assert action.startswith(prefix)
    claims = verify(ring, action.removeprefix(prefix), now=NOW)
    assert (claims.action, claims.url, claims.recipient) == ("confirm", "https://example.com/ok",
                                                             "ada@example.org")
    assert claims.expires_at == NOW + timedelta(days=7)
    unsub = links.unsubscribe_url(MID, "ada@example.org", now=NOW)
    assert verify(ring, unsub.removeprefix("https://hooks.example.org/u/"), now=NOW).action == (
        "unsubscribe")
    mailto = links.unsubscribe_mailto(MID, "ada@example.org", now=NOW)
    assert mailto is not None
    head, _, subject = mailto.partition("?subject=")
    assert head == "mailto:unsubscribe@example.org"
    token = unquote(subject).removeprefix("unsubscribe-")
    assert verify(ring, token, now=NOW).action == "unsubscribe"


def test_link_builder_defaults_and_reserved_action(ring: Keyring) -> None:
    links = LinkBuilder(ring)
    assert links.unsubscribe_url(MID, "a@b.c", now=NOW).startswith("http://127.0.0.1:8081/u/")
    assert links.unsubscribe_mailto(MID, "a@b.c", now=NOW) is None
    with pytest.raises(TokenError, match="reserved"):
        links.action_url(MID, "a@b.c", "unsubscribe", now=NOW)
    with pytest.raises(TokenError, match="reserved"):
        links.action_url(MID, "a@b.c", "open", now=NOW)
    assert links.open_tracking is False
    with pytest.raises(ConfigError):
        LinkBuilder(ring, unsubscribe_mailto="x@y.z?cc=victim@evil")
    with pytest.raises(ConfigError):
        LinkBuilder(ring, "https://hooks.example.org>\r\nBcc: victim@evil")


def test_open_url_verifies_as_an_open(ring: Keyring) -> None:
    links = LinkBuilder(ring, "https://hooks.example.org", open_tracking=True)
    url = links.open_url(MID, "Ada@Example.org", now=NOW)
    assert url.startswith("https://hooks.example.org/o/")
    claims = verify(ring, url.removeprefix("https://hooks.example.org/o/"), now=NOW)
    assert (claims.action, claims.recipient, claims.url) == ("open", "ada@example.org", None)


def test_verify_refuses_a_naive_now(ring: Keyring) -> None:
    with pytest.raises(TokenError):
        verify(ring, _token(ring), now=datetime(2025, 3, 14))  # naive: refused


def test_an_api_key_accepts_its_rotated_out_secret_only_within_the_grace() -> None:
    from datetime import UTC, datetime, timedelta

    from mailbus import apikeys

    old, new = apikeys.new_secret(), apikeys.new_secret()
    cur, prev = apikeys.hash_secret(new), apikeys.hash_secret(old)
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    later = now + timedelta(hours=1)
    assert apikeys.accepts(new, cur, prev, later, now)
    assert apikeys.accepts(old, cur, prev, later, now)
    assert not apikeys.accepts(old, cur, prev, later, later)  # the grace ended
    assert not apikeys.accepts(old, cur, None, None, now)  # no rotation, or no grace
    assert apikeys.accepts(new, cur, None, None, now)
    other = apikeys.new_secret()
    assert not apikeys.accepts(other, cur, prev, later, now)
    assert apikeys.parse(apikeys.token("abcdefghij", new)) == ("abcdefghij", new)
