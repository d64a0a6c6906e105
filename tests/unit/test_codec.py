"""Single-object Avro codec: round trips, the wire header, fingerprints, errors."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastavro.schema import to_parsing_canonical_form

from mailbus.codec import DEFAULT_SCHEMA_DIR, MARKER, TOPIC_SCHEMAS, Registry
from mailbus.errors import DecodeError, EncodeError, SchemaError

T0 = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)
MID = "0b6f3c1e-8a47-4f5e-9d0c-2f1a7e6b5c4d"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load()


def _head(topic: str) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, topic)), "message_id": MID,
            "occurred_at": T0}


FULL: dict[str, dict[str, Any]] = {
    "email.requested": _head("req") | {
        "account_id": "acct-billing-eu", "pool": "transactional", "key_id": "key_01HQ",
        "idempotency_key": "order-4711-receipt",
        "to": [{"email": "ada@example.org", "name": "Ada Lovelace"}],
        "cc": [{"email": "charles@example.org", "name": None}],
        "bcc": [{"email": "audit@example.com", "name": "Audit"}],
        "reply_to": {"email": "support@example.com", "name": "Support"},
        "subject": "Your receipt for order 4711", "text": "Thanks for your order.",
        "html": "<p>Thanks for your order.</p>",
        "template": {"subject": "Receipt {{order}}", "text": None, "html": "<p>{{order}}</p>",
                     "variables_json": json.dumps({"order": 4711, "total": "12.50 EUR"}),
                     "name": "receipt", "version": 3},
        "actions": [{"id": "confirm", "label": "Confirm", "url": "https://example.com/ok"},
                    {"id": "dispute", "label": "Not me", "url": None}],
        "tags": ["receipt", "eu"], "metadata": {"order_id": "4711", "crm": "x-9"},
        "send_at": T0 + timedelta(minutes=5), "requested_at": T0 - timedelta(seconds=1),
        "headers": [{"name": "X-Campaign", "value": "spring"}],
        "attachments": [{"sha256": "ab" * 32, "size": 48_213, "filename": "receipt-4711.pdf",
                         "content_type": "application/pdf", "content_id": None},
                        {"sha256": "cd" * 32, "size": 912, "filename": "logo.png",
                         "content_type": "image/png", "content_id": "logo"}],
    },
    "email.sent": _head("sent") | {
        "account_id": "acct-billing-eu", "transport": "smtp",
        "recipients": ["ada@example.org", "charles@example.org"],
        "provider_message_id": None, "rfc822_message_id": f"<{MID}@mail.example.com>",
        "smtp_response": "250 2.0.0 Ok: queued as 4Q1x2y", "attempt": 2,
        "requested_at": T0 - timedelta(seconds=3), "possible_duplicate": True,
        "send_latency_us": 48_213,
    },
    "email.failed": _head("failed") | {
        "account_id": "acct-billing-eu", "reason": "mailbox unavailable", "code": 550,
        "enhanced_status": "5.1.1", "permanent": True, "recipient": "nobody@example.org",
        "attempt": 1,
    },
    "email.delivered": _head("delivered") | {
        "account_id": "acct-billing-eu", "recipient": "ada@example.org", "evidence": "dsn",
        "detail": "Status: 2.0.0 (delivered to mailbox)",
    },
    "email.bounced": _head("bounced") | {
        "account_id": "acct-billing-eu", "recipient": "nobody@example.org",
        "bounce_class": "hard", "status_code": "5.1.1",
        "diagnostic": "smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected",
    },
    "email.responses": _head("responses") | {
        "account_id": "acct-billing-eu", "kind": "action", "recipient": "ada@example.org",
        "action_id": "confirm", "subject": "Re: Your receipt", "text": "Looks good, ta!",
        "reliable": True, "source": "imap:acct-billing-eu",
    },
    "email.confirmed": _head("confirmed") | {
        "account_id": "acct-billing-eu", "outcome": "confirmed", "evidence": "smtp_final",
        "requested_at": T0 - timedelta(seconds=3), "sent_at": T0 - timedelta(seconds=2),
        "delivered_at": T0, "sent_to_delivered_us": 2_000_000,
        "requested_to_delivered_us": 3_000_000,
    },
    "email.suppressions": _head("suppressions") | {
        "address": "nobody@example.org",
        "address_hash": "5f1d2b9a3c4e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8",
        "reason": "hard_bounce", "scope": "acct-billing-eu", "active": True,
    },
    "email.schedule": _head("schedule") | {
        "account_id": "acct-billing-eu", "key_id": "key_01HQ", "change": "rescheduled",
        "send_at": T0 + timedelta(days=20), "reason": "the sale moved to next month",
    },
}

MINIMAL: dict[str, dict[str, Any]] = {
    "email.requested": _head("req") | {
        "account_id": "a", "to": [{"email": "ada@example.org"}], "requested_at": T0},
    "email.sent": _head("sent") | {
        "account_id": "a", "transport": "gmail", "rfc822_message_id": "<x@y>"},
    "email.failed": _head("failed") | {"account_id": "a", "reason": "timeout",
                                       "permanent": False},
    "email.delivered": _head("delivered") | {"evidence": "mailbox"},
    "email.bounced": _head("bounced") | {"recipient": "x@example.org", "bounce_class": "soft"},
    "email.responses": _head("responses") | {"kind": "open", "reliable": False},
    "email.confirmed": _head("confirmed") | {
        "account_id": "a", "evidence": "dsn", "sent_at": T0, "delivered_at": T0,
        "sent_to_delivered_us": 0},
    "email.suppressions": {"event_id": "e", "occurred_at": T0, "address": "x@example.org",
                           "address_hash": "ab", "reason": "manual"},
    "email.schedule": _head("schedule") | {"account_id": "a", "key_id": "k",
                                           "change": "cancelled"},
}


def test_registry_has_every_topic(registry: Registry) -> None:
    assert set(FULL) == set(MINIMAL) == set(TOPIC_SCHEMAS)
    for topic, name in TOPIC_SCHEMAS.items():
        assert (DEFAULT_SCHEMA_DIR / topic / "v1.avsc").is_file()
        assert registry.versions(topic) == registry.versions(name)
        assert registry.versions(topic)[0][0] == 1


@pytest.mark.parametrize("topic", sorted(TOPIC_SCHEMAS))
def test_round_trip_full(registry: Registry, topic: str) -> None:
    data = registry.encode(topic, FULL[topic])
    assert data[:2] == b"\xc3\x01" == MARKER
    assert data[2:10] == registry.fingerprint(topic) == registry.fingerprint(TOPIC_SCHEMAS[topic])
    assert registry.decode(data) == (TOPIC_SCHEMAS[topic], FULL[topic])
    assert registry.decode(data, topic)[1] == registry.decode(data, TOPIC_SCHEMAS[topic])[1]


@pytest.mark.parametrize("topic", sorted(TOPIC_SCHEMAS))
def test_round_trip_minimal_fills_defaults(registry: Registry, topic: str) -> None:
    name, record = registry.decode(registry.encode(TOPIC_SCHEMAS[topic], MINIMAL[topic]))
    assert name == TOPIC_SCHEMAS[topic]
    schema = registry.versions(topic)[-1][1]
    defaults = {f["name"]: f["default"] for f in schema["fields"] if "default" in f}
    expected = defaults | MINIMAL[topic]
    if topic == "email.requested":
        expected["to"] = [{"email": "ada@example.org", "name": None}]
    assert record == expected
    assert set(record) == {f["name"] for f in schema["fields"]}


def test_defaults_of_key_fields(registry: Registry) -> None:
    _, sent = registry.decode(registry.encode("email.sent", MINIMAL["email.sent"]))
    assert sent["attempt"] == 1 and sent["recipients"] == []
    _, sup = registry.decode(registry.encode("email.suppressions", MINIMAL["email.suppressions"]))
    assert sup["message_id"] is None and sup["active"] is True and sup["scope"] is None
    reply = _head("r") | {"kind": "reply"}
    _, response = registry.decode(registry.encode("email.responses", reply))
    assert response["reliable"] is True


def test_readme_lists_every_fingerprint(registry: Registry) -> None:
    readme = (DEFAULT_SCHEMA_DIR / "README.md").read_text()
    for topic, name in TOPIC_SCHEMAS.items():
        for number, _ in registry.versions(topic):
            row = f"| {topic} | {name} | {number} | `{registry.fingerprint(topic, number).hex()}` |"
            assert row in readme


# --- CRC-64-AVRO, written from the Avro specification ("Schema Fingerprints") ---
EMPTY64 = 0xC15D213AA4D7A795
TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (EMPTY64 & -(_fp & 1))
    TABLE.append(_fp)


def rabin64(data: bytes) -> int:
    fp = EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ byte) & 0xFF]
    return fp


PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def canonical(schema: Any, namespace: str = "") -> str:
    """Parsing Canonical Form per the spec, for the subset mailbus uses."""
    def full(name: str, ns: str) -> str:
        return name if "." in name or not ns else f"{ns}.{name}"
    if isinstance(schema, str):
        return json.dumps(schema if schema in PRIMITIVES else full(schema, namespace))
    if isinstance(schema, list):
        return "[" + ",".join(canonical(branch, namespace) for branch in schema) + "]"
    kind = schema["type"]
    if kind in ("record", "enum", "fixed"):
        name = full(schema["name"], schema.get("namespace", namespace))
        inner = name.rpartition(".")[0]
        parts = [f'"name":{json.dumps(name)}', f'"type":"{kind}"']
        if kind == "record":
            fields = [f'{{"name":{json.dumps(f["name"])},"type":{canonical(f["type"], inner)}}}'
                      for f in schema["fields"]]
            parts.append('"fields":[' + ",".join(fields) + "]")
        elif kind == "enum":
            parts.append('"symbols":' + json.dumps(schema["symbols"], separators=(",", ":")))
        else:
            parts.append(f'"size":{schema["size"]}')
        return "{" + ",".join(parts) + "}"
    if kind == "array":
        return f'{{"type":"array","items":{canonical(schema["items"], namespace)}}}'
    if kind == "map":
        return f'{{"type":"map","values":{canonical(schema["values"], namespace)}}}'
    return canonical(kind, namespace)  # {"type": "long", "logicalType": ...}: attributes stripped


# Published in Apache Avro's share/test/data/schema-tests.txt (signed 64-bit).
AVRO_TEST_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"boolean"', -6970731678124411036),
    ('{"name":"foo","type":"fixed","size":15}', 1756455273707447556),
    ('{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}',
     7843277075252814651),
]


@pytest.mark.parametrize(("text", "expected"), AVRO_TEST_VECTORS)
def test_rabin_matches_avro_test_vectors(text: str, expected: int) -> None:
    assert rabin64(text.encode()) == expected % 2**64


@pytest.mark.parametrize("topic", sorted(TOPIC_SCHEMAS))
def test_fingerprint_is_independent_crc64_avro_of_canonical_form(
        registry: Registry, topic: str) -> None:
    schema = registry.versions(topic)[-1][1]
    form = canonical(schema)
    assert form == to_parsing_canonical_form(schema)
    assert registry.fingerprint(topic) == rabin64(form.encode()).to_bytes(8, "little")
    latest = len(registry.versions(topic))
    assert registry.fingerprint(topic, latest) == registry.fingerprint(topic, None)


def test_fingerprint_and_versions_errors(registry: Registry) -> None:
    with pytest.raises(SchemaError):
        registry.fingerprint("email.sent", 99)
    with pytest.raises(SchemaError):
        registry.fingerprint("nope")
    with pytest.raises(SchemaError):
        registry.versions("mailbus.Nope")
    registry.versions("email.sent")[0][1]["fields"].clear()  # a copy: the registry is unharmed
    assert registry.decode(registry.encode("email.sent", FULL["email.sent"]))[1]


# --- decode errors ---
@pytest.fixture(scope="module")
def encoded(registry: Registry) -> bytes:
    return registry.encode("email.requested", FULL["email.requested"])


def test_decode_wrong_marker(registry: Registry, encoded: bytes) -> None:
    with pytest.raises(DecodeError, match="marker"):
        registry.decode(b"\xc3\x02" + encoded[2:])
    with pytest.raises(DecodeError, match="marker"):
        registry.decode(b"\x00" + encoded[1:])  # a Confluent-framed record starts with 0x00


def test_decode_unknown_fingerprint(registry: Registry, encoded: bytes) -> None:
    with pytest.raises(DecodeError, match="unknown schema fingerprint 0000000000000000"):
        registry.decode(MARKER + bytes(8) + encoded[10:])


def test_decode_truncated(registry: Registry, encoded: bytes) -> None:
    for size in range(len(encoded)):
        with pytest.raises(DecodeError):
            registry.decode(encoded[:size])


def test_decode_trailing_bytes(registry: Registry, encoded: bytes) -> None:
    with pytest.raises(DecodeError, match="1 trailing bytes"):
        registry.decode(encoded + b"\x00")


def test_decode_not_bytes(registry: Registry) -> None:
    with pytest.raises(DecodeError, match="NoneType"):
        registry.decode(None)  # type: ignore[arg-type]  # a Kafka tombstone


def test_decode_random_garbage_only_raises_decode_error(registry: Registry) -> None:
    rng = random.Random(20250314)
    for _ in range(400):
        garbage = rng.randbytes(rng.randrange(0, 300))
        with pytest.raises(DecodeError):
            registry.decode(garbage)


def test_decode_corrupt_bodies_never_raise_anything_else(
        registry: Registry, encoded: bytes) -> None:
    rng = random.Random(7)
    headers = [registry.fingerprint(topic) for topic in TOPIC_SCHEMAS]
    for _ in range(400):
        body = MARKER + rng.choice(headers) + rng.randbytes(rng.randrange(0, 120))
        flipped = bytearray(encoded)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(10, len(flipped))] = rng.randrange(256)
        for data in (body, bytes(flipped)):
            try:
                registry.decode(data)
            except DecodeError:
                pass


def test_decode_checks_the_expected_name(registry: Registry, encoded: bytes) -> None:
    assert registry.decode(encoded, "email.requested")[0] == "mailbus.EmailRequested"
    with pytest.raises(DecodeError, match=r"expected email\.sent, but the data is"):
        registry.decode(encoded, "email.sent")
    with pytest.raises(DecodeError):
        registry.decode(encoded, "mailbus.Nope")


# --- encode errors ---
@pytest.mark.parametrize(("change", "fragment"), [
    ({"account_id": None}, "EmailRequested.account_id"),
    ({"to": [{"email": 5}]}, "email"),
    ({"subject": b"bytes"}, "subject"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"tags": "receipt"}, "tags"),
    ({"send_at": "2025-03-14"}, "send_at"),
])
def test_encode_names_the_bad_field(registry: Registry, change: dict[str, Any],
                                    fragment: str) -> None:
    with pytest.raises(EncodeError, match=fragment):
        registry.encode("email.requested", FULL["email.requested"] | change)


@pytest.mark.parametrize(("topic", "change", "fragment"), [
    ("email.sent", {"transport": "pigeon"}, "transport"),
    ("email.sent", {"attempt": "2"}, "attempt"),
    ("email.sent", {"attempt": 2**40}, "attempt"),
    ("email.failed", {"permanent": None}, "permanent"),
    ("email.failed", {"code": 5.5}, "code"),
])
def test_encode_rejects_what_the_writer_would_coerce(
        registry: Registry, topic: str, change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(EncodeError, match=fragment):
        registry.encode(topic, FULL[topic] | change)


def test_encode_missing_required_field(registry: Registry) -> None:
    record = dict(FULL["email.sent"])
    del record["rfc822_message_id"]
    with pytest.raises(EncodeError, match="rfc822_message_id: missing"):
        registry.encode("email.sent", record)


def test_encode_rejects_unknown_fields(registry: Registry) -> None:
    with pytest.raises(EncodeError, match=r"EmailRequested: unknown field\(s\) \['subjct'\]"):
        registry.encode("email.requested", FULL["email.requested"] | {"subjct": "typo"})
    with pytest.raises(EncodeError, match=r"EmailRequested\.to\[0\]: unknown .*'emial'"):
        registry.encode("email.requested", FULL["email.requested"] | {"to": [{"emial": "x"}]})


def test_encode_unknown_name_or_non_mapping(registry: Registry) -> None:
    with pytest.raises(EncodeError, match="no schema or topic"):
        registry.encode("email.nope", {})
    with pytest.raises(EncodeError, match="mapping"):
        registry.encode("email.sent", [("event_id", "x")])  # type: ignore[arg-type]


# --- timestamps: aware only ---
@pytest.mark.parametrize("field", ["occurred_at", "requested_at", "send_at"])
def test_naive_datetimes_are_rejected(registry: Registry, field: str) -> None:
    with pytest.raises(EncodeError, match=f"EmailRequested.{field}: naive datetime"):
        registry.encode("email.requested", FULL["email.requested"] | {field: datetime(2025, 1, 1)})


def test_aware_datetimes_come_back_as_utc(registry: Registry) -> None:
    paris = timezone(timedelta(hours=1))
    local = datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=paris)
    record = FULL["email.failed"] | {"occurred_at": local}
    _, back = registry.decode(registry.encode("email.failed", record))
    assert back["occurred_at"] == local and back["occurred_at"].tzinfo == UTC
    assert back["occurred_at"].hour == 11 and back["occurred_at"].microsecond == 123456


def test_integer_micros_are_accepted_as_utc(registry: Registry) -> None:
    micros = int(T0.timestamp()) * 1_000_000 + T0.microsecond
    _, back = registry.decode(registry.encode("email.failed", FULL["email.failed"]
                                              | {"occurred_at": micros}))
    assert back["occurred_at"] == T0


# --- loading ---
def _write(root: Path, topic: str, version: str, text: str) -> None:
    (root / topic).mkdir(parents=True, exist_ok=True)
    (root / topic / version).write_text(text)


def _sent_v1() -> str:
    return (DEFAULT_SCHEMA_DIR / "email.sent" / "v1.avsc").read_text()


@pytest.mark.parametrize(("files", "fragment"), [
    ({"v1.avsc": "{not json"}, "email.sent/v1.avsc: not readable JSON"),
    ({"v1.avsc": '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "Nope"}]}'},
     "email.sent/v1.avsc: invalid Avro schema"),
    ({"v1.avsc": '{"type": "record", "name": "X", "namespace": "mailbus", "fields": []}'},
     "carries mailbus.EmailSent"),
    ({"v1.avsc": '["null", "string"]'}, "must be a record"),
    ({"v01.avsc": "{}"}, "v01.avsc: schema files must be named"),
    ({"v1.avsc": "SENT", "v3.avsc": "SENT"}, "versions must run v1..vN"),
    ({"v1.avsc": '{"type": "record", "name": "X", "fields": [{"name": "a", "type": '
                 '["string", "null"], "default": null}]}'}, "X.a: a union default"),
    ({}, "no v<N>.avsc files"),
])
def test_load_rejects_bad_files(tmp_path: Path, files: dict[str, str], fragment: str) -> None:
    (tmp_path / "email.sent").mkdir()
    for version, text in files.items():
        _write(tmp_path, "email.sent", version, text.replace("SENT", _sent_v1()))
    with pytest.raises(SchemaError, match=fragment):
        Registry.load(tmp_path)


def test_load_rejects_missing_dir_and_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        Registry.load(tmp_path / "nope")
    with pytest.raises(SchemaError, match="no schema folders"):
        Registry.load(tmp_path)
    _write(tmp_path, "email.sent", "v1.avsc", _sent_v1())
    _write(tmp_path, "copy.of.sent", "v1.avsc", _sent_v1())
    with pytest.raises(SchemaError, match=r"mailbus\.EmailSent is defined by two"):
        Registry.load(tmp_path)
