"""The image's HEALTHCHECK: does this container's mailbus service answer?

`MAILBUS_HEALTH_URL` names what to try: an http(s) URL that must answer 2xx, or
tcp://HOST:PORT that must accept a connection. Without it the service is found
in the container's processes (`mailbus <service>`) and its port read from the
same variables the service's settings read, falling back to their defaults.
Only the standard library: the check runs every interval, and must stay cheap.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path

# service: (environment variable of its port, the settings' default, path).
# tests/containers/test_compose_file.py holds this table to the settings classes.
SERVICES: dict[str, tuple[str | None, int, str | None]] = {
    "ingest": ("MAILBUS_PORT", 8080, "/healthz"),
    "sender": ("MAILBUS_METRICS_PORT", 9101, "/readyz"),  # 503 until it may send
    "confirm": ("MAILBUS_METRICS_PORT", 9102, "/metrics"),
    "projector": ("MAILBUS_METRICS_PORT", 9103, "/metrics"),
    "hooks": ("MAILBUS_METRICS_PORT", 9104, "/metrics"),
    "replies": ("MAILBUS_METRICS_PORT", 9105, "/metrics"),
    "webhooks": ("MAILBUS_METRICS_PORT", 9106, "/metrics"),
    "devsmtp": (None, 2525, None),  # `mailbus devsmtp --port` (an option, not a setting)
}
TIMEOUT = 5.0


def running_service() -> str | None:
    """The mailbus service some process of this container runs (PID 1, or under an init)."""
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if Path(arg).name == "mailbus" and argv[i + 1] in SERVICES:
                return argv[i + 1]
    return None


def target() -> str:
    url = os.environ.get("MAILBUS_HEALTH_URL")
    if url:
        return url
    service = running_service()
    if service is None:
        raise SystemExit("healthcheck: no mailbus service runs here; set MAILBUS_HEALTH_URL")
    variable, default, path = SERVICES[service]
    port = int((os.environ.get(variable) if variable else None) or default)
    return f"http://127.0.0.1:{port}{path}" if path else f"tcp://127.0.0.1:{port}"


def check(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "tcp":
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), TIMEOUT):
            return
    if parts.scheme not in ("http", "https"):
        raise SystemExit(f"healthcheck: unsupported URL {url}")
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - scheme checked
        if not 200 <= response.status < 300:
            raise SystemExit(f"healthcheck: {url} answered {response.status}")


def main() -> None:
    url = target()
    try:
        check(url)
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
