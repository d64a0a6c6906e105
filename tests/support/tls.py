"""A throwaway certificate authority, made with the openssl CLI like scripts/tls.sh's."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_ca(folder: Path, name: str = "stranger") -> Path:
    """A self-signed CA certificate in `folder`; returns its path (the key is thrown away)."""
    folder.mkdir(parents=True, exist_ok=True)
    crt = folder / f"{name}-ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(folder / f"{name}-ca.key"),
         "-days", "2", "-subj", f"/CN={name} CA", "-out", str(crt),
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True, timeout=30)
    return crt
