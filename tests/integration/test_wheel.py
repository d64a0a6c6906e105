"""The package installs and runs from a non-editable wheel: schemas and SQL are package data.

The wheel is built from a copy of the project's sources (as `pip wheel` does
for a user, through the build backend pyproject.toml names) and installed
with `--no-deps` into a venv of its own. Its dependencies come from the
development venv's site-packages, added by a `.pth` line: the `.pth` files in
a directory added that way are not run, so the development install's
editable finder, which maps `mailbus` onto this checkout, stays out. Every
command then runs from a directory outside the checkout, and a check at the
end proves no module was imported from the checkout's sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import uuid
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from mailbus import db
from mailbus.codec import TOPIC_SCHEMAS, Registry
from mailbus.settings import REPO_ROOT, ServiceSettings
from tests.support.postgres import superuser

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# import name -> folder, as pyproject.toml maps them (mailbus.sender -> services/sender).
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
# What a wheel build reads from the checkout.
SOURCES = ("pyproject.toml", "README.md", "schemas", *sorted(set(PACKAGE_DIRS.values())))

# Run inside the wheel's venv: import every module of the package (each
# service module loads its SQL at import), load the schemas through the codec
# and the migrations as `mailbus setup db` does, and say where it all came from.
PROBE = """
import importlib, importlib.util, json, pkgutil, sys
from importlib import resources
import mailbus
from mailbus import db, queries
from mailbus.codec import DEFAULT_SCHEMA_DIR, Registry
from mailbus.settings import DEFAULT_VAR

# __main__ modules run a command when imported.
modules = sorted(m.name for m in pkgutil.walk_packages(mailbus.__path__, "mailbus.")
                 if not m.name.endswith(".__main__"))
sql = {}
for name in modules:
    module = importlib.import_module(name)
    if isinstance(getattr(module, "SQL", None), dict):
        sql[name] = sorted(module.SQL)
packaged = {}
for name in ["mailbus", *modules]:
    spec = importlib.util.find_spec(name)
    if spec.submodule_search_locations is None:
        continue
    for entry in resources.files(name).iterdir():
        if entry.name.endswith(".sql"):
            packaged[f"{name}/{entry.name}"] = sorted(queries.load_resource(name, entry.name))
registry = Registry.load()
print(json.dumps({
    "schema_dir": str(DEFAULT_SCHEMA_DIR),
    "schemas": {topic: [[v, registry.fingerprint(topic, v).hex()]
                        for v, _ in registry.versions(topic)]
                for topic in sorted(p.name for p in DEFAULT_SCHEMA_DIR.iterdir() if p.is_dir())},
    "sql": sql,
    "packaged_sql": packaged,
    "migrations": [version for version, _ in db.migration_files()],
    "default_var": str(DEFAULT_VAR),
    "files": sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}),
}))
"""


def _site_packages(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix),
                                                      "platbase": str(prefix)}))


class Installed:
    """A venv holding only the wheel, and how to run its commands outside the checkout."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.root = root
        self.wheel = wheel
        self.bin = root / "venv" / "bin"
        self.site = _site_packages(root / "venv")
        self.cwd = root / "elsewhere"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PYTHONNOUSERSITE="1", PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
                   **extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.cwd, env=self.env(**extra), text=True,
                              capture_output=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        origin = REPO_ROOT / name
        if origin.is_dir():
            # symlinks=True keeps mailbus/schemas a link to schemas/, as in the checkout.
            shutil.copytree(origin, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(origin, source / name)
    dist = root / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist),
         str(source)], cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("mailbus-*.whl")
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    target = Installed(root, wheel)
    target.site.mkdir(parents=True, exist_ok=True)
    # The dependencies, without the development venv's editable finder (see above).
    (target.site / "mailbus-test-deps.pth").write_text(
        str(_site_packages(Path(sys.prefix))) + "\n")
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(target.bin / "python"), "install",
         "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300, check=False)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    target.cwd.mkdir()
    return target


def _expected_files() -> set[str]:
    """Every file the tree holds in a package's folder, named as the wheel must name it."""
    expected = set()
    for package, folder in PACKAGE_DIRS.items():
        base = REPO_ROOT / folder
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            relative = Path(dirpath).relative_to(base)
            for name in filenames:
                if not name.startswith("."):
                    expected.add("/".join([*package.split("."), *relative.parts, name]))
    return expected


def test_the_wheel_holds_every_file_of_the_package_folders(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = {n for n in wheel.namelist() if ".dist-info/" not in n}
    expected = _expected_files()
    # The contract's own files are among them, through mailbus/schemas -> schemas/.
    schemas = {f"mailbus/schemas/{p.relative_to(REPO_ROOT / 'schemas').as_posix()}"
               for p in (REPO_ROOT / "schemas").rglob("*") if p.is_file()}
    assert schemas and schemas <= expected
    assert any(n.startswith("mailbus/migrations/") and n.endswith(".sql") for n in expected)
    assert sorted(expected - names) == [], "files of the tree missing from the wheel"
    assert sorted(names - expected) == [], "files in the wheel that the tree does not hold"


def test_the_command_runs_from_the_wheel_outside_the_checkout(installed: Installed) -> None:
    result = installed.run(str(installed.bin / "mailbus"), "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    for command in ("setup", "ingest", "sender", "confirm", "replies", "hooks", "webhooks"):
        assert command in result.stdout


def test_schemas_and_sql_load_from_the_wheel(installed: Installed) -> None:
    result = installed.run(str(installed.bin / "python"), "-c", PROBE)
    assert result.returncode == 0, result.stdout + result.stderr
    probe = json.loads(result.stdout)

    assert Path(probe["schema_dir"]).is_relative_to(installed.site)
    registry = Registry.load(REPO_ROOT / "schemas")
    assert probe["schemas"] == {
        topic: [[v, registry.fingerprint(topic, v).hex()] for v, _ in registry.versions(topic)]
        for topic in sorted(p.name for p in (REPO_ROOT / "schemas").iterdir() if p.is_dir())}
    assert set(TOPIC_SCHEMAS) <= set(probe["schemas"])

    # Every .sql file of a service folder was loaded from the wheel, and each
    # module that names its statements SQL got them all.
    service_sql = {f"{package}/{path.name}"
                   for package, folder in PACKAGE_DIRS.items() if package != "mailbus"
                   for path in (REPO_ROOT / folder).glob("*.sql")}
    assert service_sql and service_sql <= set(probe["packaged_sql"])
    assert all(probe["packaged_sql"].values())
    assert len(probe["sql"]) >= len(service_sql) and all(probe["sql"].values())
    assert probe["migrations"] == [version for version, _ in db.migration_files()]
    # No checkout to keep state in: var/ under the working directory.
    assert probe["default_var"] == "var"

    # Nothing came from the checkout's sources (its .venv is where the dependencies are).
    sources = [REPO_ROOT / folder for folder in [*PACKAGE_DIRS.values(), "schemas"]]
    stray = [f for f in probe["files"] if f and any(Path(f).is_relative_to(s) for s in sources)]
    assert stray == []
    assert any(Path(f).is_relative_to(installed.site / "mailbus") for f in probe["files"])


@pytest.fixture
def throwaway_db(admin: ServiceSettings) -> Iterator[str]:
    """A database name nobody uses; whatever is made under it is dropped afterwards."""
    name = f"mailbus_wheel_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(superuser(admin).conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def test_setup_db_from_the_wheel_migrates_a_new_database(
        installed: Installed, admin: ServiceSettings, throwaway_db: str) -> None:
    # The role passwords it sets are those already in var/secrets: the shared
    # roles keep working for every other test.
    result = installed.run(str(installed.bin / "mailbus"), "setup", "db",
                           MAILBUS_VAR_DIR=str(admin.var_dir.resolve()),
                           MAILBUS_POSTGRES__DBNAME=throwaway_db)
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = [version for version, _ in db.migration_files()]
    owner = admin.postgres.model_copy(update={
        "dbname": throwaway_db, "user": db.OWNER_ROLE, "password": None,
        "password_file": admin.var_dir / "secrets" / f"postgres-{db.OWNER_ROLE}.password"})
    with psycopg.connect(owner.conninfo()) as conn:
        applied = [r[0] for r in conn.execute(
            "SELECT version FROM schema_migrations ORDER BY version")]
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                              ).fetchone()
    assert applied == shipped
    assert tables is not None and tables[0] > 1
