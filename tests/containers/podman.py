"""Running the project's image with podman, for tests/containers/image_check.py."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("MAILBUS_IMAGE", "localhost/mailbus:dev")
# The image's user (Dockerfile: useradd --uid 10001).
IMAGE_UID = 10001


def podman(*args: str, check: bool = True, timeout: float = 300,
           capture: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the project's containers.conf (scripts/podman.sh writes it)."""
    env = {**os.environ,
           "CONTAINERS_CONF": str(REPO / ".cache" / "podman" / "containers.conf")}
    return subprocess.run(["podman", *args], env=env, check=check, timeout=timeout,
                          capture_output=capture, text=True)


class Containers:
    """Containers of one test run, labelled with its id and removed together at the end."""

    def __init__(self, image: str = IMAGE):
        self.image = image
        self.run_id = uuid.uuid4().hex[:10]
        self.names: list[str] = []

    def start(self, name: str, command: list[str], env: dict[str, str],
              mounts: list[tuple[Path, str]]) -> str:
        """Start a container on the host's network; mounts are read-only."""
        full = f"mailbus-it-{self.run_id}-{name}"
        args = ["run", "-d", "--name", full, "--network", "host",
                "--label", f"mailbus.image-test={self.run_id}"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for source, target in mounts:
            args += ["--volume", f"{source}:{target}:ro"]
        self.names.append(full)
        podman(*args, self.image, *command)
        return full

    def running(self, name: str) -> bool:
        out = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
        return out.stdout.strip() == "true"

    def logs(self, name: str, chars: int = 4000) -> str:
        out = podman("logs", name, check=False)
        return (out.stdout + out.stderr)[-chars:]

    def wait_healthy(self, name: str, deadline: float = 90.0) -> None:
        """Run the image's own HEALTHCHECK until it passes; fail with the logs."""
        end = time.monotonic() + deadline
        while True:
            if not self.running(name):
                raise AssertionError(f"{name} exited:\n{self.logs(name)}")
            if podman("healthcheck", "run", name, check=False).returncode == 0:
                return
            if time.monotonic() > end:
                raise AssertionError(f"{name} not healthy after {deadline} s:\n{self.logs(name)}")
            time.sleep(1.0)

    def remove_all(self) -> None:
        """Stop and remove every container of this run (SIGTERM, then SIGKILL after 10 s)."""
        ids = podman("ps", "-a", "-q", "--filter", f"label=mailbus.image-test={self.run_id}",
                     check=False).stdout.split()
        if ids:
            podman("rm", "-f", "-t", "10", *ids, check=False)
