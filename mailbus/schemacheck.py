"""Schema evolution rules: may a new schema version replace an old one?

mailbus's rules (add fields only with defaults, never remove or rename,
enum symbols only appended) checked on the definitions, then proven with
sample data written with each version and read with the other.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from mailbus.codec import _parse, _shape


def sample_records(schema: dict[str, Any]) -> list[Any]:
    """Generate data for a schema: a minimal datum, then variants cycling symbols/branches."""
    named: dict[str, Any] = {}
    parsed = _parse(schema, named)
    width = max([2] + [len(t["symbols"]) for t in named.values() if t["type"] == "enum"])
    return [_sample(parsed, named, 0, True, 0)] + [
        _sample(parsed, named, k, False, 0) for k in range(width)]


_PRIMITIVES: dict[str, Callable[[int], Any]] = {
    "null": lambda k: None, "boolean": lambda k: k % 2 == 0, "int": int, "long": int,
    "float": float, "double": float, "bytes": lambda k: bytes([k % 256]),
    "string": lambda k: f"s{k}",
}


def _sample(schema: Any, named: Mapping[str, Any], k: int, minimal: bool, depth: int) -> Any:
    minimal = minimal or depth > 8  # lets recursive schemas bottom out on null / []
    if isinstance(schema, str):
        if schema in named:
            return _sample(named[schema], named, k, minimal, depth + 1)
        return _PRIMITIVES[schema](k)
    if isinstance(schema, list):
        if minimal and "null" in schema:
            return None
        branches = [b for b in schema if b != "null"] or ["null"]
        return _sample(branches[k % len(branches)], named, k, minimal, depth + 1)
    kind = schema["type"]
    if kind == "record":
        return {f["name"]: _sample(f["type"], named, k, minimal, depth + 1)
                for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][k % len(schema["symbols"])]
    if kind == "array":
        return [] if minimal else [_sample(schema["items"], named, k, minimal, depth + 1)]
    if kind == "map":
        return {} if minimal else {"k": _sample(schema["values"], named, k, minimal, depth + 1)}
    if kind == "fixed":
        return bytes(schema["size"])
    if schema.get("logicalType") == "decimal":
        return Decimal(k)
    return _sample(kind, named, k, minimal, depth + 1)  # e.g. {"type": "long", logicalType}


def check_compatible(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """List why new cannot replace old (empty if it can): mailbus rules, then real data
    written with each schema and read with the other through Avro schema resolution."""
    old_named: dict[str, Any] = {}
    new_named: dict[str, Any] = {}
    try:
        old_parsed = _parse(old, old_named)
        new_parsed = _parse(new, new_named)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the answer
        return [f"schema does not parse: {exc}"]
    problems = _rule_problems(old_named, new_named)
    directions = (("old data read with the new schema", old_parsed, new_parsed),
                  ("new data read with the old schema", new_parsed, old_parsed))
    for direction, writer, reader in directions:
        for sample in sample_records(writer):
            try:
                buffer = io.BytesIO()
                schemaless_writer(buffer, writer, sample)
                schemaless_reader(io.BytesIO(buffer.getvalue()), writer, reader)
            except Exception as exc:  # noqa: BLE001 - any failure is an incompatibility
                problems.append(f"{direction} fails: {type(exc).__name__}: {exc}")
                break
    return problems


def _rule_problems(old_named: Mapping[str, Any], new_named: Mapping[str, Any]) -> list[str]:
    # Avro resolution alone would allow these (removed fields with defaults, removed
    # enum symbols when the reader has a default): mailbus forbids them anyway.
    problems = []
    for name, old in old_named.items():
        new = new_named.get(name)
        if new is None or new["type"] != old["type"]:
            problems.append(f"{name}: {old['type']} removed, renamed or changed kind")
        elif old["type"] == "record":
            new_fields = {f["name"]: f for f in new["fields"]}
            old_fields = {f["name"] for f in old["fields"]}
            problems += [f"{name}.{f['name']}: field removed or renamed"
                         for f in old["fields"] if f["name"] not in new_fields]
            problems += [f"{name}.{f}: field added without a default"
                         for f, spec in new_fields.items()
                         if f not in old_fields and "default" not in spec]
            # Caught here, not by data: string<->bytes and logicalType changes still resolve.
            problems += [f"{name}.{f['name']}: type changed from {_shape(f['type'])} to "
                         f"{_shape(new_fields[f['name']]['type'])}"
                         for f in old["fields"] if f["name"] in new_fields
                         and _shape(f["type"]) != _shape(new_fields[f["name"]]["type"])]
        elif old["type"] == "enum":
            old_symbols, new_symbols = old["symbols"], new["symbols"]
            if new_symbols[: len(old_symbols)] != old_symbols:
                problems.append(f"{name}: symbols {old_symbols} became {new_symbols}; "
                                "symbols may only be appended")
            elif len(new_symbols) > len(old_symbols) and "default" not in old:
                problems.append(f"{name}: symbols appended, but the old enum has no default "
                                "for old readers to fall back to")
    return problems
