"""The test vectors of schemas/README.md, read out of the page and checked against the code."""

from __future__ import annotations

import io
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from mailbus.codec import TOPIC_SCHEMAS, Registry
from mailbus.topics import ACCOUNT_PARTITIONS

README = Path(__file__).resolve().parents[2] / "schemas" / "README.md"
_VECTOR = re.compile(r"<!-- vector: (\S+) -->\n```\w*\n(.*?)\n```", re.DOTALL)


@cache
def readme_vectors() -> dict[str, Any]:
    """Every `<!-- vector: name -->` block of the README: JSON as parsed, `key: value` lines
    as a dict, anything else as text."""
    out: dict[str, Any] = {}
    for name, body in _VECTOR.findall(README.read_text(encoding="utf-8")):
        if body.lstrip().startswith(("{", "[")):
            out[name] = json.loads(body)
        elif all(re.fullmatch(r"[a-z0-9_-]+: .+", line) for line in body.splitlines()):
            out[name] = dict(line.split(": ", 1) for line in body.splitlines())
        else:
            out[name] = body
    return out


# CRC-64-AVRO exactly as the README's pseudo-code gives it.
EMPTY = 0xC15D213AA4D7A795
TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (EMPTY if _fp & 1 else 0)
    TABLE.append(_fp)


def crc64avro(data: bytes) -> int:
    fp = EMPTY
    for b in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ b) & 0xFF]
    return fp


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), unsigned."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    whole = len(data) - len(data) % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little") * m & mask
        k = (k ^ k >> 24) * m & mask
        h = (h * m & mask) ^ k
    tail = data[whole:]
    if tail:
        h = (h ^ int.from_bytes(tail, "little")) * m & mask
    h = (h ^ h >> 13) * m & mask
    return h ^ h >> 15


def test_every_vector_is_there() -> None:
    assert set(readme_vectors()) == {
        "partition", "crc64-null", "canonical-form-email.requested-v1",
        "fingerprint-email.requested-v1", "record-fields", "record-bytes",
        "canonical-form-email.requested-v2", "fingerprint-email.requested-v2",
        "record-bytes-v2", "canonical-form-email.requested-v3",
        "fingerprint-email.requested-v3", "record-bytes-v3"}


def test_crc64avro_of_null() -> None:
    vector = readme_vectors()["crc64-null"]
    assert crc64avro(vector["input"].encode()) == int(vector["fingerprint"], 16)


def _schema(topic: str, version: int) -> dict[str, Any]:
    return json.loads((README.parent / topic / f"v{version}.avsc").read_text())


@pytest.mark.parametrize("version", [1, 2, 3])
def test_canonical_form_is_the_schema_files(version: int) -> None:
    schema = _schema("email.requested", version)
    name = f"canonical-form-email.requested-v{version}"
    assert readme_vectors()[name] == json.loads(to_parsing_canonical_form(schema))
    # The block is the exact byte string, not only the same JSON.
    text = re.search(rf"<!-- vector: {name} -->\n```json\n(.*)\n",
                     README.read_text(encoding="utf-8"))
    assert text is not None and text[1] == to_parsing_canonical_form(schema)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_fingerprint_of_the_canonical_form(registry: Registry, version: int) -> None:
    vector = readme_vectors()[f"fingerprint-email.requested-v{version}"]
    schema = _schema("email.requested", version)
    fingerprint = crc64avro(to_parsing_canonical_form(schema).encode())
    assert fingerprint == int(vector["fingerprint"], 16)
    header = bytes.fromhex(vector["header"])
    assert header == b"\xc3\x01" + fingerprint.to_bytes(8, "little")
    assert header[2:] == registry.fingerprint("email.requested", version)


@pytest.mark.parametrize("topic", sorted(TOPIC_SCHEMAS))
def test_fingerprint_table_by_the_readme_algorithm(topic: str, registry: Registry) -> None:
    for version, _ in registry.versions(topic):
        row = re.search(rf"^\| {re.escape(topic)} \| \S+ \| {version} \| `([0-9a-f]{{16}})` \|$",
                        README.read_text(encoding="utf-8"), re.MULTILINE)
        assert row is not None, f"{topic} v{version} is missing from the fingerprint table"
        schema = _schema(topic, version)
        little_endian = crc64avro(to_parsing_canonical_form(schema).encode()).to_bytes(8, "little")
        assert little_endian.hex() == row[1] == registry.fingerprint(topic, version).hex()


def _with_defaults(fields: dict[str, Any], version: int) -> dict[str, Any]:
    schema = _schema("email.requested", version)
    defaults = {f["name"]: f["default"] for f in schema["fields"] if "default" in f}
    return {**defaults, **fields}


def test_record_bytes(registry: Registry) -> None:
    """The v1 vector: what a producer on v1 writes, read by today's registry."""
    fields, hex_text = readme_vectors()["record-fields"], readme_vectors()["record-bytes"]
    expected = bytes.fromhex("".join(hex_text.split()))
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(_schema("email.requested", 1), named_schemas={}),
                      _with_defaults(fields, 1))
    assert registry.fingerprint("email.requested", 1) + body.getvalue() == expected[2:]
    assert expected[:2] == b"\xc3\x01"
    name, decoded = registry.decode(expected)
    assert name == "mailbus.EmailRequested"
    assert {k: decoded[k] for k in ("event_id", "message_id", "account_id", "to", "subject",
                                    "text")} == {k: fields[k] for k in (
        "event_id", "message_id", "account_id", "to", "subject", "text")}
    assert decoded["headers"] == []  # v1 read as v2: the default
    assert int(decoded["requested_at"].timestamp() * 1_000_000) == fields["requested_at"]
    assert re.search(rf"encode to these {len(expected)} bytes", README.read_text())


def test_record_bytes_v2(registry: Registry) -> None:
    """The v2 vector: the v1 body followed by `headers`, read by today's registry."""
    headers = [{"name": "X-Campaign", "value": "spring-2026"}]
    fields = {**readme_vectors()["record-fields"], "headers": headers}
    expected = bytes.fromhex("".join(readme_vectors()["record-bytes-v2"].split()))
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(_schema("email.requested", 2), named_schemas={}),
                      _with_defaults(fields, 2))
    assert b"\xc3\x01" + registry.fingerprint("email.requested", 2) + body.getvalue() == expected
    assert registry.decode(expected)[1]["headers"] == headers
    assert registry.decode(expected)[1]["attachments"] == []  # v2 read as v3: the default
    v1 = bytes.fromhex("".join(readme_vectors()["record-bytes"].split()))
    assert expected[10:].startswith(v1[10:])


def test_record_bytes_v3(registry: Registry) -> None:
    """The v3 vector: what the registry writes today, the v2 body followed by `attachments`."""
    headers = [{"name": "X-Campaign", "value": "spring-2026"}]
    attachments = [{"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "size": 4, "filename": "test.txt", "content_type": "text/plain",
                    "content_id": None}]
    fields = {**readme_vectors()["record-fields"], "headers": headers,
              "attachments": attachments}
    expected = bytes.fromhex("".join(readme_vectors()["record-bytes-v3"].split()))
    assert registry.encode("email.requested", _with_defaults(fields, 3)) == expected
    assert registry.decode(expected)[1]["attachments"] == attachments
    v2 = bytes.fromhex("".join(readme_vectors()["record-bytes-v2"].split()))
    assert expected[10:].startswith(v2[10:])


def test_murmur2_matches_kafka() -> None:
    # Values printed by org.apache.kafka.common.utils.Utils.murmur2 (kafka-clients 4.1.1),
    # covering every tail length.
    assert murmur2(b"dev") == 0xF9953DE6
    assert murmur2(b"a") == 0xA2D0B27C
    assert murmur2(b"kafka") == 0xD067CF64
    assert murmur2(b"team-a") == 0xA9030BFC
    assert murmur2(b"acct-billing-eu") == 0x4F67A248


def test_partition_of_dev() -> None:
    vector = readme_vectors()["partition"]
    hashed = murmur2(vector["key"].encode())
    assert hashed == int(vector["murmur2"], 16)
    assert int(vector["partitions"]) == ACCOUNT_PARTITIONS
    assert (hashed & 0x7FFFFFFF) % ACCOUNT_PARTITIONS == int(vector["partition"])
