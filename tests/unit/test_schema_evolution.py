"""Every schema version stays readable both ways, and the checker catches breakage."""

from __future__ import annotations

import copy
import io
import json
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from mailbus.codec import DEFAULT_SCHEMA_DIR, MARKER, TOPIC_SCHEMAS, Registry
from mailbus.errors import DecodeError
from mailbus.schemacheck import check_compatible, sample_records


def registry_problems(registry: Registry, topics: list[str]) -> list[str]:
    """Check every pair of versions (old, new) of every topic, both directions."""
    problems = []
    for topic in topics:
        versions = registry.versions(topic)
        for (old_n, old), (new_n, new) in combinations_with_replacement(versions, 2):
            problems += [f"{topic} v{old_n}->v{new_n}: {p}" for p in check_compatible(old, new)]
    return problems


def write_body(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    schemaless_writer(buffer, parse_schema(schema, named_schemas={}), record)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load()


@pytest.mark.parametrize("topic", sorted(TOPIC_SCHEMAS))
def test_all_versions_are_mutually_compatible(registry: Registry, topic: str) -> None:
    assert registry_problems(registry, [topic]) == []


@pytest.mark.parametrize("topic", sorted(TOPIC_SCHEMAS))
def test_every_version_decodes_into_the_latest(registry: Registry, topic: str) -> None:
    latest_fields = {f["name"] for f in registry.versions(topic)[-1][1]["fields"]}
    for number, schema in registry.versions(topic):
        for sample in sample_records(schema):
            data = MARKER + registry.fingerprint(topic, number) + write_body(schema, sample)
            name, record = registry.decode(data, topic)
            assert name == TOPIC_SCHEMAS[topic]
            assert set(record) == latest_fields


def test_folders_hold_only_known_topics() -> None:
    folders = {p.name for p in DEFAULT_SCHEMA_DIR.iterdir() if p.is_dir()}
    assert folders == set(TOPIC_SCHEMAS)


# --- conventions every released version follows (see schemas/README.md) ---
def _walk(schema: Any, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(schema, list):
        for branch in schema:
            _walk(branch, out)
    elif isinstance(schema, dict):
        out.append(schema)
        for field in schema.get("fields", ()):
            _walk(field["type"], out)
        _walk(schema.get("items"), out)
        _walk(schema.get("values"), out)
    return out


@pytest.mark.parametrize("topic", sorted(TOPIC_SCHEMAS))
def test_schema_conventions(registry: Registry, topic: str) -> None:
    for _, schema in registry.versions(topic):
        head = schema["fields"][:3]
        assert [f["name"] for f in head] == ["event_id", "message_id", "occurred_at"]
        assert head[0]["type"] == "string"
        nullable = ["null", "string"] if topic == "email.suppressions" else "string"
        assert head[1]["type"] == nullable
        assert head[2]["type"] == {"type": "long", "logicalType": "timestamp-micros"}
        for node in _walk(schema, []):
            if node["type"] in ("record", "enum"):
                assert node.get("doc"), node["name"]
                assert node.get("namespace", "mailbus") == "mailbus"
            if node["type"] == "enum":
                assert node.get("default") in node["symbols"], node["name"]
            for field in node.get("fields", ()):
                assert field.get("doc"), f"{node['name']}.{field['name']}"
                kind = field["type"]
                if isinstance(kind, list) and kind[0] == "null":
                    assert field.get("default", "missing") is None, field["name"]
                if isinstance(kind, dict) and kind["type"] in ("array", "map"):
                    assert field.get("default", []) in ([], {}), field["name"]


# --- the checker itself: it must catch real breakage ---
V1: dict[str, Any] = {
    "type": "record", "name": "Widget", "namespace": "mailbus", "doc": "A test record.",
    "fields": [
        {"name": "event_id", "type": "string", "doc": "Id."},
        {"name": "color", "doc": "Colour.", "type": {
            "type": "enum", "name": "Color", "symbols": ["red", "green", "blue"],
            "default": "red"}},
        {"name": "size", "type": "int", "doc": "Size."},
        {"name": "note", "type": ["null", "string"], "default": None, "doc": "Note."},
    ],
}


def variant(change: str) -> dict[str, Any]:
    """Return a v2 of V1 with one change applied."""
    v2 = copy.deepcopy(V1)
    fields = v2["fields"]
    color = fields[1]["type"]
    if change == "add_required":
        fields.append({"name": "weight", "type": "int", "doc": "Weight."})
    elif change == "add_optional":
        fields.append({"name": "weight", "type": ["null", "int"], "default": None, "doc": "W."})
    elif change == "remove_symbol":
        color["symbols"] = ["red", "green"]
    elif change == "reorder_symbols":
        color["symbols"] = ["green", "red", "blue"]
    elif change == "append_symbol":
        color["symbols"].append("violet")
    elif change == "retype_field":
        fields[2]["type"] = "string"
    elif change == "promote_int_to_long":
        fields[2]["type"] = "long"
    elif change == "make_optional_required":
        fields[3] = {"name": "note", "type": "string", "doc": "Note."}
    elif change == "remove_field":
        del fields[3]
    elif change == "rename_field":
        fields[3]["name"] = "remark"
    elif change == "rename_record":
        v2["name"] = "Gadget"
    elif change == "string_to_bytes":
        fields[0]["type"] = "bytes"
    elif change == "add_logical_type":
        fields[2]["type"] = {"type": "int", "logicalType": "date"}
    elif change == "doc_only":
        fields[0]["doc"] = "The event id, now better documented."
    return v2


@pytest.mark.parametrize(("change", "expected"), [
    ("add_required", ["Widget.weight: field added without a default",
                      "old data read with the new schema fails"]),
    ("remove_symbol", ["Color: symbols ['red', 'green', 'blue'] became ['red', 'green']"]),
    ("reorder_symbols", ["may only be appended"]),
    ("retype_field", ["old data read with the new schema fails",
                      "new data read with the old schema fails"]),
    ("promote_int_to_long", ["new data read with the old schema fails"]),
    ("make_optional_required", ["old data read with the new schema fails"]),
    ("remove_field", ["mailbus.Widget.note: field removed or renamed"]),
    ("rename_field", ["mailbus.Widget.note: field removed or renamed"]),
    ("rename_record", ["mailbus.Widget: record removed, renamed"]),
    ("string_to_bytes", ["mailbus.Widget.event_id: type changed from string to bytes"]),
    ("add_logical_type", ["Widget.size: type changed from int to int/date"]),
    ("retype_field", ["Widget.size: type changed from int to string"]),
])
def test_checker_reports_breaking_changes(change: str, expected: list[str]) -> None:
    problems = check_compatible(V1, variant(change))
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)


@pytest.mark.parametrize("change", ["add_optional", "append_symbol", "doc_only"])
def test_checker_accepts_compatible_changes(change: str) -> None:
    assert check_compatible(V1, variant(change)) == []


def test_appending_a_symbol_needs_an_old_default() -> None:
    old = copy.deepcopy(V1)
    del old["fields"][1]["type"]["default"]
    new = copy.deepcopy(old)
    new["fields"][1]["type"]["symbols"].append("violet")
    problems = check_compatible(old, new)
    assert any("no default" in p for p in problems)
    assert any("new data read with the old schema fails" in p for p in problems)


def test_new_symbol_reads_as_the_default_in_old_readers() -> None:
    new = variant("append_symbol")
    body = write_body(new, {"event_id": "e", "color": "violet", "size": 1})
    old_reader = parse_schema(V1, named_schemas={})
    record = schemaless_reader(io.BytesIO(body), parse_schema(new, named_schemas={}), old_reader)
    assert record["color"] == "red"


def _registry(root: Path, *versions: dict[str, Any]) -> Registry:
    (root / "test.widgets").mkdir(parents=True)
    for number, schema in enumerate(versions, start=1):
        (root / "test.widgets" / f"v{number}.avsc").write_text(json.dumps(schema))
    return Registry.load(root)


@pytest.mark.parametrize("change", ["add_required", "remove_symbol", "retype_field"])
def test_registry_check_fails_on_a_breaking_v2(tmp_path: Path, change: str) -> None:
    registry = _registry(tmp_path, V1, variant(change))
    assert registry_problems(registry, ["test.widgets"]) != []


def test_optional_field_round_trips_across_versions(tmp_path: Path) -> None:
    v2 = variant("add_optional")
    old_registry = _registry(tmp_path / "old", V1)
    new_registry = _registry(tmp_path / "new", V1, v2)
    assert registry_problems(new_registry, ["test.widgets"]) == []

    # Bytes from a producer still on v1 decode into the newest version, defaults filled in.
    old_bytes = old_registry.encode("test.widgets", {"event_id": "e", "color": "blue", "size": 3})
    assert old_bytes[2:10] == new_registry.fingerprint("mailbus.Widget", 1)
    assert new_registry.decode(old_bytes, "mailbus.Widget") == (
        "mailbus.Widget",
        {"event_id": "e", "color": "blue", "size": 3, "note": None, "weight": None})

    # v2 bytes resolve into v1 (the new field is dropped)...
    new_bytes = new_registry.encode("mailbus.Widget", {"event_id": "e", "color": "green",
                                                       "size": 4, "weight": 9})
    assert new_bytes[2:10] == new_registry.fingerprint("test.widgets") != old_bytes[2:10]
    v1_view = schemaless_reader(io.BytesIO(new_bytes[10:]), parse_schema(v2, named_schemas={}),
                                parse_schema(V1, named_schemas={}))
    assert v1_view == {"event_id": "e", "color": "green", "size": 4, "note": None}
    # ...but only for a reader that has the v2 file: ship schemas to consumers first.
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        old_registry.decode(new_bytes)


def test_doc_only_version_shares_the_fingerprint(tmp_path: Path) -> None:
    registry = _registry(tmp_path, V1, variant("doc_only"))
    assert registry.fingerprint("test.widgets", 1) == registry.fingerprint("test.widgets", 2)
    record = {"event_id": "e", "color": "red", "size": 1, "note": "n"}
    assert registry.decode(registry.encode("test.widgets", record))[1] == record


def test_samples_cover_every_enum_symbol_and_null() -> None:
    samples = sample_records(V1)
    assert {s["color"] for s in samples} == {"red", "green", "blue"}
    assert {s["note"] is None for s in samples} == {True, False}
