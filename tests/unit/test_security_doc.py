"""docs/security.md names the tests that prove each row: every one it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "security.md").read_text()
# `unit/test_x.py::test_name`, `::test_other` (same file as the last one), `integration/x.py`
_REF = re.compile(r"`((?:[\w/]+\.py)?)(?:::(test_\w+))?`")


def references() -> list[tuple[str, str | None]]:
    found, last = [], None
    for path, name in _REF.findall(DOC):
        if not path and not name:
            continue
        last = path or last
        assert last is not None, f"`::{name}` with no file before it"
        found.append((last, name or None))
    return found


def test_every_test_the_threat_model_names_exists() -> None:
    refs = references()
    assert len(refs) > 40
    missing = []
    for path, name in refs:
        if not path.startswith(("unit/", "integration/", "e2e/", "containers/")):
            continue
        source = REPO / "tests" / path
        if not source.is_file():
            missing.append(path)
        elif name and not re.search(rf"^(?:async )?def {name}\(", source.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, missing
