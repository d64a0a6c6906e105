"""requirements.lock (the image's pinned dependencies) covers what pyproject.toml asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {normalise(re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0])
              for dep in project["dependencies"]}
    text = (REPO / "requirements.lock").read_text()
    pinned = {normalise(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", text,
                                                          re.M)}
    missing = wanted - set(pinned)
    assert not missing, f"not in requirements.lock (run `scripts/podman.sh lock`): {missing}"
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 5)[-1])
    assert all("--hash=sha256:" in e for e in entries if "==" in e)
    assert {"setuptools", "wheel"} <= set(pinned)  # the image builds the project without isolation
