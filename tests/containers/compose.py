"""Running docker-compose.yml for tests/containers/compose_check.py.

docker-compose (Debian's 1.29) drives podman through podman's
Docker-compatible API (`podman system service` on a socket of the run's
own): bookworm's podman 4.3 is too old for podman-compose to wait on
`condition: service_healthy`. Podman runs a container's health check from a
systemd timer, and there is no systemd here, so `HealthTicker` does what
that timer does: `podman healthcheck run` on each of the project's
containers, first `interval` after it started and every `interval` after,
as Docker runs them; podman itself counts the start period and the retries.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.containers.podman import REPO, podman

COMPOSE_FILE = REPO / "docker-compose.yml"
# Host ports the compose file lets the environment choose (its header lists them).
PORT_VARIABLES = ("MAILBUS_API_PORT", "MAILBUS_HOOKS_PORT", "MAILBUS_MAILPIT_PORT",
                  "MAILBUS_PROMETHEUS_PORT", "MAILBUS_GRAFANA_PORT",
                  "MAILBUS_KAFKA_EXTERNAL_PORT")
PROJECT_LABEL = "com.docker.compose.project"


def free_ports(count: int) -> list[int]:
    """Ports free on the host's loopback now, all different."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class PodmanService:
    """`podman system service` on a socket of this run, stopped at the end."""

    def __init__(self, folder: Path):
        self.socket = folder / "podman.sock"
        env = {**os.environ,
               "CONTAINERS_CONF": str(REPO / ".cache" / "podman" / "containers.conf")}
        self.log = (folder / "podman-service.log").open("w")
        self.process = subprocess.Popen(
            ["podman", "system", "service", "--time", "0", f"unix://{self.socket}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not start (see {self.log.name})")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@dataclass
class HealthTicker:
    """Runs each container's health check on its interval, as a systemd timer would."""

    project: str
    # container name -> the time just before the first check that passed
    healthy_since: dict[str, float] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)
    _interval: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._tick()
            except (subprocess.SubprocessError, json.JSONDecodeError, OSError):
                continue  # a container that went away between two calls

    def _tick(self) -> None:
        out = podman("ps", "--filter", f"label={PROJECT_LABEL}={self.project}",
                     "--format", "json", check=False, timeout=60).stdout
        now = time.time()
        for row in json.loads(out or "[]"):
            key = row["Id"]
            name = row["Names"][0]
            if key not in self._interval:
                check = json.loads(podman("inspect", "--format", "{{json .Config.Healthcheck}}",
                                          key, check=False).stdout or "null") or {}
                if check.get("Test", ["NONE"])[0] == "NONE":
                    self._interval[key] = 0.0
                    continue
                self._interval[key] = (check.get("Interval") or 30_000_000_000) / 1e9
                self._due[key] = float(row["StartedAt"]) + self._interval[key]
            if not self._interval[key] or now < self._due[key]:
                continue
            self._due[key] = now + self._interval[key]
            before = time.time()
            if podman("healthcheck", "run", key, check=False, timeout=120).returncode == 0:
                self.healthy_since.setdefault(name, before)


class Compose:
    """One project of docker-compose.yml: its own name, ports, socket and home."""

    def __init__(self, folder: Path, image: str):
        self.project = f"mbct{uuid.uuid4().hex[:8]}"
        self.folder = folder
        self.ports = dict(zip(PORT_VARIABLES, free_ports(len(PORT_VARIABLES)), strict=True))
        # `~/.credentialsEmail` of the compose file: an empty one of this run's,
        # not the home of whoever runs the test.
        self.home = folder / "home"
        (self.home / ".credentialsEmail").mkdir(parents=True)
        self.service = PodmanService(folder)
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAILBUS_")},
                    **{k: str(v) for k, v in self.ports.items()},
                    "MAILBUS_IMAGE": image, "HOME": str(self.home),
                    "DOCKER_HOST": f"unix://{self.service.socket}",
                    "COMPOSE_HTTP_TIMEOUT": "300"}
        self.ticker = HealthTicker(self.project)
        self.ticker.start()

    def port(self, variable: str) -> int:
        return self.ports[variable]

    def run(self, *args: str, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """docker-compose ARGS for this project, from the repository's folder."""
        cmd = [shutil.which("docker-compose") or "docker-compose", "--ansi", "never", "-p",
               self.project, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), *args]
        result = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def containers(self, all_: bool = True) -> list[dict[str, Any]]:
        """The project's containers as `podman ps --format json` rows."""
        args = ["ps", "--filter", f"label={PROJECT_LABEL}={self.project}", "--format", "json"]
        return json.loads(podman(*args, *(["-a"] if all_ else [])).stdout or "[]")

    def container(self, service: str) -> str:
        """The name of the (first) container of a service."""
        for row in self.containers():
            labels = row.get("Labels") or {}
            if labels.get("com.docker.compose.service") == service and labels.get(
                    "com.docker.compose.oneoff") != "True":
                return str(row["Names"][0])
        raise AssertionError(f"no container for {service}")

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(podman("inspect", name).stdout)[0]  # type: ignore[no-any-return]

    def volumes(self) -> list[str]:
        return podman("volume", "ls", "--filter", f"label={PROJECT_LABEL}={self.project}",
                      "--format", "{{.Name}}").stdout.split()

    def networks(self) -> list[str]:
        names = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
        return [n for n in names if n.startswith(f"{self.project}_")]

    def logs(self, *services: str, chars: int = 3000) -> str:
        out = self.run("logs", "--no-color", "--tail", "60", *services, check=False)
        return (out.stdout + out.stderr)[-chars:]

    def remove_all(self) -> None:
        """down -v, then whatever of this project is left, by label and name."""
        try:
            self.run("down", "-v", "--remove-orphans", "-t", "10", check=False, timeout=300)
        finally:
            self.ticker.stop()
            ids = [row["Id"] for row in self.containers()]
            if ids:
                podman("rm", "-f", "-t", "5", *ids, check=False)
            for volume in self.volumes():
                podman("volume", "rm", "-f", volume, check=False)
            for network in self.networks():
                podman("network", "rm", "-f", network, check=False)
            self.service.stop()
