"""Avro single-object encoding of mailbus events, and the versioned schema registry."""

from __future__ import annotations

import copy
import io
import json
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from mailbus.errors import DecodeError, EncodeError, SchemaError

MARKER = b"\xc3\x01"
HEADER_SIZE = 10  # marker + 8-byte fingerprint
# The repository's schemas/, shipped inside the package (mailbus/schemas links
# to it), so an installed wheel carries the same files the contract documents.
DEFAULT_SCHEMA_DIR: Traversable = resources.files("mailbus") / "schemas"

TOPIC_SCHEMAS: dict[str, str] = {
    "email.requested": "mailbus.EmailRequested",
    "email.sent": "mailbus.EmailSent",
    "email.failed": "mailbus.EmailFailed",
    "email.delivered": "mailbus.EmailDelivered",
    "email.bounced": "mailbus.EmailBounced",
    "email.responses": "mailbus.EmailResponse",
    "email.confirmed": "mailbus.EmailConfirmed",
    "email.suppressions": "mailbus.Suppression",
    "email.schedule": "mailbus.ScheduleChange",
}

_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")
# Only these logical types denote an instant; local-timestamp-* is naive by design.
_AWARE_TIMESTAMPS = frozenset({"timestamp-millis", "timestamp-micros", "timestamp-nanos"})
_Check = Callable[[Any, str], None]


@dataclass(frozen=True, slots=True)
class _Version:
    name: str
    version: int
    raw: dict[str, Any]
    parsed: dict[str, Any]
    fingerprint: bytes
    header: bytes  # MARKER + fingerprint
    check: _Check | None


@dataclass(frozen=True, slots=True)
class _Schema:
    name: str
    topic: str
    versions: tuple[_Version, ...]


class Registry:
    """All versions of every mailbus schema; encodes with the latest, decodes any."""

    def __init__(self, schemas: list[_Schema]) -> None:
        """Index loaded schemas by full name and topic; use Registry.load instead."""
        self._schemas: dict[str, _Schema] = {}
        # fingerprint -> (schema, writer, reader); reader None when no resolution is needed
        self._readers: dict[bytes, tuple[_Schema, _Version, dict[str, Any] | None]] = {}
        for schema in schemas:
            for key in (schema.name, schema.topic):
                if key in self._schemas:
                    raise SchemaError(f"{key} is defined by two schema folders")
                self._schemas[key] = schema
            latest = schema.versions[-1]
            for version in schema.versions:
                seen = self._readers.get(version.fingerprint)
                if seen is not None and seen[0] is not schema:
                    raise SchemaError(f"fingerprint collision: {seen[0].name} and {schema.name}")
                # Versions differing only in docs/defaults share a canonical form, so
                # the same fingerprint and body layout: read them as the latest directly.
                if version.fingerprint == latest.fingerprint:
                    self._readers[version.fingerprint] = (schema, latest, None)
                else:
                    self._readers[version.fingerprint] = (schema, version, latest.parsed)

    @classmethod
    def load(cls, directory: Path | Traversable | None = None) -> Registry:
        """Load every <topic>/v<N>.avsc under directory (default: the installed schemas/)."""
        root = directory if directory is not None else DEFAULT_SCHEMA_DIR
        if not root.is_dir():
            raise SchemaError(f"schema directory {root} does not exist")
        folders = [p for p in sorted(root.iterdir(), key=_name)
                   if p.is_dir() and p.name[0] not in "._"]
        if not folders:
            raise SchemaError(f"{root} holds no schema folders")
        return cls([_load_topic(folder) for folder in folders])

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Validate record and write it single-object encoded with the latest version."""
        schema = self._schemas.get(name)
        if schema is None:
            raise EncodeError(f"no schema or topic named {name!r}")
        version = schema.versions[-1]
        if not isinstance(record, Mapping):
            raise EncodeError(f"{schema.name}: a record must be a mapping, not "
                              f"{type(record).__name__}")
        if version.check is not None:
            version.check(record, schema.name)
        # raise_errors=True is ~7x slower on valid data (every non-matching union branch
        # builds and catches an exception), so ask it only once we know it will fail.
        if not validate(record, version.parsed, raise_errors=False):
            try:
                validate(record, version.parsed, raise_errors=True)
            except ValidationError as exc:
                # A union reports one error per branch; "not null" is noise next to the rest.
                errors = [e for e in exc.errors if e.schema != "null"] or exc.errors
                raise EncodeError("; ".join(map(_describe, errors))) from exc
            raise EncodeError(f"{schema.name}: the record does not match the schema")
        buffer = io.BytesIO()
        buffer.write(version.header)
        try:
            schemaless_writer(buffer, version.parsed, record)
        except Exception as exc:
            raise EncodeError(f"{schema.name}: {type(exc).__name__}: {exc}") from exc
        return buffer.getvalue()

    def decode(self, data: bytes, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """Read single-object encoded data into the latest version of its schema."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < HEADER_SIZE:
            raise DecodeError(f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
        if data[:2] != MARKER:
            raise DecodeError(f"not single-object Avro: marker {data[:2].hex()}, expected c301")
        entry = self._readers.get(data[2:HEADER_SIZE])
        if entry is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:HEADER_SIZE].hex()} "
                              "(a version this registry does not have yet?)")
        schema, writer, reader = entry
        if name is not None:
            expected = self._schemas.get(name)
            if expected is not schema:
                raise DecodeError(f"expected {name}, but the data is {schema.name}")
        stream = io.BytesIO(data)
        stream.seek(HEADER_SIZE)
        try:
            record = cast(dict[str, Any], schemaless_reader(stream, writer.parsed, reader))
        except Exception as exc:
            raise DecodeError(
                f"corrupt {schema.name} v{writer.version} body: {type(exc).__name__}: {exc}"
            ) from exc
        if stream.tell() != len(data):
            raise DecodeError(f"{len(data) - stream.tell()} trailing bytes after {schema.name}")
        return schema.name, record

    def versions(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        """Return (version, schema as JSON-decoded from its file) pairs, oldest first."""
        return [(v.version, copy.deepcopy(v.raw)) for v in self._schema(name).versions]

    def fingerprint(self, name: str, version: int | None = None) -> bytes:
        """Return the 8-byte CRC-64-AVRO fingerprint (little-endian) of a version, or latest."""
        versions = self._schema(name).versions
        if version is None:
            return versions[-1].fingerprint
        if not 1 <= version <= len(versions):
            raise SchemaError(f"{name} has no version {version}")
        return versions[version - 1].fingerprint

    def _schema(self, name: str) -> _Schema:
        try:
            return self._schemas[name]
        except KeyError:
            raise SchemaError(f"no schema or topic named {name!r}") from None


def _name(path: Traversable) -> str:
    return path.name


def _load_topic(folder: Traversable) -> _Schema:
    found: dict[int, _Version] = {}
    # What glob("*.avsc") matched, on any Traversable: hidden files are not schemas.
    files = (p for p in folder.iterdir() if p.name.endswith(".avsc") and p.name[0] != ".")
    for path in sorted(files, key=_name):
        match = _VERSION_FILE.fullmatch(path.name)
        if match is None:
            raise SchemaError(f"{path}: schema files must be named v<N>.avsc")
        found[int(match[1])] = _load_version(path, int(match[1]))
    if not found:
        raise SchemaError(f"{folder}: no v<N>.avsc files")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise SchemaError(f"{folder}: versions must run v1..vN, found {sorted(found)}")
    versions = tuple(found[n] for n in sorted(found))
    name = versions[0].name
    expected = TOPIC_SCHEMAS.get(folder.name, name)
    for version in versions:
        if version.name != expected:
            raise SchemaError(f"{folder}/v{version.version}.avsc: defines {version.name}, "
                              f"but {folder.name} carries {expected}")
    return _Schema(name=name, topic=folder.name, versions=versions)


def _load_version(path: Traversable, number: int) -> _Version:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SchemaError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("type") != "record":
        raise SchemaError(f"{path}: the top level must be a record schema")
    named: dict[str, Any] = {}
    try:
        parsed = _parse(raw, named)
        canonical = to_parsing_canonical_form(raw)
        # fastavro's hex digest is already in the little-endian order the header uses.
        fingerprint = bytes.fromhex(_fastavro_fingerprint(canonical, "CRC-64-AVRO"))
    except Exception as exc:
        raise SchemaError(f"{path}: invalid Avro schema: {exc}") from exc
    # fastavro accepts any branch's value as a union default; the spec (and Java's
    # parser) require the first branch, so null defaults need "null" listed first.
    for type_name, named_type in named.items():
        for field in named_type.get("fields", ()):
            union = field["type"]
            if isinstance(union, list) and "default" in field:
                if (field["default"] is None) != (union[0] == "null"):
                    raise SchemaError(f"{path}: {type_name}.{field['name']}: a union default "
                                      "must match the union's first branch")
    return _Version(parsed["name"], number, raw, parsed, fingerprint, MARKER + fingerprint,
                    _compile_check(parsed, named))


def _parse(schema: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    # named collects every named type, full name -> definition; keep one dict per file
    # so versions that redefine mailbus.Address do not collide.
    return cast(dict[str, Any], parse_schema(schema, named_schemas=named))


def _compile_check(schema: Any, named: Mapping[str, Any], seen: frozenset[str] = frozenset(),
                   ) -> _Check | None:
    """Build a checker for what fastavro's validation lets through: unknown record keys
    (silently dropped by the writer) and naive datetimes (silently taken as UTC)."""
    if isinstance(schema, str):
        if schema in named and schema not in seen:  # recursive references stay unchecked
            return _compile_check(named[schema], named, seen)
        return None
    if isinstance(schema, list):
        checks = [c for b in schema if (c := _compile_check(b, named, seen)) is not None]
        # Several checked branches (e.g. two records) cannot be told apart by shape
        # here; fastavro's validation still covers their types.
        return checks[0] if len(checks) == 1 else None
    kind = schema["type"]
    if kind == "record":
        fields = frozenset(f["name"] for f in schema["fields"])
        subs = [(f["name"], c) for f in schema["fields"]
                if (c := _compile_check(f["type"], named, seen | {schema["name"]})) is not None]

        def check_record(value: Any, path: str) -> None:
            # isinstance(x, Mapping) is an ABC check, several times slower than the exact type
            if type(value) is not dict and not isinstance(value, Mapping):
                return  # fastavro's validation reports the wrong type
            if not fields.issuperset(value):
                unknown = sorted(map(str, value.keys() - fields))
                raise EncodeError(f"{path}: unknown field(s) {unknown}")
            for field, check in subs:
                item = value.get(field)
                if item is not None:
                    check(item, f"{path}.{field}")
        return check_record
    if kind in ("array", "map"):
        sub = _compile_check(schema["items" if kind == "array" else "values"], named, seen)
        if sub is None:
            return None

        def check_items(value: Any, path: str) -> None:
            if isinstance(value, list | tuple):
                for index, item in enumerate(value):
                    sub(item, f"{path}[{index}]")
            elif isinstance(value, Mapping):
                for key, item in value.items():
                    sub(item, f"{path}[{key!r}]")
        return check_items
    if schema.get("logicalType") in _AWARE_TIMESTAMPS:
        return _check_aware
    return None


def _check_aware(value: Any, path: str) -> None:
    if isinstance(value, datetime) and value.utcoffset() is None:
        raise EncodeError(f"{path}: naive datetime {value.isoformat()}; "
                          "pass a timezone-aware datetime (UTC)")


def _describe(error: Any) -> str:
    got = ("missing or null" if error.datum is None
           else f"got {type(error.datum).__name__} {reprlib.repr(error.datum)}")
    return f"{error.field}: {got}, expected {_label(error.schema)}"


def _label(schema: Any) -> str:
    if isinstance(schema, dict) and schema["type"] == "enum":
        return f"one of {schema['symbols']}"
    return " | ".join(map(_label, schema)) if isinstance(schema, list) else _shape(schema)


def _shape(schema: Any) -> str:
    # Named types are compared by name here; their own definitions are compared apiece.
    if isinstance(schema, list):
        return "[" + ", ".join(map(_shape, schema)) + "]"
    if not isinstance(schema, dict):
        return str(schema)
    if schema["type"] in ("record", "enum", "fixed"):
        return str(schema["name"])
    if schema["type"] in ("array", "map"):
        return f"{schema['type']}<{_shape(schema.get('items', schema.get('values')))}>"
    return f"{schema['type']}/{schema['logicalType']}" if "logicalType" in schema else str(
        schema["type"])
