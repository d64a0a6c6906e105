"""The files the services read at run time are package data, with one source each.

tests/integration/test_wheel.py proves it on an installed wheel; these checks
say sooner, without a build, when the tree drifts from it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from mailbus.codec import DEFAULT_SCHEMA_DIR
from mailbus.settings import REPO_ROOT

PACKAGE_DIRS: dict[str, str] = tomllib.loads(
    (REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# A module finding a file beside itself works only while it runs from a folder
# that holds the file; importlib.resources works wherever the package is.
SOURCE_RELATIVE = re.compile(r"\b__file__\b")
# The one place allowed: settings.py tells a checkout's var/ from a wheel's.
ALLOWED = {"mailbus/settings.py": 1}


def test_the_packaged_schemas_are_the_contracts_own_files() -> None:
    link = REPO_ROOT / "mailbus" / "schemas"
    assert link.is_symlink() and Path(link.readlink()) == Path("..") / "schemas"
    assert Path(str(DEFAULT_SCHEMA_DIR)).resolve() == (REPO_ROOT / "schemas").resolve()


def test_no_module_finds_its_files_relative_to_the_source_tree() -> None:
    found = {}
    for folder in sorted(set(PACKAGE_DIRS.values())):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT).as_posix()
            hits = len(SOURCE_RELATIVE.findall(path.read_text(encoding="utf-8")))
            if hits != ALLOWED.get(relative, 0):
                found[relative] = hits
    assert found == {}, "locate package files with importlib.resources, not __file__"


def test_the_readme_states_the_mapping_of_import_names_to_folders() -> None:
    first_screen = (REPO_ROOT / "README.md").read_text().split("\n## ", 1)[0]
    stated = re.findall(r"`(services/[a-z]+)/` is `(mailbus\.[a-z]+)`", first_screen)
    assert stated, "the README's first screen names no folder and its import name"
    for folder, package in stated:
        assert PACKAGE_DIRS[package] == folder
    assert all(package == "mailbus" or folder.startswith("services/")
               for package, folder in PACKAGE_DIRS.items())
