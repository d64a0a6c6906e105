"""Reply tags: the documented format, case-insensitivity, tampering, rotation, address limits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from mailbus.replytag import extract_tag, make_tag, tagged_address, verify_tag
from mailbus.tokens import Keyring, TokenError

MID = "7d1e4b2a-9c3f-4a5b-8e6d-0f1a2b3c4d5e"
K1, K2 = b"1" * 32, bytes(range(40))


@pytest.fixture
def ring() -> Keyring:
    return Keyring({"k1": K1}, "k1")


def independent_tag(key: bytes, kid: str, message_id: str) -> str:
    """The format as the module docstring states it, written without the module."""
    hexid = message_id.replace("-", "").lower()
    mac = base64.b32encode(hmac.new(key, b"reply." + hexid.encode(), hashlib.sha256).digest())
    return f"m{hexid}.{kid}.{mac.decode().lower()[:12]}"


def test_tag_follows_the_documented_format(ring: Keyring) -> None:
    assert make_tag(ring, MID) == independent_tag(K1, "k1", MID)
    assert make_tag(ring, MID) == "m7d1e4b2a9c3f4a5b8e6d0f1a2b3c4d5e.k1.re72gjfrz6zv"


def test_round_trip_gives_the_canonical_message_id(ring: Keyring) -> None:
    assert verify_tag(ring, make_tag(ring, MID.upper())) == MID


def test_tag_is_lower_case_and_survives_case_changes(ring: Keyring) -> None:
    tag = make_tag(ring, MID)
    assert re.fullmatch(r"[a-z0-9.]+", tag)
    assert verify_tag(ring, tag.upper()) == MID


def test_key_ids_match_without_regard_to_case() -> None:
    ring = Keyring({"K2": K1}, "K2")
    assert verify_tag(ring, make_tag(ring, MID).lower()) == MID


@pytest.mark.parametrize("position", [1, 20, 35, -1])
def test_any_altered_character_is_refused(ring: Keyring, position: int) -> None:
    tag = make_tag(ring, MID)
    swapped = "b" if tag[position] != "b" else "c"
    altered = tag[:position] + swapped + (tag[position + 1:] if position != -1 else "")
    assert verify_tag(ring, altered) is None


@pytest.mark.parametrize("tag", ["", "m" + "0" * 32, "x" * 200, "m7d1e.k1.abc", None, 42])
def test_malformed_tags_are_refused(ring: Keyring, tag: object) -> None:
    assert verify_tag(ring, tag) is None  # type: ignore[arg-type]


def test_rotation_keeps_old_tags_and_refuses_unknown_keys(ring: Keyring) -> None:
    old = make_tag(ring, MID)
    rotated = Keyring({"k1": K1, "k2": K2}, "k2")
    assert verify_tag(rotated, old) == MID
    assert verify_tag(rotated, make_tag(rotated, MID)) == MID
    assert verify_tag(Keyring({"k2": K2}, "k2"), old) is None
    assert verify_tag(Keyring({"k1": K2}, "k1"), old) is None  # same kid, other key


def test_message_id_must_be_a_uuid(ring: Keyring) -> None:
    with pytest.raises(TokenError):
        make_tag(ring, "not-a-uuid")


def test_tagged_address_fits_a_local_part(ring: Keyring) -> None:
    address = tagged_address("replies@example.com", make_tag(ring, MID))
    local = address.rpartition("@")[0]
    assert len(local) <= 64
    assert extract_tag(address) == make_tag(ring, MID)


def test_tagged_address_refuses_what_it_cannot_represent(ring: Keyring) -> None:
    tag = make_tag(ring, MID)
    with pytest.raises(TokenError):
        tagged_address("a-very-long-base-name@example.com", tag)
    with pytest.raises(TokenError):
        tagged_address("replies+list@example.com", tag)
    with pytest.raises(TokenError):
        tagged_address("no-at-sign", tag)


@pytest.mark.parametrize("address", ["replies@example.com", "replies+news@example.com",
                                     "replies+m123.k1.abc@example.com", "garbage"])
def test_extract_ignores_other_sub_addresses(address: str) -> None:
    assert extract_tag(address) is None
