"""Services import the core, never each other; the core imports no service.

Each folder under services/ installs as `mailbus.<folder>` (pyproject.toml's
package-dir); everything under mailbus/ is the core. Every module of both is
parsed and each import is checked: module-level and inside functions,
relative ones resolved, and `importlib.import_module` / `__import__` with a
literal name. A string that names a service module ("mailbus.sender.x" or
"mailbus.sender.x:Name", what an import by name would load) counts as an
import too. `mailbus/cli.py` is the one dispatcher allowed to reach every
service. What two services share lives in the core (docs/design.md, Layout).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The operator's command line dispatches to every service.
DISPATCHERS = frozenset({"mailbus/cli.py"})


def service_names(root: Path) -> frozenset[str]:
    """The services: each package folder under services/."""
    return frozenset(p.parent.name for p in (root / "services").glob("*/__init__.py"))


def modules(root: Path) -> Iterator[tuple[Path, str, str | None]]:
    """(file, its dotted module name, the service it belongs to or None for the core)."""
    for path in sorted((root / "mailbus").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), None
    for path in sorted((root / "services").rglob("*.py")):
        rel = path.relative_to(root / "services").with_suffix("").parts
        parts = ("mailbus", *rel)
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), rel[0]


def imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything the module imports or loads by a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from mailbus import sender` imports the package mailbus.sender.
            names = [f"{base}.{alias.name}" for alias in node.names] if base == "mailbus" \
                else [base]
            for name in names:
                yield node.lineno, name
        elif (isinstance(node, ast.Call) and _loader(node.func) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and _MODULE_PATH.fullmatch(node.value):
            yield node.lineno, node.value.partition(":")[0]


_MODULE_PATH = re.compile(r"mailbus(\.\w+)+(:\w+)?")


def _loader(func: ast.expr) -> bool:
    """importlib.import_module(...), import_module(...) or __import__(...)."""
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


def service_of(name: str, services: frozenset[str]) -> str | None:
    """The service a dotted module name belongs to, None for the core or a library."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mailbus" and parts[1] in services \
        else None


def violations(root: Path) -> list[str]:
    """Every forbidden import under root, as `file:line: who imports what`."""
    services = service_names(root)
    found = []
    for path, module, owner in modules(root):
        rel = path.relative_to(root).as_posix()
        if rel in DISPATCHERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for line, name in imported(tree, module, path.name == "__init__.py"):
            target = service_of(name, services)
            if target is None or target == owner:
                continue
            who = f"service {owner}" if owner else "the core"
            found.append(f"{rel}:{line}: {who} imports {name} (service {target})")
    return sorted(set(found))


def test_services_import_only_the_core_and_the_core_no_service() -> None:
    assert len(service_names(REPO)) >= 6  # the walk sees the real tree
    assert violations(REPO) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


CLEAN = {
    "mailbus/__init__.py": "",
    "mailbus/rules.py": "import json\n",
    "mailbus/cli.py": "def main():\n    from mailbus.alpha.app import run\n",
    "services/alpha/__init__.py": "",
    "services/alpha/app.py": "from mailbus import rules\nfrom mailbus.alpha import util\n"
                             "from . import util as again\n",
    "services/alpha/util.py": "",
    "services/beta/__init__.py": "",
    "services/beta/app.py": "from mailbus.rules import *\nfrom .util import x\n",
    "services/beta/util.py": "",
}


def test_the_checker_passes_a_tree_that_keeps_the_rule(tmp_path: Path) -> None:
    _write(tmp_path, CLEAN)
    assert service_names(tmp_path) == {"alpha", "beta"}
    assert violations(tmp_path) == []


@pytest.mark.parametrize(("rel", "text", "expected"), [
    ("services/beta/app.py", "from mailbus.alpha.util import x\n",
     "services/beta/app.py:1: service beta imports mailbus.alpha.util (service alpha)"),
    ("services/beta/app.py", "import mailbus.alpha\n",
     "services/beta/app.py:1: service beta imports mailbus.alpha (service alpha)"),
    ("services/beta/app.py", "from mailbus import alpha\n",
     "services/beta/app.py:1: service beta imports mailbus.alpha (service alpha)"),
    ("services/beta/app.py", "from ..alpha import util\n",
     "services/beta/app.py:1: service beta imports mailbus.alpha (service alpha)"),
    ("services/beta/app.py", "def f():\n    x = 1\n    from mailbus.alpha import util\n",
     "services/beta/app.py:3: service beta imports mailbus.alpha (service alpha)"),
    ("mailbus/rules.py", "import importlib\nm = importlib.import_module('mailbus.alpha.app')\n",
     "mailbus/rules.py:2: the core imports mailbus.alpha.app (service alpha)"),
    ("mailbus/rules.py", "TABLE = {'a': 'mailbus.beta.util:Thing'}\n",
     "mailbus/rules.py:1: the core imports mailbus.beta.util (service beta)"),
    ("mailbus/rules.py", "if True:\n    from mailbus.beta.util import x\n",
     "mailbus/rules.py:2: the core imports mailbus.beta.util (service beta)"),
])
def test_the_checker_names_a_planted_violation(tmp_path: Path, rel: str, text: str,
                                               expected: str) -> None:
    _write(tmp_path, {**CLEAN, rel: text})
    assert expected in violations(tmp_path)


_PATH = re.compile(r"`((?:mailbus|services|tests|bench|scripts|deploy|schemas)/[\w./-]+)`")


def test_the_design_doc_names_only_files_that_exist() -> None:
    named = set(_PATH.findall((REPO / "docs" / "design.md").read_text(encoding="utf-8")))
    assert len(named) > 20  # the pattern still finds the doc's paths
    assert sorted(p for p in named if not (REPO / p).exists()) == []
