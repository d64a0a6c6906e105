"""The project's image, run for real with podman: `make image-test` (not part of `pytest tests`).

It proves the image runs as non-root and holds none of this machine's
secrets in any layer, then starts ingest, sender, confirm, projector and a
development SMTP server from the image on the host's network, against the
native Kafka and PostgreSQL (`make infra`), in a topic namespace of its own,
waits on each container's own HEALTHCHECK, and runs `mailbus verify` from
the image: every message sent through the containerised API must be
confirmed. Every container is removed at the end, pass or fail.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbus.settings import ServiceSettings
from tests.containers.podman import IMAGE, IMAGE_UID, Containers, podman

COUNT = int(os.environ.get("MAILBUS_IMAGE_TEST_COUNT", "200"))
# Where the project keeps credentials: none of these may be in the image.
SECRET_PATH = re.compile(r"(^|/)(kafka-[^/]*\.password|postgres-[^/]*\.password|link-keys\.json"
                         r"|dev-api-key|accounts\.toml|\.credentialsEmail|token\.json)$"
                         r"|^app/(var|\.venv|\.cache|\.git)/")


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `scripts/podman.sh build` (or `make image-test`)")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: run `scripts/podman.sh build` first")
    return IMAGE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_runs_as_an_unprivileged_user(image: str) -> None:
    config_user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert config_user and not config_user.startswith(("root", "0")), config_user
    ids = podman("run", "--rm", "--network", "none", image, "id", "-u").stdout.strip()
    assert ids == str(IMAGE_UID)
    # The installed code and the interpreter are not the service user's to change.
    probe = ("import os, mailbus; print(os.path.dirname(mailbus.__file__),"
             " os.access(os.path.dirname(mailbus.__file__), os.W_OK),"
             " os.access('/opt/mailbus/bin', os.W_OK))")
    assert podman("run", "--rm", "--network", "none", image, "python", "-c",
                  probe).stdout.split() == [
        "/opt/mailbus/lib/python3.11/site-packages/mailbus", "False", "False"]


def test_no_layer_holds_a_secret(image: str, tmp_path: Path) -> None:
    """No credential-like path in any layer, and none of this machine's secret values anywhere."""
    archive = tmp_path / "image.tar"
    podman("save", "--format", "docker-archive", "-o", str(archive), image, timeout=600)
    history = podman("image", "history", "--no-trunc", "--format", "{{.CreatedBy}}",
                     image).stdout
    secrets_dir = ServiceSettings(service_name="admin").var_dir / "secrets"
    values = [p.read_bytes().strip() for p in sorted(secrets_dir.glob("*")) if p.is_file()]
    values = [v for v in values if len(v) >= 16]
    assert values, f"no secrets in {secrets_dir} to look for (run `make infra`)"
    offending: list[str] = []
    layers = 0
    with tarfile.open(archive) as outer:
        for member in outer:
            data = outer.extractfile(member) if member.isfile() else None
            if data is None:
                continue
            blob = data.read()  # layers are uncompressed tars in a docker-archive
            offending += [f"a value of {secrets_dir} in {member.name}"
                          for value in values if value in blob]
            if member.name.endswith(".tar"):
                layers += 1
                with tarfile.open(fileobj=io.BytesIO(blob)) as layer:
                    offending += [f"{member.name}: {name}" for name in layer.getnames()
                                  if SECRET_PATH.search(name)]
    assert layers >= 2
    offending += [f"history: a value of {secrets_dir}" for value in values
                  if value.decode(errors="replace") in history]
    assert not offending, offending


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    run = Containers(image)
    try:
        yield run
    finally:
        run.remove_all()


def service_secrets(tmp_path: Path, container: str, service: str) -> Path:
    """A copy of one principal's two password files, readable by the image's user only."""
    source = ServiceSettings(service_name="admin").var_dir / "secrets"
    folder = tmp_path / f"secrets-{container}"
    folder.mkdir(mode=0o700)
    for name in (f"kafka-{service}.password", f"postgres-mailbus_{service}.password"):
        shutil.copyfile(source / name, folder / name)
        os.chown(folder / name, IMAGE_UID, IMAGE_UID)
        os.chmod(folder / name, 0o400)
    os.chown(folder, IMAGE_UID, IMAGE_UID)
    return folder


def test_send_and_confirm_through_the_containers(containers: Containers, namespace: str,
                                                  make_key, tmp_path: Path) -> None:
    smtp_port, api_port = free_port(), free_port()
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(f"""
[[accounts]]
id = "dev"
kind = "smtp"
from_address = "dev@mailbus.test"
daily_quota = 100000
rate_per_second = 500
pools = ["default"]
evidence = "smtp_final"
[accounts.smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
""")
    accounts.chmod(0o644)
    # Host networking: everything stays on loopback, on ports nobody else uses,
    # so a `make up` stack on the default ports is not disturbed.
    common = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
              "MAILBUS_ACCOUNTS_FILE": "/etc/mailbus/accounts.toml",
              "MAILBUS_HOST": "127.0.0.1", "MAILBUS_METRICS_HOST": "127.0.0.1",
              "MAILBUS_LOG_LEVEL": "WARNING"}
    conf = [(accounts, "/etc/mailbus/accounts.toml")]
    started = {
        "devsmtp": containers.start("devsmtp", ["mailbus", "devsmtp", "--port", str(smtp_port)],
                                    {"MAILBUS_HEALTH_URL": f"tcp://127.0.0.1:{smtp_port}"}, []),
        "ingest": containers.start("ingest", ["mailbus", "ingest"],
                                   {**common, "MAILBUS_PORT": str(api_port)},
                                   [*conf, (service_secrets(tmp_path, "ingest", "ingest"),
                                            "/var/lib/mailbus/secrets")]),
    }
    for name, principal, extra in (
            ("sender", "sender", {"MAILBUS_POLL_SECONDS": "0.2",
                                  "MAILBUS_LINK_KEYS_FILE": "/var/lib/mailbus/link-keys.json"}),
            ("confirm", "confirm", {}),
            ("projector", "projector", {})):
        started[name] = containers.start(
            name, ["mailbus", name],
            {**common, **extra, "MAILBUS_METRICS_PORT": str(free_port())},
            [*conf, (service_secrets(tmp_path, name, principal), "/var/lib/mailbus/secrets")])
    for name in started.values():
        containers.wait_healthy(name)

    _, token = make_key(scopes=("send", "read"))
    verify = podman("run", "--rm", "--network", "host", "--env", f"MAILBUS_API_KEY={token}",
                    "--label", f"mailbus.image-test={containers.run_id}", containers.image,
                    "mailbus", "verify", "--count", str(COUNT), "--deadline", "240",
                    "--api", f"http://127.0.0.1:{api_port}", check=False, timeout=400)
    logs = {name: containers.logs(full, 1500) for name, full in started.items()}
    assert verify.returncode == 0, (verify.stdout[-3000:], verify.stderr[-3000:], logs)
    assert f"all {COUNT} confirmed" in verify.stdout
    stored = podman("exec", started["devsmtp"], "python", "-c",
                    "from pathlib import Path; from mailbus.devsmtp import stored;"
                    " print(len(stored(Path('/var/lib/mailbus/devmail'))))").stdout.strip()
    assert stored == str(COUNT)
    # Nothing in the containers ran as root.
    for full in started.values():
        top = podman("top", full, "user", check=False).stdout.split()[1:]
        assert top and set(top) == {"mailbus"}, (full, top)


def test_cleanup_leaves_no_container(image: str) -> None:
    """Runs last: the containers of the test above are gone."""
    left = podman("ps", "-a", "--filter", "label=mailbus.image-test", "--format",
                  "{{.Names}}").stdout.split()
    assert left == [], left


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(subprocess.call(["pytest", __file__]))
