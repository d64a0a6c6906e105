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


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def server_certificate(folder: Path, name: str = "localhost") -> tuple[Path, Path, Path]:
    """(certificate, key, CA) of a server named `name` only (DNS SAN), from a fresh CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, crt = (folder / n for n in (
        "ca.key", "ca.crt", "leaf.key", "leaf.csr", "leaf.crt"))
    ext = folder / "ext.cnf"
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(ca_key), "-days", "2", "-subj", "/CN=test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-out", str(ca))
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))
    return crt, key, ca
