"""Named SQL statements, loaded from `.sql` files where their comments live."""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def load(path: Path | Traversable) -> dict[str, str]:
    """Split a file into statements at `-- name: x` lines; comments stay with their SQL."""
    text = path.read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not queries:
        raise ValueError(f"{path}: no '-- name:' statements")
    return queries


def load_resource(package: str | None, name: str) -> dict[str, str]:
    """The statements of `name`, a file shipped as package data of `package` (`__package__`).

    Through importlib.resources, so the SQL is found wherever the package is
    installed (a wheel, a zip), not only beside a source checkout.
    """
    if not package:
        raise ValueError(f"{name}: no package to load it from")
    return load(resources.files(package) / name)
